//! A load client for the zero-downtime tests: keep-alive workers that each
//! hold one connection for the whole run (and say so if it ever breaks), and
//! workers that open a fresh connection per request. Every request's status
//! and full body are checked; anything else is a failure.
//!
//! Plain std sockets and a minimal HTTP/1.1 reader, so what is measured is
//! deployd, not a client library's retries.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

/// Counters shared by the workers.
#[derive(Default)]
pub struct Counters {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// Keep-alive connections that had to be opened again.
    pub reconnects: AtomicU64,
    pub errors: Mutex<Vec<String>>,
}

impl Counters {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        let mut e = self.errors.lock();
        if e.len() < 20 {
            e.push(why);
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    pub counters: Arc<Counters>,
    workers: Vec<JoinHandle<()>>,
}

/// What kind of client.
#[derive(Clone, Copy)]
pub enum Client {
    /// One connection per worker, reused for every request.
    KeepAlive,
    /// A new connection per request (`Connection: close`).
    Fresh,
}

impl Load {
    /// Starts `n` workers of each kind in `kinds` against 127.0.0.1:`port`.
    pub fn start(port: u16, kinds: &[(Client, usize)], path: &'static str) -> Load {
        Load::start_at(&["127.0.0.1"], port, kinds, path)
    }

    /// Starts `n` workers of each kind in `kinds` against `port` of each
    /// of `ips` (in a cluster, every host's).
    pub fn start_at(
        ips: &[&str],
        port: u16,
        kinds: &[(Client, usize)],
        path: &'static str,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut workers = Vec::new();
        for ip in ips {
            let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().expect("an address");
            for &(kind, n) in kinds {
                for _ in 0..n {
                    let (stop, c) = (stop.clone(), counters.clone());
                    workers.push(std::thread::spawn(move || match kind {
                        Client::KeepAlive => keep_alive(addr, path, &stop, &c),
                        Client::Fresh => fresh(addr, path, &stop, &c),
                    }));
                }
            }
        }
        Load {
            stop,
            counters,
            workers,
        }
    }

    /// Stops the workers and returns the counters.
    pub fn finish(self) -> Arc<Counters> {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers {
            let _ = w.join();
        }
        self.counters
    }
}

fn connect(addr: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn keep_alive(addr: std::net::SocketAddr, path: &str, stop: &AtomicBool, c: &Counters) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::SeqCst) {
        let r = match conn.as_mut() {
            Some(r) => r,
            None => match connect(addr) {
                Ok(s) => conn.insert(BufReader::new(s)),
                Err(e) => {
                    c.fail(format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        let req = format!("GET {path} HTTP/1.1\r\nHost: load\r\n\r\n");
        let res = r
            .get_mut()
            .write_all(req.as_bytes())
            .and_then(|_| read_response(r));
        match res {
            Ok((200, _, keep)) => {
                c.ok.fetch_add(1, Ordering::SeqCst);
                if !keep {
                    c.fail("the proxy closed a keep-alive connection".into());
                    c.reconnects.fetch_add(1, Ordering::SeqCst);
                    conn = None;
                }
            }
            Ok((status, body, _)) => c.fail(format!("keep-alive: HTTP {status}: {body}")),
            Err(e) => {
                c.fail(format!("keep-alive: {e}"));
                c.reconnects.fetch_add(1, Ordering::SeqCst);
                conn = None;
            }
        }
    }
}

fn fresh(addr: std::net::SocketAddr, path: &str, stop: &AtomicBool, c: &Counters) {
    while !stop.load(Ordering::SeqCst) {
        let res = connect(addr).and_then(|mut s| {
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )?;
            read_response(&mut BufReader::new(s))
        });
        match res {
            Ok((200, _, _)) => {
                c.ok.fetch_add(1, Ordering::SeqCst);
            }
            Ok((status, body, _)) => c.fail(format!("fresh: HTTP {status}: {body}")),
            Err(e) => c.fail(format!("fresh: {e}")),
        }
    }
}

/// Reads one response with a Content-Length body: (status, body, keep-alive).
pub fn read_response(r: &mut impl BufRead) -> std::io::Result<(u16, String, bool)> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before a response",
        ));
    }
    let status: u16 = line
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut len = 0usize;
    let mut keep = true;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed in headers",
            ));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or((h, ""));
        if k.eq_ignore_ascii_case("content-length") {
            len = v.trim().parse().map_err(std::io::Error::other)?;
        }
        if k.eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close") {
            keep = false;
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .map_err(|e| std::io::Error::new(e.kind(), format!("response body cut short: {e}")))?;
    Ok((status, String::from_utf8_lossy(&body).into_owned(), keep))
}
