//! Integration-test harness: third-party peers and the cistern binary as
//! child processes on 127.0.0.1.
//!
//! Every test file does `mod common;`. Peers live in `tests/peers` and are
//! installed by `scripts/install-test-peers.sh`; tests that need them start
//! with `if !common::require_peers() { return; }`.
//!
//! Children are killed on drop, are told to exit when the test process's
//! stdin pipe to them closes (so a crashed test leaves nothing behind), and
//! have their stderr kept in a temp file that is shown when they fail.
//! Every wait is bounded. This is test code: failures panic with a message
//! that says what to look at.

#![allow(dead_code)] // not every test file uses every helper

use std::collections::BTreeMap;
use std::fmt::Display;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// How long a peer or cistern gets to print its listening line. Generous:
/// on two cores, with the whole suite starting node peers in parallel, a
/// peer once took over 30 s; this is a bound on a hang, not a speed check.
pub const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long one peer script (`run_node`, `run_python`) may run.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one HTTP call to a peer may take.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound on a child's life, passed to the peers.
const PEER_MAX_LIFETIME_SECS: &str = "1800";

/// Panics with context instead of `unwrap()`/`expect()` (harness failures
/// are test failures).
pub trait OrFail<T> {
    /// The value, or a panic naming `what` and the cause.
    fn or_fail(self, what: &str) -> T;
}

