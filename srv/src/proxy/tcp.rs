//! The TCP proxy: each client connection is joined to one routed-in
//! instance and copied byte for byte both ways (one buffer per direction)
//! until both sides are done; a half-close is passed on. A failed connect is
//! retried on another instance. When deployd closes the instance (its drain
//! is over), the connection is closed.

use std::sync::Arc;

use deployd_lib::rollout::InstanceId;
use tokio::net::TcpStream;

use super::Router;

/// Serves one client connection.
pub(super) async fn serve(mut client: TcpStream, router: Arc<Router>) {
    let mut tried: Vec<InstanceId> = Vec::new();
    loop {
        let Some(guard) = router.pick(&tried).await else {
            router.count(None, false);
            return;
        };
        let backend = guard.backend().clone();
        let mut upstream = match TcpStream::connect(backend.addr).await {
            Ok(s) => s,
            Err(_) => {
                backend.suspect();
                tried.push(backend.id);
                continue;
            }
        };
        let _ = upstream.set_nodelay(true);
        let mut closed = backend.closed.subscribe();
        let ok = tokio::select! {
            r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => r.is_ok(),
            _ = closed.wait_for(|c| *c) => true,
        };
        router.count(Some(&backend), ok);
        drop(guard);
        return;
    }
}
