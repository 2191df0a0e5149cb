//! OAuth 2.0 refresh-token upstream against npm `oidc-provider` (a certified
//! OAuth 2.0 / OpenID server no one here wrote), run by
//! `tests/peers/oauth_refresh_idp.mjs` with PKCE required and single-use
//! refresh tokens (rotation on every refresh, reuse detection):
//!
//! - `cistern provider authorize` runs the authorization code + PKCE flow;
//!   the test plays the operator's browser (oidc-provider's own login and
//!   consent forms over HTTP with a cookie jar);
//! - jobs get access tokens the IdP accepts (userinfo), each refresh
//!   rotates the refresh token and the old one is dead at the IdP;
//! - kill -9 while the IdP has rotated the token but cistern has not saved
//!   the new one (the IdP holds its answer until the test has killed
//!   cistern): with a reuse grace period cistern recovers on restart;
//!   without, it says it needs re-authorization, and `authorize` fixes it
//!   without a restart;
//! - no secret (client secret, KEK, any refresh or access token) appears in
//!   any log, audit record, report, error or the database file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Cistern, CisternBuilder, DEV_AUDIENCE, DevIssuer, RefreshIdp};
use serde_json::Value;

const CLIENT_SECRET: &str = "refresh-client-secret-6b1f0c";
const KEK: &str = "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=";

const ROLE: &str = r#"
role = "idp-api"
owner = "team-payments"
description = "Call the company API as cistern's authorized client"
issuer = "gitlab"
[bindings]
project_id = "42"
[grant]
kind = "oauth2_access_token"
provider = "idp"
scopes = ["openid"]
"#;

/// Everything a test needs: the IdP, the dev issuer for ID tokens, cistern.
struct Setup {
    idp: RefreshIdp,
    dev: DevIssuer,
    c: Cistern,
    secrets: tempfile::TempDir,
    /// Output of every CLI run and every error body, for the secret check.
    seen: Vec<String>,
}

fn setup(grace_secs: u32) -> Setup {
    // Access tokens live 10 minutes, less than refresh_before (1 h): every
    // exchange refreshes.
    let idp = RefreshIdp::start(CLIENT_SECRET, grace_secs, 600);
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("client-secret"), CLIENT_SECRET).unwrap();
    std::fs::write(secrets.path().join("kek"), KEK).unwrap();
    let dev = DevIssuer::start();
    let file = |n: &str| secrets.path().join(n).to_str().unwrap().to_owned();
    let c = CisternBuilder::new()
        .issuer("gitlab", &dev.issuer_url(), &[DEV_AUDIENCE])
        .policy("idp-api.toml", ROLE)
        .set("providers.idp.kind", "oauth2_refresh_token")
        .set("providers.idp.token_url", format!("{}/token", idp.url()))
        .set(
            "providers.idp.authorization_url",
            format!("{}/auth", idp.url()),
        )
        .set("providers.idp.client_id", "cistern")
        .set("providers.idp.client_secret_file", file("client-secret"))
        .set("providers.idp.kek_file", file("kek"))
        .set("providers.idp.scopes", vec!["openid", "offline_access"])
        .set("providers.idp.authorization_params.prompt", "consent")
        .set("providers.idp.refresh_before", "1h")
        .set("providers.idp.authorize_timeout", "60s")
        .set("providers.idp.allow_insecure_http", true)
        .start();
    Setup {
        idp,
        dev,
        c,
        secrets,
        seen: Vec::new(),
    }
}

impl Setup {
    async fn exchange(&mut self) -> (u16, Value) {
        let id = self.dev.id_token("42", "7").await;
        let (status, body) = self.c.exchange(&id, "idp-api", None).await;
        if status != 200 {
            self.seen.push(body.to_string());
        }
        (status, body)
    }

