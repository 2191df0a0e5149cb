//! Stage 3b — downstream credentials: real credentials minted for one job
//! by the system the job needs (GitLab, an IdP), revoked when their
//! lifetime ends.
//!
//! A provider is one file behind [`CredentialProvider`]: mint for a grant,
//! revoke by the handle it returned, list what carries cistern's mark (for
//! reconciliation). [`reaper`] revokes credentials whose lifetime ended or
//! that a revocation rule covers, and reconciles what the provider holds
//! against the store.

pub mod authorize;
pub mod gitlab;
pub mod oauth2;
pub mod oauth2_refresh;
pub mod reaper;
pub mod rotation;
pub mod sealed;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::config::ProviderConfig;

/// First backoff after a 5xx or transport error; doubled per retry.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Longest backoff.
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// Exponential backoff with full jitter, for every provider's retries:
/// uniform in `[0, min(cap, base·2^attempt)]`.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_CAP);
    let mut b = [0u8; 4];
    let r = match aws_lc_rs::rand::fill(&mut b) {
        Ok(()) => u32::from_le_bytes(b),
        Err(_) => u32::MAX / 2,
    };
    ceiling.mul_f64(f64::from(r) / f64::from(u32::MAX))
}

/// Reads a secret from an environment variable or a file (exactly one is
/// given), trimmed; the error names where, never the value.
pub fn read_secret(
    env: Option<&str>,
    file: Option<&std::path::Path>,
) -> Result<Zeroizing<String>, String> {
    let text = match (env, file) {
        (Some(var), _) => {
            std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?
        }
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        (None, None) => return Err("not configured".into()),
    };
    let text = Zeroizing::new(text);
    let secret = Zeroizing::new(text.trim().to_owned());
    if secret.is_empty() || secret.chars().any(|c| c.is_control() || c == ' ') {
        return Err("empty or malformed".into());
    }
    Ok(secret)
}

/// What to mint, for which job.
#[derive(Debug, Clone)]
pub struct MintRequest<'a> {
    /// cistern's id for the credential (a UUID v7): its mark downstream.
    pub jti: &'a str,
    /// Where it is minted (a GitLab project id).
    pub target: &'a str,
    /// Scopes, already within the provider's limits.
    pub scopes: &'a [String],
    /// Access level (GitLab), already within the provider's limits.
    pub access_level: u8,
    /// The lifetime cistern enforces.
    pub ttl: Duration,
    /// Now (ms since the epoch).
    pub now_ms: i64,
    /// Who it is for, for the credential's description downstream.
    pub description: String,
}

/// A minted downstream credential.
pub struct Minted {
    /// The secret. Handed to the job once; never logged or stored.
    pub secret: Zeroizing<String>,
    /// The provider's id for it (what revoking needs).
    pub external_id: String,
    /// When the provider itself will expire it (ms), which may be later
    /// than cistern's lifetime (GitLab's expiry is a date).
    pub provider_expires_at_ms: i64,
}

impl std::fmt::Debug for Minted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("secret", &"<redacted>")
            .field("external_id", &self.external_id)
            .field("provider_expires_at_ms", &self.provider_expires_at_ms)
            .finish()
    }
}

/// A credential carrying cistern's mark, as the provider lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The provider's id.
    pub external_id: String,
    /// cistern's `jti` read back from the mark.
    pub jti: String,
    /// Whether the provider still considers it active.
    pub active: bool,
}

/// Why a provider call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The provider refused (401/403/404/400): retrying will not help; the
    /// job is told, and the refusal audited.
    #[error("{provider} refused: {status} {message}")]
    Refused {
        /// Provider name.
        provider: String,
        /// HTTP status.
        status: u16,
        /// The provider's message (never a secret).
        message: String,
    },
    /// The provider is failing or unreachable (5xx, 429, timeouts) after
    /// the configured retries.
    #[error("{provider} unavailable: {message}")]
    Unavailable {
        /// Provider name.
        provider: String,
        /// What happened last.
        message: String,
    },
    /// The provider answered something that makes no sense.
    #[error("{provider} answered nonsense: {message}")]
    BadResponse {
        /// Provider name.
        provider: String,
        /// What was wrong.
        message: String,
    },
    /// The refresh-token provider has no usable refresh token: an operator
    /// must run `cistern provider authorize`.
    #[error(
        "{provider} needs re-authorization ({reason}): run `cistern provider authorize {provider}`"
    )]
    NeedsAuthorization {
        /// Provider name.
        provider: String,
        /// Why (never a secret).
        reason: String,
    },
    /// cistern's own credential for the provider is missing or unreadable.
    #[error("{provider}: {message}")]
    Credential {
        /// Provider name.
        provider: String,
        /// What is wrong (never the credential).
        message: String,
    },
}

