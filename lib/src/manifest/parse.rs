//! The manifest parser: each line is parsed on its own with nom into a
//! [`Directive`]; a second pass assembles the directives into a [`Manifest`],
//! checking repetitions and the rules that involve two directives. Every
//! problem of every line is collected, so one run of `deploy check` shows them
//! all.
//!
//! Comments: a line whose first non-blank character is `#` is a comment. After
//! a one-word value (`replicas 3  # three`) a `#` also starts a comment; the
//! directives that take the rest of the line (`exec`, `health exec`, `env`,
//! `dir`) take it as written, so a shell command keeps its own `#`.

use std::collections::HashMap;
use std::time::Duration;

use nom::bytes::complete::take_till1;
use nom::character::complete::{digit1, space0, space1};
use nom::combinator::all_consuming;
use nom::{IResult, Parser};

use crate::name::{HostName, ServiceName};

use super::{
    Cidr, Diagnostic, Health, MAX_CONNECTIONS, MAX_CPU, MAX_DURATION, MAX_LINE, MAX_LOG,
    MAX_MEMORY, MAX_PIDS, MAX_REPLICAS, MAX_RETRIES, MAX_SIZE, MIN_HEALTH_INTERVAL, MIN_LOG,
    MIN_MEMORY, MIN_PIDS, Manifest, Proxy, RESERVED_ENV, RestartPolicy, Signal, Strategy,
    UpdateOrder, User, format_duration,
};

/// Every directive of the language, for suggestions and repetition checks.
const DIRECTIVES: [&str; 45] = [
    "exec",
    "dir",
    "env",
    "env_file",
    "user",
    "after",
    "replicas",
    "port",
    "proxy",
    "health",
    "health_interval",
    "health_timeout",
    "health_retries",
    "health_grace",
    "health_deadline",
    "min_healthy",
    "update",
    "update_batch",
    "update_order",
    "update_canary",
    "update_canary_auto",
    "update_pause",
    "update_watch",
    "before_deploy",
    "after_deploy",
    "hook_timeout",
    "liveness",
    "watchdog",
    "auto_rollback",
    "restart",
    "stop_signal",
    "stop_timeout",
    "memory_high",
    "memory_max",
    "cpu_max",
    "pids_max",
    "log_max",
    "log_rate",
    "drain",
    "queue_timeout",
    "response_timeout",
    "access_log",
    "max_connections",
    "trusted_proxies",
    "hosts",
];

/// Parses a manifest. On error, returns every diagnostic found, in line order.
pub fn parse(src: &[u8]) -> Result<Manifest, Vec<Diagnostic>> {
    if src.len() > MAX_SIZE {
        return Err(vec![super::too_large(src.len())]);
    }
    let mut b = Builder::default();
    for (lineno, raw) in raw_lines(src) {
        if raw.len() > MAX_LINE {
            b.error(
                lineno,
                1,
                format!("line is {} bytes long; the limit is {MAX_LINE}", raw.len()),
            );
            continue;
        }
        let line = match utf8_line(raw) {
            Ok(line) => line,
            Err(col) => {
                b.error(lineno, col, "invalid UTF-8".into());
                continue;
            }
        };
        if let Some((col, message)) = control_char(line) {
            b.error(lineno, col, message);
            continue;
        }
        match parse_line(line) {
            Ok(None) => {}
            Ok(Some(parsed)) => b.add(lineno, parsed),
            Err(err) => {
                if err.directive == Some("exec") {
                    b.exec_attempted = true;
                }
                b.error(lineno, err.col, err.message)
            }
        }
    }
    b.finish()
}