impl<T, E: Display> OrFail<T> for Result<T, E> {
    fn or_fail(self, what: &str) -> T {
        match self {
            Ok(v) => v,
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

impl<T> OrFail<T> for Option<T> {
    fn or_fail(self, what: &str) -> T {
        match self {
            Some(v) => v,
            None => panic!("{what}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Peer installation

/// `tests/peers` in this checkout.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// The venv's Python interpreter.
pub fn venv_python() -> PathBuf {
    peers_dir().join(".venv/bin/python")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether the npm packages (Prism's `prism` binary included) and the Python
/// venv (python-gitlab included) are installed.
pub fn peers_available() -> bool {
    let dir = peers_dir();
    let npm = [
        "oidc-provider",
        "jose",
        "oauth4webapi",
        "@stoplight/prism-cli",
    ]
    .iter()
    .all(|p| {
        dir.join("node_modules")
            .join(p)
            .join("package.json")
            .is_file()
    });
    npm && prism_bin().is_file()
        && venv_python().is_file()
        && venv_has_package("gitlab")
        && Command::new("node").arg("--version").output().is_ok()
}

/// Whether the venv's site-packages holds the import package `name`.
fn venv_has_package(name: &str) -> bool {
    let Ok(entries) = fs::read_dir(peers_dir().join(".venv/lib")) else {
        return false;
    };
    entries.flatten().any(|e| {
        e.path()
            .join("site-packages")
            .join(name)
            .join("__init__.py")
            .is_file()
    })
}

/// True when the peers are installed. Otherwise: panics under `CI=true`
/// (peer tests must run in CI), else prints a skip notice and returns false.
pub fn require_peers() -> bool {
    if peers_available() {
        return true;
    }
    if in_ci() {
        panic!(
            "test peers are not installed in {} (CI=true): scripts/install-test-peers.sh must run first",
            peers_dir().display()
        );
    }
    eprintln!("skipping: test peers not installed; run scripts/install-test-peers.sh");
    false
}

/// `tests/peers/node_modules/.bin/prism`: Prism's CLI (npm `@stoplight/prism-cli`).
pub fn prism_bin() -> PathBuf {
    peers_dir().join("node_modules/.bin/prism")
}

/// GitLab's OpenAPI contract for the access-token endpoints, in the variant
/// Prism can serve: `tests/fixtures/gitlab/gitlab-openapi.prism.yaml`.
pub fn gitlab_openapi_spec() -> PathBuf {
    // A copy of ../shared/gitlab/gitlab-openapi.prism.yaml (GitLab's own
    // OpenAPI v3 extract, normalised for Prism), kept in the repository so
    // the contract tests run on a clean clone with nothing beside it.
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gitlab/gitlab-openapi.prism.yaml")
}

/// Whether [`Prism`] can start: its binary, the spec and `node` are there.
pub fn prism_available() -> bool {
    prism_bin().is_file()
        && gitlab_openapi_spec().is_file()
        && Command::new("node").arg("--version").output().is_ok()
}

/// True when [`Prism`] can start. Otherwise: panics under `CI=true`, else
/// prints a skip notice (saying what is missing) and returns false.
pub fn require_prism() -> bool {
    if prism_available() {
        return true;
    }
    let missing = if !prism_bin().is_file() {
        format!(
            "Prism is not installed ({} is missing): run scripts/install-test-peers.sh",
            prism_bin().display()
        )
    } else if !gitlab_openapi_spec().is_file() {
        format!(
            "GitLab's OpenAPI spec is missing at {}",
            gitlab_openapi_spec().display()
        )
    } else {
        "node is not on PATH".to_owned()
    };
    if in_ci() {
        panic!("{missing} (CI=true: the GitLab contract tests must run)");
    }
    eprintln!("skipping: {missing}");
    false
}

// ---------------------------------------------------------------------------
// Child processes

/// A running child with captured stderr, killed on drop.
struct Proc {
    name: String,
    child: Child,
    /// Held open so the child sees EOF when we go away.
    _stdin: Option<ChildStdin>,
    stderr_path: PathBuf,
    /// Every stdout line, when the spawner asked to keep them.
    stdout_path: Option<PathBuf>,
    /// Owns the stderr file (and anything else the child needs on disk).
    _tmp: tempfile::TempDir,
}

impl Proc {
    /// Spawns `cmd`, then waits for a stdout line starting with `prefix` and
    /// returns the rest of it. Later stdout lines are drained and discarded.
    fn spawn(name: &str, mut cmd: Command, prefix: &'static str) -> (Proc, String) {
        match Self::try_spawn(name, &mut cmd, prefix) {
            Ok(ok) => ok,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like `spawn`, but a child that fails to start is an `Err` carrying its stderr.
    fn try_spawn(
        name: &str,
        cmd: &mut Command,
        prefix: &'static str,
    ) -> Result<(Proc, String), String> {
        Self::try_spawn_matching(name, cmd, &format!("`{prefix}…`"), false, move |line| {
            line.strip_prefix(prefix).map(|rest| rest.trim().to_owned())
        })
    }

    /// The general form of [`Proc::try_spawn`]: waits (bounded by
    /// [`START_TIMEOUT`]) for the first stdout line on which `matcher` returns
    /// `Some`, and returns that. `what` names the awaited line in errors. With
    /// `keep_stdout`, every stdout line is also kept (see [`Proc::stdout`]);
    /// otherwise later lines are drained and discarded.
    fn try_spawn_matching(
        name: &str,
        cmd: &mut Command,
        what: &str,
        keep_stdout: bool,
        matcher: impl Fn(&str) -> Option<String> + Send + 'static,
    ) -> Result<(Proc, String), String> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("cistern-{name}-"))
            .tempdir()
            .or_fail("creating a temp dir");
        let stderr_path = tmp.path().join("stderr.log");
        let stderr = File::create(&stderr_path).or_fail("creating the stderr log");
        let stdout_path = keep_stdout.then(|| tmp.path().join("stdout.log"));
        let mut stdout_log = stdout_path
            .as_ref()
            .map(|p| File::create(p).or_fail("creating the stdout log"));
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{name}: cannot start {cmd:?}: {e}"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().or_fail("child stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(log) = stdout_log.as_mut() {
                    let _ = writeln!(log, "{line}");
                }
                if tx.is_some()
                    && let Some(found) = matcher(&line)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(found);
                }
            }
        });
        let mut proc = Proc {
            name: name.to_owned(),
            child,
            _stdin: stdin,
            stderr_path,
            stdout_path,
            _tmp: tmp,
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(rest) => Ok((proc, rest)),
            Err(e) => {
                let why = match e {
                    mpsc::RecvTimeoutError::Timeout => format!("within {START_TIMEOUT:?}"),
                    mpsc::RecvTimeoutError::Disconnected => "before closing stdout".to_owned(),
                };
                // Exit status before the kill: None means it was still running.
                let status = proc.child.try_wait().ok().flatten();
                proc.stop();
                Err(format!(
                    "{name} did not print {what} {why} (exit status: {status:?}); stderr:\n{}",
                    proc.stderr()
                ))
            }
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The stdout lines kept so far (empty unless spawned with `keep_stdout`).
    fn stdout(&self) -> String {
        self.stdout_path
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let exited_early = matches!(self.child.try_wait(), Ok(Some(_)));
        self.stop();
        if exited_early && thread::panicking() {
            eprintln!("--- {} exited early; stderr:\n{}", self.name, self.stderr());
        }
    }
}

fn node_command(script: &str) -> Command {
    let mut cmd = Command::new("node");
    cmd.arg(script)
        .current_dir(peers_dir())
        .env("PEER_MAX_LIFETIME_SECS", PEER_MAX_LIFETIME_SECS);
    cmd
}

// ---------------------------------------------------------------------------
// Issuer peers

/// Which issuer a [`Peer`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// `gitlab_issuer.mjs`: npm oidc-provider shaped like GitLab.
    GitlabIssuer,
    /// `jose_issuer.mjs`: node:http + jose with forgeries and failure modes.
    JoseIssuer,
}

/// A GitLab-like OIDC issuer peer on 127.0.0.1, killed on drop.
pub struct Peer {
    kind: PeerKind,
    url: String,
    proc: Proc,
    http: reqwest::Client,
}

impl Peer {
    /// Starts `gitlab_issuer.mjs` (oidc-provider).
    pub fn gitlab_issuer() -> Peer {
        Peer::start(PeerKind::GitlabIssuer)
    }

    /// Starts `jose_issuer.mjs`.
    pub fn jose_issuer() -> Peer {
        Peer::start(PeerKind::JoseIssuer)
    }

    /// Starts an issuer peer on a free port and waits until it listens.
    pub fn start(kind: PeerKind) -> Peer {
        let (name, script) = match kind {
            PeerKind::GitlabIssuer => ("gitlab-issuer", "gitlab_issuer.mjs"),
            PeerKind::JoseIssuer => ("jose-issuer", "jose_issuer.mjs"),
        };
        let mut cmd = node_command(script);
        // Exit when our end of its stdin closes: when this process dies.
        cmd.arg("0").env("PEER_EXIT_ON_STDIN_EOF", "1");
        let (proc, url) = Proc::spawn(name, cmd, "issuer listening on ");
        let http = reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .build()
            .or_fail("building an HTTP client");
        Peer {
            kind,
            url,
            proc,
            http,
        }
    }

    /// Which peer this is.
    pub fn kind(&self) -> PeerKind {
        self.kind
    }

    /// The issuer URL (`http://127.0.0.1:PORT`, no trailing slash): the `iss` of its tokens.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// GitLab's JWKS path on this issuer.
    pub fn jwks_url(&self) -> String {
        format!("{}/oauth/discovery/keys", self.url)
    }

    /// The OIDC discovery URL.
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.url)
    }

    /// What the peer wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }

    /// A fresh ID token (new jti) of `profile` (`main`, `env-prod`, `feature`,
    /// `tag`, `fork`, `other-ns`) for audience `aud`.
    pub async fn mint(&self, profile: &str, aud: &str) -> String {
        self.mint_with(serde_json::json!({ "profile": profile, "aud": aud }))
            .await
    }

    /// A fresh ID token from a JSON spec. Both peers take `profile`, `aud`
    /// (string or array), `ttl` (seconds) and `claims` (overrides, null
    /// deletes); the jose issuer also takes `header`, `forge`, `key` and
    /// `payload_json` (see `tests/peers/jose_issuer.mjs`).
    pub async fn mint_with(&self, spec: Value) -> String {
        let body = match self.kind {
            PeerKind::GitlabIssuer => {
                let mut q: Vec<(String, String)> = Vec::new();
                for (k, v) in spec.as_object().or_fail("mint spec must be a JSON object") {
                    match (k.as_str(), v) {
                        ("aud", Value::Array(auds)) => {
                            for a in auds {
                                q.push((
                                    "aud".into(),
                                    a.as_str().or_fail("aud entries are strings").into(),
                                ));
                            }
                        }
                        ("claims", c) => q.push(("claims".into(), c.to_string())),
                        (_, Value::String(s)) => q.push((k.clone(), s.clone())),
                        (_, other) => q.push((k.clone(), other.to_string())),
                    }
                }
                let url = reqwest::Url::parse_with_params(&format!("{}/mint", self.url), &q)
                    .or_fail("building the /mint URL");
                self.json(self.http.get(url)).await
            }
            PeerKind::JoseIssuer => {
                self.json(self.http.post(format!("{}/mint", self.url)).json(&spec))
                    .await
            }
        };
        body["token"]
            .as_str()
            .or_fail("the /mint answer has no token")
            .to_owned()
    }

    /// jose issuer: a new signing key; the old one leaves the JWKS unless
    /// `keep_old`. Returns `{kid, previous_kid}`.
    pub async fn rotate(&self, keep_old: bool) -> Value {
        self.require(PeerKind::JoseIssuer, "rotate");
        let req = self
            .http
            .post(format!("{}/rotate", self.url))
            .json(&serde_json::json!({ "keep_old": keep_old }));
        self.json(req).await
    }

    /// jose issuer: sets JWKS/discovery behaviour, e.g.
    /// `{"jwks": "slow", "delay_ms": 3000}`; modes ok|500|slow|huge|invalid_json.
    /// Fields not given return to their defaults.
    pub async fn set_behaviour(&self, behaviour: Value) -> Value {
        self.require(PeerKind::JoseIssuer, "set_behaviour");
        self.json(
            self.http
                .post(format!("{}/behaviour", self.url))
                .json(&behaviour),
        )
        .await
    }

    /// jose issuer: `{jwks_hits, discovery_hits, mints}`.
    pub async fn stats(&self) -> Value {
        self.require(PeerKind::JoseIssuer, "stats");
        self.json(self.http.get(format!("{}/stats", self.url)))
            .await
    }

    /// jose issuer: zeroes the hit counters.
    pub async fn reset_stats(&self) {
        self.require(PeerKind::JoseIssuer, "reset_stats");
        self.json(self.http.post(format!("{}/stats/reset", self.url)))
            .await;
    }

    fn require(&self, kind: PeerKind, what: &str) {
        assert_eq!(
            self.kind, kind,
            "{what} is only offered by the {kind:?} peer"
        );
    }

    async fn json(&self, req: reqwest::RequestBuilder) -> Value {
        let res = req.send().await.or_fail("calling the issuer peer");
        let status = res.status();
        let text = res.text().await.or_fail("reading the issuer peer's answer");
        assert!(
            status.is_success(),
            "issuer peer answered {status}: {text}\nstderr:\n{}",
            self.stderr()
        );
        serde_json::from_str(&text).or_fail("the issuer peer's answer is not JSON")
    }
}

// ---------------------------------------------------------------------------
// The refresh-token IdP: oidc-provider with authorization code + PKCE and
// single-use refresh tokens (tests/peers/oauth_refresh_idp.mjs).

/// True when node and the npm `oidc-provider` package are installed (all the
/// refresh-token tests need). Panics under `CI=true` otherwise.
pub fn require_oidc_provider() -> bool {
    let ok = peers_dir()
        .join("node_modules/oidc-provider/package.json")
        .is_file()
        && Command::new("node").arg("--version").output().is_ok();
    if ok {
        return true;
    }
    if in_ci() {
        panic!("npm oidc-provider is not installed in tests/peers (CI=true)");
    }
    eprintln!("skipping: oidc-provider not installed; run scripts/install-test-peers.sh");
    false
}

/// An OAuth authorization server with rotating refresh tokens, killed on drop.
pub struct RefreshIdp {
    url: String,
    proc: Proc,
    http: reqwest::Client,
}

impl RefreshIdp {
    /// Starts one whose client `cistern` has `client_secret`; a consumed
    /// refresh token stays usable for `grace_secs` (0: single use at once);
    /// access tokens live `access_ttl_secs`.
    pub fn start(client_secret: &str, grace_secs: u32, access_ttl_secs: u32) -> RefreshIdp {
        let mut cmd = node_command("oauth_refresh_idp.mjs");
        cmd.arg("0")
            .env("PEER_EXIT_ON_STDIN_EOF", "1")
            .env("CLIENT_SECRET", client_secret)
            .env("REUSE_GRACE_SECS", grace_secs.to_string())
            .env("ACCESS_TOKEN_TTL", access_ttl_secs.to_string());
        let (proc, url) = Proc::spawn("refresh-idp", cmd, "idp listening on ");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(40))
            .build()
            .or_fail("building an HTTP client");
        RefreshIdp { url, proc, http }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What the IdP wrote to stderr.
    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }

    async fn control(&self, method: reqwest::Method, path: &str) -> Value {
        let res = self
            .http
            .request(method, format!("{}/control/{path}", self.url))
            .send()
            .await
            .or_fail("calling the IdP's control route");
        assert!(
            res.status().is_success(),
            "control/{path}: {}",
            res.status()
        );
        res.json().await.or_fail("the IdP's control answer")
    }

    /// Holds the answer to the next refresh-token grant (after the IdP has
    /// rotated the token) until [`RefreshIdp::release`].
    pub async fn hold_next_refresh(&self) {
        self.control(reqwest::Method::POST, "hold").await;
    }

    /// Waits (≤ 30 s) until an answer is held; returns how many are.
    pub async fn wait_held(&self) -> u64 {
        self.control(reqwest::Method::GET, "held").await["held"]
            .as_u64()
            .or_fail("held count")
    }

    /// Sends the held answers.
    pub async fn release(&self) {
        self.control(reqwest::Method::POST, "release").await;
    }

    /// Every token the IdP issued, in order: `(kind, value)` with kind
    /// `refresh_token` or `access_token`.
    pub async fn issued(&self) -> Vec<(String, String)> {
        self.control(reqwest::Method::GET, "issued")
            .await
            .as_array()
            .or_fail("issued is a list")
            .iter()
            .map(|t| {
                (
                    t["kind"].as_str().or_fail("kind").to_owned(),
                    t["value"].as_str().or_fail("value").to_owned(),
                )
            })
            .collect()
    }

    /// Token requests by `grant_type:outcome`.
    pub async fn stats(&self) -> Value {
        self.control(reqwest::Method::GET, "stats").await
    }
}

// ---------------------------------------------------------------------------
// GitLab REST API stand-ins: Prism serving GitLab's OpenAPI contract, and a
// recording, fault-injecting front for it.

/// Prism (`@stoplight/prism-cli`, pinned in `tests/peers/package.json`)
/// mocking GitLab's REST API from [`gitlab_openapi_spec`] on 127.0.0.1;
/// killed on drop (and exits by itself when this test process goes away).
///
/// Requests go to `{url}/api/v4/…`, e.g.
/// `POST {url}/api/v4/projects/42/access_tokens`. How Prism 5.14 answers
/// (checked against this spec):
///
/// - **Valid requests** get the spec's static example with the documented
///   success status: `201` for create (`POST …/access_tokens`), `200` for
///   list/get/rotate, `204` for revoke (`DELETE …/access_tokens/{id}`). The
///   answer never echoes the request: create always returns the same token
///   (`id` 2, name `John Doe`, scopes `["api"]`, access_level 10,
///   `expires_at` `2026-01-31`, `token` `glpat-xxxxxxxxxxxxxxxxxxxx`).
/// - **Invalid requests** (schema, enum, `format: date`, missing required
///   field or body, wrong content type, bad query parameter) get `400`,
///   the operation's documented 4xx, whose body is the spec's *fixed example*
///   (`{"error":"scopes is missing"}` for create, whatever was wrong). The
///   actual violations are in the `sl-violations` response header, a JSON
///   array of `{location, severity, code, message}`, e.g. `Request body must
///   have required property 'scopes'` ([`Recorded::violations`] keeps it).
/// - **Content-Type**: the request body must be `application/json`
///   (parameters such as `; charset=utf-8` are fine). A form or `text/plain`
///   body is a 415 violation answered with `400`; no Content-Type at all is
///   read as a string (`Request body must be object`, `400`).
/// - **Auth**: the spec's security is `PRIVATE-TOKEN` header *or* HTTP
///   bearer. Prism checks presence only: any non-empty `PRIVATE-TOKEN` or any
///   `Authorization: Bearer …` passes; none, an empty one, or `Basic` gets
///   `401` `{"message":"401 Unauthorized"}`.
/// - Extra body properties are accepted (the schema does not forbid them).
/// - Unknown paths get `404` and unknown methods `405`, both Prism's own
///   `application/problem+json`, not GitLab-shaped.
/// - A `Prefer: code=404` request header picks another documented response.
pub struct Prism {
    url: String,
    proc: Proc,
}

impl Prism {
    /// Starts `prism mock -h 127.0.0.1 -p PORT SPEC` on a free port and
    /// waits (bounded by [`START_TIMEOUT`] for each) until it prints its
    /// listening line and answers HTTP. Blocking: call it before starting
    /// anything on the test's runtime that must keep serving meanwhile.
    pub fn start() -> Prism {
        let spec = gitlab_openapi_spec();
        assert!(
            spec.is_file(),
            "GitLab's OpenAPI spec is missing at {}",
            spec.display()
        );
        // The port is picked by binding :0 and releasing it; retry when taken.
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            // node --require: the pinned `.bin/prism` entry point, with the
            // peers' lifetime bounds (exit on stdin EOF) preloaded.
            let mut cmd = Command::new("node");
            cmd.arg("--require")
                .arg(peers_dir().join("_bound_lifetime.cjs"))
                .arg(prism_bin())
                .args(["mock", "-h", "127.0.0.1", "-p", &port.to_string()])
                .arg(&spec)
                .current_dir(peers_dir())
                .env("PEER_MAX_LIFETIME_SECS", PEER_MAX_LIFETIME_SECS)
                .env("PEER_EXIT_ON_STDIN_EOF", "1")
                .env("FORCE_COLOR", "0");
            let listening = |line: &str| {
                line.split_once("Prism is listening on ")
                    .map(|(_, url)| url.trim().trim_end_matches('/').to_owned())
            };
            match Proc::try_spawn_matching(
                "prism",
                &mut cmd,
                "`… Prism is listening on URL`",
                true,
                listening,
            ) {
                Ok((proc, url)) => {
                    let prism = Prism { url, proc };
                    prism.wait_http(port);
                    return prism;
                }
                Err(e) if e.contains("EADDRINUSE") => last = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("prism could not get a port: {last}");
    }

    /// Polls with a raw HTTP/1.1 GET until Prism answers anything.
    fn wait_http(&self, port: u16) {
        use std::io::Read as _;
        let deadline = Instant::now() + START_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let probe = format!(
            "GET /api/v4/projects/1/access_tokens HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
        );
        loop {
            let attempt = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(5)))?;
                    s.write_all(probe.as_bytes())?;
                    let mut head = [0u8; 12];
                    s.read_exact(&mut head)?;
                    Ok(String::from_utf8_lossy(&head).into_owned())
                });
            let last = match attempt {
                Ok(head) if head.starts_with("HTTP/1.") => return,
                Ok(head) => format!("answered {head:?}"),
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "prism did not answer HTTP on {addr} within {START_TIMEOUT:?} ({last}); stdout:\n{}\nstderr:\n{}",
                self.log(),
                self.stderr()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The GitLab base URL, `http://127.0.0.1:PORT` (no trailing slash, no
    /// `/api/v4`): what a GitLab client is configured with.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Prism's request log (its stdout) so far, violations included.
    pub fn log(&self) -> String {
        self.proc.stdout()
    }

    /// What Prism wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }
}

/// What [`GitLabFront`] does instead of plainly forwarding one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answers this status without forwarding, with a GitLab-style JSON error
    /// body `{"message":"<code> <reason>"}`, e.g. `{"message":"500 Internal
    /// Server Error"}`.
    Status(u16),
    /// Answers `429` without forwarding, with `Retry-After: <secs>` and
    /// GitLab's throttle body (Rack::Attack): `text/plain` `Retry later`.
    RateLimited {
        /// The `Retry-After` value, in seconds.
        retry_after_secs: u64,
    },
    /// Waits this long, then forwards (for client timeouts). The request is
    /// recorded on arrival with `status: None`, which stays so while it waits
    /// (and for good if the server notices that the client went away).
    Delay(Duration),
    /// Forwards (so the upstream has acted and validated), then waits this
    /// long before answering: a client killed meanwhile never sees the answer.
    DelayAfter(Duration),
    /// Forwards (so Prism still validates the request), then answers a
    /// success status with the body `{not json` (`Content-Type:
    /// application/json`): the upstream's status if it was 200 or 201, else
    /// 201 for POST and 200 for anything else.
    Malformed,
}

/// One request [`GitLabFront`] received.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// `GET`, `POST`, …
    pub method: String,
    /// Path and query as received, e.g. `/api/v4/projects/42/access_tokens?per_page=20`.
    pub path_and_query: String,
    /// The `PRIVATE-TOKEN` header.
    pub private_token: Option<String>,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// The `Content-Type` header.
    pub content_type: Option<String>,
    /// The request body (lossy UTF-8).
    pub body: String,
    /// The fault that was applied, if any.
    pub fault: Option<Fault>,
    /// The upstream's status; `None` when not forwarded (a `Status` or
    /// `RateLimited` fault, the upstream unreachable, or still in flight).
    pub upstream_status: Option<u16>,
    /// The status the client was answered; `None` while in flight or when
    /// the client went away first (e.g. timed out during a `Delay`).
    pub status: Option<u16>,
    /// Prism's `sl-violations` header from the upstream answer: a JSON
    /// array describing why the request broke the contract.
    pub violations: Option<String>,
    /// The body the client was answered (lossy UTF-8).
    pub response_body: String,
}

impl Recorded {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query.as_str(), |(p, _)| p)
    }

