//! Serving a router on a plain TCP listener: what `axum::serve` does, with
//! the HTTP/1 connection settings it does not expose, and without its
//! per-connection read buffer doubling.
//!
//! Two choices here are about memory per connection (the proxy holds one
//! per job connected to it; BENCHMARKS.md, proxy memory):
//!
//! - **The protocol is told by peeking**, not by reading. hyper-util's
//!   automatic HTTP/1-or-2 connection reads the first 24 bytes to look for
//!   the HTTP/2 preface and replays them; hyper's first read of an HTTP/1
//!   request then holds only those 24 bytes, the head is incomplete, and
//!   the second read doubles its 8 KiB read buffer to 16 KiB for the rest of
//!   the connection. Peeking (`MSG_PEEK`) decides without consuming, and
//!   each connection goes straight to hyper's HTTP/1 or HTTP/2 server. A
//!   connection whose first bytes are too few to tell (a lone `P`, say) is
//!   peeked at again, backing off, until they tell or its time is up.
//! - **Half-close.** By default hyper, while a request is being answered,
//!   keeps reading the connection to notice a client that went away; the
//!   parsed request head still holds the first read buffer, so that read
//!   takes a second one for every request in flight. With half-close on,
//!   hyper does not read mid-request (a client that disconnects is noticed
//!   when the answer is written), and a busy connection holds one buffer.
//!
//! HTTP/1 upgrades are not served (nothing in cistern upgrades a
//! connection, and the proxy refuses them).
//!
//! TLS listeners ([`serve_tls`], rustls) take the protocol from ALPN
//! instead (`h2`, else HTTP/1.1), and share everything else.
//!
//! **Limits** ([`Limits`]) keep idle and trickling clients from holding
//! connections (slowloris): the first bytes (or the TLS handshake) must
//! come within `header_read_timeout`, and hyper's HTTP/1 timer bounds each
//! request's headers by the same time, from the connection's start or the
//! previous response, which makes it the keep-alive idle timeout as well.
//! An HTTP/2 connection may idle, but is pinged every
//! `header_read_timeout` and closed when a ping goes unanswered as long (a
//! peer that vanished). `max_connections` bounds what all clients together
//! hold; beyond it the loop stops accepting and new clients wait in the
//! kernel's backlog.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use futures_util::TryFutureExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt as _;

use crate::metrics::ConnectionMetrics;

/// The first bytes of every HTTP/2 connection with prior knowledge
/// (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection's first bytes say it speaks.
#[derive(Debug, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
    /// A strict prefix of the HTTP/2 preface, too short to tell.
    Unsure,
}

fn protocol_of(first: &[u8]) -> Protocol {
    let n = first.len().min(H2_PREFACE.len());
    if first[..n] != H2_PREFACE[..n] || first.is_empty() {
        // Empty: the client closed at once; hyper's HTTP/1 side ends it.
        Protocol::Http1
    } else if n == H2_PREFACE.len() {
        Protocol::Http2
    } else {
        Protocol::Unsure
    }
}

/// What a listener admits: see the module docs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time for the first bytes or TLS handshake, and for each HTTP/1
    /// request's headers (from the previous response on a kept-alive
    /// connection).
    pub header_read_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Limits {
    /// `[server] header_read_timeout` and `max_connections`.
    pub fn of(server: &crate::config::ServerConfig) -> Limits {
        Limits {
            header_read_timeout: server.header_read_timeout,
            max_connections: server.max_connections,
        }
    }
}

