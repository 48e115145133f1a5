//! `deploy events` and `deploy logs`: print a file of the namespace (or the
//! logs of a service's instances), and with `-f` keep printing what is
//! appended, like `tail -f`.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::ns;
use crate::{Exit, Fail};

const POLL: Duration = Duration::from_millis(200);

/// Prints the file at `path`; with `follow`, keeps polling for more until
/// killed. A file that shrank (rotated or trimmed) is read from its start
/// again.
pub fn run(path: &Path, follow: bool) -> Result<Exit, Fail> {
    let (mut offset, mut partial) = (0, Vec::new());
    let mut out = std::io::stdout().lock();
    loop {
        if let Some(chunk) = read_from(path, &mut offset)? {
            partial.extend_from_slice(&chunk);
            emit(&mut out, None, &mut partial, !follow)?;
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

/// `deploy logs SERVICE [INSTANCE] [-f]`: the output of the service's
/// instances (or of the one numbered `instance`), each line labelled with
/// its instance's number when there are several. With `follow`, it keeps
/// polling the instances as they come and go: one started since (by a
/// rollout, a restart) is printed from its first line, one replaced under
/// the same number starts afresh, and one renumbered (`instance 3 is now
/// instance 0`) goes on where it was, under its new label. An instance is
/// known by its pid, read around each read of its log.
pub fn logs(dir: &Path, instance: Option<u32>, follow: bool) -> Result<Exit, Fail> {
    let instances = dir.join("instances");
    if let Some(n) = instance {
        if !instances.join(n.to_string()).join("log").exists() {
            return Err(Fail::new(ns::NOT_FOUND, format!("no instance {n}")));
        }
    }
    // Per process: how far its log was printed, and a line not yet whole.
    let mut seen: HashMap<String, (u64, Vec<u8>)> = HashMap::new();
    let mut out = std::io::stdout().lock();
    loop {
        let numbers = match instance {
            Some(n) => vec![n],
            None => ns::instance_numbers(&instances)
                .map_err(|e| Fail::new(1, format!("{}: {e}", instances.display())))?,
        };
        let mut live = HashSet::new();
        for n in numbers {
            let inst = instances.join(n.to_string());
            let pid = || std::fs::read_to_string(inst.join("pid")).unwrap_or_default();
            let before = pid();
            let key = before.trim().to_string();
            if key.is_empty() {
                // Not started yet: nothing printed.
                continue;
            }
            let (offset, partial) = seen.entry(key.clone()).or_default();
            let mut at = *offset;
            let chunk = read_from(&inst.join("log"), &mut at)?;
            // Renumbered or replaced between the reads: next time.
            if pid() != before {
                continue;
            }
            live.insert(key);
            let Some(chunk) = chunk else { continue };
            *offset = at;
            partial.extend_from_slice(&chunk);
            let label = instance.is_none().then(|| n.to_string());
            emit(&mut out, label.as_deref(), partial, !follow)?;
        }
        seen.retain(|k, _| live.contains(k));
        out.flush()?;
        if !follow {
            return Ok(Exit::Ok);
        }
        std::thread::sleep(POLL);
    }
}
