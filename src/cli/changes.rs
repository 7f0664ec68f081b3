//! What a deploy changes in a script's settings, said in one line, so a redeploy that
//! leaves out a flag (and so goes back to the default) is not silent.

use crate::config::Settings;
use crate::store::ScriptSpec;

/// `on order.created → order.*; limits.timeout 30s → default (5s)`, or none when the
/// settings are the same.
pub fn describe(settings: &Settings, before: &ScriptSpec, after: &ScriptSpec) -> Option<String> {
    let mut changes = Vec::new();
    let mut note = |what: &str, old: String, new: String| {
        if old != new {
            changes.push(format!("{what} {old} → {new}"));
        }
    };
    let list = |xs: &[String]| {
        if xs.is_empty() {
            "none".to_owned()
        } else {
            xs.join(", ")
        }
    };
    note("on", list(&before.subjects), list(&after.subjects));
    let cron = |c: &Option<String>| c.clone().unwrap_or_else(|| "none".into());
    note("cron", cron(&before.cron), cron(&after.cron));
    note("time zone", before.timezone.clone(), after.timezone.clone());
    note(
        "overlap",
        before.overlap.as_str().into(),
        after.overlap.as_str().into(),
    );
    note(
        "catch-up",
        before.catch_up.as_str().into(),
        after.catch_up.as_str().into(),
    );
    let http = |r: &Option<crate::scripts::route::HttpRoute>| match r {
        Some(r) => format!("{r} ({})", r.auth.as_str()),
        None => "none".into(),
    };
    note("http", http(&before.http), http(&after.http));
    let table = |name: &str, old, new, defaults| overrides(name, old, new, defaults);
    for (what, old, new) in table(
        "limits",
        serde_json::to_value(before.limits).unwrap_or_default(),
        serde_json::to_value(after.limits).unwrap_or_default(),
        serde_json::to_value(settings.engine.limits).unwrap_or_default(),
    )
    .into_iter()
    .chain(table(
        "retry",
        serde_json::to_value(before.retry).unwrap_or_default(),
        serde_json::to_value(after.retry).unwrap_or_default(),
        serde_json::to_value(settings.retry).unwrap_or_default(),
    )) {
        note(&what, old, new);
    }
    (!changes.is_empty()).then(|| changes.join("; "))
}

/// Each setting of a table of overrides that one side sets: its name and both values, a
/// value left out shown as the default it falls back to.
fn overrides(
    name: &str,
    old: serde_json::Value,
    new: serde_json::Value,
    defaults: serde_json::Value,
) -> Vec<(String, String, String)> {
    let empty = serde_json::Map::new();
    let (old, new) = (
        old.as_object().unwrap_or(&empty),
        new.as_object().unwrap_or(&empty),
    );
    let shown = |value: Option<&serde_json::Value>, key: &str| match value {
        Some(v) => plain(v),
        None => format!(
            "default ({})",
            defaults.get(key).map(plain).unwrap_or_default()
        ),
    };
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .map(|key| {
            (
                format!("{name}.{key}"),
                shown(old.get(key), key),
                shown(new.get(key), key),
            )
        })
        .collect()
}

fn plain(value: &serde_json::Value) -> String {
    value
        .as_str()
        .map_or_else(|| value.to_string(), str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_left_out_goes_back_to_its_default_and_says_so() {
        let settings = Settings::default();
        let before = ScriptSpec {
            subjects: vec!["order.created".into()],
            timezone: "UTC".into(),
            limits: crate::engine::LimitOverrides {
                timeout: Some(std::time::Duration::from_secs(30)),
                ..Default::default()
            },
            ..Default::default()
        };
        let after = ScriptSpec {
            limits: Default::default(),
            ..before.clone()
        };
        assert_eq!(
            describe(&settings, &before, &after).as_deref(),
            Some("limits.timeout 30s → default (5s)")
        );
        assert_eq!(describe(&settings, &before, &before), None);
    }
}
