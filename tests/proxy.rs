//! The identity-aware proxy end to end on the real binary: a job holding
//! only its cistern token reaches an upstream through cistern, limited to
//! its own project's paths, with cistern's credential injected and
//! nothing of the job's forwarded (security.md P1, P3, P5, P6);
//! revocation bites on the next request; bodies stream both ways.
//!
//! The upstream is a small echo server in this process (it answers what it
//! received), and for python-gitlab, GitLab's OpenAPI contract served by
//! Prism behind the recording front. ID tokens come from a second cistern
//! in `serve --dev`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse as _, Response};
use bytes::Bytes;
use common::{
    Cistern, CisternBuilder, DevIssuer, GitLabFront, Prism, Spawned, require_peers, require_prism,
    run_python_async,
};
use http_body::Frame;
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const AUD: &str = "https://cistern.test";
const ROUTE_SECRET: &str = "glpat-route-secret-0123456789";

const ECHO_POLICY: &str = r#"
role = "echo"
owner = "team-platform"
description = "Its own project's paths on the echo upstream"
issuer = "gitlab"
[bindings]
project_id = ["42", "77"]
[grant]
kind = "access_token"
audience = "https://echo.test"
scopes = ["api"]
ttl = "10m"
proxy = [
    "GET,POST /projects/{job_project_id}/**",
    "GET /projects/{project_path}/meta",
    "GET /download/*",
    "GET /slow/*",
    "GET /redirect",
    "PUT /upload",
]
"#;

const OTHER_POLICY: &str = r#"
role = "other"
owner = "team-platform"
description = "A token for another audience"
issuer = "gitlab"
[bindings]
project_id = "42"
[grant]
kind = "access_token"
audience = "https://other.test"
scopes = ["api"]
ttl = "10m"
proxy = ["GET /**"]
"#;

/// What the echo upstream received.
#[derive(Debug, Clone)]
struct Seen {
    version: String,
    method: String,
    path_and_query: String,
    headers: Vec<(String, String)>,
    body_bytes: u64,
}

#[derive(Clone, Default)]
struct Echo {
    seen: Arc<Mutex<Vec<Seen>>>,
    base: Arc<Mutex<String>>,
    /// Requests being answered now (from the handler's start until the
    /// response body is dropped), and the most at once.
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

/// Counts one request in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(echo: &Echo) -> InFlight {
        let now = echo.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        echo.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(echo.in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `n` frames of 64 KiB, one every 20 ms.
struct Slow {
    left: u32,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    _in_flight: Option<InFlight>,
}

impl http_body::Body for Slow {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(20))));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.sleep = None;
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![1u8; 64 * 1024])))))
    }
}

/// `n` zero bytes in 64 KiB frames, produced as they are read.
struct Zeros {
    left: u64,
}

impl http_body::Body for Zeros {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(64 * 1024);
        self.left -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![0u8; n as usize])))))
    }
}

async fn echo_handler(State(echo): State<Echo>, req: Request) -> Response {
    let in_flight = InFlight::enter(&echo);
    let (parts, mut body) = req.into_parts();
    let mut body_bytes = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            body_bytes += data.len() as u64;
        }
    }
    let path = parts.uri.path().to_owned();
    let seen = Seen {
        version: format!("{:?}", parts.version),
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map_or(path.clone(), |p| p.to_string()),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect(),
        body_bytes,
    };
    echo.seen.lock().unwrap().push(seen.clone());
    if let Some(n) = path.strip_prefix("/base/download/") {
        return Response::new(Body::new(Zeros {
            left: n.parse().unwrap(),
        }));
    }
    if let Some(n) = path.strip_prefix("/base/slow/") {
        return Response::new(Body::new(Slow {
            left: n.parse().unwrap(),
            sleep: None,
            _in_flight: Some(in_flight),
        }));
    }
    if path == "/base/redirect" {
        let base = echo.base.lock().unwrap().clone();
        return Response::builder()
            .status(302)
            .header("location", format!("{base}/projects/42/next"))
            .header(
                "link",
                format!("<{base}/projects/42/items?page=2>; rel=\"next\""),
            )
            .body(Body::empty())
            .unwrap();
    }
    let headers: serde_json::Map<String, Value> = seen
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    axum::Json(json!({
        "method": seen.method,
        "path": seen.path_and_query,
        "headers": headers,
        "body_bytes": body_bytes,
    }))
    .into_response()
}

