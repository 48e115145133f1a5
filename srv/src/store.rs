//! The state directory: what survives a restart of deployd.
//!
//! ```text
//! STATE/deployd.lock                 one deployd per state directory (flock)
//! STATE/services/SERVICE/state.json  the service's record (atomic, fsync)
//! STATE/services/SERVICE/history/VERSION.manifest   last manifests (atomic, fsync)
//! STATE/services/SERVICE/events.log  the event log (appended, rotated at 4 MiB)
//! STATE/services/SERVICE/pids        process groups to kill after a crash (atomic)
//! STATE/services/SERVICE/logs/       instance output
//! STATE/services/SERVICE/failed.log  the last failed instance's log (a hard link)
//! ```
//!
//! Everything is its owner's alone: directories 0700, files 0600 (instances'
//! output and events may hold what no other user should read).
//!
//! Records and manifests are written to a temporary file, fsynced and renamed
//! over the old one, so a kill -9 (or a power cut) leaves either the old or
//! the new file. The pid file is not fsynced: after a power cut there is
//! nothing left to kill. Event lines are appended with one write each.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use deployd_lib::manifest::Version;
use deployd_lib::name::ServiceName;

/// Event log size on disk past which it is moved to `events.log.1`.
pub const EVENTS_MAX: u64 = 4 << 20;
/// How much of the event log is loaded at start.
pub const EVENTS_LOADED: u64 = 1 << 20;
/// Instance log files kept per service.
pub const LOGS_KEPT: usize = 64;

/// What `state.json` holds: the record the core keeps of a service.
pub use deployd_lib::core::Saved;

/// Why the state directory, or a service's record in it, cannot be used.
#[derive(Debug)]
pub enum StoreError {
    /// A file or directory the OS refused.
    Io(PathBuf, std::io::Error),
    /// A record that is not one.
    Record(PathBuf, serde_json::Error),
    /// Another deployd holds the directory's lock.
    Locked {
        /// Its pid, as the lock file says.
        holder: String,
        /// The directory.
        root: PathBuf,
    },
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Io(p, e) => write!(f, "{}: {e}", p.display()),
            StoreError::Record(p, e) => write!(f, "{}: {e}", p.display()),
            StoreError::Locked { holder, root } => write!(
                f,
                "another deployd (pid {holder}) uses the state directory {}",
                root.display()
            ),
        }
    }
}

impl std::error::Error for StoreError {}

/// The state directory, locked for this deployd.
pub struct Store {
    root: PathBuf,
    _lock: File,
    /// Each service's event log, kept open: appending a line then needs no
    /// descriptor, which deployd may be short of just when something
    /// worth a line happens.
    events: parking_lot::Mutex<std::collections::HashMap<ServiceName, EventFile>>,
}

/// A service's open event log, and the lines that could not be written
/// to it yet (a full disk): written first at the next append that can.
#[derive(Default)]
struct EventFile {
    file: Option<File>,
    unwritten: Vec<u8>,
}

/// The most bytes of event lines kept in memory while they cannot be
/// written; past it the oldest go (events in memory still show them).
const UNWRITTEN_MAX: usize = 1 << 20;

