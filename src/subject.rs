//! NATS subjects of scriptd: names that may appear as tokens, tenant-relative subject
//! patterns with NATS wildcard semantics (`*` one token, `>` one or more trailing tokens),
//! and the tenant and event type of an event subject.

use std::fmt;

/// Why a name, pattern or subject is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectError(pub String);

impl fmt::Display for SubjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SubjectError {}

/// Tenant and script names become subject tokens: 1 to 64 of `[A-Za-z0-9_-]`.
pub fn validate_name(what: &str, name: &str) -> Result<(), SubjectError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(SubjectError(format!(
            "invalid {what} name {name:?}: use 1 to 64 letters, digits, '_' or '-'"
        )))
    }
}

fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b > b' ' && b != b'.' && b != b'*' && b != b'>' && b != 0x7f)
}

/// A tenant-relative pattern such as `order.*` or `user.>`.
pub fn validate_pattern(pattern: &str) -> Result<(), SubjectError> {
    let tokens: Vec<&str> = pattern.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        let ok = match *token {
            "*" => true,
            ">" => i == tokens.len() - 1,
            t => valid_token(t),
        };
        if !ok {
            return Err(SubjectError(format!(
                "invalid subject pattern {pattern:?}: tokens are non-empty, without spaces, \
                 and '>' may only be the last token"
            )));
        }
    }
    Ok(())
}

/// Whether a tenant-relative event type (`order.created`) matches a pattern.
pub fn matches(pattern: &str, event_type: &str) -> bool {
    let mut subject = event_type.split('.');
    for p in pattern.split('.') {
        if p == ">" {
            return subject.next().is_some();
        }
        match subject.next() {
            Some(s) if p == "*" || p == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

/// The parts of `<prefix>.<tenant>.<type tokens...>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSubject<'a> {
    /// The tenant token: the first after the prefix.
    pub tenant: &'a str,
    /// The tenant-relative event type: the remaining tokens (`order.created`).
    pub event_type: &'a str,
}

pub fn parse_event_subject<'a>(
    prefix: &str,
    subject: &'a str,
) -> Result<EventSubject<'a>, SubjectError> {
    let rest = subject
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('.'))
        .ok_or_else(|| SubjectError(format!("{subject:?} is not under {prefix:?}")))?;
    let (tenant, event_type) = rest.split_once('.').ok_or_else(|| {
        SubjectError(format!(
            "{subject:?} has no event type: expected {prefix}.<tenant>.<type>"
        ))
    })?;
    validate_name("tenant", tenant)?;
    if event_type.split('.').any(|t| !valid_token(t)) {
        return Err(SubjectError(format!(
            "{subject:?} has an empty or wildcard token"
        )));
    }
    Ok(EventSubject { tenant, event_type })
}

/// A tenant-relative event type a script may publish to: concrete tokens only.
pub fn validate_event_type(event_type: &str) -> Result<(), SubjectError> {
    if event_type.split('.').all(valid_token) {
        Ok(())
    } else {
        Err(SubjectError(format!(
            "invalid event type {event_type:?}: use dot-separated tokens without wildcards or spaces"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_follow_nats_semantics() {
        assert!(matches("order.created", "order.created"));
        assert!(!matches("order.created", "order.created.v2"));
        assert!(matches("order.*", "order.created"));
        assert!(!matches("order.*", "order"));
        assert!(!matches("order.*", "order.created.v2"));
        assert!(matches("order.>", "order.created"));
        assert!(matches("order.>", "order.created.v2"));
        assert!(!matches("order.>", "order"));
        assert!(matches(">", "anything.at.all"));
        assert!(matches("*.created", "user.created"));
        assert!(!matches("*.created", "user.deleted"));
    }

    #[test]
    fn patterns_are_validated() {
        for ok in ["order.*", "user.>", ">", "a.b.c", "*.x"] {
            assert!(validate_pattern(ok).is_ok(), "{ok}");
        }
        for bad in ["", "order.", ".order", "a.>.b", "a b", "a..b", "ord*er"] {
            assert!(validate_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn event_subjects_name_their_tenant() {
        let s = parse_event_subject("events", "events.acme.order.created").unwrap();
        assert_eq!(s.tenant, "acme");
        assert_eq!(s.event_type, "order.created");
        let s = parse_event_subject("t1.events", "t1.events.acme.ping").unwrap();
        assert_eq!((s.tenant, s.event_type), ("acme", "ping"));
        assert!(parse_event_subject("events", "events.acme").is_err());
        assert!(parse_event_subject("events", "other.acme.x").is_err());
        assert!(parse_event_subject("events", "eventsx.acme.x").is_err());
    }

    #[test]
    fn names_are_single_safe_tokens() {
        assert!(validate_name("tenant", "acme-eu_1").is_ok());
        for bad in ["", "a.b", "a*", "a b", ">", &"x".repeat(65)] {
            assert!(validate_name("tenant", bad).is_err(), "{bad}");
        }
    }
}
