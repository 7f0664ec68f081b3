//! What an engine host gives up once its engine is ready: new privileges (no setuid
//! binaries can raise them again), and — through a seccomp filter on every thread — the
//! system calls that open files, make network connections or start programs. Scripts have
//! no way to ask for those anyway; this holds even if an engine bug lets one run native code.

use std::collections::BTreeMap;

use anyhow::Context;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// Denied with EPERM. Reading and writing descriptors the process already holds (its socket
/// to the daemon, standard error) stays possible; so do memory, threads and timers.
fn denied() -> Vec<i64> {
    let mut calls = vec![
        libc::SYS_socket,
        libc::SYS_socketpair,
        libc::SYS_connect,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_open_by_handle_at,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_unlinkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_mkdirat,
        libc::SYS_fchmodat,
        libc::SYS_fchownat,
        libc::SYS_truncate,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_chroot,
        libc::SYS_pivot_root,
        libc::SYS_setuid,
        libc::SYS_setgid,
        libc::SYS_kill,
        libc::SYS_tkill,
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([
        libc::SYS_open,
        libc::SYS_creat,
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_unlink,
        libc::SYS_rename,
        libc::SYS_mkdir,
        libc::SYS_rmdir,
        libc::SYS_chmod,
        libc::SYS_chown,
        libc::SYS_link,
        libc::SYS_symlink,
    ]);
    calls
}

/// Gives up new privileges, and with `seccomp` installs the filter and proves it holds:
/// the calls of [`probe`] must each fail with EPERM, or the host refuses to start. Returns
/// the names of the calls refused (none without the filter).
pub fn apply(seccomp: bool) -> anyhow::Result<Vec<String>> {
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes plain integers.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
    }
    if !seccomp {
        return Ok(Vec::new());
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| anyhow::anyhow!("no seccomp filter for this architecture: {e:?}"))?;
    let rules: BTreeMap<i64, Vec<SeccompRule>> = denied()
        .into_iter()
        .map(|call| (call, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| anyhow::anyhow!("building the seccomp filter: {e}"))?;
    let program: BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| {
        anyhow::anyhow!("compiling the seccomp filter: {e}")
    })?;
    seccompiler::apply_filter_all_threads(&program)
        .map_err(|e| anyhow::anyhow!("installing the seccomp filter: {e}"))?;
    probe()
        .into_iter()
        .map(|(call, errno)| match errno {
            Some(libc::EPERM) => Ok(call.to_owned()),
            Some(errno) => anyhow::bail!(
                "the seccomp filter is installed but {call} failed with errno {errno}, not EPERM"
            ),
            None => anyhow::bail!("the seccomp filter is installed but {call} was allowed"),
        })
        .collect()
}

/// Makes one call of each kind the filter denies — a network socket, opening a file,
/// a signal — and returns each one's errno (none if it succeeded). Each is harmless if
/// allowed: the socket and the directory are closed at once, the signal is 0 to itself.
fn probe() -> Vec<(&'static str, Option<i32>)> {
    let errno = |rc: libc::c_int, close: bool| {
        if rc >= 0 {
            if close {
                // SAFETY: `rc` is a descriptor this function just opened.
                unsafe { libc::close(rc) };
            }
            None
        } else {
            Some(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    };
    // SAFETY: plain integer arguments and a NUL-terminated path.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    let socket = errno(socket, true);
    // SAFETY: as above.
    let open = unsafe { libc::open(c"/".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    let open = errno(open, true);
    // SAFETY: as above.
    let kill = unsafe { libc::kill(libc::getpid(), 0) };
    let kill = errno(kill, false);
    vec![("socket", socket), ("openat", open), ("kill", kill)]
}
