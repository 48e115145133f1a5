//! deployd's own log, on its standard error, written for where it goes:
//!
//! - a terminal: times and levels, in colour (none with `NO_COLOR`);
//! - the journal (systemd sets `JOURNAL_STREAM` to the device and inode of
//!   the stream it gave; the unit in docs/ runs deployd so): each line
//!   starts with its syslog priority, `<3>` error, `<4>` warning, `<6>`
//!   info, `<7>` debug, which journald takes as the entry's priority, so
//!   `journalctl -u deployd -p warning` shows the warnings and errors; no
//!   time, the journal has its own;
//! - anything else (a file, a pipe): times and levels, plain text;
//! - with `log_format = "json"`, wherever it goes: a JSON object a line
//!   (`timestamp`, `level`, `message` and the event's fields), for a log
//!   shipper.
//!
//! What is logged: deployd's own lines at `log_level`, the libraries'
//! (etcd's client, gRPC) from warnings; `RUST_LOG`, when set, replaces
//! both with its directives (`deployd=debug,h2=warn`, as `EnvFilter`
//! reads them).

use std::ffi::OsStr;
use std::io::IsTerminal;
use std::os::unix::fs::MetadataExt;

use tracing::level_filters::LevelFilter;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::registry::LookupSpan;

/// Sets the log up for the process, at `level`, as JSON lines with `json`.
/// Returns what was wrong with `RUST_LOG`, if it could not be used (the
/// level is used then).
pub fn init(level: LevelFilter, json: bool) -> Option<String> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    let stderr = std::io::stderr();
    let journal = std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| {
        is_journal(
            std::env::var_os("JOURNAL_STREAM").as_deref(),
            m.dev(),
            m.ino(),
        )
    });
    let (filter, problem) = filter(level, std::env::var("RUST_LOG").ok().as_deref());
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let layer = match (json, journal) {
        (true, _) => layer
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
        (false, true) => layer.with_ansi(false).event_format(Journal::new()).boxed(),
        (false, false) => layer.with_ansi(colours(stderr.is_terminal())).boxed(),
    };
    let s = tracing_subscriber::registry().with(layer.with_filter(filter));
    let _ = tracing::subscriber::set_global_default(s);
    problem
}

/// What is logged: `RUST_LOG`'s directives when set and valid; else
/// deployd's own lines at `level` and the libraries' (etcd's client,
/// gRPC) only from warnings: their debug lines are theirs.
fn filter(level: LevelFilter, rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    let ours = || {
        let directives = format!("{},deployd={level}", level.min(LevelFilter::WARN));
        EnvFilter::builder().parse_lossy(directives)
    };
    match rust_log.map(str::trim).filter(|v| !v.is_empty()) {
        None => (ours(), None),
        Some(v) => match EnvFilter::builder().parse(v) {
            Ok(f) => (f, None),
            Err(e) => (
                ours(),
                Some(format!("RUST_LOG: {e}; log_level {level} used")),
            ),
        },
    }
}

/// Colours only for a person at a terminal (`NO_COLOR`, set to anything but
/// an empty string, turns them off there too: no-color.org).
fn colours(terminal: bool) -> bool {
    terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Whether standard error is the journal's stream: `JOURNAL_STREAM` is
/// `DEVICE:INODE` of the stream systemd connected, and is only believed
/// when standard error is still that stream (a child of a child inherits
/// the variable, not always the stream).
fn is_journal(var: Option<&OsStr>, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = var.and_then(OsStr::to_str).and_then(|v| v.split_once(':')) else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

/// A line for journald: `<PRIORITY>` and the message with its fields.
struct Journal {
    inner: format::Format<format::Full, ()>,
}

impl Journal {
    fn new() -> Journal {
        let inner = format::format()
            .without_time()
            .with_target(false)
            .with_level(false)
            .with_ansi(false);
        Journal { inner }
    }
}

impl<S, N> FormatEvent<S, N> for Journal
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.inner.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(journal: bool) -> String {
        let buf = Buffer::default();
        let out = buf.clone();
        let builder = tracing_subscriber::fmt()
            .with_max_level(Level::DEBUG)
            .with_writer(move || out.clone())
            .with_target(false)
            .with_ansi(false);
        let emit = || {
            tracing::info!(service = %"web", "instance 0 started (pid 42)");
            tracing::warn!("socket activation: fd 4 is not a listening socket; left alone");
            tracing::error!("web: cannot save state: disk full");
            tracing::debug!("probe");
        };
        if journal {
            tracing::subscriber::with_default(builder.event_format(Journal::new()).finish(), emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit);
        }
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn journal_lines_carry_their_priority_and_no_time() {
        assert_eq!(
            logged(true),
            "<6>instance 0 started (pid 42) service=web\n\
             <4>socket activation: fd 4 is not a listening socket; left alone\n\
             <3>web: cannot save state: disk full\n\
             <7>probe\n"
        );
    }

    #[test]
    fn other_lines_have_a_time_and_a_level() {
        let text = logged(false);
        let first = text.lines().next().unwrap();
        // 2026-12-01T23:58:41.547948Z  INFO instance 0 started ...
        let (time, rest) = first.split_once(' ').unwrap();
        assert!(time.ends_with('Z') && time.contains('T'), "{first}");
        assert!(
            rest.trim_start().starts_with("INFO instance 0 started"),
            "{first}"
        );
        assert!(!text.contains('<') && !text.contains('\x1b'), "{text}");
    }

    #[test]
    fn json_lines_are_objects_with_the_fields_flat() {
        let buf = Buffer::default();
        let out = buf.clone();
        let s = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .finish();
        tracing::subscriber::with_default(s, || {
            tracing::warn!(service = %"web", "instance 0 exited (\"oops\")");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["message"], "instance 0 exited (\"oops\")");
        assert_eq!(v["service"], "web");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'), "{v}");
    }

    #[test]
    fn rust_log_replaces_the_level_and_a_bad_one_is_said() {
        let hint = |l, v| {
            let (f, p) = filter(l, v);
            (f.max_level_hint(), p)
        };
        assert_eq!(
            hint(LevelFilter::INFO, None),
            (Some(LevelFilter::INFO), None)
        );
        assert_eq!(
            hint(LevelFilter::DEBUG, Some(" ")),
            (Some(LevelFilter::DEBUG), None)
        );
        assert_eq!(
            hint(LevelFilter::INFO, Some("deployd=trace,h2=warn")),
            (Some(LevelFilter::TRACE), None)
        );
        let (level, problem) = hint(LevelFilter::INFO, Some("deployd=loud"));
        assert_eq!(level, Some(LevelFilter::INFO));
        let problem = problem.unwrap();
        assert!(
            problem.starts_with("RUST_LOG: ") && problem.ends_with("; log_level info used"),
            "{problem}"
        );
    }

    #[test]
    fn the_journal_is_believed_only_for_its_own_stream() {
        let var = |s: &str| Some(OsStr::new(s).to_owned());
        assert!(is_journal(var("64768:123456").as_deref(), 64768, 123456));
        assert!(!is_journal(var("64768:123456").as_deref(), 64768, 999));
        assert!(!is_journal(var("1:123456").as_deref(), 64768, 123456));
        assert!(!is_journal(var("garbage").as_deref(), 0, 0));
        assert!(!is_journal(var("").as_deref(), 0, 0));
        assert!(!is_journal(None, 0, 0));
    }
}
