//! Attempt claims on the real PostgreSQL: of replicas racing for one attempt exactly one
//! wins; a record opens the next attempt or ends the job, a job ended without a claim is
//! never claimed; a claim handed back or past its lease can be taken again; a claim whose
//! answer was lost is taken back by its replica.

mod support;

use std::time::Duration;

use scriptd::domain::{RunStatus, Trigger};
use scriptd::store::{Claim, ClaimRequest, ClaimScope, Release, RunRecord, Store, StoredClaim};
use support::{run_record as record, TestEnv};

fn request(job: &str, lease: Duration) -> ClaimRequest {
    ClaimRequest {
        job_id: job.into(),
        tenant: "acme".into(),
        lease,
        idle_here: false,
    }
}

const LEASE: Duration = Duration::from_secs(60);

async fn claim(store: &Store, replica: &str, scope: ClaimScope, job: &str) -> Claim {
    let claims = store
        .claim_attempts(replica, scope, &[request(job, LEASE)])
        .await
        .expect("claim");
    claims.into_iter().next().expect("one answer")
}

/// The record of a first attempt run without a claim.
fn unclaimed(job: &str, status: RunStatus) -> RunRecord {
    RunRecord {
        unclaimed: true,
        ..record(job, 1, status)
    }
}

async fn release(store: &Store, replica: &str, job: &str, attempt: u32) {
    let release = Release {
        job_id: job.into(),
        tenant: "acme".into(),
        attempt,
    };
    store.release_claims(replica, &[release]).await.unwrap();
}

