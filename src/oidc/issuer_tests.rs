//! End-to-end tests of `Issuers::verify` against a loopback GitLab stand-in.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::clock::ManualClock;
use crate::dev::DevIssuer;
use crate::oidc::jwks::KeySet;
use crate::oidc::testutil::*;

/// A stand-in and an issuer set trusting it, with extra config lines.
async fn setup(extra: &str) -> (Arc<StandIn>, Issuers, Arc<ManualClock>, Arc<Metrics>) {
    let s = stand_in().await;
    let (issuers, clock, metrics) = issuers_with(issuer_config(&s.base, extra));
    (s, issuers, clock, metrics)
}

/// A token for the stand-in signed by `key` with `key`'s kid, after `edit`
/// changed the header and claims.
fn tok_by(
    key: &DevIssuer,
    base: &str,
    edit: impl FnOnce(&mut Value, &mut Map<String, Value>),
) -> String {
    let mut h = header(key);
    let mut c = claims(base, NOW);
    edit(&mut h, &mut c);
    forge(key, &h, &Value::Object(c))
}

fn tok(base: &str, edit: impl FnOnce(&mut Value, &mut Map<String, Value>)) -> String {
    tok_by(key_a(), base, edit)
}

fn keys_unavailable(r: Result<VerifiedIdToken, VerifyError>, needle: &str) {
    match r {
        Err(VerifyError::KeysUnavailable(m)) => {
            assert!(m.contains(needle), "{m:?} lacks {needle:?}")
        }
        other => panic!("expected KeysUnavailable({needle}), got {other:?}"),
    }
}

#[tokio::test]
async fn a_genuine_token_verifies_and_keys_are_fetched_once() {
    let (s, issuers, _clock, metrics) = setup("").await;
    issuers.refresh_all().await;
    assert_eq!(s.hits(), (1, 1, 0));
    let t = tok(&s.base, |_, _| {});
    let v = issuers.verify(&t).await.unwrap();
    assert_eq!(&*v.issuer, "gl");
    assert_eq!(v.kid, key_a().kid());
    assert_eq!(v.claims.project_path, "acme/payments");
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, t.as_bytes());
    assert_eq!(&v.token_sha256[..], d.as_ref());
    for _ in 0..10 {
        issuers.verify(&t).await.unwrap();
    }
    assert_eq!(s.hits(), (1, 1, 0), "no network on the hot path");
    let m = metrics.encode();
    assert!(
        m.contains(r#"cistern_jwks_fetches_total{issuer="gl",document="jwks",outcome="ok"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"cistern_jwks_age_seconds{issuer="gl"} 0"#),
        "{m}"
    );
    assert_eq!(issuers.names().collect::<Vec<_>>(), ["gl"]);
}

#[tokio::test]
async fn the_first_token_fetches_keys_when_start_up_could_not() {
    let (s, issuers, _clock, _) = setup("").await;
    let t = tok(&s.base, |_, _| {});
    issuers.verify(&t).await.unwrap();
    assert_eq!(s.hits(), (1, 1, 0));
}

/// `signed`'s header and signature around `other`'s payload.
fn splice(signed: &str, other: &str) -> String {
    let part = |t: &str, n: usize| t.split('.').nth(n).unwrap().to_owned();
    format!("{}.{}.{}", part(signed, 0), part(other, 1), part(signed, 2))
}

