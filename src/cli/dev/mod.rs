//! `scriptd dev`: everything on one machine. Uses NATS and PostgreSQL at the configured URLs
//! when they answer, otherwise starts them from binaries on PATH (throw-away data under
//! `target/dev/`); migrates, sets up what the examples use (a secrets key, a secret, a
//! local billing API on the tenant's fetch allow list, a key-value setting), serves the
//! HTTP API with an operator token made for the session, deploys `scripts-examples/`,
//! publishes each example's event and runs the daemon until Ctrl-C.

mod billing;
mod follow;

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Args;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::caps::secrets::SecretBox;
use crate::config::Settings;
use crate::observe::metrics::Metrics;
use crate::scripts::manifest::Manifest;
use crate::store::Store;

/// The tenant of the bundled examples.
const EXAMPLE_TENANT: &str = "acme";

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Folder of script manifests (*.toml) to deploy.
    #[arg(long, default_value = "scripts-examples")]
    pub examples: PathBuf,
    /// Where throw-away NATS and PostgreSQL data go when they have to be started.
    #[arg(long, default_value = "target/dev")]
    pub data: PathBuf,
}

/// Services started here, stopped when `dev` ends.
#[derive(Default)]
struct Started {
    nats: Option<Child>,
    postgres: Option<PathBuf>,
}

/// Runs `dev` (see the module's doc); the daemon reports to `metrics`.
pub async fn run(
    mut settings: Settings,
    args: DevArgs,
    metrics: Arc<Metrics>,
) -> anyhow::Result<ExitCode> {
    if settings.log.filter == "info" {
        settings.log.filter = "info,scriptd=debug".into();
    }
    let mut started = Started::default();
    let result = prepare_and_run(&settings, &args, &mut started, metrics).await;
    if let Some(mut nats) = started.nats.take() {
        let _ = nats.kill().await;
    }
    if let Some(dir) = started.postgres.take() {
        if let Ok(mut pg_ctl) = pg_command("pg_ctl") {
            let stopping = pg_ctl.arg("-D").arg(&dir).args(["-m", "fast", "stop"]);
            let _ = stopping.status().await;
        }
    }
    result
}

