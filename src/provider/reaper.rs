//! Ending downstream credentials on time: the reaper revokes every
//! credential whose lifetime ended or that a revocation rule covers;
//! reconciliation lists what each provider holds with cistern's mark and
//! revokes whatever the store does not account for (a crash between mint
//! and record, a retried create) or that should be gone.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::{ProviderError, Providers};
use crate::clock::Clock;
use crate::revoke::{Credential, RevocationSet};
use crate::store::{AuditEvent, AuditKind, OutstandingDownstream, Store, StoreError};

/// How often outstanding downstream credentials are checked: a credential
/// is revoked within this long of its lifetime's end or of a rule covering it.
pub const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// Credentials looked at per pass.
const REAP_BATCH: usize = 10_000;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Credentials revoked at their provider (and marked).
    pub revoked: u64,
    /// Revocations that failed (retried next pass).
    pub failed: u64,
}

/// Why reconciliation stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The provider failed.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The reaper and reconciler, with everything injected.
pub struct Reaper {
    /// Records.
    pub store: Arc<dyn Store>,
    /// Providers by name.
    pub providers: Providers,
    /// Revocation rules in force.
    pub revocations: Arc<RevocationSet>,
    /// Time.
    pub clock: Arc<dyn Clock>,
}

fn credential(o: &OutstandingDownstream) -> Credential<'_> {
    Credential {
        jti: &o.token.jti,
        issuer: &o.identity.issuer,
        project_id: &o.identity.project_id,
        namespace_id: &o.identity.namespace_id,
        // The identity's namespace is already the job's.
        job_namespace_id: &o.identity.namespace_id,
        role: &o.identity.role,
        issued_at_ms: o.token.issued_at_ms,
    }
}

impl Reaper {
    /// One pass over outstanding downstream credentials.
    pub async fn reap(&self) -> Result<Pass, StoreError> {
        let now = self.clock.now_millis();
        let mut pass = Pass::default();
        for o in self.store.outstanding_downstream(REAP_BATCH).await? {
            let cause = if now >= o.token.expires_at_ms {
                "expired"
            } else if self.revocations.is_revoked(&credential(&o)) {
                "revoked"
            } else {
                continue;
            };
            match self.revoke(&o, cause).await {
                Ok(()) => pass.revoked += 1,
                Err(e) => {
                    pass.failed += 1;
                    tracing::warn!(error = %e, jti = %o.token.jti, cause, "revoking a downstream credential failed; retrying next pass");
                }
            }
        }
        Ok(pass)
    }

    async fn revoke(&self, o: &OutstandingDownstream, cause: &str) -> Result<(), ReconcileError> {
        let d = &o.downstream;
        let provider =
            self.providers
                .get(&d.provider)
                .ok_or_else(|| ProviderError::Credential {
                    provider: d.provider.clone(),
                    message: "no longer configured".into(),
                })?;
        provider.revoke(&d.target, &d.external_id).await?;
        let now = self.clock.now_millis();
        let audit = AuditEvent {
            at_ms: now,
            kind: AuditKind::TokenRevoked,
            issuer: Some(o.identity.issuer.clone()),
            role: Some(o.identity.role.clone()),
            project_id: Some(o.identity.project_id.clone()),
            reason: Some(format!("downstream_{cause}")),
            detail: json!({
                "jti": o.token.jti,
                "kind": o.token.kind,
                "provider": d.provider,
                "target": d.target,
                "external_id": d.external_id,
                "cause": cause,
                "expires_at_ms": o.token.expires_at_ms,
                "late_ms": (now - o.token.expires_at_ms).max(0),
            })
            .into(),
        };
        self.store
            .downstream_revoked(&o.token.jti, now, cause, audit)
            .await?;
        tracing::info!(jti = %o.token.jti, provider = %d.provider, target = %d.target, cause, "downstream credential revoked");
        Ok(())
    }

    /// Lists every target noted for `provider` and revokes each marked
    /// credential that is unknown to the store, a duplicate of a recorded
    /// one, recorded as revoked, or past its lifetime. Returns how many.
    pub async fn reconcile(&self, provider_name: &str) -> Result<u64, ReconcileError> {
        let Some(provider) = self.providers.get(provider_name).cloned() else {
            return Ok(0);
        };
        let mut revoked = 0;
        for target in self.store.downstream_targets(provider_name).await? {
            for listed in provider.list_marked(&target).await? {
                if !listed.active {
                    continue;
                }
                let now = self.clock.now_millis();
                let known = self.store.downstream(&listed.jti).await?;
                let why = match &known {
                    None => Some("unknown"),
                    Some((o, _)) if o.downstream.external_id != listed.external_id => {
                        Some("duplicate")
                    }
                    Some((_, Some(_))) => Some("still_active_after_revoke"),
                    Some((o, None)) if now >= o.token.expires_at_ms => Some("expired"),
                    Some(_) => None,
                };
                let Some(why) = why else { continue };
                match &known {
                    // A recorded, outstanding credential past its lifetime:
                    // the ordinary revoke path marks it too.
                    Some((o, None)) if why == "expired" => self.revoke(o, "expired").await?,
                    _ => {
                        provider.revoke(&target, &listed.external_id).await?;
                        let event = AuditEvent {
                            at_ms: now,
                            kind: AuditKind::TokenRevoked,
                            issuer: known.as_ref().map(|(o, _)| o.identity.issuer.clone()),
                            role: known.as_ref().map(|(o, _)| o.identity.role.clone()),
                            project_id: Some(target.clone()),
                            reason: Some(format!("reconciled_{why}")),
                            detail: json!({
                                "jti": listed.jti,
                                "provider": provider_name,
                                "target": target,
                                "external_id": listed.external_id,
                                "cause": why,
                            })
                            .into(),
                        };
                        self.store.append_audit(event).await?;
                        tracing::warn!(provider = provider_name, target = %target, external_id = %listed.external_id, why, "reconciliation revoked a downstream credential");
                    }
                }
                revoked += 1;
            }
        }
        Ok(revoked)
    }

    /// Runs passes forever, every [`REAP_INTERVAL`].
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REAP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.reap().await {
                tracing::warn!(error = %e, "downstream reaper pass failed");
            }
        }
    }

    /// Reconciles `provider` every `interval`, forever (first pass at once:
    /// a restart after a crash cleans up before anything else).
    pub async fn run_reconcile(self: Arc<Self>, provider: String, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.reconcile(&provider).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(provider = %provider, revoked = n, "reconciliation revoked downstream credentials")
                }
                Err(e) => {
                    tracing::warn!(provider = %provider, error = %e, "reconciliation failed; retrying next interval")
                }
            }
        }
    }
}
