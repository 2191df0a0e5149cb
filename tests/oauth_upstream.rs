//! OAuth 2.0 client-credentials upstream: cistern asks an IdP run by npm
//! `oidc-provider` (a certified OAuth 2.0 / OpenID server no one here wrote)
//! for a token with the resource indicator the policy allows, caches it
//! until shortly before its expiry, hands it to jobs, and stops handing it
//! out once a revocation covers it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::{CisternBuilder, DEV_AUDIENCE, DevIssuer, Peer};
use serde_json::{Value, json};

const RESOURCE: &str = "https://api.internal.test";
const CLIENT_SECRET: &str = "not-a-secret-test-client";
const BOOTSTRAP: &str = "cst_bg_DDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDDD";

const ROLE: &str = r#"
role = "internal-api"
owner = "team-payments"
description = "Call the internal API from CI"
issuer = "gitlab"
[bindings]
project_id = "42"
[grant]
kind = "oauth2_access_token"
provider = "idp"
audience = "https://api.internal.test"
scopes = []
"#;

/// `b` with provider `idp`: client credentials against the `idp` peer, its
/// client secret written to a file in `dir`, for `RESOURCE`.
fn with_idp(b: CisternBuilder, idp: &Peer, dir: &std::path::Path) -> CisternBuilder {
    let secret_file = dir.join("client-secret");
    std::fs::write(&secret_file, CLIENT_SECRET).unwrap();
    b.set("providers.idp.kind", "oauth2_client_credentials")
        .set(
            "providers.idp.token_url",
            format!("{}/oauth/token", idp.url()),
        )
        .set("providers.idp.client_id", "main")
        .set(
            "providers.idp.client_secret_file",
            secret_file.to_str().unwrap(),
        )
        .set("providers.idp.audiences", vec![RESOURCE])
        .set("providers.idp.allow_insecure_http", true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_get_the_idps_client_credentials_token_cached_and_revocation_stops_reuse() {
    if !common::require_peers() {
        return;
    }
    let idp = Peer::gitlab_issuer();
    let secrets = tempfile::tempdir().unwrap();
    let hash = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        BOOTSTRAP.as_bytes(),
    ));
    let dev = DevIssuer::start();
    let c = CisternBuilder::new()
        .issuer("gitlab", &dev.issuer_url(), &[DEV_AUDIENCE])
        .policy("internal-api.toml", ROLE)
        .ceiling_scopes(&["deploy:*"])
        .set("admin.bootstrap_sha256", hash);
    let c = with_idp(c, &idp, secrets.path()).start();
    let exchange = || async {
        let id = dev.id_token("42", "7").await;
        c.exchange(&id, "internal-api", None).await
    };

    let (status, first) = exchange().await;
    assert_eq!(status, 200, "{first}\n{}", c.logs());
    assert_eq!(first["cistern_credential_kind"], "oauth2_access_token");
    let token = first["access_token"].as_str().unwrap().to_owned();
    // The IdP's own token, for the resource the policy names.
    let (_, claims) = common::decode_jwt(&token);
    assert_eq!(claims["iss"], idp.url(), "{claims}");
    assert_eq!(claims["aud"], RESOURCE, "{claims}");
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert!(first["expires_in"].as_i64().unwrap() <= lifetime);

    // A second job with the same grant gets the cached token: one request to the IdP.
    let (status, second) = exchange().await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["access_token"], first["access_token"]);

    // Recorded where it exists, named by a hash, never by value.
    let db = c.data_dir().join("data/cistern.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (external_id, target): (String, String) = conn
        .query_row(
            "SELECT external_id, target FROM downstream_credentials LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(external_id.starts_with("sha256:"), "{external_id}");
    assert_eq!(target, RESOURCE);
    let all: String = conn
        .query_row("SELECT group_concat(detail) FROM audit", [], |r| r.get(0))
        .unwrap();
    assert!(!all.contains(&token));
    drop(conn);

    // Revoking the role: the cached token is never handed out again.
    let res = c
        .http()
        .post(format!("{}/v1/admin/revoke", c.base_url()))
        .bearer_auth(BOOTSTRAP)
        .json(&json!({ "grain": "role", "value": "internal-api", "reason": "rotate" }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let outstanding: i64 = rusqlite::Connection::open(&db)
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM downstream_credentials WHERE revoked_at_ms IS NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        if outstanding == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the reaper never evicted it");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, third) = exchange().await;
    assert_eq!(status, 200, "{third}");
    assert_ne!(third["access_token"], first["access_token"]);
    let _: Value = third;
}

const PROXY_ROLE: &str = r#"
role = "internal-proxy"
owner = "team-payments"
description = "Call the internal API through cistern's proxy"
issuer = "gitlab"
[bindings]
project_id = "42"
[grant]
kind = "access_token"
audience = "https://proxy.internal.test"
scopes = ["deploy:api"]
ttl = "10m"
proxy = ["GET /v1/**"]
"#;

/// A proxy route whose injected credential is the IdP's client-credentials
/// token: the upstream sees that token (fetched once, then cached), never
/// the job's cistern token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_route_injects_the_idps_token_and_never_the_jobs() {
    if !common::require_peers() {
        return;
    }
    use std::sync::{Arc, Mutex};
    let idp = Peer::gitlab_issuer();
    // The upstream: records the Authorization header of every request.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let recorder = seen.clone();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let recorder = recorder.clone();
        async move {
            let auth = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            recorder.lock().unwrap().push(auth);
            "ok"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let secrets = tempfile::tempdir().unwrap();
    let dev = DevIssuer::start();
    let c = CisternBuilder::new()
        .issuer("gitlab", &dev.issuer_url(), &[DEV_AUDIENCE])
        .policy("internal-proxy.toml", PROXY_ROLE)
        .ceiling_scopes(&["deploy:*"]);
    let c = with_idp(c, &idp, secrets.path())
        .set("proxy.routes.internal.upstream", upstream)
        .set(
            "proxy.routes.internal.audience",
            "https://proxy.internal.test",
        )
        .set("proxy.routes.internal.provider", "idp")
        .set("proxy.routes.internal.present", "bearer")
        .set("proxy.routes.internal.allow_insecure_http", true)
        .start();
    let id = dev.id_token("42", "7").await;
    let (status, body) = c.exchange(&id, "internal-proxy", None).await;
    assert_eq!(status, 200, "{body}\n{}", c.logs());
    let job_token = body["access_token"].as_str().unwrap().to_owned();

    for _ in 0..2 {
        let res = c
            .http()
            .get(format!("{}/proxy/internal/v1/things", c.base_url()))
            .bearer_auth(&job_token)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{}", c.logs());
    }
    let first = seen.lock().unwrap().clone();
    assert_eq!(first.len(), 2, "{first:?}");
    let injected = first[0].strip_prefix("Bearer ").expect("a bearer token");
    assert_ne!(injected, job_token, "the job's token reached the upstream");
    let (_, claims) = common::decode_jwt(injected);
    assert_eq!(claims["iss"], idp.url(), "the IdP's own token: {claims}");
    assert_eq!(
        first[1], first[0],
        "the IdP's token is cached between requests"
    );

    // Outside the role's rules: refused, and the upstream never asked.
    let res = c
        .http()
        .get(format!("{}/proxy/internal/v2/things", c.base_url()))
        .bearer_auth(&job_token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(
        c.http()
            .get(format!("{}/healthz", c.base_url()))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        2,
        "a refused request reached the upstream"
    );
}
