//! `deploy events` and `deploy logs`: print a file of the namespace, and with
//! `-f` keep printing what is appended, like `tail -f`.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ns;
use crate::{Exit, Fail};

const POLL: Duration = Duration::from_millis(200);

/// Prints `files` (each line prefixed by its label, if any); with `follow`,
/// keeps polling for more until killed. A file that shrank (rotated or
/// trimmed) is read from its start again.
pub fn run(files: Vec<(Option<String>, PathBuf)>, follow: bool) -> Result<Exit, Fail> {
    let mut offsets = vec![0u64; files.len()];
    let mut partial = vec![Vec::new(); files.len()];
    let mut out = std::io::stdout().lock();
    loop {
        for (i, (label, path)) in files.iter().enumerate() {
            let Some(chunk) = read_from(path, &mut offsets[i])? else {
                continue;
            };
            partial[i].extend_from_slice(&chunk);
            emit(&mut out, label.as_deref(), &mut partial[i], !follow)?;
        }
        out.flush()?;
        if !follow {
            return Ok(Exit::Ok);
        }
        std::thread::sleep(POLL);
    }
}

/// New bytes of `path` after `offset`; `None` if it is gone.
fn read_from(path: &Path, offset: &mut u64) -> Result<Option<Vec<u8>>, Fail> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(_) => return Ok(None),
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len < *offset {
        *offset = 0;
    }
    let mut data = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read_at(&mut buf, *offset).unwrap_or(0);
        if n == 0 {
            break;
        }
        *offset += n as u64;
        data.extend_from_slice(&buf[..n]);
    }
    Ok(Some(data))
}

/// Writes the complete lines of `pending` (all of it if `all`).
fn emit(
    out: &mut impl Write,
    label: Option<&str>,
    pending: &mut Vec<u8>,
    all: bool,
) -> std::io::Result<()> {
    let end = if all {
        pending.len()
    } else {
        pending
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1)
    };
    let text = String::from_utf8_lossy(&pending[..end]).into_owned();
    pending.drain(..end);
    match label {
        None => out.write_all(text.as_bytes()),
        Some(l) => {
            for line in text.lines() {
                writeln!(out, "[{l}] {line}")?;
            }
            Ok(())
        }
    }
}

/// The log files of a service's instances (or of one), labelled by number.
pub fn logs(dir: &Path, instance: Option<u32>) -> Result<Vec<(Option<String>, PathBuf)>, Fail> {
    let instances = dir.join("instances");
    match instance {
        Some(n) => {
            let path = instances.join(n.to_string()).join("log");
            if !path.exists() {
                return Err(Fail::new(ns::NOT_FOUND, format!("no instance {n}")));
            }
            Ok(vec![(None, path)])
        }
        None => {
            let mut numbers: Vec<u32> = std::fs::read_dir(&instances)
                .map_err(|e| Fail::new(1, format!("{}: {e}", instances.display())))?
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect();
            numbers.sort();
            Ok(numbers
                .into_iter()
                .map(|n| {
                    (
                        Some(n.to_string()),
                        instances.join(n.to_string()).join("log"),
                    )
                })
                .collect())
        }
    }
}
