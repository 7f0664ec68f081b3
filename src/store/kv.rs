//! Tenant key-value storage for scripts' `ctx.kv`: JSON values, a byte quota per tenant kept
//! exact under concurrent writers by a per-tenant usage row locked in every write.

use super::error::{Doing, Result};
use super::{scoped, Store};

/// Why a write was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum KvWrite {
    Done,
    /// The tenant's keys and values would use more than the quota: (in use, needed).
    OverQuota {
        used: i64,
        needed: i64,
    },
}

impl Store {
    pub async fn kv_get(&self, tenant: &str, key: &str) -> Result<Option<String>> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let row = tx
            .query_opt(
                "SELECT value::text FROM kv WHERE tenant = $1 AND key = $2",
                &[&tenant, &key],
            )
            .await
            .doing("reading a key")?;
        tx.commit().await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Stores `value` (JSON text) under `key` if the tenant's usage stays within `quota`
    /// bytes (key length plus value length, summed over its keys).
    pub async fn kv_set(
        &self,
        tenant: &str,
        key: &str,
        value: &str,
        quota: u64,
    ) -> Result<KvWrite> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let size = (key.len() + value.len()) as i32;
        // The usage row is the tenant's write lock.
        tx.execute(
            "INSERT INTO kv_usage (tenant) VALUES ($1) ON CONFLICT (tenant) DO NOTHING",
            &[&tenant],
        )
        .await?;
        let used: i64 = tx
            .query_one(
                "SELECT bytes FROM kv_usage WHERE tenant = $1 FOR UPDATE",
                &[&tenant],
            )
            .await?
            .get(0);
        let old: Option<i32> = tx
            .query_opt(
                "SELECT size FROM kv WHERE tenant = $1 AND key = $2",
                &[&tenant, &key],
            )
            .await?
            .map(|r| r.get(0));
        let needed = used - i64::from(old.unwrap_or(0)) + i64::from(size);
        if needed > used && needed > quota as i64 {
            return Ok(KvWrite::OverQuota { used, needed });
        }
        tx.execute(
            "INSERT INTO kv (tenant, key, value, size) VALUES ($1, $2, $3::text::jsonb, $4)
             ON CONFLICT (tenant, key) DO UPDATE
             SET value = EXCLUDED.value, size = EXCLUDED.size, updated_at = now()",
            &[&tenant, &key, &value, &size],
        )
        .await
        .doing("writing a key")?;
        tx.execute(
            "UPDATE kv_usage SET bytes = $2, keys = keys + $3 WHERE tenant = $1",
            &[&tenant, &needed, &i64::from(old.is_none())],
        )
        .await?;
        tx.commit().await?;
        Ok(KvWrite::Done)
    }

    /// Deletes `key`; whether it existed.
    pub async fn kv_delete(&self, tenant: &str, key: &str) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let removed = tx
            .query_opt(
                "DELETE FROM kv WHERE tenant = $1 AND key = $2 RETURNING size",
                &[&tenant, &key],
            )
            .await
            .doing("deleting a key")?;
        if let Some(row) = &removed {
            let size: i32 = row.get(0);
            tx.execute(
                "UPDATE kv_usage SET bytes = bytes - $2, keys = keys - 1 WHERE tenant = $1",
                &[&tenant, &i64::from(size)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(removed.is_some())
    }

    /// Keys starting with `prefix`, in order, at most `limit`.
    pub async fn kv_list(&self, tenant: &str, prefix: &str, limit: usize) -> Result<Vec<String>> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let rows = tx
            .query(
                "SELECT key FROM kv WHERE tenant = $1 AND starts_with(key, $2)
                 ORDER BY key COLLATE \"C\" LIMIT $3",
                &[&tenant, &prefix, &(limit as i64)],
            )
            .await
            .doing("listing keys")?;
        tx.commit().await?;
        Ok(rows.into_iter().map(|r| r.get(0)).collect())
    }

    /// Bytes and keys a tenant's key-value data uses.
    pub async fn kv_usage(&self, tenant: &str) -> Result<(i64, i64)> {
        let mut client = self.client().await?;
        let tx = scoped(&mut client, tenant).await?;
        let row = tx
            .query_opt(
                "SELECT bytes, keys FROM kv_usage WHERE tenant = $1",
                &[&tenant],
            )
            .await?;
        tx.commit().await?;
        Ok(row.map_or((0, 0), |r| (r.get(0), r.get(1))))
    }
}
