//! The language of the namespace's `ctl` files.
//!
//! A write to `/deploy/active/SERVICE/ctl` is one line: a verb and its
//! arguments (`rollback 3f2a9c1e04b7`). A write to `/deploy/ctl` names the
//! service first (`apply web`). Verbs and argument counts come from one table,
//! [`COMMANDS`]; the two errors are the Plan 9 ones, an unknown control
//! message and a bad number of arguments.

use std::fmt;

use nom::bytes::complete::take_till1;
use nom::character::complete::space0;
use nom::multi::many0;
use nom::sequence::preceded;
use nom::{IResult, Parser};

use crate::manifest::{Signal, VersionPrefix};
use crate::name::ServiceName;

/// Longest accepted control message, in bytes.
pub const MAX_MESSAGE: usize = 1024;

/// What a ctl write asks of a service.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Verb {
    /// Roll out the service's manifest from the manifests directory.
    Apply,
    /// Hold the rollout after the batch in flight.
    Pause,
    /// Go on with a paused rollout.
    Resume,
    /// Go on with a rollout held at its canary.
    Promote,
    /// Say what `apply` of the service's manifest would do, doing nothing.
    Plan,
    /// Roll back to the previous version, or to the given one from history.
    Rollback(Option<VersionPrefix>),
    /// Replace every instance with a fresh process of the same version, or
    /// only the instance numbered so (as in `instances/N`).
    Restart(Option<u32>),
    /// Stop every instance; the service stays known, and stopped.
    Stop,
    /// Start a stopped service again.
    Start,
    /// Stop every instance and forget the service.
    Remove,
    /// Send a signal to every running instance's processes, or to one
    /// instance's.
    Signal(Signal, Option<u32>),
}

/// One row of the command table: the verb, how many arguments it takes
/// after the service (at least, at most), and how it builds its [`Verb`]
/// from them (once their number is checked).
pub struct CommandSpec {
    /// The verb as written.
    pub name: &'static str,
    /// Fewest arguments.
    pub min_args: usize,
    /// Most arguments.
    pub max_args: usize,
    /// Arguments, for usage text.
    pub usage: &'static str,
    /// Builds the verb from its arguments.
    pub build: fn(&[&str]) -> Result<Verb, CtlError>,
}

/// Every verb.
pub const COMMANDS: [CommandSpec; 11] = [
    CommandSpec {
        name: "apply",
        min_args: 0,
        max_args: 0,
        usage: "",
        build: |_| Ok(Verb::Apply),
    },
    CommandSpec {
        name: "pause",
        min_args: 0,
        max_args: 0,
        usage: "",
        build: |_| Ok(Verb::Pause),
    },
    CommandSpec {
        name: "resume",
        min_args: 0,
        max_args: 0,
        usage: "",
        build: |_| Ok(Verb::Resume),
    },
    CommandSpec {
        name: "promote",
        min_args: 0,
        max_args: 0,
        usage: "",
        build: |_| Ok(Verb::Promote),
    },
    CommandSpec {
        name: "plan",
        min_args: 0,
        max_args: 0,
        usage: "",
        build: |_| Ok(Verb::Plan),
    },
    CommandSpec {
        name: "rollback",
        min_args: 0,
        max_args: 1,
        usage: " [VERSION]",
        build: |args| {
            let version = args.first().map(|v| v.parse()).transpose();
            Ok(Verb::Rollback(version.map_err(CtlError::Version)?))
        },
    },
    CommandSpec {
        name: "restart",
        min_args: 0,
        max_args: 1,
        usage: " [INSTANCE]",
        build: |args| {
            Ok(Verb::Restart(
                args.first().map(|n| instance_number(n)).transpose()?,
            ))
        },
    },
    CommandSpec {
        name: "stop",
        min_args: 0,
        max_args: 0,
        usage: "",
        build: |_| Ok(Verb::Stop),
    },
    CommandSpec {
        name: "start",
        min_args: 0,
        max_args: 0,
        usage: "",
        build: |_| Ok(Verb::Start),
    },
    CommandSpec {
        name: "remove",
        min_args: 0,
        max_args: 0,
        usage: "",
        build: |_| Ok(Verb::Remove),
    },
    CommandSpec {
        name: "signal",
        min_args: 1,
        max_args: 2,
        usage: " SIG [INSTANCE]",
        build: |args| {
            let (sig, rest) = args.split_first().ok_or(CtlError::Empty)?;
            let signal = Signal::from_name(&sig.to_ascii_uppercase())
                .ok_or_else(|| CtlError::UnknownSignal(shown(sig)))?;
            let instance = rest.first().map(|n| instance_number(n)).transpose()?;
            Ok(Verb::Signal(signal, instance))
        },
    },
];

