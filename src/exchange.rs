//! The token exchange, end to end: verify → decide → mint → record.
//!
//! [`Exchanger::exchange`] is the whole flow in one readable function. Each
//! stage hands the next a proof type (`VerifiedIdToken` → `Grant` →
//! `MintedToken`), and every outcome, granted or denied, is written to the
//! store *before* the caller sees it.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use serde_json::json;

use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::mint::{KeyRing, MintError, MintedToken, mint, new_jti};
use crate::oidc::claims::{GitLabClaims, GitLabId};
use crate::oidc::{Issuers, VerifiedIdToken, VerifyError};
use crate::policy::{
    CredentialKind, Denial, Grant, MatchedBinding, PolicyStore, RoleRequest, RoleTrace,
};
use crate::provider::{MintRequest, ProviderError, Providers};
use crate::revoke::{BlockGrain, RevocationSet};
use crate::store::{
    AuditDetail, AuditEvent, AuditKind, DownstreamRecord, ExchangeRecord, Identity, IssuedToken,
    ReplayEntry, Store, StoreError,
};

/// What the job asked for.
#[derive(Debug, Clone, Default)]
pub struct ExchangeRequest {
    /// The role, if named.
    pub role: Option<String>,
    /// The audience, if named.
    pub audience: Option<String>,
    /// A subset of the role's scopes, if named.
    pub scopes: Option<Vec<String>>,
}

