//! Starting a child without copying deployd: `clone(CLONE_VM | CLONE_VFORK)`,
//! as `posix_spawn` does, plus the one thing `posix_spawn` cannot do,
//! `PR_SET_PDEATHSIG` in the child.
//!
//! `fork()` (what `std::process::Command` falls back to as soon as there is
//! a `pre_exec` hook) copies deployd's page tables and write-protects every
//! page of a process whose proxy threads are busy: about 1 ms of CPU per
//! start, a TLB shootdown on the other core, and a page fault for each page
//! the proxy writes next. Here the child borrows deployd's memory until it
//! calls `execve`, while the spawning thread is suspended; it only makes
//! system calls on memory prepared beforehand, on a stack of its own.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use deployd_lib::host::Account;

/// The child's stack: it only calls a handful of libc wrappers.
const STACK: usize = 128 * 1024;

/// `PATH` when neither the instance nor deployd has one (glibc's default).
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Everything the child needs, prepared before it exists.
struct Plan {
    /// Where the program may be, tried in turn as the child's own user
    /// (as execvp searches `PATH`): the one path given, or each `PATH`
    /// entry with the program's name.
    programs: Vec<CString>,
    argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    /// `/bin/sh PROGRAM ARGS…` for each of `programs`, for a script
    /// without `#!` (as execvp does).
    sh: CString,
    sh_argv_ptrs: Vec<Vec<*const libc::c_char>>,
    envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    dir: CString,
    /// Credentials to take before `execve`; `None`: deployd's own.
    creds: Option<Account>,
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    parent: libc::pid_t,
    /// The cgroup v2 tree (or -1), and the names in it of the cgroup the
    /// child moves itself into (made if not there yet) and of its
    /// `cgroup.procs`.
    cgroup: libc::c_int,
    cgroup_dir: *const libc::c_char,
    cgroup_procs: *const libc::c_char,
    /// `cgroup.procs` of its cgroups in v1 hierarchies (for its limits),
    /// open: the child writes itself in, or does not start.
    v1_procs: Vec<libc::c_int>,
    /// Descriptors to close without close_range (kernels before 5.9).
    max_fd: libc::c_int,
    /// The step that failed in the child (0: none), and its errno.
    step: AtomicI32,
    errno: AtomicI32,
    /// Which of `programs` the error of a failed exec is about.
    tried: AtomicI32,
}

/// Which step of the child failed, for the error message.
const STEP_CHDIR: i32 = 1;
const STEP_DUP: i32 = 2;
const STEP_EXEC: i32 = 3;
const STEP_USER: i32 = 4;
const STEP_CGROUP_V1: i32 = 5;