/// A directive as written on one line.
#[derive(Debug)]
enum Directive {
    Exec(String),
    Dir(String),
    Env(String, String),
    EnvFile(String),
    User(User),
    After(ServiceName),
    Replicas(u32),
    Port(u16),
    Proxy(Proxy),
    Health(Health),
    Liveness(Health),
    BeforeDeploy(String),
    AfterDeploy(String),
    Duration(&'static str, Duration),
    HealthRetries(u32),
    Update(Strategy),
    /// A number of instances, or a percentage of `replicas` (`25%`).
    UpdateBatch(Batch),
    UpdateOrder(UpdateOrder),
    UpdateCanary(u32),
    AutoRollback(bool),
    AccessLog(bool),
    Restart(RestartPolicy),
    StopSignal(Signal),
    MemoryHigh(u64),
    MemoryMax(u64),
    CpuMax(u32),
    PidsMax(u32),
    LogMax(u64),
    LogRate(u64),
    MaxConnections(u32),
    TrustedProxies(Vec<Cidr>),
    Hosts(Vec<HostName>),
}

/// A parsed line: the directive's canonical name, its column, the column of
/// its value, and the value.
struct Parsed {
    name: &'static str,
    col: usize,
    value_col: usize,
    directive: Directive,
}

/// An error on one line, before the line number is attached.
struct LineError {
    col: usize,
    message: String,
    /// The directive, when the line named a known one.
    directive: Option<&'static str>,
}

/// The lines of a text file, numbered from 1, without their `\n` or
/// `\r\n` and without the byte-order mark some Windows editors put first:
/// a file saved by Notepad reads as the same text as one saved by vi.
pub(crate) fn raw_lines(src: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    let src = src.strip_prefix("\u{feff}".as_bytes()).unwrap_or(src);
    src.split(|&c| c == b'\n')
        .map(|raw| raw.strip_suffix(b"\r").unwrap_or(raw))
        .zip(1..)
        .map(|(raw, lineno)| (lineno, raw))
}

/// A line as text, or the column (1-based, in characters) of its first
/// byte that is not UTF-8.
pub(crate) fn utf8_line(raw: &[u8]) -> Result<&str, usize> {
    std::str::from_utf8(raw).map_err(|e| {
        String::from_utf8_lossy(&raw[..e.valid_up_to()])
            .chars()
            .count()
            + 1
    })
}

/// The first control character of a line other than a tab, as its
/// column and an error: a NUL cannot go into a process's arguments or
/// environment (the instance could never start), and the others (an
/// escape sequence, a carriage return mid-line) would only garble what
/// the line shows in a terminal.
pub(crate) fn control_char(line: &str) -> Option<(usize, String)> {
    let (at, c) = line
        .chars()
        .enumerate()
        .find(|(_, c)| c.is_control() && *c != '\t')?;
    Some((
        at + 1,
        format!("control character U+{:04X} is not allowed", c as u32),
    ))
}

/// The column (1-based, in characters) where `sub`, a slice of `line`, starts.
pub(crate) fn col(line: &str, sub: &str) -> usize {
    let offset = (sub.as_ptr() as usize).saturating_sub(line.as_ptr() as usize);
    line.get(..offset).map_or(1, |p| p.chars().count() + 1)
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// A run of non-blank characters.
fn word(i: &str) -> IResult<&str, &str> {
    take_till1(is_blank).parse(i)
}

/// Leading blanks, then a word.
fn next_word(i: &str) -> IResult<&str, &str> {
    let (i, _) = space0.parse(i)?;
    word(i)
}

fn parse_line(line: &str) -> Result<Option<Parsed>, LineError> {
    let Ok((rest, name)) = next_word(line) else {
        return Ok(None); // blank line
    };
    if name.starts_with('#') {
        return Ok(None);
    }
    let name_col = col(line, name);
    let Some(canonical) = DIRECTIVES.iter().copied().find(|d| *d == name) else {
        return Err(LineError {
            col: name_col,
            message: format!("unknown directive '{name}'{}", suggest(name, &DIRECTIVES)),
            directive: None,
        });
    };
    let value = Value::new(line, rest, canonical, name_col + name.chars().count());
    let directive = parse_value(canonical, &value)?;
    Ok(Some(Parsed {
        name: canonical,
        col: name_col,
        value_col: value.col(),
        directive,
    }))
}

/// The part of a line after the directive's name.
struct Value<'a> {
    line: &'a str,
    /// Everything after the name and its separating blanks.
    text: &'a str,
    name: &'static str,
    /// Column just after the name, where a missing value is reported.
    end_of_name: usize,
}

impl<'a> Value<'a> {
    fn new(line: &'a str, rest: &'a str, name: &'static str, end_of_name: usize) -> Value<'a> {
        let text = match space1::<&str, nom::error::Error<&str>>.parse(rest) {
            Ok((text, _)) => text,
            Err(_) => rest, // empty: the name ends the line
        };
        Value {
            line,
            text,
            name,
            end_of_name,
        }
    }

    fn col(&self) -> usize {
        if self.text.is_empty() {
            self.end_of_name
        } else {
            col(self.line, self.text)
        }
    }

    fn err(&self, at: &str, message: String) -> LineError {
        LineError {
            col: if at.is_empty() {
                self.col()
            } else {
                col(self.line, at)
            },
            message,
            directive: Some(self.name),
        }
    }

    /// The rest of the line as written, without trailing blanks.
    fn rest_of_line(&self, what: &str) -> Result<&'a str, LineError> {
        let text = self.text.trim_end_matches(is_blank);
        if text.is_empty() {
            Err(self.err("", format!("{} needs {what}", self.name)))
        } else {
            Ok(text)
        }
    }

