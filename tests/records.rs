//! Run records through their batch writer on the real PostgreSQL: a record holding a value
//! PostgreSQL refuses fails alone, not the records written in the same batch.

mod support;

use scriptd::domain::RunStatus;
use scriptd::pipeline::records::RecordWriter;
use scriptd::store::{RunRecord, Store};
use support::TestEnv;

fn record(job: &str) -> RunRecord {
    RunRecord {
        unclaimed: true,
        ..support::run_record(job, 1, RunStatus::Ok)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_postgresql_refuses_fails_its_own_record_only() {
    let env = TestEnv::new().await;
    let store = Store::connect(&env.settings.database).await.unwrap();
    let inserts = Store::connect_records(&env.settings.database)
        .await
        .unwrap();
    let (writer, task) = RecordWriter::start(store, inserts);
    // Job ids are made by the daemon and never hold a NUL character; this one stands for
    // any value PostgreSQL would refuse. The three are written at once, into one batch.
    let jobs = ["job-a", "job-\u{0}-refused", "job-b"];
    let written = futures::future::join_all(jobs.iter().map(|job| writer.write(record(job)))).await;
    assert!(written[0].is_ok(), "{:?}", written[0]);
    assert!(written[2].is_ok(), "{:?}", written[2]);
    let refused = written[1].as_ref().unwrap_err();
    assert!(refused.refused_a_value(), "{refused}");
    let mut recorded: Vec<String> = env.runs().await.into_iter().map(|r| r.job_id).collect();
    recorded.sort();
    assert_eq!(recorded, ["job-a", "job-b"]);
    drop(writer);
    task.await.unwrap();
    env.cleanup().await;
}