    /// The request body as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// [`Recorded::violations`] parsed (empty when there were none).
    pub fn violation_messages(&self) -> Vec<String> {
        self.violations
            .as_deref()
            .and_then(|v| serde_json::from_str::<Vec<Value>>(v).ok())
            .unwrap_or_default()
            .iter()
            .filter_map(|v| v["message"].as_str().map(str::to_owned))
            .collect()
    }
}

/// Largest request body [`GitLabFront`] accepts.
const FRONT_MAX_BODY: usize = 1024 * 1024;

/// Request headers not forwarded (hop-by-hop, or set by the forwarder).
const HOP_BY_HOP: [&str; 9] = [
    "host",
    "content-length",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

struct FrontState {
    upstream: String,
    http: reqwest::Client,
    stateful: bool,
    inner: std::sync::Mutex<FrontInner>,
}

#[derive(Default)]
struct FrontInner {
    next_id: u64,
    requests: Vec<(u64, Recorded)>,
    faults: std::collections::VecDeque<Fault>,
    tokens: Vec<FakeToken>,
}

/// A project access token a stateful [`GitLabFront`] remembers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeToken {
    /// The project (`:id` as sent).
    pub project: String,
    /// Its id (unique per front, from 1000).
    pub id: u64,
    /// Its name as created.
    pub name: String,
    /// Not revoked.
    pub active: bool,
}

