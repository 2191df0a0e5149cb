//! The GitLab test harness itself: Prism serves GitLab's OpenAPI contract for
//! the access-token endpoints and refuses requests that break it, the
//! recording front forwards, records and injects faults as documented, and
//! python-gitlab (GitLab's own client) talks to both. Needs no running
//! cistern.

mod common;

use std::time::{Duration, Instant};

use common::{
    Fault, GitLabFront, HTTP_TIMEOUT, OrFail, Prism, require_peers, require_prism, run_python_async,
};
use serde_json::{Value, json};

const PROJECT_TOKENS: &str = "/api/v4/projects/42/access_tokens";

fn valid_create() -> Value {
    json!({
        "name": "cistern-x",
        "scopes": ["read_api"],
        "access_level": 30,
        "expires_at": "2030-01-02",
    })
}

fn invalid_create() -> Value {
    // `scopes` is required.
    json!({ "name": "cistern-x", "access_level": 30, "expires_at": "2030-01-02" })
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(HTTP_TIMEOUT)
        .build()
        .or_fail("building an HTTP client")
}

/// POSTs a create-access-token request to `{base}/api/v4/projects/42/access_tokens`
/// with `PRIVATE-TOKEN: glpat-test`; returns status, headers and body text.
async fn create(
    http: &reqwest::Client,
    base: &str,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, String) {
    let res = http
        .post(format!("{base}{PROJECT_TOKENS}"))
        .header("PRIVATE-TOKEN", "glpat-test")
        .json(body)
        .send()
        .await
        .or_fail("POST …/access_tokens");
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let text = res.text().await.or_fail("reading the answer");
    (status, headers, text)
}

#[tokio::test]
async fn prism_accepts_a_valid_create_and_refuses_one_without_scopes() {
    if !require_prism() {
        return;
    }
    let prism = Prism::start();
    let http = client();

    let (status, _, text) = create(&http, &prism.url(), &valid_create()).await;
    assert_eq!(status, 201, "{text}\nprism log:\n{}", prism.log());
    let token: Value = serde_json::from_str(&text).or_fail("the 201 body is not JSON");
    assert!(token["token"].as_str().is_some(), "{token}");
    assert!(token["id"].is_i64(), "{token}");

    let (status, headers, text) = create(&http, &prism.url(), &invalid_create()).await;
    assert!(
        (400..500).contains(&status),
        "a create without scopes must be refused, got {status}: {text}"
    );
    let violations = headers
        .get("sl-violations")
        .and_then(|v| v.to_str().ok())
        .or_fail("Prism names the violation in the sl-violations header");
    assert!(violations.contains("scopes"), "{violations}");

    // The contract also requires authentication (presence only).
    let res = http
        .post(format!("{}{PROJECT_TOKENS}", prism.url()))
        .json(&valid_create())
        .send()
        .await
        .or_fail("POST without a token");
    assert_eq!(res.status().as_u16(), 401);
}

