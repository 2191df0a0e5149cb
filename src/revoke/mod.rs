//! Credential lifecycle: revocation rules, offboarding blocks, and the
//! in-memory [`RevocationSet`] that answers "is this credential revoked?" in
//! O(1).
//!
//! A rule says "credentials of this grain issued before `issued_before_ms`
//! are revoked" (or, for `jti`, "this credential is revoked"). Rules are
//! rows of the `revocations` table; the set is loaded from it at start,
//! updated in-process when this server records a rule, and polled for rows
//! written by another process (`cistern revoke --direct`). When the set
//! applies a rule, the row's `effective_at_ms` is set, so time-to-revoke is
//! `effective_at_ms - requested_at_ms`, measured.
//!
//! Issue times come from the credential's UUID v7 `jti` (millisecond
//! precision, minted from the injected clock and covered by the signature),
//! else from `iat` (second precision, rounded down, so a rule made in the
//! same second also covers the credential: the error is on the safe side).

mod set;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

pub use self::set::{Credential, RevocationSet, SHARDS};
use crate::clock::Clock;
use crate::config::IssuerConfig;
use crate::mint::AccessTokenClaims;
use crate::store::{AuditEvent, AuditKind, Store, StoreError};

/// What a revocation rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grain {
    /// One credential by `jti`.
    Jti,
    /// Everything issued to a project id (optionally of one issuer).
    Project,
    /// Everything issued to a namespace id (optionally of one issuer).
    Namespace,
    /// Everything issued for a role.
    Role,
    /// Everything issued to jobs of one configured issuer.
    Issuer,
    /// Everything.
    All,
}

impl Grain {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Grain::Jti => "jti",
            Grain::Project => "project",
            Grain::Namespace => "namespace",
            Grain::Role => "role",
            Grain::Issuer => "issuer",
            Grain::All => "all",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "jti" => Grain::Jti,
            "project" => Grain::Project,
            "namespace" => Grain::Namespace,
            "role" => Grain::Role,
            "issuer" => Grain::Issuer,
            "all" => Grain::All,
            _ => return None,
        })
    }

    /// Whether an issuer may scope the rule.
    pub fn issuer_scoped(self) -> bool {
        matches!(self, Grain::Project | Grain::Namespace)
    }
}

/// What an offboarding block covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockGrain {
    /// A project id.
    Project,
    /// A namespace id.
    Namespace,
    /// A role.
    Role,
}

impl BlockGrain {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockGrain::Project => "project",
            BlockGrain::Namespace => "namespace",
            BlockGrain::Role => "role",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "project" => BlockGrain::Project,
            "namespace" => BlockGrain::Namespace,
            "role" => BlockGrain::Role,
            _ => return None,
        })
    }

    /// The revocation grain that revokes what the block covers.
    pub fn revocation_grain(self) -> Grain {
        match self {
            BlockGrain::Project => Grain::Project,
            BlockGrain::Namespace => Grain::Namespace,
            BlockGrain::Role => Grain::Role,
        }
    }
}

/// A rule as applied by the set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RevocationRule {
    /// Row id (0 before it is stored).
    pub id: i64,
    /// What it covers.
    pub grain: Grain,
    /// The jti, id, role or issuer name; empty for `all`.
    pub value: String,
    /// Configured issuer name scoping a project or namespace; empty = any.
    pub issuer: String,
    /// Credentials issued strictly before this instant (ms) are revoked.
    pub issued_before_ms: i64,
}

/// A rule to record, with who asked and why.
#[derive(Debug, Clone, Serialize)]
pub struct NewRevocation {
    /// The rule (its `id` is ignored).
    pub rule: RevocationRule,
    /// When it was asked for (ms).
    pub requested_at_ms: i64,
    /// Who asked: `bootstrap`, an admin token's `sub` + `jti`, `self`, `cli`.
    pub actor: String,
    /// Why (required for admin actions).
    pub reason: String,
    /// Where it came from: `rfc7009`, `admin_api`, `cli_direct`, `offboard`.
    pub source: String,
}

