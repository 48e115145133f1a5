//! Shortages of deployd's own: descriptors, memory, buffers, local ports,
//! disk. An operation that fails for one of these says so, and what it
//! was; it is never counted against an instance (a probe that could not
//! run is no failed probe, an instance deployd could not start did not
//! crash), so that deployd short of resources never replaces a healthy
//! instance or backs off one that did nothing wrong.

/// What deployd is short of, when `e` says it is short of something.
pub fn shortage(e: &std::io::Error) -> Option<&'static str> {
    errno_shortage(e.raw_os_error()?)
}

/// [`shortage`], from an errno.
pub fn errno_shortage(errno: i32) -> Option<&'static str> {
    match errno {
        libc::EMFILE => Some("file descriptors"),
        libc::ENFILE => Some("file descriptors (the system's limit)"),
        libc::ENOMEM => Some("memory"),
        libc::ENOBUFS => Some("socket buffers"),
        libc::EADDRNOTAVAIL => Some("local ports"),
        libc::ENOSPC => Some("disk space"),
        libc::EDQUOT => Some("disk quota"),
        // fork and clone: the process or thread limit, or memory.
        libc::EAGAIN => Some("processes (or memory)"),
        _ => None,
    }
}

/// `deployd is short of WHAT (ERROR)`, when `e` is a shortage.
pub fn describe(e: &std::io::Error) -> Option<String> {
    shortage(e).map(|what| format!("deployd is short of {what} ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortages_are_told_from_other_errors() {
        let e = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert_eq!(
            describe(&e).as_deref(),
            Some("deployd is short of file descriptors (Too many open files (os error 24))")
        );
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(describe(&refused), None);
        assert_eq!(shortage(&std::io::Error::other("x")), None);
    }
}