/// Runs `words[0]` with arguments `words[1..]` in `dir`, as the leader of a
/// new process group, with deployd's environment minus `remove` plus `env`,
/// stdin from /dev/null and stdout and stderr to `out` (or /dev/null). The
/// child gets `PR_SET_PDEATHSIG` SIGTERM, default signal handling and an
/// empty signal mask. With `account`, it runs as that account (its uid, gid
/// and supplementary groups; the environment is the caller's to set).
/// With `cgroup`, it first moves itself into that cgroup (making it if it
/// is not there yet). Returns its pid once it has called `execve`.
pub fn launch(
    words: &[&OsStr],
    dir: &Path,
    env: &[(String, String)],
    remove: &[&str],
    out: Option<OwnedFd>,
    account: Option<&Account>,
    cgroup: Option<&super::cgroup::Place>,
) -> std::io::Result<u32> {
    let Some(first) = words.first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "empty command",
        ));
    };
    let envs = environment(env, remove);
    let programs = candidates(first, dir, &envs);
    let argv = words
        .iter()
        .map(|w| cstring(w))
        .collect::<Result<Vec<_>, _>>()?;
    let envp = envs
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone();
            kv.push("=");
            kv.push(v);
            cstring(&kv)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let null = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map(OwnedFd::from)
    };
    let (stdout, stderr) = match out {
        Some(fd) => (fd.try_clone()?, fd),
        None => (null()?, null()?),
    };
    // The child dup2s them onto 0, 1 and 2 in turn: none may be one of those
    // already (deployd started with its own stdin or stdout closed).
    let (stdin, stdout, stderr) = (
        above_stdio(null()?)?,
        above_stdio(stdout)?,
        above_stdio(stderr)?,
    );
    let mut plan = Plan {
        programs: programs
            .iter()
            .map(|p| cstring(p.as_os_str()))
            .collect::<Result<Vec<_>, _>>()?,
        argv_ptrs: Vec::new(),
        sh: cstring(OsStr::new("/bin/sh"))?,
        sh_argv_ptrs: Vec::new(),
        argv,
        envp_ptrs: Vec::new(),
        envp,
        dir: cstring(dir.as_os_str())?,
        creds: account.cloned(),
        stdin,
        stdout,
        stderr,
        parent: std::process::id() as libc::pid_t,
        cgroup: cgroup.map_or(-1, |c| c.tree),
        cgroup_dir: cgroup.map_or(std::ptr::null(), |c| c.dir.as_ptr()),
        cgroup_procs: cgroup.map_or(std::ptr::null(), |c| c.procs.as_ptr()),
        v1_procs: cgroup.map_or(Vec::new(), |c| {
            c.v1.procs.iter().map(|f| f.as_raw_fd()).collect()
        }),
        max_fd: open_files_limit(),
        step: AtomicI32::new(0),
        errno: AtomicI32::new(0),
        tried: AtomicI32::new(0),
    };
    plan.argv_ptrs = plan.argv.iter().map(|a| a.as_ptr()).collect();
    plan.argv_ptrs.push(std::ptr::null());
    plan.sh_argv_ptrs = plan
        .programs
        .iter()
        .map(|program| {
            [plan.sh.as_ptr(), program.as_ptr()]
                .into_iter()
                .chain(plan.argv.iter().skip(1).map(|a| a.as_ptr()))
                .chain([std::ptr::null()])
                .collect()
        })
        .collect();
    plan.envp_ptrs = plan.envp.iter().map(|a| a.as_ptr()).collect();
    plan.envp_ptrs.push(std::ptr::null());

    let mut stack = vec![0u8; STACK];
    // SAFETY: the stack grows down from its 16-byte aligned top, inside the
    // allocation, which outlives the child's use of it (CLONE_VFORK: this
    // thread is suspended until the child has called execve or _exit).
    let top = unsafe { stack.as_mut_ptr().add(STACK) };
    let top = (top as usize & !15) as *mut libc::c_void;
    // Into its cgroup from the first with clone3, where there is one: a
    // move after (the child writing to cgroup.procs) waits for an RCU
    // grace period, measured here at 8.6 ms, against 0.24 ms.
    let into = cgroup
        .filter(|c| !c.no_clone3.load(Ordering::Relaxed))
        .and_then(|c| c.fd.as_ref());
    let mut pid = -1;
    if let Some(fd) = into {
        plan.cgroup = -1;
        let base = stack.as_mut_ptr();
        pid = with_signals_blocked(|| {
            // SAFETY: as for clone below; the stack is `base` up to `top`.
            unsafe { clone3_into(fd.as_raw_fd(), base, top, &plan) }
        });
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // What a plain clone would meet too.
                Some(libc::EAGAIN | libc::ENOMEM) => return Err(e),
                // A kernel before 5.7: the child moves itself in instead,
                // from now on.
                Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL | libc::EOPNOTSUPP) => {
                    if let Some(c) = cgroup {
                        c.no_clone3.store(true, Ordering::Relaxed);
                    }
                }
                // This cgroup refused (gone, a limit): it tries itself.
                _ => {}
            }
            plan.cgroup = cgroup.map_or(-1, |c| c.tree);
        }
    }
    if pid < 0 {
        pid = with_signals_blocked(|| {
            // SAFETY: `child` only reads `plan`, which outlives the child's use of
            // deployd's memory, and makes async-signal-safe calls; signals are
            // blocked so no handler of deployd runs on the child's stack.
            unsafe {
                libc::clone(
                    child,
                    top,
                    libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                    &plan as *const Plan as *mut libc::c_void,
                )
            }
        });
    }
    drop(stack);
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The child has exec'd or exited: its writes to `plan` are visible.
    match plan.step.load(Ordering::SeqCst) {
        0 => Ok(pid as u32),
        step => {
            // The child is exiting with 127; collect it, unless deployd's
            // reaper was quicker.
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            let err = std::io::Error::from_raw_os_error(plan.errno.load(Ordering::SeqCst));
            let who = account.map_or(String::new(), |a| match &a.name {
                Some(name) => format!(" as {name}"),
                None => format!(" as uid {}", a.uid),
            });
            Err(match step {
                STEP_CHDIR => std::io::Error::new(
                    err.kind(),
                    format!("{err} (entering {}{who})", dir.display()),
                ),
                STEP_DUP => std::io::Error::new(err.kind(), format!("{err} (dup2)")),
                STEP_CGROUP_V1 => std::io::Error::new(
                    err.kind(),
                    format!("{err} (joining its cgroup for memory_max, cpu_max or pids_max)"),
                ),
                STEP_USER => {
                    let who = account.map_or(String::new(), |a| {
                        format!(" to uid {} gid {}", a.uid, a.gid)
                    });
                    std::io::Error::new(err.kind(), format!("{err} (switching user{who})"))
                }
                _ => {
                    let tried = plan.tried.load(Ordering::SeqCst) as usize;
                    let path = programs.get(tried).map(|p| p.display().to_string());
                    let searched = !first.as_bytes().contains(&b'/');
                    let what = match (err.kind(), searched) {
                        (std::io::ErrorKind::NotFound, true) => {
                            format!("{}: not in PATH", first.to_string_lossy())
                        }
                        // A relative path means something only with the directory.
                        _ if !first.as_bytes().starts_with(b"/") && !searched => {
                            format!("running {} in {}", path.unwrap_or_default(), dir.display())
                        }
                        _ => format!("running {}", path.unwrap_or_default()),
                    };
                    std::io::Error::new(err.kind(), format!("{err} ({what}{who})"))
                }
            })
        }
    }
}