/// A stored rule with its timing.
#[derive(Debug, Clone, Serialize)]
pub struct StoredRevocation {
    /// The rule.
    #[serde(flatten)]
    pub rule: RevocationRule,
    /// When it was asked for (ms).
    pub requested_at_ms: i64,
    /// When a server applied it (ms), if one has.
    pub effective_at_ms: Option<i64>,
    /// Who asked.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// Where it came from.
    pub source: String,
    /// For a jti rule on a credential cistern issued: when that credential
    /// expires (ms). Past it (and a margin) the jti need not be held.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_expires_at_ms: Option<i64>,
}

/// An offboarding block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Block {
    /// What it covers.
    pub grain: BlockGrain,
    /// Configured issuer name; empty = any (always empty for roles).
    pub issuer: String,
    /// The id or role.
    pub value: String,
}

/// A stored block with who made it and why.
#[derive(Debug, Clone, Serialize)]
pub struct StoredBlock {
    /// The block.
    #[serde(flatten)]
    pub block: Block,
    /// Who.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// When (ms).
    pub at_ms: i64,
}

/// Millisecond issue time of one of cistern's tokens: from its UUID v7
/// `jti` when it is one, else `iat` seconds.
pub fn issued_at_ms(jti: &str, iat_secs: i64) -> i64 {
    uuid::Uuid::try_parse(jti)
        .ok()
        .filter(|u| u.get_version_num() == 7)
        .and_then(|u| u.get_timestamp())
        .map(|t| {
            let (secs, nanos) = t.to_unix();
            i64::try_from(secs)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000)
                .saturating_add(i64::from(nanos / 1_000_000))
        })
        .unwrap_or_else(|| iat_secs.saturating_mul(1000))
}

/// The credential a verified access token describes.
pub fn credential_of(c: &AccessTokenClaims) -> Credential<'_> {
    Credential {
        jti: &c.jti,
        issuer: &c.pipeline.issuer,
        project_id: &c.pipeline.job_project_id,
        namespace_id: &c.pipeline.namespace_id,
        job_namespace_id: c.pipeline.job_namespace(),
        role: &c.role,
        issued_at_ms: issued_at_ms(&c.jti, c.iat),
    }
}

/// Why a lifecycle operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The request is not valid (missing reason, bad grain/value, future instant).
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// What a revocation did.
#[derive(Debug, Clone, Serialize)]
pub struct RevokeOutcome {
    /// The rule's row id.
    pub rule_id: i64,
    /// The rule.
    pub grain: Grain,
    /// Its value.
    pub value: String,
    /// Its issuer scope.
    pub issuer: String,
    /// Cutoff (ms).
    pub issued_before_ms: i64,
    /// When it was asked for (ms).
    pub requested_at_ms: i64,
    /// When this server applied it (ms); `None` when recorded directly in the
    /// store (a running server applies it at its next poll).
    pub effective_at_ms: Option<i64>,
    /// Unexpired credentials the rule covers.
    pub outstanding: usize,
    /// Their jtis (at most [`MAX_LISTED`]).
    pub jtis: Vec<String>,
}

/// Who asks for a revocation, why, and through what.
#[derive(Debug, Clone, Copy)]
pub struct Requester<'a> {
    /// `bootstrap`, an admin token's `sub` + `jti`, a token's own `sub`, `cli`.
    pub actor: &'a str,
    /// Why (required, recorded).
    pub reason: &'a str,
    /// `rfc7009`, `admin_api`, `cli_direct`.
    pub source: &'a str,
}

/// Rules read per store query by [`Lifecycle::sync`].
const SYNC_PAGE: usize = 10_000;

/// Most jtis listed in an outcome.
pub const MAX_LISTED: usize = 100;

/// What an offboarding did.
#[derive(Debug, Clone, Serialize)]
pub struct OffboardOutcome {
    /// The block now in force.
    pub block: Block,
    /// The revocation of everything outstanding for it.
    pub revocation: RevokeOutcome,
}

