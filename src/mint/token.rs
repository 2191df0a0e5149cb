//! The RFC 9068 access token cistern mints.
//!
//! Header `{"alg","kid","typ":"at+jwt"}`. Claims, in this order: `iss`,
//! `sub` and `client_id` (both `"<issuer name>:project:<project id>"`, the
//! project the job runs in), `aud`, `exp`, `iat`, `nbf`, `jti` (UUID v7),
//! `scope` (space-separated), `role`, `owner`, and `pipeline`: where the
//! token came from, with GitLab ids as strings.

use std::fmt;

use serde::{Serialize, Serializer};
use uuid::{NoContext, Timestamp, Uuid};

use super::keys::{AT_JWT, KeyError, KeyRing};
use crate::oidc::VerifiedIdToken;
use crate::oidc::claims::GitLabId;
use crate::policy::Grant;

/// A signed access token and the facts about it that are recorded and returned.
#[derive(Clone, PartialEq, Eq)]
pub struct MintedToken {
    /// The compact JWS. A bearer secret: never log it (log `jti`).
    pub access_token: String,
    /// The token's `jti` (UUID v7).
    pub jti: String,
    /// `iat`, seconds since the epoch.
    pub issued_at: i64,
    /// `exp`, seconds since the epoch.
    pub expires_at: i64,
    /// The `scope` claim: granted scopes, space-separated.
    pub scope: String,
    /// The `aud` claim.
    pub audience: String,
    /// The key that signed it.
    pub kid: String,
}

impl fmt::Debug for MintedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MintedToken")
            .field("access_token", &"<redacted>")
            .field("jti", &self.jti)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("scope", &self.scope)
            .field("audience", &self.audience)
            .field("kid", &self.kid)
            .finish()
    }
}

/// Why a token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// The key ring could not sign.
    #[error("signing failed: {0}")]
    Key(#[from] KeyError),
    /// `now` is before the epoch, or `now + ttl` overflows.
    #[error("timestamp out of range")]
    Time,
    /// The claims could not be serialized.
    #[error("cannot serialize claims: {0}")]
    Serialize(String),
}

/// The claims as serialized: borrowed, in a fixed member order.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: i64,
    iat: i64,
    nbf: i64,
    jti: &'a str,
    client_id: &'a str,
    scope: &'a str,
    role: &'a str,
    owner: &'a str,
    pipeline: Pipeline<'a>,
}

#[derive(Serialize)]
struct Pipeline<'a> {
    issuer: &'a str,
    issuer_url: &'a str,
    #[serde(serialize_with = "id_str")]
    project_id: GitLabId,
    project_path: &'a str,
    #[serde(serialize_with = "id_str")]
    namespace_id: GitLabId,
    namespace_path: &'a str,
    /// The project the job runs in (`job_project_id`, else `project_id`).
    #[serde(serialize_with = "id_str")]
    job_project_id: GitLabId,
    #[serde(rename = "ref")]
    git_ref: &'a str,
    ref_type: &'static str,
    ref_protected: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    environment: Option<&'a str>,
    #[serde(serialize_with = "id_str")]
    pipeline_id: GitLabId,
    #[serde(serialize_with = "id_str")]
    job_id: GitLabId,
    sha: &'a str,
    id_token_jti: &'a str,
}

fn id_str<S: Serializer>(id: &GitLabId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// Mints the access token a [`Grant`] allows, for the job `token` names,
/// signed with the ring's current key. `issuer` is cistern's own issuer URL.
pub fn mint(
    ring: &KeyRing,
    issuer: &str,
    grant: &Grant,
    token: &VerifiedIdToken,
    now_secs: i64,
) -> Result<MintedToken, MintError> {
    let ttl = i64::try_from(grant.ttl.as_secs()).map_err(|_| MintError::Time)?;
    let expires_at = now_secs.checked_add(ttl).ok_or(MintError::Time)?;
    let unix_secs = u64::try_from(now_secs).map_err(|_| MintError::Time)?;
    // v7 with the injected clock: time-ordered for index locality, 74 random bits.
    let jti = Uuid::new_v7(Timestamp::from_unix(NoContext, unix_secs, 0)).to_string();

    let c = &token.claims;
    let subject = format!("{}:project:{}", token.issuer, c.effective_project_id());
    let scope = grant.scopes.join(" ");
    let claims = Claims {
        iss: issuer,
        sub: &subject,
        aud: &grant.audience,
        exp: expires_at,
        iat: now_secs,
        nbf: now_secs,
        jti: &jti,
        client_id: &subject,
        scope: &scope,
        role: &grant.role,
        owner: &grant.owner,
        pipeline: Pipeline {
            issuer: &token.issuer,
            issuer_url: &c.iss,
            project_id: c.project_id,
            project_path: &c.project_path,
            namespace_id: c.namespace_id,
            namespace_path: &c.namespace_path,
            job_project_id: c.effective_project_id(),
            git_ref: &c.git_ref,
            ref_type: c.ref_type.as_str(),
            ref_protected: c.ref_protected.0,
            environment: c.environment.as_deref(),
            pipeline_id: c.pipeline_id,
            job_id: c.job_id,
            sha: &c.sha,
            id_token_jti: &c.jti,
        },
    };
    let payload = serde_json::to_vec(&claims).map_err(|e| MintError::Serialize(e.to_string()))?;
    // The kid comes from the same snapshot that signed, so a concurrent
    // rotation cannot make the record disagree with the header.
    let (access_token, kid) = ring.sign_compact_with_kid(AT_JWT, &payload)?;
    Ok(MintedToken {
        access_token,
        jti,
        issued_at: now_secs,
        expires_at,
        scope,
        audience: grant.audience.to_string(),
        kid,
    })
}