impl FrontState {
    fn lock(&self) -> std::sync::MutexGuard<'_, FrontInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A recording, fault-injecting HTTP front for a GitLab stand-in (normally
/// [`Prism`]): listens on 127.0.0.1, forwards every request to the upstream
/// and returns its answer, and records each request ([`Recorded`]). Faults
/// queued with [`GitLabFront::fail_next`] replace forwarding for the next
/// requests, in order. Runs on the tokio runtime that started it; stops
/// accepting connections on drop (the runtime's end stops the rest).
///
/// It serves on the test's own runtime: with `#[tokio::test]` (one thread),
/// call peer scripts through it with `run_python_async`/`run_node_async`,
/// never the blocking `run_python`/`run_node`, which would stall it.
pub struct GitLabFront {
    url: String,
    state: std::sync::Arc<FrontState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GitLabFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GitLabFront {
    /// Starts a front for `upstream` (a base URL such as [`Prism::url`]; the
    /// request's path and query are appended) on a free port.
    pub async fn start(upstream: &str) -> GitLabFront {
        Self::start_with(upstream, false).await
    }

    /// A front that also keeps GitLab's state for project access tokens on
    /// top of the (stateless) upstream, which still validates every request:
    /// a create that the upstream accepts is remembered (with a unique id and
    /// token in the answer), a list answers what is remembered, a revoke
    /// marks it inactive.
    pub async fn start_stateful(upstream: &str) -> GitLabFront {
        Self::start_with(upstream, true).await
    }

    /// The tokens a stateful front remembers.
    pub fn tokens(&self) -> Vec<FakeToken> {
        self.state.lock().tokens.clone()
    }

    async fn start_with(upstream: &str, stateful: bool) -> GitLabFront {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .or_fail("binding the GitLab front on 127.0.0.1:0");
        let addr = listener.local_addr().or_fail("the GitLab front's address");
        let state = std::sync::Arc::new(FrontState {
            upstream: upstream.trim_end_matches('/').to_owned(),
            http: http_client(),
            stateful,
            inner: std::sync::Mutex::new(FrontInner::default()),
        });
        let app = axum::Router::new()
            .fallback(front_handle)
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("GitLab front on {addr} stopped: {e}");
            }
        });
        GitLabFront {
            url: format!("http://{addr}"),
            state,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`: the GitLab base URL to give the client.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state
            .lock()
            .requests
            .iter()
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Forgets the recorded requests (queued faults stay).
    pub fn clear(&self) {
        self.state.lock().requests.clear();
    }

    /// Applies `fault` to the next `n` requests (after any faults already
    /// queued); forwarding resumes after them.
    pub fn fail_next(&self, n: usize, fault: Fault) {
        if let Fault::Status(code) = fault {
            assert!(
                (200..=599).contains(&code),
                "Fault::Status({code}) is not an HTTP status to answer with"
            );
        }
        let mut inner = self.state.lock();
        inner.faults.extend(std::iter::repeat_n(fault, n));
    }

    /// How many queued faults are still to be applied.
    pub fn pending_faults(&self) -> usize {
        self.state.lock().faults.len()
    }
}

/// A status, headers and body to answer with.
type Answer = (
    axum::http::StatusCode,
    axum::http::HeaderMap,
    axum::body::Bytes,
);

async fn front_handle(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<FrontState>>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};

    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, FRONT_MAX_BODY)
        .await
        .unwrap_or_default();
    let header_text = |name: &str| {
        parts
            .headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    let (id, fault) = {
        let mut inner = state.lock();
        let fault = inner.faults.pop_front();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.requests.push((
            id,
            Recorded {
                method: parts.method.to_string(),
                path_and_query: path_and_query.clone(),
                private_token: header_text("private-token"),
                authorization: header_text("authorization"),
                content_type: header_text("content-type"),
                body: String::from_utf8_lossy(&body).into_owned(),
                fault: fault.clone(),
                upstream_status: None,
                status: None,
                violations: None,
                response_body: String::new(),
            },
        ));
        (id, fault)
    };

    let json_headers = || {
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        );
        h
    };
    let gitlab_error = |status: StatusCode| -> Answer {
        let message = format!(
            "{} {}",
            status.as_u16(),
            status.canonical_reason().unwrap_or("Error")
        );
        (
            status,
            json_headers(),
            json!({ "message": message }).to_string().into(),
        )
    };

    let mut upstream: Option<Answer> = None;
    let answer: Answer = match &fault {
        Some(Fault::Status(code)) => {
            gitlab_error(StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        }
        Some(Fault::RateLimited { retry_after_secs }) => {
            let mut h = axum::http::HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static("text/plain"),
            );
            h.insert(header::RETRY_AFTER, (*retry_after_secs).into());
            (StatusCode::TOO_MANY_REQUESTS, h, "Retry later\n".into())
        }
        Some(Fault::Delay(_)) | Some(Fault::DelayAfter(_)) | Some(Fault::Malformed) | None => {
            if let Some(Fault::Delay(d)) = &fault {
                tokio::time::sleep(*d).await;
            }
            match front_forward(&state, &parts, &path_and_query, body.clone()).await {
                Ok(a) => {
                    upstream = Some(a.clone());
                    let a = if state.stateful {
                        front_stateful(&state, &parts.method, &path_and_query, &body, a)
                    } else {
                        a
                    };
                    if let Some(Fault::DelayAfter(d)) = &fault {
                        tokio::time::sleep(*d).await;
                    }
                    if fault == Some(Fault::Malformed) {
                        let status = if a.0 == StatusCode::OK || a.0 == StatusCode::CREATED {
                            a.0
                        } else if parts.method == axum::http::Method::POST {
                            StatusCode::CREATED
                        } else {
                            StatusCode::OK
                        };
                        (status, json_headers(), "{not json".into())
                    } else {
                        a
                    }
                }
                Err(e) => {
                    eprintln!("GitLab front: forwarding {path_and_query} failed: {e}");
                    gitlab_error(StatusCode::BAD_GATEWAY)
                }
            }
        }
    };

    {
        let mut inner = state.lock();
        if let Some((_, r)) = inner.requests.iter_mut().find(|(i, _)| *i == id) {
            r.status = Some(answer.0.as_u16());
            r.response_body = String::from_utf8_lossy(&answer.2).into_owned();
            if let Some((status, headers, _)) = &upstream {
                r.upstream_status = Some(status.as_u16());
                r.violations = headers
                    .get("sl-violations")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            }
        }
    }

    let (status, headers, bytes) = answer;
    let mut res = axum::response::Response::new(axum::body::Body::from(bytes));
    *res.status_mut() = status;
    for (name, value) in &headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            res.headers_mut().append(name.clone(), value.clone());
        }
    }
    res
}

/// Applies a forwarded, upstream-accepted request to the remembered
/// tokens and answers from them.
fn front_stateful(
    state: &FrontState,
    method: &axum::http::Method,
    path_and_query: &str,
    body: &[u8],
    upstream: Answer,
) -> Answer {
    use axum::http::{Method, StatusCode};
    let path = path_and_query.split('?').next().unwrap_or_default();
    let rest = path.strip_prefix("/api/v4/projects/").unwrap_or_default();
    let mut segments = rest.split('/');
    let (Some(project), Some("access_tokens")) = (segments.next(), segments.next()) else {
        return upstream;
    };
    let token_id = segments.next().and_then(|t| t.parse::<u64>().ok());
    let mut inner = state.lock();
    let shape = |t: &FakeToken| {
        json!({ "id": t.id, "name": t.name, "active": t.active, "revoked": !t.active,
                "scopes": ["read_api"], "access_level": 20, "expires_at": "2099-01-01",
                "created_at": "2026-01-01T00:00:00.000Z", "user_id": 1, "last_used_at": null })
    };
    match (method, token_id) {
        (&Method::POST, None) if upstream.0 == StatusCode::CREATED => {
            let sent: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
            let id = 1000 + inner.tokens.len() as u64;
            let t = FakeToken {
                project: project.to_owned(),
                id,
                name: sent["name"].as_str().unwrap_or_default().to_owned(),
                active: true,
            };
            let mut answer = shape(&t);
            answer["token"] = format!("glpat-front-{id}").into();
            inner.tokens.push(t);
            (upstream.0, upstream.1, answer.to_string().into())
        }
        (&Method::GET, None) if upstream.0 == StatusCode::OK => {
            let active_only = path_and_query.contains("state=active");
            let list: Vec<Value> = inner
                .tokens
                .iter()
                .filter(|t| t.project == project && (t.active || !active_only))
                .map(shape)
                .collect();
            (upstream.0, upstream.1, Value::from(list).to_string().into())
        }
        (&Method::DELETE, Some(id)) if upstream.0 == StatusCode::NO_CONTENT => {
            match inner
                .tokens
                .iter_mut()
                .find(|t| t.id == id && t.project == project)
            {
                Some(t) => {
                    t.active = false;
                    upstream
                }
                None => (
                    StatusCode::NOT_FOUND,
                    upstream.1,
                    json!({ "message": "404 project Access Token Not Found" })
                        .to_string()
                        .into(),
                ),
            }
        }
        _ => upstream,
    }
}

async fn front_forward(
    state: &FrontState,
    parts: &axum::http::request::Parts,
    path_and_query: &str,
    body: axum::body::Bytes,
) -> Result<Answer, reqwest::Error> {
    let mut headers = parts.headers.clone();
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    let mut req = state
        .http
        .request(
            parts.method.clone(),
            format!("{}{path_and_query}", state.upstream),
        )
        .headers(headers);
    if !body.is_empty() {
        req = req.body(body);
    }
    let res = req.send().await?;
    let status = res.status();
    let headers = res.headers().clone();
    let bytes = res.bytes().await?;
    Ok((status, headers, bytes))
}

// ---------------------------------------------------------------------------
// cistern

/// Builds a cistern config in a temp dir and starts the binary.
#[derive(Debug, Clone)]
pub struct CisternBuilder {
    issuers: Vec<(String, String, Vec<String>)>,
    policies: Vec<(String, String)>,
    ceiling_scopes: Vec<String>,
    max_ttl: String,
    algorithm: String,
    settings: Vec<(String, toml::Value)>,
}

impl Default for CisternBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl CisternBuilder {
    /// No issuers or policies; ceiling scopes `["*"]`, max TTL 1h, ES256.
    pub fn new() -> Self {
        CisternBuilder {
            issuers: Vec::new(),
            policies: Vec::new(),
            ceiling_scopes: vec!["*".into()],
            max_ttl: "1h".into(),
            algorithm: "ES256".into(),
            settings: Vec::new(),
        }
    }

    /// Trusts an issuer (`[issuers.NAME]`, plain http allowed) and puts it in the ceiling.
    pub fn issuer(mut self, name: &str, url: &str, audiences: &[&str]) -> Self {
        self.issuers.push((
            name.into(),
            url.into(),
            audiences.iter().map(|a| (*a).to_owned()).collect(),
        ));
        self
    }

    /// Adds a policy file `policies/FILE_NAME` with this text.
    pub fn policy(mut self, file_name: &str, text: &str) -> Self {
        self.policies.push((file_name.into(), text.into()));
        self
    }

    /// `[ceiling] scopes`.
    pub fn ceiling_scopes(mut self, scopes: &[&str]) -> Self {
        self.ceiling_scopes = scopes.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// `[ceiling] max_ttl`, e.g. `"15m"`.
    pub fn max_ttl(mut self, ttl: &str) -> Self {
        self.max_ttl = ttl.into();
        self
    }

    /// `[signing] algorithm`: `"ES256"` or `"EdDSA"`.
    pub fn algorithm(mut self, alg: &str) -> Self {
        self.algorithm = alg.into();
        self
    }

    /// Sets any config field by dotted path, after the defaults above, e.g.
    /// `.set("issuers.gitlab.fetch_timeout", "1s")` or `.set("server.max_body_bytes", 8192)`.
    pub fn set(mut self, path: &str, value: impl Into<toml::Value>) -> Self {
        self.settings.push((path.into(), value.into()));
        self
    }

    /// The config file text for a server on `port`.
    pub fn config_text(&self, port: u16) -> String {
        let base = format!("http://127.0.0.1:{port}");
        let mut issuers = toml::Table::new();
        for (name, url, auds) in &self.issuers {
            let mut t = toml::Table::new();
            t.insert("issuer".into(), url.clone().into());
            t.insert("audiences".into(), auds.clone().into());
            t.insert("allow_insecure_http".into(), true.into());
            issuers.insert(name.clone(), t.into());
        }
        let mut doc = toml::Table::new();
        doc.insert(
            "server".into(),
            table([
                ("listen", format!("127.0.0.1:{port}").into()),
                ("issuer", base.into()),
            ]),
        );
        doc.insert(
            "signing".into(),
            table([
                ("key_dir", "keys".into()),
                ("algorithm", self.algorithm.clone().into()),
            ]),
        );
        doc.insert(
            "store".into(),
            table([
                ("kind", "sqlite".into()),
                ("path", "data/cistern.db".into()),
            ]),
        );
        doc.insert("issuers".into(), issuers.into());
        doc.insert("policy".into(), table([("dir", "policies".into())]));
        let names: Vec<String> = self.issuers.iter().map(|(n, _, _)| n.clone()).collect();
        doc.insert(
            "ceiling".into(),
            table([
                ("issuers", names.into()),
                ("max_ttl", self.max_ttl.clone().into()),
                ("scopes", self.ceiling_scopes.clone().into()),
            ]),
        );
        for (path, value) in &self.settings {
            set_path(&mut doc, path, value.clone());
        }
        toml::to_string(&doc).or_fail("serialising the config")
    }

    /// Writes config and policies into `dir` for a server on `port`; returns the config path.
    pub fn write(&self, dir: &Path, port: u16) -> PathBuf {
        let policies = dir.join("policies");
        fs::create_dir_all(&policies).or_fail("creating the policy dir");
        fs::create_dir_all(dir.join("data")).or_fail("creating the data dir");
        for (name, text) in &self.policies {
            fs::write(policies.join(name), text).or_fail("writing a policy file");
        }
        let config = dir.join("cistern.toml");
        fs::write(&config, self.config_text(port)).or_fail("writing the config");
        config
    }

    /// Writes everything to a fresh temp dir and starts `cistern serve`.
    /// Panics (with cistern's stderr) if it does not come up.
    pub fn start(self) -> Cistern {
        let dir = tempfile::Builder::new()
            .prefix("cistern-test-")
            .tempdir()
            .or_fail("creating the cistern temp dir");
        // The port is picked by binding :0 and releasing it; another process
        // may grab it in between, so retry a few times on "address in use".
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let config = self.write(dir.path(), port);
            match start_cistern(&config) {
                Ok((proc, addr)) => {
                    return Cistern {
                        dir,
                        config,
                        addr,
                        proc: Some(proc),
                        http: http_client(),
                    };
                }
                Err(e) if e.to_ascii_lowercase().contains("in use") => last = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("cistern could not get a port: {last}");
    }
}

fn table<const N: usize>(entries: [(&str, toml::Value); N]) -> toml::Value {
    toml::Value::Table(
        entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    )
}

fn set_path(doc: &mut toml::Table, path: &str, value: toml::Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().or_fail("an empty config path");
    let mut t = doc;
    for p in parts {
        let entry = t
            .entry(p.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .or_fail(&format!("config path {path}: {p} is not a table"));
    }
    t.insert(last.to_owned(), value);
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .or_fail("binding 127.0.0.1:0")
        .port()
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .or_fail("building an HTTP client")
}

fn start_cistern(config: &Path) -> Result<(Proc, SocketAddr), String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cistern"));
    cmd.arg("serve").arg("--config").arg(config);
    let (proc, rest) = Proc::try_spawn("cistern", &mut cmd, "cistern: listening on ")?;
    let addr = rest
        .parse::<SocketAddr>()
        .map_err(|e| format!("cistern printed a bad listening address {rest:?}: {e}"))?;
    Ok((proc, addr))
}

/// Another process a test starts (e.g. `cistern proxy`); killed on drop.
pub struct Spawned(Proc);

impl Spawned {
    /// Starts `cmd` and waits for the stdout line starting with `prefix`;
    /// returns the process and the rest of that line.
    pub fn start(name: &str, cmd: &mut Command, prefix: &'static str) -> (Spawned, String) {
        let (proc, rest) = Proc::try_spawn(name, cmd, prefix).or_fail(&format!("starting {name}"));
        (Spawned(proc), rest)
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.0.stderr()
    }
}

/// A running cistern (`cistern serve`) with its temp dir; killed on drop.
pub struct Cistern {
    dir: tempfile::TempDir,
    config: PathBuf,
    addr: SocketAddr,
    proc: Option<Proc>,
    http: reqwest::Client,
}

impl Cistern {
    /// `http://127.0.0.1:PORT`: the base URL and cistern's issuer (`iss`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The issuer URL cistern was configured with (same as [`Cistern::base_url`]).
    pub fn issuer(&self) -> String {
        self.base_url()
    }

    /// `POST /oauth/token`.
    pub fn token_url(&self) -> String {
        format!("{}/oauth/token", self.base_url())
    }

    /// `GET /.well-known/jwks.json`.
    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.base_url())
    }

    /// `GET /.well-known/oauth-authorization-server` (RFC 8414).
    pub fn metadata_url(&self) -> String {
        format!("{}/.well-known/oauth-authorization-server", self.base_url())
    }

    /// The temp dir holding config, keys, policies and the database.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// The policy directory.
    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    /// Writes (or replaces) a policy file, e.g. for reload tests.
    pub fn write_policy(&self, file_name: &str, text: &str) {
        let path = self.policy_dir().join(file_name);
        let tmp = self.policy_dir().join(format!(".{file_name}.tmp"));
        let mut f = File::create(&tmp).or_fail("creating a policy file");
        f.write_all(text.as_bytes())
            .or_fail("writing a policy file");
        drop(f);
        // Rename so the watcher never sees half a file.
        fs::rename(&tmp, &path).or_fail("moving a policy file into place");
    }

    /// The server's process id (for signals).
    pub fn pid(&self) -> u32 {
        self.proc
            .as_ref()
            .map(|p| p.child.id())
            .or_fail("cistern is not running")
    }

    /// Waits (at most `timeout`) for cistern to exit on its own, e.g. after
    /// SIGTERM; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let proc = self.proc.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = proc.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What cistern wrote to stderr (its logs) so far.
    pub fn logs(&self) -> String {
        self.proc.as_ref().map(Proc::stderr).unwrap_or_default()
    }

    /// A shared HTTP client (15 s timeout, no redirects).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Kills cistern and starts it again on the same port with the same
    /// directory (keys, database, policies survive).
    pub fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
        let (proc, addr) = start_cistern(&self.config).or_fail("restarting cistern");
        assert_eq!(addr, self.addr, "cistern came back on another address");
        self.proc = Some(proc);
    }

    /// Polls `GET /readyz` until it answers 200 (bounded by `timeout`).
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let url = format!("{}/readyz", self.base_url());
        loop {
            if let Ok(r) = self.http.get(&url).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cistern not ready after {timeout:?}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A token-exchange request with reqwest (subject_token_type jwt, `role`,
    /// optional `scope`; use [`Cistern::post_form`] for anything else).
    /// Returns the status and the JSON body.
    pub async fn exchange(
        &self,
        subject_token: &str,
        role: &str,
        scope: Option<&str>,
    ) -> (u16, Value) {
        let mut form = vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", subject_token),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("role", role),
        ];
        if let Some(s) = scope {
            form.push(("scope", s));
        }
        self.post_form(&form).await
    }

    /// `POST /v1/exchange/dry-run` for `role` with an ID token; the report
    /// (a 200 answer asserted).
    pub async fn dry_run(&self, id_token: &str, role: &str) -> Value {
        let res = self
            .http
            .post(format!("{}/v1/exchange/dry-run", self.base_url()))
            .form(&[
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                ),
                ("subject_token", id_token),
                (
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:id_token",
                ),
                ("role", role),
            ])
            .send()
            .await
            .or_fail("POST /v1/exchange/dry-run");
        assert_eq!(res.status(), 200);
        res.json().await.or_fail("dry-run JSON")
    }

    /// POSTs an arbitrary form to the token endpoint; returns status and JSON
    /// body (`Value::Null` when the body is not JSON).
    pub async fn post_form(&self, form: &[(&str, &str)]) -> (u16, Value) {
        let res = self
            .http
            .post(self.token_url())
            .form(form)
            .send()
            .await
            .or_fail("POST /oauth/token");
        let status = res.status().as_u16();
        let text = res.text().await.or_fail("reading the token response");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

// ---------------------------------------------------------------------------
// Peer scripts

/// Output of a peer script: exit code and its last stdout line as JSON.
#[derive(Debug, Clone)]
pub struct ScriptOutput {
    /// Exit code (-1 if killed by a signal).
    pub code: i32,
    /// The last non-empty stdout line, parsed as JSON.
    pub json: Value,
    /// Everything the script wrote to stderr.
    pub stderr: String,
}

/// Runs `node tests/peers/SCRIPT ARGS…` (bounded by [`SCRIPT_TIMEOUT`]);
/// returns the exit code and the JSON it printed. Blocking: peers and
/// cistern are separate processes, so this is safe inside async tests.
pub fn run_node(script: &str, args: &[&str]) -> (i32, Value) {
    let out = run_script(node_command(script), script, args);
    (out.code, out.json)
}

/// Runs `tests/peers/.venv/bin/python tests/peers/SCRIPT ARGS…`, like [`run_node`].
pub fn run_python(script: &str, args: &[&str]) -> (i32, Value) {
    let mut cmd = Command::new(venv_python());
    cmd.arg(script).current_dir(peers_dir());
    let out = run_script(cmd, script, args);
    (out.code, out.json)
}

/// [`run_node`] with stderr and extra environment variables.
pub fn run_node_full(script: &str, args: &[&str], env: &BTreeMap<&str, &str>) -> ScriptOutput {
    let mut cmd = node_command(script);
    cmd.envs(env);
    run_script(cmd, script, args)
}

/// [`run_python`] with stderr and extra environment variables.
pub fn run_python_full(script: &str, args: &[&str], env: &BTreeMap<&str, &str>) -> ScriptOutput {
    let mut cmd = Command::new(venv_python());
    cmd.arg(script).current_dir(peers_dir()).envs(env);
    run_script(cmd, script, args)
}

/// [`run_node`] off the async runtime's thread.
pub async fn run_node_async(script: &str, args: &[&str]) -> (i32, Value) {
    let (script, args) = owned(script, args);
    tokio::task::spawn_blocking(move || run_node(&script, &borrowed(&args)))
        .await
        .or_fail("joining run_node")
}

/// [`run_python`] off the async runtime's thread.
pub async fn run_python_async(script: &str, args: &[&str]) -> (i32, Value) {
    let (script, args) = owned(script, args);
    tokio::task::spawn_blocking(move || run_python(&script, &borrowed(&args)))
        .await
        .or_fail("joining run_python")
}

fn owned(script: &str, args: &[&str]) -> (String, Vec<String>) {
    (
        script.to_owned(),
        args.iter().map(|a| (*a).to_owned()).collect(),
    )
}

fn borrowed(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// [`run_node`], but a run past [`SCRIPT_TIMEOUT`] is an `Err` naming what
/// the script wrote, not a panic (for a caller that retries it).
pub fn try_run_node(script: &str, args: &[&str]) -> Result<(i32, Value), String> {
    run_script_bounded(node_command(script), script, args).map(|out| (out.code, out.json))
}

fn run_script(cmd: Command, script: &str, args: &[&str]) -> ScriptOutput {
    run_script_bounded(cmd, script, args).unwrap_or_else(|hang| panic!("{hang}"))
}

fn run_script_bounded(
    mut cmd: Command,
    script: &str,
    args: &[&str],
) -> Result<ScriptOutput, String> {
    let tmp = tempfile::tempdir().or_fail("creating a temp dir");
    let out_path = tmp.path().join("stdout");
    let err_path = tmp.path().join("stderr");
    // Files, not pipes: nothing can block on a full pipe while we wait.
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).or_fail("creating stdout file"))
        .stderr(File::create(&err_path).or_fail("creating stderr file"))
        .spawn()
        .or_fail(&format!("starting peer script {script}"));
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().or_fail("waiting for a peer script") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "peer script {script} ran over {SCRIPT_TIMEOUT:?}; stdout:\n{}\nstderr:\n{}",
                fs::read_to_string(&out_path).unwrap_or_default(),
                fs::read_to_string(&err_path).unwrap_or_default()
            ));
        }
        thread::sleep(Duration::from_millis(20));
    };
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    let last = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let json = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!("peer script {script} printed no JSON last line ({e}); stdout:\n{stdout}\nstderr:\n{stderr}")
    });
    Ok(ScriptOutput {
        code: status.code().unwrap_or(-1),
        json,
        stderr,
    })
}