#[tokio::test]
async fn a_tampered_or_foreign_signature_is_refused() {
    let (s, issuers, _clock, _) = setup("").await;
    issuers.refresh_all().await;
    let t = tok(&s.base, |_, _| {});
    let (signed, sig) = t.rsplit_once('.').unwrap();
    let mut sig = sig.as_bytes().to_vec();
    sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
    let flipped = format!("{signed}.{}", String::from_utf8(sig).unwrap());
    assert_eq!(
        issuers.verify(&flipped).await.unwrap_err(),
        VerifyError::BadSignature
    );

    let other = tok(&s.base, |_, c| {
        c.insert("project_id".into(), json!("43"));
    });
    let spliced = splice(&t, &other);
    assert_eq!(
        issuers.verify(&spliced).await.unwrap_err(),
        VerifyError::BadSignature
    );

    // Key B signing under key A's kid.
    let foreign = tok_by(key_b(), &s.base, |h, _| {
        h["kid"] = json!(key_a().kid());
    });
    assert_eq!(
        issuers.verify(&foreign).await.unwrap_err(),
        VerifyError::BadSignature
    );

    // Claims that do not parse (an id of the wrong type) under someone
    // else's signature: the signature is refused first, as for claims that
    // do parse; the claims are judged only under a good one.
    let mistyped = tok(&s.base, |_, c| {
        c.insert("project_id".into(), json!(43));
    });
    let forged = splice(&t, &mistyped);
    assert_eq!(
        issuers.verify(&forged).await.unwrap_err(),
        VerifyError::BadSignature
    );
    assert!(matches!(
        issuers.verify(&mistyped).await.unwrap_err(),
        VerifyError::InvalidClaims(_)
    ));
}

#[tokio::test]
async fn alg_none_in_any_spelling_never_reaches_keys_or_claims() {
    let (s, issuers, _clock, _) = setup("").await;
    let t = tok(&s.base, |_, _| {});
    let mut parts = t.split('.');
    let (_, payload, sig) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    for alg in ["none", "None", "NONE", "nOnE"] {
        let h = b64(json!({"alg": alg, "kid": key_a().kid(), "typ": "JWT"}).to_string());
        let kept = format!("{h}.{payload}.{sig}");
        assert_eq!(
            issuers.verify(&kept).await.unwrap_err(),
            VerifyError::UnsupportedAlgorithm(alg.into())
        );
        let empty = format!("{h}.{payload}.");
        assert!(matches!(
            issuers.verify(&empty).await,
            Err(VerifyError::Malformed(_))
        ));
    }
    assert_eq!(s.hits(), (0, 0, 0));
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_as_secret_is_refused() {
    use aws_lc_rs::hmac;
    let (s, issuers, _clock, _) = setup("").await;
    issuers.refresh_all().await;
    let (pkcs1, spki) = key_a().public_key_ders();
    let jwk = key_a().jwk();
    let n = base64::Engine::decode(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        jwk["n"].as_str().unwrap(),
    )
    .unwrap();
    let pem = format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &spki)
    );
    let secrets: [&[u8]; 5] = [&pkcs1, &spki, &n, pem.as_bytes(), pem.trim_end().as_bytes()];
    for secret in secrets {
        let h = b64(json!({"alg":"HS256","kid":key_a().kid(),"typ":"JWT"}).to_string());
        let p = b64(Value::Object(claims(&s.base, NOW)).to_string());
        let input = format!("{h}.{p}");
        let mac = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), input.as_bytes());
        let t = format!("{input}.{}", b64(mac.as_ref()));
        assert_eq!(
            issuers.verify(&t).await.unwrap_err(),
            VerifyError::UnsupportedAlgorithm("HS256".into())
        );
    }
}

#[tokio::test]
async fn other_algorithms_and_misspelt_rs256_are_refused() {
    let (s, issuers, _clock, _) = setup("").await;
    issuers.refresh_all().await;
    for alg in [
        "PS256", "RS512", "RS384", "ES256", "EdDSA", "rs256", "RS256 ", "Rs256",
    ] {
        let t = tok(&s.base, |h, _| h["alg"] = json!(alg));
        assert_eq!(
            issuers.verify(&t).await.unwrap_err(),
            VerifyError::UnsupportedAlgorithm(alg.into()),
            "{alg}"
        );
    }
    let t = tok(&s.base, |h, _| {
        h.as_object_mut().unwrap().remove("alg");
    });
    assert!(matches!(
        issuers.verify(&t).await,
        Err(VerifyError::UnsupportedAlgorithm(_))
    ));
    let t = tok(&s.base, |h, _| h["alg"] = json!(["RS256"]));
    assert!(matches!(
        issuers.verify(&t).await,
        Err(VerifyError::Malformed(_))
    ));
}

