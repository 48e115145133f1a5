//! deployd's TOML configuration: where to mount the namespace, where the
//! manifests and the state live, which address public ports listen on.
//!
//! Relative paths are relative to the configuration file. Unknown keys and
//! bad values are errors that name the file and, from the TOML parser, the
//! line and column.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use deployd_lib::name::HostName;
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
    /// deployd's own log as JSON lines rather than text.
    pub log_json: bool,
    /// Where to serve `GET /metrics` (Prometheus), if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// With `[cluster]`: one host of several, coordinated through etcd.
    pub cluster: Option<Cluster>,
}

/// The `[cluster]` table: several hosts coordinated through etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// etcd's client URLs.
    pub etcd: Vec<String>,
    /// This host's name, unique in the cluster.
    pub host: HostName,
    /// Where other hosts reach this host's instances; `None`: the address
    /// of the interface with the default route, found at start.
    pub address: Option<IpAddr>,
    /// How long a host may be silent before it is lost: its lease's TTL.
    pub host_timeout: Duration,
    /// Where deployd's keys are in etcd.
    pub prefix: String,
    /// TLS to etcd: the CA that signed its certificate.
    pub ca: Option<PathBuf>,
    /// TLS to etcd: this host's client certificate.
    pub cert: Option<PathBuf>,
    /// TLS to etcd: its key.
    pub key: Option<PathBuf>,
    /// A user and password for etcd's authentication, as `USER:PASSWORD`
    /// in this file.
    pub auth: Option<(String, String)>,
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
    log_format: Option<String>,
    metrics: Option<String>,
    cluster: Option<RawCluster>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    etcd: Vec<String>,
    host: Option<String>,
    address: Option<String>,
    host_timeout: Option<String>,
    prefix: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    auth: Option<String>,
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
    /// `log_format` is neither `text` nor `json`.
    LogFormat(String),
    /// `metrics` is not an address with a port.
    Metrics(String),
    /// The state or manifests directory is inside the mountpoint.
    InsideMountpoint,
    /// Something of `[cluster]`: what.
    Cluster(String),
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
            Invalid::LogFormat(l) => write!(f, "log_format: '{l}' is not one of text, json"),
            Invalid::Metrics(m) => write!(
                f,
                "metrics: '{m}' is not an address and port (e.g. 127.0.0.1:9464 or [::1]:9464)"
            ),
            Invalid::LogLevel(l) => write!(
                f,
                "log_level: '{l}' is not one of error, warn, info, debug, trace"
            ),
            Invalid::InsideMountpoint => {
                f.write_str("state and manifests must not be inside the mountpoint")
            }
            Invalid::Cluster(why) => write!(f, "[cluster] {why}"),
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
        let log_json = match raw.log_format.as_deref().unwrap_or("text") {
            "text" => false,
            "json" => true,
            other => return Err(Invalid::LogFormat(other.to_string())),
        };
        let metrics = match raw.metrics.as_deref() {
            None => None,
            Some(m) => Some(m.parse().map_err(|_| Invalid::Metrics(m.to_string()))?),
        };
        let cluster = match raw.cluster {
            None => None,
            Some(c) => Some(cluster(c, dir).map_err(Invalid::Cluster)?),
        };
        let config = Config {
            cluster,
            mountpoint: abs(raw.mountpoint, "/deploy"),
            manifests: abs(raw.manifests, "/etc/deployd/manifests"),
            state: abs(raw.state, "/var/lib/deployd"),
            bind,
            allow_other: raw.allow_other.unwrap_or(false),
            log_level,
            log_json,
            metrics,
        };
        if config.state.starts_with(&config.mountpoint)
            || config.manifests.starts_with(&config.mountpoint)
        {
            return Err(Invalid::InsideMountpoint);
        }
        Ok(config)
    }
}

