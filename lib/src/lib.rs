//! What `deployd` (the server) and `deploy` (the CLI) share.
//!
//! # Layout
//!
//! - [`manifest`]: the manifest language: parse, typed manifest, canonical
//!   rendering and the version hash.
//! - [`name`]: service names, the one check that keeps user input out of paths.

pub mod manifest;
pub mod name;
