//! Process accounting from /proc for the benchmarks: the memory of this process's children
//! and the CPU time spent by this process, its engine hosts, the nats-server it talks to
//! and the PostgreSQL backends of its database (not every server process on the machine).

use std::time::Duration;

/// One process's fields from /proc/<pid>/stat, from the state field on (the command name
/// in parentheses may contain spaces, so the split is after its closing parenthesis).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_owned).collect())
}

fn pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

/// The live children of this process (the engine hosts of an in-process daemon).
pub fn children() -> Vec<u32> {
    let me = std::process::id().to_string();
    pids()
        .into_iter()
        .filter(|pid| stat_fields(*pid).is_some_and(|f| f.get(1) == Some(&me)))
        .collect()
}

fn ticks_to_duration(ticks: u64) -> Duration {
    // SAFETY: sysconf takes a plain integer.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / hz)
}

/// User + system time of a process; with `reaped`, also that of its children it has
/// waited for (engine hosts that were recycled).
fn cpu_ticks(pid: u32, reaped: bool) -> u64 {
    let Some(f) = stat_fields(pid) else { return 0 };
    // utime, stime, cutime, cstime are fields 14–17 of the line, 11–14 after the name.
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12) + if reaped { field(13) + field(14) } else { 0 }
}

/// CPU time used so far by each part of the pipeline on this machine.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuUse {
    /// This process: the daemon's tasks and the benchmark's publisher.
    pub daemon: Duration,
    /// Engine host processes, live and reaped.
    pub hosts: Duration,
    /// The nats-server the benchmark talks to.
    pub nats: Duration,
    /// The PostgreSQL backends of the benchmark's database (backends that have ended no
    /// longer count).
    pub postgres: Duration,
}

/// The server processes a benchmark's CPU figures count.
#[derive(Clone, Debug, Default)]
pub struct Servers {
    /// The nats-server listening on the configured port.
    pub nats: Option<u32>,
    /// The database whose backends count (`postgres: <user> <database> ...`).
    pub database: Option<String>,
}

impl Servers {
    /// The nats-server of `settings.nats.url` (its first server) and the PostgreSQL
    /// backends of `settings.database.url`'s database.
    pub fn of(settings: &crate::config::Settings) -> Servers {
        let port = settings
            .nats
            .servers()
            .first()
            .and_then(|url| url.rsplit(':').next()?.trim_end_matches('/').parse().ok())
            .unwrap_or(4222);
        let database = settings
            .database
            .url
            .parse::<tokio_postgres::Config>()
            .ok()
            .and_then(|c| c.get_dbname().map(str::to_owned));
        Servers {
            nats: listening_pid(port),
            database,
        }
    }
}

/// The process listening on TCP `port` (IPv4 or IPv6), found through its socket's inode.
fn listening_pid(port: u16) -> Option<u32> {
    let wanted = format!(":{port:04X}");
    let inodes: Vec<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    // local address, state 0A (listen), inode
                    (f.get(1)?.ends_with(&wanted) && f.get(3)? == &"0A")
                        .then(|| f.get(9).map(|i| (*i).to_owned()))?
                })
                .collect::<Vec<_>>()
        })
        .collect();
    pids().into_iter().find(|pid| {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                let target = target.to_string_lossy();
                inodes.iter().any(|i| target == format!("socket:[{i}]"))
            })
        })
    })
}

impl CpuUse {
    /// The CPU time used so far by this process, its children, and `servers`.
    pub fn now(servers: &Servers) -> CpuUse {
        let me = std::process::id();
        let own = stat_fields(me);
        let field = |i: usize| {
            own.as_ref()
                .and_then(|f| f.get(i)?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let live_children: u64 = children().into_iter().map(|p| cpu_ticks(p, false)).sum();
        let nats = servers.nats.map_or(0, |pid| cpu_ticks(pid, false));
        let mut postgres = 0;
        if let Some(database) = &servers.database {
            let ours = format!(" {database} ");
            for pid in pids() {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"));
                if !comm.is_ok_and(|c| c == "postgres\n") {
                    continue;
                }
                let title = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&title).contains(&ours) {
                    postgres += cpu_ticks(pid, false);
                }
            }
        }
        CpuUse {
            daemon: ticks_to_duration(field(11) + field(12)),
            hosts: ticks_to_duration(field(13) + field(14) + live_children),
            nats: ticks_to_duration(nats),
            postgres: ticks_to_duration(postgres),
        }
    }

    /// What was used since `earlier`. PostgreSQL backends that ended meanwhile take their
    /// time with them, so that part can only be a lower bound.
    pub fn since(self, earlier: CpuUse) -> CpuUse {
        CpuUse {
            daemon: self.daemon.saturating_sub(earlier.daemon),
            hosts: self.hosts.saturating_sub(earlier.hosts),
            nats: self.nats.saturating_sub(earlier.nats),
            postgres: self.postgres.saturating_sub(earlier.postgres),
        }
    }

    pub fn total(&self) -> Duration {
        self.daemon + self.hosts + self.nats + self.postgres
    }

    /// One line: each part's CPU time per item, in microseconds.
    pub fn per_item(&self, items: usize) -> String {
        let us = |d: Duration| d.as_secs_f64() * 1e6 / items.max(1) as f64;
        format!(
            "daemon {:.0} µs + engine hosts {:.0} µs + nats-server {:.0} µs + PostgreSQL {:.0} µs = {:.0} µs",
            us(self.daemon),
            us(self.hosts),
            us(self.nats),
            us(self.postgres),
            us(self.total())
        )
    }
}
