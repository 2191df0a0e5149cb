//! The bad-input catalogue (shared/reference/security.md §1.1) against the
//! real binary, with a GitLab stand-in run by npm `jose` that can forge,
//! mutate and break anything. Every case: the right OAuth error, no panic,
//! nothing issued, and the denial audited.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Cistern, CisternBuilder, OrFail, Peer, require_peers};
use serde_json::{Value, json};

const AUD: &str = "https://cistern.test";

const POLICY: &str = r#"
role = "deploy"
owner = "team-payments"
description = "protected main of project 42"
issuer = "gitlab"

[bindings]
project_id = "42"
ref = "main"
ref_protected = true

[grant]
kind = "access_token"
audience = "https://deploy.test"
scopes = ["deploy:read"]
ttl = "5m"
"#;

fn start(issuer: &Peer, extra: &[(&str, Value)]) -> Cistern {
    let mut b = CisternBuilder::new()
        .issuer("gitlab", issuer.url(), &[AUD])
        .policy("deploy.toml", POLICY)
        .ceiling_scopes(&["deploy:*"])
        .set("issuers.gitlab.unknown_kid_cooldown", "60s");
    for (k, v) in extra {
        let v: toml::Value = match v {
            Value::String(s) => s.clone().into(),
            Value::Number(n) => n.as_i64().or_fail("int").into(),
            Value::Bool(b) => (*b).into(),
            _ => panic!("unsupported setting"),
        };
        b = b.set(k, v);
    }
    b.start()
}

