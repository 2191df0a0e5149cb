//! Stage 4 — record: durable records behind a small [`Store`] trait.
//!
//! The domain speaks in whole records ([`ExchangeRecord`], [`AuditEvent`]);
//! each backend decides how to make them durable. Nothing here assumes
//! SQLite: times are integer milliseconds, ids are text, and the replay rule
//! is "insert (issuer, jti) once", which any store with a unique key can keep.
//! `sqlite.rs` is the embedded default; a PostgreSQL store is one more file.

pub mod sqlite;

use async_trait::async_trait;
use serde::Serialize;

use crate::revoke::{Block, NewRevocation, RevocationRule, StoredBlock, StoredRevocation};

/// Why the store refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The ID token's `jti` was already exchanged (replay).
    #[error("subject token already used")]
    Replay,
    /// The store is shutting down or its writer has stopped.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The database failed.
    #[error("database error: {0}")]
    Database(String),
    /// The operation would break one of the store's invariants; nothing
    /// was written.
    #[error("refused: {0}")]
    Refused(String),
}

/// A consumed ID token: kept until it expires so it cannot be exchanged twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayEntry {
    /// Configured issuer name.
    pub issuer: String,
    /// The ID token's `jti`.
    pub jti: String,
    /// When the ID token expires (ms); the entry can be pruned after.
    pub expires_at_ms: i64,
}

/// The pipeline identity behind a credential: issuer + immutable ids + role.
/// Paths are recorded for display, never trusted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    /// Configured issuer name.
    pub issuer: String,
    /// The project the job runs in (`job_project_id`, else `project_id`).
    pub project_id: String,
    /// Its namespace id.
    pub namespace_id: String,
    /// The role granted.
    pub role: String,
    /// Project path as last seen.
    pub project_path: String,
    /// Namespace path as last seen.
    pub namespace_path: String,
    /// Owner of the role's policy.
    pub owner: String,
}

/// One credential cistern issued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IssuedToken {
    /// The access token's `jti` (never the token itself).
    pub jti: String,
    /// Credential kind (`access_token`).
    pub kind: String,
    /// Audience of the credential.
    pub audience: String,
    /// Scopes granted, space-separated.
    pub scope: String,
    /// Issue time (ms).
    pub issued_at_ms: i64,
    /// Expiry (ms).
    pub expires_at_ms: i64,
    /// The ID token's `jti`, linking the credential to the job's token.
    pub subject_jti: String,
    /// Pipeline id.
    pub pipeline_id: String,
    /// Job id.
    pub job_id: String,
    /// Git ref the job ran for.
    pub git_ref: String,
}

/// Kinds of audit events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// An exchange was granted and a credential issued.
    ExchangeGranted,
    /// An exchange was denied.
    ExchangeDenied,
    /// A dry run was evaluated (nothing issued).
    ExchangeDryRun,
    /// A policy set was loaded and put in force.
    PolicyLoaded,
    /// A new policy set was rejected; the old one stays in force.
    PolicyRejected,
    /// A signing key was generated or rotated.
    KeyRotated,
    /// A revocation rule was recorded (RFC 7009 self-revocation, admin,
    /// offboarding).
    TokenRevoked,
    /// An issued credential reached its expiry (recorded by a sweep).
    CredentialExpired,
    /// New exchanges were blocked for a project, namespace or role.
    Offboarded,
    /// A block was lifted.
    Reenabled,
    /// Any other operator action (bootstrap credential made, ...).
    AdminAction,
    /// An introspection request (RFC 7662), with its answer.
    Introspected,
    /// A request was forwarded by the proxy.
    ProxyRequest,
    /// The proxy refused a request.
    ProxyDenied,
    /// The log's oldest records were archived and are being deleted
    /// (`cistern audit prune`); the record names the last one and its hash,
    /// which vouches for the log starting after it.
    AuditPruned,
}

