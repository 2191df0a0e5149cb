//! Verifying cistern's own access tokens (introspection, the proxy, tests).
//!
//! Strict by construction: exactly three segments of unpadded base64url; a
//! header of exactly `alg`, `kid`, `typ` (duplicates, `crit` and any other
//! member refused); `typ` `at+jwt` (case-insensitive, `application/` prefix
//! allowed, RFC 9068 §4); the key chosen by `kid` among the published keys and
//! `alg` equal to that key's algorithm; the signature checked by aws-lc-rs in
//! fixed-width form (ECDSA `r‖s`, which refuses `r`/`s` of 0 or ≥ n and DER;
//! Ed25519 refuses `S` ≥ L); then `iss`, `aud` and `exp`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use super::keys::KeyRing;

/// Tokens larger than this are refused before any decoding; ours are about 1 KiB.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Tolerated clock skew on `nbf` between replicas.
const NBF_LEEWAY_SECS: i64 = 30;

/// The claims of a cistern access token (see [`super::token`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessTokenClaims {
    /// cistern's issuer URL.
    pub iss: String,
    /// `"<issuer name>:project:<project id>"`.
    pub sub: String,
    /// The audience the grant named.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Issued at.
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Token id (UUID v7).
    pub jti: String,
    /// Same as `sub`.
    pub client_id: String,
    /// Granted scopes, space-separated.
    pub scope: String,
    /// The role granted.
    pub role: String,
    /// The role's owner.
    pub owner: String,
    /// Where the token came from.
    pub pipeline: PipelineClaims,
}

/// The `pipeline` claim: the GitLab job the token was minted for. Ids are strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineClaims {
    /// Configured issuer name.
    pub issuer: String,
    /// The ID token's `iss`.
    pub issuer_url: String,
    /// `project_id`.
    pub project_id: String,
    /// `project_path`.
    pub project_path: String,
    /// `namespace_id`.
    pub namespace_id: String,
    /// `namespace_path`.
    pub namespace_path: String,
    /// The project the job runs in.
    pub job_project_id: String,
    /// The namespace the job runs in (absent from tokens minted before it
    /// was added: then `namespace_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_namespace_id: Option<String>,
    /// `ref`.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// `branch` or `tag`.
    pub ref_type: String,
    /// Whether the ref is protected.
    pub ref_protected: bool,
    /// The job's environment, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// `pipeline_id`.
    pub pipeline_id: String,
    /// `job_id`.
    pub job_id: String,
    /// Commit SHA.
    pub sha: String,
    /// The exchanged ID token's `jti`.
    pub id_token_jti: String,
}

impl PipelineClaims {
    /// The namespace the job runs in.
    pub fn job_namespace(&self) -> &str {
        self.job_namespace_id
            .as_deref()
            .unwrap_or(&self.namespace_id)
    }
}

/// Why one of cistern's own tokens was refused. Never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnTokenError {
    /// Not three segments of strict base64url, too large, or a header or
    /// payload that is not the expected JSON.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header carries `crit` or a member other than `alg`, `kid`, `typ`.
    #[error("refused header member")]
    RefusedHeader,
    /// `typ` is not `at+jwt`.
    #[error("not an access token (typ)")]
    WrongType,
    /// `alg` is not the algorithm of the key named by `kid`.
    #[error("algorithm does not match the key")]
    WrongAlgorithm,
    /// No published key has this `kid`.
    #[error("unknown key id")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// A claim is missing or has the wrong type.
    #[error("invalid claims: {0}")]
    InvalidClaims(String),
    /// `iss` is not cistern's issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` is not the expected audience.
    #[error("wrong audience")]
    WrongAudience,
    /// `exp` is not after now.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
}

impl OwnTokenError {
    /// A stable short code for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            OwnTokenError::Malformed(_) => "malformed",
            OwnTokenError::RefusedHeader => "refused_header",
            OwnTokenError::WrongType => "wrong_type",
            OwnTokenError::WrongAlgorithm => "wrong_algorithm",
            OwnTokenError::UnknownKey => "unknown_key",
            OwnTokenError::BadSignature => "bad_signature",
            OwnTokenError::InvalidClaims(_) => "invalid_claims",
            OwnTokenError::WrongIssuer => "wrong_issuer",
            OwnTokenError::WrongAudience => "wrong_audience",
            OwnTokenError::Expired => "expired",
            OwnTokenError::NotYetValid => "not_yet_valid",
        }
    }
}

