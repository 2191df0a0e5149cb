//! Credential lifecycle end to end on the real binary: RFC 7009
//! self-revocation, RFC 7662 introspection, admin revocation at every grain,
//! offboarding and re-enabling, admin authentication, and a revocation
//! written directly to the store by the CLI and picked up by the server's
//! poll.
//!
//! The ID tokens come from a second cistern in `serve --dev` (its built-in
//! development issuer publishes discovery + JWKS and mints GitLab-shaped
//! tokens), so these tests need no npm or Python peers; the authlib and
//! oauth4webapi introspection clients run when the peers are installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Cistern, CisternBuilder, DevIssuer, require_peers, run_node_async, run_python_async};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_cistern");
const AUD: &str = "https://cistern.test";
const ADMIN_AUD: &str = "https://cistern-admin.test";
const CLIENT_SECRET: &str = "rs-secret with spaces & symbols";
const BOOTSTRAP: &str = "cst_bg_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

const ARTIFACTS: &str = r#"
role = "artifacts"
owner = "team-platform"
description = "Any project of namespace 7 or 8"
issuer = "gitlab"
[bindings]
namespace_id = ["7", "8"]
[grant]
kind = "access_token"
audience = "https://artifacts.test"
scopes = ["artifacts:read"]
ttl = "10m"
"#;

const ADMIN: &str = r#"
role = "admin"
owner = "team-security"
description = "The protected admin pipeline"
issuer = "gitlab"
[bindings]
project_id = "99"
[grant]
kind = "access_token"
audience = "https://cistern-admin.test"
scopes = ["cistern:admin"]
ttl = "10m"
"#;

fn sha256_hex(s: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        s.as_bytes(),
    ))
}

struct World {
    dev: DevIssuer,
    c: Cistern,
}

fn start() -> World {
    let dev = DevIssuer::start();
    let c = CisternBuilder::new()
        .issuer("gitlab", &dev.issuer_url(), &[AUD])
        .policy("deploy.toml", common::DEPLOY_POLICY)
        .policy("artifacts.toml", ARTIFACTS)
        .policy("admin.toml", ADMIN)
        .ceiling_scopes(&["deploy:*", "artifacts:*", "cistern:admin"])
        .set("server.clients.rs.secret_sha256", sha256_hex(CLIENT_SECRET))
        .set("admin.bootstrap_sha256", sha256_hex(BOOTSTRAP))
        .set("admin.audience", ADMIN_AUD)
        .set("revocation.poll_interval", "50ms")
        .start();
    World { dev, c }
}