/// Records and applies lifecycle operations: the store for durability, the
/// set (when running inside the server) for effect.
#[derive(Clone)]
pub struct Lifecycle {
    /// Records.
    pub store: Arc<dyn Store>,
    /// The in-process set; `None` when acting on the store directly from the
    /// CLI (the server applies the rule at its next poll).
    pub set: Option<Arc<RevocationSet>>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Configured issuers: name → name and issuer URL → name. Issuer scopes
    /// and `issuer` rules must name one of them (rules speak in names).
    pub issuer_names: Arc<HashMap<String, String>>,
}

/// What a re-enable did.
#[derive(Debug, Clone, Serialize)]
pub struct ReenableOutcome {
    /// The block lifted.
    pub block: Block,
    /// Whether it was in force.
    pub was_blocked: bool,
}

fn check_text(what: &str, s: &str, max: usize) -> Result<(), LifecycleError> {
    if s.len() > max || s.chars().any(char::is_control) {
        return Err(LifecycleError::Invalid(format!(
            "{what} must be at most {max} bytes without control characters"
        )));
    }
    Ok(())
}

/// name → name and issuer URL → name, for [`Lifecycle::issuer_names`].
pub fn issuer_names(issuers: &BTreeMap<String, IssuerConfig>) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for (name, c) in issuers {
        m.insert(name.clone(), name.clone());
        m.insert(c.issuer.clone(), name.clone());
        m.insert(c.issuer.trim_end_matches('/').to_owned(), name.clone());
    }
    m
}

impl Lifecycle {
    fn resolve_issuer(&self, issuer: &str) -> Result<String, LifecycleError> {
        if issuer.is_empty() {
            return Ok(String::new());
        }
        self.issuer_names.get(issuer).cloned().ok_or_else(|| {
            LifecycleError::Invalid(format!(
                "unknown issuer {issuer:?}: give a configured issuer name or URL"
            ))
        })
    }

    /// Validates, records, applies and reports a rule. `before_ms` defaults
    /// to now and must not be in the future.
    pub async fn revoke(
        &self,
        grain: Grain,
        value: &str,
        issuer: &str,
        before_ms: Option<i64>,
        by: &Requester<'_>,
    ) -> Result<RevokeOutcome, LifecycleError> {
        let Requester {
            actor,
            reason,
            source,
        } = *by;
        let now = self.clock.now_millis();
        let issuer = self.resolve_issuer(issuer)?;
        let value = if grain == Grain::Issuer {
            self.resolve_issuer(value)?
        } else {
            value.to_owned()
        };
        let rule = validate_rule(grain, &value, &issuer, before_ms, now)?;
        if reason.trim().is_empty() {
            return Err(LifecycleError::Invalid("a reason is required".into()));
        }
        check_text("reason", reason, 1000)?;
        let new = NewRevocation {
            rule,
            requested_at_ms: now,
            actor: actor.to_owned(),
            reason: reason.to_owned(),
            source: source.to_owned(),
        };
        let id = self.store.record_revocation(new.clone()).await?;
        self.finish(id, new).await
    }

    /// Applies a just-recorded rule in-process, marks it effective and
    /// counts what it covers.
    async fn finish(&self, id: i64, new: NewRevocation) -> Result<RevokeOutcome, LifecycleError> {
        let rule = RevocationRule { id, ..new.rule };
        let effective_at_ms = match &self.set {
            Some(set) => {
                set.apply(&rule);
                let at = self.clock.now_millis();
                self.store
                    .mark_revocations_effective(id - 1, id, at)
                    .await?;
                Some(at)
            }
            None => None,
        };
        let jtis = self
            .store
            .outstanding_for_rule(&rule, self.clock.now_millis())
            .await?;
        Ok(RevokeOutcome {
            rule_id: id,
            grain: rule.grain,
            value: rule.value,
            issuer: rule.issuer,
            issued_before_ms: rule.issued_before_ms,
            requested_at_ms: new.requested_at_ms,
            effective_at_ms,
            outstanding: jtis.len(),
            jtis: jtis.into_iter().take(MAX_LISTED).collect(),
        })
    }

