//! The configured issuers, and the verification of one ID token.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use aws_lc_rs::digest;

use super::discovery::{self, JwksUriRules};
use super::fetch::Limits;
use super::jwks::{KeyCache, KeyCacheParts, Timing, millis};
use super::jws::{self, Header, Signature};
use super::{GitLabClaims, VerifiedIdToken, VerifyError};
use crate::clock::Clock;
use crate::config::{IssuerConfig, IssuerKind, check_issuer_url};
use crate::metrics::Metrics;

/// Why the issuer set could not be built from the config.
#[derive(Debug, thiserror::Error)]
pub enum IssuerSetupError {
    /// An issuer URL is not acceptable.
    #[error("issuer {name}: {reason}")]
    InvalidIssuer {
        /// The configured issuer name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Two configured names share one issuer URL, so `iss` could not pick one.
    #[error("issuers {0} and {1} have the same issuer URL")]
    DuplicateIssuer(String, String),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    HttpClient(String),
}

/// One configured issuer.
struct Issuer {
    name: Arc<str>,
    /// The issuer URL exactly as configured; `iss` must equal it.
    issuer: Box<str>,
    audiences: Box<[String]>,
    leeway_secs: i64,
    max_age_secs: i64,
    max_token_bytes: usize,
    keys: Arc<KeyCache>,
}

/// The trusted issuers: the only source of verification keys.
pub struct Issuers {
    issuers: Vec<Issuer>,
    /// The largest `max_token_bytes`: the bound before an issuer is known.
    max_token_bytes: usize,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Issuers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.issuers.iter().map(|i| (&*i.name, &*i.issuer)))
            .finish()
    }
}