fn attempt_won(claim: &Claim) -> Option<u32> {
    match claim {
        Claim::Won { attempt, .. } => Some(*attempt),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_replicas_racing_for_an_attempt_exactly_one_wins() {
    let env = TestEnv::new().await;
    let jobs: Vec<String> = (0..200).map(|i| format!("job-{i}")).collect();
    let requests: Vec<ClaimRequest> = jobs.iter().map(|j| request(j, LEASE)).collect();
    // Eight replicas, each with its own connection, claim the same 200 jobs at once.
    let racing = (0..8).map(|r| {
        let settings = env.settings.database.clone();
        let requests = requests.clone();
        tokio::spawn(async move {
            let store = Store::connect(&settings).await.expect("store");
            store
                .claim_attempts(&format!("replica-{r}"), ClaimScope::Next, &requests)
                .await
                .expect("claims")
        })
    });
    let answers: Vec<Vec<Claim>> = futures::future::try_join_all(racing).await.unwrap();
    for (j, job) in jobs.iter().enumerate() {
        let won: Vec<u32> = answers.iter().filter_map(|a| attempt_won(&a[j])).collect();
        assert_eq!(
            won,
            [1],
            "{job}: {:?}",
            answers.iter().map(|a| &a[j]).collect::<Vec<_>>()
        );
        for answer in &answers {
            assert!(
                matches!(answer[j], Claim::Won { .. } | Claim::Held { .. }),
                "{job}: {:?}",
                answer[j]
            );
        }
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_open_the_next_attempt_or_end_the_job() {
    let env = TestEnv::new().await;
    let store = &env.store;
    let first = claim(store, "a", ClaimScope::Next, "j").await;
    let Claim::Won {
        attempt: 1,
        first_at,
        taken_over: false,
    } = first
    else {
        panic!("{first:?}")
    };
    // While attempt 1 runs, nobody else gets it.
    assert!(matches!(
        claim(store, "b", ClaimScope::Next, "j").await,
        Claim::Held { .. }
    ));
    store
        .insert_runs(&[record("j", 1, RunStatus::Retrying)])
        .await
        .unwrap();
    // The fan-out takes first attempts only: the job goes on in its lane.
    assert_eq!(
        claim(store, "b", ClaimScope::FirstOnly, "j").await,
        Claim::Later { done: 1 }
    );
    let second = claim(store, "b", ClaimScope::Next, "j").await;
    assert_eq!(
        second,
        Claim::Won {
            attempt: 2,
            first_at,
            taken_over: false
        }
    );
    store
        .insert_runs(&[record("j", 2, RunStatus::Ok)])
        .await
        .unwrap();
    for scope in [ClaimScope::Next, ClaimScope::FirstOnly] {
        assert_eq!(claim(store, "c", scope, "j").await, Claim::Ended);
    }
    let stored = store.claim_of("j").await.unwrap().expect("claim row");
    assert_eq!((stored.state.as_str(), stored.attempt), ("ended", 2));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_ended_by_a_run_without_a_claim_is_never_claimed() {
    let env = TestEnv::new().await;
    let store = &env.store;
    // A batch in which no record writes a claim (the statement without the claims part)
    // answers no ids: nothing waits for them.
    let ids = store
        .insert_runs(&[
            unclaimed("ok", RunStatus::Ok),
            unclaimed("dead", RunStatus::DeadLettered),
        ])
        .await
        .unwrap();
    assert_eq!(ids, [None, None]);
    // With a synchronous (HTTP) run in it, whose caller is answered with its id, it answers
    // every record's id.
    let http = RunRecord {
        trigger: Trigger::Http,
        ..unclaimed("hook", RunStatus::Ok)
    };
    let ids = store
        .insert_runs(&[unclaimed("beside", RunStatus::Ok), http])
        .await
        .unwrap();
    match ids[..] {
        [Some(a), Some(b)] => assert!(a > 0 && b > 0 && a != b, "{ids:?}"),
        _ => panic!("ids not answered: {ids:?}"),
    }
    store
        .insert_runs(&[unclaimed("again", RunStatus::Retrying)])
        .await
        .unwrap();
    // The jobs it ended have no claim row: their runs say they ended.
    for job in ["ok", "dead"] {
        assert_eq!(store.claim_of(job).await.unwrap(), None, "{job}");
        for scope in [ClaimScope::Next, ClaimScope::FirstOnly] {
            assert_eq!(claim(store, "b", scope, job).await, Claim::Ended, "{job}");
        }
    }
    // A job it left to retry has its claim, open for the next attempt.
    let stored = stored(store, "again").await;
    assert_eq!((stored.state.as_str(), stored.attempt), ("open", 1));
    assert_eq!(
        claim(store, "b", ClaimScope::FirstOnly, "again").await,
        Claim::Later { done: 1 }
    );
    assert_eq!(
        attempt_won(&claim(store, "b", ClaimScope::Next, "again").await),
        Some(2)
    );
    // In a batch beside jobs that may run, the ended ones are answered as ended.
    let answers = store
        .claim_attempts(
            "c",
            ClaimScope::Next,
            &[request("ok", LEASE), request("new", LEASE)],
        )
        .await
        .unwrap();
    assert_eq!(answers[0], Claim::Ended);
    assert_eq!(attempt_won(&answers[1]), Some(1));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_statement_never_reads_the_run_table_whole() {
    let env = TestEnv::new().await;
    // A few runs, analysed: the table's size at which a plan probing it would scan it.
    let records: Vec<RunRecord> = (0..5)
        .map(|i| record(&format!("r{i}"), 1, RunStatus::Ok))
        .collect();
    env.store.insert_runs(&records).await.unwrap();
    let admin = scriptd::store::connect_direct(&env.settings.database.url)
        .await
        .unwrap();
    admin.batch_execute("ANALYZE runs").await.unwrap();
    let claims = Store::connect_claims(&env.settings.database, 1)
        .await
        .unwrap();
    let plan = claims.claim_plan().await.unwrap();
    assert!(plan.contains("Index Scan using runs_by_job"), "{plan}");
    assert!(!plan.contains("Seq Scan on runs"), "{plan}");
    drop(claims);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_handed_back_or_past_its_lease_is_taken_again() {
    let env = TestEnv::new().await;
    let store = &env.store;
    assert_eq!(
        attempt_won(&claim(store, "a", ClaimScope::FirstOnly, "back").await),
        Some(1)
    );
    // Handed back by another replica: nothing changes.
    release(store, "b", "back", 1).await;
    assert!(matches!(
        claim(store, "b", ClaimScope::Next, "back").await,
        Claim::Held { .. }
    ));
    // Handed back by its holder: the same attempt, for anyone, first-only included.
    release(store, "a", "back", 1).await;
    assert_eq!(
        attempt_won(&claim(store, "b", ClaimScope::FirstOnly, "back").await),
        Some(1)
    );

    // A holder that never records: once its lease is over the attempt is taken over.
    let short = store
        .claim_attempts("dead", ClaimScope::Next, &[request("lost", Duration::ZERO)])
        .await
        .unwrap();
    assert_eq!(attempt_won(&short[0]), Some(1));
    let taken = claim(store, "alive", ClaimScope::Next, "lost").await;
    assert!(
        matches!(
            taken,
            Claim::Won {
                attempt: 1,
                taken_over: true,
                ..
            }
        ),
        "{taken:?}"
    );
    // The dead replica's late hand-back does not free the new holder's claim.
    release(store, "dead", "lost", 1).await;
    assert!(matches!(
        claim(store, "other", ClaimScope::Next, "lost").await,
        Claim::Held { .. }
    ));

    // The same job twice in one batch: one answer wins, the other waits.
    let twice = store
        .claim_attempts(
            "a",
            ClaimScope::Next,
            &[request("dup", LEASE), request("dup", LEASE)],
        )
        .await
        .unwrap();
    assert_eq!(attempt_won(&twice[0]), Some(1));
    assert!(matches!(twice[1], Claim::Held { .. }), "{:?}", twice[1]);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_answer_was_lost_is_taken_back_by_its_replica_alone() {
    let env = TestEnv::new().await;
    let store = &env.store;
    let ask = |replica: &'static str, scope: ClaimScope, idle_here: bool| async move {
        let asked = ClaimRequest {
            idle_here,
            ..request("lost-answer", LEASE)
        };
        let claims = store.claim_attempts(replica, scope, &[asked]).await;
        claims.expect("claim").remove(0)
    };
    // Replica "a" claims attempt 1; say its answer never came back.
    let Claim::Won { first_at, .. } = ask("a", ClaimScope::FirstOnly, false).await else {
        panic!("the first claim wins")
    };
    let before = stored(store, "lost-answer").await;
    // While an attempt of the job is held on "a", its claim stands; another replica never
    // takes it back, whatever it says of itself.
    assert!(matches!(
        ask("a", ClaimScope::Next, false).await,
        Claim::Held { .. }
    ));
    assert!(matches!(
        ask("b", ClaimScope::Next, true).await,
        Claim::Held { .. }
    ));
    // Holding none, "a" takes the same attempt back at once, with a new lease.
    let taken = ask("a", ClaimScope::FirstOnly, true).await;
    assert_eq!(
        taken,
        Claim::Won {
            attempt: 1,
            first_at,
            taken_over: false
        }
    );
    let after = stored(store, "lost-answer").await;
    assert_eq!(
        (after.state.as_str(), after.attempt, after.replica.as_str()),
        ("running", 1, "a")
    );
    assert!(
        after.lease_until > before.lease_until,
        "{before:?} then {after:?}"
    );
    // Once an attempt has failed the fan-out takes no other, taken back or not.
    store
        .insert_runs(&[record("lost-answer", 1, RunStatus::Retrying)])
        .await
        .unwrap();
    assert_eq!(
        attempt_won(&ask("a", ClaimScope::Next, false).await),
        Some(2)
    );
    assert!(matches!(
        ask("a", ClaimScope::FirstOnly, true).await,
        Claim::Held { .. }
    ));
    assert_eq!(
        attempt_won(&ask("a", ClaimScope::Next, true).await),
        Some(2)
    );
    env.cleanup().await;
}

async fn stored(store: &Store, job: &str) -> StoredClaim {
    store.claim_of(job).await.unwrap().expect("claim row")
}
