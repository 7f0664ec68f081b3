//! API tokens and the audit trail. A token is `sd_<prefix>_<secret>`: the prefix finds its
//! row, the secret is checked against the stored SHA-256 in constant time; the plain token
//! exists only in the answer to `tokens create`.

use base64::Engine as _;
use chrono::{DateTime, Utc};
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::error::{Doing, Result};
use super::{scoped, Store, ALL_TENANTS};

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Acts for its own tenant only.
    Tenant,
    /// Acts for every tenant.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Tenant => "tenant",
            Role::Operator => "operator",
        }
    }
}

/// A token's listing: never its secret.
#[derive(Clone, Debug, Serialize)]
pub struct TokenInfo {
    pub prefix: String,
    /// The tenant it acts for; `*` for an operator token.
    pub tenant: String,
    pub role: String,
    pub label: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// Who a valid token says the caller is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's prefix: the actor in the audit trail.
    pub prefix: String,
    pub role: Role,
    /// The tenant a tenant token acts for; `*` for an operator.
    pub tenant: String,
}

impl Principal {
    /// Whether the caller may act for `tenant`.
    pub fn may_act_for(&self, tenant: &str) -> bool {
        self.role == Role::Operator || self.tenant == tenant
    }
}

/// Why a presented token was not accepted (all answered 401, the reason logged).
#[derive(Debug, PartialEq, Eq)]
pub enum Rejected {
    Malformed,
    Unknown,
    Revoked,
    Expired,
}

/// One row of the audit trail.
#[derive(Clone, Debug, Serialize)]
pub struct AuditEntry {
    pub tenant: String,
    pub actor: String,
    pub role: String,
    pub action: String,
    pub target: String,
    pub status: i32,
    pub detail: Option<serde_json::Value>,
}

/// A recorded audit row.
#[derive(Clone, Debug, Serialize)]
pub struct AuditRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    #[serde(flatten)]
    pub entry: AuditEntry,
}

fn secret_hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// Compares two byte strings in time that depends on their length only.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Splits `sd_<prefix>_<secret>`.
fn parts(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("sd_")?;
    let (prefix, secret) = rest.split_once('_')?;
    let hex_prefix = prefix.len() == 12 && prefix.bytes().all(|b| b.is_ascii_hexdigit());
    (hex_prefix && !secret.is_empty()).then_some((prefix, secret))
}

impl Store {
    /// Makes a token; returns it whole (the only time it exists outside the caller's hands)
    /// and its listing.
    pub async fn create_token(
        &self,
        tenant: &str,
        role: Role,
        label: &str,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<(String, TokenInfo)> {
        let mut random = [0u8; 30];
        rand::thread_rng().fill_bytes(&mut random);
        let prefix = hex::encode(&random[..6]);
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&random[6..]);
        let tenant = match role {
            Role::Operator => ALL_TENANTS,
            Role::Tenant => tenant,
        };
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let row = tx
            .query_one(
                "INSERT INTO api_tokens (prefix, tenant, role, secret_hash, label, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING created_at",
                &[
                    &prefix,
                    &tenant,
                    &role.as_str(),
                    &secret_hash(&secret),
                    &label,
                    &expires_at,
                ],
            )
            .await
            .doing("storing a token")?;
        tx.commit().await?;
        let info = TokenInfo {
            prefix: prefix.clone(),
            tenant: tenant.to_owned(),
            role: role.as_str().to_owned(),
            label: label.to_owned(),
            created_at: row.get(0),
            expires_at,
            revoked_at: None,
        };
        Ok((format!("sd_{prefix}_{secret}"), info))
    }