/// Why an exchange did not produce a credential.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The subject token failed verification.
    #[error("subject token refused: {0}")]
    Verify(#[from] VerifyError),
    /// Policy refused the request.
    #[error("denied: {}", .0.code())]
    Denied(Denial),
    /// The subject token was already exchanged.
    #[error("subject token replayed")]
    Replay,
    /// The identity is offboarded: new exchanges are blocked until re-enabled.
    #[error("identity offboarded ({})", .0.as_str())]
    Offboarded(BlockGrain),
    /// Minting failed (a server fault).
    #[error("mint failed: {0}")]
    Mint(#[from] MintError),
    /// The store failed; nothing was issued (a server fault).
    #[error("store failed: {0}")]
    Store(StoreError),
    /// The downstream provider did not mint the credential.
    #[error("downstream: {0}")]
    Downstream(ProviderError),
}

/// The result of a dry run: what would happen, with nothing issued.
#[derive(Debug, Clone, Serialize)]
pub struct DryRunReport {
    /// Always true.
    pub dry_run: bool,
    /// The configured issuer that verified the token.
    pub issuer: String,
    /// Whether the request, as made, would be granted.
    pub would_grant: bool,
    /// The role that would be granted.
    pub role: Option<String>,
    /// Scopes that would be granted.
    pub scopes: Vec<String>,
    /// Why not, when it would be denied (the code and the job-facing text).
    pub denial: Option<DenialSummary>,
    /// Every role evaluated against the token.
    pub traces: Vec<RoleTrace>,
}

/// A denial, as shown in a dry run.
#[derive(Debug, Clone, Serialize)]
pub struct DenialSummary {
    /// Reason code.
    pub code: String,
    /// Job-facing description.
    pub description: String,
}

/// Everything the exchange needs, injected.
pub struct Exchanger {
    /// Trusted issuers.
    pub issuers: Arc<Issuers>,
    /// Policies in force.
    pub policies: Arc<PolicyStore>,
    /// Signing keys.
    pub keys: Arc<KeyRing>,
    /// Records.
    pub store: Arc<dyn Store>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// cistern's own issuer URL.
    pub issuer_url: String,
    /// Per configured issuer: whether replay protection is on.
    pub replay_protection: HashMap<String, bool>,
    /// Revoked credentials and offboarding blocks (checked in memory).
    pub revocations: Arc<RevocationSet>,
    /// Downstream credential providers.
    pub providers: Providers,
}

impl Exchanger {
    /// Exchanges a GitLab ID token for a cistern access token.
    pub async fn exchange(
        &self,
        subject_token: &str,
        req: &ExchangeRequest,
    ) -> Result<MintedToken, ExchangeError> {
        let now_ms = self.clock.now_millis();
        let verified = match self.issuers.verify(subject_token).await {
            Ok(v) => v,
            Err(e) => {
                self.audit_denied(
                    now_ms,
                    None,
                    req,
                    e.code(),
                    json!({ "error": e.to_string(), "token_sha256": token_hash(subject_token) }),
                )
                .await?;
                return Err(e.into());
            }
        };
        let grant = match self
            .policies
            .current()
            .decide(&verified, &role_request(req))
        {
            Ok(g) => g,
            Err(denial) => {
                let mut detail = json!({ "description": denial.public_description(), "subject": SubjectRef::of(&verified), "claims": &verified.claims, "request": RequestSummary::of(req) });
                if let Denial::NotPermitted { trace, .. } = &denial {
                    detail["trace"] = serde_json::to_value(trace).unwrap_or_default();
                }
                self.audit_denied(now_ms, Some(&verified), req, denial.code(), detail)
                    .await?;
                return Err(ExchangeError::Denied(denial));
            }
        };
        if let Some(grain) = self.offboarded(&verified, &grant.role) {
            let detail = json!({ "description": "identity offboarded", "block": grain.as_str(), "subject": subject_summary(&verified) });
            self.audit_denied(now_ms, Some(&verified), req, "offboarded", detail)
                .await?;
            return Err(ExchangeError::Offboarded(grain));
        }
        let (minted, downstream) = match grant.kind {
            CredentialKind::AccessToken => (
                mint(&self.keys, &self.issuer_url, &grant, &verified, now_ms)?,
                None,
            ),
            CredentialKind::GitlabProjectToken | CredentialKind::Oauth2AccessToken => {
                match self.mint_downstream(&verified, req, &grant, now_ms).await? {
                    Some(pair) => (pair.0, Some(pair.1)),
                    None => return Err(ExchangeError::Replay),
                }
            }
        };
        let mut record = self.record(&verified, req, &grant, &minted, now_ms);
        record.downstream = downstream.clone();
        let outcome = self.store.commit_exchange(record).await;
        if outcome.is_err()
            && let Some(d) = downstream
        {
            // Not recorded, never handed out: revoke it now (reconciliation
            // catches it if this fails too).
            self.revoke_unrecorded(&d, &minted.jti);
        }
        match outcome {
            Ok(()) => Ok(minted),
            Err(StoreError::Replay) => {
                let detail = json!({ "description": "subject_token has already been exchanged", "subject": SubjectRef::of(&verified), "claims": &verified.claims, "request": RequestSummary::of(req) });
                self.audit_denied(now_ms, Some(&verified), req, "replay", detail)
                    .await?;
                Err(ExchangeError::Replay)
            }
            Err(e) => Err(ExchangeError::Store(e)),
        }
    }

    /// Evaluates the request against the policies without issuing anything;
    /// the subject token is not consumed. Audited as a dry run.
    pub async fn dry_run(
        &self,
        subject_token: &str,
        req: &ExchangeRequest,
    ) -> Result<DryRunReport, ExchangeError> {
        let now_ms = self.clock.now_millis();
        let verified = match self.issuers.verify(subject_token).await {
            Ok(v) => v,
            Err(e) => {
                self.audit_denied(now_ms, None, req, e.code(), json!({ "dry_run": true, "error": e.to_string(), "token_sha256": token_hash(subject_token) }))
                    .await?;
                return Err(e.into());
            }
        };
        let policies = self.policies.current();
        let decision = policies.decide(&verified, &role_request(req));
        let traces = policies.explain(&verified.issuer, &verified.claims, req.role.as_deref());
        // What the exchange would refuse after a granting decision: an
        // offboarded identity, or an ID token already exchanged.
        let refused = match &decision {
            Ok(g) => self.refused_after_decision(&verified, &g.role).await?,
            Err(_) => None,
        };
        let report = DryRunReport {
            dry_run: true,
            issuer: verified.issuer.to_string(),
            would_grant: decision.is_ok() && refused.is_none(),
            role: match &decision {
                Ok(g) => Some(g.role.to_string()),
                Err(d) => d.role().map(str::to_owned).or_else(|| req.role.clone()),
            },
            scopes: match (&decision, &refused) {
                (Ok(g), None) => g.scopes.clone(),
                _ => Vec::new(),
            },
            denial: match (&decision, refused) {
                (Err(d), _) => Some(DenialSummary {
                    code: d.code().to_owned(),
                    description: d.public_description(),
                }),
                (Ok(_), refused) => refused,
            },
            traces,
        };
        let event = AuditEvent {
            at_ms: now_ms,
            kind: AuditKind::ExchangeDryRun,
            issuer: Some(verified.issuer.to_string()),
            role: report.role.clone(),
            project_id: Some(verified.claims.effective_project_id().to_string()),
            reason: report.denial.as_ref().map(|d| d.code.clone()),
            detail: json!({ "would_grant": report.would_grant, "subject": subject_summary(&verified), "traces": &report.traces })
                .into(),
        };
        self.store
            .append_audit(event)
            .await
            .map_err(ExchangeError::Store)?;
        Ok(report)
    }

    /// For a dry run: the refusal an exchange granted by policy would still
    /// meet (offboarding, then replay), with the code and text the real
    /// exchange answers.
    async fn refused_after_decision(
        &self,
        v: &VerifiedIdToken,
        role: &str,
    ) -> Result<Option<DenialSummary>, ExchangeError> {
        if let Some(grain) = self.offboarded(v, role) {
            return Ok(Some(DenialSummary {
                code: "offboarded".into(),
                description: format!("{OFFBOARDED_DESCRIPTION} ({} block)", grain.as_str()),
            }));
        }
        if let Some(entry) = self.replay_entry(v)
            && self
                .store
                .replay_consumed(&entry)
                .await
                .map_err(ExchangeError::Store)?
        {
            return Ok(Some(DenialSummary {
                code: "replay".into(),
                description: REPLAY_DESCRIPTION.into(),
            }));
        }
        Ok(None)
    }

    /// The block, if any, on this identity: O(1), in memory. Both namespace
    /// ids count (the job's and the token's differ in fork pipelines).
    fn offboarded(&self, v: &VerifiedIdToken, role: &str) -> Option<BlockGrain> {
        let c = &v.claims;
        let project = c.effective_project_id().to_string();
        let ns = c.namespace_id.to_string();
        let job_ns = c.job_namespace_id.map(|n| n.to_string());
        let mut namespaces = vec![ns.as_str()];
        namespaces.extend(job_ns.as_deref());
        self.revocations
            .blocked(&v.issuer, &project, &namespaces, role)
    }

    /// Mints a downstream credential for the job's project. `None` when the
    /// ID token was already exchanged (checked before asking the provider,
    /// so a replayed token cannot make it mint).
    async fn mint_downstream(
        &self,
        v: &VerifiedIdToken,
        req: &ExchangeRequest,
        grant: &Grant,
        now_ms: i64,
    ) -> Result<Option<(MintedToken, DownstreamRecord)>, ExchangeError> {
        let c = &v.claims;
        let replay = self.replay_entry(v);
        if let Some(entry) = &replay
            && self
                .store
                .replay_consumed(entry)
                .await
                .map_err(ExchangeError::Store)?
        {
            let detail = json!({ "description": "subject_token has already been exchanged", "subject": SubjectRef::of(v), "claims": &v.claims, "request": RequestSummary::of(req) });
            self.audit_denied(now_ms, Some(v), req, "replay", detail)
                .await?;
            return Ok(None);
        }
        let name = grant.provider.as_deref().unwrap_or_default();
        let provider = self.providers.get(name).ok_or_else(|| {
            ExchangeError::Downstream(ProviderError::Credential {
                provider: name.to_owned(),
                message: "not configured".into(),
            })
        })?;
        // Where the credential lives: the job's project (GitLab), or the
        // resource indicator asked of the IdP (`""` for none).
        let target = match grant.kind {
            CredentialKind::Oauth2AccessToken => {
                if grant
                    .audience
                    .starts_with(crate::policy::OAUTH2_NO_RESOURCE)
                {
                    String::new()
                } else {
                    grant.audience.to_string()
                }
            }
            _ => grant
                .downstream_target
                .as_deref()
                .map_or_else(|| c.effective_project_id().to_string(), str::to_owned),
        };
        // Durable before the provider is asked: a crash after it mints
        // leaves a target that reconciliation lists.
        self.store
            .note_downstream_target(name, &target, now_ms)
            .await
            .map_err(ExchangeError::Store)?;
        let jti = new_jti(now_ms).ok_or(ExchangeError::Mint(MintError::Time))?;
        let description = format!(
            "cistern {role} for job {job} (pipeline {pipeline}, {path}); jti {jti}",
            role = grant.role,
            job = c.job_id,
            pipeline = c.pipeline_id,
            path = c.job_project_path.as_deref().unwrap_or(&c.project_path),
        );
        let minted = provider
            .mint(&MintRequest {
                jti: &jti,
                target: &target,
                scopes: &grant.scopes,
                access_level: grant.access_level,
                ttl: grant.ttl,
                now_ms,
                description,
            })
            .await;
        let minted = match minted {
            Ok(m) => m,
            Err(e) => {
                let reason = match &e {
                    ProviderError::Refused { .. } => "downstream_refused",
                    ProviderError::Unavailable { .. } => "downstream_unavailable",
                    ProviderError::NeedsAuthorization { .. } => "downstream_needs_authorization",
                    _ => "downstream_error",
                };
                let detail = json!({ "description": e.to_string(), "provider": name, "target": target, "subject": SubjectRef::of(v), "claims": &v.claims, "request": RequestSummary::of(req) });
                self.audit_denied(now_ms, Some(v), req, reason, detail)
                    .await?;
                return Err(ExchangeError::Downstream(e));
            }
        };
        let now_secs = now_ms.div_euclid(1000);
        let ttl = i64::try_from(grant.ttl.as_secs()).map_err(|_| MintError::Time)?;
        // cistern enforces a GitLab token's lifetime itself; an IdP token's
        // lifetime is the IdP's.
        let expires_at = match grant.kind {
            CredentialKind::Oauth2AccessToken => minted.provider_expires_at_ms.div_euclid(1000),
            _ => now_secs.saturating_add(ttl),
        };
        let token = MintedToken {
            access_token: minted.secret.to_string(),
            jti: jti.clone(),
            issued_at: now_secs,
            expires_at,
            scope: grant.scopes.join(" "),
            audience: grant.audience.to_string(),
            kid: String::new(),
            kind: grant.kind,
        };
        let record = DownstreamRecord {
            provider: name.to_owned(),
            target,
            external_id: minted.external_id,
            provider_expires_at_ms: minted.provider_expires_at_ms,
        };
        Ok(Some((token, record)))
    }

    /// Revokes a minted but unrecorded downstream credential, in the
    /// background (the caller is already failing).
    fn revoke_unrecorded(&self, d: &DownstreamRecord, jti: &str) {
        let Some(provider) = self.providers.get(&d.provider).cloned() else {
            return;
        };
        let (target, id, jti) = (d.target.clone(), d.external_id.clone(), jti.to_owned());
        tokio::spawn(async move {
            if let Err(e) = provider.revoke(&target, &id).await {
                tracing::error!(error = %e, jti = %jti, "revoking an unrecorded downstream credential failed; reconciliation will retry");
            }
        });
    }

    fn replay_entry(&self, v: &VerifiedIdToken) -> Option<ReplayEntry> {
        let c = &v.claims;
        self.replay_protection
            .get(&*v.issuer)
            .copied()
            .unwrap_or(true)
            .then(|| ReplayEntry {
                issuer: v.issuer.to_string(),
                jti: c.jti.clone(),
                expires_at_ms: c.exp.0.saturating_mul(1000),
            })
    }

    fn record(
        &self,
        v: &VerifiedIdToken,
        req: &ExchangeRequest,
        grant: &Grant,
        minted: &MintedToken,
        now_ms: i64,
    ) -> ExchangeRecord {
        let c = &v.claims;
        let replay = self.replay_entry(v);
        let identity = Identity {
            issuer: v.issuer.to_string(),
            project_id: c.effective_project_id().to_string(),
            namespace_id: c.job_namespace_id.unwrap_or(c.namespace_id).to_string(),
            role: grant.role.to_string(),
            project_path: c
                .job_project_path
                .clone()
                .unwrap_or_else(|| c.project_path.clone()),
            namespace_path: c
                .job_namespace_path
                .clone()
                .unwrap_or_else(|| c.namespace_path.clone()),
            owner: grant.owner.to_string(),
        };
        let token = IssuedToken {
            jti: minted.jti.clone(),
            kind: grant.kind.as_str().to_owned(),
            audience: minted.audience.clone(),
            scope: minted.scope.clone(),
            issued_at_ms: minted.issued_at.saturating_mul(1000),
            expires_at_ms: minted.expires_at.saturating_mul(1000),
            subject_jti: c.jti.clone(),
            pipeline_id: c.pipeline_id.to_string(),
            job_id: c.job_id.to_string(),
            git_ref: c.git_ref.clone(),
        };
        let audit = AuditEvent {
            at_ms: now_ms,
            kind: AuditKind::ExchangeGranted,
            issuer: Some(v.issuer.to_string()),
            role: Some(grant.role.to_string()),
            project_id: Some(identity.project_id.clone()),
            reason: None,
            detail: AuditDetail::from_serialize(&GrantDetail {
                jti: &minted.jti,
                owner: &grant.owner,
                policy_file: &grant.policy_file,
                audience: &minted.audience,
                scope: &minted.scope,
                expires_at: minted.expires_at,
                matched: &grant.matched,
                condition_checked: grant.condition_checked,
                subject: SubjectRef::of(v),
                claims: &v.claims,
                request: RequestSummary::of(req),
            }),
        };
        ExchangeRecord {
            replay,
            identity,
            token,
            audit,
            downstream: None,
        }
    }

    async fn audit_denied(
        &self,
        now_ms: i64,
        verified: Option<&VerifiedIdToken>,
        req: &ExchangeRequest,
        reason: &str,
        detail: serde_json::Value,
    ) -> Result<(), ExchangeError> {
        let event = AuditEvent {
            at_ms: now_ms,
            kind: AuditKind::ExchangeDenied,
            issuer: verified.map(|v| v.issuer.to_string()),
            role: req.role.clone(),
            project_id: verified.map(|v| v.claims.effective_project_id().to_string()),
            reason: Some(reason.to_owned()),
            detail: detail.into(),
        };
        self.store
            .append_audit(event)
            .await
            .map_err(ExchangeError::Store)
    }
}

fn role_request(req: &ExchangeRequest) -> RoleRequest {
    RoleRequest {
        role: req.role.clone(),
        audience: req.audience.clone(),
        scopes: req.scopes.clone(),
    }
}

/// What a job is told when its ID token was already exchanged.
pub const REPLAY_DESCRIPTION: &str =
    "subject_token has already been exchanged; each ID token can be used once";

/// What a job is told when its pipeline identity is offboarded.
pub const OFFBOARDED_DESCRIPTION: &str = "this pipeline identity has been offboarded; new tokens are refused until an administrator re-enables it";

/// SHA-256 of a token, hex: the only form a token takes in records and logs.
pub fn token_hash(token: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        token.as_bytes(),
    ))
}

