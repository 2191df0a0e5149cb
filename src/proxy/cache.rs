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

    /// Keeps verified `claims` for `token`; makes room by dropping expired
    /// entries, then (a flood of distinct valid tokens) everything.
    pub fn insert(&self, token: &str, claims: AccessTokenClaims) -> Arc<AccessTokenClaims> {
        let key = digest(token);
        let claims = Arc::new(claims);
        let now = claims.iat.max(0);
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