#[tokio::test]
async fn the_front_records_forwards_and_injects_faults() {
    if !require_prism() {
        return;
    }
    let prism = Prism::start();
    let front = GitLabFront::start(&prism.url()).await;
    let http = client();

    // Forwarded: Prism's verdicts come through unchanged.
    let (status, _, text) = create(&http, &front.url(), &valid_create()).await;
    assert_eq!(status, 201, "{text}");
    let (status, _, _) = create(&http, &front.url(), &invalid_create()).await;
    assert!((400..500).contains(&status), "{status}");

    let recorded = front.requests();
    assert_eq!(recorded.len(), 2, "{recorded:#?}");
    let ok = &recorded[0];
    assert_eq!(ok.method, "POST");
    assert_eq!(ok.path(), PROJECT_TOKENS);
    assert_eq!(ok.path_and_query, PROJECT_TOKENS);
    assert_eq!(ok.private_token.as_deref(), Some("glpat-test"));
    assert_eq!(ok.authorization, None);
    assert_eq!(ok.content_type.as_deref(), Some("application/json"));
    assert_eq!(ok.json(), valid_create());
    assert_eq!((ok.upstream_status, ok.status), (Some(201), Some(201)));
    assert_eq!(ok.fault, None);
    assert!(ok.violation_messages().is_empty(), "{ok:#?}");
    let bad = &recorded[1];
    assert_eq!(bad.json(), invalid_create());
    assert_eq!(bad.upstream_status, bad.status);
    assert!(
        bad.violation_messages()
            .iter()
            .any(|m| m.contains("scopes")),
        "{bad:#?}"
    );

    // Status(500): GitLab's error shape, not forwarded.
    front.clear();
    front.fail_next(1, Fault::Status(500));
    let (status, _, text) = create(&http, &front.url(), &valid_create()).await;
    assert_eq!(status, 500);
    assert_eq!(
        serde_json::from_str::<Value>(&text).or_fail("the 500 body is JSON"),
        json!({ "message": "500 Internal Server Error" })
    );
    let r = &front.requests()[0];
    assert_eq!((r.upstream_status, r.status), (None, Some(500)));
    assert_eq!(r.fault, Some(Fault::Status(500)));

    // RateLimited twice, then forwarding resumes.
    front.clear();
    front.fail_next(
        2,
        Fault::RateLimited {
            retry_after_secs: 7,
        },
    );
    assert_eq!(front.pending_faults(), 2);
    for _ in 0..2 {
        let (status, headers, text) = create(&http, &front.url(), &valid_create()).await;
        assert_eq!(status, 429, "{text}");
        assert_eq!(
            headers.get("retry-after").and_then(|v| v.to_str().ok()),
            Some("7")
        );
    }
    let (status, _, _) = create(&http, &front.url(), &valid_create()).await;
    assert_eq!(status, 201, "forwarding resumes after the faults");
    let statuses: Vec<_> = front
        .requests()
        .iter()
        .map(|r| (r.status, r.upstream_status))
        .collect();
    assert_eq!(
        statuses,
        [(Some(429), None), (Some(429), None), (Some(201), Some(201))]
    );

    // Malformed: forwarded (Prism still validates), answered 201 `{not json`.
    front.clear();
    front.fail_next(1, Fault::Malformed);
    let (status, _, text) = create(&http, &front.url(), &valid_create()).await;
    assert_eq!((status, text.as_str()), (201, "{not json"));
    assert_eq!(front.requests()[0].upstream_status, Some(201));

    // Delay: forwarded late; a client with a shorter timeout gives up.
    front.clear();
    front.fail_next(1, Fault::Delay(Duration::from_millis(300)));
    let started = Instant::now();
    let (status, _, _) = create(&http, &front.url(), &valid_create()).await;
    assert_eq!(status, 201);
    assert!(started.elapsed() >= Duration::from_millis(300));
    front.fail_next(1, Fault::Delay(Duration::from_secs(3)));
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(200))
        .build()
        .or_fail("building an HTTP client");
    let err = impatient
        .post(format!("{}{PROJECT_TOKENS}", front.url()))
        .header("PRIVATE-TOKEN", "glpat-test")
        .json(&valid_create())
        .send()
        .await
        .err()
        .or_fail("the delayed request must time out");
    assert!(err.is_timeout(), "{err}");
    let recorded = front.requests();
    assert_eq!(recorded.len(), 2);
    assert_eq!(
        recorded[1].status, None,
        "the client gave up: no answer sent"
    );
}

#[tokio::test]
async fn python_gitlab_lists_project_access_tokens() {
    if !require_peers() || !require_prism() {
        return;
    }
    let prism = Prism::start();
    let args =
        |url: &str| ["--url", url, "--token", "glpat-test", "--project", "42"].map(str::to_owned);

    let a = args(&prism.url());
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let (code, out) = run_python_async("gitlab_client.py", &a).await;
    assert_eq!((code, &out["ok"]), (0, &json!(true)), "{out}");
    assert_eq!(out["count"], 1, "{out}");

    // Through the front: python-gitlab obeys a 429's Retry-After and retries.
    let front = GitLabFront::start(&prism.url()).await;
    front.fail_next(
        1,
        Fault::RateLimited {
            retry_after_secs: 1,
        },
    );
    let a = args(&front.url());
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let (code, out) = run_python_async("gitlab_client.py", &a).await;
    assert_eq!((code, &out["ok"]), (0, &json!(true)), "{out}");
    let recorded = front.requests();
    assert_eq!(recorded.len(), 2, "{recorded:#?}");
    for r in &recorded {
        assert_eq!(r.method, "GET");
        assert_eq!(r.path(), PROJECT_TOKENS);
        assert_eq!(r.private_token.as_deref(), Some("glpat-test"));
    }
    assert_eq!(recorded[1].upstream_status, Some(200));

    // A 500 is not retried and is reported.
    front.fail_next(1, Fault::Status(500));
    let (code, out) = run_python_async("gitlab_client.py", &a).await;
    assert_eq!(code, 1, "{out}");
    assert_eq!((&out["ok"], &out["status"]), (&json!(false), &json!(500)));
}