    /// The only word of the value, which may be followed by a comment.
    fn one_word(&self, what: &str) -> Result<&'a str, LineError> {
        let Ok((after, w)) = word(self.text) else {
            return Err(self.err("", format!("{} needs {what}", self.name)));
        };
        if w.starts_with('#') {
            return Err(self.err(w, format!("{} needs {what}", self.name)));
        }
        self.end(after)?;
        Ok(w)
    }

    /// Checks that nothing but blanks and a comment follow.
    fn end(&self, after: &str) -> Result<(), LineError> {
        match next_word(after) {
            Ok((_, extra)) if !extra.starts_with('#') => Err(self.err(
                extra,
                format!("unexpected '{extra}' after the value of {}", self.name),
            )),
            _ => Ok(()),
        }
    }
}

fn parse_value(name: &'static str, v: &Value) -> Result<Directive, LineError> {
    Ok(match name {
        "exec" => Directive::Exec(v.rest_of_line("a command line")?.to_string()),
        "dir" => Directive::Dir(v.rest_of_line("a path")?.to_string()),
        "before_deploy" => Directive::BeforeDeploy(v.rest_of_line("a command line")?.to_string()),
        "after_deploy" => Directive::AfterDeploy(v.rest_of_line("a command line")?.to_string()),
        "env" => {
            let text = v.rest_of_line("KEY=VALUE")?;
            let Some((key, value)) = text.split_once('=') else {
                return Err(v.err(text, format!("env needs KEY=VALUE, got '{text}'")));
            };
            check_env_key(key).map_err(|m| v.err(text, m))?;
            Directive::Env(key.to_string(), value.to_string())
        }
        "env_file" => Directive::EnvFile(v.rest_of_line("a path")?.to_string()),
        "user" => Directive::User(user(v)?),
        "after" => {
            let w = v.one_word("a service (one per line)")?;
            Directive::After(ServiceName::new(w).map_err(|m| v.err(w, format!("after {m}")))?)
        }
        "replicas" => Directive::Replicas(number(v, 1, u64::from(MAX_REPLICAS))? as u32),
        "port" => Directive::Port(number(v, 1, 65535)? as u16),
        "health_retries" => Directive::HealthRetries(number(v, 1, u64::from(MAX_RETRIES))? as u32),
        "update_batch" => Directive::UpdateBatch(batch(v)?),
        "update_canary" => Directive::UpdateCanary(number(v, 1, u64::from(MAX_REPLICAS))? as u32),
        "update_order" => Directive::UpdateOrder(choice(
            v,
            &[
                ("start-first", UpdateOrder::StartFirst),
                ("stop-first", UpdateOrder::StopFirst),
            ],
        )?),
        "proxy" => Directive::Proxy(choice(v, &[("http", Proxy::Http), ("tcp", Proxy::Tcp)])?),
        "update" => Directive::Update(choice(
            v,
            &[
                ("rolling", Strategy::Rolling),
                ("replace", Strategy::Replace),
            ],
        )?),
        "auto_rollback" => Directive::AutoRollback(choice(v, &[("on", true), ("off", false)])?),
        "access_log" => Directive::AccessLog(choice(v, &[("on", true), ("off", false)])?),
        "restart" => Directive::Restart(choice(
            v,
            &[
                ("always", RestartPolicy::Always),
                ("on-failure", RestartPolicy::OnFailure),
                ("never", RestartPolicy::Never),
            ],
        )?),
        "stop_signal" => Directive::StopSignal(signal(v)?),
        "memory_high" => Directive::MemoryHigh(size(v, MIN_MEMORY, MAX_MEMORY)?),
        "memory_max" => Directive::MemoryMax(size(v, MIN_MEMORY, MAX_MEMORY)?),
        "cpu_max" => Directive::CpuMax(cores(v)?),
        "pids_max" => Directive::PidsMax(number(v, MIN_PIDS, MAX_PIDS)? as u32),
        "log_max" => Directive::LogMax(size(v, MIN_LOG, MAX_LOG)?),
        "log_rate" => Directive::LogRate(size(v, MIN_LOG, MAX_LOG)?),
        "health" => Directive::Health(health(v)?),
        "liveness" => match health(v)? {
            h @ (Health::Tcp | Health::Http { .. } | Health::Exec { .. }) => Directive::Liveness(h),
            _ => {
                return Err(v.err(
                    v.text.trim(),
                    "liveness needs one of: http PATH, tcp, exec CMDLINE".into(),
                ));
            }
        },
        "max_connections" => {
            Directive::MaxConnections(number(v, 1, u64::from(MAX_CONNECTIONS))? as u32)
        }
        "trusted_proxies" => Directive::TrustedProxies(cidrs(v)?),
        "hosts" => Directive::Hosts(hosts(v)?),
        _ => Directive::Duration(name, duration(v)?),
    })
}