impl World {
    /// Exchanges a fresh ID token of `project`/`ns` for `role`; returns the access token.
    async fn token(&self, project: &str, ns: &str, role: &str) -> String {
        let id = self.dev.id_token(project, ns).await;
        let (status, body) = self.c.exchange(&id, role, None).await;
        assert_eq!(status, 200, "{body}\n{}", self.c.logs());
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn introspect(&self, token: &str) -> Value {
        let res = self
            .c
            .http()
            .post(format!("{}/oauth/introspect", self.c.base_url()))
            .basic_auth("rs", Some(CLIENT_SECRET))
            .form(&[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["cache-control"], "no-store");
        res.json().await.unwrap()
    }

    async fn active(&self, token: &str) -> bool {
        self.introspect(token).await["active"].as_bool().unwrap()
    }

    async fn admin(&self, path: &str, credential: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self
            .c
            .http()
            .post(format!("{}{path}", self.c.base_url()))
            .json(&body);
        if let Some(cred) = credential {
            req = req.bearer_auth(cred);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    async fn revoke(&self, body: Value) -> Value {
        let (status, out) = self.admin("/v1/admin/revoke", Some(BOOTSTRAP), body).await;
        assert_eq!(status, 200, "{out}");
        out
    }

    fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open_with_flags(
            self.c.data_dir().join("data/cistern.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap()
    }
}

/// (project id, namespace id, role) of a job.
type Job = (&'static str, &'static str, &'static str);

fn jti_of(token: &str) -> String {
    common::decode_jwt(token).1["jti"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_revokes_its_own_token_and_introspection_then_says_inactive() {
    let w = start();
    let token = w.token("42", "7", "deploy").await;
    let jti = jti_of(&token);

    let info = w.introspect(&token).await;
    assert_eq!(info["active"], true, "{info}");
    assert_eq!(info["token_type"], "Bearer");
    assert_eq!(info["scope"], "deploy:write");
    assert_eq!(info["aud"], "https://deploy.test");
    assert_eq!(info["iss"], w.c.issuer());
    assert_eq!(info["jti"], jti);
    assert_eq!(info["sub"], "gitlab:project:42");
    assert_eq!(info["role"], "deploy");
    assert_eq!(info["owner"], "team-payments");
    assert_eq!(info["project_id"], "42");
    assert_eq!(info["namespace_id"], "7");
    assert_eq!(info["project_path"], "acme/payments");
    for k in ["exp", "iat", "nbf"] {
        assert!(info[k].is_i64(), "{k}: {info}");
    }

    // RFC 7009: the token alone is the credential; the hint is ignored.
    let res =
        w.c.http()
            .post(format!("{}/oauth/revoke", w.c.base_url()))
            .form(&[
                ("token", token.as_str()),
                ("token_type_hint", "refresh_token"),
            ])
            .send()
            .await
            .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(w.introspect(&token).await, json!({ "active": false }));

    // Revoking again, or revoking garbage, is still 200.
    for t in [token.as_str(), "not-a-token", "a.b.c"] {
        let res =
            w.c.http()
                .post(format!("{}/oauth/revoke", w.c.base_url()))
                .form(&[("token", t)])
                .send()
                .await
                .unwrap();
        assert_eq!(res.status(), 200, "{t}");
    }
    // Unknown and malformed tokens are inactive.
    assert_eq!(w.introspect("a.b.c").await, json!({ "active": false }));

    // One rule, marked effective no earlier than it was requested; audited
    // with the jti and never the token.
    let db = w.db();
    let (grain, value, requested, effective, source): (String, String, i64, i64, String) = db
        .query_row(
            "SELECT grain, value, requested_at_ms, effective_at_ms, source FROM revocations",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    assert_eq!(
        (grain.as_str(), value.as_str(), source.as_str()),
        ("jti", jti.as_str(), "rfc7009")
    );
    assert!(effective >= requested);
    let details: Vec<String> = db
        .prepare("SELECT detail FROM audit WHERE kind IN ('token_revoked', 'introspected')")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(details.iter().any(|d| d.contains(&jti)));
    assert!(
        details.iter().all(|d| !d.contains(&token)),
        "a token reached the audit log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspection_requires_a_configured_client() {
    let w = start();
    let token = w.token("42", "7", "deploy").await;
    let url = format!("{}/oauth/introspect", w.c.base_url());
    let http = w.c.http();
    let cases = [
        http.post(&url).form(&[("token", token.as_str())]),
        http.post(&url)
            .basic_auth("rs", Some("wrong"))
            .form(&[("token", token.as_str())]),
        http.post(&url)
            .basic_auth("nobody", Some(CLIENT_SECRET))
            .form(&[("token", token.as_str())]),
        http.post(&url).form(&[
            ("token", token.as_str()),
            ("client_id", "rs"),
            ("client_secret", "wrong"),
        ]),
    ];
    for req in cases {
        let res = req.send().await.unwrap();
        assert_eq!(res.status(), 401);
        assert!(res.headers().contains_key("www-authenticate"));
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "invalid_client");
    }
    // client_secret_post works too.
    let res = http
        .post(&url)
        .form(&[
            ("token", token.as_str()),
            ("client_id", "rs"),
            ("client_secret", CLIENT_SECRET),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.json::<Value>().await.unwrap()["active"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_refuses_anyone_without_an_admin_credential() {
    let w = start();
    let deploy = w.token("42", "7", "deploy").await;
    let body = json!({ "grain": "all", "reason": "test" });
    for cred in [
        None,
        Some("cst_bg_wrong"),
        Some(deploy.as_str()),
        Some("garbage"),
    ] {
        let (status, _) = w.admin("/v1/admin/revoke", cred, body.clone()).await;
        assert_eq!(status, 401, "{cred:?}");
    }
    let res =
        w.c.http()
            .get(format!("{}/v1/admin/offboarded", w.c.base_url()))
            .send()
            .await
            .unwrap();
    assert_eq!(res.status(), 401);
    assert!(
        res.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    // Nothing was revoked by the refused calls, and each was audited with
    // the credential's hash, never the credential.
    assert!(w.active(&deploy).await);
    let refused: Vec<(String, String)> = w
        .db()
        .prepare(
            "SELECT json_extract(detail, '$.operation'), json_extract(detail, '$.refused')
             FROM audit WHERE kind = 'admin_action' AND reason = 'unauthorized' ORDER BY seq",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        refused,
        [
            ("revoke", "no_credential"),
            ("revoke", "invalid_token"),
            ("revoke", "invalid_token"),
            ("revoke", "invalid_token"),
            ("offboarded", "no_credential"),
        ]
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
    );
    let details: String = w
        .db()
        .query_row("SELECT group_concat(detail) FROM audit", [], |r| r.get(0))
        .unwrap();
    assert!(!details.contains(&deploy) && !details.contains("cst_bg_wrong"));

    // An admin token minted by the exchange through the admin policy works,
    // and the actor recorded is its subject and jti.
    let admin = w.token("99", "7", "admin").await;
    let (status, out) = w
        .admin(
            "/v1/admin/revoke",
            Some(&admin),
            json!({ "grain": "role", "value": "deploy", "reason": "rotate" }),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["outstanding"], 1);
    assert!(!w.active(&deploy).await);
    let actor: String = w
        .db()
        .query_row("SELECT actor FROM revocations", [], |r| r.get(0))
        .unwrap();
    assert_eq!(actor, format!("gitlab:project:99 jti={}", jti_of(&admin)));
    // A revoked admin token is refused.
    let (status, _) = w
        .admin(
            "/v1/admin/revoke",
            Some(&admin),
            json!({ "grain": "jti", "value": jti_of(&admin), "reason": "self" }),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = w
        .admin(
            "/v1/admin/revoke",
            Some(&admin),
            json!({ "grain": "all", "reason": "x" }),
        )
        .await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_admin_grain_revokes_what_it_names_and_nothing_else() {
    let w = start();
    // (rule, token it must revoke, token it must leave active)
    let cases: Vec<(Value, Job, Job)> = vec![
        (
            json!({ "grain": "project", "value": "42" }),
            ("42", "7", "deploy"),
            ("43", "7", "artifacts"),
        ),
        (
            json!({ "grain": "project", "value": "43", "issuer": w.dev.issuer_url() }),
            ("43", "7", "artifacts"),
            ("44", "7", "artifacts"),
        ),
        (
            json!({ "grain": "namespace", "value": "8" }),
            ("45", "8", "artifacts"),
            ("46", "7", "artifacts"),
        ),
        (
            json!({ "grain": "role", "value": "artifacts" }),
            ("47", "7", "artifacts"),
            ("42", "7", "deploy"),
        ),
    ];
    for (mut rule, hit, miss) in cases {
        let revoked = w.token(hit.0, hit.1, hit.2).await;
        let kept = w.token(miss.0, miss.1, miss.2).await;
        rule["reason"] = json!("test");
        let out = w.revoke(rule.clone()).await;
        // Outstanding = unexpired credentials the rule covers, including any
        // an earlier rule already revoked.
        let jtis = out["jtis"].as_array().unwrap();
        assert!(jtis.contains(&json!(jti_of(&revoked))), "{rule}: {out}");
        assert!(!jtis.contains(&json!(jti_of(&kept))), "{rule}: {out}");
        assert_eq!(out["outstanding"].as_u64().unwrap() as usize, jtis.len());
        assert!(
            out["effective_at_ms"].as_i64().unwrap() >= out["requested_at_ms"].as_i64().unwrap()
        );
        assert!(!w.active(&revoked).await, "{rule}");
        assert!(w.active(&kept).await, "{rule}");
    }

    // jti
    let a = w.token("42", "7", "deploy").await;
    let b = w.token("42", "7", "deploy").await;
    let out = w
        .revoke(json!({ "grain": "jti", "value": jti_of(&a), "reason": "leak" }))
        .await;
    assert_eq!(out["outstanding"], 1);
    assert!(!w.active(&a).await);
    assert!(w.active(&b).await);

    // `before` an instant in the past covers nothing issued since.
    let out = w
        .revoke(json!({ "grain": "all", "before": "2020-01-01T00:00:00Z", "reason": "old" }))
        .await;
    assert_eq!(out["outstanding"], 0);
    assert!(w.active(&b).await);
    // A future instant is refused.
    let (status, out) = w
        .admin(
            "/v1/admin/revoke",
            Some(BOOTSTRAP),
            json!({ "grain": "all", "before": "2999-01-01T00:00:00Z", "reason": "x" }),
        )
        .await;
    assert_eq!(status, 400, "{out}");
    // A reason is required.
    let (status, _) = w
        .admin(
            "/v1/admin/revoke",
            Some(BOOTSTRAP),
            json!({ "grain": "all", "reason": "" }),
        )
        .await;
    assert_eq!(status, 400);

    // issuer, then all
    let out = w
        .revoke(json!({ "grain": "issuer", "value": "gitlab", "reason": "issuer compromised" }))
        .await;
    assert!(out["outstanding"].as_u64().unwrap() >= 1);
    assert!(!w.active(&b).await);
    let c = w.token("42", "7", "deploy").await;
    assert!(w.active(&c).await, "issued after the rule");
    let out = w
        .revoke(json!({ "grain": "all", "reason": "incident" }))
        .await;
    assert!(
        out["jtis"].as_array().unwrap().contains(&json!(jti_of(&c))),
        "{out}"
    );
    assert!(!w.active(&c).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offboarding_refuses_new_exchanges_revokes_outstanding_and_reenable_lifts_it() {
    let w = start();
    let outstanding = w.token("42", "7", "deploy").await;
    let other = w.token("43", "7", "artifacts").await;
    let (status, out) = w
        .admin(
            "/v1/admin/offboard",
            Some(BOOTSTRAP),
            json!({ "grain": "project", "value": "42", "reason": "team left" }),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["block"]["grain"], "project");
    assert_eq!(out["revocation"]["outstanding"], 1);
    assert!(!w.active(&outstanding).await);
    assert!(w.active(&other).await);

    let id = w.dev.id_token("42", "7").await;
    // The dry run says so before the real exchange does.
    let report = w.c.dry_run(&id, "deploy").await;
    assert_eq!(report["would_grant"], false, "{report}");
    assert_eq!(report["denial"]["code"], "offboarded", "{report}");
    assert_eq!(report["scopes"], json!([]), "{report}");
    let (status, body) = w.c.exchange(&id, "deploy", None).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_grant");
    let reason: String = w
        .db()
        .query_row(
            "SELECT reason FROM audit WHERE kind = 'exchange_denied' ORDER BY seq DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(reason, "offboarded");

    let res =
        w.c.http()
            .get(format!("{}/v1/admin/offboarded", w.c.base_url()))
            .bearer_auth(BOOTSTRAP)
            .send()
            .await
            .unwrap();
    let listed: Value = res.json().await.unwrap();
    assert_eq!(listed["offboarded"][0]["value"], "42");
    assert_eq!(listed["offboarded"][0]["reason"], "team left");

    let (status, out) = w
        .admin(
            "/v1/admin/reenable",
            Some(BOOTSTRAP),
            json!({ "grain": "project", "value": "42", "reason": "back" }),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["was_blocked"], true);
    let fresh = w.token("42", "7", "deploy").await;
    assert!(w.active(&fresh).await);
    // The old credential stays revoked.
    assert!(!w.active(&outstanding).await);
    let kinds: Vec<String> = w
        .db()
        .prepare("SELECT kind FROM audit WHERE kind IN ('offboarded', 'reenabled') ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(kinds, ["offboarded", "reenabled"]);
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("CISTERN_ADMIN_TOKEN")
        .env_remove("CISTERN_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_revokes_through_the_api_and_directly_on_the_store() {
    let w = start();
    let config = w.c.config_path().to_str().unwrap().to_owned();
    let base = w.c.base_url();

    // Direct on the store: the running server applies it at its next poll.
    let token = w.token("42", "7", "deploy").await;
    assert!(w.active(&token).await);
    let jti = jti_of(&token);
    let (code, stdout, stderr) = cli(
        &[
            "revoke",
            "--jti",
            &jti,
            "--reason",
            "leaked in a log",
            "--config",
            &config,
            "--direct",
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let out: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(out["outstanding"], 1);
    assert_eq!(out["effective_at_ms"], Value::Null);
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.active(&token).await {
        assert!(
            Instant::now() < deadline,
            "the server never applied the rule"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (requested, effective): (i64, i64) = w
        .db()
        .query_row(
            "SELECT requested_at_ms, effective_at_ms FROM revocations WHERE id = ?1",
            [out["rule_id"].as_i64().unwrap()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(effective >= requested);

    // Direct offboarding blocks exchanges on the running server too.
    let (code, stdout, stderr) = cli(
        &[
            "offboard",
            "--namespace",
            "8",
            "--reason",
            "gone",
            "--config",
            &config,
            "--direct",
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("offboarded namespace 8"), "{stdout}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let id = w.dev.id_token("45", "8").await;
        let (status, body) = w.c.exchange(&id, "artifacts", None).await;
        if status == 400 {
            assert_eq!(body["error"], "invalid_grant");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the block never reached the server"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Through the admin API, the credential from the environment.
    let t2 = w.token("42", "7", "deploy").await;
    let (code, stdout, stderr) = cli(
        &[
            "revoke",
            "--project",
            "42",
            "--issuer",
            "gitlab",
            "--reason",
            "rotate",
            "--server",
            &base,
        ],
        &[("CISTERN_ADMIN_TOKEN", BOOTSTRAP)],
    );
    assert_eq!(code, 0, "{stderr}");
    // `token` (revoked by jti above, not yet expired) and `t2`.
    assert!(
        stdout.contains("outstanding credentials covered: 2"),
        "{stdout}"
    );
    assert!(!w.active(&t2).await);
    let (code, stdout, stderr) = cli(
        &[
            "reenable",
            "--namespace",
            "8",
            "--reason",
            "back",
            "--server",
            &base,
        ],
        &[("CISTERN_ADMIN_TOKEN", BOOTSTRAP)],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("re-enabled namespace 8"), "{stdout}");

    // A wrong credential: non-zero, one line naming the cause.
    let (code, _, stderr) = cli(
        &["revoke", "--all", "--reason", "x", "--server", &base],
        &[("CISTERN_ADMIN_TOKEN", "cst_bg_nope")],
    );
    assert_ne!(code, 0);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    // No reason: refused by the CLI itself.
    let (code, _, _) = cli(&["revoke", "--all", "--server", &base], &[]);
    assert_ne!(code, 0);
}

#[test]
fn admin_bootstrap_prints_a_credential_once_with_its_hash() {
    let (code, stdout, _) = cli(&["admin", "bootstrap"], &[]);
    assert_eq!(code, 0);
    let cred = stdout
        .split_whitespace()
        .find(|w| w.starts_with("cst_bg_"))
        .unwrap();
    assert_eq!(cred.len(), "cst_bg_".len() + 43, "32 bytes, base64url");
    assert!(stdout.contains(&format!("bootstrap_sha256 = \"{}\"", sha256_hex(cred))));
    let (_, again, _) = cli(&["admin", "bootstrap"], &[]);
    assert!(!again.contains(cred), "a fresh credential each time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authlib_and_oauth4webapi_introspect_as_standard_clients() {
    if !require_peers() {
        return;
    }
    let w = start();
    let token = w.token("42", "7", "deploy").await;
    let metadata = w.c.metadata_url();
    let (code, out) = run_python_async(
        "authlib_introspect.py",
        &[&metadata, "rs", CLIENT_SECRET, &token],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["active"], true, "{out}");
    assert_eq!(out["role"], "deploy");
    let (code, out) = run_node_async(
        "oauth4webapi_introspect.mjs",
        &[&metadata, "rs", CLIENT_SECRET, &token],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["active"], true, "{out}");
    assert_eq!(out["jti"], jti_of(&token));
    // Revoked: both say inactive.
    w.revoke(json!({ "grain": "jti", "value": jti_of(&token), "reason": "t" }))
        .await;
    let (_, out) = run_python_async(
        "authlib_introspect.py",
        &[&metadata, "rs", CLIENT_SECRET, &token],
    )
    .await;
    assert_eq!(out["active"], false, "{out}");
    let (_, out) = run_node_async(
        "oauth4webapi_introspect.mjs",
        &[&metadata, "rs", CLIENT_SECRET, &token],
    )
    .await;
    assert_eq!(out["active"], false, "{out}");
}
