//! Downstream credentials end to end: cistern mints GitLab project access
//! tokens through GitLab's own OpenAPI contract (served by Prism, a
//! validating mock), behind a recording, fault-injecting front; the reaper
//! revokes them when their lifetime ends; python-gitlab uses a minted token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Cistern, CisternBuilder, DEV_AUDIENCE, DevIssuer, Fault, GitLabFront, Prism};
use serde_json::Value;

const OWN_TOKEN: &str = "glpat-cistern-own-credential";

const GITLAB_ROLE: &str = r#"
role = "ci-read"
owner = "team-payments"
description = "Read the project's API from CI"
issuer = "gitlab"
[bindings]
project_id = "42"
[grant]
kind = "gitlab_project_token"
provider = "gitlab"
scopes = ["read_api"]
access_level = 20
ttl = "2s"
"#;

struct World {
    dev: DevIssuer,
    front: GitLabFront,
    c: Cistern,
    _prism: Prism,
    _secrets: tempfile::TempDir,
}

async fn start(ttl: &str, extra: &[(&str, toml::Value)]) -> Option<World> {
    start_with(ttl, extra, false).await
}

async fn start_with(ttl: &str, extra: &[(&str, toml::Value)], stateful: bool) -> Option<World> {
    if !common::require_prism() {
        return None;
    }
    let prism = Prism::start();
    let front = if stateful {
        GitLabFront::start_stateful(&prism.url()).await
    } else {
        GitLabFront::start(&prism.url()).await
    };
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("gitlab-token");
    std::fs::write(&token_file, format!("{OWN_TOKEN}\n")).unwrap();
    let dev = DevIssuer::start();
    let mut b = CisternBuilder::new()
        .issuer("gitlab", &dev.issuer_url(), &[DEV_AUDIENCE])
        .policy(
            "ci-read.toml",
            &GITLAB_ROLE.replace("ttl = \"2s\"", &format!("ttl = \"{ttl}\"")),
        )
        .ceiling_scopes(&["deploy:*"])
        .set("providers.gitlab.kind", "gitlab")
        .set("providers.gitlab.url", front.url())
        .set("providers.gitlab.allow_insecure_http", true)
        .set("providers.gitlab.token_file", token_file.to_str().unwrap())
        .set("providers.gitlab.timeout", "2s");
    for (k, v) in extra {
        b = b.set(k, v.clone());
    }
    let c = b.start();
    Some(World {
        dev,
        front,
        c,
        _prism: prism,
        _secrets: secrets,
    })
}

impl World {
    async fn exchange(&self) -> (u16, Value, String) {
        let id = self.dev.id_token("42", "7").await;
        let (status, body) = self.c.exchange(&id, "ci-read", None).await;
        (status, body, id)
    }