/// One or more host names, up to a comment; sorted, without duplicates.
fn hosts(v: &Value) -> Result<Vec<HostName>, LineError> {
    let mut out = Vec::new();
    let mut rest = v.text;
    while let Ok((after, w)) = next_word(rest) {
        if w.starts_with('#') {
            break;
        }
        out.push(HostName::new(w).map_err(|m| v.err(w, format!("hosts: {m}")))?);
        rest = after;
    }
    if out.is_empty() {
        return Err(v.err(
            "",
            "hosts needs one or more host names (leave it out for any host)".to_string(),
        ));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// One or more address blocks (`10.0.0.0/8 ::1`), up to a comment;
/// sorted, without duplicates.
fn cidrs(v: &Value) -> Result<Vec<Cidr>, LineError> {
    const WHAT: &str = "one or more addresses or blocks, like 10.0.0.0/8 ::1";
    let mut out = Vec::new();
    let mut rest = v.text;
    while let Ok((after, w)) = next_word(rest) {
        if w.starts_with('#') {
            break;
        }
        let c: Cidr = w
            .parse()
            .map_err(|m| v.err(w, format!("trusted_proxies: {m}")))?;
        out.push(c);
        rest = after;
    }
    if out.is_empty() {
        return Err(v.err("", format!("trusted_proxies needs {WHAT}")));
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// `NAME`, `NAME:GROUP`, `UID` or `UID:GID`.
fn user(v: &Value) -> Result<User, LineError> {
    const WHAT: &str = "a user, or user:group (names or numeric ids)";
    let w = v.one_word(WHAT)?;
    let (user, group) = match w.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (w, None),
    };
    for part in std::iter::once(user).chain(group) {
        check_account_name(part).map_err(|m| v.err(w, format!("user {m}, got '{w}'")))?;
    }
    Ok(User {
        user: user.to_string(),
        group: group.map(str::to_string),
    })
}

/// A user or group name as useradd takes it (letters, digits, `.`, `_`,
/// `-`, not starting with `-`, at most 32), or a numeric id below 2^32 - 1
/// (which is -1, "no change", to the kernel).
fn check_account_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("needs a name or id on each side of ':'".into());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<u32>() {
            Ok(n) if n < u32::MAX => Ok(()),
            _ => Err(format!("ids must be below {}", u32::MAX)),
        };
    }
    let ok = s.len() <= 32
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err("names are letters, digits, '.', '_' and '-', not starting with '-', at most 32".into())
    }
}

/// Where the value of each `directive` line of `src` starts, as (line,
/// column), in line order: for errors found after parsing (a `user` this
/// machine does not have, an `env_file` that does not read).
pub fn position_of(src: &str, directive: &str) -> Vec<(usize, usize)> {
    valid_lines(src)
        .filter(|(_, p)| p.name == directive)
        .map(|(lineno, p)| (lineno, p.value_col))
        .collect()
}

/// Where the value of the `after SERVICE` line of `src` starts, as (line,
/// column): for errors about that service found after parsing.
pub fn position_of_after(src: &str, service: &str) -> Option<(usize, usize)> {
    valid_lines(src).find_map(|(lineno, p)| match p.directive {
        Directive::After(s) if s.as_str() == service => Some((lineno, p.value_col)),
        _ => None,
    })
}

/// The lines of `src` that hold a valid directive, with their numbers.
fn valid_lines(src: &str) -> impl Iterator<Item = (usize, Parsed)> {
    raw_lines(src.as_bytes()).filter_map(|(lineno, raw)| {
        let line = utf8_line(raw).ok()?;
        Some((lineno, parse_line(line).ok()??))
    })
}

fn check_env_key(key: &str) -> Result<(), String> {
    let valid = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "env key '{key}' must be letters, digits and '_', not starting with a digit"
        ));
    }
    if RESERVED_ENV.contains(&key) {
        return Err(format!("env {key} is set by deployd for each instance"));
    }
    Ok(())
}

fn number(v: &Value, min: u64, max: u64) -> Result<u64, LineError> {
    let w = v.one_word("a number")?;
    let digits: IResult<&str, &str> = all_consuming(digit1).parse(w);
    if digits.is_err() {
        return Err(v.err(w, format!("{} needs a number, got '{w}'", v.name)));
    }
    match w.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(v.err(
            w,
            format!("{} must be between {min} and {max}, got {w}", v.name),
        )),
    }
}