impl Store {
    /// Opens (creating) the state directory and takes its lock.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let services = root.join("services");
        private_dirs(&services).map_err(|e| StoreError::Io(services.clone(), e))?;
        // deployd's alone: instances' output, events, manifests. Made so
        // again at each start, for a directory an earlier deployd made
        // world-readable (what is below it is then out of reach too).
        for dir in [root, &services] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| StoreError::Io(dir.to_path_buf(), e))?;
        }
        let lock_path = root.join("deployd.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| StoreError::Io(lock_path.clone(), e))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            let _ = (&lock).read_to_string(&mut holder);
            return Err(StoreError::Locked {
                holder: holder.trim().to_string(),
                root: root.to_path_buf(),
            });
        }
        let mut f = &lock;
        let _ = f.set_len(0);
        let _ = f.seek(SeekFrom::Start(0));
        let _ = writeln!(f, "{}", std::process::id());
        Ok(Store {
            root: root.to_path_buf(),
            _lock: lock,
            events: Default::default(),
        })
    }

    fn dir(&self, service: &ServiceName) -> PathBuf {
        self.root.join("services").join(service.as_str())
    }

    /// The services that have a record.
    pub fn services(&self) -> Vec<ServiceName> {
        let Ok(entries) = fs::read_dir(self.root.join("services")) else {
            return Vec::new();
        };
        let mut v: Vec<ServiceName> = entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().join("state.json").exists())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| ServiceName::new(n).ok())
            })
            .collect();
        v.sort();
        v
    }

    /// Creates a service's directories.
    pub fn create(&self, service: &ServiceName) -> std::io::Result<()> {
        let dir = self.dir(service);
        private_dirs(&dir.join("history"))?;
        private_dirs(&dir.join("logs"))
    }

    /// Reads a service's record.
    pub fn load(&self, service: &ServiceName) -> Result<Saved, StoreError> {
        let path = self.dir(service).join("state.json");
        let text = fs::read(&path).map_err(|e| StoreError::Io(path.clone(), e))?;
        serde_json::from_slice(&text).map_err(|e| StoreError::Record(path, e))
    }

    /// Writes a service's record, atomically and durably.
    pub fn save(&self, service: &ServiceName, saved: &Saved) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(saved).map_err(std::io::Error::other)?;
        write_atomic(&self.dir(service).join("state.json"), &bytes, true)
    }

    /// Stores a manifest of the service's history.
    pub fn save_manifest(
        &self,
        service: &ServiceName,
        version: Version,
        text: &str,
    ) -> std::io::Result<()> {
        let path = self.history_path(service, version);
        if path.exists() {
            return Ok(());
        }
        write_atomic(&path, text.as_bytes(), true)
    }

    /// Reads a manifest of the service's history.
    pub fn load_manifest(
        &self,
        service: &ServiceName,
        version: Version,
    ) -> std::io::Result<String> {
        fs::read_to_string(self.history_path(service, version))
    }

    /// Deletes the history manifests not in `keep`.
    pub fn prune_history(&self, service: &ServiceName, keep: &[Version]) {
        let Ok(entries) = fs::read_dir(self.dir(service).join("history")) else {
            return;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name();
            let Some(v) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".manifest"))
                .and_then(|n| n.parse::<Version>().ok())
            else {
                continue;
            };
            if !keep.contains(&v) {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    fn history_path(&self, service: &ServiceName, version: Version) -> PathBuf {
        self.dir(service)
            .join("history")
            .join(format!("{version}.manifest"))
    }

    /// Appends one line (with its newline) to the event log. A line that
    /// cannot be written now is kept and written before the next one that
    /// can: none is lost while deployd runs.
    pub fn append_event(&self, service: &ServiceName, line: &str) -> std::io::Result<()> {
        let path = self.dir(service).join("events.log");
        let mut all = self.events.lock();
        let ev = all.entry(service.clone()).or_default();
        ev.unwritten.extend_from_slice(line.as_bytes());
        if ev.unwritten.len() > UNWRITTEN_MAX {
            let cut = ev.unwritten.len() - UNWRITTEN_MAX;
            let cut = ev.unwritten[cut..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(ev.unwritten.len(), |p| cut + p + 1);
            ev.unwritten.drain(..cut);
        }
        if ev.file.is_none() {
            ev.file = Some(open_private_append(&path)?);
        }
        let Some(f) = ev.file.as_mut() else {
            return Ok(());
        };
        // One write: a line is whole in the file or not there.
        match f.write(&ev.unwritten) {
            Ok(n) if n == ev.unwritten.len() => ev.unwritten.clear(),
            Ok(n) => {
                ev.unwritten.drain(..n);
                return Err(std::io::Error::other("event log: a short write"));
            }
            Err(e) => return Err(e),
        }
        if f.metadata()?.len() > EVENTS_MAX {
            ev.file = None;
            fs::rename(&path, self.dir(service).join("events.log.1"))?;
        }
        Ok(())
    }

    /// The end of the event log, up to [`EVENTS_LOADED`], from a line start.
    pub fn load_events(&self, service: &ServiceName) -> Vec<u8> {
        let Ok(mut f) = File::open(self.dir(service).join("events.log")) else {
            return Vec::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(EVENTS_LOADED);
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        if start > 0 {
            let cut = buf
                .iter()
                .position(|&b| b == b'\n')
                .map_or(buf.len(), |p| p + 1);
            buf.drain(..cut);
        }
        // A line torn by a crash mid-write is completed, not glued to the next.
        if buf.last().is_some_and(|&b| b != b'\n') {
            buf.push(b'\n');
        }
        buf
    }

    /// Records the process groups of the service's live instances.
    pub fn save_pids(&self, service: &ServiceName, groups: &[(u32, u64)]) -> std::io::Result<()> {
        let text: String = groups.iter().map(|(p, t)| format!("{p} {t}\n")).collect();
        write_atomic(&self.dir(service).join("pids"), text.as_bytes(), false)
    }

    /// The process groups [`Store::save_pids`] recorded for each service
    /// (those with none left out), by the service's directory name.
    pub fn all_pids(&self) -> Vec<(String, Vec<(u32, u64)>)> {
        let mut v = Vec::new();
        let Ok(entries) = fs::read_dir(self.root.join("services")) else {
            return v;
        };
        for e in entries.filter_map(|e| e.ok()) {
            let Ok(text) = fs::read_to_string(e.path().join("pids")) else {
                continue;
            };
            let groups: Vec<(u32, u64)> = text
                .lines()
                .filter_map(|line| {
                    let mut it = line.split(' ').map(|w| w.parse::<u64>());
                    match (it.next(), it.next()) {
                        (Some(Ok(p)), Some(Ok(t))) => Some((u32::try_from(p).ok()?, t)),
                        _ => None,
                    }
                })
                .collect();
            if !groups.is_empty() {
                v.push((e.file_name().to_string_lossy().into_owned(), groups));
            }
        }
        v
    }

    /// Where the access log of a service's port goes (`access_log on`).
    pub fn access_path(&self, service: &ServiceName) -> PathBuf {
        self.dir(service).join("access.log")
    }

    /// `hooks_log`: what the service's rollout hooks printed, each run
    /// after a `== TIME HOOK of VERSION: COMMAND` line.
    pub fn hooks_log_path(&self, service: &ServiceName) -> PathBuf {
        self.dir(service).join("hooks.log")
    }

    /// `failed_log`: a hard link to the log of the last instance whose
    /// output the events showed after a failure.
    pub fn failed_log_path(&self, service: &ServiceName) -> PathBuf {
        self.dir(service).join("failed.log")
    }

    /// Makes `failed.log` the log at `log` (a second name for the same
    /// file, so that the instance's output goes on reaching it, and pruning
    /// the instance's logs leaves it), replacing the one before atomically.
    pub fn link_failed_log(&self, service: &ServiceName, log: &Path) -> std::io::Result<()> {
        let path = self.failed_log_path(service);
        let tmp = self.dir(service).join("failed.log.tmp");
        let _ = fs::remove_file(&tmp);
        fs::hard_link(log, &tmp)?;
        fs::rename(&tmp, &path)
    }

    /// Where an instance's output goes.
    pub fn log_path(&self, service: &ServiceName, generation: u64, id: u64) -> PathBuf {
        self.dir(service)
            .join("logs")
            .join(format!("{generation}-{id}.log"))
    }

    /// Deletes all but the newest [`LOGS_KEPT`] log files, keeping `live`.
    pub fn prune_logs(&self, service: &ServiceName, live: &[PathBuf]) {
        let Ok(entries) = fs::read_dir(self.dir(service).join("logs")) else {
            return;
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if files.len() <= LOGS_KEPT {
            return;
        }
        files.sort();
        let excess = files.len() - LOGS_KEPT;
        for (_, path) in files.into_iter().take(excess) {
            // A rotated log (`ID.log.1`) goes with its log.
            let base = path.with_extension("");
            let rotated = path.extension().is_some_and(|e| e == "1");
            let kept = live.contains(&path) || (rotated && live.contains(&base));
            if !kept {
                let _ = fs::remove_file(path);
            }
        }
    }

    /// Forgets a service: deletes its directory.
    pub fn remove(&self, service: &ServiceName) -> std::io::Result<()> {
        self.events.lock().remove(service);
        fs::remove_dir_all(self.dir(service))
    }
}

/// Creates `dir` and what is missing above it, each readable by deployd's
/// user alone (0700).
fn private_dirs(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Opens a file of the state directory for appending, creating it
/// readable by deployd's user alone (0600).
pub fn open_private_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Writes `bytes` to `path` through a temporary file in the same directory,
/// fsynced if `durable`, then renamed over `path`; if `durable`, the
/// directory is fsynced after the rename too, so that what deployd
/// acknowledged survives a power cut (the rename itself is the
/// directory's to keep).
/// An error is the OS's own (`No space left on device (os error 28)`,
/// its errno kept for the namespace to answer with), not tempfile's
/// wrapping of it, which names the temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    let write = || {
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(bytes)?;
        if durable {
            tmp.as_file().sync_all()?;
        }
        tmp.persist(path).map_err(|e| e.error)?;
        if durable {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(os_error)
}

/// The OS error behind `e`. tempfile wraps what the OS said with the
/// temporary file's path and keeps only its kind, so the errno comes back
/// from the kind, for those a write can meet.
fn os_error(e: std::io::Error) -> std::io::Error {
    use std::io::ErrorKind as K;
    if e.raw_os_error().is_some() {
        return e;
    }
    let errno = match e.kind() {
        K::StorageFull => libc::ENOSPC,
        K::ReadOnlyFilesystem => libc::EROFS,
        K::QuotaExceeded => libc::EDQUOT,
        K::FileTooLarge => libc::EFBIG,
        K::PermissionDenied => libc::EACCES,
        K::NotFound => libc::ENOENT,
        _ => return e,
    };
    std::io::Error::from_raw_os_error(errno)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deployd_lib::rollout::Record;
    use deployd_lib::rollout::UpdateStatus;

    fn name(n: &str) -> ServiceName {
        ServiceName::new(n).unwrap()
    }

    /// A store in a fresh directory, with the service `web` created.
    fn web_store() -> (tempfile::TempDir, Store, ServiceName) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let web = name("web");
        store.create(&web).unwrap();
        (dir, store, web)
    }

    #[test]
    fn a_failed_write_says_what_the_os_said() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone/state.json");
        let e = write_atomic(&path, b"{}", true).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        assert_eq!(e.to_string(), "No such file or directory (os error 2)");
    }

    /// What deployd keeps is its own: instances' output and events may
    /// hold secrets. A directory an earlier deployd left open is closed.
    #[test]
    fn the_state_directory_is_readable_by_its_owner_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("state");
        std::fs::create_dir_all(root.join("services")).unwrap();
        for d in [&root, &root.join("services")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let store = Store::open(&root).unwrap();
        let web = name("web");
        store.create(&web).unwrap();
        store.append_event(&web, "one\n").unwrap();
        store.save_pids(&web, &[(1, 2)]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        for d in [
            root.clone(),
            root.join("services"),
            store.dir(&web),
            store.dir(&web).join("logs"),
            store.dir(&web).join("history"),
        ] {
            assert_eq!(mode(&d), 0o700, "{}", d.display());
        }
        for f in [
            root.join("deployd.lock"),
            store.dir(&web).join("events.log"),
            store.dir(&web).join("pids"),
        ] {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
    }

    #[test]
    fn record_round_trips_and_the_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        let web = name("web");
        store.create(&web).unwrap();
        let v: Version = "0123456789ab".parse().unwrap();
        let saved = Saved {
            record: Record {
                version: v,
                previous: None,
                update_status: UpdateStatus::Rolling,
                failure: Some("x".into()),
                rollout: Some(deployd_lib::rollout::Kind::Apply),
                stopped: false,
                slots: vec![Some(v), None],
                restarts: vec![2, 0],
            },
            history: vec![v],
        };
        store.save(&web, &saved).unwrap();
        assert_eq!(store.load(&web).unwrap(), saved);
        assert_eq!(store.services(), vec![web.clone()]);
        store.save_manifest(&web, v, "exec a\n").unwrap();
        assert_eq!(store.load_manifest(&web, v).unwrap(), "exec a\n");
        store.prune_history(&web, &[]);
        assert!(store.load_manifest(&web, v).is_err());
        drop(store);
        // The lock goes with the store.
        Store::open(dir.path()).unwrap();
    }

    #[test]
    fn events_are_appended_and_a_torn_line_is_completed() {
        let (_dir, store, web) = web_store();
        store
            .append_event(&web, "2026-12-01T12:00:00.000Z one\n")
            .unwrap();
        store
            .append_event(&web, "2026-12-01T12:00:01.000Z two\n")
            .unwrap();
        store
            .append_event(&web, "2026-12-01T12:00:02.000Z torn")
            .unwrap();
        assert_eq!(
            String::from_utf8(store.load_events(&web)).unwrap(),
            "2026-12-01T12:00:00.000Z one\n2026-12-01T12:00:01.000Z two\n2026-12-01T12:00:02.000Z torn\n"
        );
    }

    #[test]
    fn old_logs_are_pruned_but_never_a_live_one_or_its_dot_one() {
        let (dir, store, web) = web_store();
        let logs = dir.path().join("services/web/logs");
        std::fs::create_dir_all(&logs).unwrap();
        let live = store.log_path(&web, 1, 0);
        let mut live_old = live.clone().into_os_string();
        live_old.push(".1");
        // The live log and its .1 are the oldest files.
        std::fs::write(&live, "x").unwrap();
        std::fs::write(&live_old, "x").unwrap();
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for f in [&live, &PathBuf::from(&live_old)] {
            File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        for id in 1..=LOGS_KEPT as u64 + 5 {
            std::fs::write(store.log_path(&web, 1, id), "x").unwrap();
        }
        store.prune_logs(&web, std::slice::from_ref(&live));
        assert!(live.exists());
        assert!(
            PathBuf::from(&live_old).exists(),
            "the .1 of a live log was pruned"
        );
        let left = std::fs::read_dir(&logs).unwrap().count();
        assert_eq!(left, LOGS_KEPT + 2, "the kept ones and the live ones");
    }

    #[test]
    fn the_failed_log_is_the_instance_log_under_a_second_name() {
        let (dir, store, web) = web_store();
        std::fs::create_dir_all(dir.path().join("services/web/logs")).unwrap();
        let (a, b) = (store.log_path(&web, 1, 1), store.log_path(&web, 1, 2));
        std::fs::write(&a, "first\n").unwrap();
        std::fs::write(&b, "second\n").unwrap();
        store.link_failed_log(&web, &a).unwrap();
        // What the instance prints after goes on reaching it.
        File::options()
            .append(true)
            .open(&a)
            .unwrap()
            .write_all(b"more\n")
            .unwrap();
        let failed = store.failed_log_path(&web);
        assert_eq!(std::fs::read_to_string(&failed).unwrap(), "first\nmore\n");
        // The next failure replaces it; pruning the log leaves it.
        store.link_failed_log(&web, &b).unwrap();
        std::fs::remove_file(&b).unwrap();
        assert_eq!(std::fs::read_to_string(&failed).unwrap(), "second\n");
        assert!(store.link_failed_log(&web, &b).is_err(), "a log gone");
        assert_eq!(std::fs::read_to_string(&failed).unwrap(), "second\n");
    }

    #[test]
    fn pids_of_every_service() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for (s, p) in [("a", 10u32), ("b", 20)] {
            store.create(&name(s)).unwrap();
            store.save_pids(&name(s), &[(p, 99)]).unwrap();
        }
        store.create(&name("c")).unwrap();
        store.save_pids(&name("c"), &[]).unwrap();
        let mut all = store.all_pids();
        all.sort();
        assert_eq!(
            all,
            vec![("a".into(), vec![(10, 99)]), ("b".into(), vec![(20, 99)])]
        );
    }
}
