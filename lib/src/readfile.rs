//! Reading a file a user named (a manifest, an env file) without letting it
//! block or bloat the reader: regular files only, opened without waiting,
//! read up to a limit.
//!
//! `std::fs::read` on a FIFO waits for a writer for ever (and whoever waits
//! on the reader with it); on `/dev/zero` it grows until memory runs out; a
//! size checked with `metadata` first says nothing of either, since both
//! report 0 bytes. So the file is opened with `O_NONBLOCK` (an open of a
//! FIFO returns at once), its type and size are taken from the descriptor
//! that was opened (not from the path, which may have changed since), and
//! at most one byte more than the limit is read.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why a file could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The OS refused (no such file, permission denied, …).
    Io(std::io::Error),
    /// It is not a regular file: what it is instead.
    NotRegular(&'static str),
    /// It is larger than the limit: its size (or, when it grew while being
    /// read, at least that), and the limit.
    TooLarge(u64, usize),
}

impl ReadError {
    /// Whether the file does not exist.
    pub fn not_found(&self) -> bool {
        matches!(self, ReadError::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Io(e) => write!(f, "{e}"),
            ReadError::NotRegular(what) => write!(f, "{what}, not a regular file; refused"),
            ReadError::TooLarge(size, max) => {
                write!(f, "{size} bytes; the limit is {max}")
            }
        }
    }
}

impl std::error::Error for ReadError {}

/// The content of the regular file at `path` (links followed), at most
/// `max` bytes; never waits for a writer (FIFO) or reads a device.
pub fn read_regular(path: &Path, max: usize) -> Result<Vec<u8>, ReadError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(ReadError::Io)?;
    let meta = file.metadata().map_err(ReadError::Io)?;
    let kind = meta.file_type();
    let what = if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("a special file")
    };
    if let Some(what) = what {
        return Err(ReadError::NotRegular(what));
    }
    if meta.len() > max as u64 {
        return Err(ReadError::TooLarge(meta.len(), max));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // One byte past the limit tells a file that grew since the fstat.
    file.take(max as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() > max {
        return Err(ReadError::TooLarge(bytes.len() as u64, max));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_within_the_limit_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"A=1\n").unwrap();
        assert_eq!(read_regular(&p, 4).unwrap(), b"A=1\n");
        let e = read_regular(&p, 3).unwrap_err();
        assert_eq!(e.to_string(), "4 bytes; the limit is 3");
        assert!(
            read_regular(&dir.path().join("no"), 3)
                .unwrap_err()
                .not_found()
        );
    }

    #[test]
    fn fifos_devices_and_directories_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix_mkfifo(&fifo);
        let t = std::time::Instant::now();
        let e = read_regular(&fifo, 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "a FIFO, not a regular file; refused");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        let e = read_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert_eq!(
            e.to_string(),
            "a character device, not a regular file; refused"
        );
        let e = read_regular(dir.path(), 1 << 20).unwrap_err();
        assert_eq!(e.to_string(), "a directory, not a regular file; refused");
        // A link to one is what it links to.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(
            read_regular(&link, 10),
            Err(ReadError::NotRegular(_))
        ));
    }

    fn nix_mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
}