impl Verb {
    /// Whether the caller must load the service's manifest for it.
    pub fn needs_manifest(&self) -> bool {
        matches!(self, Verb::Apply | Verb::Plan)
    }

    /// The verb as written in a ctl file.
    pub fn name(&self) -> &'static str {
        match self {
            Verb::Apply => "apply",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Promote => "promote",
            Verb::Plan => "plan",
            Verb::Rollback(_) => "rollback",
            Verb::Restart(_) => "restart",
            Verb::Stop => "stop",
            Verb::Start => "start",
            Verb::Remove => "remove",
            Verb::Signal(..) => "signal",
        }
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verb::Rollback(Some(v)) => write!(f, "rollback {v}"),
            Verb::Restart(Some(n)) => write!(f, "restart {n}"),
            Verb::Signal(s, None) => write!(f, "signal {}", s.name()),
            Verb::Signal(s, Some(n)) => write!(f, "signal {} {n}", s.name()),
            other => f.write_str(other.name()),
        }
    }
}

/// Why a control message was not understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtlError {
    /// Longer than [`MAX_MESSAGE`].
    TooLong,
    /// Not UTF-8.
    NotUtf8,
    /// More than one line.
    SeveralLines,
    /// Something that is not a word.
    NotWords,
    /// Nothing but blanks (of a service's ctl file).
    Empty,
    /// Nothing but blanks (of an instance's ctl file).
    EmptyInstance,
    /// A verb no row has (shown), and one close to it if any.
    Unknown(String, String),
    /// A verb of an instance's ctl file that is not one (shown).
    UnknownInstance(String),
    /// A verb with the wrong number of arguments: what it takes, in words.
    Args {
        /// The verb and its usage.
        command: String,
        /// What it takes.
        takes: String,
        /// How many it got.
        got: usize,
    },
    /// An instance's verb with arguments it does not take.
    InstanceArgs(usize),
    /// A root command without its service.
    NoService(&'static CommandSpec),
    /// `reexec` with arguments.
    ReExecArgs(usize),
    /// A service name that is not one.
    Service(String),
    /// A version that is not one.
    Version(String),
    /// An instance number that is not one (shown).
    Instance(String),
    /// A signal that is not one (shown).
    UnknownSignal(String),
    /// Not a command of a host's ctl file (shown).
    UnknownHost(String),
}

impl fmt::Debug for CommandSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

impl PartialEq for CommandSpec {
    fn eq(&self, other: &CommandSpec) -> bool {
        self.name == other.name
    }
}

impl Eq for CommandSpec {}

impl fmt::Display for CtlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CtlError::TooLong => write!(
                f,
                "control message is longer than the limit of {MAX_MESSAGE} bytes"
            ),
            CtlError::NotUtf8 => f.write_str("control message is not UTF-8"),
            CtlError::SeveralLines => f.write_str("one command per write"),
            CtlError::NotWords => f.write_str("control message has characters that are not words"),
            CtlError::Empty => write!(f, "empty control message; commands: {}", usage()),
            CtlError::EmptyInstance => {
                write!(f, "empty control message; commands: {}", instance_usage())
            }
            CtlError::Unknown(verb, close) => write!(
                f,
                "unknown control message '{verb}'{close}; commands: {}",
                usage()
            ),
            CtlError::UnknownInstance(verb) => write!(
                f,
                "unknown control message '{verb}'; commands: {}",
                instance_usage()
            ),
            CtlError::Args {
                command,
                takes,
                got,
            } => write!(
                f,
                "bad # args to command: {command} takes {takes}, got {got}"
            ),
            CtlError::InstanceArgs(n) => write!(
                f,
                "bad # args to command: an instance's ctl takes {}, got {n} argument{}",
                instance_usage(),
                if *n == 1 { "" } else { "s" }
            ),
            CtlError::NoService(spec) => write!(
                f,
                "bad # args to command: {} needs a service: {} SERVICE{}",
                spec.name, spec.name, spec.usage
            ),
            CtlError::ReExecArgs(n) => write!(
                f,
                "bad # args to command: reexec takes no arguments, got {n}"
            ),
            CtlError::Service(e) | CtlError::Version(e) => f.write_str(e),
            CtlError::Instance(word) => {
                write!(f, "'{word}' is not an instance number (as in instances/N)")
            }
            CtlError::UnknownHost(verb) => write!(
                f,
                "unknown control message '{verb}'; commands: {}",
                host_usage()
            ),
            CtlError::UnknownSignal(sig) => {
                let names: Vec<&str> = Signal::ALL.iter().map(|(_, n)| *n).collect();
                write!(f, "unknown signal '{sig}'; signals: {}", names.join(", "))
            }
        }
    }
}

