//! The script API's ops: `ctx.publish`, `ctx.kv`, `fetch` and `ctx.secrets`. Each checks
//! its arguments and the run's limits, then calls the [`Capabilities`] the engine was
//! started with, as the run's tenant. Failures become JavaScript errors scripts can catch.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use deno_core::{op2, JsBuffer, OpState, ToJsBuffer};
use deno_error::JsErrorBox;
use serde::{Deserialize, Serialize};

use crate::caps::{
    Call, CapError, Capabilities, CapabilitiesConfig, FetchRequest, KvOp, KvReply, Publish,
};

/// The capabilities of the engine, in every isolate's op state.
pub type SharedCapabilities = Arc<dyn Capabilities>;

/// The run in progress: who calls, and what it has used so far. Put into the op state at
/// the start of every run and taken out at its end.
#[derive(Debug)]
pub struct RunScope {
    /// Who the run acts for: its tenant, script, job and deadline.
    pub call: Call,
    published: u32,
    fetches: u32,
    kv_ops: u32,
    /// Values of the secrets the run read, to keep them out of its record.
    pub secrets_read: Vec<String>,
}

impl RunScope {
    pub fn new(call: Call) -> RunScope {
        RunScope {
            call,
            published: 0,
            fetches: 0,
            kv_ops: 0,
            secrets_read: Vec::new(),
        }
    }
}

fn js_error(e: CapError) -> JsErrorBox {
    JsErrorBox::new(e.kind.js_class(), e.message)
}

/// The run's caller and capabilities, after `check` has counted the call against the
/// run's limits.
fn begin(
    state: &Rc<RefCell<OpState>>,
    check: impl FnOnce(&mut RunScope, &CapabilitiesConfig) -> Result<(), CapError>,
) -> Result<(SharedCapabilities, Call), JsErrorBox> {
    let mut state = state.borrow_mut();
    let caps = state.borrow::<SharedCapabilities>().clone();
    let scope = state.try_borrow_mut::<RunScope>().ok_or_else(|| {
        JsErrorBox::new(
            "NotSupported",
            "the script API is only available while a handler runs",
        )
    })?;
    check(scope, caps.config()).map_err(js_error)?;
    let call = scope.call.clone();
    Ok((caps, call))
}

fn count(used: &mut u32, max: u32, what: &str) -> Result<(), CapError> {
    if *used >= max {
        return Err(CapError::limit(format!(
            "{what}: at most {max} calls per run"
        )));
    }
    *used += 1;
    Ok(())
}

#[op2]
#[string]
pub async fn op_scriptd_publish(
    state: Rc<RefCell<OpState>>,
    #[string] event_type: String,
    #[string] data: String,
    #[serde] headers: Vec<(String, String)>,
) -> Result<String, JsErrorBox> {
    let mut sequence = 0;
    let (caps, call) = begin(&state, |scope, config| {
        let config = &config.publish;
        crate::subject::validate_event_type(&event_type)
            .map_err(|e| CapError::invalid(format!("ctx.publish: {e}")))?;
        if data.len() > config.max_size.as_usize() {
            return Err(CapError::limit(format!(
                "ctx.publish: the message is {} bytes as JSON, over the {} limit",
                data.len(),
                config.max_size
            )));
        }
        if scope.call.depth >= config.max_chain_depth {
            return Err(CapError::limit(format!(
                "ctx.publish: this event is already {} publishes deep; chains stop at {}",
                scope.call.depth, config.max_chain_depth
            )));
        }
        for (name, value) in &headers {
            if value.contains(['\r', '\n']) {
                return Err(CapError::invalid(format!(
                    "ctx.publish: the value of header {name:?} contains a line break"
                )));
            }
            let lower = name.to_ascii_lowercase();
            if lower.starts_with("nats-")
                || lower.starts_with("scriptd-")
                || lower == "traceparent"
                || lower == "tracestate"
                || name.is_empty()
                || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
            {
                return Err(CapError::invalid(format!(
                    "ctx.publish: the header {name:?} cannot be set by scripts"
                )));
            }
        }
        count(&mut scope.published, config.max_per_run, "ctx.publish")?;
        sequence = scope.published;
        Ok(())
    })?;
    let message = Publish {
        event_type,
        data,
        headers,
        sequence,
    };
    caps.publish(call, message).await.map_err(js_error)
}

fn check_key(key: &str, config: &CapabilitiesConfig, what: &str) -> Result<(), CapError> {
    if key.is_empty() || key.len() > config.kv.max_key || key.contains('\0') {
        return Err(CapError::invalid(format!(
            "{what}: keys are 1 to {} bytes without NUL characters",
            config.kv.max_key
        )));
    }
    Ok(())
}