impl AuditKind {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::ExchangeGranted => "exchange_granted",
            AuditKind::ExchangeDenied => "exchange_denied",
            AuditKind::ExchangeDryRun => "exchange_dry_run",
            AuditKind::PolicyLoaded => "policy_loaded",
            AuditKind::PolicyRejected => "policy_rejected",
            AuditKind::KeyRotated => "key_rotated",
            AuditKind::TokenRevoked => "token_revoked",
            AuditKind::CredentialExpired => "credential_expired",
            AuditKind::Offboarded => "offboarded",
            AuditKind::Reenabled => "reenabled",
            AuditKind::AdminAction => "admin_action",
            AuditKind::Introspected => "introspected",
            AuditKind::ProxyRequest => "proxy_request",
            AuditKind::ProxyDenied => "proxy_denied",
            AuditKind::AuditPruned => "audit_pruned",
        }
    }
}

/// The structured detail of an audit record, serialized once where it is
/// built (from a typed struct, without an intermediate JSON map) and
/// stored as is.
#[derive(Debug, Clone)]
pub struct AuditDetail(Box<serde_json::value::RawValue>);

impl AuditDetail {
    /// Serializes `value`. A value that cannot be JSON (a map with non-string
    /// keys) is recorded as such rather than lost.
    pub fn from_serialize<T: Serialize + ?Sized>(value: &T) -> Self {
        match serde_json::value::to_raw_value(value) {
            Ok(raw) => Self(raw),
            Err(e) => Self::from(serde_json::json!({ "unencodable_detail": e.to_string() })),
        }
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The JSON value, unparsed.
    pub fn raw(&self) -> &serde_json::value::RawValue {
        &self.0
    }
}

impl From<serde_json::Value> for AuditDetail {
    fn from(value: serde_json::Value) -> Self {
        Self::from_serialize(&value)
    }
}

impl Serialize for AuditDetail {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// One audit record. `detail` carries the reason and the claims that
/// decided; it never holds a token or a secret (hashes and `jti`s only).
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    /// When it happened (ms).
    pub at_ms: i64,
    /// What happened.
    pub kind: AuditKind,
    /// Configured issuer name, when a token was involved.
    pub issuer: Option<String>,
    /// Role requested or granted.
    pub role: Option<String>,
    /// Project id the token named (`job_project_id`, else `project_id`).
    pub project_id: Option<String>,
    /// Machine-readable reason code for denials (`bad_signature`, `binding_mismatch`, …).
    pub reason: Option<String>,
    /// Structured detail: the deciding claims, the trace, the error.
    pub detail: AuditDetail,
}

/// Where a downstream credential lives and how to revoke it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DownstreamRecord {
    /// Configured provider name.
    pub provider: String,
    /// Where it was minted (a GitLab project id).
    pub target: String,
    /// The provider's id for it.
    pub external_id: String,
    /// When the provider itself would expire it (ms).
    pub provider_expires_at_ms: i64,
}

/// A downstream credential not yet revoked, with what it was issued to.
#[derive(Debug, Clone)]
pub struct OutstandingDownstream {
    /// The identity it was issued to.
    pub identity: Identity,
    /// The credential as recorded (`expires_at_ms` is cistern's lifetime).
    pub token: IssuedToken,
    /// Where it lives.
    pub downstream: DownstreamRecord,
}

/// A granted exchange, recorded atomically: the replay entry (if replay
/// protection is on), the credential, the identity sighting and the audit
/// event all land, or none does.
#[derive(Debug, Clone)]
pub struct ExchangeRecord {
    /// The consumed ID token; `None` when the issuer has replay protection off.
    pub replay: Option<ReplayEntry>,
    /// The pipeline identity.
    pub identity: Identity,
    /// The credential issued.
    pub token: IssuedToken,
    /// The audit event (`exchange_granted`).
    pub audit: AuditEvent,
    /// For a downstream credential: where it lives (kept until revoked).
    pub downstream: Option<DownstreamRecord>,
}

