//! deployd's benchmark suite. Run it with `bench/run` (which installs wrk and
//! builds everything in release mode). Every figure is printed with its
//! target and, where there is one, its ratio to the reference measured in
//! the same run: this machine is shared and noisy, so ratios, not lone
//! absolute times, are what to compare.
//!
//! Sections: `rollout` (rolling update overhead), `pm2` (zero downtime vs
//! PM2), `proxy` (data path), `namespace` (FUSE reads), `scale` (1,000
//! services), `failure` (detection times), `cluster` (three hosts
//! through etcd against one host), `soak` (random faults on a cluster
//! during rollouts under load).

mod cluster;
mod env;
mod failure;
mod follow;
mod fsbench;
mod hellofs;
mod pm2;
mod proxy;
mod rollout;
mod scale;
mod soak;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "deployd-bench",
    about = "deployd's benchmarks: figures against targets"
)]
struct Args {
    /// Sections to run (default: all): rollout, pm2, proxy, namespace, follow, scale, failure, cluster, soak
    sections: Vec<String>,
    /// Also write the table as Markdown to this file
    #[arg(long)]
    markdown: Option<std::path::PathBuf>,
}

/// Whether a figure met its target.
#[derive(Clone, Copy, PartialEq)]
pub enum Verdict {
    Met,
    Missed,
    /// Informational, or the reference could not run.
    Info,
}

/// One line of the report.
pub struct Row {
    section: &'static str,
    what: String,
    figure: String,
    target: String,
    verdict: Verdict,
}

/// The table being built.
#[derive(Default)]
pub struct Report {
    rows: Vec<Row>,
}

impl Report {
    /// Adds a figure and prints it at once (sections take a while).
    pub fn add(
        &mut self,
        section: &'static str,
        what: impl Into<String>,
        figure: impl Into<String>,
        target: impl Into<String>,
        verdict: Verdict,
    ) {
        let row = Row {
            section,
            what: what.into(),
            figure: figure.into(),
            target: target.into(),
            verdict,
        };
        eprintln!(
            "  {} | {} | {} | {}",
            row.what,
            row.figure,
            row.target,
            mark(row.verdict)
        );
        self.rows.push(row);
    }

    /// A figure that is informational only.
    pub fn info(
        &mut self,
        section: &'static str,
        what: impl Into<String>,
        figure: impl Into<String>,
    ) {
        self.add(section, what, figure, "—", Verdict::Info);
    }

    fn markdown(&self) -> String {
        let mut out =
            String::from("| section | what | figure | target | |\n|---|---|---|---|---|\n");
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.section,
                r.what,
                r.figure,
                r.target,
                mark(r.verdict)
            ));
        }
        out
    }
}

fn mark(v: Verdict) -> &'static str {
    match v {
        Verdict::Met => "met",
        Verdict::Missed => "MISSED",
        Verdict::Info => "",
    }
}

/// `met` if `ok`.
pub fn verdict(ok: bool) -> Verdict {
    if ok { Verdict::Met } else { Verdict::Missed }
}

/// The machine, for the record.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024 / 1024);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem} GiB, Linux {}", kernel.trim())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() || !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("deployd-bench: needs root and /dev/fuse (deployd mounts its namespace)");
        return ExitCode::from(2);
    }
    let all = [
        "rollout",
        "pm2",
        "proxy",
        "namespace",
        "follow",
        "scale",
        "failure",
        "cluster",
        "soak",
    ];
    let chosen: Vec<&str> = if args.sections.is_empty() {
        all.to_vec()
    } else {
        args.sections.iter().map(|s| s.as_str()).collect()
    };
    if let Some(bad) = chosen.iter().find(|s| !all.contains(s)) {
        eprintln!(
            "deployd-bench: no section '{bad}'; sections: {}",
            all.join(", ")
        );
        return ExitCode::from(2);
    }
    let machine = machine();
    eprintln!("deployd-bench on {machine}");
    let mut report = Report::default();
    for s in &chosen {
        eprintln!("== {s}");
        let r = match *s {
            "rollout" => rollout::run(&mut report),
            "pm2" => pm2::run(&mut report),
            "proxy" => proxy::run(&mut report),
            "namespace" => fsbench::run(&mut report),
            "follow" => follow::run(&mut report),
            "scale" => scale::run(&mut report),
            "cluster" => cluster::run(&mut report),
            "soak" => soak::run(&mut report),
            _ => failure::run(&mut report),
        };
        if let Err(e) = r {
            report.add(section_name(s), "section failed", e, "—", Verdict::Missed);
        }
    }
    let table = report.markdown();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\nMachine: {machine}\n\n{table}");
    if let Some(path) = args.markdown {
        let _ = std::fs::write(&path, format!("Machine: {machine}\n\n{table}"));
    }
    if report.rows.iter().any(|r| r.verdict == Verdict::Missed) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn section_name(s: &str) -> &'static str {
    match s {
        "rollout" => "rollout",
        "pm2" => "pm2",
        "proxy" => "proxy",
        "namespace" => "namespace",
        "follow" => "follow",
        "scale" => "scale",
        "cluster" => "cluster",
        "soak" => "soak",
        _ => "failure",
    }
}
