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
    /// The key that signed it (empty for a downstream credential).
    pub kid: String,
    /// What it is.
    pub kind: crate::policy::CredentialKind,
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
            .field("kind", &self.kind)
            .finish()
    }
}

/// A credential id: a UUID v7 from the injected clock to the millisecond,
/// so the store's key on issued credentials grows at one edge (index
/// locality) and the issue time can be read back from it; 74 random bits.
/// `None` for a time before the epoch.
pub fn new_jti(now_ms: i64) -> Option<String> {
    let unix_secs = u64::try_from(now_ms.div_euclid(1000)).ok()?;
    let nanos = u32::try_from(now_ms.rem_euclid(1000) * 1_000_000).ok()?;
    Some(Uuid::new_v7(Timestamp::from_unix(NoContext, unix_secs, nanos)).to_string())
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
    /// Its namespace (`job_namespace_id`, else `namespace_id`): differs from
    /// `namespace_id` in fork merge-request pipelines.
    #[serde(serialize_with = "id_str")]
    job_namespace_id: GitLabId,
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
/// signed with the ring's current key. `issuer` is cistern's own issuer URL;
/// `now_ms` is the injected clock's time in milliseconds.
pub fn mint(
    ring: &KeyRing,
    issuer: &str,
    grant: &Grant,
    token: &VerifiedIdToken,
    now_ms: i64,
) -> Result<MintedToken, MintError> {
    let now_secs = now_ms.div_euclid(1000);
    let ttl = i64::try_from(grant.ttl.as_secs()).map_err(|_| MintError::Time)?;
    let expires_at = now_secs.checked_add(ttl).ok_or(MintError::Time)?;
    let jti = new_jti(now_ms).ok_or(MintError::Time)?;

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
            job_namespace_id: c.job_namespace_id.unwrap_or(c.namespace_id),
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
        kind: crate::policy::CredentialKind::AccessToken,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    use super::*;
    use crate::clock::ManualClock;
    use crate::config::SigningAlgorithm;
    use crate::mint::{fixtures, verify_access_token};

    const NOW: i64 = 1_767_225_700;
    const ISS: &str = "https://cistern.example.com";

    fn minted(alg: SigningAlgorithm) -> (tempfile::TempDir, KeyRing, MintedToken) {
        let tmp = tempfile::tempdir().unwrap();
        let ring = fixtures::key_ring(
            &tmp.path().join("keys"),
            alg,
            Arc::new(ManualClock::at_secs(NOW)),
        )
        .unwrap();
        let grant = fixtures::grant("https://deploy.example.com", Duration::from_secs(900));
        let token = fixtures::verified_id_token().unwrap();
        let minted = mint(&ring, ISS, &grant, &token, NOW * 1000).unwrap();
        (tmp, ring, minted)
    }

    fn segment(jws: &str, i: usize) -> serde_json::Value {
        let seg = jws.split('.').nth(i).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(seg).unwrap()).unwrap()
    }

    #[test]
    fn a_minted_token_verifies_and_carries_the_rfc_9068_claims() {
        for alg in [SigningAlgorithm::ES256, SigningAlgorithm::EdDSA] {
            let (_tmp, ring, m) = minted(alg);
            let header = segment(&m.access_token, 0);
            assert_eq!(
                header,
                serde_json::json!({"alg": alg.as_str(), "kid": ring.current_kid(), "typ": "at+jwt"})
            );
            assert_eq!(m.kid, ring.current_kid());
            assert_eq!((m.issued_at, m.expires_at), (NOW, NOW + 900));

            let c = verify_access_token(
                &ring,
                &m.access_token,
                ISS,
                Some("https://deploy.example.com"),
                NOW,
            )
            .unwrap();
            assert_eq!(c.iss, ISS);
            assert_eq!(c.sub, "gitlab:project:20");
            assert_eq!(c.client_id, c.sub);
            assert_eq!(c.aud, "https://deploy.example.com");
            assert_eq!((c.iat, c.nbf, c.exp), (NOW, NOW, NOW + 900));
            assert_eq!(c.jti, m.jti);
            assert_eq!(Uuid::parse_str(&c.jti).unwrap().get_version_num(), 7);
            assert_eq!(c.scope, "deploy:write artifacts:read");
            assert_eq!(c.scope, m.scope);
            assert_eq!(
                (c.role.as_str(), c.owner.as_str()),
                ("deploy", "team-platform")
            );
            let p = &c.pipeline;
            assert_eq!(p.issuer, "gitlab");
            assert_eq!(p.issuer_url, "https://gitlab.example.com");
            assert_eq!(
                (p.project_id.as_str(), p.namespace_id.as_str()),
                ("20", "72")
            );
            assert_eq!(p.job_project_id, "20");
            assert_eq!(p.job_namespace_id.as_deref(), Some("72"));
            assert_eq!(p.job_namespace(), "72");
            assert_eq!((p.pipeline_id.as_str(), p.job_id.as_str()), ("574", "302"));
            assert_eq!(
                (p.git_ref.as_str(), p.ref_type.as_str(), p.ref_protected),
                ("main", "branch", true)
            );
            assert_eq!(p.environment.as_deref(), Some("production"));
            assert_eq!(p.id_token_jti, "235b3a54-b797-45c7-ae9a-f72d7bc6ef5b");
        }
    }

    #[test]
    fn claims_are_serialized_in_a_fixed_order_with_ids_as_strings() {
        let (_tmp, _ring, m) = minted(SigningAlgorithm::ES256);
        let seg = m.access_token.split('.').nth(1).unwrap();
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(seg).unwrap()).unwrap();
        assert!(
            text.starts_with(
                r#"{"iss":"https://cistern.example.com","sub":"gitlab:project:20","aud":"#
            ),
            "{text}"
        );
        assert!(text.contains(r#""pipeline":{"issuer":"gitlab","issuer_url":"https://gitlab.example.com","project_id":"20","#), "{text}");
    }

    #[test]
    fn the_subject_names_the_project_the_job_runs_in() {
        let tmp = tempfile::tempdir().unwrap();
        let ring = fixtures::key_ring(
            &tmp.path().join("keys"),
            SigningAlgorithm::ES256,
            Arc::new(ManualClock::at_secs(NOW)),
        )
        .unwrap();
        let mut token = fixtures::verified_id_token().unwrap();
        token.claims.job_project_id = Some(GitLabId(21));
        let grant = fixtures::grant("a", Duration::from_secs(60));
        let m = mint(&ring, ISS, &grant, &token, NOW * 1000).unwrap();
        let c = verify_access_token(&ring, &m.access_token, ISS, None, NOW).unwrap();
        assert_eq!(c.sub, "gitlab:project:21");
        assert_eq!(c.pipeline.project_id, "20");
        assert_eq!(c.pipeline.job_project_id, "21");
    }

    #[test]
    fn every_mint_gets_a_fresh_jti() {
        let (_tmp, ring, m) = minted(SigningAlgorithm::EdDSA);
        let grant = fixtures::grant("a", Duration::from_secs(60));
        let token = fixtures::verified_id_token().unwrap();
        let again = mint(&ring, ISS, &grant, &token, NOW * 1000).unwrap();
        assert_ne!(m.jti, again.jti);
    }

    #[test]
    fn a_clock_before_the_epoch_is_refused() {
        let (_tmp, ring, _) = minted(SigningAlgorithm::ES256);
        let grant = fixtures::grant("a", Duration::from_secs(60));
        let token = fixtures::verified_id_token().unwrap();
        assert!(matches!(
            mint(&ring, ISS, &grant, &token, -1000),
            Err(MintError::Time)
        ));
    }

    #[test]
    fn debug_output_does_not_contain_the_token() {
        let (_tmp, _ring, m) = minted(SigningAlgorithm::ES256);
        let dbg = format!("{m:?}");
        assert!(!dbg.contains(&m.access_token));
        for seg in m.access_token.split('.') {
            assert!(!dbg.contains(seg), "{dbg}");
        }
        assert!(dbg.contains(&m.jti));
    }
}