#[tokio::test]
async fn jwk_jku_and_x5u_headers_are_refused_and_never_fetched() {
    let (s, issuers, _clock, _) = setup("").await;
    let attacker = format!("{}/attacker/keys", s.base);
    let cases = [
        ("jwk", key_b().jwk()),
        ("jku", json!(attacker)),
        ("x5u", json!(attacker)),
    ];
    for (member, value) in cases {
        let t = tok_by(key_b(), &s.base, |h, _| h[member] = value);
        assert_eq!(
            issuers.verify(&t).await.unwrap_err(),
            VerifyError::RefusedHeader(member.into())
        );
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.hits(), (0, 0, 0), "the jku/x5u URL was never hit");
}

#[tokio::test]
async fn a_token_without_kid_is_refused_without_trying_keys() {
    let (s, issuers, _clock, _) = setup("").await;
    let t = tok(&s.base, |h, _| {
        h.as_object_mut().unwrap().remove("kid");
    });
    assert_eq!(
        issuers.verify(&t).await.unwrap_err(),
        VerifyError::UnknownKey
    );
    assert_eq!(s.hits(), (0, 0, 0));
}

#[tokio::test]
async fn crit_in_any_form_is_refused() {
    let (s, issuers, _clock, _) = setup("").await;
    for crit in [
        json!(["exp"]),
        json!([]),
        json!(["b64"]),
        json!(["x-unknown"]),
        Value::Null,
    ] {
        let t = tok(&s.base, |h, _| {
            h["crit"] = crit.clone();
            h["b64"] = json!(false);
        });
        assert_eq!(
            issuers.verify(&t).await.unwrap_err(),
            VerifyError::RefusedHeader("crit".into()),
            "{crit}"
        );
    }
}

#[tokio::test]
async fn only_jwt_typ_is_accepted_so_access_tokens_cannot_be_replayed() {
    let (s, issuers, _clock, _) = setup("").await;
    issuers.refresh_all().await;
    for typ in ["at+jwt", "application/at+JWT", "AT+JWT", "JOSE"] {
        let t = tok(&s.base, |h, _| h["typ"] = json!(typ));
        assert!(
            matches!(issuers.verify(&t).await, Err(VerifyError::RefusedHeader(_))),
            "{typ}"
        );
    }
    for typ in [Some("JWT"), Some("jwt"), None] {
        let t = tok(&s.base, |h, _| match typ {
            Some(v) => h["typ"] = json!(v),
            None => {
                h.as_object_mut().unwrap().remove("typ");
            }
        });
        issuers.verify(&t).await.unwrap();
    }
}

#[tokio::test]
async fn anything_but_three_strict_base64url_segments_is_malformed() {
    let (s, issuers, _clock, _) = setup("").await;
    issuers.refresh_all().await;
    let t = tok(&s.base, |_, _| {});
    let p: Vec<&str> = t.split('.').collect();
    let json_serialization = json!({
        "payload": p[1],
        "signatures": [{"protected": p[0], "signature": p[2]}],
    })
    .to_string();
    let bad = [
        format!("{}.{}", p[0], p[1]),
        format!("{t}.{}", p[2]),
        format!("{t}."),
        format!(".{t}"),
        format!("{}..{}", p[0], p[2]),
        json_serialization,
        format!("{}=.{}.{}", p[0], p[1], p[2]),
        format!("{}.{}=.{}", p[0], p[1], p[2]),
        format!("{}.{}.{}==", p[0], p[1], p[2]),
        format!("{}.{} .{}", p[0], p[1], p[2]),
        format!("{}.{}.{}\n", p[0], p[1], p[2]),
        format!(" {t}"),
        t.replacen('-', "+", 1).replacen('_', "/", 1),
    ];
    for b in &bad {
        if b == &t {
            continue;
        }
        assert!(
            matches!(issuers.verify(b).await, Err(VerifyError::Malformed(_))),
            "{b:?}"
        );
    }
    issuers.verify(&t).await.unwrap();
}

