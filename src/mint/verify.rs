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
    let signed = &token.as_bytes()[..h64.len() + 1 + p64.len()];
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
