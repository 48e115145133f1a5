//! The namespace's nodes: which file or directory an inode number is. An
//! inode packs which service, which instance and which file, so a lookup
//! is arithmetic, not a table of allocations.

use crate::view::{HOST_FILES, HostFile, INST_FILES, InstFile, SVC_FILES, SvcFile};

/// A file or directory of the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// `/`
    Root,
    /// `/ctl`
    RootCtl,
    /// `/status`
    Status,
    /// `/metrics`
    Metrics,
    /// `/active`
    Active,
    /// `/active/SERVICE`
    Service(u32),
    /// `/active/SERVICE/FILE`
    SvcFile(u32, SvcFile),
    /// `/active/SERVICE/history`
    History(u32),
    /// `/active/SERVICE/history/VERSION`, by position in the history.
    HistoryFile(u32, u32),
    /// `/active/SERVICE/instances`
    Instances(u32),
    /// `/active/SERVICE/instances/N`
    Instance(u32, u32),
    /// `/active/SERVICE/instances/N/FILE`
    InstFile(u32, u32, InstFile),
    /// `/cluster` (in a cluster)
    Cluster,
    /// `/hosts` (in a cluster)
    Hosts,
    /// `/hosts/HOST`, by the host's number
    Host(u32),
    /// `/hosts/HOST/FILE`
    HostFile(u32, HostFile),
}

const TAG_SERVICE: u64 = 1;
const TAG_HISTORY: u64 = 2;
const TAG_INSTANCES: u64 = 3;
const TAG_INSTANCE: u64 = 4;
const TAG_HOST: u64 = 5;
pub(super) const MAX_SUB: u32 = (1 << 24) - 1;

impl Node {
    /// The inode number: `tag << 56 | service << 32 | sub << 8 | file`.
    pub fn ino(self) -> u64 {
        let pack = |tag: u64, sid: u32, sub: u32, file: u64| {
            (tag << 56) | (u64::from(sid) << 32) | (u64::from(sub & MAX_SUB) << 8) | file
        };
        let svc_file = |f: SvcFile| {
            SVC_FILES
                .iter()
                .position(|(_, x, _)| *x == f)
                .map_or(0, |i| i as u64 + 1)
        };
        let inst_file = |f: InstFile| {
            INST_FILES
                .iter()
                .position(|(_, x, _)| *x == f)
                .map_or(0, |i| i as u64 + 1)
        };
        let host_file = |f: HostFile| {
            HOST_FILES
                .iter()
                .position(|(_, x)| *x == f)
                .map_or(0, |i| i as u64 + 1)
        };
        match self {
            Node::Root => 1,
            Node::RootCtl => 2,
            Node::Status => 3,
            Node::Active => 4,
            Node::Cluster => 5,
            Node::Hosts => 6,
            Node::Metrics => 7,
            Node::Host(h) => pack(TAG_HOST, h, 0, 0),
            Node::HostFile(h, f) => pack(TAG_HOST, h, 0, host_file(f)),
            Node::Service(s) => pack(TAG_SERVICE, s, 0, 0),
            Node::SvcFile(s, f) => pack(TAG_SERVICE, s, 0, svc_file(f)),
            Node::History(s) => pack(TAG_HISTORY, s, 0, 0),
            Node::HistoryFile(s, i) => pack(TAG_HISTORY, s, i, 1),
            Node::Instances(s) => pack(TAG_INSTANCES, s, 0, 0),
            Node::Instance(s, n) => pack(TAG_INSTANCE, s, n, 0),
            Node::InstFile(s, n, f) => pack(TAG_INSTANCE, s, n, inst_file(f)),
        }
    }

    /// The node of an inode number, if it is one.
    pub fn from_ino(ino: u64) -> Option<Node> {
        let (tag, sid, sub, file) = (
            ino >> 56,
            ((ino >> 32) & 0xff_ffff) as u32,
            ((ino >> 8) & 0xff_ffff) as u32,
            (ino & 0xff) as usize,
        );
        Some(match (tag, file) {
            (0, _) => match ino {
                1 => Node::Root,
                2 => Node::RootCtl,
                3 => Node::Status,
                4 => Node::Active,
                5 => Node::Cluster,
                6 => Node::Hosts,
                7 => Node::Metrics,
                _ => return None,
            },
            (TAG_HOST, 0) => Node::Host(sid),
            (TAG_HOST, f) => Node::HostFile(sid, HOST_FILES.get(f - 1)?.1),
            (TAG_SERVICE, 0) => Node::Service(sid),
            (TAG_SERVICE, f) => Node::SvcFile(sid, SVC_FILES.get(f - 1)?.1),
            (TAG_HISTORY, 0) => Node::History(sid),
            (TAG_HISTORY, 1) => Node::HistoryFile(sid, sub),
            (TAG_INSTANCES, 0) => Node::Instances(sid),
            (TAG_INSTANCE, 0) => Node::Instance(sid, sub),
            (TAG_INSTANCE, f) => Node::InstFile(sid, sub, INST_FILES.get(f - 1)?.1),
            _ => return None,
        })
    }