impl std::error::Error for CtlError {}

/// The commands of a host's ctl file (`/deploy/hosts/HOST/ctl`).
pub fn host_usage() -> String {
    "drain | undrain".to_string()
}

/// Parses a write to a host's ctl file: `drain` (true) or `undrain`.
pub fn parse_host(msg: &[u8]) -> Result<bool, CtlError> {
    let words = words(msg)?;
    match words.as_slice() {
        ["drain"] => Ok(true),
        ["undrain"] => Ok(false),
        [] => Err(CtlError::UnknownHost(String::new())),
        [verb, ..] if matches!(*verb, "drain" | "undrain") => Err(CtlError::Args {
            command: verb.to_string(),
            takes: "no arguments".into(),
            got: words.len() - 1,
        }),
        [verb, ..] => Err(CtlError::UnknownHost(shown(verb))),
    }
}

/// One line of usage per verb, for a service's ctl file.
pub fn usage() -> String {
    COMMANDS
        .iter()
        .map(|c| format!("{}{}", c.name, c.usage))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// Parses a write to a service's `ctl` file.
pub fn parse_service(msg: &[u8]) -> Result<Verb, CtlError> {
    let words = words(msg)?;
    let (verb, args) = words.split_first().ok_or(CtlError::Empty)?;
    verb_with_args(verb, args)
}

/// The commands of an instance's `ctl` file: the service's commands that
/// name an instance, without the number.
pub const INSTANCE_COMMANDS: [&str; 2] = ["restart", "signal SIG"];

/// The instance `ctl` file's commands, for reading it.
pub fn instance_usage() -> String {
    INSTANCE_COMMANDS.join(" | ")
}

/// Parses a write to `instances/N/ctl`: `restart` or `signal SIG`, as the
/// service's `restart N` and `signal SIG N`.
pub fn parse_instance(msg: &[u8], number: u32) -> Result<Verb, CtlError> {
    let words = words(msg)?;
    let Some((verb, args)) = words.split_first() else {
        return Err(CtlError::EmptyInstance);
    };
    let n = number.to_string();
    match (*verb, args) {
        ("restart", []) | ("signal", [_]) => {
            let mut args = args.to_vec();
            args.push(&n);
            verb_with_args(verb, &args)
        }
        ("restart", _) | ("signal", _) => Err(CtlError::InstanceArgs(args.len())),
        _ => Err(CtlError::UnknownInstance(shown(verb))),
    }
}

/// What a write to the root `ctl` file asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCommand {
    /// `VERB SERVICE [ARGS]`: a service's command.
    One(ServiceName, Verb),
    /// `apply` alone: roll out every manifest of the manifests directory.
    ApplyAll,
    /// `reexec`: deployd replaces itself with its binary (an upgrade),
    /// keeping every instance running and every port open.
    ReExec,
}

/// Parses a write to the root `ctl` file: `VERB SERVICE [ARGS]`, or `apply`
/// alone.
pub fn parse_root(msg: &[u8]) -> Result<RootCommand, CtlError> {
    let words = words(msg)?;
    let (verb, rest) = words.split_first().ok_or(CtlError::Empty)?;
    if *verb == "reexec" {
        if !rest.is_empty() {
            return Err(CtlError::ReExecArgs(rest.len()));
        }
        return Ok(RootCommand::ReExec);
    }
    let spec = spec(verb)?;
    let Some((service, args)) = rest.split_first() else {
        if spec.name == "apply" {
            return Ok(RootCommand::ApplyAll);
        }
        return Err(CtlError::NoService(spec));
    };
    let service = ServiceName::new(service).map_err(CtlError::Service)?;
    Ok(RootCommand::One(service, verb_with_args(verb, args)?))
}

/// The root `ctl` file's commands, for reading it.
pub fn root_usage() -> String {
    let each = COMMANDS
        .iter()
        .map(|c| format!("{} SERVICE{}", c.name, c.usage));
    std::iter::once("apply (every manifest)".to_string())
        .chain(each)
        .chain(std::iter::once("reexec".to_string()))
        .collect::<Vec<_>>()
        .join(" | ")
}

fn spec(verb: &str) -> Result<&'static CommandSpec, CtlError> {
    COMMANDS.iter().find(|c| c.name == verb).ok_or_else(|| {
        let close = crate::suggest::did_you_mean(verb, COMMANDS.iter().map(|c| c.name));
        CtlError::Unknown(shown(verb), close)
    })
}