async fn prepare_and_run(
    settings: &Settings,
    args: &DevArgs,
    started: &mut Started,
    metrics: Arc<Metrics>,
) -> anyhow::Result<ExitCode> {
    let nats_addr = address(&settings.nats.url, 4222)?;
    if reachable(nats_addr) {
        println!("dev: using NATS at {}", settings.nats.url);
    } else {
        started.nats = Some(start_nats(nats_addr, &args.data).await?);
    }
    let pg_addr = pg_address(&settings.database.url)?;
    if reachable(pg_addr) {
        println!("dev: using PostgreSQL at {pg_addr}");
    } else {
        started.postgres = Some(start_postgres(pg_addr, &args.data).await?);
    }
    ensure_database(&settings.database.url).await?;
    for applied in Store::migrate(&settings.database).await? {
        println!("dev: applied migration {applied}");
    }
    let store = Store::connect(&settings.database).await?;
    let seen = store.last_run_id().await?;
    let mut settings = settings.clone();
    prepare_examples(&mut settings, &store, &args.data).await?;
    let settings = &settings;
    let client = crate::bus::connect(&settings.nats).await?;
    let js = async_nats::jetstream::new(client);
    crate::bus::ensure_streams(&js, &settings.nats).await?;

    let mut manifests: Vec<PathBuf> = std::fs::read_dir(&args.examples)
        .with_context(|| format!("reading {}", args.examples.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    manifests.sort();
    for path in &manifests {
        let (manifest, spec) = Manifest::load(path)?;
        if let Err(f) = crate::cli::check_compiles(settings, &spec).await? {
            bail!("{} does not load: {f}", path.display());
        }
        let deployed = store.deploy(&spec).await?;
        println!(
            "dev: deployed {}/{} v{} on {}",
            spec.tenant,
            spec.name,
            deployed.version,
            spec.triggers()
        );
        if let Some(example) = manifest.example {
            let subject = format!(
                "{}.{}.{}",
                settings.nats.events_prefix, spec.tenant, example.event_type
            );
            let payload = serde_json::to_vec(&example.data)?;
            js.publish(subject.clone(), Bytes::from(payload))
                .await?
                .await?;
            println!("dev: published an example event on {subject}");
        }
    }
    let api = serve_api(&mut settings_for_api(settings), &store).await?;
    println!("{}", follow::hints(EXAMPLE_TENANT, &api));
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::cli::cancel_on_signal(shutdown.clone()));
    tokio::spawn(follow::runs(store.clone(), seen, shutdown.clone()));
    crate::daemon::run(api.settings, shutdown, metrics).await?;
    Ok(ExitCode::SUCCESS)
}

/// The settings with the API on: where configured, else on 127.0.0.1:8787 (or a free
/// port when that is taken).
fn settings_for_api(settings: &Settings) -> Settings {
    let mut settings = settings.clone();
    if settings.api.listen.is_empty() {
        let port = std::net::TcpListener::bind("127.0.0.1:8787")
            .or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .and_then(|l| l.local_addr())
            .map_or(8787, |a| a.port());
        settings.api.listen = format!("127.0.0.1:{port}");
    }
    settings
}

/// The API dev serves and the operator token it made for it.
pub struct DevApi {
    /// The daemon's settings, the API's listener in them.
    pub settings: Settings,
    /// `http://127.0.0.1:8787`.
    pub url: String,
    /// An operator token for this session (it expires in a day).
    pub token: String,
}

async fn serve_api(settings: &mut Settings, store: &Store) -> anyhow::Result<DevApi> {
    let expires = chrono::Utc::now() + chrono::Duration::days(1);
    let (token, _) = store
        .create_token(
            crate::store::ALL_TENANTS,
            crate::store::Role::Operator,
            "scriptd dev",
            Some(expires),
        )
        .await?;
    let listen = settings.api.listen.replace("0.0.0.0", "127.0.0.1");
    Ok(DevApi {
        settings: settings.clone(),
        url: format!("http://{listen}"),
        token,
    })
}

/// What the examples' script API calls need: a secrets key (generated under the data folder
/// unless one is configured), the example tenant's billing API key as a secret, the local
/// billing API (loopback is allowed to fetch in dev only) on its allow list, and the API's
/// URL in its key-value store.
async fn prepare_examples(
    settings: &mut Settings,
    store: &Store,
    data: &Path,
) -> anyhow::Result<()> {
    let secrets = &mut settings.capabilities.secrets;
    if secrets.key.is_empty() && secrets.key_file.is_empty() {
        std::fs::create_dir_all(data)?;
        let path = data.join("secrets.key");
        if !path.exists() {
            std::fs::write(&path, SecretBox::generate_key())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        secrets.key_file = path.display().to_string();
        println!(
            "dev: secrets key in {}; from another shell: export SCRIPTD_CAPABILITIES__SECRETS__KEY_FILE={}",
            path.display(),
            path.display()
        );
    }
    let secret_box = SecretBox::from_config(secrets)?.context("the secrets key")?;
    let api_key = format!("dev-{:032x}", rand::random::<u128>());
    let port = billing::serve(api_key.clone()).await?;
    let billing_url = format!("http://127.0.0.1:{port}");
    settings
        .capabilities
        .fetch
        .allow_private
        .push("127.0.0.1/32".parse().expect("static network"));
    store
        .secret_put(
            EXAMPLE_TENANT,
            "billing-api-key",
            &secret_box.seal(EXAMPLE_TENANT, "billing-api-key", &api_key),
        )
        .await?;
    store
        .set_fetch_allow_list(EXAMPLE_TENANT, &[format!("127.0.0.1:{port}")])
        .await?;
    let quota = settings.capabilities.kv.max_per_tenant.0;
    store
        .kv_set(
            EXAMPLE_TENANT,
            "config:billing-url",
            &serde_json::to_string(&billing_url)?,
            quota,
        )
        .await?;
    println!("dev: example billing API at {billing_url} (tenant {EXAMPLE_TENANT} may fetch it; its key is the secret billing-api-key)");
    Ok(())
}

fn address(url: &str, default_port: u16) -> anyhow::Result<SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host_port = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host_port = host_port.split('/').next().unwrap_or(host_port);
    let with_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:{default_port}")
    };
    with_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .with_context(|| format!("cannot resolve {with_port} (from {url})"))
}

