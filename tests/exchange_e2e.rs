//! End to end: a GitLab stand-in run by npm `oidc-provider` issues ID tokens;
//! the real `cistern` binary exchanges them; npm `jose`, `oauth4webapi`,
//! PyJWT and jwcrypto verify what cistern minted; authlib and oauth4webapi
//! drive the exchange as standard clients; authlib validates the RFC 8414
//! metadata. Records are read back from the SQLite store.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    Cistern, CisternBuilder, OrFail, Peer, decode_jwt, require_peers, run_node_async,
    run_python_async,
};
use serde_json::Value;

const AUD: &str = "https://cistern.test";

const DEPLOY: &str = r#"
role = "deploy"
owner = "team-payments"
description = "Deploy grp/proj from protected main"
issuer = "gitlab"

[bindings]
project_id = "42"
ref_type = "branch"
ref = "main"
ref_protected = true

[grant]
kind = "access_token"
audience = "https://deploy.test"
scopes = ["deploy:read", "deploy:write"]
ttl = "10m"
"#;

const ARTIFACTS: &str = r#"
role = "artifacts"
owner = "team-platform"
description = "Any branch of namespace 7, pushed or scheduled"
issuer = "gitlab"
condition = 'claims.pipeline_source in ["push", "schedule"]'

[bindings]
namespace_id = "7"
ref_type = "branch"

[grant]
kind = "access_token"
audience = "https://artifacts.test"
scopes = ["artifacts:read"]
ttl = "5m"
"#;

fn start(issuer: &Peer, alg: &str) -> Cistern {
    CisternBuilder::new()
        .issuer("gitlab", issuer.url(), &[AUD])
        .policy("deploy.toml", DEPLOY)
        .policy("artifacts.toml", ARTIFACTS)
        .ceiling_scopes(&["deploy:*", "artifacts:*"])
        .algorithm(alg)
        .start()
}