/// `cpu_max`: cores, a number with at most two decimals (`0.5`, `1.5`,
/// `2`), in hundredths of a core, between 0.01 and 1024.
fn cores(v: &Value) -> Result<u32, LineError> {
    let w = v.one_word("a number of cores like 0.5, 1.5 or 2")?;
    let (whole, frac) = w.split_once('.').unwrap_or((w, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let ok = digits(whole) && (frac.is_empty() || (digits(frac) && frac.len() <= 2));
    if !ok {
        return Err(v.err(
            w,
            format!("cpu_max needs a number of cores like 0.5, 1.5 or 2, got '{w}'"),
        ));
    }
    let hundredths = whole
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(100))
        .and_then(|n| n.checked_add(format!("{frac:0<2}").parse::<u32>().ok()?));
    match hundredths {
        Some(n) if (1..=MAX_CPU).contains(&n) => Ok(n),
        _ => Err(v.err(
            w,
            format!(
                "cpu_max must be between 0.01 and {} cores, got {w}",
                MAX_CPU / 100
            ),
        )),
    }
}

/// `update_batch`: how many instances a batch replaces.
#[derive(Debug)]
enum Batch {
    Count(u32),
    /// Of `replicas`, rounded up, as Kubernetes rounds `maxSurge`.
    Percent(u32),
}

/// `update_batch N` or `update_batch P%` (1 to 100).
fn batch(v: &Value) -> Result<Batch, LineError> {
    let w = v.one_word("a number")?;
    let Some(digits) = w.strip_suffix('%') else {
        return Ok(Batch::Count(number(v, 1, u64::from(MAX_REPLICAS))? as u32));
    };
    match digits.parse::<u32>() {
        Ok(p) if (1..=100).contains(&p) && digits.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(Batch::Percent(p))
        }
        _ => Err(v.err(
            w,
            format!("update_batch must be a number or a percentage from 1% to 100%, got '{w}'"),
        )),
    }
}

/// A whole number with an optional unit: the value's word and its amount
/// in the base unit (`None` if it overflows). `units` pairs each unit's
/// spelling with its size; a bare number is in units of `bare`.
fn quantity<'a>(
    v: &Value<'a>,
    what: &str,
    units: &[(&str, u64)],
    bare: u64,
) -> Result<(&'a str, Option<u64>), LineError> {
    let w = v.one_word(what)?;
    let split: IResult<&str, &str> = digit1.parse(w);
    let parsed = match split {
        Ok(("", digits)) => Some((digits, bare)),
        Ok((unit, digits)) => units
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, n)| (digits, *n)),
        Err(_) => None,
    };
    let Some((digits, per_unit)) = parsed else {
        return Err(v.err(w, format!("{} needs {what}, got '{w}'", v.name)));
    };
    let amount = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(per_unit));
    Ok((w, amount))
}

/// A duration written as in a manifest (`10`, `10s`, `500ms`, `2m`, `1h`,
/// `1d`; at most a day), for a command-line option named `name`; the error
/// says what was wrong as the manifest's would.
pub fn parse_duration(name: &'static str, text: &str) -> Result<Duration, String> {
    duration(&Value {
        line: text,
        text,
        name,
        end_of_name: 0,
    })
    .map_err(|e| e.message)
}

/// A span of time in the same grammar as [`parse_duration`], with no upper
/// bound (`--since 30d`).
pub fn parse_span(name: &'static str, text: &str) -> Result<Duration, String> {
    let v = Value {
        line: text,
        text,
        name,
        end_of_name: 0,
    };
    match quantity(&v, DURATION_WHAT, &DURATION_UNITS, 1000) {
        Ok((_, Some(ms))) => Ok(Duration::from_millis(ms)),
        Ok((w, None)) => Err(format!("{name}: {w} is too long")),
        Err(e) => Err(e.message),
    }
}