/// The verb of the row named `verb`, built from `args` once their number
/// is checked against the row.
fn verb_with_args(verb: &str, args: &[&str]) -> Result<Verb, CtlError> {
    let spec = spec(verb)?;
    if args.len() < spec.min_args || args.len() > spec.max_args {
        let takes = match (spec.min_args, spec.max_args) {
            (_, 0) => "no arguments".to_string(),
            (0, 1) => "at most one argument".to_string(),
            (0, n) => format!("at most {n} arguments"),
            (1, 2) => "one or two arguments".to_string(),
            (lo, hi) => format!("{lo} to {hi} arguments"),
        };
        return Err(CtlError::Args {
            command: format!("{}{}", spec.name, spec.usage),
            takes,
            got: args.len(),
        });
    }
    (spec.build)(args)
}

/// An instance number as in `instances/N`: digits only, no sign, no
/// leading zero.
fn instance_number(word: &str) -> Result<u32, CtlError> {
    let canonical =
        word.bytes().all(|b| b.is_ascii_digit()) && !(word.len() > 1 && word.starts_with('0'));
    match word.parse::<u32>() {
        Ok(n) if canonical => Ok(n),
        _ => Err(CtlError::Instance(shown(word))),
    }
}

/// A word of a refused message as its error quotes it: at most 40
/// characters, escaped.
fn shown(word: &str) -> String {
    let head: String = word.chars().take(40).collect();
    head.escape_debug().to_string()
}

fn word(i: &str) -> IResult<&str, &str> {
    preceded(space0, take_till1(|c: char| c == ' ' || c == '\t')).parse(i)
}

