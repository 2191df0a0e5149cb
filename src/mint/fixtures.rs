//! Stage inputs for tests and benches: a [`Grant`] and a [`VerifiedIdToken`]
//! built directly, bypassing the stages that normally prove them. Compiled
//! only for unit tests and with the `bench-fixtures` feature; never enable
//! that feature in a production build.

use std::sync::Arc;
use std::time::Duration;

use crate::oidc::{GitLabClaims, VerifiedIdToken};
use crate::policy::{CredentialKind, Grant};

/// The sample GitLab ID token payload (`tests/fixtures/gitlab_payload.json`).
pub const GITLAB_PAYLOAD: &str = include_str!("../../tests/fixtures/gitlab_payload.json");

/// A verified ID token from issuer `gitlab` carrying [`GITLAB_PAYLOAD`].
pub fn verified_id_token() -> Result<VerifiedIdToken, serde_json::Error> {
    let claims: GitLabClaims = serde_json::from_str(GITLAB_PAYLOAD)?;
    Ok(VerifiedIdToken {
        issuer: Arc::from("gitlab"),
        claims,
        kid: "fixture-kid".to_owned(),
        token_sha256: [0; 32],
        _proof: (),
    })
}

/// A grant of role `deploy` to `audience` with two scopes and the given TTL.
pub fn grant(audience: &str, ttl: Duration) -> Grant {
    Grant {
        role: Arc::from("deploy"),
        owner: Arc::from("team-platform"),
        policy_file: Arc::from("policies/deploy.toml"),
        kind: CredentialKind::AccessToken,
        audience: Arc::from(audience),
        scopes: vec!["deploy:write".to_owned(), "artifacts:read".to_owned()],
        ttl,
        provider: None,
        access_level: 0,
        downstream_target: None,
        matched: Vec::new(),
        condition_checked: false,
        _proof: (),
    }
}

/// A key ring of `algorithm` in `dir`, rotating daily, for tokens of at most an hour.
pub fn key_ring(
    dir: &std::path::Path,
    algorithm: crate::config::SigningAlgorithm,
    clock: Arc<dyn crate::clock::Clock>,
) -> Result<super::KeyRing, super::KeyError> {
    let cfg = crate::config::SigningConfig {
        key_dir: dir.to_path_buf(),
        algorithm,
        rotation_period: Duration::from_secs(86_400),
    };
    super::KeyRing::open(&cfg, clock, Duration::from_secs(3600))
}
