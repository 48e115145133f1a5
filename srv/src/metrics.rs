//! deployd's metrics in Prometheus' text format, from the snapshots the
//! namespace shows (never the engine): `/deploy/metrics`, and `GET
//! /metrics` on the `metrics` address of the configuration. Encoded by
//! `prometheus-client`, the names and escaping its own.
//!
//! Per service: requests (http) or connections (tcp) served, failed,
//! retried, abandoned, in flight, and how long they took (a histogram);
//! instances wanted and ready; rollouts by outcome and how long they took.
//! Per instance: the same counts, its restarts, whether it is ready, and
//! what its processes use (memory, CPU), read when scraped.

use std::sync::Arc;

use deployd_lib::rollout::{Ended, State, tally::DURATION_BUCKETS};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::view::{ServiceView, Views};

/// The metrics text now.
pub fn render(views: &Views) -> String {
    let services: Vec<Arc<ServiceView>> = views.with(|ns| {
        ns.by_name
            .values()
            .filter_map(|sid| ns.by_sid.get(sid).cloned())
            .collect()
    });
    let mut registry = Registry::with_prefix("deployd");
    registry.register_collector(Box::new(Scrape { services }));
    let mut out = String::new();
    // Writing to a String does not fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// One scrape's snapshot.
#[derive(Debug)]
struct Scrape {
    services: Vec<Arc<ServiceView>>,
}

type Labels = Vec<(&'static str, String)>;

/// One metric family, its values written as they are gathered.
struct Family<'e> {
    metric: prometheus_client::encoding::MetricEncoder<'e>,
}

impl Family<'_> {
    fn counter(&mut self, labels: &Labels, v: u64) -> std::fmt::Result {
        self.metric
            .encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)
    }
    fn counter_f(&mut self, labels: &Labels, v: f64) -> std::fmt::Result {
        self.metric
            .encode_family(labels)?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)
    }
    fn gauge(&mut self, labels: &Labels, v: i64) -> std::fmt::Result {
        self.metric.encode_family(labels)?.encode_gauge(&v)
    }
    fn histogram(
        &mut self,
        labels: &Labels,
        sum: f64,
        count: u64,
        buckets: &[(f64, u64)],
    ) -> std::fmt::Result {
        self.metric
            .encode_family(labels)?
            .encode_histogram::<NoLabelSet>(sum, count, buckets, None)
    }
}

fn family<'e>(
    enc: &'e mut DescriptorEncoder<'_>,
    name: &'e str,
    help: &str,
    kind: MetricType,
) -> Result<Family<'e>, std::fmt::Error> {
    Ok(Family {
        metric: enc.encode_descriptor(name, help, None, kind)?,
    })
}

fn svc(v: &ServiceView) -> Labels {
    vec![("service", v.name.to_string())]
}