// ---------------------------------------------------------------------------
// Token helpers

/// The decoded JOSE header and claims of a compact JWS, unverified
/// (for asserting on shape; verification is the peers' job).
pub fn decode_jwt(token: &str) -> (Value, Value) {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let mut part = |what: &str| -> Value {
        let seg = parts
            .next()
            .or_fail(&format!("token has no {what} segment"));
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(seg)
            .or_fail(&format!("token {what} is not base64url"));
        serde_json::from_slice(&bytes).or_fail(&format!("token {what} is not JSON"))
    };
    let header = part("header");
    let claims = part("payload");
    (header, claims)
}

// ---------------------------------------------------------------------------
// The development issuer

/// A role `deploy` for project 42 of issuer `gitlab` (owner team-payments,
/// scope `deploy:write`, audience `https://deploy.test`, 10 minutes).
pub const DEPLOY_POLICY: &str = r#"
role = "deploy"
owner = "team-payments"
description = "Deploy project 42"
issuer = "gitlab"
[bindings]
project_id = "42"
[grant]
kind = "access_token"
audience = "https://deploy.test"
scopes = ["deploy:write"]
ttl = "10m"
"#;

/// The audience the dev issuer's ID tokens carry (configure it on the issuer).
pub const DEV_AUDIENCE: &str = "https://cistern.test";

