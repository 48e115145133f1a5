//! The instance program of the rollout benchmark: a small HTTP server that
//! writes, to `$READY_DIR/PID`, the time (Unix nanoseconds) its `main` began
//! and the time it was listening, so the benchmark knows each instance's
//! start-to-ready time independently of deployd. `$STARTUP_MS` delays the
//! listen, as an application's initialisation would.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn main() {
    let started = now();
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let delay: u64 = std::env::var("STARTUP_MS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    std::thread::sleep(Duration::from_millis(delay));
    let host = std::env::var("HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let listener = match TcpListener::bind((host.as_str(), port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench-app: bind {port}: {e}");
            std::process::exit(1);
        }
    };
    if let Ok(dir) = std::env::var("READY_DIR") {
        let _ = std::fs::write(
            format!("{dir}/{}", std::process::id()),
            format!("{started} {}\n", now()),
        );
    }
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut s = stream;
            let mut buf = [0u8; 4096];
            let mut pending = Vec::new();
            loop {
                let n = match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                    pending.drain(..end + 4);
                    let close = false;
                    if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                        .is_err()
                        || close
                    {
                        return;
                    }
                }
            }
        });
    }
}