/// A row of the audit log as stored.
#[derive(Debug, Clone, Serialize)]
pub struct StoredAudit {
    /// Sequence number, strictly increasing.
    pub seq: i64,
    /// When it happened (ms).
    pub at_ms: i64,
    /// Kind, as stored.
    pub kind: String,
    /// Issuer name.
    pub issuer: Option<String>,
    /// Role.
    pub role: Option<String>,
    /// Project id.
    pub project_id: Option<String>,
    /// Reason code.
    pub reason: Option<String>,
    /// Detail JSON.
    pub detail: serde_json::Value,
}

/// A row of the identity inventory as stored.
#[derive(Debug, Clone, Serialize)]
pub struct StoredIdentity {
    /// The identity.
    #[serde(flatten)]
    pub identity: Identity,
    /// First exchange (ms).
    pub first_seen_ms: i64,
    /// Last exchange (ms).
    pub last_used_ms: i64,
    /// Credentials issued to it so far.
    pub exchanges: i64,
}

/// The newest record of the audit chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditHead {
    /// Its sequence number.
    pub seq: i64,
    /// Its hash.
    pub hash: [u8; 32],
}

/// The chain head and how far signed checkpoints reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditStatus {
    /// `None` for an empty log.
    pub head: Option<AuditHead>,
    /// Sequence number of the newest checkpoint.
    pub last_checkpoint: Option<i64>,
}

/// What a store's writer has done since it started, for `/metrics`.
/// Counters only ever grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Write requests answered (including replays and failures).
    pub requests: u64,
    /// Transactions committed; `requests / commits` is the mean batch size.
    pub commits: u64,
    /// Batches whose transaction failed as a whole (every request in them
    /// was refused).
    pub failed_batches: u64,
    /// Batches an audit sink failed to write (the sink misses them; with
    /// `fail_closed` their requests were refused too).
    pub sink_failures: u64,
    /// Time spent running and committing batches, in nanoseconds: with
    /// `commits`, the mean time a batch holds its requests.
    pub batch_nanos: u64,
}