/// Splits a one-line message into words. A trailing newline is allowed.
fn words(msg: &[u8]) -> Result<Vec<&str>, CtlError> {
    if msg.len() > MAX_MESSAGE {
        // Not its size: the kernel hands a long write(2) to the namespace
        // in pieces, and this sees only the first.
        return Err(CtlError::TooLong);
    }
    let text = std::str::from_utf8(msg).map_err(|_| CtlError::NotUtf8)?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.contains('\n') {
        return Err(CtlError::SeveralLines);
    }
    let parsed: IResult<&str, Vec<&str>> = many0(word).parse(text);
    match parsed {
        Ok((rest, words)) if rest.trim().is_empty() => Ok(words),
        _ => Err(CtlError::NotWords),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reason a message is refused with.
    fn why<T: fmt::Debug>(parsed: Result<T, CtlError>) -> String {
        parsed.unwrap_err().to_string()
    }

    /// Each row builds the verb it names: none can build another (a typo
    /// in a row cannot become `remove`).
    #[test]
    fn each_row_builds_its_own_verb() {
        for row in &COMMANDS {
            let args: Vec<&str> = match row.name {
                "signal" => vec!["HUP"],
                _ => Vec::new(),
            };
            let verb = (row.build)(&args).unwrap();
            assert_eq!(verb.name(), row.name);
            assert!(verb_with_args(row.name, &args).is_ok());
        }
        let names: Vec<&str> = COMMANDS.iter().map(|c| c.name).collect();
        let mut unique = names.clone();
        unique.sort_unstable();
        unique.dedup();
        unique.sort_by_key(|n| names.iter().position(|m| m == n));
        assert_eq!(names, unique);
    }

    #[test]
    fn every_verb_parses() {
        for (text, verb) in [
            ("apply\n", Verb::Apply),
            ("pause", Verb::Pause),
            ("  resume  \n", Verb::Resume),
            ("promote\n", Verb::Promote),
            ("plan\n", Verb::Plan),
            ("rollback\n", Verb::Rollback(None)),
            ("restart\r\n", Verb::Restart(None)),
            ("restart 2\n", Verb::Restart(Some(2))),
            ("stop", Verb::Stop),
            ("start", Verb::Start),
            ("remove", Verb::Remove),
            ("signal HUP", Verb::Signal(Signal::Hup, None)),
            ("signal sigusr1 2\n", Verb::Signal(Signal::Usr1, Some(2))),
            ("signal SIGTERM", Verb::Signal(Signal::Term, None)),
        ] {
            assert_eq!(parse_service(text.as_bytes()), Ok(verb));
        }
        for v in ["0123456789ab", "0123"] {
            let p: VersionPrefix = v.parse().unwrap();
            let text = format!("rollback {v}\n");
            assert_eq!(
                parse_service(text.as_bytes()),
                Ok(Verb::Rollback(Some(p.clone())))
            );
            assert_eq!(Verb::Rollback(Some(p)).to_string(), format!("rollback {v}"));
        }
    }

    #[test]
    fn root_ctl_names_the_service_first() {
        let web = ServiceName::new("web").unwrap();
        assert_eq!(
            parse_root(b"apply web\n").unwrap(),
            RootCommand::One(web, Verb::Apply)
        );
        let RootCommand::One(s, v) = parse_root(b"rollback api 0123456789ab").unwrap() else {
            panic!("one service");
        };
        assert_eq!(s.as_str(), "api");
        assert!(matches!(v, Verb::Rollback(Some(_))));
        assert_eq!(parse_root(b"apply\n").unwrap(), RootCommand::ApplyAll);
        assert_eq!(parse_root(b" apply \n").unwrap(), RootCommand::ApplyAll);
        assert_eq!(parse_root(b"reexec\n").unwrap(), RootCommand::ReExec);
        assert!(why(parse_root(b"reexec now\n")).contains("reexec takes no arguments"));
        assert_eq!(
            why(parse_root(b"pause\n")),
            "bad # args to command: pause needs a service: pause SERVICE"
        );
        assert!(root_usage().starts_with("apply (every manifest) | apply SERVICE | pause SERVICE"));
        assert!(why(parse_root(b"apply ../etc\n")).contains("is not a service name"));
    }

    #[test]
    fn an_instance_ctl_names_its_instance() {
        assert_eq!(parse_instance(b"restart\n", 3), Ok(Verb::Restart(Some(3))));
        assert_eq!(
            parse_instance(b"signal hup", 0),
            Ok(Verb::Signal(Signal::Hup, Some(0)))
        );
        assert_eq!(
            why(parse_instance(b"restart 2", 3)),
            "bad # args to command: an instance's ctl takes restart | signal SIG, got 1 argument"
        );
        assert_eq!(
            why(parse_instance(b"signal", 3)),
            "bad # args to command: an instance's ctl takes restart | signal SIG, got 0 arguments"
        );
        assert_eq!(
            why(parse_instance(b"stop", 3)),
            "unknown control message 'stop'; commands: restart | signal SIG"
        );
        assert!(why(parse_instance(b"signal WINCH", 3)).starts_with("unknown signal"));
        assert!(why(parse_instance(b"", 3)).starts_with("empty control message"));
    }

    #[test]
    fn the_two_plan9_errors() {
        assert_eq!(
            why(parse_service(b"bogus\n")),
            "unknown control message 'bogus'; commands: apply | pause | resume | promote | plan | rollback [VERSION] | restart [INSTANCE] | stop | start | remove | signal SIG [INSTANCE]"
        );
        assert!(why(parse_service(b"puase")).contains("(did you mean 'pause'?)"));
        assert_eq!(
            why(parse_service(b"pause now\n")),
            "bad # args to command: pause takes no arguments, got 1"
        );
        assert_eq!(
            why(parse_service(b"rollback a b\n")),
            "bad # args to command: rollback [VERSION] takes at most one argument, got 2"
        );
    }

    #[test]
    fn bad_messages_are_refused() {
        assert!(why(parse_service(b"")).starts_with("empty control message"));
        assert!(why(parse_service(b"\n")).starts_with("empty control message"));
        assert_eq!(
            why(parse_service(b"pause\nresume\n")),
            "one command per write"
        );
        assert_eq!(why(parse_service(&[0xff])), "control message is not UTF-8");
        let huge = vec![b'a'; MAX_MESSAGE + 1];
        assert_eq!(
            why(parse_service(&huge)),
            "control message is longer than the limit of 1024 bytes"
        );
        for bad in ["-1", "+1", "01", "x", "4294967296", "1.5"] {
            assert_eq!(
                why(parse_service(format!("restart {bad}").as_bytes())),
                format!("'{bad}' is not an instance number (as in instances/N)")
            );
        }
        assert_eq!(
            why(parse_service(b"signal")),
            "bad # args to command: signal SIG [INSTANCE] takes one or two arguments, got 0"
        );
        assert_eq!(
            why(parse_service(b"signal WINCH")),
            "unknown signal 'WINCH'; signals: TERM, INT, QUIT, HUP, USR1, USR2, KILL"
        );
        assert_eq!(
            why(parse_service(b"signal HUP x")),
            "'x' is not an instance number (as in instances/N)"
        );
        assert_eq!(
            why(parse_service(b"rollback xyz")),
            "'xyz' is not a version (12 hex digits, or at least its first 4)"
        );
        for bad in ["012", "0123456789abc", "0123456789AB"] {
            let text = format!("rollback {bad}");
            assert!(why(parse_service(text.as_bytes())).starts_with(&format!("'{bad}' is not")));
        }
    }
}
