//! Tenant secrets (stored sealed; this module never sees a plain value) and tenant
//! policies set by operators (the hosts `fetch` may call).

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::error::{Doing, Result};
use super::{scoped, Store};
use crate::caps::secrets::Sealed;

/// A secret's listing: never its value.
#[derive(Debug, Serialize)]
pub struct SecretInfo {
    /// The secret's name, as scripts ask for it.
    pub name: String,
    /// Which key sealed the value: the first 8 bytes of the key's SHA-256, hex.
    pub key_id: String,
    /// When the value was last set.
    pub updated_at: DateTime<Utc>,
}

impl Store {
    pub async fn secret_put(&self, tenant: &str, name: &str, sealed: &Sealed) -> Result<()> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        tx.execute(
            "INSERT INTO secrets (tenant, name, key_id, nonce, ciphertext) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant, name) DO UPDATE SET key_id = EXCLUDED.key_id,
                 nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext, updated_at = now()",
            &[&tenant, &name, &sealed.key_id, &sealed.nonce, &sealed.ciphertext],
        )
        .await
        .doing("storing a secret")?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn secret_get(&self, tenant: &str, name: &str) -> Result<Option<Sealed>> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let row = tx
            .query_opt(
                "SELECT key_id, nonce, ciphertext FROM secrets WHERE tenant = $1 AND name = $2",
                &[&tenant, &name],
            )
            .await
            .doing("reading a secret")?;
        tx.commit().await?;
        Ok(row.map(|r| Sealed {
            key_id: r.get(0),
            nonce: r.get(1),
            ciphertext: r.get(2),
        }))
    }

    pub async fn secret_list(&self, tenant: &str) -> Result<Vec<SecretInfo>> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let rows = tx
            .query(
                "SELECT name, key_id, updated_at FROM secrets WHERE tenant = $1 ORDER BY name",
                &[&tenant],
            )
            .await?;
        tx.commit().await?;
        Ok(rows
            .into_iter()
            .map(|r| SecretInfo {
                name: r.get(0),
                key_id: r.get(1),
                updated_at: r.get(2),
            })
            .collect())
    }

    pub async fn secret_delete(&self, tenant: &str, name: &str) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let n = tx
            .execute(
                "DELETE FROM secrets WHERE tenant = $1 AND name = $2",
                &[&tenant, &name],
            )
            .await?;
        tx.commit().await?;
        Ok(n > 0)
    }

    /// The hosts the tenant's scripts may fetch from (empty: none).
    pub async fn fetch_allow_list(&self, tenant: &str) -> Result<Vec<String>> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let row = tx
            .query_opt(
                "SELECT fetch_allow FROM tenant_policies WHERE tenant = $1",
                &[&tenant],
            )
            .await
            .doing("reading the tenant's fetch allow list")?;
        tx.commit().await?;
        Ok(row.map(|r| r.get(0)).unwrap_or_default())
    }

    pub async fn set_fetch_allow_list(&self, tenant: &str, hosts: &[String]) -> Result<()> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        tx.execute(
            "INSERT INTO tenant_policies (tenant, fetch_allow) VALUES ($1, $2)
             ON CONFLICT (tenant) DO UPDATE SET fetch_allow = EXCLUDED.fetch_allow, updated_at = now()",
            &[&tenant, &hosts],
        )
        .await
        .doing("storing the tenant's fetch allow list")?;
        tx.commit().await?;
        Ok(())
    }
}
