//! scriptd on a 3-node JetStream cluster (on loopback, streams at replicas 3) with 2
//! replicas under a steady load: the node leading the events stream, then (with every run a
//! job) the one leading the jobs stream, is killed with SIGKILL and later restarted. Every
//! (event, script) runs exactly once and neither daemon stops.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use support::{RunningDaemon, TestEnv};

/// Events published per test, at `RATE` per second.
const EVENTS: usize = 2000;
const RATE: f64 = 150.0;
const WAIT: Duration = Duration::from_secs(120);

/// The nats-server the test setup installs (`scripts/current-nats`), else the one tests use.
fn current_server() -> String {
    let target = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target"));
    let installed = std::fs::read_dir(&target).ok().and_then(|dirs| {
        dirs.filter_map(Result::ok)
            .map(|d| d.path().join("bin/nats-server"))
            .filter(|p| p.is_file() && p.to_string_lossy().contains("nats-server-"))
            .max()
    });
    installed
        .map(|p| p.display().to_string())
        .unwrap_or_else(support::nats_server_binary)
}

/// Three nats-server nodes routed to each other, each with its JetStream store.
struct Cluster {
    binary: String,
    dir: PathBuf,
    ports: Vec<u16>,
    /// Each node's monitoring port, for `/healthz`.
    monitors: Vec<u16>,
    nodes: Vec<Option<std::process::Child>>,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = std::env::temp_dir().join(format!("scriptd-cluster-{}", support::free_port()));
        let ports: Vec<u16> = (0..3).map(|_| support::free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| support::free_port()).collect();
        let monitors: Vec<u16> = (0..3).map(|_| support::free_port()).collect();
        for i in 0..3 {
            let node = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&node).unwrap();
            let others: Vec<String> = (0..3)
                .filter(|j| *j != i)
                .map(|j| format!("nats-route://127.0.0.1:{}", routes[j]))
                .collect();
            let config = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\n\
                 jetstream {{ store_dir: {:?} }}\ncluster {{\n  name: scriptd\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                ports[i],
                monitors[i],
                node.join("js").display().to_string(),
                routes[i],
                others.join(", ")
            );
            std::fs::write(node.join("server.conf"), config).unwrap();
        }
        let mut cluster = Cluster {
            binary: current_server(),
            dir,
            ports,
            monitors,
            nodes: vec![None, None, None],
        };
        for i in 0..3 {
            cluster.start_node(i);
        }
        for i in 0..3 {
            cluster.wait_healthy(i);
        }
        cluster
    }

    /// Waits until node `i`'s `/healthz` answers 200: its JetStream is current with a
    /// meta leader, so streams can be placed on the cluster.
    fn wait_healthy(&self, i: usize) {
        use std::io::{Read, Write};
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut answer = String::new();
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.monitors[i])) {
                let _ = s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n");
                let _ = s.read_to_string(&mut answer);
            }
            if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
                return;
            }
            let log = std::fs::read_to_string(self.dir.join(format!("n{i}/server.log")));
            assert!(
                Instant::now() < deadline,
                "node n{i} is not healthy: {answer}\nits log:\n{}",
                log.unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_node(&mut self, i: usize) {
        let node = self.dir.join(format!("n{i}"));
        let log = std::fs::File::create(node.join("server.log")).unwrap();
        self.nodes[i] = Some(
            std::process::Command::new(&self.binary)
                .arg("-c")
                .arg(node.join("server.conf"))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("nats-server"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.ports[i])).is_err() {
            assert!(Instant::now() < deadline, "node n{i} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a node lost with its machine.
    fn kill(&mut self, i: usize) {
        if let Some(mut node) = self.nodes[i].take() {
            node.kill().unwrap();
            node.wait().unwrap();
        }
    }

    fn url(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The node (0..3) that leads `stream`, once it has a leader.
async fn leader(js: &async_nats::jetstream::Context, stream: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = js.get_stream(stream).await {
            if let Ok(info) = s.info().await {
                let name = info.cluster.as_ref().and_then(|c| c.leader.clone());
                if let Some(i) = name.and_then(|n| n.strip_prefix('n')?.parse().ok()) {
                    return i;
                }
            }
        }
        assert!(Instant::now() < deadline, "stream {stream} has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A world on the cluster with the three streams at replicas 3, and two scripts on
/// every event.
async fn world(cluster: &Cluster, direct_runs: bool) -> TestEnv {
    let mut env = TestEnv::with_nats(&cluster.url()).await;
    let streams = &mut env.settings.nats.streams;
    for stream in [&mut streams.events, &mut streams.jobs, &mut streams.dlq] {
        stream.replicas = 3;
    }
    env.settings.nats.direct_runs = direct_runs;
    scriptd::bus::ensure_streams(&env.js, &env.settings.nats)
        .await
        .expect("streams at replicas 3");
    for name in ["first", "second"] {
        env.deploy(
            "acme",
            name,
            "export default (e) => ({ id: e.data.i })",
            &["order.*"],
        )
        .await;
    }
    env
}

/// Publishes `EVENTS` events at `RATE`, each with its own `Nats-Msg-Id`, retrying a
/// publish until it is acknowledged (the same id is stored once); `killed` and
/// `restarted` are called once a third and two thirds are out.
async fn publish_through(
    env: &TestEnv,
    mut killed: impl FnMut(),
    mut restarted: impl FnMut(),
) -> Duration {
    let interval = Duration::from_secs_f64(1.0 / RATE);
    let mut next = Instant::now();
    let mut longest = Duration::ZERO;
    for i in 0..EVENTS {
        if i == EVENTS / 3 {
            killed();
        }
        if i == 2 * EVENTS / 3 {
            restarted();
        }
        let started = Instant::now();
        while env.publish_numbered(i).await.is_err() {
            assert!(started.elapsed() < WAIT, "event {i} was never stored");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        longest = longest.max(started.elapsed());
        next += interval;
        tokio::time::sleep_until(next.into()).await;
    }
    longest
}

/// Waits for every (event, script) to have run, then checks each ran exactly once and
/// that both daemons kept running; returns the longest pause between run starts.
async fn all_ran_once(env: &TestEnv, daemons: &mut [RunningDaemon]) -> Duration {
    let runs = env
        .wait_for_runs(WAIT, |runs| {
            runs.iter().filter(|r| r.status == "ok").count() >= 2 * EVENTS
        })
        .await;
    env.wait_idle(WAIT).await;
    env.assert_each_ran_once(EVENTS, &["first", "second"]).await;
    for daemon in daemons.iter_mut() {
        if daemon.task.is_finished() {
            let ended = (&mut daemon.task).await;
            panic!("a daemon stopped: {ended:?}");
        }
    }
    support::longest_pause(&runs)
}

async fn lose_a_leader(direct_runs: bool) {
    let mut cluster = Cluster::start();
    let env = world(&cluster, direct_runs).await;
    let stream = if direct_runs {
        env.settings.nats.events_stream()
    } else {
        env.settings.nats.jobs_stream()
    };
    let mut daemons = [env.start_daemon(), env.start_daemon()];
    let victim = leader(&env.js, &stream).await;
    let cluster_cell = std::cell::RefCell::new(&mut cluster);
    let longest_publish = publish_through(
        &env,
        || cluster_cell.borrow_mut().kill(victim),
        || cluster_cell.borrow_mut().start_node(victim),
    )
    .await;
    let new_leader = leader(&env.js, &stream).await;
    let pause = all_ran_once(&env, &mut daemons).await;
    eprintln!(
        "{stream}: leader n{victim} killed; now led by n{new_leader}; longest publish {longest_publish:?}, \
         longest pause between run starts {pause:?}"
    );
    for daemon in daemons {
        daemon.shutdown().await;
    }
    env.cleanup().await;
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_events_stream_leader_loses_and_repeats_nothing() {
    lose_a_leader(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_jobs_stream_leader_loses_and_repeats_nothing() {
    lose_a_leader(false).await;
}