fn pg_address(url: &str) -> anyhow::Result<SocketAddr> {
    let config: tokio_postgres::Config = url.parse().context("invalid database.url")?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    address(&format!("{host}:{port}"), port)
}

fn reachable(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Waits until something accepts connections on `addr`.
async fn wait_until_reachable(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        if reachable(addr) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} did not start listening on {addr} within 10 s")
}

fn find(binary: &str, extra_dirs: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra_dirs.iter().map(PathBuf::from))
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
}

async fn start_nats(addr: SocketAddr, data: &Path) -> anyhow::Result<Child> {
    let binary = find("nats-server", &["/usr/sbin", "/usr/local/sbin"]).context(
        "NATS is not running and nats-server is not installed: apt-get install nats-server",
    )?;
    let store = data.join("nats");
    std::fs::create_dir_all(&store)?;
    println!(
        "dev: starting {} on {addr} (data in {})",
        binary.display(),
        store.display()
    );
    let child = Command::new(binary)
        .args([
            "-a",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-js",
            "-sd",
        ])
        .arg(&store)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting nats-server")?;
    wait_until_reachable(addr, "nats-server").await?;
    Ok(child)
}

fn pg_command(name: &str) -> anyhow::Result<Command> {
    let versions: Vec<String> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| format!("{}/bin", e.path().display()))
                .collect()
        })
        .unwrap_or_default();
    let dirs: Vec<&str> = versions.iter().map(String::as_str).collect();
    let binary = find(name, &dirs).with_context(|| {
        format!("PostgreSQL is not running and {name} is not installed: apt-get install postgresql")
    })?;
    // PostgreSQL refuses to run as root: run its tools as the postgres user then.
    let as_root = std::env::var("USER").map(|u| u == "root").unwrap_or(false)
        || std::fs::metadata("/proc/self")
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.uid() == 0
            })
            .unwrap_or(false);
    if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(binary);
        Ok(c)
    } else {
        Ok(Command::new(binary))
    }
}

async fn start_postgres(addr: SocketAddr, data: &Path) -> anyhow::Result<PathBuf> {
    let dir = std::fs::canonicalize(data.parent().unwrap_or(Path::new(".")))?
        .join(data.file_name().unwrap_or_default())
        .join("postgres");
    if !dir.join("PG_VERSION").exists() {
        std::fs::create_dir_all(&dir)?;
        chown_to_postgres(&dir);
        println!(
            "dev: creating a throw-away PostgreSQL cluster in {}",
            dir.display()
        );
        let status = pg_command("initdb")?
            .args(["-U", "postgres", "--auth=trust", "-D"])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .status()
            .await?;
        if !status.success() {
            bail!("initdb failed for {}", dir.display());
        }
    }
    println!("dev: starting PostgreSQL on {addr}");
    let options = format!(
        "-p {} -c listen_addresses={} -k {}",
        addr.port(),
        addr.ip(),
        dir.display()
    );
    let status = pg_command("pg_ctl")?
        .arg("-D")
        .arg(&dir)
        .args(["-o", &options, "-l"])
        .arg(dir.join("server.log"))
        .args(["-w", "start"])
        .stdout(std::process::Stdio::null())
        .status()
        .await?;
    if !status.success() {
        bail!(
            "PostgreSQL did not start; see {}",
            dir.join("server.log").display()
        );
    }
    wait_until_reachable(addr, "PostgreSQL").await?;
    Ok(dir)
}

fn chown_to_postgres(dir: &Path) {
    let _ = std::process::Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status();
}

/// Creates the configured database if the server does not have it yet.
async fn ensure_database(url: &str) -> anyhow::Result<()> {
    let config: tokio_postgres::Config = url.parse()?;
    let name = config.get_dbname().unwrap_or("postgres").to_owned();
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, connection) = admin
        .connect(tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", crate::store::redact(url)))?;
    tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!(
                "CREATE DATABASE \"{}\"",
                name.replace('"', "\"\"")
            ))
            .await
            .with_context(|| format!("creating database {name}"))?;
        println!("dev: created database {name}");
    }
    Ok(())
}