    /// Runs `cistern provider authorize idp`, playing the operator's browser.
    async fn authorize(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cistern"))
            .args(["provider", "authorize", "idp", "--config"])
            .arg(self.c.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line.clone());
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let prefix = format!("  {}/auth?", self.idp.url());
        let url = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("authorize printed no URL");
            if let Some(u) = line.strip_prefix("  ")
                && line.starts_with(&prefix)
            {
                break u.to_owned();
            }
        };
        play_browser(&url).await;
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        let err = reader.join().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "authorize failed:\n{err}{stdout}");
        assert!(
            err.contains("authorized: the refresh token for provider idp"),
            "{err}"
        );
        self.seen.push(err);
        self.seen.push(stdout);
    }

    /// Runs `cistern provider check-secret idp` with the secret in `file`.
    fn check_secret(&mut self, file: &Path) -> i32 {
        let out = Command::new(env!("CARGO_BIN_EXE_cistern"))
            .args(["provider", "check-secret", "idp", "--config"])
            .arg(self.c.config_path())
            .arg("--secret-file")
            .arg(file)
            .output()
            .unwrap();
        self.seen
            .push(String::from_utf8_lossy(&out.stdout).into_owned());
        self.seen
            .push(String::from_utf8_lossy(&out.stderr).into_owned());
        out.status.code().unwrap_or(-1)
    }

    fn report(&mut self) -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_cistern"))
            .args(["report", "--format", "json", "--config"])
            .arg(self.c.config_path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.seen.push(text.clone());
        serde_json::from_str(&text).unwrap()
    }

    /// Waits until the needs-authorization metric is down, without any
    /// job asking for a token (the server watches the store for it).
    async fn wait_metric_cleared(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while self.needs_authorization().await.as_deref() != Some("0") {
            assert!(
                std::time::Instant::now() < deadline,
                "the needs-authorization metric stayed up after authorize"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `cistern_provider_needs_authorization{provider="idp"}`.
    async fn needs_authorization(&self) -> Option<String> {
        self.metric("cistern_provider_needs_authorization{provider=\"idp\"}")
            .await
    }

    async fn metric(&self, name: &str) -> Option<String> {
        let text = self
            .c
            .http()
            .get(format!("{}/metrics", self.c.base_url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_owned)
    }

    /// The audit records about the provider's own credential, in order:
    /// `(reason, detail)`.
    fn provider_audit(&self) -> Vec<(String, Value)> {
        let conn = rusqlite::Connection::open(self.c.data_dir().join("data/cistern.db")).unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT reason, detail FROM audit WHERE kind = 'admin_action'
                 AND reason LIKE 'provider_%' ORDER BY seq",
            )
            .unwrap();
        stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                serde_json::from_str(&r.get::<_, String>(1)?).unwrap(),
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    /// Asserts no secret appears anywhere the suite can see.
    async fn assert_no_secret_anywhere(&mut self, earlier_logs: &[String]) {
        let mut secrets: Vec<String> = vec![CLIENT_SECRET.into(), KEK.into()];
        secrets.extend(self.idp.issued().await.into_iter().map(|(_, v)| v));
        let conn = rusqlite::Connection::open(self.c.data_dir().join("data/cistern.db")).unwrap();
        let audit: String = conn
            .query_row(
                "SELECT group_concat(coalesce(reason, '') || ' ' || detail, char(10)) FROM audit",
                [],
                |r| r.get(0),
            )
            .unwrap();
        drop(conn);
        let export = Command::new(env!("CARGO_BIN_EXE_cistern"))
            .args(["audit", "export", "--config"])
            .arg(self.c.config_path())
            .output()
            .unwrap();
        let mut db = Vec::new();
        for f in ["cistern.db", "cistern.db-wal"] {
            db.extend(std::fs::read(self.c.data_dir().join("data").join(f)).unwrap_or_default());
        }
        let mut places: Vec<(String, String)> = vec![
            ("cistern's log".into(), self.c.logs()),
            ("the audit table".into(), audit),
            (
                "the audit export".into(),
                String::from_utf8_lossy(&export.stdout).into_owned(),
            ),
            (
                "the database file".into(),
                String::from_utf8_lossy(&db).into_owned(),
            ),
        ];
        self.report();
        for (i, s) in self.seen.iter().chain(earlier_logs).enumerate() {
            places.push((format!("CLI output, error or earlier log #{i}"), s.clone()));
        }
        assert!(secrets.len() > 4, "{secrets:?}");
        for (what, text) in &places {
            for s in &secrets {
                assert!(!text.contains(s.as_str()), "a secret appears in {what}");
            }
        }
    }

    async fn userinfo(&self, token: &str) -> u16 {
        reqwest::Client::new()
            .get(format!("{}/me", self.idp.url()))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// RFC 7662 at the IdP: whether it still considers `token` active.
    async fn active_at_idp(&self, token: &str) -> bool {
        let v: Value = reqwest::Client::new()
            .post(format!("{}/token/introspection", self.idp.url()))
            .basic_auth("cistern", Some(CLIENT_SECRET))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["active"].as_bool().unwrap()
    }

    async fn refresh_tokens(&self) -> Vec<String> {
        self.idp
            .issued()
            .await
            .into_iter()
            .filter(|(k, _)| k == "refresh_token")
            .map(|(_, v)| v)
            .collect()
    }

    /// Starts an exchange in the background (it may never get an answer).
    async fn exchange_in_background(&self) -> tokio::task::JoinHandle<()> {
        let id = self.dev.id_token("42", "7").await;
        let url = self.c.token_url();
        tokio::spawn(async move {
            let _ = reqwest::Client::new()
                .post(url)
                .form(&[
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:token-exchange",
                    ),
                    ("subject_token", id.as_str()),
                    ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                    ("role", "idp-api"),
                ])
                .send()
                .await;
        })
    }

    /// Holds the IdP's answer to cistern's next refresh, waits until the IdP
    /// has rotated the token and holds the answer, then kills cistern with
    /// SIGKILL and starts it again. Returns the killed process's log.
    async fn crash_mid_rotation(&mut self) -> String {
        self.idp.hold_next_refresh().await;
        let pending = self.exchange_in_background().await;
        assert_eq!(self.idp.wait_held().await, 1, "{}", self.c.logs());
        // Ordering: the marker was committed before the request was sent.
        let last = self.provider_audit().pop().unwrap();
        assert_eq!(last.0, "provider_refresh_started", "{last:?}");
        let log = self.c.logs();
        self.c.restart(); // SIGKILL, then start on the same store
        self.idp.release().await;
        let _ = pending.await;
        log
    }
}

/// Plays the operator's browser from the authorization URL to cistern's
/// loopback redirect: follows redirects with a cookie jar, fills in
/// oidc-provider's login form (any login) and consent form.
async fn play_browser(start: &str) {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let mut jar: BTreeMap<String, String> = BTreeMap::new();
    let mut url = reqwest::Url::parse(start).unwrap();
    let mut form: Option<Vec<(&str, &str)>> = None;
    for _ in 0..20 {
        if url.path() == "/callback" {
            // The IdP sends the browser to cistern's listener.
            let res = reqwest::get(url.clone()).await.unwrap();
            let status = res.status();
            assert_eq!(status, 200, "{}", res.text().await.unwrap());
            return;
        }
        let cookies = jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let req = match form.take() {
            Some(f) => http.post(url.clone()).form(&f),
            None => http.get(url.clone()),
        };
        let res = req.header("cookie", cookies).send().await.unwrap();
        for c in res.headers().get_all("set-cookie") {
            let c = c.to_str().unwrap();
            let pair = c.split(';').next().unwrap();
            let (k, v) = pair.split_once('=').unwrap();
            jar.insert(k.to_owned(), v.to_owned());
        }
        if res.status().is_redirection() {
            let loc = res.headers()["location"].to_str().unwrap();
            url = url.join(loc).unwrap();
            continue;
        }
        let status = res.status();
        let html = res.text().await.unwrap();
        assert_eq!(status, 200, "{html}");
        let action = between(&html, "action=\"", "\"").expect("a form");
        let prompt = between(&html, "name=\"prompt\" value=\"", "\"").expect("a prompt");
        url = reqwest::Url::parse(&action).unwrap();
        form = Some(match prompt.as_str() {
            "login" => vec![
                ("prompt", "login"),
                ("login", "ci-operator"),
                ("password", "any"),
            ],
            "consent" => vec![("prompt", "consent")],
            other => panic!("unexpected prompt {other}"),
        });
    }
    panic!("the authorization did not reach the redirect");
}

fn between(text: &str, start: &str, end: &str) -> Option<String> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(text[from..from + len].replace("&amp;", "&"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_once_then_every_refresh_rotates_a_single_use_refresh_token() {
    if !common::require_oidc_provider() {
        return;
    }
    let mut s = setup(0);

    // Not authorized yet: a clear, retryable refusal naming the fix.
    let (status, body) = s.exchange().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "temporarily_unavailable");
    let why = body["error_description"].as_str().unwrap();
    assert!(why.contains("cistern provider authorize idp"), "{why}");
    assert_eq!(s.needs_authorization().await.as_deref(), Some("1"));

    s.authorize().await;
    s.wait_metric_cleared().await;
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let (status, body) = s.exchange().await;
        assert_eq!(status, 200, "{body}\n{}", s.c.logs());
        assert_eq!(body["cistern_credential_kind"], "oauth2_access_token");
        assert!(body["expires_in"].as_i64().unwrap() <= 600);
        let token = body["access_token"].as_str().unwrap().to_owned();
        // The IdP accepts it.
        assert_eq!(s.userinfo(&token).await, 200);
        tokens.push(token);
    }
    // What a job script does: `eval "$(cistern exchange --format env ...)"`.
    let id = s.dev.id_token("42", "7").await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["exchange", "--url", &s.c.base_url(), "--role", "idp-api"])
        .args(["--format", "env", "--var", "IDP_TOKEN"])
        .env("CISTERN_ID_TOKEN", id)
        .output()
        .await
        .unwrap();
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{line}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = line
        .trim()
        .strip_prefix("export IDP_TOKEN='")
        .and_then(|t| t.strip_suffix('\''))
        .unwrap();
    assert_eq!(s.userinfo(token).await, 200);
    tokens.push(token.to_owned());
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        4,
        "every exchange refreshed (refresh_before > lifetime)"
    );

    // One refresh token from the authorization, one per refresh; each
    // rotated one is dead at the IdP, only the newest lives.
    let refresh = s.refresh_tokens().await;
    assert_eq!(refresh.len(), 5, "{:?}", s.idp.stats().await);
    for old in &refresh[..4] {
        assert!(!s.active_at_idp(old).await);
    }
    assert!(s.active_at_idp(&refresh[4]).await);
    let reasons: Vec<String> = s.provider_audit().into_iter().map(|(r, _)| r).collect();
    assert_eq!(reasons[0], "provider_authorized");
    assert_eq!(
        reasons
            .iter()
            .filter(|r| *r == "provider_credential_rotated")
            .count(),
        4
    );
    assert_eq!(s.needs_authorization().await.as_deref(), Some("0"));

    // Client-secret rotation: the CLI proves a secret at the token endpoint
    // without minting anything.
    let good = s.secrets.path().join("client-secret");
    assert_eq!(s.check_secret(&good), 0);
    let bad = s.secrets.path().join("wrong-secret");
    std::fs::write(&bad, "not-the-secret").unwrap();
    assert_eq!(s.check_secret(&bad), 1);
    // The probe consumed nothing: cistern keeps working.
    let (status, body) = s.exchange().await;
    assert_eq!(status, 200, "{body}");

    s.assert_no_secret_anywhere(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_rotation_recovers_within_the_idps_reuse_grace_period() {
    if !common::require_oidc_provider() {
        return;
    }
    let mut s = setup(300);
    s.authorize().await;
    let (status, body) = s.exchange().await;
    assert_eq!(status, 200, "{body}");

    let before_crash = s.crash_mid_rotation().await;
    // The IdP rotated the token (its answer died with cistern): the stored one is consumed.
    let rotated_away = s.refresh_tokens().await;

    // After the restart cistern retries with the stored token, which the
    // IdP still accepts within its grace period, and saves the new one.
    let (status, body) = s.exchange().await;
    assert_eq!(status, 200, "{body}\n{}", s.c.logs());
    assert_eq!(
        s.userinfo(body["access_token"].as_str().unwrap()).await,
        200
    );
    let audit = s.provider_audit();
    assert!(
        audit
            .iter()
            .any(|(r, d)| r == "provider_credential_rotated" && d["recovered"] == true),
        "{audit:?}"
    );
    assert!(
        !audit
            .iter()
            .any(|(r, _)| r == "provider_needs_authorization")
    );
    assert!(s.refresh_tokens().await.len() > rotated_away.len());
    // And keeps rotating.
    let (status, body) = s.exchange().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.needs_authorization().await.as_deref(), Some("0"));
    s.assert_no_secret_anywhere(&[before_crash]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_rotation_without_a_grace_period_needs_reauthorization_which_authorize_fixes() {
    if !common::require_oidc_provider() {
        return;
    }
    let mut s = setup(0);
    s.authorize().await;
    let (status, body) = s.exchange().await;
    assert_eq!(status, 200, "{body}");

    let before_crash = s.crash_mid_rotation().await;

    // The stored token was consumed by the rotation whose answer was lost:
    // the IdP refuses it (and, reuse detection, revokes the grant).
    let (status, body) = s.exchange().await;
    assert_eq!(status, 503, "{body}\n{}", s.c.logs());
    assert_eq!(body["error"], "temporarily_unavailable");
    let why = body["error_description"].as_str().unwrap();
    assert!(why.contains("cistern provider authorize idp"), "{why}");
    assert_eq!(s.needs_authorization().await.as_deref(), Some("1"));
    let audit = s.provider_audit();
    assert!(
        audit
            .iter()
            .any(|(r, _)| r == "provider_needs_authorization"),
        "{audit:?}"
    );
    let report = s.report();
    let health = report["provider_credentials"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider"] == "idp")
        .unwrap()
        .clone();
    let last_error = health["last_error"].as_str().unwrap();
    assert!(
        last_error.contains("interrupted rotation")
            && last_error.contains("cistern provider authorize idp"),
        "{health}"
    );
    // The denial is recorded for the job too.
    let conn = rusqlite::Connection::open(s.c.data_dir().join("data/cistern.db")).unwrap();
    let denials: i64 = conn
        .query_row(
            "SELECT count(*) FROM audit WHERE kind = 'exchange_denied' AND reason = 'downstream_needs_authorization'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    drop(conn);
    assert!(denials >= 1);

    // Still flagged while nothing changed in the store (the dead token
    // is what is stored), then the operator authorizes again and the
    // running server notices before any job asks.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(s.needs_authorization().await.as_deref(), Some("1"));
    s.authorize().await;
    s.wait_metric_cleared().await;
    let (status, body) = s.exchange().await;
    assert_eq!(status, 200, "{body}\n{}", s.c.logs());
    assert_eq!(
        s.userinfo(body["access_token"].as_str().unwrap()).await,
        200
    );
    assert_eq!(s.needs_authorization().await.as_deref(), Some("0"));
    s.assert_no_secret_anywhere(&[before_crash]).await;
}
