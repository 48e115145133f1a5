//! Service names: the stem of `<service>.manifest`, a directory name in the
//! namespace and in the state directory, so they must be safe as a path
//! component. Validating them here is what keeps `../x` out of every path.

use std::fmt;

/// A valid service name: `[a-z0-9][a-z0-9-]{0,62}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(String);

impl ServiceName {
    /// Validates `name`; the error says what a name may be.
    pub fn new(name: &str) -> Result<ServiceName, String> {
        let b = name.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && matches!(b[0], b'a'..=b'z' | b'0'..=b'9')
            && b.iter()
                .all(|c| matches!(c, b'a'..=b'z' | b'0'..=b'9' | b'-'));
        if ok {
            Ok(ServiceName(name.to_string()))
        } else {
            let shown: String = name.chars().take(80).collect();
            Err(format!(
                "'{}' is not a service name: use 1 to 63 of a-z, 0-9 and '-', starting with a letter or digit",
                shown.escape_debug()
            ))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Saved as its text, and checked again when read back.
impl serde::Serialize for ServiceName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for ServiceName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ServiceName, D::Error> {
        let s = String::deserialize(d)?;
        ServiceName::new(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<&str> for ServiceName {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl AsRef<str> for ServiceName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The error for a service that does not exist, with the name of one that
/// does if it is close (a typo), else how to deploy it: the same words from
/// a ctl file and from the CLI.
pub fn no_such_service<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> String {
    match crate::suggest::closest(name, known) {
        Some(close) => format!("no service '{name}' (did you mean '{close}'?)"),
        None => format!("no service '{name}'; start it with: deploy apply {name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in ["web", "a", "0", "api-v2", &"a".repeat(63)] {
            assert!(ServiceName::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn rejects_anything_that_could_escape_a_directory() {
        for bad in [
            "",
            "-web",
            "Web",
            "../x",
            "a/b",
            ".",
            "..",
            "a b",
            "wéb",
            &"a".repeat(64),
        ] {
            let err = ServiceName::new(bad).unwrap_err();
            assert!(err.contains("is not a service name"), "{bad}: {err}");
        }
    }
}

/// A cluster host's name: `[A-Za-z0-9][A-Za-z0-9._-]{0,62}` (a hostname,
/// dots allowed), a path component in etcd's keys and in the namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostName(String);

impl HostName {
    /// Validates `name`; the error says what a name may be.
    pub fn new(name: &str) -> Result<HostName, String> {
        let b = name.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphanumeric()
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if ok {
            Ok(HostName(name.to_string()))
        } else {
            let shown: String = name.chars().take(80).collect();
            Err(format!(
                "'{}' is not a host name: use 1 to 63 of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or digit",
                shown.escape_debug()
            ))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for HostName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for HostName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HostName, D::Error> {
        let s = String::deserialize(d)?;
        HostName::new(&s).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod host_tests {
    use super::HostName;

    #[test]
    fn host_names_are_hostnames_and_never_paths() {
        for ok in ["h1", "web-01.example.com", "A_b", "1"] {
            assert!(HostName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "-a", "a/b", "a b", "é", &"x".repeat(64)] {
            assert!(HostName::new(bad).is_err(), "{bad}");
        }
    }
}
