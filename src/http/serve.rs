//! Serving a router on a plain TCP listener: what `axum::serve` does, with
//! the HTTP/1 connection settings it does not expose.
//!
//! One setting matters here: **half-close**. By default hyper, while a
//! request is being answered, keeps reading the connection to notice a
//! client that went away; the parsed request head still holds the first
//! read buffer, so that read takes a second 8 KiB one for every request in
//! flight. With half-close on, hyper does not read mid-request (a client
//! that disconnects is noticed when the answer is written), and a busy
//! connection holds one read buffer. Measured on the proxy at 1,000
//! connections: RSS 67–69 → 61–65 MB, and 18–20k → 22–23k req/s
//! (BENCHMARKS.md, session 5).

use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use futures_util::FutureExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt as _;

/// Serves `app` on `listener` until `shutdown` completes, then stops
/// accepting and waits for every open connection to finish its in-flight
/// requests (each is told to close once idle).
pub async fn serve(listener: TcpListener, app: Router, shutdown: impl Future<Output = ()>) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().half_close(true);
    // As `axum::serve`: the CONNECT protocol for HTTP/2 (RFC 8441).
    builder.http2().enable_connect_protocol();
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors and the like: the connections being
                    // served free them; accepting again at once would spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Small request/response pairs: Nagle + delayed ACK would add milliseconds.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|req: http::Request<Incoming>| req.map(Body::new)),
        );
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        // Spawned through a combinator, not inside an `async move` block: the
        // block would hold the connection twice (captured, then moved for
        // `.await`), 3.6 KB per connection task instead of 1.9 KB.
        let conn = graceful.watch(conn).map(|ended| {
            if let Err(e) = ended {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
        tokio::spawn(conn);
    }
    drop(listener);
    graceful.shutdown().await;
}
