//! `scriptd tokens ...`: bearer tokens of the HTTP API — made (shown once), listed (never
//! their secret), revoked; and `scriptd audit list`, the trail of who changed what.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::config::Settings;
use crate::store::{Role, Store, ALL_TENANTS};
use crate::subject;
use crate::units::parse_duration;

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The tenant a tenant token acts for (an operator token acts for every tenant).
    #[arg(long, required_if_eq("role", "tenant"))]
    pub tenant: Option<String>,
    /// `tenant`: acts for its tenant only; `operator`: for every tenant.
    #[arg(long, value_enum, default_value = "tenant")]
    pub role: Role,
    /// How long the token works (`30d`, `12h`); without it, until revoked.
    #[arg(long, value_parser = parse_duration)]
    pub expires: Option<Duration>,
    /// A note on whom or what the token is for.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Print JSON (with the token) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this tenant's tokens.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only what was done to this tenant (without it, everything).
    #[arg(long)]
    pub tenant: Option<String>,
    /// At most this many entries, newest first.
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The token's prefix (the 12 characters after `sd_`, as `tokens list` shows them).
    pub prefix: String,
}

pub async fn create(settings: &Settings, args: CreateArgs) -> anyhow::Result<ExitCode> {
    let tenant = match (args.role, &args.tenant) {
        (Role::Operator, Some(_)) => {
            anyhow::bail!("an operator token acts for every tenant: leave out --tenant")
        }
        (Role::Operator, None) => ALL_TENANTS.to_owned(),
        (Role::Tenant, Some(tenant)) => {
            subject::validate_name("tenant", tenant)?;
            tenant.clone()
        }
        (Role::Tenant, None) => anyhow::bail!("a tenant token needs --tenant"),
    };
    let expires_at = args
        .expires
        .map(|d| chrono::Utc::now() + chrono::Duration::from_std(d).unwrap_or_default());
    let store = Store::connect(&settings.database).await?;
    let (token, info) = store
        .create_token(&tenant, args.role, &args.label, expires_at)
        .await?;
    super::audit(&store, &tenant, "tokens.create", &info.prefix).await?;
    if args.json {
        let mut shown = serde_json::to_value(&info)?;
        shown["token"] = token.into();
        super::print_json(&shown)?;
    } else {
        println!("{token}");
        eprintln!(
            "token {} for {} ({}){}: shown this once, stored only as a hash; \
             send it as `Authorization: Bearer <token>`",
            info.prefix,
            if tenant == ALL_TENANTS {
                "every tenant"
            } else {
                &tenant
            },
            info.role,
            info.expires_at
                .map(|t| format!(", expires {}", t.to_rfc3339()))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn list(settings: &Settings, args: ListArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database).await?;
    let tokens = store
        .list_tokens(args.tenant.as_deref().unwrap_or(ALL_TENANTS))
        .await?;
    if args.json {
        super::print_json(&tokens)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<14} {:<16} {:<9} {:<26} {:<10} LABEL",
        "PREFIX", "TENANT", "ROLE", "EXPIRES", "STATE"
    );
    for t in tokens {
        let state = if t.revoked_at.is_some() {
            "revoked"
        } else if t.expires_at.is_some_and(|e| e <= chrono::Utc::now()) {
            "expired"
        } else {
            "active"
        };
        println!(
            "{:<14} {:<16} {:<9} {:<26} {:<10} {}",
            t.prefix,
            t.tenant,
            t.role,
            t.expires_at
                .map(|e| e.to_rfc3339())
                .unwrap_or_else(|| "never".into()),
            state,
            t.label
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn revoke(settings: &Settings, args: RevokeArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database).await?;
    if let Some(tenant) = store.revoke_token(&args.prefix).await? {
        super::audit(&store, &tenant, "tokens.revoke", &args.prefix).await?;
        println!("revoked token {}", args.prefix);
        Ok(ExitCode::SUCCESS)
    } else {
        anyhow::bail!(
            "no active token with prefix {:?} (`scriptd tokens list` shows them)",
            args.prefix
        )
    }
}

pub async fn audit_list(settings: &Settings, args: AuditArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database).await?;
    let rows = store
        .audit_trail(args.tenant.as_deref().unwrap_or(ALL_TENANTS), args.limit)
        .await?;
    if args.json {
        super::print_json(&rows)?;
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("nothing recorded");
    }
    for row in rows {
        let e = &row.entry;
        println!(
            "{}  {:<16} {:<22} {:<26} {:<24} {}",
            row.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            e.tenant,
            format!("{} ({})", e.actor, e.role),
            e.action,
            e.target,
            e.status
        );
    }
    Ok(ExitCode::SUCCESS)
}