#[tokio::test]
async fn duplicate_members_in_header_or_payload_are_refused() {
    let (s, issuers, _clock, _) = setup("").await;
    issuers.refresh_all().await;
    let kid = key_a().kid();
    let payload = Value::Object(claims(&s.base, NOW)).to_string();
    let t = forge_raw(
        key_a(),
        &format!(r#"{{"alg":"RS256","kid":"{kid}","alg":"none"}}"#),
        &payload,
    );
    assert!(
        matches!(issuers.verify(&t).await, Err(VerifyError::Malformed(m)) if m.contains("duplicate"))
    );
    let dup = format!(r#"{},"project_id":"666"}}"#, payload.trim_end_matches('}'));
    let t = forge_raw(key_a(), &header(key_a()).to_string(), &dup);
    assert!(
        matches!(issuers.verify(&t).await, Err(VerifyError::InvalidClaims(m)) if m.contains("duplicate"))
    );
}

#[tokio::test]
async fn an_oversized_token_is_refused_before_any_work() {
    let (s, issuers, _clock, _) = setup("max_token_bytes = 2048").await;
    let t = tok(&s.base, |_, c| {
        c.insert("pad".into(), json!("x".repeat(2000)));
    });
    assert!(t.len() > 2048);
    assert_eq!(issuers.verify(&t).await.unwrap_err(), VerifyError::TooLarge);
    let huge = "a".repeat(16 * 1024 * 1024);
    let started = Instant::now();
    assert_eq!(
        issuers.verify(&huge).await.unwrap_err(),
        VerifyError::TooLarge
    );
    assert!(started.elapsed() < Duration::from_millis(50));
    assert_eq!(s.hits(), (0, 0, 0));
}

#[tokio::test]
async fn exp_nbf_and_iat_are_checked_at_their_boundaries_with_leeway() {
    let (s, issuers, _clock, _) = setup("").await; // leeway 30s, max age 8h
    issuers.refresh_all().await;
    let check = |k: &'static str, v: Value| {
        tok(&s.base, move |_, c| {
            c.insert(k.into(), v);
        })
    };
    let cases = [
        ("exp", json!(NOW - 30), Err(VerifyError::Expired)),
        ("exp", json!(NOW - 29), Ok(())),
        ("nbf", json!(NOW + 30), Ok(())),
        ("nbf", json!(NOW + 31), Err(VerifyError::NotYetValid)),
        ("iat", json!(NOW + 30), Ok(())),
        ("iat", json!(NOW + 31), Err(VerifyError::NotYetValid)),
        ("iat", json!(NOW - 8 * 3600), Ok(())),
        ("iat", json!(NOW - 8 * 3600 - 1), Err(VerifyError::TooOld)),
        ("iat", json!(i64::MIN), Err(VerifyError::TooOld)),
        ("exp", json!(i64::MAX), Ok(())),
    ];
    for (k, v, want) in cases {
        let got = issuers.verify(&check(k, v.clone())).await.map(|_| ());
        assert_eq!(got, want, "{k}={v}");
    }
    for (k, v) in [
        ("exp", json!("9999999999")),
        ("exp", json!(1.7e9)),
        ("exp", Value::Null),
        ("nbf", json!(true)),
        ("iat", json!([1])),
    ] {
        assert!(
            matches!(
                issuers.verify(&check(k, v.clone())).await,
                Err(VerifyError::InvalidClaims(_))
            ),
            "{k}={v}"
        );
    }
    let t = tok(&s.base, |_, c| {
        c.remove("exp");
    });
    assert!(matches!(
        issuers.verify(&t).await,
        Err(VerifyError::InvalidClaims(_))
    ));
}

#[tokio::test]
async fn with_zero_leeway_exp_equal_to_now_is_expired() {
    let (s, issuers, _clock, _) = setup(r#"leeway = "0s""#).await;
    issuers.refresh_all().await;
    let at = |exp: i64| tok(&s.base, move |_, c| c["exp"] = json!(exp));
    assert_eq!(
        issuers.verify(&at(NOW)).await.unwrap_err(),
        VerifyError::Expired
    );
    issuers.verify(&at(NOW + 1)).await.unwrap();
    let nbf_now = tok(&s.base, |_, c| c["nbf"] = json!(NOW));
    issuers.verify(&nbf_now).await.unwrap();
}

#[tokio::test]
async fn aud_must_contain_a_configured_audience() {
    let s = stand_in().await;
    let config = issuer_config(&s.base, "")
        .audiences
        .iter()
        .chain(["https://second.test".to_owned()].iter())
        .cloned()
        .collect::<Vec<_>>();
    let mut c = issuer_config(&s.base, "");
    c.audiences = config;
    let (issuers, _clock, _) = issuers_with(c);
    issuers.refresh_all().await;
    let with = |aud: Value| {
        tok(&s.base, move |_, c| {
            c.insert("aud".into(), aud);
        })
    };
    for ok in [
        json!(AUD),
        json!([AUD]),
        json!([AUD, "https://vault.example.com"]),
        json!("https://second.test"),
    ] {
        issuers
            .verify(&with(ok.clone()))
            .await
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
    }
    for wrong in [
        json!("https://vault.example.com"),
        json!(["https://vault.example.com"]),
        json!("https://cistern.test/"),
    ] {
        assert_eq!(
            issuers.verify(&with(wrong)).await.unwrap_err(),
            VerifyError::WrongAudience
        );
    }
    for invalid in [
        json!(""),
        json!([]),
        json!({"a": 1}),
        json!([AUD, 1]),
        Value::Null,
    ] {
        assert!(
            matches!(
                issuers.verify(&with(invalid.clone())).await,
                Err(VerifyError::InvalidClaims(_))
            ),
            "{invalid}"
        );
    }
    let t = tok(&s.base, |_, c| {
        c.remove("aud");
    });
    assert!(matches!(
        issuers.verify(&t).await,
        Err(VerifyError::InvalidClaims(_))
    ));
}

#[tokio::test]
async fn a_weak_key_is_never_used_and_a_duplicate_kid_refuses_the_set() {
    let (s, issuers, _clock, _) = setup("").await;
    let weak_n = b64([0xc5u8; 128]); // 1024 bits
    s.set_jwks(Reply::json(
        json!({"keys":[key_a().jwk(), {"kty":"RSA","kid":"weak","e":"AQAB","n":weak_n}]})
            .to_string(),
    ));
    issuers.refresh_all().await;
    let t = tok(&s.base, |h, _| h["kid"] = json!("weak"));
    assert_eq!(
        issuers.verify(&t).await.unwrap_err(),
        VerifyError::UnknownKey
    );

    let (s, issuers, _clock, _) = setup("").await;
    let mut dup = key_b().jwk();
    dup["kid"] = json!(key_a().kid());
    s.set_jwks(Reply::json(
        json!({"keys":[key_a().jwk(), dup]}).to_string(),
    ));
    keys_unavailable(
        issuers.verify(&tok(&s.base, |_, _| {})).await,
        "duplicate kid",
    );
}

#[tokio::test]
async fn bad_discovery_documents_fail_closed() {
    let s = stand_in().await;
    let jwks = format!("{}/keys", s.base);
    let localhost_jwks = jwks.replace("127.0.0.1", "localhost");
    let cases = [
        (
            key_a().discovery_json(&format!("{}/", s.base), &jwks),
            "does not equal",
        ),
        (
            key_a().discovery_json("https://gitlab.example.com", &jwks),
            "does not equal",
        ),
        (
            key_a().discovery_json(&s.base, &localhost_jwks),
            "jwks_uri refused",
        ),
        (
            key_a().discovery_json(&s.base, "https://evil.example.com/keys"),
            "jwks_uri refused",
        ),
        (json!({"issuer": s.base}).to_string(), "invalid"),
        ("<html>".to_owned(), "invalid"),
    ];
    for (doc, needle) in cases {
        let (issuers, _clock, _) = issuers_with(issuer_config(&s.base, ""));
        s.set_discovery(Reply::json(doc));
        keys_unavailable(issuers.verify(&tok(&s.base, |_, _| {})).await, needle);
    }
    for (status, needle) in [(500, "status 500"), (404, "status 404")] {
        let (issuers, _clock, _) = issuers_with(issuer_config(&s.base, ""));
        s.set_discovery(Reply::status(status));
        keys_unavailable(issuers.verify(&tok(&s.base, |_, _| {})).await, needle);
    }
    assert_eq!(s.hits().1, 0, "no JWKS was fetched from a refused document");
}

#[tokio::test]
async fn bad_jwks_responses_fail_closed() {
    let s = stand_in().await;
    let big = json!({"keys":[key_a().jwk()], "pad": "x".repeat(4096)}).to_string();
    let cases = [
        (Reply::status(500), "status 500"),
        (Reply::status(404), "status 404"),
        (Reply::json(big), "larger than 2048"),
        (Reply::json("{not json".into()), "JWKS is invalid"),
        (
            Reply::json(json!({"kid":"x"}).to_string()),
            "missing field `keys`",
        ),
        (
            Reply {
                content_type: "text/html".into(),
                ..Reply::json(key_a().jwks_json())
            },
            "not JSON",
        ),
        (
            Reply::status(302).with_header("location", &format!("{}/elsewhere", s.base)),
            "refused redirect",
        ),
    ];
    for (reply, needle) in cases {
        let (issuers, _clock, _) =
            issuers_with(issuer_config(&s.base, "max_response_bytes = 2048"));
        s.set_jwks(reply);
        keys_unavailable(issuers.verify(&tok(&s.base, |_, _| {})).await, needle);
    }
    assert_eq!(s.hits().2, 0, "the redirect was not followed");
}

#[tokio::test]
async fn a_slow_issuer_times_out_within_the_fetch_timeout() {
    let (s, issuers, _clock, _) = setup(r#"fetch_timeout = "200ms""#).await;
    s.set_jwks(Reply {
        delay: Duration::from_secs(3),
        ..Reply::json(key_a().jwks_json())
    });
    let started = Instant::now();
    keys_unavailable(issuers.verify(&tok(&s.base, |_, _| {})).await, "timed out");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A raw HTTP server that streams an endless chunked JSON body without
/// Content-Length; returns its URL and how many bytes it managed to send.
async fn endless_chunked() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/keys", l.local_addr().unwrap());
    let sent = Arc::new(AtomicUsize::new(0));
    let counter = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = l.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let chunk = format!("400\r\n{}\r\n", " ".repeat(0x400));
                for _ in 0..16 * 1024 {
                    if sock.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                    counter.fetch_add(0x400, Ordering::SeqCst);
                }
            });
        }
    });
    (url, sent)
}

