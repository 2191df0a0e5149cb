//! cistern's own GitLab credential: the one long-lived secret left. With a
//! key-encryption key configured, it is kept sealed in the store (the
//! configured environment variable or file only seeds it once), checked
//! periodically, and rotated through GitLab's self-rotate endpoint before
//! it expires. The new value is sealed and committed to the store the
//! moment GitLab answers, and only then put in use.
//!
//! GitLab revokes the old credential as it answers the rotation, so there
//! is a window — between that answer and the commit, milliseconds — where a
//! crash would lose the only valid credential; a failed commit keeps the new
//! value in memory (in use, the old one is dead) and retries the commit at
//! every check. Both are logged loudly. Recovery: issue a fresh credential
//! in GitLab and load it with `cistern provider set-credential` (which
//! replaces the sealed value), then restart.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::ProviderError;
use super::gitlab::{GitLab, date_ms, expires_at_for};
use super::sealed::{Kek, SealError};
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::store::{AuditEvent, AuditKind, Store, StoreError};

/// Why keeping the credential failed.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// GitLab failed or refused.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Sealing or opening failed.
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// Keeps one provider's own credential sealed, checked and rotated.
pub struct Keeper {
    /// Provider name (also the sealing's associated data).
    pub name: String,
    /// The instance whose credential this is.
    pub gitlab: Arc<GitLab>,
    /// The key-encryption key.
    pub kek: Kek,
    /// Records.
    pub store: Arc<dyn Store>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Health metrics.
    pub metrics: Arc<Metrics>,
    /// Rotate when the credential expires within this long.
    pub rotate_before: Duration,
    /// Lifetime asked for the new credential.
    pub rotate_lifetime: Duration,
    /// A rotated credential whose commit failed, to retry.
    unsaved: Mutex<Option<(Zeroizing<String>, Option<String>)>>,
}

impl Keeper {
    /// A keeper; call [`Keeper::load_or_seal`] before serving.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        gitlab: Arc<GitLab>,
        kek: Kek,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
        rotate_before: Duration,
        rotate_lifetime: Duration,
    ) -> Keeper {
        Keeper {
            name,
            gitlab,
            kek,
            store,
            clock,
            metrics,
            rotate_before,
            rotate_lifetime,
            unsaved: Mutex::new(None),
        }
    }

    fn audit(&self, reason: &str, expires_on: Option<&str>) -> AuditEvent {
        AuditEvent {
            at_ms: self.clock.now_millis(),
            kind: AuditKind::AdminAction,
            issuer: None,
            role: None,
            project_id: None,
            reason: Some(reason.to_owned()),
            detail: json!({ "provider": self.name, "expires_on": expires_on }).into(),
        }
    }

    /// Seals `token` and stores it as the credential in use (the CLI's
    /// `provider set-credential`).
    pub async fn replace(&self, token: Zeroizing<String>) -> Result<(), KeeperError> {
        let sealed = self.kek.seal(&self.name, token.as_str())?;
        self.store
            .save_sealed_credential(
                &self.name,
                sealed,
                None,
                self.audit("provider_credential_loaded", None),
            )
            .await?;
        self.gitlab.set_credential(token);
        Ok(())
    }

    /// At start: use the sealed credential if the store holds one (a
    /// rotated credential outlives the seed in the environment); otherwise
    /// seal the seed into the store.
    pub async fn load_or_seal(&self) -> Result<(), KeeperError> {
        match self.store.sealed_credential(&self.name).await? {
            Some((sealed, _)) => {
                let token = self.kek.open(&self.name, &sealed)?;
                self.gitlab.set_credential(token);
            }
            None => {
                let seed = self.gitlab.credential();
                let sealed = self.kek.seal(&self.name, seed.as_str())?;
                self.store
                    .save_sealed_credential(
                        &self.name,
                        sealed,
                        None,
                        self.audit("provider_credential_sealed", None),
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// One check: retry an unsaved commit, read the expiry, rotate when it
    /// is within `rotate_before`. Returns the new expiry date if it rotated.
    pub async fn check(&self) -> Result<Option<String>, KeeperError> {
        self.save_pending().await?;
        let expiry = self.gitlab.own_expiry().await?;
        let now = self.clock.now_millis();
        let Some(expiry) = expiry else {
            // A credential that never expires is never rotated: give it one.
            return Ok(None);
        };
        let expires_ms = date_ms(&expiry).unwrap_or(0);
        self.metrics
            .set_credential_expiry(&self.name, expires_ms.div_euclid(1000));
        let before = i64::try_from(self.rotate_before.as_millis()).unwrap_or(i64::MAX);
        if expires_ms.saturating_sub(now) > before {
            return Ok(None);
        }
        let lifetime = i64::try_from(self.rotate_lifetime.as_millis()).unwrap_or(i64::MAX);
        let (wanted, _) = expires_at_for(now.saturating_add(lifetime));
        let (token, answered) = self.gitlab.rotate_own(&wanted).await?;
        let expires_on = answered.or(Some(wanted));
        // The old credential is dead now: persist the new one at once.
        *self.unsaved.lock().await = Some((token, expires_on.clone()));
        self.save_pending().await?;
        let at = self.clock.now_millis().div_euclid(1000);
        self.metrics.set_credential_rotated(&self.name, at);
        if let Some(ms) = expires_on.as_deref().and_then(date_ms) {
            self.metrics
                .set_credential_expiry(&self.name, ms.div_euclid(1000));
        }
        tracing::info!(provider = %self.name, expires_on = expires_on.as_deref().unwrap_or("never"), "own GitLab credential rotated");
        Ok(expires_on)
    }

    /// Commits a rotated credential not yet in the store, then puts it in use.
    async fn save_pending(&self) -> Result<(), KeeperError> {
        let mut pending = self.unsaved.lock().await;
        let Some((token, expires_on)) = pending.as_ref() else {
            return Ok(());
        };
        // In use at once: the old credential no longer works anyway.
        self.gitlab.set_credential(token.clone());
        let sealed = self.kek.seal(&self.name, token.as_str())?;
        self.store
            .save_sealed_credential(
                &self.name,
                sealed,
                expires_on.clone(),
                self.audit("provider_credential_rotated", expires_on.as_deref()),
            )
            .await
            .inspect_err(|e| {
                tracing::error!(provider = %self.name, error = %e, "the rotated GitLab credential is in use but NOT saved; retrying at the next check")
            })?;
        *pending = None;
        Ok(())
    }

    /// Checks every `interval`, forever (the first check at once).
    pub async fn run(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.check().await {
                self.metrics.credential_error(&self.name);
                tracing::error!(provider = %self.name, error = %e, "checking or rotating the own GitLab credential failed");
                // Provider and store errors name statuses and messages, never the credential.
                let mut event = self.audit("provider_credential_error", None);
                event.detail = json!({ "provider": self.name, "error": e.to_string() }).into();
                if let Err(e) = self.store.append_audit(event).await {
                    tracing::error!(error = %e, "audit of a credential error failed");
                }
            }
        }
    }
}

/// The KEK a GitLab provider config names, if any.
pub fn kek_of(cfg: &crate::config::GitLabProviderConfig) -> Result<Option<Kek>, String> {
    if cfg.kek_env.is_none() && cfg.kek_file.is_none() {
        return Ok(None);
    }
    let text = super::read_secret(cfg.kek_env.as_deref(), cfg.kek_file.as_deref())?;
    Kek::from_base64(&text).map(Some).map_err(|e| e.to_string())
}