    /// Blocks new exchanges for `block` and revokes everything outstanding
    /// for it, in one store transaction.
    pub async fn offboard(
        &self,
        block: Block,
        actor: &str,
        reason: &str,
        source: &str,
    ) -> Result<OffboardOutcome, LifecycleError> {
        let now = self.clock.now_millis();
        let block = validate_block(Block {
            issuer: self.resolve_issuer(&block.issuer)?,
            ..block
        })?;
        if reason.trim().is_empty() {
            return Err(LifecycleError::Invalid("a reason is required".into()));
        }
        check_text("reason", reason, 1000)?;
        let new = NewRevocation {
            rule: RevocationRule {
                id: 0,
                grain: block.grain.revocation_grain(),
                value: block.value.clone(),
                issuer: block.issuer.clone(),
                issued_before_ms: now,
            },
            requested_at_ms: now,
            actor: actor.to_owned(),
            reason: reason.to_owned(),
            source: source.to_owned(),
        };
        let id = self.store.offboard(block.clone(), new.clone()).await?;
        if let Some(set) = &self.set {
            set.add_block(&block);
        }
        let revocation = self.finish(id, new).await?;
        Ok(OffboardOutcome { block, revocation })
    }

    /// Lifts a block (audited), reporting whether one was in force.
    pub async fn reenable(
        &self,
        block: Block,
        actor: &str,
        reason: &str,
    ) -> Result<ReenableOutcome, LifecycleError> {
        let block = validate_block(Block {
            issuer: self.resolve_issuer(&block.issuer)?,
            ..block
        })?;
        if reason.trim().is_empty() {
            return Err(LifecycleError::Invalid("a reason is required".into()));
        }
        check_text("reason", reason, 1000)?;
        let now = self.clock.now_millis();
        let was_blocked = self
            .store
            .reenable(block.clone(), actor.to_owned(), reason.to_owned(), now)
            .await?;
        if let Some(set) = &self.set {
            set.remove_block(&block);
        }
        Ok(ReenableOutcome { block, was_blocked })
    }

    /// Applies every rule the set has not seen yet and marks those no server
    /// has applied as effective; then reloads the blocks. Used at start and
    /// by the poller. Returns how many rules were applied.
    pub async fn sync(&self) -> Result<usize, LifecycleError> {
        let Some(set) = &self.set else {
            return Ok(0);
        };
        let mut applied = 0;
        // Pages bound memory when a million rules load at start.
        loop {
            let after = set.last_seen();
            let page = self.store.revocations_since(after, SYNC_PAGE).await?;
            if page.is_empty() {
                break;
            }
            let unmarked = page.iter().any(|r| r.effective_at_ms.is_none());
            let full = page.len() == SYNC_PAGE;
            applied += page.len();
            let now = self.clock.now_millis();
            // A jti whose credential has long expired is not loaded at all:
            // verification refuses that credential before the set is asked.
            set.apply_all_expiring(
                page.iter()
                    .filter(|r| {
                        !r.credential_expires_at_ms
                            .is_some_and(|e| set::outlived(e, now))
                    })
                    .map(|r| (&r.rule, r.credential_expires_at_ms)),
            );
            if let Some(max) = page.iter().map(|r| r.rule.id).max() {
                set.mark_seen(max);
            }
            if unmarked {
                // One statement for the whole page.
                let at = self.clock.now_millis();
                self.store
                    .mark_revocations_effective(after, set.last_seen(), at)
                    .await?;
            }
            if !full {
                break;
            }
        }
        set.set_blocks(
            &self
                .store
                .offboarded()
                .await?
                .into_iter()
                .map(|b| b.block)
                .collect::<Vec<_>>(),
        );
        if let Some(n) = set.prune_if_due(self.clock.now_millis())
            && n > 0
        {
            tracing::debug!(released = n, "revoked jtis of expired credentials let go");
        }
        Ok(applied)
    }