#[tokio::test]
async fn the_body_cap_is_enforced_while_streaming_without_content_length() {
    let (s, issuers, _clock, _) = setup("max_response_bytes = 4096").await;
    let (url, sent) = endless_chunked().await;
    s.set_discovery(Reply::json(key_a().discovery_json(&s.base, &url)));
    keys_unavailable(
        issuers.verify(&tok(&s.base, |_, _| {})).await,
        "larger than 4096",
    );
    // The server could write ahead into socket buffers, but nowhere near 16 MiB.
    assert!(sent.load(std::sync::atomic::Ordering::SeqCst) < 8 * 1024 * 1024);
}

#[tokio::test]
async fn a_flood_of_unknown_kids_refetches_at_most_once_per_cooldown() {
    let (s, issuers, clock, _) = setup(r#"unknown_kid_cooldown = "30s""#).await;
    issuers.refresh_all().await;
    assert_eq!(s.hits(), (1, 1, 0));
    let issuers = Arc::new(issuers);
    let flood = |n: usize| {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..n {
            let issuers = issuers.clone();
            let t = tok(&s.base, |h, _| {
                h["kid"] = json!(uuid::Uuid::new_v4().to_string())
            });
            tasks.spawn(async move { issuers.verify(&t).await });
        }
        tasks
    };
    for (round, advance, want_jwks) in [(0, 0, 2), (1, 10, 2), (2, 21, 3), (3, 0, 3)] {
        clock.advance_secs(advance);
        let mut tasks = flood(100);
        while let Some(r) = tasks.join_next().await {
            assert_eq!(
                r.unwrap().unwrap_err(),
                VerifyError::UnknownKey,
                "round {round}"
            );
        }
        assert_eq!(s.hits().1, want_jwks, "round {round}");
    }
    assert_eq!(s.hits().0, 1, "unknown-kid refetches reuse the jwks_uri");
    // A genuine token still verifies without any fetch.
    issuers.verify(&tok(&s.base, |_, _| {})).await.unwrap();
    assert_eq!(s.hits().1, 3);
}

#[tokio::test]
async fn a_rotated_key_is_picked_up_by_one_refetch() {
    let (s, issuers, clock, _) = setup("").await;
    issuers.refresh_all().await;
    s.serve_keys(&[key_b()]);
    let new = tok_by(key_b(), &s.base, |_, _| {});
    issuers.verify(&new).await.unwrap();
    assert_eq!(s.hits(), (1, 2, 0));
    // The old key is gone; within the cooldown no further fetch happens.
    clock.advance_secs(1);
    let old = tok(&s.base, |_, _| {});
    assert_eq!(
        issuers.verify(&old).await.unwrap_err(),
        VerifyError::UnknownKey
    );
    assert_eq!(s.hits(), (1, 2, 0));
}

#[tokio::test]
async fn the_key_set_is_refreshed_in_the_background_after_its_ttl() {
    let (s, issuers, clock, _) = setup(
        r#"jwks_min_ttl = "1m"
jwks_max_ttl = "10m""#,
    )
    .await;
    issuers.refresh_all().await;
    let t = tok(&s.base, |_, c| c["exp"] = json!(NOW + 7200));
    clock.advance_secs(599);
    issuers.verify(&t).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        s.hits(),
        (1, 1, 0),
        "max-age 86400 clamped to 10m: not due yet"
    );
    clock.advance_secs(2);
    issuers.verify(&t).await.unwrap();
    wait_for(|| s.hits() == (2, 2, 0)).await;
}