fn count(c: &Cistern, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open_with_flags(
        c.data_dir().join("data/cistern.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .or_fail("store");
    conn.query_row(sql, [], |r| r.get(0)).or_fail(sql)
}

/// Exchanges `token` and asserts a 400 `invalid_request` that was audited
/// as a denial with `reason`, with nothing issued.
async fn refused(c: &Cistern, case: &str, token: &str, reason: &str) {
    let denials = count(
        c,
        "SELECT count(*) FROM audit WHERE kind = 'exchange_denied'",
    );
    let issued = count(c, "SELECT count(*) FROM issued_tokens");
    let (s, b) = c.exchange(token, "deploy", None).await;
    assert_eq!(
        (s, b["error"].as_str()),
        (400, Some("invalid_request")),
        "{case}: {b}\n{}",
        c.logs()
    );
    assert!(
        b["error_description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{case}: {b}"
    );
    assert_eq!(
        count(c, "SELECT count(*) FROM issued_tokens"),
        issued,
        "{case}: something was issued"
    );
    let stored_reason: String = {
        let conn = rusqlite::Connection::open_with_flags(
            c.data_dir().join("data/cistern.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .or_fail("store");
        conn.query_row(
            "SELECT reason FROM audit WHERE kind = 'exchange_denied' ORDER BY seq DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .or_fail("last denial")
    };
    assert_eq!(
        count(
            c,
            "SELECT count(*) FROM audit WHERE kind = 'exchange_denied'"
        ),
        denials + 1,
        "{case}: not audited"
    );
    assert_eq!(stored_reason, reason, "{case}");
}

fn b64(v: &Value) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

fn parts(token: &str) -> Vec<String> {
    token.split('.').map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_malformed_tokens_are_refused_with_invalid_request() {
    if !require_peers() {
        return;
    }
    let issuer = Peer::jose_issuer();
    let c = start(&issuer, &[]);
    let mint = |spec: Value| {
        let issuer = &issuer;
        async move { issuer.mint_with(spec).await }
    };
    // Sanity: the untouched token is granted by the same server.
    let good = mint(json!({ "aud": AUD })).await;
    let (s, b) = c.exchange(&good, "deploy", None).await;
    assert_eq!(s, 200, "{b}\n{}", c.logs());
    let issued_before = count(&c, "SELECT count(*) FROM issued_tokens");
    assert_eq!(issued_before, 1);
    // From here on nothing may be issued: reset the baseline by checking deltas.
    let c_issued = |n: i64| {
        assert_eq!(
            count(&c, "SELECT count(*) FROM issued_tokens"),
            issued_before + n
        )
    };

    // H1: alg none, all spellings, with and without the original signature.
    for alg in ["none", "None", "NONE", "nOnE"] {
        let p = parts(&mint(json!({ "aud": AUD })).await);
        let header = json!({ "alg": alg, "typ": "JWT" });
        for sig in ["", p[2].as_str()] {
            let t = format!("{}.{}.{sig}", b64(&header), p[1]);
            let (s, b) = c.exchange(&t, "deploy", None).await;
            assert_eq!(
                (s, b["error"].as_str()),
                (400, Some("invalid_request")),
                "H1 {alg}: {b}"
            );
        }
    }
    // H1, H2 via the issuer's own forgeries; H5 embedded jwk; bad signature; unknown key.
    for (forge, reason) in [
        ("alg_none", "malformed"), // the empty signature segment fails first
        ("hs256_pubkey", "unsupported_algorithm"),
        ("embedded_jwk", "refused_header"),
        ("bad_sig", "bad_signature"),
        ("no_kid", "unknown_key"),
    ] {
        let t = mint(json!({ "aud": AUD, "forge": forge })).await;
        refused(&c, forge, &t, reason).await;
    }
    // H3/H4: other algorithms and malformed alg values, same kid.
    for alg in [
        json!("PS256"),
        json!("RS512"),
        json!("ES256"),
        json!("rs256"),
        json!("RS256 "),
        json!(null),
        json!(256),
    ] {
        let t = mint(json!({ "aud": AUD, "header": { "alg": alg } })).await;
        let (s, b) = c.exchange(&t, "deploy", None).await;
        assert_eq!(
            (s, b["error"].as_str()),
            (400, Some("invalid_request")),
            "H3/H4 {alg}: {b}"
        );
    }
    // H6/H7: jku/x5u pointing at the issuer itself must not cause a fetch.
    issuer.reset_stats().await;
    for (k, v) in [
        (
            "jku",
            json!(format!("{}/oauth/discovery/keys", issuer.url())),
        ),
        ("x5u", json!(format!("{}/x5u", issuer.url()))),
        ("x5c", json!(["MIIB"])),
    ] {
        let t = mint(json!({ "aud": AUD, "header": { k: v } })).await;
        let (s, b) = c.exchange(&t, "deploy", None).await;
        assert_eq!(s, 400, "H6 {k}: {b}");
    }
    assert_eq!(
        issuer.stats().await["jwks_hits"],
        0,
        "a header URL caused a fetch"
    );
    // H10: crit in every form.
    for crit in [
        json!(["exp"]),
        json!([]),
        json!(["b64"]),
        json!(["x-unknown"]),
    ] {
        let t = mint(json!({ "aud": AUD, "header": { "crit": crit, "b64": false } })).await;
        refused(&c, "H10", &t, "refused_header").await;
    }
    // H11: our own token type is never a subject token.
    for typ in ["at+jwt", "application/at+JWT"] {
        let t = mint(json!({ "aud": AUD, "header": { "typ": typ } })).await;
        let (s, _) = c.exchange(&t, "deploy", None).await;
        assert_eq!(s, 400, "H11 {typ}");
    }
    // H12: wrong segment counts, JSON serialization, padding, whitespace.
    let p = parts(&mint(json!({ "aud": AUD })).await);
    for bad in [
        format!("{}.{}", p[0], p[1]),
        format!("{}.{}.{}.{}", p[0], p[1], p[2], p[2]),
        format!("{}.{}.{}.", p[0], p[1], p[2]),
        json!({ "payload": p[1], "signatures": [{ "protected": p[0], "signature": p[2] }] })
            .to_string(),
        format!("{}=.{}.{}", p[0], p[1], p[2]),
        format!("{} .{}.{}", p[0], p[1], p[2]),
    ] {
        refused(&c, "H12", &bad, "malformed").await;
    }
    // E1: duplicate members in the header and in the payload.
    let dup_header = format!(
        "{}.{}.{}",
        base64_raw(r#"{"alg":"RS256","alg":"none","typ":"JWT"}"#),
        p[1],
        p[2]
    );
    let (s, _) = c.exchange(&dup_header, "deploy", None).await;
    assert_eq!(s, 400, "E1 header");
    let payload = format!(
        r#"{{"iss":"{}","sub":"a","sub":"b","aud":"{AUD}","exp":{},"iat":{},"jti":"x"}}"#,
        issuer.url(),
        now() + 300,
        now()
    );
    let t = mint(json!({ "aud": AUD, "payload_json": payload })).await;
    refused(&c, "E1 payload", &t, "invalid_claims").await;
    // E3: huge tokens get a fast 4xx and nothing else.
    for size in [20_000usize, 70_000] {
        let huge = format!("{}.{}.{}", p[0], "A".repeat(size), p[2]);
        let (s, _) = c.exchange(&huge, "deploy", None).await;
        assert!((400..500).contains(&s), "E3 {size}: {s}");
    }
    c_issued(0);
}

fn base64_raw(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_of_the_wrong_type_time_or_audience_are_refused() {
    if !require_peers() {
        return;
    }
    let issuer = Peer::jose_issuer();
    let c = start(
        &issuer,
        &[
            ("issuers.gitlab.leeway", json!("10s")),
            ("issuers.gitlab.max_token_age", json!("1h")),
        ],
    );
    let t = now();
    let cases: Vec<(&str, Value, &str)> = vec![
        // D1: time.
        ("expired", json!({ "exp": t - 11 }), "expired"),
        ("exp now minus leeway", json!({ "exp": t - 10 }), "expired"),
        (
            "nbf in the future",
            json!({ "nbf": t + 60 }),
            "not_yet_valid",
        ),
        (
            "iat in the future",
            json!({ "iat": t + 60, "nbf": t }),
            "not_yet_valid",
        ),
        (
            "too old",
            json!({ "iat": t - 7200, "nbf": t - 7200 }),
            "too_old",
        ),
        ("missing exp", json!({ "exp": null }), "invalid_claims"),
        // D2: wrong types for dates.
        (
            "string exp",
            json!({ "exp": "9999999999" }),
            "invalid_claims",
        ),
        // JSON.stringify writes integral floats as integers, so use a fraction.
        (
            "float exp",
            json!({ "exp": t as f64 + 300.5 }),
            "invalid_claims",
        ),
        ("huge exp", json!({ "exp": 1e300 }), "invalid_claims"),
        ("bool nbf", json!({ "nbf": true }), "invalid_claims"),
        ("array iat", json!({ "iat": [t] }), "invalid_claims"),
        // D3/R2: audience.
        (
            "other aud",
            json!({ "aud": "https://vault.example.com" }),
            "wrong_audience",
        ),
        ("empty aud", json!({ "aud": "" }), "invalid_claims"),
        ("empty aud list", json!({ "aud": [] }), "invalid_claims"),
        ("object aud", json!({ "aud": { "a": 1 } }), "invalid_claims"),
        ("missing aud", json!({ "aud": null }), "invalid_claims"),
        // D6/D7: GitLab's claim types exactly; missing required claims.
        (
            "integer project_id",
            json!({ "project_id": 42 }),
            "invalid_claims",
        ),
        (
            "bool ref_protected",
            json!({ "ref_protected": true }),
            "invalid_claims",
        ),
        (
            "string runner_id",
            json!({ "runner_id": "1" }),
            "invalid_claims",
        ),
        (
            "missing project_id",
            json!({ "project_id": null }),
            "invalid_claims",
        ),
        (
            "missing namespace_id",
            json!({ "namespace_id": null }),
            "invalid_claims",
        ),
        (
            "missing ref_type",
            json!({ "ref_type": null }),
            "invalid_claims",
        ),
        (
            "bad ref_type",
            json!({ "ref_type": "commit" }),
            "invalid_claims",
        ),
        // Array iss (fast-jwt CVE-2025-30144).
        (
            "array iss",
            json!({ "iss": [issuer.url()] }),
            "untrusted_issuer",
        ),
    ];
    for (case, claims, reason) in cases {
        // `claims` overrides apply after `aud`, and null deletes a claim.
        let spec = json!({ "aud": AUD, "claims": claims });
        let token = issuer.mint_with(spec).await;
        refused(&c, case, &token, reason).await;
    }
    // nbf exactly now, and exp just inside the leeway, are accepted (D1).
    let ok = issuer
        .mint_with(json!({ "aud": AUD, "claims": { "nbf": t, "exp": t - 5 } }))
        .await;
    let (s, b) = c.exchange(&ok, "deploy", None).await;
    assert_eq!(s, 200, "within leeway: {b}");
    // D3: an array containing our audience is accepted.
    let ok = issuer
        .mint_with(json!({ "aud": ["https://vault.example.com", AUD] }))
        .await;
    assert_eq!(c.exchange(&ok, "deploy", None).await.0, 200);
    // D5: unknown extra claims are ignored, 10 000 of them exceed the size bound.
    let mut many = serde_json::Map::new();
    for i in 0..10_000 {
        many.insert(format!("x{i}"), json!(i));
    }
    let big = issuer
        .mint_with(json!({ "aud": AUD, "claims": Value::Object(many) }))
        .await;
    let (s, _) = c.exchange(&big, "deploy", None).await;
    assert!((400..500).contains(&s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_outage_or_a_kid_flood_never_turns_into_a_fetch_storm() {
    if !require_peers() {
        return;
    }
    let issuer = Peer::jose_issuer();
    let c = start(&issuer, &[("issuers.gitlab.fetch_timeout", json!("1s"))]);
    let first = issuer.mint_with(json!({ "aud": AUD })).await;
    assert_eq!(
        c.exchange(&first, "deploy", None).await.0,
        200,
        "{}",
        c.logs()
    );
    // J2: 50 tokens signed by unknown keys cause at most one refetch in the cooldown.
    issuer.reset_stats().await;
    for _ in 0..50 {
        let t = issuer
            .mint_with(json!({ "aud": AUD, "key": "unknown" }))
            .await;
        let (s, b) = c.exchange(&t, "deploy", None).await;
        assert_eq!(
            (s, b["error"].as_str()),
            (400, Some("invalid_request")),
            "{b}"
        );
    }
    let hits = issuer.stats().await["jwks_hits"].as_i64().unwrap_or(-1);
    assert!(hits <= 1, "unknown kids caused {hits} JWKS fetches");
    // J1: while the JWKS answers 500, slow or huge, the cached keys keep serving.
    for mode in [
        json!({ "jwks": "500" }),
        json!({ "jwks": "huge", "size_bytes": 2_000_000 }),
        json!({ "jwks": "invalid_json" }),
    ] {
        issuer.set_behaviour(mode.clone()).await;
        let t = issuer.mint_with(json!({ "aud": AUD })).await;
        let (s, b) = c.exchange(&t, "deploy", None).await;
        assert_eq!(s, 200, "{mode}: {b}");
    }
    issuer.set_behaviour(json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_discovery_document_for_another_issuer_or_a_token_from_an_unknown_issuer_is_refused() {
    if !require_peers() {
        return;
    }
    // S1: the discovery document names another issuer — no key is ever trusted.
    let issuer = Peer::jose_issuer();
    issuer
        .set_behaviour(json!({ "discovery_overrides": { "issuer": "https://evil.example" } }))
        .await;
    let c = start(&issuer, &[]);
    let t = issuer.mint_with(json!({ "aud": AUD })).await;
    let (s, b) = c.exchange(&t, "deploy", None).await;
    assert!(s == 400 || s == 503, "{s} {b}");
    assert_eq!(count(&c, "SELECT count(*) FROM issued_tokens"), 0);
    // jwks_uri on another host.
    issuer
        .set_behaviour(json!({ "discovery_overrides": { "jwks_uri": "http://127.0.0.2:9/keys" } }))
        .await;
    let (s, _) = c
        .exchange(
            &issuer.mint_with(json!({ "aud": AUD })).await,
            "deploy",
            None,
        )
        .await;
    assert!(s == 400 || s == 503);

    // S2: a token whose iss is not configured causes no fetch at all.
    let other = Peer::jose_issuer();
    let t = other.mint_with(json!({ "aud": AUD })).await;
    other.reset_stats().await;
    refused(&c, "S2", &t, "untrusted_issuer").await;
    let stats = other.stats().await;
    assert_eq!(
        (
            stats["jwks_hits"].as_i64(),
            stats["discovery_hits"].as_i64()
        ),
        (Some(0), Some(0)),
        "{stats}"
    );
}