/// `cistern serve --dev`: the development issuer the tests get ID tokens from.
pub struct DevIssuer {
    child: Child,
    base: String,
    http: reqwest::Client,
}

impl Drop for DevIssuer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl DevIssuer {
    /// Starts one on a free loopback port.
    pub fn start() -> Self {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_cistern"))
            .args(["serve", "--dev", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .or_fail("starting cistern serve --dev");
        let mut line = String::new();
        BufReader::new(child.stdout.take().or_fail("dev issuer stdout"))
            .read_line(&mut line)
            .or_fail("reading the dev issuer's first line");
        assert!(line.starts_with("cistern: listening on"), "{line:?}");
        DevIssuer {
            child,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        }
    }

    /// The issuer URL to configure.
    pub fn issuer_url(&self) -> String {
        format!("{}/dev/oidc", self.base)
    }

    /// A fresh ID token (new jti) for project `project` in namespace `ns`.
    pub async fn id_token(&self, project: &str, ns: &str) -> String {
        let claims = json!({
            "project_id": project, "job_project_id": project,
            "namespace_id": ns, "job_namespace_id": ns,
        });
        let res: Value = self
            .http
            .post(format!("{}/dev/oidc/mint", self.base))
            .json(&json!({ "claims": claims, "audience": DEV_AUDIENCE }))
            .send()
            .await
            .or_fail("POST /dev/oidc/mint")
            .json()
            .await
            .or_fail("reading the minted ID token");
        res["id_token"]
            .as_str()
            .or_fail("the dev issuer returned no id_token")
            .to_owned()
    }
}

impl Cistern {
    /// Sends SIGTERM and waits (bounded) for a graceful exit.
    pub fn terminate(&mut self) {
        let Some(mut p) = self.proc.take() else {
            return;
        };
        let status = Command::new("kill")
            .args(["-TERM", &p.child.id().to_string()])
            .status()
            .or_fail("running kill -TERM");
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(_)) = p.child.try_wait() {
                return;
            }
            assert!(Instant::now() < deadline, "cistern did not stop on SIGTERM");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .or_fail("running openssl (is it installed?)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a throw-away CA and a server certificate for 127.0.0.1 signed by
/// it (P-256, two days) with openssl in `dir`: `ca.pem`, `tls.pem`, `tls.key`.
pub fn test_ca(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=cistern test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "tls.key",
                "-out",
                "tls.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .or_fail("writing ext.cnf");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "tls.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}
