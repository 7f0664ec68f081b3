//! What the daemon's script API answers for services it calls on a script's behalf: a
//! failed service as the script sees it, and a secret opened. Shared by the daemon's API
//! and a dry run's.

use futures::future::BoxFuture;

use crate::caps::secrets::SecretBox;
use crate::caps::{Call, CapError, CapErrorKind, CapResult};
use crate::store::Store;

/// A service failure as the script sees it; the detail goes to the daemon's log.
pub fn service_error(what: &str, call: &Call, error: impl Into<anyhow::Error>) -> CapError {
    let error = error.into();
    tracing::warn!(tenant = %call.tenant, script = %call.script, job = %call.job, error = %format!("{error:#}"), "{what} failed.");
    CapError::failed(format!(
        "{what} failed: the service is unavailable, try again later"
    ))
}

/// `ctx.secrets.get` as the daemon (and a dry run) answers it: the tenant's sealed value,
/// opened with the daemon's key.
pub async fn open_secret(
    store: &Store,
    secrets: Option<&SecretBox>,
    call: &Call,
    name: &str,
) -> CapResult<Option<String>> {
    let Some(secret_box) = secrets else {
        return Err(CapError::new(
            CapErrorKind::Unavailable,
            "ctx.secrets: no secrets key is configured on this daemon",
        ));
    };
    let sealed = store
        .secret_get(&call.tenant, name)
        .await
        .map_err(|e| service_error("ctx.secrets.get", call, e))?;
    match sealed {
        None => Ok(None),
        // Not the service's fault: trying again would not help, and the script (and its
        // tenant) should learn what is wrong.
        Some(sealed) => secret_box
            .open(&call.tenant, name, &sealed)
            .map(Some)
            .map_err(|e| {
                tracing::warn!(tenant = %call.tenant, script = %call.script, job = %call.job, error = %format!("{e:#}"), "A secret could not be opened.");
                CapError::failed(format!("ctx.secrets.get: {e:#}"))
            }),
    }
}

/// Runs `work` on `runtime` (where the connections live) and waits for it from wherever
/// the engine's op runs: a worker thread busy with JavaScript cannot drive them.
pub fn on_runtime<T, F>(
    runtime: &tokio::runtime::Handle,
    work: F,
) -> BoxFuture<'static, CapResult<T>>
where
    T: Send + 'static,
    F: std::future::Future<Output = CapResult<T>> + Send + 'static,
{
    let task = runtime.spawn(work);
    Box::pin(async move {
        task.await
            .unwrap_or_else(|e| Err(CapError::failed(format!("the call failed: {e}"))))
    })
}