/// The ID token behind a record that also carries its claims: only what
/// the claims do not say (records stay small: one granted exchange's record
/// fits half a database page).
#[derive(Serialize)]
struct SubjectRef<'a> {
    token_sha256: String,
    kid: &'a str,
}

impl<'a> SubjectRef<'a> {
    fn of(v: &'a VerifiedIdToken) -> Self {
        SubjectRef {
            token_sha256: hex::encode(v.token_sha256),
            kid: &v.kid,
        }
    }
}

/// The claims that identify the job, for audit records that do not carry
/// the claims themselves. No token, no secret.
#[derive(Serialize)]
struct SubjectSummary<'a> {
    iss: &'a str,
    jti: &'a str,
    token_sha256: String,
    kid: &'a str,
    project_id: GitLabId,
    project_path: &'a str,
    namespace_id: GitLabId,
    namespace_path: &'a str,
    job_project_id: Option<GitLabId>,
    pipeline_id: GitLabId,
    pipeline_source: &'a str,
    job_id: GitLabId,
    #[serde(rename = "ref")]
    git_ref: &'a str,
    ref_type: &'static str,
    ref_protected: bool,
    environment: Option<&'a str>,
    environment_protected: Option<bool>,
    user_id: Option<&'a str>,
    user_login: Option<&'a str>,
    sha: &'a str,
}

