//! What `deployd` (the server) and `deploy` (the CLI) share.
//!
//! # Layout
//!
//! - [`manifest`]: the manifest language: parse, typed manifest, canonical
//!   rendering and the version hash.
//! - [`envfile`]: the `KEY=VALUE` format of a manifest's `env_file`.
//! - [`host`]: what a manifest needs of this machine: the account of its
//!   `user`, looked up for `deploy check`, an apply and each process start.
//! - [`name`]: service names, the one check that keeps user input out of paths.
//! - [`ctl`]: the language of the namespace's `ctl` files.
//! - [`http`]: HTTP/1 framing for the proxy: heads and chunked bodies.
//! - [`rollout`]: the sans-I/O state machine that supervises and rolls out a service.
//! - [`core`]: the sans-I/O decision core: every service's machine and
//!   what is decided across services (apply of every manifest, `after`,
//!   `reexec`, storage refusals), inputs in, effects out.
//! - [`cluster`]: several hosts through etcd, sans I/O: the keys and
//!   records, placement, the leader (a [`core::Core`] whose effects become
//!   keys) and each host's agent (its instances, probes, restarts).
//! - [`order`]: the order `after` lines make between services.
//! - [`printable`]: text made safe to show on one line (controls and
//!   bidirectional overrides escaped).
//! - [`readfile`]: reading a file a user named: regular files only,
//!   never waiting, never past a limit.
//! - [`suggest`]: "did you mean" for a word close to a known one.
//! - [`tail`]: the last whole lines of a file.
//! - [`stamp`]: the time at the start of each line of deployd's logs.

pub mod cluster;
pub mod core;
pub mod ctl;
pub mod envfile;
pub mod host;
pub mod http;
pub mod manifest;
pub mod name;
pub mod order;
pub mod printable;
pub mod readfile;
pub mod rollout;
pub mod stamp;
pub mod suggest;
pub mod tail;