/// Where records go. All writes are durable when the future resolves
/// (cistern answers the client only after that).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The writer's counters so far (cheap: read on every `/metrics` scrape).
    fn stats(&self) -> StoreStats;

    /// Records a granted exchange atomically. Returns [`StoreError::Replay`]
    /// when `record.replay` names an ID token already consumed (and then
    /// writes nothing).
    async fn commit_exchange(&self, record: ExchangeRecord) -> Result<(), StoreError>;

    /// Appends one audit event (denials, dry runs, policy loads, key rotation).
    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError>;

    /// Appends several audit records in one write (in order): for records
    /// nobody waits on one by one (the proxy's).
    async fn append_audits(&self, events: Vec<AuditEvent>) -> Result<(), StoreError>;

    /// Deletes up to `limit` of the oldest audit records with `seq <=
    /// through_seq`, and the signed checkpoints up to it; returns how many
    /// records went (0 when none are left). Refused unless record
    /// `vouched_by` is the `audit_pruned` record naming `through_seq`: the
    /// log may only lose a prefix that record vouches for.
    async fn prune_audit(
        &self,
        through_seq: i64,
        vouched_by: i64,
        limit: u32,
    ) -> Result<u64, StoreError>;

    /// Deletes replay entries that expired before `now_ms`; returns how many.
    async fn prune_replay(&self, now_ms: i64) -> Result<u64, StoreError>;

    /// Checks the store answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// The most recent audit events, newest last, at most `limit`.
    async fn recent_audit(&self, limit: usize) -> Result<Vec<StoredAudit>, StoreError>;

    /// Issued credentials, newest last, at most `limit`.
    async fn issued_tokens(&self, limit: usize)
    -> Result<Vec<(Identity, IssuedToken)>, StoreError>;

    /// The identity inventory.
    async fn identities(&self) -> Result<Vec<StoredIdentity>, StoreError>;

    // --- credential lifecycle (revocation, offboarding) ---

    /// Records a revocation rule and its `token_revoked` audit event in one
    /// transaction; returns the rule's id.
    async fn record_revocation(&self, new: NewRevocation) -> Result<i64, StoreError>;

    /// Sets `effective_at_ms` on the rules with `after_id < id <= up_to_id`
    /// that no server has marked yet; returns how many this call set.
    async fn mark_revocations_effective(
        &self,
        after_id: i64,
        up_to_id: i64,
        at_ms: i64,
    ) -> Result<u64, StoreError>;

    /// At most `limit` rules with an id above `after_id`, in id order
    /// (`0` for the first page).
    async fn revocations_since(
        &self,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<StoredRevocation>, StoreError>;

    /// jtis of unexpired issued credentials that `rule` covers.
    async fn outstanding_for_rule(
        &self,
        rule: &RevocationRule,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError>;

    /// Puts a block in force and records the revocation of everything
    /// outstanding for it, with both audit events, in one transaction;
    /// returns the rule's id.
    async fn offboard(&self, block: Block, revocation: NewRevocation) -> Result<i64, StoreError>;

    /// Lifts a block (audited); returns whether one was in force.
    async fn reenable(
        &self,
        block: Block,
        actor: String,
        reason: String,
        at_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Blocks in force.
    async fn offboarded(&self) -> Result<Vec<StoredBlock>, StoreError>;

    /// One issued credential by its `jti`.
    async fn issued_token(&self, jti: &str) -> Result<Option<(Identity, IssuedToken)>, StoreError>;

    // --- downstream credentials ---

    /// Downstream credentials not yet revoked, soonest expiry first, at
    /// most `limit`.
    async fn outstanding_downstream(
        &self,
        limit: usize,
    ) -> Result<Vec<OutstandingDownstream>, StoreError>;

    /// Records that a downstream credential was revoked at the provider
    /// (`cause`: `expired`, `revoked`, `reconciled`), with its audit event,
    /// in one transaction. A second call for the same jti changes nothing.
    async fn downstream_revoked(
        &self,
        jti: &str,
        at_ms: i64,
        cause: &str,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;

    /// Notes (durably, before minting) that `provider` may hold credentials
    /// on `target`.
    async fn note_downstream_target(
        &self,
        provider: &str,
        target: &str,
        at_ms: i64,
    ) -> Result<(), StoreError>;

    /// Every target noted for `provider`.
    async fn downstream_targets(&self, provider: &str) -> Result<Vec<String>, StoreError>;

    /// Whether an ID token's `jti` was already exchanged (a read, before a
    /// downstream mint; the commit still enforces it).
    async fn replay_consumed(&self, entry: &ReplayEntry) -> Result<bool, StoreError>;

    /// A downstream credential by `jti`, with when it was revoked (if it was).
    async fn downstream(
        &self,
        jti: &str,
    ) -> Result<Option<(OutstandingDownstream, Option<i64>)>, StoreError>;

    // --- cistern's own provider credentials ---

    /// The sealed credential stored for `provider`, with its expiry date.
    async fn sealed_credential(
        &self,
        provider: &str,
    ) -> Result<Option<(crate::provider::sealed::Sealed, Option<String>)>, StoreError>;

    /// Replaces the sealed credential of `provider` and appends `audit`, in
    /// one transaction.
    async fn save_sealed_credential(
        &self,
        provider: &str,
        sealed: crate::provider::sealed::Sealed,
        expires_on: Option<String>,
        audit: AuditEvent,
    ) -> Result<(), StoreError>;

    // --- the audit chain ---

    /// The chain head (committed) and the newest checkpoint.
    async fn audit_head(&self) -> Result<AuditStatus, StoreError>;

    /// Records `credential_expired` for at most `limit` issued credentials
    /// that expired at or before `now_ms` and have no such record yet;
    /// returns how many (a full `limit` means more are waiting).
    async fn sweep_expired(&self, now_ms: i64, limit: u32) -> Result<u64, StoreError>;

    /// Stores a signed checkpoint; refused unless record `seq` exists with
    /// that hash.
    async fn append_checkpoint(
        &self,
        checkpoint: crate::audit::record::CheckpointLine,
    ) -> Result<(), StoreError>;
}
