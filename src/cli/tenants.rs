//! `scriptd secrets ...` and `scriptd tenants ...`: what operators set per tenant for the
//! script API — encrypted secrets, and the hosts `fetch` may call.

use std::io::Read;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;

use crate::caps::net::HostRule;
use crate::caps::secrets::SecretBox;
use crate::config::Settings;
use crate::store::Store;
use crate::subject;

#[derive(Debug, Args)]
pub struct SecretSetArgs {
    /// The tenant that owns the secret.
    pub tenant: String,
    /// The secret's name, as scripts ask for it with `ctx.secrets.get`.
    pub name: String,
    /// Read the value from this environment variable instead of standard input (values
    /// never go on the command line, where other users and shell history can see them).
    #[arg(long)]
    pub from_env: Option<String>,
}

#[derive(Debug, Args)]
pub struct SecretNameArgs {
    /// The tenant that owns the secret.
    pub tenant: String,
    /// The secret's name.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct TenantArgs {
    /// The tenant to look at.
    pub tenant: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct AllowFetchArgs {
    /// The tenant whose allow list is set.
    pub tenant: String,
    /// Hosts the tenant's scripts may fetch from: `api.example.com`, `*.example.com`,
    /// `host:port`. Replaces the current list; none clears it.
    pub hosts: Vec<String>,
}

fn secret_box(settings: &Settings) -> anyhow::Result<SecretBox> {
    let dev_key = std::path::Path::new("target/dev/secrets.key");
    let hint = if dev_key.exists() {
        format!(
            " (`scriptd dev` keeps its key in {}: SCRIPTD_CAPABILITIES__SECRETS__KEY_FILE={} \
             reaches the secrets of its tenants)",
            dev_key.display(),
            dev_key.display()
        )
    } else {
        String::new()
    };
    SecretBox::from_config(&settings.capabilities.secrets)?.with_context(|| {
        format!(
            "no secrets key is configured: set capabilities.secrets.key_file (or \
             SCRIPTD_CAPABILITIES__SECRETS__KEY) to a key from `scriptd secrets generate-key`{hint}"
        )
    })
}

fn check_secret_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        bail!("secret names are 1 to 256 characters without control characters");
    }
    Ok(())
}

pub async fn secret_set(settings: &Settings, args: SecretSetArgs) -> anyhow::Result<ExitCode> {
    subject::validate_name("tenant", &args.tenant)?;
    check_secret_name(&args.name)?;
    let secret_box = secret_box(settings)?;
    let value = match &args.from_env {
        Some(var) => std::env::var(var).with_context(|| format!("reading ${var}"))?,
        None => {
            let mut value = String::new();
            std::io::stdin()
                .read_to_string(&mut value)
                .context("reading the value from standard input")?;
            value.strip_suffix('\n').unwrap_or(&value).to_owned()
        }
    };
    if value.is_empty() {
        bail!("the secret's value is empty");
    }
    let store = Store::connect(&settings.database).await?;
    let sealed = secret_box.seal(&args.tenant, &args.name, &value);
    store.secret_put(&args.tenant, &args.name, &sealed).await?;
    super::audit(&store, &args.tenant, "secrets.set", &args.name).await?;
    println!(
        "secret {}/{} stored (key {})",
        args.tenant,
        args.name,
        secret_box.key_id()
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn secret_list(settings: &Settings, args: TenantArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database).await?;
    let secrets = store.secret_list(&args.tenant).await?;
    if args.json {
        super::print_json(&secrets)?;
    } else if secrets.is_empty() {
        println!("tenant {} has no secrets", args.tenant);
    } else {
        for s in &secrets {
            println!(
                "{:<32} key {}  updated {}",
                s.name,
                s.key_id,
                s.updated_at.to_rfc3339()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn secret_delete(settings: &Settings, args: SecretNameArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database).await?;
    if store.secret_delete(&args.tenant, &args.name).await? {
        super::audit(&store, &args.tenant, "secrets.delete", &args.name).await?;
        println!("secret {}/{} deleted", args.tenant, args.name);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("tenant {} has no secret {:?}", args.tenant, args.name);
        Ok(ExitCode::from(1))
    }
}

pub async fn allow_fetch(settings: &Settings, args: AllowFetchArgs) -> anyhow::Result<ExitCode> {
    subject::validate_name("tenant", &args.tenant)?;
    for host in &args.hosts {
        HostRule::parse(host).map_err(anyhow::Error::msg)?;
    }
    let store = Store::connect(&settings.database).await?;
    store
        .set_fetch_allow_list(&args.tenant, &args.hosts)
        .await?;
    super::audit(&store, &args.tenant, "tenants.fetch_allow", "").await?;
    if args.hosts.is_empty() {
        println!("tenant {} may fetch from no host", args.tenant);
    } else {
        println!(
            "tenant {} may fetch from: {}",
            args.tenant,
            args.hosts.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn show(settings: &Settings, args: TenantArgs) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&settings.database).await?;
    let allow = store.fetch_allow_list(&args.tenant).await?;
    let (kv_bytes, kv_keys) = store.kv_usage(&args.tenant).await?;
    let secrets: Vec<String> = store
        .secret_list(&args.tenant)
        .await?
        .into_iter()
        .map(|s| s.name)
        .collect();
    let quota = settings.capabilities.kv.max_per_tenant;
    if args.json {
        super::print_json(&serde_json::json!({
            "tenant": args.tenant,
            "fetch_allow": allow,
            "kv": { "keys": kv_keys, "bytes": kv_bytes, "quota_bytes": quota.0 },
            "secrets": secrets,
        }))?;
    } else {
        println!("tenant       {}", args.tenant);
        println!(
            "fetch allow  {}",
            if allow.is_empty() {
                "(none)".to_owned()
            } else {
                allow.join(", ")
            }
        );
        println!("kv           {kv_keys} keys, {kv_bytes} of {quota} bytes");
        println!(
            "secrets      {}",
            if secrets.is_empty() {
                "(none)".to_owned()
            } else {
                secrets.join(", ")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