    pub fn is_dir(self) -> bool {
        matches!(
            self,
            Node::Root
                | Node::Active
                | Node::Service(_)
                | Node::History(_)
                | Node::Instances(_)
                | Node::Instance(..)
                | Node::Hosts
                | Node::Host(_)
        )
    }

    /// Whether the name of this node always leads to the same inode while
    /// it exists, so the kernel may cache the name: everything but the
    /// instance directories (instances come and go under a number) and
    /// history files (named by position). A service's name is dropped from
    /// the cache when it is removed (the `removed` hook in `main`
    /// invalidates it).
    pub fn stable_name(self) -> bool {
        !matches!(self, Node::Instance(..) | Node::HistoryFile(..))
    }

    /// The inode number of this node's content at `generation`: a file
    /// the kernel caches is a new inode at each change of its content
    /// (its generation in the bits a service's files leave unused), as
    /// if the new content were renamed into place; any other node's
    /// number is [`Node::ino`].
    pub fn ino_at(self, generation: u32) -> u64 {
        match self {
            Node::SvcFile(..) if self.cached() => {
                self.ino() | (u64::from(generation & MAX_SUB) << 8)
            }
            _ => self.ino(),
        }
    }

    /// Whether the kernel may keep this node's attributes (and a file's
    /// pages, `/active`'s listing): `/active`, a service's directories and
    /// its files rendered into its snapshot (`version`, `update_progress`,
    /// ...). Each is dropped from the kernel's cache when a snapshot that
    /// changes it is published ([`super::changed`]), `/active` when a
    /// service comes or goes; every other node is asked for at each use.
    pub fn cached(self) -> bool {
        match self {
            Node::Active | Node::Service(_) | Node::History(_) | Node::Instances(_) => true,
            Node::SvcFile(_, f) => f.source() == crate::view::Source::Snapshot,
            _ => false,
        }
    }

    pub fn writable(self) -> bool {
        matches!(
            self,
            Node::RootCtl
                | Node::SvcFile(_, SvcFile::Ctl)
                | Node::InstFile(_, _, InstFile::Ctl)
                | Node::HostFile(_, HostFile::Ctl)
        )
    }
    /// The directory it is in.
    pub fn parent(self) -> Node {
        match self {
            Node::Root
            | Node::RootCtl
            | Node::Status
            | Node::Metrics
            | Node::Active
            | Node::Cluster
            | Node::Hosts => Node::Root,
            Node::Host(_) => Node::Hosts,
            Node::HostFile(h, _) => Node::Host(h),
            Node::Service(_) => Node::Active,
            Node::SvcFile(s, _) | Node::History(s) | Node::Instances(s) => Node::Service(s),
            Node::HistoryFile(s, _) => Node::History(s),
            Node::Instance(s, _) => Node::Instances(s),
            Node::InstFile(s, n, _) => Node::Instance(s, n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_round_trip() {
        let mut nodes = vec![
            Node::Root,
            Node::RootCtl,
            Node::Status,
            Node::Metrics,
            Node::Active,
            Node::Cluster,
            Node::Hosts,
        ];
        for h in [1, 7, MAX_SUB] {
            nodes.push(Node::Host(h));
            for (_, f) in HOST_FILES {
                nodes.push(Node::HostFile(h, f));
            }
        }
        for s in [1, 2, 1000, MAX_SUB] {
            nodes.push(Node::Service(s));
            nodes.push(Node::History(s));
            nodes.push(Node::Instances(s));
            for (_, f, _) in SVC_FILES {
                nodes.push(Node::SvcFile(s, f));
            }
            for n in [0, 1, 999, MAX_SUB] {
                nodes.push(Node::HistoryFile(s, n));
                nodes.push(Node::Instance(s, n));
                for (_, f, _) in INST_FILES {
                    nodes.push(Node::InstFile(s, n, f));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for n in nodes {
            assert_eq!(Node::from_ino(n.ino()), Some(n), "{n:?}");
            assert!(seen.insert(n.ino()), "{n:?} shares an inode");
        }
        assert_eq!(Node::from_ino(0), None);
        assert_eq!(Node::from_ino(8), None);
        assert_eq!(Node::from_ino((TAG_SERVICE << 56) | 200), None);
        assert_eq!(Node::from_ino(9 << 56), None);
    }

    #[test]
    fn only_ctl_files_are_writable() {
        assert!(Node::RootCtl.writable());
        assert!(Node::SvcFile(1, SvcFile::Ctl).writable());
        for (_, f, _) in SVC_FILES.iter().filter(|(_, f, _)| *f != SvcFile::Ctl) {
            assert!(!Node::SvcFile(1, *f).writable());
        }
        assert!(Node::InstFile(1, 0, InstFile::Ctl).writable());
        for (_, f, _) in INST_FILES.iter().filter(|(_, f, _)| *f != InstFile::Ctl) {
            assert!(!Node::InstFile(1, 0, *f).writable());
        }
    }
}