async fn wait_for(cond: impl Fn() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met in 2s");
}

#[tokio::test]
async fn the_last_good_set_serves_through_an_outage_until_max_stale() {
    let (s, issuers, clock, metrics) = setup(
        r#"jwks_min_ttl = "5m"
jwks_max_ttl = "10m"
max_stale = "1h""#,
    )
    .await;
    issuers.refresh_all().await;
    let t = tok(&s.base, |_, c| c["exp"] = json!(NOW + 4 * 3600));
    s.set_discovery(Reply::status(500));
    s.set_jwks(Reply::status(500));
    clock.advance_secs(11 * 60);
    issuers.verify(&t).await.unwrap();
    wait_for(|| s.hits().0 == 2).await; // the background refresh tried and failed
    clock.advance_secs(3600 - 11 * 60);
    issuers.verify(&t).await.unwrap(); // exactly max_stale: still served
    wait_for(|| s.hits().0 == 3).await; // and a background retry, not yet due at 11m+
    issuers.export_metrics();
    assert!(
        metrics
            .encode()
            .contains(r#"cistern_jwks_age_seconds{issuer="gl"} 3600"#)
    );
    clock.advance_secs(1);
    keys_unavailable(issuers.verify(&t).await, "status 500");
    // Recovery once the issuer is back and the cooldown has passed.
    s.set_discovery(Reply::json(
        key_a().discovery_json(&s.base, &format!("{}/keys", s.base)),
    ));
    s.serve_keys(&[key_a()]);
    assert!(matches!(
        issuers.verify(&t).await,
        Err(VerifyError::KeysUnavailable(_))
    ));
    clock.advance_secs(31);
    issuers.verify(&t).await.unwrap();
}

#[tokio::test]
async fn a_token_from_an_unconfigured_issuer_never_causes_a_fetch() {
    let (s, issuers, _clock, _) = setup("").await;
    let attacker = format!("{}/controllablepath#", s.base);
    for iss in [
        json!("https://evil.example.com"),
        json!(format!("{}/", s.base)),
        json!(attacker),
        json!([s.base]),
        json!(null),
        json!(s.base.to_uppercase()),
    ] {
        let t = tok(&s.base, |_, c| c["iss"] = iss.clone());
        assert_eq!(
            issuers.verify(&t).await.unwrap_err(),
            VerifyError::UntrustedIssuer,
            "{iss}"
        );
    }
    let t = tok(&s.base, |_, c| {
        c.remove("iss");
    });
    assert_eq!(
        issuers.verify(&t).await.unwrap_err(),
        VerifyError::UntrustedIssuer
    );
    assert_eq!(s.hits(), (0, 0, 0));
}

fn fixture_issuers(now: i64) -> Issuers {
    let config: crate::config::IssuerConfig = toml::from_str(
        r#"issuer = "https://gitlab.example.com"
audiences = ["https://broker.example.com"]"#,
    )
    .unwrap();
    let mut m = BTreeMap::new();
    m.insert("gitlab".to_owned(), config);
    let clock: Arc<dyn crate::clock::Clock> = Arc::new(ManualClock::at_secs(now));
    let issuers = Issuers::new(&m, clock, Arc::new(Metrics::new())).unwrap();
    let set = KeySet::parse(include_bytes!("../../tests/fixtures/jwks.json"), now * 1000).unwrap();
    issuers.install_keys("gitlab", set);
    issuers
}

const FIXTURE: &str = include_str!("../../tests/fixtures/id_token.jwt");
const FIXTURE_IAT: i64 = 1_767_225_600;

#[tokio::test]
async fn the_shared_gitlab_fixture_verifies_through_the_real_path() {
    let issuers = fixture_issuers(FIXTURE_IAT + 60);
    let v = issuers.verify(FIXTURE.trim()).await.unwrap();
    assert_eq!(&*v.issuer, "gitlab");
    assert_eq!(v.kid, "ovzbeo5FDsOn9HQtS2xJSfwkG_psJ8UOAaJ7t2TrsCs");
    assert_eq!(v.claims.project_id.0, 20);
    assert_eq!(v.claims.jti, "235b3a54-b797-45c7-ae9a-f72d7bc6ef5b");
    let later = fixture_issuers(FIXTURE_IAT + 3600 + 30);
    assert_eq!(
        later.verify(FIXTURE.trim()).await.unwrap_err(),
        VerifyError::Expired
    );
}

#[test]
fn claims_without_verification_reads_forged_and_expired_tokens_alike() {
    let c = claims_without_verification(FIXTURE.trim()).unwrap();
    assert_eq!(c.project_path, "my-group/my-project");
    let forged = forge(
        key_b(),
        &header(key_b()),
        &Value::Object(claims("https://x", 1)),
    );
    assert_eq!(
        claims_without_verification(&forged).unwrap().iss,
        "https://x"
    );
    let none = format!(
        "{}.{}.sig",
        b64(json!({"alg":"none"}).to_string()),
        FIXTURE.split('.').nth(1).unwrap()
    );
    assert!(matches!(
        claims_without_verification(&none),
        Err(VerifyError::UnsupportedAlgorithm(_))
    ));
    assert!(matches!(
        claims_without_verification("a.b"),
        Err(VerifyError::Malformed(_))
    ));
}

#[test]
fn two_names_for_one_issuer_url_are_refused_at_setup() {
    let c = issuer_config("https://gitlab.example.com", "");
    let mut m = BTreeMap::new();
    m.insert("a".to_owned(), c.clone());
    m.insert("b".to_owned(), c);
    let clock: Arc<dyn crate::clock::Clock> = Arc::new(ManualClock::at_secs(0));
    let e = Issuers::new(&m, clock, Arc::new(Metrics::new())).unwrap_err();
    assert!(matches!(e, IssuerSetupError::DuplicateIssuer(..)), "{e}");
}

#[tokio::test]
async fn an_unreachable_issuer_fails_closed_with_the_cause() {
    // A port nothing listens on: bind, note the port, drop the listener.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let (issuers, _clock, metrics) = issuers_with(issuer_config(&base, ""));
    issuers.refresh_all().await; // logs, never fails
    keys_unavailable(issuers.verify(&tok(&base, |_, _| {})).await, &base);
    let m = metrics.encode();
    assert!(
        m.contains(
            r#"cistern_jwks_fetches_total{issuer="gl",document="discovery",outcome="error"} 2"#
        ),
        "{m}"
    );
}
