//! deployd's TOML configuration: where to mount the namespace, where the
//! manifests and the state live, which address public ports listen on.
//!
//! Relative paths are relative to the configuration file. Unknown keys and
//! bad values are errors that name the file and, from the TOML parser, the
//! line and column.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tracing::level_filters::LevelFilter;

/// Where deployd looks when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/deployd/deployd.toml";

/// The configuration, with every path absolute.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the namespace is mounted.
    pub mountpoint: PathBuf,
    /// The directory of `<service>.manifest` files.
    pub manifests: PathBuf,
    /// The directory deployd keeps its state in.
    pub state: PathBuf,
    /// The address public ports listen on.
    pub bind: IpAddr,
    /// Whether users other than the one running deployd may use the mount.
    pub allow_other: bool,
    /// deployd's own log level.
    pub log_level: LevelFilter,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    mountpoint: Option<PathBuf>,
    manifests: Option<PathBuf>,
    state: Option<PathBuf>,
    bind: Option<String>,
    allow_other: Option<bool>,
    log_level: Option<String>,
}

/// A configuration file that cannot be used: the file, and why.
#[derive(Debug)]
pub struct ConfigError {
    file: PathBuf,
    why: Invalid,
}

/// Why a configuration cannot be used.
#[derive(Debug)]
pub enum Invalid {
    /// The file could not be read.
    Io(std::io::Error),
    /// Not TOML, or not the keys and types deployd takes: the parser's
    /// words, with the line and column.
    Toml(String),
    /// `bind` is not an IP address.
    Bind(String),
    /// `log_level` is not a level.
    LogLevel(String),
    /// The state or manifests directory is inside the mountpoint.
    InsideMountpoint,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.file.display(), self.why)
    }
}

impl std::error::Error for ConfigError {}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Io(e) => write!(f, "{e}"),
            Invalid::Toml(e) => f.write_str(e),
            Invalid::Bind(b) => write!(
                f,
                "bind: '{b}' is not an IP address (e.g. 127.0.0.1 or ::1)"
            ),
            Invalid::LogLevel(l) => write!(
                f,
                "log_level: '{l}' is not one of error, warn, info, debug, trace"
            ),
            Invalid::InsideMountpoint => {
                f.write_str("state and manifests must not be inside the mountpoint")
            }
        }
    }
}

impl std::error::Error for Invalid {}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let error = |why| ConfigError {
            file: path.to_path_buf(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(Invalid::Io(e)))?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dir = std::path::absolute(dir).map_err(|e| error(Invalid::Io(e)))?;
        Config::parse(&text, &dir).map_err(error)
    }

    /// Parses configuration text; relative paths are taken from `dir`.
    pub fn parse(text: &str, dir: &Path) -> Result<Config, Invalid> {
        let raw: Raw = toml::from_str(text)
            .map_err(|e| Invalid::Toml(e.to_string().trim_end().to_string()))?;
        let abs = |p: Option<PathBuf>, default: &str| {
            let p = p.unwrap_or_else(|| PathBuf::from(default));
            if p.is_absolute() { p } else { dir.join(p) }
        };
        let bind = match raw.bind.as_deref() {
            None => IpAddr::from([127, 0, 0, 1]),
            Some(b) => b.parse().map_err(|_| Invalid::Bind(b.to_string()))?,
        };
        let log_level = match raw.log_level.as_deref().unwrap_or("info") {
            "error" => LevelFilter::ERROR,
            "warn" => LevelFilter::WARN,
            "info" => LevelFilter::INFO,
            "debug" => LevelFilter::DEBUG,
            "trace" => LevelFilter::TRACE,
            other => return Err(Invalid::LogLevel(other.to_string())),
        };
        let config = Config {
            mountpoint: abs(raw.mountpoint, "/deploy"),
            manifests: abs(raw.manifests, "/etc/deployd/manifests"),
            state: abs(raw.state, "/var/lib/deployd"),
            bind,
            allow_other: raw.allow_other.unwrap_or(false),
            log_level,
        };
        if config.state.starts_with(&config.mountpoint)
            || config.manifests.starts_with(&config.mountpoint)
        {
            return Err(Invalid::InsideMountpoint);
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_relative_to_the_file_and_defaults_apply() {
        let c = Config::parse(
            "manifests = \"m\"\nstate = \"/var/s\"\n",
            Path::new("/etc/x"),
        )
        .unwrap();
        assert_eq!(c.manifests, PathBuf::from("/etc/x/m"));
        assert_eq!(c.state, PathBuf::from("/var/s"));
        assert_eq!(c.mountpoint, PathBuf::from("/deploy"));
        assert_eq!(c.bind, IpAddr::from([127, 0, 0, 1]));
        assert!(!c.allow_other);
        assert_eq!(c.log_level, LevelFilter::INFO);
    }

    #[test]
    fn every_key() {
        let c = Config::parse(
            "mountpoint = \"/mnt/d\"\nmanifests = \"/m\"\nstate = \"/s\"\nbind = \"::1\"\nallow_other = true\nlog_level = \"debug\"\n",
            Path::new("/"),
        )
        .unwrap();
        assert_eq!(c.mountpoint, PathBuf::from("/mnt/d"));
        assert_eq!(c.bind, "::1".parse::<IpAddr>().unwrap());
        assert!(c.allow_other);
        assert_eq!(c.log_level, LevelFilter::DEBUG);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_clear_errors() {
        let err = |text: &str| Config::parse(text, Path::new("/")).unwrap_err().to_string();
        let e = err("mountpont = \"/d\"\n");
        assert!(e.contains("line 1, column 1"), "{e}");
        assert!(e.contains("unknown field `mountpont`"), "{e}");
        let e = err("bind = \"localhost\"\n");
        assert_eq!(
            e,
            "bind: 'localhost' is not an IP address (e.g. 127.0.0.1 or ::1)"
        );
        let e = err("allow_other = \"yes\"\n");
        assert!(e.contains("invalid type"), "{e}");
        let e = err("log_level = \"loud\"\n");
        assert!(e.starts_with("log_level: 'loud'"), "{e}");
        let e = err("mountpoint = \"/d\"\nstate = \"/d/s\"\n");
        assert_eq!(e, "state and manifests must not be inside the mountpoint");
        let e = err("[x\n");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("deployd.toml");
        std::fs::write(&p, "manifests = \"m\"\nbind = \"x\"\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: bind", p.display())), "{e}");
        std::fs::write(&p, "manifests = \"m\"\n").unwrap();
        assert_eq!(Config::load(&p).unwrap().manifests, dir.path().join("m"));
        let e = Config::load(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("No such file"), "{e}");
    }
}