    /// Who `token` stands for, or why it does not count.
    pub async fn authenticate(
        &self,
        token: &str,
    ) -> Result<std::result::Result<Principal, Rejected>> {
        let Some((prefix, secret)) = parts(token) else {
            return Ok(Err(Rejected::Malformed));
        };
        let rows = self
            .all_tenants_query(
                "SELECT tenant, role, secret_hash, revoked_at IS NOT NULL,
                        coalesce(expires_at <= now(), false)
                 FROM api_tokens WHERE prefix = $1",
                &[&prefix],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Ok(Err(Rejected::Unknown));
        };
        if !same(&row.get::<_, Vec<u8>>(2), &secret_hash(secret)) {
            return Ok(Err(Rejected::Unknown));
        }
        if row.get::<_, bool>(3) {
            return Ok(Err(Rejected::Revoked));
        }
        if row.get::<_, bool>(4) {
            return Ok(Err(Rejected::Expired));
        }
        let role = match row.get::<_, &str>(1) {
            "operator" => Role::Operator,
            _ => Role::Tenant,
        };
        Ok(Ok(Principal {
            prefix: prefix.to_owned(),
            role,
            tenant: row.get(0),
        }))
    }

    /// Tokens of `tenant` (every token with [`ALL_TENANTS`]), newest first.
    pub async fn list_tokens(&self, tenant: &str) -> Result<Vec<TokenInfo>> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let rows = tx
            .query(
                "SELECT prefix, tenant, role, label, created_at, expires_at, revoked_at
                 FROM api_tokens ORDER BY created_at DESC",
                &[],
            )
            .await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(|r| TokenInfo {
                prefix: r.get(0),
                tenant: r.get(1),
                role: r.get(2),
                label: r.get(3),
                created_at: r.get(4),
                expires_at: r.get(5),
                revoked_at: r.get(6),
            })
            .collect())
    }

    /// Revokes the token with `prefix`: the tenant it was for (`*` for an operator's), or
    /// none if there is no such token or it was revoked before.
    pub async fn revoke_token(&self, prefix: &str) -> Result<Option<String>> {
        let rows = self
            .all_tenants_query(
                "UPDATE api_tokens SET revoked_at = now()
                 WHERE prefix = $1 AND revoked_at IS NULL RETURNING tenant",
                &[&prefix],
            )
            .await?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    /// Appends `entry` to the audit trail.
    pub async fn audit(&self, entry: &AuditEntry) -> Result<()> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, &entry.tenant).await?;
        tx.execute(
            "INSERT INTO audit_log (tenant, actor, role, action, target, status, detail)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &entry.tenant,
                &entry.actor,
                &entry.role,
                &entry.action,
                &entry.target,
                &entry.status,
                &entry.detail,
            ],
        )
        .await
        .doing("writing the audit trail")?;
        tx.commit().await?;
        Ok(())
    }

    /// The audit trail of `tenant` (all with [`ALL_TENANTS`]), newest first.
    pub async fn audit_trail(&self, tenant: &str, limit: i64) -> Result<Vec<AuditRow>> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let rows = tx
            .query(
                "SELECT id, at, tenant, actor, role, action, target, status, detail
                 FROM audit_log ORDER BY id DESC LIMIT $1",
                &[&limit.max(1)],
            )
            .await?;
        tx.commit().await?;
        Ok(rows
            .iter()
            .map(|r| AuditRow {
                id: r.get(0),
                at: r.get(1),
                entry: AuditEntry {
                    tenant: r.get(2),
                    actor: r.get(3),
                    role: r.get(4),
                    action: r.get(5),
                    target: r.get(6),
                    status: r.get(7),
                    detail: r.get(8),
                },
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_split_into_prefix_and_secret_or_not_at_all() {
        assert_eq!(
            parts("sd_0123456789ab_c2VjcmV0"),
            Some(("0123456789ab", "c2VjcmV0"))
        );
        for bad in [
            "",
            "sd_",
            "sd_0123456789ab_",
            "xx_0123456789ab_s",
            "sd_short_s",
            "sd_zz23456789ab_s",
        ] {
            assert_eq!(parts(bad), None, "{bad}");
        }
    }

    #[test]
    fn comparison_needs_every_byte() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