async fn kv(state: Rc<RefCell<OpState>>, what: &str, op: KvOp) -> Result<KvReply, JsErrorBox> {
    let (caps, call) = begin(&state, |scope, config| {
        match &op {
            KvOp::Get(key) | KvOp::Delete(key) => check_key(key, config, what)?,
            KvOp::Set(key, value) => {
                check_key(key, config, what)?;
                if value.len() > config.kv.max_value.as_usize() {
                    return Err(CapError::limit(format!(
                        "{what}: the value is {} bytes as JSON, over the {} limit",
                        value.len(),
                        config.kv.max_value
                    )));
                }
            }
            KvOp::List { .. } => {}
        }
        count(&mut scope.kv_ops, config.kv.max_ops_per_run, "ctx.kv")
    })?;
    caps.kv(call, op).await.map_err(js_error)
}

#[op2]
#[string]
pub async fn op_scriptd_kv_get(
    state: Rc<RefCell<OpState>>,
    #[string] key: String,
) -> Result<Option<String>, JsErrorBox> {
    match kv(state, "ctx.kv.get", KvOp::Get(key)).await? {
        KvReply::Value(v) => Ok(v),
        other => Err(unexpected(other)),
    }
}

#[op2]
pub async fn op_scriptd_kv_set(
    state: Rc<RefCell<OpState>>,
    #[string] key: String,
    #[string] value: String,
) -> Result<(), JsErrorBox> {
    kv(state, "ctx.kv.set", KvOp::Set(key, value)).await?;
    Ok(())
}

#[op2]
pub async fn op_scriptd_kv_delete(
    state: Rc<RefCell<OpState>>,
    #[string] key: String,
) -> Result<bool, JsErrorBox> {
    match kv(state, "ctx.kv.delete", KvOp::Delete(key)).await? {
        KvReply::Deleted(existed) => Ok(existed),
        other => Err(unexpected(other)),
    }
}

#[op2]
#[serde]
pub async fn op_scriptd_kv_list(
    state: Rc<RefCell<OpState>>,
    #[string] prefix: String,
    #[smi] limit: u32,
) -> Result<Vec<String>, JsErrorBox> {
    let max = state
        .borrow()
        .borrow::<SharedCapabilities>()
        .config()
        .kv
        .max_list;
    let limit = if limit == 0 {
        max
    } else {
        (limit as usize).min(max)
    };
    match kv(state, "ctx.kv.list", KvOp::List { prefix, limit }).await? {
        KvReply::Keys(keys) => Ok(keys),
        other => Err(unexpected(other)),
    }
}

fn unexpected(reply: KvReply) -> JsErrorBox {
    JsErrorBox::generic(format!("ctx.kv: unexpected reply {reply:?}"))
}

#[derive(Deserialize)]
pub struct FetchArgs {
    url: String,
    method: String,
    headers: Vec<(String, String)>,
    /// `follow` (default) or `manual`; `error` is handled by the caller.
    redirect: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FetchReply {
    status: u16,
    status_text: String,
    url: String,
    redirected: bool,
    headers: Vec<(String, String)>,
    body: ToJsBuffer,
}

#[op2]
#[serde]
pub async fn op_scriptd_fetch(
    state: Rc<RefCell<OpState>>,
    #[serde] args: FetchArgs,
    #[buffer] body: JsBuffer,
) -> Result<FetchReply, JsErrorBox> {
    let (caps, call) = begin(&state, |scope, config| {
        if body.len() > config.fetch.max_request_body.as_usize() {
            return Err(CapError::limit(format!(
                "fetch: the request body is {} bytes, over the {} limit",
                body.len(),
                config.fetch.max_request_body
            )));
        }
        count(&mut scope.fetches, config.fetch.max_per_run, "fetch")
    })?;
    let request = FetchRequest {
        url: args.url,
        method: args.method,
        headers: args.headers,
        body: body.to_vec(),
        follow_redirects: args.redirect != "manual",
    };
    let response = caps.fetch(call, request).await.map_err(js_error)?;
    Ok(FetchReply {
        status: response.status,
        status_text: response.status_text,
        url: response.url,
        redirected: response.redirected,
        headers: response.headers,
        body: response.body.into(),
    })
}

#[op2]
#[string]
pub async fn op_scriptd_secret(
    state: Rc<RefCell<OpState>>,
    #[string] name: String,
) -> Result<Option<String>, JsErrorBox> {
    let (caps, call) = begin(&state, |_, _| {
        if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
            return Err(CapError::invalid(
                "ctx.secrets.get: names are 1 to 256 characters without control characters",
            ));
        }
        Ok(())
    })?;
    let value = caps.secret(call, name).await.map_err(js_error)?;
    if let Some(v) = &value {
        if let Some(scope) = state.borrow_mut().try_borrow_mut::<RunScope>() {
            scope.secrets_read.push(v.clone());
        }
    }
    Ok(value)
}