/// `struct clone_args` of clone3(2), up to `cgroup` (its second version).
#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// As `clone(child, top, CLONE_VM | CLONE_VFORK | SIGCHLD, plan)`, the
/// child starting in the cgroup open as `cgroup`: clone3 has no C library
/// wrapper that calls a function on the new stack, so this does what
/// glibc's clone does after the system call: the child calls `child` and
/// exits with what it returns (it never does: it execs or `_exit`s).
/// Returns the pid, or -1 with errno set.
///
/// # Safety
///
/// `base..top` must be memory this thread does not use, `top` 16-byte
/// aligned, and everything `child` reads must outlive its `execve` (the
/// caller is suspended until then).
#[cfg(target_arch = "x86_64")]
unsafe fn clone3_into(
    cgroup: libc::c_int,
    base: *mut u8,
    top: *mut libc::c_void,
    plan: &Plan,
) -> libc::pid_t {
    let args = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64 | CLONE_INTO_CGROUP,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: base as u64,
        stack_size: top as u64 - base as u64,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: cgroup as u64,
    };
    let f: extern "C" fn(*mut libc::c_void) -> libc::c_int = child;
    let ret: i64;
    // SAFETY: the system call reads `args`; in the parent only rax, rcx
    // and r11 change. The child runs on its own stack (rsp = top, so the
    // call leaves it aligned as the ABI wants) and never comes back here.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "mov rdi, r12",
            "call r13",
            "mov edi, eax",
            "mov eax, {exit_group}",
            "syscall",
            "ud2",
            "2:",
            exit_group = const libc::SYS_exit_group,
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") &args as *const CloneArgs,
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") plan as *const Plan as *mut libc::c_void,
            in("r13") f,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret < 0 {
        // SAFETY: errno is this thread's.
        unsafe { *libc::__errno_location() = -ret as libc::c_int };
        return -1;
    }
    ret as libc::pid_t
}