/// The connection builders, shared by every connection.
struct Builders {
    http1: hyper::server::conn::http1::Builder,
    http2: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl Builders {
    fn new(limits: &Limits) -> Builders {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .half_close(true)
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        let mut http2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        // As `axum::serve`: the CONNECT protocol for HTTP/2 (RFC 8441).
        // Pings on a quiet connection find a peer that vanished without a
        // FIN (idle HTTP/2 clients are normal, so only a dead one goes).
        http2
            .enable_connect_protocol()
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(limits.header_read_timeout))
            .keep_alive_timeout(limits.header_read_timeout);
        Builders { http1, http2 }
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

/// One connection being served, boxed: the spawned task then holds a
/// pointer, and the connection is stored once (an `async` block around
/// it would hold it twice: captured, then moved for `.await`).
type Served = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// The service every connection gets: the router, bodies as axum's.
type Service = TowerToHyperService<
    tower::util::MapRequest<Router, fn(http::Request<Incoming>) -> http::Request<Body>>,
>;

/// Serves `io` as HTTP/2 (`h2`) or HTTP/1 until the connection ends.
fn connection<I>(io: I, h2: bool, service: Service, builders: &Builders, watcher: Watcher) -> Served
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    if h2 {
        Box::pin(
            watcher
                .watch(builders.http2.serve_connection(io, service))
                .map_err(BoxError::from),
        )
    } else {
        Box::pin(
            watcher
                .watch(builders.http1.serve_connection(io, service))
                .map_err(BoxError::from),
        )
    }
}

/// How accepted connections become HTTP.
enum Transport {
    /// Plain TCP: the protocol is told by peeking.
    Plain,
    /// rustls: the handshake first, then the protocol ALPN chose.
    Tls(tokio_rustls::TlsAcceptor),
}

/// Serves `app` on `listener` until `shutdown` completes, then stops
/// accepting and waits for every open connection to finish its in-flight
/// requests (each is told to close once idle).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    metrics: ConnectionMetrics,
    shutdown: impl Future<Output = ()>,
) {
    serve_on(listener, app, Transport::Plain, limits, metrics, shutdown).await;
}

/// [`serve`] over TLS. `tls` should offer ALPN `h2` and `http/1.1`.
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
    metrics: ConnectionMetrics,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    serve_on(
        listener,
        app,
        Transport::Tls(acceptor),
        limits,
        metrics,
        shutdown,
    )
    .await;
}

/// A connection's place under `max_connections`, counted as open for as
/// long as the connection lives.
struct Open {
    _slot: OwnedSemaphorePermit,
    metrics: ConnectionMetrics,
}

