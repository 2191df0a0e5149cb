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

/// How long a peer or cistern gets to print its listening line.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
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

/// Whether the npm packages and the Python venv are installed.
pub fn peers_available() -> bool {
    let dir = peers_dir();
    let npm = ["oidc-provider", "jose", "oauth4webapi"].iter().all(|p| {
        dir.join("node_modules")
            .join(p)
            .join("package.json")
            .is_file()
    });
    npm && venv_python().is_file() && Command::new("node").arg("--version").output().is_ok()
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

// ---------------------------------------------------------------------------
// Child processes

/// A running child with captured stderr, killed on drop.
struct Proc {
    name: String,
    child: Child,
    /// Held open so the child sees EOF when we go away.
    _stdin: Option<ChildStdin>,
    stderr_path: PathBuf,
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
        let tmp = tempfile::Builder::new()
            .prefix(&format!("cistern-{name}-"))
            .tempdir()
            .or_fail("creating a temp dir");
        let stderr_path = tmp.path().join("stderr.log");
        let stderr = File::create(&stderr_path).or_fail("creating the stderr log");
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
                if let Some(rest) = line.strip_prefix(prefix)
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(rest.trim().to_owned());
                }
            }
        });
        let mut proc = Proc {
            name: name.to_owned(),
            child,
            _stdin: stdin,
            stderr_path,
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
                    "{name} did not print `{prefix}…` {why} (exit status: {status:?}); stderr:\n{}",
                    proc.stderr()
                ))
            }
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
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

fn run_script(mut cmd: Command, script: &str, args: &[&str]) -> ScriptOutput {
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
            panic!(
                "peer script {script} ran over {SCRIPT_TIMEOUT:?}; stderr:\n{}",
                fs::read_to_string(&err_path).unwrap_or_default()
            );
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
    ScriptOutput {
        code: status.code().unwrap_or(-1),
        json,
        stderr,
    }
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