/// The only header members cistern writes; anything else is refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: String,
    kid: String,
    typ: String,
}

fn is_at_jwt(typ: &str) -> bool {
    // Bytes, not str slicing: the header is attacker-controlled UTF-8.
    let t = typ.as_bytes();
    let t = match t.split_at_checked(12) {
        Some((prefix, rest)) if prefix.eq_ignore_ascii_case(b"application/") => rest,
        _ => t,
    };
    t.eq_ignore_ascii_case(b"at+jwt")
}

fn b64(segment: &str, what: &'static str) -> Result<Vec<u8>, OwnTokenError> {
    // URL_SAFE_NO_PAD refuses padding, whitespace and non-zero trailing bits.
    URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| OwnTokenError::Malformed(what))
}

/// Verifies one of cistern's own access tokens and returns its claims.
/// `issuer` is cistern's issuer URL; `audience`, when given, must equal `aud`.
pub fn verify_access_token(
    ring: &KeyRing,
    token: &str,
    issuer: &str,
    audience: Option<&str>,
    now_secs: i64,
) -> Result<AccessTokenClaims, OwnTokenError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(OwnTokenError::Malformed("too large"));
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(OwnTokenError::Malformed("not three segments"));
    };
    let header_json = b64(h64, "header encoding")?;
    let header: Header = serde_json::from_slice(&header_json).map_err(|e| {
        if e.is_data() {
            // Unknown members (`crit`, `jku`, …) and duplicates land here.
            OwnTokenError::RefusedHeader
        } else {
            OwnTokenError::Malformed("header json")
        }
    })?;
    if !is_at_jwt(&header.typ) {
        return Err(OwnTokenError::WrongType);
    }
    let sig = b64(s64, "signature encoding")?;
    let signed = token
        .as_bytes()
        .get(..h64.len() + 1 + p64.len())
        .ok_or(OwnTokenError::Malformed("not three segments"))?;
    ring.with_public_key(&header.kid, |key| {
        if header.alg != key.algorithm.as_str() {
            return Err(OwnTokenError::WrongAlgorithm);
        }
        key.verifier
            .verify_sig(signed, &sig)
            .map_err(|_| OwnTokenError::BadSignature)
    })
    .ok_or(OwnTokenError::UnknownKey)??;

    let payload = b64(p64, "payload encoding")?;
    let claims: AccessTokenClaims = serde_json::from_slice(&payload)
        .map_err(|e| OwnTokenError::InvalidClaims(e.to_string()))?;
    if claims.iss != issuer {
        return Err(OwnTokenError::WrongIssuer);
    }
    if audience.is_some_and(|a| a != claims.aud) {
        return Err(OwnTokenError::WrongAudience);
    }
    if claims.exp <= now_secs {
        return Err(OwnTokenError::Expired);
    }
    if claims.nbf > now_secs.saturating_add(NBF_LEEWAY_SECS) {
        return Err(OwnTokenError::NotYetValid);
    }
    Ok(claims)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;
    use crate::config::SigningAlgorithm;
    use crate::mint::{fixtures, mint};

    const NOW: i64 = 1_767_225_700;
    const ISS: &str = "https://cistern.example.com";
    const AUD: &str = "https://deploy.example.com";

    /// P-256 group order n, big-endian.
    const P256_N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    /// Ed25519 group order L, little-endian (as S is encoded).
    const ED25519_L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x10,
    ];

    struct Fixture {
        _tmp: tempfile::TempDir,
        ring: KeyRing,
        token: String,
    }

    fn fixture(alg: SigningAlgorithm) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let ring = fixtures::key_ring(
            &tmp.path().join("keys"),
            alg,
            Arc::new(ManualClock::at_secs(NOW)),
        )
        .unwrap();
        let grant = fixtures::grant(AUD, Duration::from_secs(900));
        let id = fixtures::verified_id_token().unwrap();
        let token = mint(&ring, ISS, &grant, &id, NOW * 1000)
            .unwrap()
            .access_token;
        Fixture {
            _tmp: tmp,
            ring,
            token,
        }
    }

    impl Fixture {
        fn check(&self, token: &str) -> Result<AccessTokenClaims, OwnTokenError> {
            verify_access_token(&self.ring, token, ISS, Some(AUD), NOW)
        }
        fn parts(&self) -> (&str, &str, Vec<u8>) {
            let mut it = self.token.split('.');
            let (h, p, s) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
            (h, p, URL_SAFE_NO_PAD.decode(s).unwrap())
        }
        fn with_sig(&self, sig: &[u8]) -> String {
            let (h, p, _) = self.parts();
            format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(sig))
        }
        fn with_header(&self, header: &str) -> String {
            let (_, p, s) = self.parts();
            format!(
                "{}.{p}.{}",
                URL_SAFE_NO_PAD.encode(header),
                URL_SAFE_NO_PAD.encode(s)
            )
        }
        fn kid(&self) -> String {
            self.ring.current_kid()
        }
        /// A token with `payload` signed by the ring with a correct header.
        fn signed(&self, payload: &serde_json::Value) -> String {
            self.ring
                .sign_compact("at+jwt", &serde_json::to_vec(payload).unwrap())
                .unwrap()
        }
        fn payload(&self) -> serde_json::Value {
            let (_, p, _) = self.parts();
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
        }
    }

    /// DER `INTEGER` of a big-endian unsigned value.
    fn der_int(v: &[u8]) -> Vec<u8> {
        let mut v: Vec<u8> = v.iter().copied().skip_while(|b| *b == 0).collect();
        if v.first().is_none_or(|b| b & 0x80 != 0) {
            v.insert(0, 0);
        }
        let mut out = vec![0x02, u8::try_from(v.len()).unwrap()];
        out.extend(v);
        out
    }

    #[test]
    fn both_algorithms_round_trip() {
        for alg in [SigningAlgorithm::ES256, SigningAlgorithm::EdDSA] {
            let f = fixture(alg);
            assert_eq!(f.check(&f.token).unwrap().aud, AUD);
            assert!(verify_access_token(&f.ring, &f.token, ISS, None, NOW).is_ok());
        }
    }

    #[test]
    fn typ_is_compared_case_insensitively_and_the_media_type_form_is_accepted() {
        let f = fixture(SigningAlgorithm::ES256);
        let p = serde_json::to_vec(&f.payload()).unwrap();
        for typ in ["AT+JWT", "application/at+jwt", "Application/At+Jwt"] {
            let t = f.ring.sign_compact(typ, &p).unwrap();
            assert!(f.check(&t).is_ok(), "{typ}");
        }
        for typ in [
            "JWT",
            "jwt",
            "",
            "at+jwt ",
            "application/jwt",
            "applicationXat+jwt",
            "é+jwtxxxxxxxxxxx",
        ] {
            let t = f.ring.sign_compact(typ, &p).unwrap();
            assert_eq!(f.check(&t).unwrap_err(), OwnTokenError::WrongType, "{typ}");
        }
    }

    #[test]
    fn a_header_missing_typ_or_carrying_crit_duplicates_or_extra_members_is_refused() {
        let f = fixture(SigningAlgorithm::ES256);
        let kid = f.kid();
        let cases = [
            format!(r#"{{"alg":"ES256","kid":"{kid}"}}"#),
            format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"at+jwt","crit":["exp"]}}"#),
            format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"at+jwt","crit":[]}}"#),
            format!(r#"{{"alg":"ES256","alg":"ES256","kid":"{kid}","typ":"at+jwt"}}"#),
            format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"at+jwt","jku":"http://127.0.0.1/"}}"#),
            format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"at+jwt","b64":false}}"#),
        ];
        for h in cases {
            assert_eq!(
                f.check(&f.with_header(&h)).unwrap_err(),
                OwnTokenError::RefusedHeader,
                "{h}"
            );
        }
        assert!(matches!(
            f.check(&f.with_header("[1]")),
            Err(OwnTokenError::RefusedHeader)
        ));
        assert!(matches!(
            f.check(&f.with_header("{")),
            Err(OwnTokenError::Malformed(_))
        ));
    }

    #[test]
    fn an_alg_other_than_the_keys_is_refused() {
        let f = fixture(SigningAlgorithm::ES256);
        let kid = f.kid();
        for alg in [
            "EdDSA", "es256", "ES256 ", "none", "HS256", "RS256", "Ed25519",
        ] {
            let h = format!(r#"{{"alg":"{alg}","kid":"{kid}","typ":"at+jwt"}}"#);
            assert_eq!(
                f.check(&f.with_header(&h)).unwrap_err(),
                OwnTokenError::WrongAlgorithm,
                "{alg}"
            );
        }
        let f = fixture(SigningAlgorithm::EdDSA);
        let h = format!(r#"{{"alg":"ES256","kid":"{}","typ":"at+jwt"}}"#, f.kid());
        assert_eq!(
            f.check(&f.with_header(&h)).unwrap_err(),
            OwnTokenError::WrongAlgorithm
        );
    }

    #[test]
    fn an_unknown_kid_is_refused() {
        let f = fixture(SigningAlgorithm::ES256);
        for kid in ["", "nope", "../../dev/null"] {
            let h = format!(r#"{{"alg":"ES256","kid":"{kid}","typ":"at+jwt"}}"#);
            assert_eq!(
                f.check(&f.with_header(&h)).unwrap_err(),
                OwnTokenError::UnknownKey
            );
        }
        // A token from another ring (same algorithm, different key).
        let other = fixture(SigningAlgorithm::ES256);
        assert_eq!(
            f.check(&other.token).unwrap_err(),
            OwnTokenError::UnknownKey
        );
    }

    #[test]
    fn a_changed_payload_fails_the_signature() {
        let f = fixture(SigningAlgorithm::EdDSA);
        let (h, _, s) = f.parts();
        let mut p = f.payload();
        p["scope"] = "admin".into();
        let t = format!(
            "{h}.{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&p).unwrap()),
            URL_SAFE_NO_PAD.encode(s)
        );
        assert_eq!(f.check(&t).unwrap_err(), OwnTokenError::BadSignature);
    }

    #[test]
    fn issuer_audience_and_expiry_are_enforced() {
        let f = fixture(SigningAlgorithm::ES256);
        assert_eq!(
            verify_access_token(&f.ring, &f.token, "https://other.example.com", None, NOW)
                .unwrap_err(),
            OwnTokenError::WrongIssuer
        );
        assert_eq!(
            verify_access_token(
                &f.ring,
                &f.token,
                ISS,
                Some("https://vault.example.com"),
                NOW
            )
            .unwrap_err(),
            OwnTokenError::WrongAudience
        );
        assert!(verify_access_token(&f.ring, &f.token, ISS, Some(AUD), NOW + 899).is_ok());
        assert_eq!(
            verify_access_token(&f.ring, &f.token, ISS, Some(AUD), NOW + 900).unwrap_err(),
            OwnTokenError::Expired
        );
        let mut p = f.payload();
        p["nbf"] = (NOW + 31).into();
        assert_eq!(
            f.check(&f.signed(&p)).unwrap_err(),
            OwnTokenError::NotYetValid
        );
    }

    #[test]
    fn claims_of_the_wrong_type_or_missing_are_refused() {
        let f = fixture(SigningAlgorithm::ES256);
        let mut p = f.payload();
        p["exp"] = "9999999999".into();
        assert!(matches!(
            f.check(&f.signed(&p)),
            Err(OwnTokenError::InvalidClaims(_))
        ));
        let mut p = f.payload();
        p["aud"] = serde_json::json!([AUD]);
        assert!(matches!(
            f.check(&f.signed(&p)),
            Err(OwnTokenError::InvalidClaims(_))
        ));
        let mut p = f.payload();
        p.as_object_mut().unwrap().remove("client_id");
        assert!(matches!(
            f.check(&f.signed(&p)),
            Err(OwnTokenError::InvalidClaims(_))
        ));
        let text = String::from_utf8(serde_json::to_vec(&f.payload()).unwrap())
            .unwrap()
            .replacen("\"sub\":", "\"sub\":\"x\",\"sub\":", 1);
        let t = f.ring.sign_compact("at+jwt", text.as_bytes()).unwrap();
        assert!(matches!(f.check(&t), Err(OwnTokenError::InvalidClaims(_))));
    }

    #[test]
    fn malformed_compact_serializations_are_refused() {
        let f = fixture(SigningAlgorithm::ES256);
        let (h, p, s) = f.parts();
        let s = URL_SAFE_NO_PAD.encode(s);
        let cases = [
            format!("{h}.{p}"),
            format!("{h}.{p}.{s}."),
            format!("{h}.{p}.{s}.{s}"),
            format!("{h}=.{p}.{s}"),
            format!("{h}.{p}.{s}="),
            format!("{h}.{p} .{s}"),
            format!("{h}.{p}.+{}", &s[1..]),
            String::new(),
            "a".repeat(MAX_TOKEN_BYTES + 1),
        ];
        for t in cases {
            assert!(
                matches!(
                    f.check(&t),
                    Err(OwnTokenError::Malformed(_)) | Err(OwnTokenError::BadSignature)
                ),
                "{t}"
            );
            assert!(f.check(&t).is_err());
        }
        // Non-canonical trailing bits in the signature (86 chars carry 2 spare bits).
        let mut bad = s.clone().into_bytes();
        let last = bad.len() - 1;
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let idx = alphabet.iter().position(|c| *c == bad[last]).unwrap();
        bad[last] = alphabet[idx ^ 1];
        let t = format!("{h}.{p}.{}", String::from_utf8(bad).unwrap());
        assert!(matches!(f.check(&t), Err(OwnTokenError::Malformed(_))));
    }

    #[test]
    fn es256_special_case_signatures_are_refused() {
        let f = fixture(SigningAlgorithm::ES256);
        let (_, _, sig) = f.parts();
        let (r, s) = sig.split_at(32);
        let cat = |a: &[u8], b: &[u8]| [a, b].concat();
        let zero = [0u8; 32];
        let mut one = [0u8; 32];
        one[31] = 1;
        let mut n_minus_1 = P256_N;
        n_minus_1[31] -= 1;
        let mut der = vec![0x30];
        let body = [der_int(r), der_int(s)].concat();
        der.push(u8::try_from(body.len()).unwrap());
        der.extend(body);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("all zero", vec![0; 64]),
            ("r=0", cat(&zero, s)),
            ("s=0", cat(r, &zero)),
            ("r=n", cat(&P256_N, s)),
            ("s=n", cat(r, &P256_N)),
            ("r=n,s=n", cat(&P256_N, &P256_N)),
            ("r=1,s=1", cat(&one, &one)),
            ("r=n-1,s=n-1", cat(&n_minus_1, &n_minus_1)),
            ("r=0xff..", cat(&[0xff; 32], s)),
            ("DER", der),
            ("63 bytes", sig[..63].to_vec()),
            ("65 bytes", cat(&sig, &[0])),
            ("leading zero", cat(&[0], &sig)),
            ("empty", Vec::new()),
        ];
        assert!(
            f.check(&f.with_sig(&sig)).is_ok(),
            "the unmodified signature verifies"
        );
        for (name, bad) in cases {
            assert_eq!(
                f.check(&f.with_sig(&bad)).unwrap_err(),
                OwnTokenError::BadSignature,
                "{name}"
            );
        }
    }

    #[test]
    fn ed25519_special_case_signatures_are_refused() {
        let f = fixture(SigningAlgorithm::EdDSA);
        let (_, _, sig) = f.parts();
        // S + L: the same point equation, non-canonical scalar (malleability).
        let mut s_plus_l = sig.clone();
        let mut carry = 0u16;
        for i in 0..32 {
            let v = u16::from(s_plus_l[32 + i]) + u16::from(ED25519_L[i]) + carry;
            s_plus_l[32 + i] = (v & 0xff) as u8;
            carry = v >> 8;
        }
        assert_eq!(carry, 0);
        let mut flipped_r = sig.clone();
        flipped_r[0] ^= 1;
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("all zero", vec![0; 64]),
            ("S+L", s_plus_l),
            ("S=L", [&sig[..32], &ED25519_L[..]].concat()),
            ("R changed", flipped_r),
            ("63 bytes", sig[..63].to_vec()),
            ("65 bytes", [&sig[..], &[0]].concat()),
            ("empty", Vec::new()),
        ];
        assert!(
            f.check(&f.with_sig(&sig)).is_ok(),
            "the unmodified signature verifies"
        );
        for (name, bad) in cases {
            assert_eq!(
                f.check(&f.with_sig(&bad)).unwrap_err(),
                OwnTokenError::BadSignature,
                "{name}"
            );
        }
    }
}
