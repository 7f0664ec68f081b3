//! What `dev` prints while the daemon runs: one line per run as it is recorded, and the
//! commands to look further, written with the path of this very binary so they run as
//! printed.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoredRun};

/// How often the run records are looked at.
const EVERY: Duration = Duration::from_millis(500);

/// How to call this binary from the current directory: a relative path when it lies below
/// it (`target/release/scriptd`), else the absolute one.
pub fn this_binary() -> String {
    let exe = std::env::current_exe().unwrap_or_else(|_| "scriptd".into());
    let here = std::env::current_dir().unwrap_or_default();
    match exe.strip_prefix(&here) {
        Ok(relative) => relative.display().to_string(),
        Err(_) => exe.display().to_string(),
    }
}

/// The banner's last lines: what to try, and where to look.
pub fn hints(tenant: &str, api: &super::DevApi) -> String {
    let bin = this_binary();
    let (url, token) = (&api.url, &api.token);
    format!(
        "dev: the daemon is running (Ctrl-C stops it); each run is printed below as it is recorded.\n\
         dev: try   {bin} events publish {tenant} order.created '{{\"id\":\"o-2\",\"items\":[{{\"price\":3,\"qty\":2}}]}}'\n\
         dev:       curl -X POST {url}/hooks/{tenant}/orders -H 'content-type: application/json' -d '{{\"id\":\"o-3\",\"items\":[{{\"price\":4,\"qty\":1}}]}}'\n\
         dev: look  {bin} runs list --tenant {tenant}\n\
         dev:       {bin} runs show <ID>        (input, logs, failure and stack of one run)\n\
         dev:       {bin} dlq list              (jobs that exhausted their retries)\n\
         dev: API   {url}/openapi.json; an operator token for this session (shown once, valid a day):\n\
         dev:       export API_TOKEN={token}\n\
         dev:       curl -H \"Authorization: Bearer $API_TOKEN\" {url}/v1/tenants/{tenant}/runs\n\
         dev: console {url}/console/ (sign in with the token above)"
    )
}

/// Prints each run recorded after `after` until `stop`, one line each.
pub async fn runs(store: Store, mut after: i64, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        match store.runs_after(after, 200).await {
            Ok(runs) => {
                for run in runs {
                    after = after.max(run.id);
                    println!("{}", line(&run));
                }
            }
            Err(e) => tracing::debug!(error = %e, "Could not read the run records."),
        }
    }
}

/// `12:01:02 #17 acme/order-created v1 attempt 1 ok 3.2 ms: first log line`.
fn line(run: &StoredRun) -> String {
    let version = run.version.map_or("-".into(), |v| format!("v{v}"));
    let what = match (&run.failure_kind, &run.failure_message) {
        (Some(kind), Some(message)) => format!("{kind}: {message}"),
        _ => run
            .logs
            .as_array()
            .and_then(|logs| logs.first())
            .and_then(|l| l["message"].as_str())
            .unwrap_or_default()
            .to_owned(),
    };
    let what: String = what
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(120)
        .collect();
    format!(
        "{} #{} {}/{} {version} attempt {} {} {:.1} ms{}{what}",
        run.started_at.format("%H:%M:%S"),
        run.id,
        run.tenant,
        run.script,
        run.attempt,
        run.status,
        run.duration_ms,
        if what.is_empty() { "" } else { ": " },
    )
}
