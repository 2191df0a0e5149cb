//! Stage 2 — decide: a [`VerifiedIdToken`](crate::oidc::VerifiedIdToken) and
//! the job's request in, a [`Grant`] or a [`Denial`] out.
//!
//! Policy files (one role per file) are parsed strictly into a `PolicySpec`,
//! checked against the operator's ceiling and compiled once (globs and CEL)
//! into a `CompiledPolicy`; requests only ever run compiled policies.
//!
//! Policy file format (TOML, one role per file, `deny_unknown_fields`
//! everywhere; see `examples/policies/`):
//!
//! ```toml
//! role = "deploy-production"   # unique across the directory; [a-z0-9-_.]+
//! owner = "team-payments"      # required
//! description = "…"            # optional
//! issuer = "gitlab"            # configured, and allowed by [ceiling].issuers
//! condition = 'claims.user_access_level in ["maintainer", "owner"]'  # optional CEL
//! # allow_fork_merge_requests = true  # needs ceiling.allow_fork_opt_in
//!
//! [bindings]                   # all must match; a list means any-of
//! project_id = "42"            # ids: exact, string or integer; one immutable id is required
//! ref = ["main", "release/*"]  # `*` matches within one `/` segment, anchored
//! ref_protected = true         # booleans are TOML booleans
//!
//! [grant]
//! kind = "access_token"
//! audience = "https://deploy.example.com"
//! scopes = ["deploy:read", "deploy:write"]
//! ttl = "10m"
//! ```
//!
//! Decisions: the fork guard denies possible fork merge-request pipelines
//! unless the role opts out; every binding must match (an absent claim
//! fails); the CEL condition runs only then, and anything but `true`
//! denies. See [`PolicySet::decide`] for request narrowing.

mod compile;
mod condition;
mod decide;
mod glob;
mod reload;
mod set;

pub use compile::{CompiledPolicy, OAUTH2_NO_RESOURCE};
pub use decide::{Check, Denial, RoleRequest, RoleTrace, render_traces};
pub use reload::{PolicyStore, ReloadOutcome, spawn_reloader};
pub use set::{PolicyErrors, PolicySet, fingerprint_dir};

use std::sync::Arc;
use std::time::Duration;

/// What kind of credential a grant issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// cistern's own signed JWT access token (RFC 9068).
    AccessToken,
    /// A GitLab project access token for the project the job runs in,
    /// minted by a configured `gitlab` provider, revoked when `ttl` ends.
    GitlabProjectToken,
    /// An OAuth 2.0 access token from a configured client-credentials
    /// provider (the company IdP); its lifetime is the IdP's.
    Oauth2AccessToken,
}

impl CredentialKind {
    /// The policy-file spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::AccessToken => "access_token",
            CredentialKind::GitlabProjectToken => "gitlab_project_token",
            CredentialKind::Oauth2AccessToken => "oauth2_access_token",
        }
    }
}

/// One binding that matched, for the audit record ("the claims that decided").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MatchedBinding {
    /// Claim name.
    pub claim: &'static str,
    /// The token's value, as text.
    pub value: String,
    /// The policy's pattern that matched it.
    pub pattern: String,
}

/// Proof that a policy allowed a request. Only `policy` can build one, so
/// minting without a decision does not compile.
#[derive(Debug, Clone)]
// `_proof` is a capability, not a future-proofing marker.
#[allow(clippy::manual_non_exhaustive)]
pub struct Grant {
    /// The role granted.
    pub role: Arc<str>,
    /// The owner of the role (team or person).
    pub owner: Arc<str>,
    /// The policy file it came from.
    pub policy_file: Arc<str>,
    /// Credential kind to mint.
    pub kind: CredentialKind,
    /// Audience of the minted token.
    pub audience: Arc<str>,
    /// Scopes granted: the role's scopes, narrowed to the request's.
    pub scopes: Vec<String>,
    /// Lifetime of the minted credential (already bounded by the ceiling).
    pub ttl: Duration,
    /// For a downstream credential: the provider that mints it.
    pub provider: Option<Arc<str>>,
    /// For a GitLab token: the access level (10 Guest .. 50 Owner).
    pub access_level: u8,
    /// For a GitLab token: where it is minted, when the policy names a
    /// place (`"42"` a project, `"group:7"` a group); `None` = the job's project.
    pub downstream_target: Option<Arc<str>>,
    /// The bindings that matched, for the audit record.
    pub matched: Vec<MatchedBinding>,
    /// Whether a CEL condition was evaluated (and was true).
    pub condition_checked: bool,
    pub(crate) _proof: (),
}