fn db(c: &Cistern) -> rusqlite::Connection {
    rusqlite::Connection::open_with_flags(
        c.data_dir().join("data/cistern.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .or_fail("opening the store")
}

fn count(c: &Cistern, sql: &str) -> i64 {
    db(c).query_row(sql, [], |r| r.get(0)).or_fail(sql)
}

async fn verify_everywhere(c: &Cistern, token: &str, audience: &str) {
    let (code, out) = run_node_async(
        "verify_jose.mjs",
        &[&c.jwks_url(), &c.issuer(), audience, token],
    )
    .await;
    assert_eq!(code, 0, "npm jose refused our token: {out}");
    let (code, out) = run_node_async(
        "verify_oauth4webapi.mjs",
        &[&c.metadata_url(), audience, token],
    )
    .await;
    assert_eq!(
        code, 0,
        "oauth4webapi validateJwtAccessToken refused our token: {out}"
    );
    let (code, out) = run_python_async(
        "verify_py.py",
        &[&c.jwks_url(), &c.issuer(), audience, token],
    )
    .await;
    assert_eq!(code, 0, "PyJWT/jwcrypto refused our token: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gitlab_id_token_from_oidc_provider_is_exchanged_and_the_result_verifies_in_four_libraries()
 {
    if !require_peers() {
        return;
    }
    let gitlab = Peer::gitlab_issuer();
    for alg in ["ES256", "EdDSA"] {
        let c = start(&gitlab, alg);
        let id_token = gitlab.mint("main", AUD).await;
        let (status, body) = c.exchange(&id_token, "deploy", None).await;
        assert_eq!(status, 200, "{alg}: {body}\n{}", c.logs());
        assert_eq!(
            body["issued_token_type"],
            "urn:ietf:params:oauth:token-type:access_token"
        );
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["scope"], "deploy:read deploy:write");
        let expires_in = body["expires_in"].as_i64().or_fail("expires_in");
        assert!((590..=600).contains(&expires_in), "{expires_in}");
        let token = body["access_token"]
            .as_str()
            .or_fail("access_token")
            .to_owned();
        let (header, claims) = decode_jwt(&token);
        assert_eq!(header["typ"], "at+jwt");
        assert_eq!(header["alg"], alg);
        assert_eq!(claims["iss"], c.issuer());
        assert_eq!(claims["aud"], "https://deploy.test");
        assert_eq!(claims["sub"], "gitlab:project:42");
        assert_eq!(claims["role"], "deploy");
        assert_eq!(claims["owner"], "team-payments");
        assert_eq!(claims["pipeline"]["project_id"], "42");
        assert_eq!(claims["pipeline"]["ref"], "main");
        verify_everywhere(&c, &token, "https://deploy.test").await;

        // The token and audit rows are durable before the response.
        let (_, ic) = decode_jwt(&id_token);
        assert_eq!(count(&c, "SELECT count(*) FROM issued_tokens"), 1);
        let jti: String = db(&c)
            .query_row("SELECT subject_jti FROM issued_tokens", [], |r| r.get(0))
            .or_fail("issued token");
        assert_eq!(Value::String(jti), ic["jti"]);
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM audit WHERE kind = 'exchange_granted'"
            ),
            1
        );
        assert_eq!(
            count(
                &c,
                "SELECT count(*) FROM identities WHERE project_id = '42' AND role = 'deploy'"
            ),
            1
        );
        // No token text anywhere in the store.
        let detail: String = db(&c)
            .query_row("SELECT group_concat(detail, ' ') FROM audit", [], |r| {
                r.get(0)
            })
            .or_fail("audit detail");
        assert!(!detail.contains(&id_token) && !detail.contains(&token));
        assert!(
            !c.logs().contains(&token) && !c.logs().contains(&id_token),
            "a token reached the log"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_decisions_reach_the_wire_with_rfc_8693_codes_and_are_audited() {
    if !require_peers() {
        return;
    }
    let gitlab = Peer::gitlab_issuer();
    let c = start(&gitlab, "ES256");

    // Narrowing is allowed, widening is invalid_scope.
    let (s, b) = c
        .exchange(
            &gitlab.mint("main", AUD).await,
            "deploy",
            Some("deploy:read"),
        )
        .await;
    assert_eq!((s, b["scope"].as_str()), (200, Some("deploy:read")), "{b}");
    let (s, b) = c
        .exchange(
            &gitlab.mint("main", AUD).await,
            "deploy",
            Some("deploy:read deploy:admin"),
        )
        .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("invalid_scope")),
        "{b}"
    );

    // An unprotected feature branch is refused, without naming the binding.
    let (s, b) = c
        .exchange(&gitlab.mint("feature", AUD).await, "deploy", None)
        .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("invalid_request")),
        "{b}"
    );
    let desc = b["error_description"].as_str().or_fail("description");
    assert!(
        desc.contains("deploy") && !desc.contains("ref_protected"),
        "{desc}"
    );

    // Fork merge-request pipelines are refused by default.
    let (s, b) = c
        .exchange(&gitlab.mint("fork", AUD).await, "artifacts", None)
        .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("invalid_request")),
        "{b}"
    );

    // Unknown role: invalid_target. Another namespace: refused.
    let (s, b) = c
        .exchange(&gitlab.mint("main", AUD).await, "nope", None)
        .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("invalid_target")),
        "{b}"
    );
    let (s, b) = c
        .exchange(&gitlab.mint("other-ns", AUD).await, "artifacts", None)
        .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("invalid_request")),
        "{b}"
    );

    // CEL: a feature branch in namespace 7 pushed is fine for artifacts.
    let (s, b) = c
        .exchange(&gitlab.mint("feature", AUD).await, "artifacts", None)
        .await;
    assert_eq!(s, 200, "{b}");

    // Replay: the same ID token cannot be exchanged twice.
    let once = gitlab.mint("main", AUD).await;
    assert_eq!(c.exchange(&once, "deploy", None).await.0, 200);
    let (s, b) = c.exchange(&once, "deploy", None).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("invalid_request")),
        "{b}"
    );
    assert!(
        b["error_description"]
            .as_str()
            .unwrap_or("")
            .contains("already"),
        "{b}"
    );

    // A token for another audience (e.g. Vault) is refused.
    let (s, b) = c
        .exchange(
            &gitlab.mint("main", "https://vault.example.com").await,
            "deploy",
            None,
        )
        .await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("invalid_request")),
        "{b}"
    );

    assert_eq!(count(&c, "SELECT count(*) FROM issued_tokens"), 3);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM audit WHERE kind = 'exchange_granted'"
        ),
        3
    );
    let denials: Vec<String> = {
        let conn = db(&c);
        let mut st = conn
            .prepare("SELECT reason FROM audit WHERE kind = 'exchange_denied' ORDER BY seq")
            .or_fail("prepare");
        st.query_map([], |r| r.get(0))
            .or_fail("query")
            .map(|r| r.or_fail("row"))
            .collect()
    };
    assert_eq!(
        denials,
        [
            "scope_not_allowed",
            "not_permitted",
            "not_permitted",
            "unknown_role",
            "not_permitted",
            "replay",
            "wrong_audience"
        ],
    );
    // The denial names the binding that failed, for the auditor (not the job).
    let trace: String = db(&c)
        .query_row("SELECT detail FROM audit WHERE kind = 'exchange_denied' AND reason = 'not_permitted' ORDER BY seq LIMIT 1", [], |r| r.get(0))
        .or_fail("denial detail");
    assert!(trace.contains("ref_protected"), "{trace}");

    let metrics = c
        .http()
        .get(format!("{}/metrics", c.base_url()))
        .send()
        .await
        .or_fail("metrics")
        .text()
        .await
        .or_fail("text");
    assert!(
        metrics.contains("cistern_exchanges_total{outcome=\"granted\",role=\"deploy\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cistern_exchange_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("cistern_jwks_fetches_total"), "{metrics}");
    // The scrape's own connection is open; the limit is the default.
    assert!(
        metrics.contains("cistern_connections_limit 10000"),
        "{metrics}"
    );
    let open: i64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cistern_connections_open "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(open >= 1, "{metrics}");
    assert!(
        metrics.contains("cistern_connections_timed_out_total"),
        "{metrics}"
    );
    // The store's writer: every exchange above was a write, none failed.
    let counter = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(-1.0)
    };
    assert!(counter("cistern_store_commits_total") >= 1.0, "{metrics}");
    assert!(
        counter("cistern_store_write_requests_total") >= counter("cistern_store_commits_total"),
        "{metrics}"
    );
    assert_eq!(
        counter("cistern_store_failed_batches_total"),
        0.0,
        "{metrics}"
    );
    assert_eq!(
        counter("cistern_audit_sink_failures_total"),
        0.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_explains_the_decision_issues_nothing_and_does_not_consume_the_token() {
    if !require_peers() {
        return;
    }
    let gitlab = Peer::gitlab_issuer();
    let c = start(&gitlab, "ES256");
    let id_token = gitlab.mint("feature", AUD).await;
    let report = c.dry_run(&id_token, "deploy").await;
    assert_eq!(report["would_grant"], false, "{report}");
    let checks = report["traces"][0]["checks"].as_array().or_fail("checks");
    assert!(
        checks
            .iter()
            .any(|c| c["ok"] == false && c["what"].as_str().unwrap_or("").contains("ref")),
        "{report}"
    );
    assert_eq!(count(&c, "SELECT count(*) FROM issued_tokens"), 0);
    assert_eq!(
        count(
            &c,
            "SELECT count(*) FROM audit WHERE kind = 'exchange_dry_run'"
        ),
        1
    );
    // Not consumed: the same token can still be exchanged for a role it fits.
    let (s, b) = c.exchange(&id_token, "artifacts", None).await;
    assert_eq!(s, 200, "{b}");
    // Once it has been, a dry run says the exchange would be refused as a
    // replay, though the policy still matches.
    let report = c.dry_run(&id_token, "artifacts").await;
    assert_eq!(report["would_grant"], false, "{report}");
    assert_eq!(report["role"], "artifacts", "{report}");
    assert_eq!(report["denial"]["code"], "replay", "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_clients_drive_the_exchange_and_validate_the_metadata() {
    if !require_peers() {
        return;
    }
    let gitlab = Peer::gitlab_issuer();
    let c = start(&gitlab, "ES256");

    let (code, out) = run_python_async("check_metadata.py", &[&c.metadata_url()]).await;
    assert_eq!(code, 0, "authlib RFC 8414 validation: {out}");

    let t = gitlab.mint("main", AUD).await;
    let (code, out) = run_python_async(
        "authlib_exchange.py",
        &[&c.token_url(), &t, "deploy", "deploy:read"],
    )
    .await;
    assert_eq!(code, 0, "authlib exchange: {out}");
    assert_eq!(out["scope"], "deploy:read", "{out}");
    verify_everywhere(
        &c,
        out["access_token"].as_str().or_fail("token"),
        "https://deploy.test",
    )
    .await;

    let t = gitlab.mint("main", AUD).await;
    let (code, out) = run_node_async(
        "oauth4webapi_exchange.mjs",
        &[&c.metadata_url(), &t, "deploy"],
    )
    .await;
    assert_eq!(code, 0, "oauth4webapi exchange: {out}");
    assert_eq!(
        out["issued_token_type"], "urn:ietf:params:oauth:token-type:access_token",
        "{out}"
    );

    // An error reaches the clients as an OAuth error, not a crash.
    let t = gitlab.mint("feature", AUD).await;
    let (code, out) =
        run_python_async("authlib_exchange.py", &[&c.token_url(), &t, "deploy"]).await;
    assert_eq!(
        (code, out["error"].as_str()),
        (2, Some("invalid_request")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_side_cli_prints_the_token_and_fails_with_one_line() {
    if !require_peers() {
        return;
    }
    let gitlab = Peer::gitlab_issuer();
    let c = start(&gitlab, "ES256");
    let bin = env!("CARGO_BIN_EXE_cistern");
    let t = gitlab.mint("main", AUD).await;
    let out = tokio::process::Command::new(bin)
        .args([
            "exchange",
            "--url",
            &c.base_url(),
            "--role",
            "deploy",
            "--format",
            "dotenv",
            "--var",
            "DEPLOY_TOKEN",
        ])
        .env("CISTERN_ID_TOKEN", &t)
        .output()
        .await
        .or_fail("cistern exchange");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.starts_with("DEPLOY_TOKEN=ey"), "{line}");

    let t = gitlab.mint("feature", AUD).await;
    let out = tokio::process::Command::new(bin)
        .args(["exchange", "--url", &c.base_url(), "--role", "deploy"])
        .env("CISTERN_ID_TOKEN", &t)
        .output()
        .await
        .or_fail("cistern exchange");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("invalid_request"), "{err}");
    assert!(out.stdout.is_empty());

    let out = tokio::process::Command::new(bin)
        .args(["exchange", "--url", &c.base_url(), "--role", "deploy"])
        .env_remove("CISTERN_ID_TOKEN")
        .output()
        .await
        .or_fail("cistern exchange");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CISTERN_ID_TOKEN"));
}

/// Polls `cond` every 100 ms for up to 15 s.
async fn eventually(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    for _ in 0..150 {
        if cond().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_policy_change_is_rejected_and_audited_while_a_good_one_takes_effect() {
    if !require_peers() {
        return;
    }
    let gitlab = Peer::gitlab_issuer();
    let mut c = CisternBuilder::new()
        .issuer("gitlab", gitlab.url(), &[AUD])
        .policy("deploy.toml", DEPLOY)
        .ceiling_scopes(&["deploy:*", "artifacts:*"])
        .set("policy.reload_interval", "200ms")
        .start();

    // Broken: no immutable id. The old set stays in force.
    c.write_policy("deploy.toml", &DEPLOY.replace("project_id = \"42\"", ""));
    eventually("policy_rejected audit", async || {
        count(
            &c,
            "SELECT count(*) FROM audit WHERE kind = 'policy_rejected'",
        ) >= 1
    })
    .await;
    let (s, b) = c
        .exchange(&gitlab.mint("main", AUD).await, "deploy", None)
        .await;
    assert_eq!(s, 200, "the old policy set must stay in force: {b}");

    // Good: a feature-branch role appears, and the deploy role is narrowed.
    c.write_policy(
        "deploy.toml",
        &DEPLOY.replace(
            "scopes = [\"deploy:read\", \"deploy:write\"]",
            "scopes = [\"deploy:read\"]",
        ),
    );
    c.write_policy("artifacts.toml", ARTIFACTS);
    eventually("the new set", async || {
        let (s, b) = c
            .exchange(&gitlab.mint("feature", AUD).await, "artifacts", None)
            .await;
        s == 200 && b["scope"] == "artifacts:read"
    })
    .await;
    let (s, b) = c
        .exchange(&gitlab.mint("main", AUD).await, "deploy", None)
        .await;
    assert_eq!((s, b["scope"].as_str()), (200, Some("deploy:read")), "{b}");
    assert!(
        count(
            &c,
            "SELECT count(*) FROM audit WHERE kind = 'policy_loaded'"
        ) >= 2
    );

    // The store and keys survive a restart: the same kid signs, the same ID token stays consumed.
    let jwks_before: Value = c
        .http()
        .get(c.jwks_url())
        .send()
        .await
        .or_fail("jwks")
        .json()
        .await
        .or_fail("json");
    let once = gitlab.mint("main", AUD).await;
    assert_eq!(c.exchange(&once, "deploy", None).await.0, 200);
    c.restart();
    c.wait_ready(std::time::Duration::from_secs(15)).await;
    let jwks_after: Value = c
        .http()
        .get(c.jwks_url())
        .send()
        .await
        .or_fail("jwks")
        .json()
        .await
        .or_fail("json");
    assert_eq!(jwks_before, jwks_after);
    let (s, b) = c.exchange(&once, "deploy", None).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("invalid_request")),
        "replay after restart: {b}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policies_at_once() {
    if !require_peers() {
        return;
    }
    let gitlab = Peer::gitlab_issuer();
    // A poll interval far beyond the test: only the signal can reload.
    let c = CisternBuilder::new()
        .issuer("gitlab", gitlab.url(), &[AUD])
        .policy("deploy.toml", DEPLOY)
        .ceiling_scopes(&["deploy:*", "artifacts:*"])
        .set("policy.reload_interval", "1h")
        .start();
    c.write_policy("artifacts.toml", ARTIFACTS);
    let (s, _) = c
        .exchange(&gitlab.mint("feature", AUD).await, "artifacts", None)
        .await;
    assert_eq!(s, 400, "the new role must not exist before the signal");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &c.pid().to_string()])
        .status()
        .or_fail("kill -HUP");
    assert!(status.success());
    eventually("the reload after SIGHUP", async || {
        c.exchange(&gitlab.mint("feature", AUD).await, "artifacts", None)
            .await
            .0
            == 200
    })
    .await;
}