impl Echo {
    /// The echo over TLS (rustls, ALPN h2 and http/1.1) with the test CA's
    /// certificate from `dir`.
    async fn start_tls(dir: &std::path::Path) -> (Echo, String) {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let echo = Echo::default();
        let app = axum::Router::new()
            .fallback(echo_handler)
            .with_state(echo.clone());
        let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(
            dir.join("tls.pem"),
            dir.join("tls.key"),
        )
        .await
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("https://{}/base", listener.local_addr().unwrap());
        *echo.base.lock().unwrap() = url.clone();
        let server = axum_server::from_tcp_rustls(listener, tls).unwrap();
        tokio::spawn(async move { server.serve(app.into_make_service()).await });
        (echo, url)
    }

    async fn start() -> (Echo, String) {
        let echo = Echo::default();
        let app = axum::Router::new()
            .fallback(echo_handler)
            .with_state(echo.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/base", listener.local_addr().unwrap());
        *echo.base.lock().unwrap() = url.clone();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (echo, url)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

struct World {
    dev: DevIssuer,
    c: Cistern,
    echo: Echo,
    _secret_dir: tempfile::TempDir,
}

fn secret_file() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("route-secret");
    std::fs::write(&path, format!("{ROUTE_SECRET}\n")).unwrap();
    (dir, path.to_string_lossy().into_owned())
}

async fn start() -> World {
    let (echo, url) = Echo::start().await;
    let dev = DevIssuer::start();
    let (secret_dir, secret_path) = secret_file();
    let c = CisternBuilder::new()
        .issuer("gitlab", &dev.issuer_url(), &[AUD])
        .policy("echo.toml", ECHO_POLICY)
        .policy("other.toml", OTHER_POLICY)
        .set("proxy.routes.echo.upstream", url)
        .set("proxy.routes.echo.audience", "https://echo.test")
        .set("proxy.routes.echo.secret_file", secret_path)
        .set("proxy.routes.echo.present", "private_token")
        .set("proxy.routes.echo.allow_insecure_http", true)
        .start();
    World {
        dev,
        c,
        echo,
        _secret_dir: secret_dir,
    }
}

impl World {
    async fn token(&self, project: &str, role: &str) -> String {
        let ns = if project == "77" { "8" } else { "7" };
        let id = self.dev.id_token(project, ns).await;
        let (status, body) = self.c.exchange(&id, role, None).await;
        assert_eq!(status, 200, "{body}\n{}", self.c.logs());
        body["access_token"].as_str().unwrap().to_owned()
    }

    fn url(&self, path: &str) -> String {
        format!("{}/proxy/echo{path}", self.c.base_url())
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.c.http().get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    /// Sends `head` (request line and headers, CRLF-separated, without the
    /// final blank line) and `body` as raw bytes: no client normalizes the
    /// path first. Returns the status and the response text.
    async fn raw(&self, head: &str, body: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(self.c.base_url().trim_start_matches("http://"))
            .await
            .unwrap();
        let msg = format!("{head}\r\nConnection: close\r\n\r\n{body}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, text)
    }

    fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            self.c.data_dir().join("data/cistern.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap()
    }

    /// The proxy's audit records (kind, reason, detail), waiting until at
    /// least `n` are written (the queue writes them after the response).
    async fn proxy_audit(&self, n: usize) -> Vec<(String, Option<String>, Value)> {
        for _ in 0..200 {
            let rows: Vec<(String, Option<String>, String)> = {
                let db = self.db();
                let mut st = db
                    .prepare(
                        "SELECT kind, reason, detail FROM audit
                         WHERE kind IN ('proxy_request', 'proxy_denied') ORDER BY seq",
                    )
                    .unwrap();
                st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect()
            };
            if rows.len() >= n {
                return rows
                    .into_iter()
                    .map(|(k, r, d)| (k, r, serde_json::from_str(&d).unwrap()))
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("fewer than {n} proxy audit records were written");
    }
}

fn header<'a>(seen: &'a Seen, name: &str) -> Vec<&'a str> {
    seen.headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_injected_credential_reaches_the_upstream_and_spoofed_headers_do_not() {
    let w = start().await;
    let token = w.token("42", "echo").await;
    let res =
        w.c.http()
            .post(w.url("/projects/42/issues?state=opened"))
            .bearer_auth(&token)
            .header("PRIVATE-TOKEN", "glpat-the-jobs-own")
            .header("X-Forwarded-User", "root")
            .header("X-Forwarded-For", "10.0.0.1")
            .header("X-Original-URL", "/projects/43/issues")
            .header("X-Auth-Request-Email", "admin@example.com")
            .header("Forwarded", "for=10.0.0.1")
            .header("Connection", "X-Keep-This-Hop, keep-alive")
            .header("X-Keep-This-Hop", "1")
            .header("Cookie", "_gitlab_session=stolen")
            .header("Content-Type", "application/json")
            .body(r#"{"title":"t"}"#)
            .send()
            .await
            .unwrap();
    assert_eq!(res.status(), 200, "{}", w.c.logs());
    let seen = w.echo.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.method, "POST");
    assert_eq!(s.path_and_query, "/base/projects/42/issues?state=opened");
    assert_eq!(header(s, "private-token"), [ROUTE_SECRET]);
    for gone in [
        "authorization",
        "x-forwarded-user",
        "x-forwarded-for",
        "x-original-url",
        "x-auth-request-email",
        "forwarded",
        "x-keep-this-hop",
        "cookie",
    ] {
        assert!(
            header(s, gone).is_empty(),
            "{gone} reached the upstream: {s:?}"
        );
    }
    assert_eq!(header(s, "content-type"), ["application/json"]);
    assert_eq!(s.body_bytes, 13);
    assert!(
        !s.headers.iter().any(|(_, v)| v.contains(&token)),
        "the cistern token reached the upstream"
    );

    // Underscore spellings (which some servers fold into dashes) are stripped too.
    let (status, text) = w
        .raw(
            &format!(
                "GET /proxy/echo/projects/42 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nprivate_token: glpat-underscore\r\nX_Forwarded_User: root"
            ),
            "",
        )
        .await;
    assert_eq!(status, 200, "{text}");
    let s = w.echo.seen().pop().unwrap();
    assert_eq!(header(&s, "private-token"), [ROUTE_SECRET]);
    assert!(header(&s, "private_token").is_empty() && header(&s, "x_forwarded_user").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_normalized_once_and_authorized_as_forwarded() {
    let w = start().await;
    let token = w.token("42", "echo").await;
    let auth = format!("Host: x\r\nAuthorization: Bearer {token}");
    // (raw path, expected status, what the upstream receives when forwarded)
    let cases: &[(&str, u16, Option<&str>)] = &[
        (
            "/proxy/echo/projects/42/issues",
            200,
            Some("/base/projects/42/issues"),
        ),
        (
            "/proxy/echo//projects//42/./issues/",
            200,
            Some("/base/projects/42/issues/"),
        ),
        (
            "/proxy/echo/projects/42/x/../issues",
            200,
            Some("/base/projects/42/issues"),
        ),
        // A dot segment escaping the job's project, plain or encoded: refused.
        ("/proxy/echo/projects/42/../43/issues", 403, None),
        ("/proxy/echo/projects/42/%2e%2e/43/issues", 403, None),
        (
            "/proxy/echo/projects/42/%2E%2E/%2e%2e/projects/43",
            403,
            None,
        ),
        // An encoded slash is data inside one segment, the same upstream.
        (
            "/proxy/echo/projects/42/..%2f43",
            200,
            Some("/base/projects/42/..%2F43"),
        ),
        // Unreserved escapes are decoded the same way for matching and forwarding.
        (
            "/proxy/echo/projects/%34%32/issues",
            200,
            Some("/base/projects/42/issues"),
        ),
        // The project path template is one encoded segment.
        (
            "/proxy/echo/projects/acme%2Fpayments/meta",
            200,
            Some("/base/projects/acme%2Fpayments/meta"),
        ),
        ("/proxy/echo/projects/acme/payments/meta", 403, None),
        // Parameters, backslashes and escapes that hide control bytes: refused.
        ("/proxy/echo/projects/42;x=1/issues", 400, None),
        ("/proxy/echo/projects/42/%00", 400, None),
        ("/proxy/echo/projects/42/%zz", 400, None),
        // Leaving the route's prefix: refused, never forwarded elsewhere.
        ("/proxy/echo/../../oauth/token", 400, None),
        ("/proxy/echo/%2e%2e/%2e%2e/v1/admin/revoke", 400, None),
        // The query is not part of the match.
        ("/proxy/echo/projects/43?x=/projects/42", 403, None),
        (
            "/proxy/echo/projects/42?next=/projects/43",
            200,
            Some("/base/projects/42?next=/projects/43"),
        ),
    ];
    for (path, status, forwarded) in cases {
        w.echo.clear();
        let (got, text) = w.raw(&format!("GET {path} HTTP/1.1\r\n{auth}"), "").await;
        assert_eq!(got, *status, "{path}: {text}");
        let seen = w.echo.seen();
        match forwarded {
            Some(p) => {
                assert_eq!(seen.len(), 1, "{path}");
                assert_eq!(seen[0].path_and_query, *p, "{path}");
            }
            None => assert!(seen.is_empty(), "{path} reached the upstream: {seen:?}"),
        }
    }
    // Spoofed original-URL headers change nothing: the path forwarded is the path authorized.
    w.echo.clear();
    let (got, _) = w
        .raw(
            &format!("GET /proxy/echo/projects/43/issues HTTP/1.1\r\n{auth}\r\nX-Original-URL: /projects/42/issues\r\nX-Forwarded-Uri: /projects/42/issues\r\nX-Rewrite-URL: /projects/42/issues"),
            "",
        )
        .await;
    assert_eq!(got, 403);
    assert!(w.echo.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_rule_family_are_audited_and_never_reach_the_upstream() {
    let w = start().await;
    let token = w.token("42", "echo").await;
    let other = w.token("42", "other").await;

    let (s, body) = w.get("/projects/42", None).await;
    assert_eq!((s, body["error"].as_str()), (401, Some("invalid_token")));
    let (s, _) = w.get("/projects/42", Some("not.a.token")).await;
    assert_eq!(s, 401);
    let (s, body) = w.get("/projects/42", Some(&other)).await;
    assert_eq!(s, 403);
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("(audience)"),
        "{body}"
    );
    let (s, body) = w.get("/projects/43", Some(&token)).await;
    assert_eq!(s, 403);
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("(path)"),
        "{body}"
    );
    let res =
        w.c.http()
            .delete(w.url("/projects/42/issues/1"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
    assert_eq!(res.status(), 403);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("(method)"),
        "{body}"
    );
    // The 403 names the family, never the rule itself.
    assert!(!body.to_string().contains("job_project_id"), "{body}");

    // Ambiguous framing (P6): hyper frames by Transfer-Encoding, drops the
    // Content-Length and closes the connection after answering (RFC 9112
    // §6.3), and cistern forwards with its own framing, never the client's:
    // a request smuggled behind the chunked body never runs.
    let auth = format!("Host: x\r\nAuthorization: Bearer {token}");
    let smuggled = format!("GET /proxy/echo/projects/42/smuggled HTTP/1.1\r\n{auth}\r\n\r\n");
    let (s, text) = w
        .raw(
            &format!(
                "POST /proxy/echo/projects/42/issues HTTP/1.1\r\n{auth}\r\nContent-Length: {}\r\nTransfer-Encoding: chunked",
                5 + smuggled.len()
            ),
            &format!("0\r\n\r\n{smuggled}"),
        )
        .await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "a second response: {text}"
    );
    let seen = w.echo.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!((seen[0].method.as_str(), seen[0].body_bytes), ("POST", 0));
    assert!(header(&seen[0], "content-length").len() <= 1);
    w.echo.clear();
    // Protocol upgrades are refused before anything is forwarded.
    let (s, _) = w
        .raw(
            &format!("GET /proxy/echo/projects/42 HTTP/1.1\r\n{auth}\r\nConnection: Upgrade\r\nUpgrade: websocket"),
            "",
        )
        .await;
    assert_eq!(s, 400);
    assert!(w.echo.seen().is_empty(), "{:?}", w.echo.seen());

    // A request that is forwarded, for the audit below.
    let (s, _) = w.get("/projects/42/issues", Some(&token)).await;
    assert_eq!(s, 200);

    let records = w.proxy_audit(8).await;
    let denied: Vec<&str> = records
        .iter()
        .filter(|(k, _, _)| k == "proxy_denied")
        .filter_map(|(_, r, _)| r.as_deref())
        .collect();
    for family in [
        "missing", "invalid", "audience", "path", "method", "upgrade",
    ] {
        assert!(denied.contains(&family), "no {family} denial in {denied:?}");
    }
    let granted: Vec<&Value> = records
        .iter()
        .filter(|(k, _, _)| k == "proxy_request")
        .map(|(_, _, d)| d)
        .collect();
    let g = granted.last().unwrap();
    assert_eq!(g["method"], "GET");
    assert_eq!(g["path"], "/projects/42/issues");
    assert_eq!(g["status"], 200);
    assert_eq!(g["route"], "echo");
    assert_eq!(g["rule"], "GET,POST /projects/{job_project_id}/**");
    assert!(g["response_bytes"].as_u64().unwrap() > 0, "{g}");
    assert!(g["jti"].is_string() && g["job_id"].is_string(), "{g}");
    let all = format!("{records:?}{}", w.c.logs());
    for secret in [token.as_str(), other.as_str(), ROUTE_SECRET] {
        assert!(
            !all.contains(secret),
            "a secret reached the audit log or logs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_from_the_next_request_on() {
    let w = start().await;
    let token = w.token("42", "echo").await;
    let keep = w.token("42", "echo").await;
    for _ in 0..20 {
        assert_eq!(w.get("/projects/42", Some(&token)).await.0, 200);
    }
    let res =
        w.c.http()
            .post(format!("{}/oauth/revoke", w.c.base_url()))
            .form(&[("token", token.as_str())])
            .send()
            .await
            .unwrap();
    assert_eq!(res.status(), 200);
    // The very next request, and every one after, is refused; the token was
    // verified and cached before, so this is the per-request check.
    for _ in 0..20 {
        let (s, body) = w.get("/projects/42", Some(&token)).await;
        assert_eq!(s, 401, "{body}");
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains("(revoked)")
        );
    }
    // Another job's token is untouched.
    assert_eq!(w.get("/projects/42", Some(&keep)).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_capped_and_requests_beyond_the_cap_wait() {
    let (echo, url) = Echo::start().await;
    let dev = DevIssuer::start();
    let (_secret_dir, secret_path) = secret_file();
    let c = CisternBuilder::new()
        .issuer("gitlab", &dev.issuer_url(), &[AUD])
        .policy("echo.toml", ECHO_POLICY)
        .set("proxy.routes.echo.upstream", url)
        .set("proxy.routes.echo.audience", "https://echo.test")
        .set("proxy.routes.echo.secret_file", secret_path)
        .set("proxy.routes.echo.present", "private_token")
        .set("proxy.routes.echo.allow_insecure_http", true)
        .set("proxy.routes.echo.max_connections", 2)
        .start();
    let id = dev.id_token("42", "7").await;
    let (status, body) = c.exchange(&id, "echo", None).await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap().to_owned();
    // Eight streamed downloads at once (three 64 KiB frames, 20 ms apart,
    // each): a streamed response holds its connection until it ends.
    let url = format!("{}/proxy/echo/slow/3", c.base_url());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (http, url, token) = (c.http().clone(), url.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            let res = http.get(url).bearer_auth(token).send().await.unwrap();
            (res.status().as_u16(), res.bytes().await.unwrap().len())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), (200, 3 * 64 * 1024));
    }
    let most = echo.max_in_flight.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&most),
        "the upstream saw {most} requests at once through a route capped at 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn location_and_link_headers_point_back_at_the_proxy() {
    let w = start().await;
    let token = w.token("42", "echo").await;
    let res =
        w.c.http()
            .get(w.url("/redirect"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
    assert_eq!(res.status(), 302);
    let base = format!("{}/proxy/echo", w.c.base_url());
    assert_eq!(
        res.headers()["location"],
        format!("{base}/projects/42/next").as_str()
    );
    assert_eq!(
        res.headers()["link"],
        format!("<{base}/projects/42/items?page=2>; rel=\"next\"").as_str()
    );
}

fn rss_high_water_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_with_bounded_memory() {
    const SIZE: u64 = 256 * 1024 * 1024;
    let w = start().await;
    let token = w.token("42", "echo").await;
    // Warm up, then take the high-water mark.
    assert_eq!(w.get("/projects/42", Some(&token)).await.0, 200);
    let before = rss_high_water_kb(w.c.pid());

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Zeros>();
    let req = http::Request::put(w.url("/upload"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-length", SIZE.to_string())
        .body(Zeros { left: SIZE })
        .unwrap();
    let res = client.request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let echoed: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echoed["body_bytes"], SIZE);

    let res =
        w.c.http()
            .get(w.url(&format!("/download/{SIZE}")))
            .bearer_auth(&token)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .unwrap();
    assert_eq!(res.status(), 200);
    let mut got = 0u64;
    let mut res = res;
    while let Some(chunk) = res.chunk().await.unwrap() {
        got += chunk.len() as u64;
    }
    assert_eq!(got, SIZE);

    let after = rss_high_water_kb(w.c.pid());
    // 512 MiB went through; memory may not grow by more than a few buffers.
    assert!(
        after.saturating_sub(before) < 32 * 1024,
        "RSS high-water mark grew from {before} kB to {after} kB"
    );
    let records = w.proxy_audit(3).await;
    let sizes: Vec<(u64, u64)> = records
        .iter()
        .filter(|(k, _, _)| k == "proxy_request")
        .map(|(_, _, d)| {
            (
                d["request_bytes"].as_u64().unwrap(),
                d["response_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(sizes.iter().any(|(req, _)| *req == SIZE), "{sizes:?}");
    assert!(sizes.iter().any(|(_, res)| *res == SIZE), "{sizes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_gitlab_uses_gitlab_through_the_proxy_with_only_a_cistern_token() {
    if !require_prism() || !require_peers() {
        return;
    }
    let prism = Prism::start();
    let front = GitLabFront::start(&prism.url()).await;
    let dev = DevIssuer::start();
    let (_secret_dir, secret_path) = secret_file();
    let c = CisternBuilder::new()
        .issuer("gitlab", &dev.issuer_url(), &[AUD])
        .policy(
            "gitlab-api.toml",
            r#"
role = "gitlab-api"
owner = "team-platform"
description = "Read its own project's access tokens through the proxy"
issuer = "gitlab"
[bindings]
project_id = "42"
[grant]
kind = "access_token"
audience = "https://gitlab-proxy.test"
scopes = ["read_api"]
ttl = "10m"
proxy = ["GET /api/v4/projects/{job_project_id}/**"]
"#,
        )
        .set("proxy.routes.gitlab.upstream", front.url())
        .set("proxy.routes.gitlab.audience", "https://gitlab-proxy.test")
        .set("proxy.routes.gitlab.secret_file", secret_path)
        .set("proxy.routes.gitlab.present", "private_token")
        .set("proxy.routes.gitlab.allow_insecure_http", true)
        .start();
    let id = dev.id_token("42", "7").await;
    let (status, body) = c.exchange(&id, "gitlab-api", None).await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap().to_owned();
    let proxy_url = format!("{}/proxy/gitlab", c.base_url());

    let (code, out) = run_python_async(
        "gitlab_client.py",
        &[
            "--url",
            &proxy_url,
            "--oauth-token",
            &token,
            "--project",
            "42",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}\n{}\n{}", c.logs(), prism.log());
    assert_eq!(out["ok"], true, "{out}");

    let (code, out) = run_python_async(
        "gitlab_client.py",
        &[
            "--url",
            &proxy_url,
            "--oauth-token",
            &token,
            "--project",
            "43",
        ],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert_eq!(out["status"], 403, "{out}");

    let recorded = front.requests();
    assert_eq!(
        recorded.len(),
        1,
        "only the allowed call reaches GitLab: {recorded:#?}"
    );
    let r = &recorded[0];
    assert_eq!(r.path(), "/api/v4/projects/42/access_tokens");
    assert_eq!(r.private_token.as_deref(), Some(ROUTE_SECRET));
    assert_eq!(r.authorization, None, "the cistern token reached GitLab");
    assert_eq!(
        r.upstream_status,
        Some(200),
        "Prism refused: {:?}",
        r.violations
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cistern_proxy_runs_alone_and_follows_the_servers_revocations() {
    let (echo, url) = Echo::start().await;
    let dev = DevIssuer::start();
    let (_secret_dir, secret_path) = secret_file();
    let proxy_port = common::free_port();
    let c = CisternBuilder::new()
        .issuer("gitlab", &dev.issuer_url(), &[AUD])
        .policy("echo.toml", ECHO_POLICY)
        .set("proxy.listen", format!("127.0.0.1:{proxy_port}"))
        .set("proxy.routes.echo.upstream", url)
        .set("proxy.routes.echo.audience", "https://echo.test")
        .set("proxy.routes.echo.secret_file", secret_path)
        .set("proxy.routes.echo.present", "bearer")
        .set("proxy.routes.echo.allow_insecure_http", true)
        .set("revocation.poll_interval", "50ms")
        .start();
    let (proxy, addr) = Spawned::start(
        "cistern proxy",
        std::process::Command::new(env!("CARGO_BIN_EXE_cistern"))
            .args(["proxy", "--config"])
            .arg(c.config_path()),
        "cistern: proxy listening on ",
    );
    assert_eq!(addr, format!("127.0.0.1:{proxy_port}"));
    let id = dev.id_token("42", "7").await;
    let (status, body) = c.exchange(&id, "echo", None).await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap().to_owned();
    let base = format!("http://{addr}/proxy/echo");
    let get = |path: &str| {
        c.http()
            .get(format!("{base}{path}"))
            .bearer_auth(&token)
            .send()
    };
    let res = get("/projects/42").await.unwrap();
    assert_eq!(res.status(), 200, "{}", proxy.stderr());
    let seen = echo.seen();
    assert_eq!(
        header(&seen[0], "authorization"),
        [format!("Bearer {ROUTE_SECRET}").as_str()]
    );
    assert_eq!(get("/projects/43").await.unwrap().status(), 403);
    let ops = c
        .http()
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(ops.contains("cistern_proxy_requests_total"), "{ops}");

    // Revoked at the server: the proxy process learns it from the store.
    let res = c
        .http()
        .post(format!("{}/oauth/revoke", c.base_url()))
        .form(&[("token", token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut refused = false;
    for _ in 0..200 {
        if get("/projects/42").await.unwrap().status() == 401 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        refused,
        "the proxy never saw the revocation\n{}",
        proxy.stderr()
    );
    // Once refused, always refused.
    for _ in 0..5 {
        assert_eq!(get("/projects/42").await.unwrap().status(), 401);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_route_secret_is_set_and_replaced_by_the_cli_without_a_restart() {
    use base64::Engine as _;
    let (echo, url) = Echo::start().await;
    let dev = DevIssuer::start();
    let kek_dir = tempfile::tempdir().unwrap();
    let kek_path = kek_dir.path().join("kek");
    std::fs::write(
        &kek_path,
        base64::engine::general_purpose::STANDARD.encode([7u8; 32]),
    )
    .unwrap();
    let c = CisternBuilder::new()
        .issuer("gitlab", &dev.issuer_url(), &[AUD])
        .policy("echo.toml", ECHO_POLICY)
        .set("proxy.secret_refresh", "50ms")
        .set("proxy.routes.echo.upstream", url)
        .set("proxy.routes.echo.audience", "https://echo.test")
        .set("proxy.routes.echo.sealed", true)
        .set(
            "proxy.routes.echo.kek_file",
            kek_path.to_string_lossy().into_owned(),
        )
        .set("proxy.routes.echo.present", "header")
        .set("proxy.routes.echo.header_name", "X-Api-Key")
        .set("proxy.routes.echo.allow_insecure_http", true)
        .start();
    let id = dev.id_token("42", "7").await;
    let (status, body) = c.exchange(&id, "echo", None).await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap().to_owned();
    let url = format!("{}/proxy/echo/projects/42", c.base_url());

    // No secret sealed yet: the route refuses to forward, the server runs.
    let res = c.http().get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 502);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("(credential)"),
        "{body}"
    );
    assert!(echo.seen().is_empty());

    let set = |secret: &'static str| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cistern"))
            .args(["route", "set-secret", "echo", "--config"])
            .arg(c.config_path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{secret}\n").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let mut cli_output = String::new();
    for secret in ["sealed-secret-one", "sealed-secret-two"] {
        cli_output.push_str(&set(secret));
        let mut injected = false;
        for _ in 0..200 {
            echo.clear();
            let res = c.http().get(&url).bearer_auth(&token).send().await.unwrap();
            if res.status() == 200
                && echo
                    .seen()
                    .iter()
                    .any(|s| header(s, "x-api-key") == [secret])
            {
                injected = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            injected,
            "{secret} never reached the upstream\n{}",
            c.logs()
        );
    }
    // Sealed at rest: neither secret is in the database, the logs or the CLI's output.
    let mut raw = Vec::new();
    for entry in std::fs::read_dir(c.data_dir().join("data")).unwrap() {
        raw.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let raw = String::from_utf8_lossy(&raw);
    for secret in ["sealed-secret-one", "sealed-secret-two"] {
        assert!(
            !raw.contains(secret),
            "{secret} is in the store in the clear"
        );
        assert!(!c.logs().contains(secret) && !cli_output.contains(secret));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_upstream_is_reached_over_http2_with_the_routes_ca_and_refused_without_it() {
    let certs = tempfile::tempdir().unwrap();
    common::test_ca(certs.path());
    let (echo, url) = Echo::start_tls(certs.path()).await;
    let dev = DevIssuer::start();
    let (_secret_dir, secret_path) = secret_file();
    let untrusted = ECHO_POLICY
        .replace("role = \"echo\"", "role = \"untrusted\"")
        .replace("https://echo.test", "https://untrusted.test");
    let mut b = CisternBuilder::new()
        .issuer("gitlab", &dev.issuer_url(), &[AUD])
        .policy("echo.toml", ECHO_POLICY)
        .policy("untrusted.toml", &untrusted);
    for (route, aud, ca) in [
        (
            "echo",
            "https://echo.test",
            Some(certs.path().join("ca.pem")),
        ),
        ("untrusted", "https://untrusted.test", None),
    ] {
        b = b
            .set(&format!("proxy.routes.{route}.upstream"), url.clone())
            .set(&format!("proxy.routes.{route}.audience"), aud)
            .set(
                &format!("proxy.routes.{route}.secret_file"),
                secret_path.clone(),
            )
            .set(&format!("proxy.routes.{route}.present"), "bearer");
        if let Some(ca) = ca {
            b = b.set(
                &format!("proxy.routes.{route}.ca_file"),
                ca.to_string_lossy().into_owned(),
            );
        }
    }
    let c = b.start();
    let token = |role: &'static str| {
        let (dev, c) = (&dev, &c);
        async move {
            let id = dev.id_token("42", "7").await;
            let (status, body) = c.exchange(&id, role, None).await;
            assert_eq!(status, 200, "{body}");
            body["access_token"].as_str().unwrap().to_owned()
        }
    };
    let t = token("echo").await;
    let res = c
        .http()
        .get(format!("{}/proxy/echo/projects/42/x", c.base_url()))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", c.logs());
    let seen = echo.seen();
    assert_eq!(seen[0].version, "HTTP/2.0", "{seen:?}");
    assert_eq!(seen[0].path_and_query, "/base/projects/42/x");
    assert_eq!(
        header(&seen[0], "authorization"),
        [format!("Bearer {ROUTE_SECRET}").as_str()]
    );

    // The same upstream without the route's CA: the system roots do not
    // trust it, so nothing is forwarded.
    echo.clear();
    let t = token("untrusted").await;
    let res = c
        .http()
        .get(format!("{}/proxy/untrusted/projects/42/x", c.base_url()))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    assert!(echo.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_route_takes_every_path_on_its_host_and_nothing_else() {
    let (echo, url) = Echo::start().await;
    let dev = DevIssuer::start();
    let (_secret_dir, secret_path) = secret_file();
    let c = CisternBuilder::new()
        .issuer("gitlab", &dev.issuer_url(), &[AUD])
        .policy("echo.toml", ECHO_POLICY)
        .set("proxy.routes.echo.host", "gitlab-proxy.test")
        .set("proxy.routes.echo.upstream", url)
        .set("proxy.routes.echo.audience", "https://echo.test")
        .set("proxy.routes.echo.secret_file", secret_path)
        .set("proxy.routes.echo.present", "private_token")
        .set("proxy.routes.echo.allow_insecure_http", true)
        .start();
    let id = dev.id_token("42", "7").await;
    let (status, body) = c.exchange(&id, "echo", None).await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap().to_owned();
    let w = World {
        dev,
        c,
        echo,
        _secret_dir: tempfile::tempdir().unwrap(),
    };
    let get = |host: &str, path: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}")
    };
    let (s, text) = w
        .raw(&get("GitLab-Proxy.test:443", "/projects/42/issues"), "")
        .await;
    assert_eq!(s, 200, "{text}");
    assert_eq!(w.echo.seen()[0].path_and_query, "/base/projects/42/issues");
    // On the route's host, cistern's own paths are the upstream's too (and
    // this role may not call them there).
    w.echo.clear();
    let (s, _) = w.raw(&get("gitlab-proxy.test", "/oauth/token"), "").await;
    assert_eq!(s, 403);
    assert!(w.echo.seen().is_empty());
    // Another host reaches cistern's API, not the route.
    let (s, _) = w.raw(&get("127.0.0.1", "/projects/42/issues"), "").await;
    assert_eq!(s, 404);
    let (s, _) = w.raw(&get("127.0.0.1", "/healthz"), "").await;
    assert_eq!(s, 200);
    assert!(w.echo.seen().is_empty());
    drop(w.dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    // HTTP/1 half-close (src/http/serve.rs): a client may shut down its
    // sending side once the request is out. The answer (a slow, streamed
    // one) must still come, not a connection dropped as "EOF mid-request".
    let w = start().await;
    let token = w.token("42", "echo").await;
    let mut s = tokio::net::TcpStream::connect(w.c.base_url().trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "GET /proxy/echo/slow/3 HTTP/1.1\r\nHost: cistern.test\r\n\
         Authorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
        .await
        .expect("the answer came")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(300)]
    );
    // Three 64 KiB frames of 1s after the head (chunk framing aside).
    assert!(
        out.iter().filter(|b| **b == 1).count() >= 3 * 64 * 1024,
        "the whole body came"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_an_in_flight_proxied_download_and_writes_its_record() {
    let mut w = start().await;
    let token = w.token("42", "echo").await;
    const CHUNKS: u32 = 40;
    let mut res =
        w.c.http()
            .get(w.url(&format!("/slow/{CHUNKS}")))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
    assert_eq!(res.status(), 200);
    let mut got = res.chunk().await.unwrap().map_or(0, |c| c.len());
    assert!(got > 0);
    // SIGTERM while the body is still streaming.
    let status = std::process::Command::new("kill")
        .args(["-TERM", &w.c.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    while let Some(chunk) = res.chunk().await.unwrap() {
        got += chunk.len();
    }
    assert_eq!(
        got,
        CHUNKS as usize * 64 * 1024,
        "the download was cut short"
    );
    let exit = tokio::task::block_in_place(|| w.c.wait_exit(Duration::from_secs(20)));
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}\n{}",
        w.c.logs()
    );
    // The drained request's record was written before the process ended.
    let db = w.db();
    let bytes: i64 = db
        .query_row(
            "SELECT json_extract(detail, '$.response_bytes') FROM audit
             WHERE kind = 'proxy_request' AND json_extract(detail, '$.path') = ?1",
            [format!("/slow/{CHUNKS}")],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(bytes, i64::from(CHUNKS) * 64 * 1024);
}
