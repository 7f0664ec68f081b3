//! scriptd on a PostgreSQL primary with a synchronous streaming standby (two clusters made
//! here with `initdb` and `pg_basebackup` on loopback), configured with both hosts and
//! `target_session_attrs=read-write`. Under a steady load of events the primary is stopped
//! (immediate, as a crash) and the standby promoted: the daemons reach the new primary by
//! themselves, every (event, script) runs exactly once, and a deploy after the failover is
//! picked up through LISTEN/NOTIFY.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::TestEnv;

const EVENTS: usize = 900;
const RATE: f64 = 150.0;
const WAIT: Duration = Duration::from_secs(120);

/// A PostgreSQL tool of the machine's installation, as the `postgres` user when this runs
/// as root (PostgreSQL refuses to run as root).
fn pg(tool: &str) -> Command {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's binaries under /usr/lib/postgresql")
        .filter_map(Result::ok)
        .map(|d| d.path().join("bin"))
        .max()
        .expect("a PostgreSQL version");
    let binary = bin.join(tool);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(binary);
        c
    } else {
        Command::new(binary)
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn run(mut command: Command, what: &str) {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A primary and its standby, each a cluster in its own folder.
struct Pair {
    dir: PathBuf,
    ports: [u16; 2],
}

impl Pair {
    fn data(&self, i: usize) -> PathBuf {
        self.dir.join(["primary", "standby"][i])
    }

    fn start() -> Pair {
        let dir = std::env::temp_dir().join(format!("scriptd-pg-{}", support::free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        if is_root() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["postgres:postgres"]).arg(&dir);
                    c
                },
                "chown",
            );
        }
        let pair = Pair {
            dir,
            ports: [support::free_port(), support::free_port()],
        };
        let mut initdb = pg("initdb");
        initdb
            .args(["-U", "postgres", "--auth=trust", "-D"])
            .arg(pair.data(0));
        run(initdb, "initdb");
        // Commits wait for the standby: a failover loses nothing that was committed.
        let conf = "wal_level = replica\nmax_wal_senders = 5\nhot_standby = on\n\
                    synchronous_standby_names = '*'\nfsync = off\n";
        append(&pair.data(0).join("postgresql.conf"), conf);
        pair.pg_ctl(0, "start");
        let mut backup = pg("pg_basebackup");
        backup
            .args(["-h", "127.0.0.1", "-p", &pair.ports[0].to_string()])
            .args(["-U", "postgres", "-R", "-X", "stream", "-D"])
            .arg(pair.data(1));
        run(backup, "pg_basebackup");
        // Promoted, the standby has no standby of its own to wait for.
        append(
            &pair.data(1).join("postgresql.conf"),
            "synchronous_standby_names = ''\n",
        );
        pair.pg_ctl(1, "start");
        pair
    }

    fn pg_ctl(&self, i: usize, action: &str) {
        let mut c = pg("pg_ctl");
        c.arg("-D").arg(self.data(i)).args(["-w", "-t", "60"]);
        match action {
            "start" => {
                let options = format!(
                    "-p {} -c listen_addresses=127.0.0.1 -k {}",
                    self.ports[i],
                    self.dir.display()
                );
                c.args(["-o", &options, "-l"])
                    .arg(self.dir.join(format!("{i}.log")))
                    .arg("start");
            }
            "crash" => {
                c.args(["-m", "immediate", "stop"]);
            }
            other => {
                c.arg(other);
            }
        }
        run(c, &format!("pg_ctl {action} ({})", self.data(i).display()));
    }

    fn hosts(&self) -> String {
        format!("127.0.0.1:{},127.0.0.1:{}", self.ports[0], self.ports[1])
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for i in 0..2 {
            let mut c = pg("pg_ctl");
            c.arg("-D")
                .arg(self.data(i))
                .args(["-m", "immediate", "stop"]);
            let _ = c.output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(text.as_bytes()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_the_standby_loses_and_repeats_nothing() {
    let pair = Pair::start();
    let mut env = TestEnv::with_servers(&support::nats_url(), &pair.hosts()).await;
    // Deploys reach the daemons through LISTEN/NOTIFY only: no periodic reload in time.
    env.settings.daemon.index_reload_interval = Duration::from_secs(3600);
    for name in ["first", "second"] {
        env.deploy("acme", name, "export default (e) => e.data.i", &["order.*"])
            .await;
    }
    let daemons = [env.start_daemon(), env.start_daemon()];
    let interval = Duration::from_secs_f64(1.0 / RATE);
    let mut next = Instant::now();
    let mut failed_over = None;
    for i in 0..EVENTS {
        if i == EVENTS / 3 {
            pair.pg_ctl(0, "crash");
            let at = Instant::now();
            pair.pg_ctl(1, "promote");
            failed_over = Some((at, at.elapsed()));
        }
        env.publish_numbered(i).await.expect("event stored");
        next += interval;
        tokio::time::sleep_until(next.into()).await;
    }
    let (crashed_at, promotion) = failed_over.unwrap();
    let runs = env
        .wait_for_runs(WAIT, |runs| {
            runs.iter().filter(|r| r.status == "ok").count() >= 2 * EVENTS
        })
        .await;
    let recovered = crashed_at.elapsed();
    env.wait_idle(WAIT).await;
    env.assert_each_ran_once(EVENTS, &["first", "second"]).await;
    // A deploy on the new primary reaches the daemons through LISTEN/NOTIFY.
    let version = env
        .deploy("acme", "first", "export default () => 'v2'", &["order.*"])
        .await;
    assert_eq!(version, 2);
    // Events until one runs the new version (the first may come before the reload).
    let deadline = Instant::now() + WAIT;
    for n in EVENTS.. {
        env.publish_numbered(n).await.expect("event stored");
        let ran = env
            .wait_for_runs(WAIT, |runs| runs.len() >= 2 * (n + 1))
            .await;
        if ran
            .iter()
            .any(|r| r.script == "first" && r.version == Some(2))
        {
            break;
        }
        assert!(Instant::now() < deadline, "the deploy never took effect");
    }
    for daemon in &daemons {
        assert!(!daemon.task.is_finished(), "a daemon stopped");
    }
    let pause = support::longest_pause(&runs);
    eprintln!(
        "failover: promotion took {promotion:?}; every event ran {recovered:?} after the crash; \
         longest pause between run starts {pause:?}"
    );
    for daemon in daemons {
        daemon.shutdown().await;
    }
    env.cleanup().await;
    drop(pair);
}