/// The units of a duration, in milliseconds; a bare number is seconds.
const DURATION_UNITS: [(&str, u64); 5] = [
    ("ms", 1),
    ("s", 1000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
];
const DURATION_WHAT: &str = "a duration like 10, 10s, 500ms, 2m, 1h or 1d";

fn duration(v: &Value) -> Result<Duration, LineError> {
    let (w, ms) = quantity(v, DURATION_WHAT, &DURATION_UNITS, 1000)?;
    match ms {
        Some(ms) if ms <= MAX_DURATION.as_millis() as u64 => Ok(Duration::from_millis(ms)),
        _ => Err(v.err(
            w,
            format!(
                "{} must be at most {}, got {w}",
                v.name,
                format_duration(MAX_DURATION)
            ),
        )),
    }
}

/// A size in bytes: a whole number with an optional binary unit, `K`, `M`,
/// `G` or `T` (as systemd's `MemoryMax=` reads them).
fn size(v: &Value, min: u64, max: u64) -> Result<u64, LineError> {
    const UNITS: [(&str, u64); 4] = [
        ("K", 1 << 10),
        ("M", 1 << 20),
        ("G", 1 << 30),
        ("T", 1 << 40),
    ];
    let (w, bytes) = quantity(v, "a size like 512M, 1G or 1536K", &UNITS, 1)?;
    match bytes {
        Some(b) if (min..=max).contains(&b) => Ok(b),
        _ => Err(v.err(
            w,
            format!(
                "{} must be between {} and {}, got {w}",
                v.name,
                super::format_size(min),
                super::format_size(max)
            ),
        )),
    }
}

fn choice<T: Copy>(v: &Value, options: &[(&'static str, T)]) -> Result<T, LineError> {
    let names: Vec<&str> = options.iter().map(|(n, _)| *n).collect();
    let expected = one_of(&names);
    let w = v.one_word(&expected)?;
    match options.iter().find(|(n, _)| *n == w) {
        Some((_, t)) => Ok(*t),
        None => Err(v.err(
            w,
            format!(
                "{} must be {expected}, got '{w}'{}",
                v.name,
                suggest(w, &names)
            ),
        )),
    }
}

fn signal(v: &Value) -> Result<Signal, LineError> {
    let names: Vec<&str> = Signal::ALL.iter().map(|(_, n)| *n).collect();
    let expected = one_of(&names);
    let w = v.one_word(&expected)?;
    Signal::from_name(w).ok_or_else(|| {
        let bare = w.strip_prefix("SIG").unwrap_or(w);
        v.err(
            w,
            format!(
                "unknown stop_signal '{w}'{}; expected {expected}",
                suggest(bare, &names)
            ),
        )
    })
}

fn health(v: &Value) -> Result<Health, LineError> {
    const WHAT: &str = "one of: http PATH, tcp, exec CMDLINE, notify, none";
    let Ok((after, kind)) = word(v.text) else {
        return Err(v.err("", format!("health needs {WHAT}")));
    };
    match kind {
        "none" | "tcp" | "notify" => {
            v.end(after)?;
            Ok(match kind {
                "none" => Health::None,
                "notify" => Health::Notify,
                _ => Health::Tcp,
            })
        }
        "http" => {
            let Ok((after_path, path)) = next_word(after) else {
                return Err(v.err(
                    "",
                    "health http needs a path, e.g. health http /healthz".into(),
                ));
            };
            if !path.starts_with('/') {
                return Err(v.err(
                    path,
                    format!("health http path must start with '/', got '{path}'"),
                ));
            }
            v.end(after_path)?;
            Ok(Health::Http {
                path: path.to_string(),
            })
        }
        "exec" => {
            let command = after.trim_matches(is_blank);
            if command.is_empty() {
                return Err(v.err(kind, "health exec needs a command line".into()));
            }
            Ok(Health::Exec {
                command: command.to_string(),
            })
        }
        other => Err(v.err(
            other,
            format!(
                "unknown health check '{other}'{}; expected {WHAT}",
                suggest(other, &["http", "tcp", "exec", "notify", "none"])
            ),
        )),
    }
}

/// "'a', 'b' or 'c'"
fn one_of(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => format!("'{one}'"),
        [init @ .., last] => {
            let init: Vec<String> = init.iter().map(|n| format!("'{n}'")).collect();
            format!("{} or '{last}'", init.join(", "))
        }
    }
}

/// " (did you mean 'x'?)" when a known word is close to `word`.
fn suggest(word: &str, known: &[&str]) -> String {
    crate::suggest::did_you_mean(word, known.iter().copied())
}

/// Assembles directives into a manifest and checks the rules across lines.
#[derive(Default)]
struct Builder {
    exec: Option<String>,
    /// An exec line was there but had an error of its own.
    exec_attempted: bool,
    m: Option<Manifest>,
    /// First line and value column of each directive seen (env: of each key).
    seen: HashMap<String, (usize, usize)>,
    health: Option<Health>,
    proxy: Option<Proxy>,
    /// `update_batch P%`, resolved once `replicas` is known.
    batch_percent: Option<u32>,
    errors: Vec<Diagnostic>,
}

impl Builder {
    fn error(&mut self, line: usize, col: usize, message: String) {
        self.errors.push(Diagnostic { line, col, message });
    }

    fn manifest(&mut self) -> &mut Manifest {
        self.m.get_or_insert_with(|| Manifest::new(String::new()))
    }

    fn add(&mut self, line: usize, p: Parsed) {
        let key = match &p.directive {
            Directive::Env(k, _) => format!("env {k}"),
            Directive::EnvFile(f) => format!("env_file {f}"),
            Directive::After(s) => format!("after {s}"),
            _ => p.name.to_string(),
        };
        if let Some((first, _)) = self.seen.get(&key) {
            let message = format!("{key} given twice (first on line {first})");
            self.error(line, p.col, message);
            return;
        }
        self.seen.insert(key, (line, p.value_col));
        let m = self.manifest();
        match p.directive {
            Directive::Exec(s) => self.exec = Some(s),
            Directive::Dir(s) => m.dir = Some(s),
            Directive::Env(k, v) => m.env.push((k, v)),
            Directive::EnvFile(f) => m.env_files.push(f),
            Directive::User(u) => m.user = Some(u),
            Directive::After(s) => m.after.push(s),
            Directive::Replicas(n) => m.replicas = n,
            Directive::Port(n) => m.port = Some(n),
            Directive::Proxy(x) => self.proxy = Some(x),
            Directive::Health(h) => self.health = Some(h),
            Directive::Liveness(h) => m.liveness = Some(h),
            Directive::HealthRetries(n) => m.health_retries = n,
            Directive::Update(s) => m.update = s,
            Directive::UpdateBatch(Batch::Count(n)) => m.update_batch = n,
            Directive::UpdateBatch(Batch::Percent(p)) => self.batch_percent = Some(p),
            Directive::UpdateOrder(o) => m.update_order = o,
            Directive::UpdateCanary(n) => m.update_canary = n,
            Directive::AutoRollback(b) => m.auto_rollback = b,
            Directive::AccessLog(b) => m.access_log = b,
            Directive::Restart(r) => m.restart = r,
            Directive::StopSignal(s) => m.stop_signal = s,
            Directive::MemoryHigh(n) => m.memory_high = Some(n),
            Directive::MemoryMax(n) => m.memory_max = Some(n),
            Directive::CpuMax(n) => m.cpu_max = Some(n),
            Directive::PidsMax(n) => m.pids_max = Some(n),
            Directive::LogMax(n) => m.log_max = n,
            Directive::LogRate(n) => m.log_rate = n,
            Directive::MaxConnections(n) => m.max_connections = Some(n),
            Directive::TrustedProxies(c) => m.trusted_proxies = c,
            Directive::BeforeDeploy(c) => m.before_deploy = Some(c),
            Directive::AfterDeploy(c) => m.after_deploy = Some(c),
            Directive::Hosts(h) => m.hosts = h,
            Directive::Duration(name, d) => {
                let field = match name {
                    "health_interval" => &mut m.health_interval,
                    "health_timeout" => &mut m.health_timeout,
                    "health_grace" => &mut m.health_grace,
                    "health_deadline" => &mut m.health_deadline,
                    "min_healthy" => &mut m.min_healthy,
                    "update_pause" => &mut m.update_pause,
                    "update_canary_auto" => &mut m.update_canary_auto,
                    "update_watch" => &mut m.update_watch,
                    "hook_timeout" => &mut m.hook_timeout,
                    "watchdog" => &mut m.watchdog,
                    "stop_timeout" => &mut m.stop_timeout,
                    "drain" => &mut m.drain,
                    "response_timeout" => {
                        m.response_timeout = Some(d);
                        return;
                    }
                    _ => &mut m.queue_timeout,
                };
                *field = d;
            }
        }
    }

    /// Where a directive's value was, for errors that involve two directives.
    fn at(&self, name: &str) -> Option<(usize, usize)> {
        self.seen.get(name).copied()
    }

    fn finish(mut self) -> Result<Manifest, Vec<Diagnostic>> {
        let mut m = self
            .m
            .take()
            .unwrap_or_else(|| Manifest::new(String::new()));
        match self.exec.take() {
            Some(exec) => m.exec = exec,
            None if self.exec_attempted => {}
            None => self.error(
                1,
                1,
                "missing exec: every manifest needs an exec line".into(),
            ),
        }
        m.health = self
            .health
            .take()
            .unwrap_or_else(|| Health::default_for(m.port));
        m.proxy = self.proxy.unwrap_or_else(|| Proxy::default_for(&m.health));
        m.env.sort();
        m.after.sort();

        if let Some(p) = self.batch_percent {
            m.update_batch = (m.replicas * p).div_ceil(100).max(1);
        }
        if m.update_batch > m.replicas {
            if let Some((line, col)) = self.at("update_batch") {
                let message = format!(
                    "update_batch must be at most replicas ({}), got {}",
                    m.replicas, m.update_batch
                );
                self.error(line, col, message);
            }
        }
        for name in ["health_timeout", "health_deadline", "response_timeout"] {
            let zero = match name {
                "health_timeout" => m.health_timeout.is_zero(),
                "health_deadline" => m.health_deadline.is_zero(),
                _ => m.response_timeout.is_some_and(|d| d.is_zero()),
            };
            if let (true, Some((line, col))) = (zero, self.at(name)) {
                self.error(line, col, format!("{name} must be longer than 0"));
            }
        }
        if !m.health_deadline.is_zero() && m.min_healthy >= m.health_deadline {
            if let Some((line, col)) = self.at("min_healthy").or(self.at("health_deadline")) {
                let message = format!(
                    "min_healthy ({}) must be shorter than health_deadline ({})",
                    format_duration(m.min_healthy),
                    format_duration(m.health_deadline)
                );
                self.error(line, col, message);
            }
        }
        if m.health_interval < MIN_HEALTH_INTERVAL {
            if let Some((line, col)) = self.at("health_interval") {
                let message = format!(
                    "health_interval must be at least {}, got {}",
                    format_duration(MIN_HEALTH_INTERVAL),
                    format_duration(m.health_interval)
                );
                self.error(line, col, message);
            }
        }
        if m.port.is_none() {
            if let Some((line, col)) = self.at("proxy") {
                self.error(line, col, "proxy needs a port to serve".into());
            }
        }
        if m.update_canary > 0 {
            if let Some((line, col)) = self.at("update_canary") {
                if m.update == Strategy::Replace {
                    let message = "update_canary is for update rolling (replace replaces \
                                   every instance at once)";
                    self.error(line, col, message.into());
                } else if m.update_canary > m.replicas {
                    let message = format!(
                        "update_canary must be at most replicas ({}), got {}",
                        m.replicas, m.update_canary
                    );
                    self.error(line, col, message);
                }
            }
        }
        if m.health != Health::Notify {
            for name in ["liveness", "watchdog"] {
                if let Some((line, col)) = self.at(name) {
                    let message = format!(
                        "{name} is for health notify (the program says it is ready; {name} says it is still alive)"
                    );
                    self.error(line, col, message);
                }
            }
        }
        if m.hook_timeout.is_zero() {
            if let Some((line, col)) = self.at("hook_timeout") {
                self.error(line, col, "hook_timeout must be more than 0".into());
            }
        }
        if !m.update_canary_auto.is_zero() && m.update_canary == 0 {
            if let Some((line, col)) = self.at("update_canary_auto") {
                let message = "update_canary_auto needs update_canary N (the canaries it \
                               promotes)";
                self.error(line, col, message.into());
            }
        }
        if m.update_order != UpdateOrder::StartFirst && m.update == Strategy::Replace {
            if let Some((line, col)) = self.at("update_order") {
                let message = "update_order is for update rolling (replace stops every old \
                               instance first)";
                self.error(line, col, message.into());
            }
        }
        let http = m.port.is_some() && m.proxy == Proxy::Http;
        if m.response_timeout.is_some() && !http {
            if let Some((line, col)) = self.at("response_timeout") {
                let message = "response_timeout is for a port with proxy http (a tcp \
                               connection has no response to wait for)";
                self.error(line, col, message.into());
            }
        }
        if m.max_connections.is_some() && m.port.is_none() {
            if let Some((line, col)) = self.at("max_connections") {
                let message = "max_connections needs a port (it limits the port's connections)";
                self.error(line, col, message.into());
            }
        }
        if !m.trusted_proxies.is_empty() && !http {
            if let Some((line, col)) = self.at("trusted_proxies") {
                let message = "trusted_proxies is for a port with proxy http (it says whose \
                               X-Forwarded-For to keep)";
                self.error(line, col, message.into());
            }
        }
        if m.access_log && m.port.is_none() {
            if let Some((line, col)) = self.at("access_log") {
                let message = "access_log needs a port (it logs what deployd routes)";
                self.error(line, col, message.into());
            }
        }
        if self.errors.is_empty() {
            Ok(m)
        } else {
            self.errors.sort_by_key(|d| (d.line, d.col));
            Err(self.errors)
        }
    }
}
