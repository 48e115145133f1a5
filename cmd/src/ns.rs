//! The namespace as the CLI sees it: files under a root (`/deploy`), and the
//! errors a user needs told apart: deployd not running, no such service,
//! command refused.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::Fail;

/// Exit code: the namespace is not mounted (deployd is not running).
pub const NOT_RUNNING: u8 = 3;
/// Exit code: no such service (or version).
pub const NOT_FOUND: u8 = 4;
/// Exit code: deployd refused the command.
pub const REFUSED: u8 = 5;

/// A mounted namespace.
pub struct Ns {
    root: PathBuf,
}

impl Ns {
    /// Checks that deployd serves `root`.
    pub fn open(root: &Path) -> Result<Ns, Fail> {
        match std::fs::metadata(root.join("ctl")) {
            Ok(_) => Ok(Ns {
                root: root.to_path_buf(),
            }),
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Err(Fail::new(
                NOT_RUNNING,
                format!(
                    "deployd is not running: its namespace at {} is a dead mount; start deployd again (deployd --config FILE)",
                    root.display()
                ),
            )),
            Err(_) => Err(Fail::new(
                NOT_RUNNING,
                format!(
                    "deployd is not running: no namespace at {}; start it with: deployd --config FILE (or set --root / DEPLOY_ROOT)",
                    root.display()
                ),
            )),
        }
    }

    /// `/deploy/status`
    pub fn status_file(&self) -> PathBuf {
        self.root.join("status")
    }

    /// `/deploy/active/SERVICE`, which must exist.
    pub fn service(&self, name: &str) -> Result<PathBuf, Fail> {
        let dir = self.root.join("active").join(name);
        // `name` is a service name (main's service_arg): no `/`, no `..`.
        if !dir.is_dir() {
            let known = self.services();
            return Err(Fail::new(
                NOT_FOUND,
                deployd_lib::name::no_such_service(name, known.iter().map(String::as_str)),
            ));
        }
        Ok(dir)
    }

    /// The names in `/deploy/active`; none if it cannot be read.
    pub fn services(&self) -> Vec<String> {
        std::fs::read_dir(self.root.join("active"))
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `/deploy/active/SERVICE`, whether or not it exists yet.
    pub fn service_path(&self, name: &str) -> PathBuf {
        self.root.join("active").join(name)
    }

    /// Writes a command to the root ctl file.
    pub fn ctl_root(&self, command: &str) -> Result<String, Fail> {
        ctl(&self.root.join("ctl"), command)
    }
}

/// Reads a small text file of the namespace.
pub fn read(path: &Path) -> Result<String, Fail> {
    std::fs::read_to_string(path).map_err(|e| io_fail(path, e))
}

/// The instance numbers in a service's `instances/` directory, in order.
pub fn instance_numbers(instances: &Path) -> std::io::Result<Vec<u32>> {
    let mut numbers: Vec<u32> = std::fs::read_dir(instances)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    numbers.sort();
    Ok(numbers)
}

/// Reads a small text file, trimmed; empty if it does not exist.
pub fn read_field(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name))
        .map(|s| s.trim_end().to_string())
        .unwrap_or_default()
}

pub fn io_fail(path: &Path, e: std::io::Error) -> Fail {
    let code = match e.kind() {
        ErrorKind::NotFound => NOT_FOUND,
        _ if e.raw_os_error() == Some(libc::ENOTCONN) => NOT_RUNNING,
        _ => 1,
    };
    Fail::new(code, format!("{}: {e}", path.display()))
}

/// Writes one command to a ctl file and returns deployd's answer, read back
/// on the same descriptor ("ok: ..." without the "ok: ").
pub fn ctl(path: &Path, command: &str) -> Result<String, Fail> {
    let f: File = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_fail(path, e))?;
    let written = (&f).write(command.as_bytes());
    let answer = read_back(&f);
    match written {
        Ok(_) => Ok(answer.strip_prefix("ok: ").unwrap_or(&answer).to_string()),
        Err(e) => {
            let reason = answer
                .strip_prefix("error: ")
                .unwrap_or(&answer)
                .to_string();
            let reason = if reason.is_empty() {
                e.to_string()
            } else {
                reason
            };
            let code = match e.raw_os_error() {
                Some(libc::ENOENT) => NOT_FOUND,
                Some(libc::ENOTCONN) | Some(libc::EIO) => NOT_RUNNING,
                _ => REFUSED,
            };
            Err(Fail::new(code, reason))
        }
    }
}

fn read_back(f: &File) -> String {
    let mut buf = vec![0u8; 64 * 1024];
    let n = f.read_at(&mut buf, 0).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
}
