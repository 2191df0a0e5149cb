//! Stage 1 — verify: a GitLab CI ID token in, a [`VerifiedIdToken`] out.
//!
//! Trusted issuers come from the config only. The token's unverified `iss`
//! is read for one purpose: to pick, by exact string equality, which
//! configured issuer verifies it. Keys come from that issuer's discovery
//! document and JWKS (`jwks.rs`), never from the token header (`jwk`, `jku`
//! `x5u` and `x5c` are refused). The JWS is checked by hand over aws-lc-rs
//! (`jws.rs`) so that keys stay parsed, the algorithm is pinned per key and
//! the payload is parsed exactly once, into [`claims::GitLabClaims`].

pub mod claims;
mod discovery;
mod fetch;
mod issuer;
mod jwks;
mod jws;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod testutil;

use std::sync::Arc;

pub use claims::GitLabClaims;
pub use issuer::{IssuerSetupError, Issuers, claims_without_verification};

/// Proof that an ID token passed every check of its issuer. Only this module
/// can build one.
// `_proof` is deliberately private: a proof type, not a non-exhaustive struct.
#[allow(clippy::manual_non_exhaustive)]
#[derive(Debug, Clone)]
pub struct VerifiedIdToken {
    /// The configured issuer name (`[issuers.NAME]`).
    pub issuer: Arc<str>,
    /// The typed claims, parsed once.
    pub claims: GitLabClaims,
    /// The key that verified the signature.
    pub kid: String,
    /// SHA-256 of the compact token: the only form of the token ever logged or stored.
    pub token_sha256: [u8; 32],
    pub(crate) _proof: (),
}

/// Why an ID token was refused. `Display` is for logs (never contains the
/// token); [`VerifyError::public_description`] is what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Larger than the issuer's `max_token_bytes`.
    #[error("token too large")]
    TooLarge,
    /// Not a compact JWS of three base64url segments, or a header/payload that is not valid JSON.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `iss` missing, not a string, or not a configured issuer.
    #[error("untrusted issuer")]
    UntrustedIssuer,
    /// `alg` is not the one pinned for the key (RS256 for GitLab), or is `none`/HMAC.
    #[error("unsupported algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    /// The header carries `crit`, or another header member cistern refuses.
    #[error("refused header: {0}")]
    RefusedHeader(String),
    /// No key with that `kid` in the issuer's key set (after at most one refetch per cooldown).
    #[error("unknown key id")]
    UnknownKey,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// The issuer's keys cannot be had (unreachable beyond `max_stale`, or invalid).
    #[error("issuer keys unavailable: {0}")]
    KeysUnavailable(String),
    /// `aud` contains none of the configured audiences.
    #[error("audience not accepted")]
    WrongAudience,
    /// `exp` is past (with leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` or `iat` is in the future (beyond leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `iat` is older than `max_token_age`.
    #[error("token too old")]
    TooOld,
    /// A claim is missing or has the wrong type.
    #[error("invalid claims: {0}")]
    InvalidClaims(String),
}

impl VerifyError {
    /// A short, fixed description that helps the job's author and leaks nothing.
    pub fn public_description(&self) -> &'static str {
        match self {
            VerifyError::TooLarge => "subject_token is too large",
            VerifyError::Malformed(_) => "subject_token is not a well-formed JWT",
            VerifyError::UntrustedIssuer => "subject_token was not issued by a trusted issuer",
            VerifyError::UnsupportedAlgorithm(_) => {
                "subject_token uses an unsupported signing algorithm"
            }
            VerifyError::RefusedHeader(_) => "subject_token header carries unsupported members",
            VerifyError::UnknownKey => "subject_token is signed with an unknown key",
            VerifyError::BadSignature => "subject_token signature is invalid",
            VerifyError::KeysUnavailable(_) => {
                "the issuer's signing keys are unavailable; retry later"
            }
            VerifyError::WrongAudience => "subject_token audience is not accepted",
            VerifyError::Expired => "subject_token has expired",
            VerifyError::NotYetValid => "subject_token is not valid yet",
            VerifyError::TooOld => "subject_token is too old",
            VerifyError::InvalidClaims(_) => {
                "subject_token claims are missing or of the wrong type"
            }
        }
    }

    /// A stable short code for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::TooLarge => "too_large",
            VerifyError::Malformed(_) => "malformed",
            VerifyError::UntrustedIssuer => "untrusted_issuer",
            VerifyError::UnsupportedAlgorithm(_) => "unsupported_algorithm",
            VerifyError::RefusedHeader(_) => "refused_header",
            VerifyError::UnknownKey => "unknown_key",
            VerifyError::BadSignature => "bad_signature",
            VerifyError::KeysUnavailable(_) => "keys_unavailable",
            VerifyError::WrongAudience => "wrong_audience",
            VerifyError::Expired => "expired",
            VerifyError::NotYetValid => "not_yet_valid",
            VerifyError::TooOld => "too_old",
            VerifyError::InvalidClaims(_) => "invalid_claims",
        }
    }
}