/// Elsewhere, no clone3: the child moves itself in.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn clone3_into(
    _cgroup: libc::c_int,
    _base: *mut u8,
    _top: *mut libc::c_void,
    _plan: &Plan,
) -> libc::pid_t {
    // SAFETY: errno is this thread's.
    unsafe { *libc::__errno_location() = libc::ENOSYS };
    -1
}

/// The soft limit on open files, at most 65536: the descriptors a child
/// closes one by one where close_range is missing.
fn open_files_limit() -> libc::c_int {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes to the struct we own.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    if ok {
        lim.rlim_cur.min(65536) as libc::c_int
    } else {
        1024
    }
}

/// `fd` itself if it is above 2, else a close-on-exec copy that is.
fn above_stdio(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we then own.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor owned by nothing else.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(new) })
}

/// Runs `f` with every signal blocked on this thread, then restores the mask.
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset_t values are plain data, initialised by sigfillset /
    // pthread_sigmask before being read.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let r = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}

/// The child, on its own stack in deployd's memory. Only system calls.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `Plan` the parent keeps alive until we exec or
    // exit; every call below is async-signal-safe and allocates nothing.
    unsafe {
        let plan = &*(arg as *const Plan);
        let fail = |step: i32| -> ! {
            plan.errno
                .store(*libc::__errno_location(), Ordering::SeqCst);
            plan.step.store(step, Ordering::SeqCst);
            libc::_exit(127)
        };
        libc::setpgid(0, 0);
        // As root, before the change of user. A failure leaves it in
        // deployd's cgroup, tracked by its process group alone.
        if plan.cgroup >= 0 {
            // EEXIST for one the pool made ahead.
            libc::mkdirat(plan.cgroup, plan.cgroup_dir, 0o755);
            let fd = libc::openat(
                plan.cgroup,
                plan.cgroup_procs,
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                // "0": the writer.
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
        }
        // Its limits in v1 hierarchies: held to them from the first, or
        // not started.
        for &fd in &plan.v1_procs {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                fail(STEP_CGROUP_V1);
            }
        }
        // Raw system calls, not libc's wrappers: in a multithreaded process
        // glibc's setuid() and friends signal every thread of its list to
        // change too, and that list is deployd's, whose memory we share.
        // The kernel changes this task alone. Groups first, uid last: after
        // it, the others are no longer ours to change.
        if let Some(c) = &plan.creds {
            if libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setresgid, c.gid, c.gid, c.gid) != 0
                || libc::syscall(libc::SYS_setresuid, c.uid, c.uid, c.uid) != 0
            {
                fail(STEP_USER);
            }
        }
        // After the change of user, which clears the death signal.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
        // deployd died before prctl: the signal will never come.
        if libc::getppid() != plan.parent {
            libc::_exit(1);
        }
        // deployd's handlers are its own; what it ignores (SIGPIPE, by the
        // Rust runtime) is the program's to decide.
        for sig in 1..=libc::SIGRTMAX() {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            if old.sa_sigaction != libc::SIG_DFL
                && (old.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        if libc::chdir(plan.dir.as_ptr()) != 0 {
            fail(STEP_CHDIR);
        }
        for (fd, to) in [
            (plan.stdin.as_raw_fd(), 0),
            (plan.stdout.as_raw_fd(), 1),
            (plan.stderr.as_raw_fd(), 2),
        ] {
            // Each fd is above 2 (above_stdio): dup2 never clobbers one still to come.
            if libc::dup2(fd, to) != to {
                fail(STEP_DUP);
            }
        }
        // What deployd inherited without close-on-exec (a shell's or a CI
        // runner's pipes) is not the instance's: a pipe held open by it
        // would keep whoever started deployd waiting for end of file.
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..plan.max_fd {
                libc::close(fd);
            }
        }
        // As execvp: a candidate that is not there (or not a directory on
        // the way) is skipped, and so is one this user may not run, the
        // next being tried; a denial is what is said if none runs.
        let mut denied: Option<usize> = None;
        *libc::__errno_location() = libc::ENOENT;
        for (i, program) in plan.programs.iter().enumerate() {
            libc::execve(
                program.as_ptr(),
                plan.argv_ptrs.as_ptr(),
                plan.envp_ptrs.as_ptr(),
            );
            plan.tried.store(i as i32, Ordering::SeqCst);
            match *libc::__errno_location() {
                libc::ENOEXEC => {
                    if let Some(sh_argv) = plan.sh_argv_ptrs.get(i) {
                        libc::execve(plan.sh.as_ptr(), sh_argv.as_ptr(), plan.envp_ptrs.as_ptr());
                    }
                    fail(STEP_EXEC)
                }
                libc::EACCES => {
                    denied.get_or_insert(i);
                }
                libc::ENOENT | libc::ENOTDIR | libc::ESTALE | libc::ENODEV | libc::ETIMEDOUT => {}
                _ => fail(STEP_EXEC),
            }
        }
        if let Some(i) = denied {
            plan.tried.store(i as i32, Ordering::SeqCst);
            *libc::__errno_location() = libc::EACCES;
        }
        fail(STEP_EXEC)
    }
}