fn secs(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl Issuers {
    /// Builds the issuer set; no network until [`Issuers::refresh_all`] or
    /// the first token.
    pub fn new(
        configs: &BTreeMap<String, IssuerConfig>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, IssuerSetupError> {
        let timeout = configs
            .values()
            .map(|c| c.fetch_timeout)
            .max()
            .unwrap_or(std::time::Duration::from_secs(5));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("cistern/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| IssuerSetupError::HttpClient(e.to_string()))?;
        let mut issuers: Vec<Issuer> = Vec::with_capacity(configs.len());
        for (name, c) in configs {
            let invalid = |reason: String| IssuerSetupError::InvalidIssuer {
                name: name.clone(),
                reason,
            };
            match c.kind {
                IssuerKind::Gitlab => {}
            }
            let url = check_issuer_url(&c.issuer, c.allow_insecure_http).map_err(invalid)?;
            let host = url
                .host_str()
                .ok_or_else(|| invalid("has no host".into()))?
                .to_ascii_lowercase();
            let discovery_url =
                discovery::discovery_url(&c.issuer).map_err(|e| invalid(e.to_string()))?;
            if let Some(other) = issuers.iter().find(|i| *i.issuer == *c.issuer) {
                return Err(IssuerSetupError::DuplicateIssuer(
                    other.name.to_string(),
                    name.clone(),
                ));
            }
            let name: Arc<str> = name.as_str().into();
            let keys = KeyCache::new(KeyCacheParts {
                name: name.clone(),
                discovery_url,
                rules: JwksUriRules {
                    issuer: c.issuer.clone(),
                    issuer_host: host,
                    allowed_hosts: c
                        .allowed_jwks_hosts
                        .iter()
                        .map(|h| h.to_ascii_lowercase())
                        .collect(),
                    allow_insecure_http: c.allow_insecure_http,
                },
                limits: Limits {
                    timeout: c.fetch_timeout,
                    max_bytes: c.max_response_bytes,
                },
                timing: Timing {
                    min_ttl_ms: millis(c.jwks_min_ttl),
                    max_ttl_ms: millis(c.jwks_max_ttl),
                    cooldown_ms: millis(c.unknown_kid_cooldown),
                    max_stale_ms: millis(c.max_stale),
                },
                client: client.clone(),
                clock: clock.clone(),
                metrics: metrics.clone(),
            });
            issuers.push(Issuer {
                name,
                issuer: c.issuer.as_str().into(),
                audiences: c.audiences.clone().into_boxed_slice(),
                leeway_secs: secs(c.leeway),
                max_age_secs: secs(c.max_token_age),
                max_token_bytes: c.max_token_bytes,
                keys: Arc::new(keys),
            });
        }
        let max_token_bytes = issuers.iter().map(|i| i.max_token_bytes).max().unwrap_or(0);
        Ok(Self {
            issuers,
            max_token_bytes,
            clock,
        })
    }

    /// The configured issuer names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.issuers.iter().map(|i| &*i.name)
    }

    /// Fetches discovery + JWKS for every issuer, concurrently; logs
    /// (`tracing::warn`) failures, never fails start-up.
    pub async fn refresh_all(&self) {
        let mut tasks = tokio::task::JoinSet::new();
        for i in &self.issuers {
            let keys = Arc::clone(&i.keys);
            tasks.spawn(async move { keys.refresh().await });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Sets every issuer's key-set age gauge (call before a metrics scrape;
    /// `verify` also updates it, at most once a second).
    pub fn export_metrics(&self) {
        for i in &self.issuers {
            i.keys.export_metrics();
        }
    }

    /// Verifies a compact ID token; picks the issuer by exact equality of the
    /// unverified `iss` with a configured issuer URL.
    ///
    /// Order: size → header (alg, crit, jwk/jku/x5u, typ) → `iss` (from
    /// the claims, parsed once, or peeked when they do not parse) → issuer →
    /// key by `kid` → signature → claims → `iss`, `aud`, `exp`, `nbf`,
    /// `iat`, maximum age.
    pub async fn verify(&self, token: &str) -> Result<VerifiedIdToken, VerifyError> {
        if token.len() > self.max_token_bytes {
            return Err(VerifyError::TooLarge);
        }
        let compact = jws::split(token)?;
        let header_bytes = jws::decode_header(&compact)?;
        let header = Header::parse(&header_bytes)?;
        let payload = jws::decode(compact.payload_b64, "payload")?;
        // One parse: the typed claims, read before the signature is checked
        // but trusted only after. Their `iss` picks the issuer. A payload
        // that does not parse as claims takes the old path (peek at `iss`,
        // check the signature, then refuse the claims), so errors come in
        // the same order as ever: a forged token is a bad signature first.
        let parsed: Result<GitLabClaims, _> = serde_json::from_slice(&payload);
        let issuer = {
            let iss = match &parsed {
                Ok(claims) => Cow::Borrowed(&*claims.iss),
                Err(_) => jws::peek_iss(&payload)?,
            };
            self.issuers
                .iter()
                .find(|i| *i.issuer == *iss)
                .ok_or(VerifyError::UntrustedIssuer)?
        };
        if token.len() > issuer.max_token_bytes {
            return Err(VerifyError::TooLarge);
        }
        // H9: without a kid there is no key to pick; cistern does not try each key.
        let kid = header.kid.ok_or(VerifyError::UnknownKey)?;
        let signature = Signature::decode(compact.signature_b64)?;
        let set = issuer.keys.set_with(&kid).await?;
        let key = set.get(&kid).ok_or(VerifyError::UnknownKey)?;
        key.verify_sig(compact.signing_input.as_bytes(), signature.as_bytes())
            .map_err(|_| VerifyError::BadSignature)?;
        drop(set);
        let claims = parsed.map_err(|e| VerifyError::InvalidClaims(e.to_string()))?;
        issuer.check(&claims, self.clock.now_secs())?;
        Ok(VerifiedIdToken {
            issuer: issuer.name.clone(),
            claims,
            kid: kid.into_owned(),
            token_sha256: sha256(token),
            _proof: (),
        })
    }

    /// Installs a key set for one issuer without HTTP (tests only).
    #[cfg(test)]
    pub(crate) fn install_keys(&self, name: &str, set: super::jwks::KeySet) {
        if let Some(i) = self.issuers.iter().find(|i| &*i.name == name) {
            i.keys.install(set);
        }
    }
}

impl Issuer {
    /// The claim checks after the signature verified.
    fn check(&self, c: &GitLabClaims, now: i64) -> Result<(), VerifyError> {
        if *c.iss != *self.issuer {
            return Err(VerifyError::UntrustedIssuer);
        }
        if !self.audiences.iter().any(|a| c.aud.contains(a)) {
            return Err(VerifyError::WrongAudience);
        }
        let leeway = self.leeway_secs;
        // RFC 7519 §4.1.4: now must be before exp.
        if now >= c.exp.0.saturating_add(leeway) {
            return Err(VerifyError::Expired);
        }
        if c.nbf.is_some_and(|nbf| nbf.0 > now.saturating_add(leeway))
            || c.iat.0 > now.saturating_add(leeway)
        {
            return Err(VerifyError::NotYetValid);
        }
        if now.saturating_sub(c.iat.0) > self.max_age_secs {
            return Err(VerifyError::TooOld);
        }
        Ok(())
    }
}

fn sha256(token: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The largest token [`claims_without_verification`] reads.
const MAX_UNVERIFIED_TOKEN_BYTES: usize = 1024 * 1024;

/// Parses a token's claims exactly like [`Issuers::verify`] but **without
/// checking the signature, the issuer or any time** — for
/// `cistern policy test --token`, which only explains policy decisions.
///
/// # Danger
///
/// Anyone can forge a token that parses here. Never use the result to
/// grant anything, to log in, or to make any decision other than showing an
/// operator how policies would treat these claims.
pub fn claims_without_verification(token: &str) -> Result<GitLabClaims, VerifyError> {
    if token.len() > MAX_UNVERIFIED_TOKEN_BYTES {
        return Err(VerifyError::TooLarge);
    }
    let compact = jws::split(token)?;
    let header_bytes = jws::decode_header(&compact)?;
    Header::parse(&header_bytes)?;
    Signature::decode(compact.signature_b64)?;
    let payload = jws::decode(compact.payload_b64, "payload")?;
    serde_json::from_slice(&payload).map_err(|e| VerifyError::InvalidClaims(e.to_string()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "issuer_tests.rs"]
mod tests;
