//! Row-level security: a session that declares one tenant sees and changes only that
//! tenant's rows, even with no WHERE clause, and a session that declares none sees nothing.

mod support;

use support::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_session_sees_only_its_own_rows() {
    let env = TestEnv::new().await;
    env.deploy("acme", "a", "export default () => 1", &["x"])
        .await;
    env.deploy("globex", "g", "export default () => 2", &["x"])
        .await;
    let client = scriptd::store::connect_direct(&env.settings.database.url)
        .await
        .unwrap();
    client.batch_execute("SET ROLE scriptd_app").await.unwrap();

    let count = |sql: &'static str| {
        let client = &client;
        async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };
    // No tenant declared: nothing is visible.
    assert_eq!(count("SELECT count(*) FROM scripts").await, 0);
    client
        .batch_execute("SELECT set_config('scriptd.tenant', 'acme', false)")
        .await
        .unwrap();
    let names: Vec<String> = client
        .query("SELECT name FROM scripts", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(names, ["a"]);
    assert_eq!(count("SELECT count(*) FROM script_versions").await, 1);
    // Another tenant's rows can be neither changed nor created.
    let changed = client
        .execute(
            "UPDATE scripts SET enabled = false WHERE tenant = 'globex'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(changed, 0);
    let forged = client
        .execute(
            "INSERT INTO runs (tenant, script, job_id, attempt, trigger, status, started_at, duration_ms)
             VALUES ('globex', 'g', 'j', 1, 'event', 'ok', now(), 1)",
            &[],
        )
        .await;
    assert!(forged.is_err(), "a row of another tenant was written");
    client
        .batch_execute("SELECT set_config('scriptd.tenant', '*', false)")
        .await
        .unwrap();
    assert_eq!(count("SELECT count(*) FROM scripts").await, 2);
    drop(client);
    env.cleanup().await;
}