/// deployd's environment without `remove`, with `env` set over it.
fn environment(env: &[(String, String)], remove: &[&str]) -> Vec<(OsString, OsString)> {
    let mut out: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| {
            !remove.iter().any(|r| k.as_os_str() == OsStr::new(r))
                && !env.iter().any(|(e, _)| k.as_os_str() == OsStr::new(e))
        })
        .collect();
    for (k, v) in env {
        // A later `env` of the same name wins, as with Command::envs.
        out.retain(|(o, _)| o.as_os_str() != OsStr::new(k));
        out.push((k.into(), v.into()));
    }
    out
}

/// Where `program` may be, in the order execvp tries them: itself if it
/// names a path, else each entry of the child's `PATH` (relative ones, and
/// an empty one, in `dir`) with its name.
fn candidates(program: &OsStr, dir: &Path, env: &[(OsString, OsString)]) -> Vec<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return vec![PathBuf::from(program)];
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .map(|entry| {
            // An empty entry is the working directory, as for execvp.
            let base = if entry.as_os_str().is_empty() {
                dir.to_path_buf()
            } else {
                dir.join(entry)
            };
            base.join(program)
        })
        .collect()
}

/// Whether `p` is a file this process may execute.
pub fn is_executable_file(p: &Path) -> bool {
    let Ok(meta) = std::fs::metadata(p) else {
        return false;
    };
    let Ok(c) = cstring(p.as_os_str()) else {
        return false;
    };
    // SAFETY: access reads a NUL-terminated path we own.
    meta.is_file() && unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0
}