fn subject_summary(v: &VerifiedIdToken) -> SubjectSummary<'_> {
    let c = &v.claims;
    SubjectSummary {
        iss: &c.iss,
        jti: &c.jti,
        token_sha256: hex::encode(v.token_sha256),
        kid: &v.kid,
        project_id: c.project_id,
        project_path: &c.project_path,
        namespace_id: c.namespace_id,
        namespace_path: &c.namespace_path,
        job_project_id: c.job_project_id,
        pipeline_id: c.pipeline_id,
        pipeline_source: &c.pipeline_source,
        job_id: c.job_id,
        git_ref: &c.git_ref,
        ref_type: c.ref_type.as_str(),
        ref_protected: c.ref_protected.0,
        environment: c.environment.as_deref(),
        environment_protected: c.environment_protected.map(|b| b.0),
        user_id: c.user_id.as_deref(),
        user_login: c.user_login.as_deref(),
        sha: &c.sha,
    }
}

/// The audit detail of a granted exchange.
#[derive(Serialize)]
struct GrantDetail<'a> {
    jti: &'a str,
    owner: &'a str,
    policy_file: &'a str,
    audience: &'a str,
    scope: &'a str,
    expires_at: i64,
    matched: &'a [MatchedBinding],
    condition_checked: bool,
    subject: SubjectRef<'a>,
    /// Every verified claim, so `policy diff` can replay the request.
    claims: &'a GitLabClaims,
    request: RequestSummary<'a>,
}

/// What the job asked for, recorded with granted and denied exchanges so
/// `policy diff` can replay the request as it was made.
#[derive(Serialize)]
struct RequestSummary<'a> {
    role: Option<&'a str>,
    audience: Option<&'a str>,
    scopes: Option<&'a [String]>,
}

impl<'a> RequestSummary<'a> {
    fn of(req: &'a ExchangeRequest) -> Self {
        Self {
            role: req.role.as_deref(),
            audience: req.audience.as_deref(),
            scopes: req.scopes.as_deref(),
        }
    }
}