/// A system that mints short-lived credentials for jobs.
#[async_trait]
pub trait CredentialProvider: Send + Sync {
    /// The configured name.
    fn name(&self) -> &str;
    /// Mints one credential.
    async fn mint(&self, req: &MintRequest<'_>) -> Result<Minted, ProviderError>;
    /// Revokes a credential by target and id; an already gone one is success.
    async fn revoke(&self, target: &str, external_id: &str) -> Result<(), ProviderError>;
    /// Every credential on `target` that carries cistern's mark (all pages).
    async fn list_marked(&self, target: &str) -> Result<Vec<Listed>, ProviderError>;
}

/// What providers that keep state need from the server.
#[derive(Clone)]
pub struct ProviderContext {
    /// Records (sealed credentials, audit).
    pub store: Arc<dyn crate::store::Store>,
    /// Time.
    pub clock: Arc<dyn crate::clock::Clock>,
    /// Health metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// The configured providers by name.
#[derive(Clone, Default)]
pub struct Providers {
    all: BTreeMap<String, Arc<dyn CredentialProvider>>,
    gitlab: BTreeMap<String, Arc<gitlab::GitLab>>,
    refresh: BTreeMap<String, Arc<oauth2_refresh::RefreshTokenProvider>>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.all.keys()).finish()
    }
}

impl Providers {
    /// Builds every configured provider (reads cistern's own credentials).
    pub fn from_config(
        configs: &BTreeMap<String, ProviderConfig>,
        ctx: &ProviderContext,
    ) -> Result<Providers, ProviderError> {
        let mut out = Providers::default();
        for (name, c) in configs {
            match c {
                ProviderConfig::Gitlab(g) => {
                    let gl = Arc::new(gitlab::GitLab::new(name, g)?);
                    out.gitlab.insert(name.clone(), gl.clone());
                    out.all.insert(name.clone(), gl);
                }
                ProviderConfig::Oauth2ClientCredentials(o) => {
                    out.all.insert(
                        name.clone(),
                        Arc::new(oauth2::ClientCredentials::new(name, o)?),
                    );
                }
                ProviderConfig::Oauth2RefreshToken(o) => {
                    let p = Arc::new(oauth2_refresh::RefreshTokenProvider::new(name, o, ctx)?);
                    out.refresh.insert(name.clone(), p.clone());
                    out.all.insert(name.clone(), p);
                }
            }
        }
        Ok(out)
    }

    /// A set of providers built elsewhere (tests).
    pub fn from_map(all: BTreeMap<String, Arc<dyn CredentialProvider>>) -> Providers {
        Providers {
            all,
            ..Providers::default()
        }
    }

    /// The refresh-token providers (their health is published at start).
    pub fn refresh_token_providers(
        &self,
    ) -> impl Iterator<Item = &Arc<oauth2_refresh::RefreshTokenProvider>> {
        self.refresh.values()
    }

    /// The provider named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn CredentialProvider>> {
        self.all.get(name)
    }

    /// The GitLab instance named `name` (for managing cistern's own credential).
    pub fn gitlab(&self, name: &str) -> Option<&Arc<gitlab::GitLab>> {
        self.gitlab.get(name)
    }

    /// Whether none is configured.
    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }
}

#[cfg(test)]
mod reaper_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..20 {
            let b = backoff(attempt);
            assert!(b <= BACKOFF_CAP);
            assert!(b <= BACKOFF_BASE.saturating_mul(1 << attempt.min(16)));
        }
    }
}