fn cstring(s: &OsStr) -> std::io::Result<CString> {
    CString::new(s.to_os_string().into_vec()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} contains a NUL byte", s.to_string_lossy()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Runs `words` and returns what it printed and its pid, once it exited.
    /// Runs `program` in `dir`, with deployd's environment and no output.
    fn launch_bare(program: &str, dir: &Path) -> std::io::Result<u32> {
        launch(&[OsStr::new(program)], dir, &[], &[], None, None, None)
    }

    fn run(words: &[&str], dir: &Path, env: &[(String, String)]) -> (String, u32) {
        run_as(words, dir, env, None).expect("launch")
    }

    fn run_as(
        words: &[&str],
        dir: &Path,
        env: &[(String, String)],
        account: Option<&Account>,
    ) -> std::io::Result<(String, u32)> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let words: Vec<&OsStr> = words.iter().map(OsStr::new).collect();
        let pid = launch(
            &words,
            dir,
            env,
            &["DEPLOYD_TEST_REMOVED"],
            Some(w),
            account,
            None,
        )?;
        let mut out = String::new();
        std::fs::File::from(r)
            .read_to_string(&mut out)
            .expect("read");
        // Another test's reaper (waitpid(-1)) may be quicker: no status here.
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
        Ok((out, pid))
    }

    #[test]
    fn the_child_takes_the_accounts_ids_groups_and_keeps_its_death_signal() {
        let dir = tempfile::tempdir().expect("tempdir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let account = Account {
            uid: 3999001,
            gid: 3999002,
            groups: vec![3999002, 3999003],
            name: None,
            home: None,
        };
        // Not through sh: the status of the program itself.
        let result = run_as(
            &["grep", "-E", "^(Uid|Gid|Groups)", "/proc/self/status"],
            dir.path(),
            &[],
            Some(&account),
        );
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            // Only root may change its user: the start fails, and says so.
            let err = result.expect_err("not root");
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
            assert!(
                err.to_string().contains("switching user to uid 3999001"),
                "{err}"
            );
            return;
        }
        let (out, _) = result.expect("launch as root");
        assert!(
            out.contains("Uid:\t3999001\t3999001\t3999001\t3999001"),
            "{out}"
        );
        assert!(
            out.contains("Gid:\t3999002\t3999002\t3999002\t3999002"),
            "{out}"
        );
        let groups = out
            .lines()
            .find(|l| l.starts_with("Groups:"))
            .expect("Groups");
        assert_eq!(
            groups.split_whitespace().skip(1).collect::<Vec<_>>(),
            ["3999002", "3999003"]
        );
        // The change of user clears PR_SET_PDEATHSIG, so it must come
        // after: the child of a thread that ends gets SIGTERM.
        let (d, a) = (dir.path().to_path_buf(), account.clone());
        let pid = std::thread::spawn(move || {
            let words = [OsStr::new("sleep"), OsStr::new("30")];
            launch(&words, &d, &[], &[], None, Some(&a), None).expect("sleep")
        })
        .join()
        .expect("thread");
        struct Kill(u32);
        impl Drop for Kill {
            fn drop(&mut self) {
                // SAFETY: kill has no memory effects; the group may be gone.
                unsafe { libc::kill(-(self.0 as i32), libc::SIGKILL) };
            }
        }
        let _kill = Kill(pid);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let gone = loop {
            // Gone, or a zombie waiting for a reaper.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit(") ").next().and_then(|r| r.chars().next());
            if stat.is_empty() || state == Some('Z') {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(
            gone,
            "sleep (pid {pid}) outlived the thread that started it"
        );
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
        // deployd itself is still root: only the child changed.
        // SAFETY: as above.
        assert_eq!(unsafe { libc::geteuid() }, 0);
    }

    #[test]
    fn the_child_gets_its_arguments_dir_environment_and_own_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = vec![("ONE".to_string(), "1".to_string())];
        let (out, pid) = run(
            &[
                "sh",
                "-c",
                "echo \"$1 $ONE ${DEPLOYD_TEST_REMOVED-unset} $(pwd)\"; ps -o pgid= -p $$; echo err >&2",
                "sh",
                "arg",
            ],
            dir.path(),
            &env,
        );
        let mut lines = out.lines();
        let first = lines.next().expect("first line");
        let real = std::fs::canonicalize(dir.path()).expect("canonical");
        assert_eq!(first, format!("arg 1 unset {}", real.display()));
        let pgid: u32 = lines.next().expect("pgid").trim().parse().expect("number");
        assert_eq!(pgid, pid, "the leader of its own group");
        assert_eq!(lines.next(), Some("err"));
    }

    #[test]
    fn the_child_has_default_signals_an_empty_mask_and_a_death_signal() {
        let dir = tempfile::tempdir().expect("tempdir");
        // SigIgn/SigBlk as hex masks; the Rust runtime ignores SIGPIPE in us.
        // Not through sh: dash blocks every signal while it waits for a child.
        let (out, _) = run(
            &["grep", "-E", "^(SigBlk|SigIgn)", "/proc/self/status"],
            dir.path(),
            &[],
        );
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
        let ign = out
            .lines()
            .find(|l| l.starts_with("SigIgn:"))
            .expect("SigIgn");
        let mask = u64::from_str_radix(ign.trim_start_matches("SigIgn:").trim(), 16).expect("hex");
        assert_eq!(
            mask & (1 << (libc::SIGPIPE - 1)),
            0,
            "SIGPIPE ignored: {out}"
        );
        // PR_GET_PDEATHSIG is 2; the signal survives execve.
        let code = "import ctypes; s = ctypes.c_int(); \
                    ctypes.CDLL(None).prctl(2, ctypes.byref(s)); print(s.value)";
        let (out, _) = run(&["python3", "-c", code], dir.path(), &[]);
        assert_eq!(out.trim(), libc::SIGTERM.to_string());
    }

    #[test]
    fn a_missing_program_or_dir_is_an_error_not_a_child() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = launch_bare("no-such-program-x", dir.path()).expect_err("missing program");
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
        assert!(
            err.to_string()
                .ends_with("(os error 2) (no-such-program-x: not in PATH)"),
            "{err}"
        );
        let err = launch_bare("./nothing", dir.path()).expect_err("missing file");
        let want = format!(
            "(os error 2) (running ./nothing in {})",
            dir.path().display()
        );
        assert!(err.to_string().ends_with(&want), "{err}");
        let gone = dir.path().join("gone");
        let err = launch_bare("/bin/true", &gone).expect_err("missing dir");
        let want = format!("(os error 2) (entering {})", gone.display());
        assert!(err.to_string().ends_with(&want), "{err}");
    }

    #[test]
    fn path_is_searched_as_the_account_a_login_would_search_it() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // Only root may start a child as another account.
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        // The same name in a folder only root may enter (root's own
        // toolchain, say) and in one anybody may.
        let (closed, open) = (dir.path().join("closed"), dir.path().join("open"));
        for (d, mode, says) in [(&closed, 0o700, "closed"), (&open, 0o755, "open")] {
            std::fs::create_dir(d).expect("mkdir");
            let tool = d.join("tool-x");
            std::fs::write(&tool, format!("#!/bin/sh\necho {says}\n")).expect("write");
            std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        let account = Account {
            uid: 3999001,
            gid: 3999002,
            groups: vec![3999002],
            name: None,
            home: None,
        };
        let path = |p: String| vec![("PATH".to_string(), p)];
        let both = path(format!("{}:{}", closed.display(), open.display()));
        let (out, _) = run_as(&["tool-x"], dir.path(), &both, Some(&account)).expect("runs");
        assert_eq!(out, "open\n", "the next in PATH, as execvp does");
        // Root itself finds the first.
        let (out, _) = run_as(&["tool-x"], dir.path(), &both, None).expect("runs");
        assert_eq!(out, "closed\n");
        // Only the closed one: refused, naming it and the account.
        let only = path(closed.display().to_string());
        let err = run_as(&["tool-x"], dir.path(), &only, Some(&account)).expect_err("denied");
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
        let want = format!("(running {}/tool-x as uid 3999001)", closed.display());
        assert!(err.to_string().ends_with(&want), "{err}");
    }

    #[test]
    fn path_comes_from_the_childs_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("mkdir");
        let tool = bin.join("only-here");
        std::fs::write(&tool, "#!/bin/sh\necho found\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let env = vec![(
            "PATH".to_string(),
            format!("/nonexistent:{}", bin.display()),
        )];
        let (out, _) = run(&["only-here"], dir.path(), &env);
        assert_eq!(out, "found\n");
        // A relative entry is relative to the child's directory.
        let env = vec![("PATH".to_string(), "bin".to_string())];
        let (out, _) = run(&["only-here"], dir.path(), &env);
        assert_eq!(out, "found\n");
    }

    #[test]
    fn the_child_gets_no_descriptor_but_its_stdio() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A pipe deployd would have inherited without close-on-exec.
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::empty()).expect("pipe");
        // SAFETY: F_DUPFD returns a new descriptor, closed below.
        let high = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_DUPFD, 200) };
        assert!(high >= 200);
        let (out, _) = run(&["ls", "-1", "/proc/self/fd"], dir.path(), &[]);
        // SAFETY: `high` is ours and closed once.
        unsafe { libc::close(high) };
        drop((r, w));
        let fds: Vec<&str> = out.lines().collect();
        // ls's own descriptor for the directory is the 4th.
        assert_eq!(fds, ["0", "1", "2", "3"], "{out}");
    }

    #[test]
    fn a_script_without_a_shebang_runs_with_sh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("plain");
        std::fs::write(&script, "echo \"plain $1 $2\"\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let (out, _) = run(&["./plain", "a", "b"], dir.path(), &[]);
        assert_eq!(out, "plain a b\n");
    }
}