    fn creates(&self) -> Vec<common::Recorded> {
        self.front
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path() == "/api/v4/projects/42/access_tokens")
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_gets_a_gitlab_token_minted_to_gitlabs_contract_and_revoked_when_its_lifetime_ends() {
    let Some(w) = start("2s", &[]).await else {
        return;
    };
    let (status, body, id_token) = w.exchange().await;
    assert_eq!(status, 200, "{body}\n{}", w.c.logs());
    assert_eq!(body["cistern_credential_kind"], "gitlab_project_token");
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    assert_eq!(body["scope"], "read_api");
    let token = body["access_token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("glpat-"), "{body}");
    assert!(body["expires_in"].as_i64().unwrap() <= 2);

    // The request met GitLab's published contract (Prism validated it:
    // 201 and no violations) and carried the policy's grant.
    let creates = w.creates();
    assert_eq!(creates.len(), 1, "{creates:?}");
    let create = &creates[0];
    assert_eq!(create.upstream_status, Some(201), "{create:?}");
    assert!(create.violation_messages().is_empty(), "{create:?}");
    assert_eq!(create.private_token.as_deref(), Some(OWN_TOKEN));
    let sent = create.json();
    assert_eq!(sent["scopes"], serde_json::json!(["read_api"]));
    assert_eq!(sent["access_level"], 20);
    let name = sent["name"].as_str().unwrap();
    assert!(name.starts_with("cistern-"), "{sent}");
    assert!(
        sent["description"].as_str().unwrap().contains("ci-read"),
        "{sent}"
    );
    // A date (GitLab's granularity) no more than two days out.
    assert_eq!(sent["expires_at"].as_str().unwrap().len(), 10, "{sent}");
    // The job's ID token never goes to GitLab.
    for r in w.front.requests() {
        assert!(
            !r.body.contains(&id_token) && r.authorization.is_none(),
            "{r:?}"
        );
    }

    // python-gitlab, a real GitLab client, works with the minted token.
    let (code, out) = common::run_python_async(
        "gitlab_client.py",
        &[
            "--url",
            &w.front.url(),
            "--token",
            &token,
            "--project",
            "42",
        ],
    )
    .await;
    assert_eq!((code, &out["ok"]), (0, &Value::Bool(true)), "{out}");
    let listed = w
        .front
        .requests()
        .into_iter()
        .find(|r| r.method == "GET")
        .unwrap();
    assert_eq!(listed.private_token.as_deref(), Some(token.as_str()));

    // The reaper revokes it when its 2 s lifetime ends: assert the call,
    // not the clock (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(30);
    let delete = loop {
        let d = w.front.requests().into_iter().find(|r| {
            // Recorded on arrival; wait until it has been answered.
            r.method == "DELETE"
                && r.path().starts_with("/api/v4/projects/42/access_tokens/")
                && r.status.is_some()
        });
        if let Some(d) = d {
            break d;
        }
        assert!(
            Instant::now() < deadline,
            "no revoke call; logs:\n{}",
            w.c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(delete.upstream_status, Some(204), "{delete:?}");
    assert_eq!(delete.private_token.as_deref(), Some(OWN_TOKEN));
    // Recorded and audited once, and the job's token string is in no record.
    let deadline = Instant::now() + Duration::from_secs(10);
    let db = w.c.data_dir().join("data/cistern.db");
    loop {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let revoked: Option<String> = conn
            .query_row("SELECT revoke_cause FROM downstream_credentials", [], |r| {
                r.get(0)
            })
            .unwrap();
        if revoked.is_some() {
            assert_eq!(revoked.as_deref(), Some("expired"));
            let audits: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM audit WHERE reason = 'downstream_expired'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(audits, 1);
            let all: String = conn
                .query_row("SELECT group_concat(detail) FROM audit", [], |r| r.get(0))
                .unwrap();
            assert!(!all.contains(&token) && !all.contains(OWN_TOKEN));
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_failures_are_retried_or_surfaced_as_users_of_the_api_expect() {
    // A lifetime long enough that the reaper makes no calls meanwhile (the
    // faults apply to the next requests, whoever sends them).
    let Some(w) = start("10m", &[("providers.gitlab.max_retries", 2.into())]).await else {
        return;
    };
    // One 500, then success: retried with backoff.
    w.front.fail_next(1, Fault::Status(500));
    let (status, body, _) = w.exchange().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(w.creates().len(), 2);

    // 429 with Retry-After: waited for, then success.
    w.front.clear();
    w.front.fail_next(
        1,
        Fault::RateLimited {
            retry_after_secs: 1,
        },
    );
    let (status, body, _) = w.exchange().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(w.creates().len(), 2);

    // 5xx past the retries: the job is told to try later.
    w.front.clear();
    w.front.fail_next(3, Fault::Status(503));
    let (status, body, _) = w.exchange().await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("temporarily_unavailable")),
        "{body}"
    );
    assert_eq!(w.creates().len(), 3);

    // A refusal is final and clear.
    w.front.clear();
    w.front.fail_next(1, Fault::Status(403));
    let (status, body, _) = w.exchange().await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_target")),
        "{body}"
    );
    assert_eq!(w.creates().len(), 1);

    // Nonsense is an error, not a credential.
    w.front.fail_next(1, Fault::Malformed);
    let (status, body, _) = w.exchange().await;
    assert_eq!(
        (status, body["error"].as_str()),
        (500, Some("server_error")),
        "{body}"
    );

    // A call that outlives the timeout counts as a failure (then retried).
    w.front.clear();
    w.front.fail_next(3, Fault::Delay(Duration::from_secs(3)));
    let (status, body, _) = w.exchange().await;
    assert_eq!(status, 503, "{body}");

    // Every refusal is audited with its reason; only the granted ones were recorded.
    let conn = rusqlite::Connection::open(w.c.data_dir().join("data/cistern.db")).unwrap();
    let reasons: Vec<String> = conn
        .prepare("SELECT reason FROM audit WHERE kind = 'exchange_denied' ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        reasons,
        [
            "downstream_unavailable",
            "downstream_refused",
            "downstream_error",
            "downstream_unavailable"
        ]
    );
    let issued: i64 = conn
        .query_row("SELECT COUNT(*) FROM downstream_credentials", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(issued, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_id_token_never_reaches_gitlab() {
    let Some(w) = start("10m", &[]).await else {
        return;
    };
    let id = w.dev.id_token("42", "7").await;
    assert_eq!(w.c.exchange(&id, "ci-read", None).await.0, 200);
    let (status, body) = w.c.exchange(&id, "ci-read", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    assert_eq!(w.creates().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_minted_just_before_a_crash_is_revoked_by_reconciliation_on_restart() {
    let Some(mut w) = start_with(
        "10m",
        &[("providers.gitlab.reconcile_interval", "1s".into())],
        true,
    )
    .await
    else {
        return;
    };
    // GitLab creates the token; its answer is held back, and cistern is
    // killed (SIGKILL) before it can record anything.
    w.front
        .fail_next(1, Fault::DelayAfter(Duration::from_secs(60)));
    let id = w.dev.id_token("42", "7").await;
    let url = w.c.token_url();
    let http = w.c.http().clone();
    let pending = tokio::spawn(async move {
        http.post(url)
            .form(&[
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                ),
                ("subject_token", id.as_str()),
                ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ("role", "ci-read"),
            ])
            .send()
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.front.tokens().is_empty() {
        assert!(Instant::now() < deadline, "GitLab never saw the create");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = std::process::Command::new("kill")
        .args(["-KILL", &w.c.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(pending.await.unwrap().is_err(), "the job got an answer");
    let db = w.c.data_dir().join("data/cistern.db");
    let recorded: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM downstream_credentials", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(recorded, 0, "nothing was recorded");
    let orphan = w.front.tokens()[0].clone();
    assert!(
        orphan.active && orphan.name.starts_with("cistern-"),
        "{orphan:?}"
    );

    // On restart, reconciliation lists the project and revokes the orphan.
    w.c.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.front.tokens()[0].active {
        assert!(
            Instant::now() < deadline,
            "orphan not revoked; logs:\n{}",
            w.c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let delete = loop {
        // Recorded on arrival; its status and Prism's verdict once answered.
        if let Some(d) = w
            .front
            .requests()
            .into_iter()
            .find(|r| r.method == "DELETE" && r.status.is_some())
        {
            break d;
        }
        assert!(Instant::now() < deadline, "the revoke was never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(delete.upstream_status, Some(204), "{delete:?}");
    assert_eq!(
        delete.path(),
        format!("/api/v4/projects/42/access_tokens/{}", orphan.id)
    );
    assert!(delete.violation_messages().is_empty(), "{delete:?}");
    // Audited, with the mark it carried.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = rusqlite::Connection::open(&db)
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM audit WHERE reason = 'reconciled_unknown'
                 AND json_extract(detail, '$.external_id') = ?1",
                [orphan.id.to_string()],
                |r| r.get(0),
            )
            .unwrap();
        if n == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no audit record of the reconciliation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offboarding_a_project_revokes_its_gitlab_tokens_at_once() {
    const BOOTSTRAP: &str = "cst_bg_CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC";
    let hash = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        BOOTSTRAP.as_bytes(),
    ));
    let Some(w) = start_with("10m", &[("admin.bootstrap_sha256", hash.into())], true).await else {
        return;
    };
    assert_eq!(w.exchange().await.0, 200);
    assert_eq!(w.exchange().await.0, 200);
    assert!(w.front.tokens().iter().all(|t| t.active));
    let res = w
        .c
        .http()
        .post(format!("{}/v1/admin/offboard", w.c.base_url()))
        .bearer_auth(BOOTSTRAP)
        .json(
            &serde_json::json!({ "grain": "project", "value": "42", "reason": "project archived" }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Long before their 10-minute lifetime: revoked by the next reaper pass.
    let deadline = Instant::now() + Duration::from_secs(30);
    while w.front.tokens().iter().any(|t| t.active) {
        assert!(
            Instant::now() < deadline,
            "tokens still active: {:?}",
            w.front.tokens()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And no new one is minted for the offboarded project.
    let (status, body, _) = w.exchange().await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );
    assert_eq!(w.front.tokens().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cisterns_own_credential_is_sealed_rotated_before_expiry_and_survives_a_restart() {
    let keys = tempfile::tempdir().unwrap();
    let kek_file = keys.path().join("kek");
    std::fs::write(&kek_file, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    let Some(mut w) = start(
        "10m",
        &[
            (
                "providers.gitlab.kek_file",
                kek_file.to_str().unwrap().into(),
            ),
            ("providers.gitlab.rotation_check_interval", "1h".into()),
        ],
    )
    .await
    else {
        return;
    };
    // At start: the seed from token_file was sealed, and the first check
    // found it expiring (GitLab's example token expired in 2026-01) and
    // rotated it through the self-rotate endpoint.
    let deadline = Instant::now() + Duration::from_secs(30);
    let rotate = loop {
        if let Some(r) = w.front.requests().into_iter().find(|r| {
            r.method == "POST"
                && r.path() == "/api/v4/personal_access_tokens/self/rotate"
                && r.status.is_some()
        }) {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no rotation; logs:\n{}",
            w.c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(rotate.upstream_status, Some(200), "{rotate:?}");
    assert!(rotate.violation_messages().is_empty(), "{rotate:?}");
    assert_eq!(rotate.private_token.as_deref(), Some(OWN_TOKEN));
    let rotated: Value = serde_json::from_str(&rotate.response_body).unwrap();
    let rotated = rotated["token"].as_str().unwrap().to_owned();
    assert_ne!(rotated, OWN_TOKEN);

    // From then on every call carries the rotated credential.
    let db = w.c.data_dir().join("data/cistern.db");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n: i64 = rusqlite::Connection::open(&db)
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM audit WHERE reason = 'provider_credential_rotated'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        if n == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "rotation not recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.front.clear();
    assert_eq!(w.exchange().await.0, 200);
    assert_eq!(
        w.creates()[0].private_token.as_deref(),
        Some(rotated.as_str())
    );

    // Sealed at rest: neither credential appears in the database file.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (ciphertext, expires_on): (Vec<u8>, Option<String>) = conn
        .query_row(
            "SELECT ciphertext, expires_on FROM provider_credentials WHERE provider = 'gitlab'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(!ciphertext.windows(6).any(|w| w == b"glpat-"));
    assert!(expires_on.is_some());
    drop(conn);
    let raw = std::fs::read(&db).unwrap();
    assert!(!raw.windows(rotated.len()).any(|w| w == rotated.as_bytes()));

    // Health is in the metrics.
    let metrics =
        w.c.http()
            .get(format!("{}/metrics", w.c.base_url()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
    assert!(
        metrics
            .contains("cistern_provider_credential_rotated_timestamp_seconds{provider=\"gitlab\"}"),
        "{metrics}"
    );

    // ... and in the report.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cistern"))
        .args(["report", "--format", "json", "--config"])
        .arg(w.c.config_path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let health = &report["provider_credentials"][0];
    assert_eq!(health["provider"], "gitlab", "{report}");
    assert!(health["expires_on"].is_string(), "{report}");
    assert!(!out.stdout.windows(6).any(|w| w == b"glpat-"));

    // After a restart the stored, rotated credential is used, not the seed.
    w.c.restart();
    w.c.wait_ready(common::START_TIMEOUT).await;
    w.front.clear();
    assert_eq!(w.exchange().await.0, 200);
    let first = w.front.requests().into_iter().next().unwrap();
    assert_ne!(first.private_token.as_deref(), Some(OWN_TOKEN), "{first:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_can_mint_a_group_token_by_group_id() {
    let Some(w) = start("2s", &[]).await else {
        return;
    };
    w.c.write_policy(
        "ci-group.toml",
        &GITLAB_ROLE
            .replace("role = \"ci-read\"", "role = \"ci-group\"")
            .replace("ttl = \"2s\"", "ttl = \"2s\"\ntarget = { group = 7 }"),
    );
    let status = std::process::Command::new("kill")
        .args(["-HUP", &w.c.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let body = loop {
        let id = w.dev.id_token("42", "7").await;
        let (status, body) = w.c.exchange(&id, "ci-group", None).await;
        if status == 200 {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "the new policy never took: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body["access_token"].as_str().unwrap().starts_with("glpat-"));
    let create = w
        .front
        .requests()
        .into_iter()
        .find(|r| r.method == "POST" && r.path() == "/api/v4/groups/7/access_tokens")
        .expect("a group create");
    assert_eq!(create.upstream_status, Some(201), "{create:?}");
    assert!(create.violation_messages().is_empty(), "{create:?}");
    // Revoked on the group when its lifetime ends.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if w.front.requests().iter().any(|r| {
            r.method == "DELETE"
                && r.path().starts_with("/api/v4/groups/7/access_tokens/")
                && r.status == Some(204)
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no group revoke; logs:\n{}",
            w.c.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
