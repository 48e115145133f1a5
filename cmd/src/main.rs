//! `deploy`: the command-line client of deployd.
//!
//! Everything it does goes through files of the namespace (`--root`,
//! `$DEPLOY_ROOT`, default `/deploy`), so a shell script can do the same with
//! `cat` and `echo`. `deploy check` works offline.
//!
//! Exit codes: 0 success; 1 the operation failed (invalid manifest, failed
//! rollout); 2 usage error; see [`Exit`] for the rest.

mod check;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "deploy",
    version,
    about = "Drive deployd through its /deploy namespace"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate manifests offline; print every error with file:line:col
    Check {
        /// Manifest files, named SERVICE.manifest
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// How `deploy` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It worked.
    Ok = 0,
    /// The operation failed: an invalid manifest, a failed rollout.
    Failed = 1,
}

/// An error that ends `deploy`, with its exit code.
#[derive(Debug)]
pub struct Fail {
    code: u8,
    message: String,
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Fail {
        Fail {
            code: 1,
            message: e.to_string(),
        }
    }
}

fn try_main(args: Args) -> Result<Exit, Fail> {
    match args.command {
        Cmd::Check { files } => check::run(&files),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match try_main(args) {
        Ok(exit) => ExitCode::from(exit as u8),
        Err(f) if f.message.contains("Broken pipe") => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("deploy: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