/// What each instance's processes use: (service, instance number, rss
/// bytes, CPU seconds).
fn usage(services: &[Arc<ServiceView>]) -> Vec<(usize, u32, u64, f64)> {
    let mut out = Vec::new();
    for (s, v) in services.iter().enumerate() {
        for i in &v.instances {
            if let Some(leader) = i.leader {
                let u = crate::process::procfs::usage(leader);
                let memory = match &i.memory_file {
                    Some(f) => crate::process::procfs::memory(leader, Some(f)),
                    None => u.rss,
                };
                out.push((s, i.number, memory, u.cpu.as_secs_f64()));
            }
        }
    }
    out
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        use MetricType::{Counter, Gauge, Histogram};
        let svcs = &self.services;
        let traffic: Vec<_> = svcs
            .iter()
            .filter_map(|v| v.traffic.as_ref().map(|r| (v, r.totals(), r.latency())))
            .collect();
        let totals = [
            (
                "requests",
                "Requests (http) or connections (tcp) served, failed ones included.",
            ),
            (
                "request_errors",
                "Of those, the ones that failed for the client.",
            ),
            (
                "request_retries",
                "Requests or connections sent again to another instance before the client saw anything.",
            ),
            (
                "requests_abandoned",
                "Requests whose client left before the response was through.",
            ),
        ];
        for (k, (name, help)) in totals.into_iter().enumerate() {
            let mut f = family(&mut enc, name, help, Counter)?;
            for (v, (counts, _), _) in &traffic {
                f.counter(&svc(v), counts[k])?;
            }
        }
        let mut f = family(
            &mut enc,
            "requests_in_flight",
            "Requests or connections at an instance now.",
            Gauge,
        )?;
        for (v, (_, inflight), _) in &traffic {
            f.gauge(&svc(v), *inflight as i64)?;
        }
        let mut f = family(
            &mut enc,
            "request_duration_seconds",
            "How long requests took, from their head read to their response sent (http), or connections lasted (tcp).",
            Histogram,
        )?;
        for (v, _, l) in &traffic {
            f.histogram(&svc(v), l.seconds, l.count, &l.buckets)?;
        }
        let mut f = family(
            &mut enc,
            "replicas",
            "Instances wanted (0 while stopped).",
            Gauge,
        )?;
        for v in svcs {
            f.gauge(&svc(v), i64::from(v.replicas))?;
        }
        let mut f = family(
            &mut enc,
            "rollouts",
            "Rollouts that ended since deployd started, by outcome.",
            Counter,
        )?;
        for v in svcs {
            for how in [Ended::Done, Ended::Failed, Ended::RolledBack] {
                let mut l = svc(v);
                l.push(("outcome", how.name().to_string()));
                f.counter(&l, v.tally.ended(how))?;
            }
        }
        let mut f = family(
            &mut enc,
            "rollout_duration_seconds",
            "How long rollouts took, whatever their outcome.",
            Histogram,
        )?;
        for v in svcs {
            // Each bucket's own count: the encoder sums them.
            let buckets: Vec<(f64, u64)> = v
                .tally
                .buckets
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    (
                        DURATION_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY),
                        *n,
                    )
                })
                .collect();
            let total = buckets.iter().map(|(_, n)| n).sum();
            f.histogram(&svc(v), v.tally.seconds, total, &buckets)?;
        }

        // Per instance.
        let inst = |s: usize, n: u32| -> Labels {
            vec![
                ("service", svcs[s].name.to_string()),
                ("instance", n.to_string()),
            ]
        };
        let mut f = family(
            &mut enc,
            "instance_ready",
            "1 if the instance is ready and routed in, else 0.",
            Gauge,
        )?;
        for (s, v) in svcs.iter().enumerate() {
            for i in &v.instances {
                f.gauge(&inst(s, i.number), i64::from(i.now == State::Ready))?;
            }
        }
        let mut f = family(
            &mut enc,
            "instance_restarts",
            "Restarts of the slot the instance serves.",
            Counter,
        )?;
        for (s, v) in svcs.iter().enumerate() {
            for i in &v.instances {
                f.counter(&inst(s, i.number), u64::from(i.restarts_n))?;
            }
        }
        let per: Vec<(usize, Vec<_>)> = svcs
            .iter()
            .enumerate()
            .filter_map(|(s, v)| {
                let r = v.traffic.as_ref()?;
                let rows = r
                    .per_instance()
                    .into_iter()
                    .filter_map(|(id, c, inflight)| {
                        let n = v.instances.iter().find(|i| i.id == id)?.number;
                        Some((n, c, inflight))
                    })
                    .collect();
                Some((s, rows))
            })
            .collect();
        let each = [
            (
                "instance_requests",
                "Requests or connections the instance served.",
            ),
            (
                "instance_request_errors",
                "Of those, the ones that failed for the client.",
            ),
            (
                "instance_request_retries",
                "Requests or connections that failed at the instance and went to another.",
            ),
        ];
        for (k, (name, help)) in each.into_iter().enumerate() {
            let mut f = family(&mut enc, name, help, Counter)?;
            for (s, rows) in &per {
                for (n, c, _) in rows {
                    f.counter(&inst(*s, *n), c[k])?;
                }
            }
        }
        let mut f = family(
            &mut enc,
            "instance_requests_in_flight",
            "Requests or connections at the instance now.",
            Gauge,
        )?;
        for (s, rows) in &per {
            for (n, _, inflight) in rows {
                f.gauge(&inst(*s, *n), *inflight as i64)?;
            }
        }
        let used = usage(svcs);
        let mut f = family(
            &mut enc,
            "instance_memory_bytes",
            "Memory of the instance's processes: its cgroup's count where a memory controller keeps one, else their resident memory.",
            Gauge,
        )?;
        for (s, n, rss, _) in &used {
            f.gauge(&inst(*s, *n), *rss as i64)?;
        }
        let mut f = family(
            &mut enc,
            "instance_cpu_seconds",
            "CPU time, user and system, of the instance's processes.",
            Counter,
        )?;
        for (s, n, _, cpu) in &used {
            f.counter_f(&inst(*s, *n), *cpu)?;
        }
        Ok(())
    }
}

/// The `metrics` listener's limits: connections at once, and how long one
/// may take to send its request.
const MAX_SCRAPERS: usize = 32;
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `GET /metrics` on `listener` (one request a connection, then
/// closed), for as long as deployd runs.
pub async fn serve(listener: tokio::net::TcpListener, views: Views) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                // Out of descriptors, say: deployd's shortage, tried again.
                tracing::debug!("metrics: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let views = views.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(conn, &views)).await;
            drop(permit);
        });
    }
}

/// Reads one request head and answers it.
async fn answer(mut conn: tokio::net::TcpStream, views: &Views) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::with_capacity(1024);
    let (status, body) = loop {
        let mut chunk = [0u8; 1024];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let path = req.path.unwrap_or("");
                let path = path.split('?').next().unwrap_or("");
                break match (req.method, path) {
                    (Some("GET" | "HEAD"), "/metrics") => ("200 OK", render(views)),
                    (Some("GET" | "HEAD"), _) => ("404 Not Found", "only /metrics here\n".into()),
                    _ => ("405 Method Not Allowed", "GET /metrics\n".into()),
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < 8192 => continue,
            _ => break ("400 Bad Request", "bad request\n".into()),
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}