    /// Polls the store every `interval` for rules and blocks written by
    /// other processes. Runs until the task is dropped.
    pub fn spawn_poller(self, interval: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match self.sync().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(rules = n, "revocation rules applied from the store"),
                    Err(e) => tracing::warn!(error = %e, "revocation poll failed"),
                }
            }
        })
    }
}

fn validate_rule(
    grain: Grain,
    value: &str,
    issuer: &str,
    before_ms: Option<i64>,
    now: i64,
) -> Result<RevocationRule, LifecycleError> {
    check_text("value", value, 256)?;
    check_text("issuer", issuer, 256)?;
    if grain == Grain::All {
        if !value.is_empty() {
            return Err(LifecycleError::Invalid("grain all takes no value".into()));
        }
    } else if value.is_empty() {
        return Err(LifecycleError::Invalid(format!(
            "grain {} needs a value",
            grain.as_str()
        )));
    }
    if !issuer.is_empty() && !grain.issuer_scoped() {
        return Err(LifecycleError::Invalid(format!(
            "an issuer scope applies to project and namespace only, not {}",
            grain.as_str()
        )));
    }
    let cutoff = before_ms.unwrap_or(now);
    if cutoff > now {
        return Err(LifecycleError::Invalid(
            "before must not be in the future".into(),
        ));
    }
    if grain == Grain::Jti && before_ms.is_some() {
        return Err(LifecycleError::Invalid(
            "before does not apply to a jti".into(),
        ));
    }
    Ok(RevocationRule {
        id: 0,
        grain,
        value: value.to_owned(),
        issuer: issuer.to_owned(),
        issued_before_ms: cutoff,
    })
}

fn validate_block(block: Block) -> Result<Block, LifecycleError> {
    check_text("value", &block.value, 256)?;
    check_text("issuer", &block.issuer, 256)?;
    if block.value.is_empty() {
        return Err(LifecycleError::Invalid("a value is required".into()));
    }
    if block.grain == BlockGrain::Role && !block.issuer.is_empty() {
        return Err(LifecycleError::Invalid(
            "a role block applies to every issuer".into(),
        ));
    }
    Ok(block)
}

/// The audit event of a recorded rule (written with it, in one transaction).
pub fn revocation_audit(id: i64, new: &NewRevocation) -> AuditEvent {
    let r = &new.rule;
    AuditEvent {
        at_ms: new.requested_at_ms,
        kind: AuditKind::TokenRevoked,
        issuer: (!r.issuer.is_empty()).then(|| r.issuer.clone()),
        role: (r.grain == Grain::Role).then(|| r.value.clone()),
        project_id: (r.grain == Grain::Project).then(|| r.value.clone()),
        reason: Some(new.source.clone()),
        detail: json!({
            "rule_id": id,
            "grain": r.grain,
            "value": r.value,
            "issuer": r.issuer,
            "issued_before_ms": r.issued_before_ms,
            "actor": new.actor,
            "reason": new.reason,
            "source": new.source,
        })
        .into(),
    }
}

/// The audit event of a block being put in force or lifted.
pub fn block_audit(
    kind: AuditKind,
    block: &Block,
    actor: &str,
    reason: &str,
    at_ms: i64,
    rule_id: Option<i64>,
) -> AuditEvent {
    AuditEvent {
        at_ms,
        kind,
        issuer: (!block.issuer.is_empty()).then(|| block.issuer.clone()),
        role: (block.grain == BlockGrain::Role).then(|| block.value.clone()),
        project_id: (block.grain == BlockGrain::Project).then(|| block.value.clone()),
        reason: Some(reason.to_owned()),
        detail: json!({
            "grain": block.grain,
            "value": block.value,
            "issuer": block.issuer,
            "actor": actor,
            "reason": reason,
            "rule_id": rule_id,
        })
        .into(),
    }
}

#[cfg(test)]
mod tests;