impl Open {
    fn new(slot: OwnedSemaphorePermit, metrics: &ConnectionMetrics) -> Open {
        metrics.open.inc();
        Open {
            _slot: slot,
            metrics: metrics.clone(),
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.metrics.open.dec();
    }
}

/// Whether a connection ended on hyper's header read timeout.
fn timed_out(e: &BoxError) -> bool {
    e.downcast_ref::<hyper::Error>()
        .is_some_and(hyper::Error::is_timeout)
}

async fn serve_on(
    listener: TcpListener,
    app: Router,
    transport: Transport,
    limits: Limits,
    metrics: ConnectionMetrics,
    shutdown: impl Future<Output = ()>,
) {
    metrics
        .limit
        .set(i64::try_from(limits.max_connections).unwrap_or(i64::MAX));
    let builders = Arc::new(Builders::new(&limits));
    let transport = Arc::new(transport);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Connections still waiting for their first bytes (or their TLS
    // handshake) are not yet watched by `graceful`; this tells them to give
    // up at shutdown.
    let (stopping, stopped) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // At the limit, stop accepting until a connection ends.
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                // Never closed; if it were, serving could not go on.
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
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
        let map: fn(http::Request<Incoming>) -> http::Request<Body> = |req| req.map(Body::new);
        let service = TowerToHyperService::new(app.clone().map_request(map));
        let watcher = graceful.watcher();
        let builders = Arc::clone(&builders);
        let transport = Arc::clone(&transport);
        let mut stopped = stopped.clone();
        let first_bytes_by = Instant::now() + limits.header_read_timeout;
        let held = Open::new(slot, &metrics);
        tokio::spawn(async move {
            let held = held;
            let opening = open(stream, &transport, service, &builders, watcher);
            let served = tokio::select! {
                opened = tokio::time::timeout_at(first_bytes_by, opening) => match opened {
                    Ok(Ok(served)) => served,
                    Ok(Err(e)) => {
                        tracing::trace!(error = %e, "opening a connection failed");
                        return;
                    }
                    Err(_) => {
                        held.metrics.timed_out.inc();
                        tracing::trace!("a connection sent nothing usable in time");
                        return;
                    }
                },
                _ = stopped.wait_for(|stop| *stop) => return,
            };
            if let Err(e) = served.await {
                if timed_out(&e) {
                    held.metrics.timed_out.inc();
                }
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    graceful.shutdown().await;
}

/// Waits for what decides the protocol (the first bytes, or the TLS
/// handshake), then hands the connection to its server. The caller bounds
/// the wait.
async fn open(
    stream: TcpStream,
    transport: &Transport,
    service: Service,
    builders: &Builders,
    watcher: Watcher,
) -> Result<Served, BoxError> {
    match transport {
        Transport::Plain => {
            let h2 = speaks_h2(&stream).await?;
            Ok(connection(stream, h2, service, builders, watcher))
        }
        Transport::Tls(acceptor) => {
            // Boxed: the handshake's state is large and short-lived, and
            // inline it would be reserved in every connection's task.
            let tls = Box::pin(acceptor.accept(stream)).await?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(connection(tls, h2, service, builders, watcher))
        }
    }
}

/// Peeks until the first bytes tell HTTP/2 with prior knowledge from
/// HTTP/1. Bytes that are a strict prefix of the preface (a lone `P`) are
/// looked at again after a pause that doubles, so a client trickling them
/// costs a few wake-ups until the caller's deadline, not a busy loop.
async fn speaks_h2(stream: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8; H2_PREFACE.len()];
    let mut pause = Duration::from_millis(1);
    loop {
        let n = stream.peek(&mut first).await?;
        match protocol_of(&first[..n]) {
            Protocol::Http1 => return Ok(false),
            Protocol::Http2 => return Ok(true),
            Protocol::Unsure => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A server on a loopback port with one route, and its shutdown trigger.
    const LIMITS: Limits = Limits {
        header_read_timeout: Duration::from_secs(30),
        max_connections: 1000,
    };

    async fn server() -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        server_with(LIMITS, ConnectionMetrics::default()).await
    }

    async fn server_with(
        limits: Limits,
        metrics: ConnectionMetrics,
    ) -> (
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/x",
            axum::routing::any(|req: http::Request<Body>| async move {
                format!("{:?} {}", req.version(), req.method())
            }),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, app, limits, metrics, async move {
            let _ = stopped.await;
        }));
        (addr, stop, task)
    }

    /// Closes idle and silent clients quickly.
    const IMPATIENT: Limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        ..LIMITS
    };

    /// [`server_with`], and the metrics it reports.
    async fn counted(
        limits: Limits,
    ) -> (
        ConnectionMetrics,
        std::net::SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let metrics = ConnectionMetrics::default();
        let (addr, stop, task) = server_with(limits, metrics.clone()).await;
        (metrics, addr, stop, task)
    }

    /// Reads until the server closes (a reset counts: closing with our
    /// bytes unread resets); the guard is for a hang, not a timing claim.
    async fn until_closed(s: &mut tokio::net::TcpStream) -> String {
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
            .await
            .expect("the server closed the connection");
        if let Err(e) = read {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn silent_trickling_and_idle_clients_are_closed_after_the_header_read_timeout() {
        let (metrics, addr, stop, task) = counted(IMPATIENT).await;
        // Nothing at all; a prefix of the HTTP/2 preface; half a head.
        for sent in ["", "P", "PRI * HTTP/2.0\r\n", "GET /x HTTP/1.1\r\nHo"] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(sent.as_bytes()).await.unwrap();
            let out = until_closed(&mut s).await;
            assert!(!out.contains("200 OK"), "{sent:?}: {out}");
        }
        // Kept alive after an answer, then idle: closed too.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let out = until_closed(&mut s).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        // Each close was counted; none is open now (the count drops just
        // after the close the client sees).
        for _ in 0..100 {
            if metrics.open.get() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.open.get(), 0);
        assert_eq!(metrics.timed_out.get(), 5);
        assert_eq!(metrics.limit.get(), 1000);
        let _ = stop.send(());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn an_http2_peer_that_stops_answering_pings_is_closed_and_a_live_one_kept() {
        let (metrics, addr, stop, task) = counted(IMPATIENT).await;
        // A live client answers pings on its own: its idle connection stays.
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http::<Body>();
        let url: http::Uri = format!("http://{addr}/x").parse().unwrap();
        assert_eq!(client.get(url.clone()).await.unwrap().status(), 200);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(metrics.open.get(), 1, "the live idle connection was closed");
        assert_eq!(client.get(url).await.unwrap().status(), 200);
        assert_eq!(metrics.open.get(), 1);
        // A peer that opened HTTP/2 and then went silent is closed.
        let mut dead = tokio::net::TcpStream::connect(addr).await.unwrap();
        dead.write_all(H2_PREFACE).await.unwrap();
        // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
        dead.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), dead.read_to_end(&mut sink))
            .await
            .expect("the silent HTTP/2 peer was closed")
            .ok();
        drop(client);
        let _ = stop.send(());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_until_one_closes() {
        let (metrics, addr, stop, task) = counted(Limits {
            max_connections: 1,
            ..LIMITS
        })
        .await;
        let holder = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut waiting = tokio::net::TcpStream::connect(addr).await.unwrap();
        waiting
            .write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(300), waiting.read(&mut byte)).await;
        assert!(early.is_err(), "served while the only slot was taken");
        assert_eq!(metrics.open.get(), 1);
        drop(holder);
        let out = until_closed(&mut waiting).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let _ = stop.send(());
        task.await.unwrap();
    }

    /// Sends `parts` one write each, a pause between them, then reads the
    /// whole answer (the request asks to close).
    async fn raw(addr: std::net::SocketAddr, parts: &[&str]) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            s.write_all(part.as_bytes()).await.unwrap();
        }
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn http1_is_served_whole_and_in_pieces_and_http2_with_prior_knowledge() {
        let (addr, stop, task) = server().await;
        let req = "GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
        let out = raw(addr, &[req]).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("HTTP/1.1 GET"), "{out}");
        // A first byte alone cannot tell the protocols apart: still served.
        let out = raw(
            addr,
            &[
                "P",
                "OST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ],
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.ends_with("HTTP/1.1 POST"), "{out}");

        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http::<Body>();
        let res = client
            .get(format!("http://{addr}/x").parse().unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.version(), http::Version::HTTP_2);
        let body = http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap();
        assert_eq!(&body.to_bytes()[..], b"HTTP/2.0 GET");

        let _ = stop.send(());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_does_not_wait_for_a_connection_that_never_spoke() {
        let (addr, stop, task) = server().await;
        let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Let the server accept it before stopping.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = stop.send(());
        // The guard is for a hang, not a timing claim.
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("serve returned")
            .unwrap();
    }

    #[test]
    fn the_first_bytes_tell_http2_from_http1() {
        assert_eq!(protocol_of(b"GET / HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(
            protocol_of(b"POST /oauth/token HTTP/1.1\r\n"),
            Protocol::Http1
        );
        assert_eq!(
            protocol_of(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Protocol::Http2
        );
        assert_eq!(
            protocol_of(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0"),
            Protocol::Http2
        );
        // Too few bytes to tell: the automatic connection reads the rest.
        assert_eq!(protocol_of(b"P"), Protocol::Unsure);
        assert_eq!(protocol_of(b"PRI * HTTP/2"), Protocol::Unsure);
        // A near miss is HTTP/1 (hyper answers it with 400).
        assert_eq!(protocol_of(b"PRI * HTTP/1.1\r\n"), Protocol::Http1);
        assert_eq!(protocol_of(b""), Protocol::Http1);
    }
}
