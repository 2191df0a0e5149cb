//! Verified cistern tokens, kept by SHA-256 of the token until their `exp`,
//! so the ES256 verification (~35 µs) runs once per token, not per request.
//! Revocation is not cached: it is checked on every request.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::mint::AccessTokenClaims;

/// A bounded map from token hash to verified claims.
pub struct TokenCache {
    map: RwLock<HashMap<[u8; 32], Arc<AccessTokenClaims>>>,
    capacity: usize,
}

fn digest(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl TokenCache {
    /// An empty cache holding at most `capacity` tokens.
    pub fn new(capacity: usize) -> TokenCache {
        TokenCache {
            map: RwLock::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// The claims of `token` if it was verified before and is unexpired at `now_secs`.
    pub fn get(&self, token: &str, now_secs: i64) -> Option<Arc<AccessTokenClaims>> {
        let key = digest(token);
        let map = self
            .map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        map.get(&key).filter(|c| c.exp > now_secs).cloned()
    }

    /// Keeps verified `claims` for `token`; makes room by dropping entries
    /// expired at `now_secs`, then (a flood of distinct valid tokens) everything.
    pub fn insert(
        &self,
        token: &str,
        claims: AccessTokenClaims,
        now_secs: i64,
    ) -> Arc<AccessTokenClaims> {
        let key = digest(token);
        let claims = Arc::new(claims);
        let now = now_secs;
        let mut map = self
            .map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= self.capacity {
            map.retain(|_, c| c.exp > now);
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        map.insert(key, claims.clone());
        claims
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.map.read().map_or(0, |m| m.len())
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mint::PipelineClaims;

    fn claims(jti: &str, exp: i64) -> AccessTokenClaims {
        AccessTokenClaims {
            iss: "https://cistern.test".into(),
            sub: "gitlab:project:42".into(),
            aud: "https://echo.test".into(),
            exp,
            iat: 0,
            nbf: 0,
            jti: jti.into(),
            client_id: "gitlab:project:42".into(),
            scope: "api".into(),
            role: "echo".into(),
            owner: "team".into(),
            pipeline: PipelineClaims {
                issuer: "gitlab".into(),
                issuer_url: "https://gitlab.test".into(),
                project_id: "42".into(),
                project_path: "g/p".into(),
                namespace_id: "7".into(),
                namespace_path: "g".into(),
                job_project_id: "42".into(),
                job_namespace_id: None,
                git_ref: "main".into(),
                ref_type: "branch".into(),
                ref_protected: true,
                environment: None,
                pipeline_id: "1".into(),
                job_id: "2".into(),
                sha: "s".into(),
                id_token_jti: "i".into(),
            },
        }
    }

    #[test]
    fn a_token_is_served_until_its_expiry_and_only_for_itself() {
        let cache = TokenCache::new(10);
        cache.insert("token-a", claims("a", 100), 50);
        assert_eq!(cache.get("token-a", 99).unwrap().jti, "a");
        assert!(cache.get("token-a", 100).is_none(), "expired");
        assert!(cache.get("token-b", 50).is_none());
    }

    #[test]
    fn a_full_cache_drops_expired_entries_first_then_everything() {
        let cache = TokenCache::new(2);
        cache.insert("old", claims("old", 10), 0);
        cache.insert("live", claims("live", 1000), 0);
        cache.insert("new", claims("new", 1000), 20);
        assert!(cache.get("live", 20).is_some(), "a live entry was dropped");
        assert_eq!(cache.len(), 2);
        cache.insert("newer", claims("newer", 1000), 20);
        assert_eq!(cache.len(), 1);
        assert!(cache.get("newer", 20).is_some());
    }
}