/// The `[cluster]` table, checked.
fn cluster(c: RawCluster, dir: &Path) -> Result<Cluster, String> {
    if c.etcd.is_empty() {
        return Err("etcd: give at least one endpoint, like [\"http://10.0.0.1:2379\"]".into());
    }
    let tls = c.ca.is_some() || c.cert.is_some() || c.key.is_some();
    for e in &c.etcd {
        let ok = match e.split_once("://") {
            Some(("http", rest)) => !tls && !rest.is_empty(),
            Some(("https", rest)) => !rest.is_empty(),
            _ => false,
        };
        if !ok {
            let want = if tls {
                "https://HOST:PORT (ca, cert or key is set)"
            } else {
                "http://HOST:PORT or https://HOST:PORT"
            };
            return Err(format!("etcd: '{e}' is not an endpoint URL like {want}"));
        }
    }
    if c.cert.is_some() != c.key.is_some() {
        return Err("cert and key go together".into());
    }
    let host = match c.host {
        Some(h) => HostName::new(&h).map_err(|e| format!("host: {e}"))?,
        None => {
            let name = hostname();
            HostName::new(&name).map_err(|e| {
                format!("host: this machine's hostname cannot be used ({e}); set host")
            })?
        }
    };
    let address = match c.address.as_deref() {
        None => None,
        Some(a) => {
            let ip: IpAddr = a
                .parse()
                .map_err(|_| format!("address: '{a}' is not an IP address"))?;
            if ip.is_unspecified() {
                return Err(format!(
                    "address: '{a}' is not an address other hosts can reach"
                ));
            }
            Some(ip)
        }
    };
    let host_timeout = match c.host_timeout.as_deref() {
        None => Duration::from_secs(5),
        Some(t) => {
            let d = deployd_lib::manifest::parse_duration("host_timeout", t)?;
            if d < Duration::from_secs(2) || d > Duration::from_secs(600) {
                return Err(format!("host_timeout: {t} is not between 2s and 10m"));
            }
            // etcd's leases count whole seconds.
            Duration::from_secs(d.as_secs_f64().ceil() as u64)
        }
    };
    let prefix = c.prefix.unwrap_or_else(|| "/deployd".into());
    if !prefix.starts_with('/') || prefix.len() < 2 || prefix.contains(char::is_whitespace) {
        return Err(format!(
            "prefix: '{prefix}' is not a key prefix like /deployd"
        ));
    }
    let auth = match c.auth {
        None => None,
        Some(a) => match a.split_once(':') {
            Some((u, p)) if !u.is_empty() => Some((u.to_string(), p.to_string())),
            _ => return Err("auth: write it as USER:PASSWORD".into()),
        },
    };
    let abs = |p: Option<PathBuf>| p.map(|p| if p.is_absolute() { p } else { dir.join(p) });
    Ok(Cluster {
        etcd: c.etcd,
        host,
        address,
        host_timeout,
        prefix,
        ca: abs(c.ca),
        cert: abs(c.cert),
        key: abs(c.key),
        auth,
    })
}

/// This machine's hostname, as the kernel has it.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
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
        assert!(!c.log_json);
        assert_eq!(c.metrics, None);
    }

    #[test]
    fn every_key() {
        let c = Config::parse(
            "mountpoint = \"/mnt/d\"\nmanifests = \"/m\"\nstate = \"/s\"\nbind = \"::1\"\nallow_other = true\nlog_level = \"debug\"\nlog_format = \"json\"\nmetrics = \"127.0.0.1:9464\"\n",
            Path::new("/"),
        )
        .unwrap();
        assert!(c.log_json);
        assert_eq!(c.metrics, Some("127.0.0.1:9464".parse().unwrap()));
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
        let e = err("log_format = \"xml\"\n");
        assert_eq!(e, "log_format: 'xml' is not one of text, json");
        let e = err("metrics = \"9464\"\n");
        assert!(
            e.starts_with("metrics: '9464' is not an address and port"),
            "{e}"
        );
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

    #[test]
    fn a_cluster_table() {
        let c = Config::parse(
            "[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nhost = \"h1\"\naddress = \"127.0.0.2\"\nhost_timeout = \"2500ms\"\n",
            Path::new("/etc/d"),
        )
        .unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(cl.host.as_str(), "h1");
        assert_eq!(cl.address, Some("127.0.0.2".parse().unwrap()));
        assert_eq!(cl.host_timeout, Duration::from_secs(3));
        assert_eq!(cl.prefix, "/deployd");
        assert!(Config::parse("", Path::new("/")).unwrap().cluster.is_none());
        let c = Config::parse(
            "[cluster]\netcd = [\"https://e:2379\"]\nhost = \"h1\"\nca = \"ca.pem\"\ncert = \"/c.pem\"\nkey = \"k.pem\"\n",
            Path::new("/etc/d"),
        )
        .unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(cl.ca, Some(PathBuf::from("/etc/d/ca.pem")));
        assert_eq!(cl.cert, Some(PathBuf::from("/c.pem")));
    }

    #[test]
    fn a_bad_cluster_table_says_what() {
        let err = |t: &str| {
            Config::parse(&format!("[cluster]\n{t}"), Path::new("/"))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("etcd = []\nhost = \"h\"\n"),
            "[cluster] etcd: give at least one endpoint, like [\"http://10.0.0.1:2379\"]"
        );
        assert!(err("etcd = [\"127.0.0.1:2379\"]\n").contains("is not an endpoint URL"));
        assert!(
            err("etcd = [\"http://e:1\"]\nhost = \"a/b\"\n")
                .starts_with("[cluster] host: 'a/b' is not a host name")
        );
        assert!(
            err("etcd = [\"http://e:1\"]\naddress = \"0.0.0.0\"\n")
                .contains("not an address other hosts can reach")
        );
        assert!(
            err("etcd = [\"http://e:1\"]\nhost_timeout = \"1s\"\n")
                .contains("not between 2s and 10m")
        );
        assert!(
            err("etcd = [\"http://e:1\"]\nca = \"x\"\n")
                .contains("https://HOST:PORT (ca, cert or key is set)")
        );
        assert!(
            err("etcd = [\"https://e:1\"]\ncert = \"x\"\n").contains("cert and key go together")
        );
        assert!(err("etcd = [\"http://e:1\"]\nauth = \"nopass\"\n").contains("USER:PASSWORD"));
        assert!(err("etcd = [\"http://e:1\"]\nhots = \"h\"\n").contains("unknown field `hots`"));
    }
}
