//! A per-issuer JWKS cache: `kid → parsed RSA key`, swapped atomically.
//!
//! Key acceptance: `kty` RSA, `use` absent or `sig`, `alg` absent or `RS256`,
//! a modulus of 2048–8192 bits and a sane odd public exponent. Other keys are
//! skipped (a JWKS may legitimately carry keys for other uses). Keys without
//! `kid` are skipped too: a token without `kid` is refused (security.md H9,
//! "reject; document"), so such keys could never be selected. Two keys
//! sharing a `kid` make the whole set ambiguous, and it is refused (K2).
//!
//! Freshness: the set is refreshed in the background once its TTL
//! (`Cache-Control: max-age`, clamped to `[jwks_min_ttl, jwks_max_ttl]`) has
//! passed. A `kid` that is not in the set triggers at most one refetch per
//! `unknown_kid_cooldown` (single-flight: a tokio mutex serialises fetches and
//! a timestamp rate-limits them), and unknown kids are negatively cached for
//! the cooldown, so a flood of random kids costs the issuer one request per
//! cooldown (cf. PyJWT CVE-2026-48524). Through fetch failures the last good
//! set keeps serving until `max_stale` after its last successful fetch.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use aws_lc_rs::signature::{ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use url::Url;

use super::VerifyError;
use super::discovery::JwksUriRules;
use super::fetch::{self, Limits};
use crate::clock::Clock;
use crate::metrics::Metrics;

const MIN_MODULUS_BITS: usize = 2048;
const MAX_MODULUS_BITS: usize = 8192;
/// Bound on the negative cache; beyond it the cache is emptied (the cooldown
/// still bounds fetches, the cache only saves lock waits).
const MAX_NEGATIVE_ENTRIES: usize = 4096;

/// Why a JWKS document was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JwksError {
    /// Not JSON, or no `keys` array.
    #[error("JWKS is invalid: {0}")]
    Invalid(String),
    /// Two keys share a `kid`.
    #[error("JWKS has duplicate kid {0:?}")]
    DuplicateKid(String),
    /// Not one key passed the acceptance rules.
    #[error("JWKS has no usable RS256 signing key")]
    NoUsableKeys,
}

/// A parsed key set. Keys stay parsed: verification never re-parses them.
pub(crate) struct KeySet {
    keys: HashMap<Box<str>, ParsedPublicKey>,
    /// When this set was fetched (ms since the epoch).
    fetched_at_ms: i64,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("fetched_at_ms", &self.fetched_at_ms)
            .finish()
    }
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<RawJwk>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, rename = "use")]
    use_: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
}

impl KeySet {
    /// Parses a JWKS document.
    pub(crate) fn parse(body: &[u8], fetched_at_ms: i64) -> Result<Self, JwksError> {
        let raw: RawJwks =
            serde_json::from_slice(body).map_err(|e| JwksError::Invalid(e.to_string()))?;
        let mut keys = HashMap::with_capacity(raw.keys.len());
        let mut seen = std::collections::HashSet::new();
        for jwk in raw.keys {
            let Some(kid) = jwk.kid.as_deref() else {
                continue;
            };
            // Ambiguity is judged over every key with a kid, usable or not.
            if !seen.insert(kid.to_owned()) {
                return Err(JwksError::DuplicateKid(kid.chars().take(64).collect()));
            }
            match parse_rsa_key(&jwk) {
                Ok(key) => {
                    keys.insert(kid.into(), key);
                }
                Err(why) => tracing::debug!(kid, why, "skipping JWKS key"),
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKeys);
        }
        Ok(Self {
            keys,
            fetched_at_ms,
        })
    }

    /// The key with this `kid`.
    pub(crate) fn get(&self, kid: &str) -> Option<&ParsedPublicKey> {
        self.keys.get(kid)
    }

    fn len(&self) -> usize {
        self.keys.len()
    }
}

/// Applies the acceptance rules to one JWK.
fn parse_rsa_key(jwk: &RawJwk) -> Result<ParsedPublicKey, &'static str> {
    if jwk.kty != "RSA" {
        return Err("kty is not RSA");
    }
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return Err("use is not sig");
    }
    if jwk.alg.as_deref().is_some_and(|a| a != "RS256") {
        return Err("alg is not RS256");
    }
    let decode = |v: &Option<String>| {
        v.as_deref()
            .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
            .ok_or("n or e missing or not base64url")
    };
    let n = decode(&jwk.n)?;
    let e = decode(&jwk.e)?;
    let n = strip_leading_zeros(&n);
    let e = strip_leading_zeros(&e);
    let bits = n
        .first()
        .map_or(0, |b| n.len() * 8 - b.leading_zeros() as usize);
    if !(MIN_MODULUS_BITS..=MAX_MODULUS_BITS).contains(&bits) {
        return Err("modulus is not 2048-8192 bits");
    }
    // 3 ≤ e < 2^32, odd: what every real RSA key uses (usually 65537).
    let e_val = e.iter().try_fold(0u64, |acc, b| {
        (e.len() <= 4).then_some(acc << 8 | u64::from(*b))
    });
    if !e_val.is_some_and(|v| v >= 3 && v % 2 == 1) {
        return Err("public exponent is not sane");
    }
    RsaPublicKeyComponents { n, e }
        .to_parsed_public_key(&RSA_PKCS1_2048_8192_SHA256)
        .map_err(|_| "aws-lc refused the key")
}

fn strip_leading_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|&x| x != 0).unwrap_or(b.len());
    &b[first..]
}

/// Timing knobs, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub(crate) min_ttl_ms: i64,
    pub(crate) max_ttl_ms: i64,
    pub(crate) cooldown_ms: i64,
    pub(crate) max_stale_ms: i64,
}

/// Converts a config duration to milliseconds, saturating.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// State only touched under the fetch lock.
#[derive(Debug, Default)]
struct FetchState {
    /// `jwks_uri` from the last good discovery; unknown-kid refetches reuse it.
    jwks_uri: Option<Url>,
    /// When the last unknown-kid (or no-usable-set) refetch started.
    last_forced_ms: Option<i64>,
}

/// One issuer's keys.
pub(crate) struct KeyCache {
    name: Arc<str>,
    discovery_url: Url,
    rules: JwksUriRules,
    limits: Limits,
    timing: Timing,
    client: reqwest::Client,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    current: ArcSwapOption<KeySet>,
    /// When the TTL refresh is due (ms).
    refresh_at_ms: AtomicI64,
    /// A background refresh is in flight.
    refreshing: AtomicBool,
    /// Last time the age gauge was set (ms), to keep the hot path cheap.
    age_exported_ms: AtomicI64,
    fetch: tokio::sync::Mutex<FetchState>,
    /// Unknown kid → negative-cached until (ms).
    negative: Mutex<HashMap<Box<str>, i64>>,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCache")
            .field("name", &self.name)
            .field("discovery_url", &self.discovery_url.as_str())
            .field("current", &self.current.load())
            .finish_non_exhaustive()
    }
}

/// Everything a [`KeyCache`] needs, gathered at start-up.
pub(crate) struct KeyCacheParts {
    pub(crate) name: Arc<str>,
    pub(crate) discovery_url: Url,
    pub(crate) rules: JwksUriRules,
    pub(crate) limits: Limits,
    pub(crate) timing: Timing,
    pub(crate) client: reqwest::Client,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) metrics: Arc<Metrics>,
}

impl KeyCache {
    /// An empty cache; keys arrive with the first fetch.
    pub(crate) fn new(p: KeyCacheParts) -> Self {
        Self {
            name: p.name,
            discovery_url: p.discovery_url,
            rules: p.rules,
            limits: p.limits,
            timing: p.timing,
            client: p.client,
            clock: p.clock,
            metrics: p.metrics,
            current: ArcSwapOption::empty(),
            refresh_at_ms: AtomicI64::new(i64::MIN),
            refreshing: AtomicBool::new(false),
            age_exported_ms: AtomicI64::new(i64::MIN),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
            negative: Mutex::new(HashMap::new()),
        }
    }

    /// The current set if it is still usable (within `max_stale` of its fetch).
    fn usable(&self, now_ms: i64) -> Option<Arc<KeySet>> {
        self.current
            .load_full()
            .filter(|s| now_ms.saturating_sub(s.fetched_at_ms) <= self.timing.max_stale_ms)
    }

    /// A key set that contains `kid`. Hot path: one atomic load and a hash
    /// lookup; no network. Otherwise a bounded, single-flight refetch.
    pub(crate) async fn set_with(self: &Arc<Self>, kid: &str) -> Result<Arc<KeySet>, VerifyError> {
        let now = self.clock.now_millis();
        if let Some(set) = self.usable(now) {
            self.after_use(&set, now);
            if set.get(kid).is_some() {
                return Ok(set);
            }
            if self.negatively_cached(kid, now) {
                return Err(VerifyError::UnknownKey);
            }
        }
        self.slow_path(kid).await
    }

    async fn slow_path(&self, kid: &str) -> Result<Arc<KeySet>, VerifyError> {
        let mut st = self.fetch.lock().await;
        // Whoever held the lock may just have fetched what we need.
        let now = self.clock.now_millis();
        if let Some(set) = self.usable(now)
            && set.get(kid).is_some()
        {
            return Ok(set);
        }
        let cooled = st
            .last_forced_ms
            .is_none_or(|t| now.saturating_sub(t) >= self.timing.cooldown_ms);
        let mut failure = None;
        if cooled {
            st.last_forced_ms = Some(now);
            if let Err(e) = self.fetch_locked(&mut st, false).await {
                failure = Some(e);
            }
        }
        drop(st);
        let now = self.clock.now_millis();
        match self.usable(now) {
            Some(set) if set.get(kid).is_some() => Ok(set),
            Some(_) => {
                self.remember_unknown(kid, now);
                Err(VerifyError::UnknownKey)
            }
            None => Err(VerifyError::KeysUnavailable(failure.unwrap_or_else(|| {
                "no usable key set; refetch cooling down".to_owned()
            }))),
        }
    }

    fn negatively_cached(&self, kid: &str, now: i64) -> bool {
        let Ok(neg) = self.negative.lock() else {
            return false;
        };
        neg.get(kid).is_some_and(|&until| now < until)
    }

    fn remember_unknown(&self, kid: &str, now: i64) {
        let Ok(mut neg) = self.negative.lock() else {
            return;
        };
        if neg.len() >= MAX_NEGATIVE_ENTRIES {
            neg.retain(|_, &mut until| now < until);
            if neg.len() >= MAX_NEGATIVE_ENTRIES {
                neg.clear();
            }
        }
        let until = now.saturating_add(self.timing.cooldown_ms);
        match neg.entry(kid.into()) {
            Entry::Occupied(mut o) => *o.get_mut() = until,
            Entry::Vacant(v) => {
                v.insert(until);
            }
        }
    }

    /// Cheap bookkeeping on each use: the age gauge (at most once a second)
    /// and a background refresh once the TTL has passed.
    fn after_use(self: &Arc<Self>, set: &KeySet, now: i64) {
        let last = self.age_exported_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .age_exported_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.export_age(set, now);
        }
        if now >= self.refresh_at_ms.load(Ordering::Relaxed)
            && let Ok(rt) = tokio::runtime::Handle::try_current()
            && !self.refreshing.swap(true, Ordering::AcqRel)
        {
            let this = Arc::clone(self);
            rt.spawn(async move {
                this.refresh().await;
                this.refreshing.store(false, Ordering::Release);
            });
        }
    }

    fn export_age(&self, set: &KeySet, now: i64) {
        self.metrics.set_jwks_age(
            &self.name,
            now.saturating_sub(set.fetched_at_ms).max(0) / 1000,
        );
    }

    /// Sets the age gauge from the current set (for a metrics scrape).
    pub(crate) fn export_metrics(&self) {
        if let Some(set) = self.current.load_full() {
            self.export_age(&set, self.clock.now_millis());
        }
    }

    /// A full refresh (discovery + JWKS); failures are logged, the last good
    /// set keeps serving.
    pub(crate) async fn refresh(&self) {
        let mut st = self.fetch.lock().await;
        if let Err(e) = self.fetch_locked(&mut st, true).await {
            tracing::warn!(issuer = %self.name, error = %e, "issuer key refresh failed");
        }
    }

    /// Fetches (discovery unless a `jwks_uri` is known and `full` is false,
    /// then the JWKS) and installs the new set. Caller holds the fetch lock.
    async fn fetch_locked(&self, st: &mut FetchState, full: bool) -> Result<(), String> {
        let result = self.fetch_inner(st, full).await;
        let now = self.clock.now_millis();
        match &result {
            Ok(()) => {}
            Err(_) => {
                // Retry the TTL refresh no sooner than one cooldown from now.
                let retry = now.saturating_add(self.timing.cooldown_ms);
                self.refresh_at_ms.fetch_max(retry, Ordering::Relaxed);
            }
        }
        result
    }

    async fn fetch_inner(&self, st: &mut FetchState, full: bool) -> Result<(), String> {
        let jwks_uri = match (&st.jwks_uri, full) {
            (Some(u), false) => u.clone(),
            _ => {
                let uri = self.discover().await;
                self.count("discovery", uri.is_ok());
                let uri = uri?;
                st.jwks_uri = Some(uri.clone());
                uri
            }
        };
        let set = self.fetch_jwks(&jwks_uri).await;
        self.count("jwks", set.is_ok());
        let (set, ttl_ms) = set.inspect_err(|_| {
            // The document may have moved: rediscover next time.
            st.jwks_uri = None;
        })?;
        let now = self.clock.now_millis();
        tracing::info!(issuer = %self.name, keys = set.len(), ttl_ms, "issuer keys fetched");
        self.export_age(&set, now);
        self.current.store(Some(Arc::new(set)));
        self.refresh_at_ms
            .store(now.saturating_add(ttl_ms), Ordering::Relaxed);
        if let Ok(mut neg) = self.negative.lock() {
            neg.clear();
        }
        Ok(())
    }

    async fn discover(&self) -> Result<Url, String> {
        let doc = fetch::get_json(&self.client, &self.discovery_url, self.limits)
            .await
            .map_err(|e| e.to_string())?;
        self.rules.jwks_uri(&doc.body).map_err(|e| e.to_string())
    }

    async fn fetch_jwks(&self, uri: &Url) -> Result<(KeySet, i64), String> {
        let doc = fetch::get_json(&self.client, uri, self.limits)
            .await
            .map_err(|e| e.to_string())?;
        let now = self.clock.now_millis();
        let set = KeySet::parse(&doc.body, now).map_err(|e| e.to_string())?;
        let t = self.timing;
        let ttl = doc
            .max_age
            .map_or(t.min_ttl_ms, millis)
            .min(t.max_ttl_ms)
            .max(t.min_ttl_ms);
        Ok((set, ttl))
    }

    fn count(&self, document: &str, ok: bool) {
        self.metrics
            .fetch(&self.name, document, if ok { "ok" } else { "error" });
    }

    /// Installs a key set directly (tests of the verify path without HTTP).
    #[cfg(test)]
    pub(crate) fn install(&self, set: KeySet) {
        self.refresh_at_ms.store(i64::MAX, Ordering::Relaxed);
        self.current.store(Some(Arc::new(set)));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn n_of_bits(bits: usize) -> String {
        let mut n = vec![0xffu8; bits / 8];
        n[bits / 8 - 1] = 0xfb;
        URL_SAFE_NO_PAD.encode(n)
    }

    fn rsa(kid: &str, bits: usize) -> serde_json::Value {
        json!({"kty":"RSA","kid":kid,"e":"AQAB","n":n_of_bits(bits),"use":"sig","alg":"RS256"})
    }

    fn parse(v: serde_json::Value) -> Result<KeySet, JwksError> {
        KeySet::parse(v.to_string().as_bytes(), 0)
    }

    #[test]
    fn the_shared_fixture_jwks_parses_both_keys() {
        let set = KeySet::parse(include_bytes!("../../tests/fixtures/jwks.json"), 0).unwrap();
        assert_eq!(set.len(), 2);
        assert!(
            set.get("ovzbeo5FDsOn9HQtS2xJSfwkG_psJ8UOAaJ7t2TrsCs")
                .is_some()
        );
    }

    #[test]
    fn only_rsa_signing_keys_of_2048_bits_or_more_are_kept() {
        let mut keys = vec![
            rsa("ok", 2048),
            rsa("big", 4096),
            rsa("weak", 1024),
            rsa("huge", 16384),
        ];
        keys.push(json!({"kty":"RSA","kid":"enc","e":"AQAB","n":n_of_bits(2048),"use":"enc"}));
        keys.push(json!({"kty":"RSA","kid":"ps","e":"AQAB","n":n_of_bits(2048),"alg":"PS256"}));
        keys.push(json!({"kty":"EC","kid":"ec","crv":"P-256","x":"AA","y":"AA"}));
        keys.push(json!({"kty":"oct","kid":"hmac","k":"c2VjcmV0"}));
        keys.push(json!({"kty":"RSA","e":"AQAB","n":n_of_bits(2048)}));
        keys.push(json!({"kty":"RSA","kid":"e1","e":"AQ","n":n_of_bits(2048)}));
        keys.push(json!({"kty":"RSA","kid":"even","e":"AQAA","n":n_of_bits(2048)}));
        keys.push(json!({"kty":"RSA","kid":"pad","e":"AQAB","n":format!("{}=", n_of_bits(2048))}));
        let set = parse(json!({ "keys": keys })).unwrap();
        let mut kids: Vec<_> = set.keys.keys().map(|k| k.to_string()).collect();
        kids.sort();
        assert_eq!(kids, ["big", "ok"]);
    }

    #[test]
    fn a_duplicate_kid_refuses_the_whole_set() {
        let e =
            parse(json!({"keys":[rsa("a", 2048), rsa("b", 2048), rsa("a", 2048)]})).unwrap_err();
        assert_eq!(e, JwksError::DuplicateKid("a".into()));
        // Even when one of the two would have been skipped.
        let e = parse(json!({"keys":[rsa("a", 2048), rsa("a", 1024)]})).unwrap_err();
        assert_eq!(e, JwksError::DuplicateKid("a".into()));
    }

    #[test]
    fn sets_without_keys_or_usable_keys_are_refused() {
        assert!(matches!(parse(json!({})), Err(JwksError::Invalid(_))));
        assert!(matches!(
            parse(json!({"keys":{}})),
            Err(JwksError::Invalid(_))
        ));
        assert_eq!(
            parse(json!({"keys":[]})).unwrap_err(),
            JwksError::NoUsableKeys
        );
        assert_eq!(
            parse(json!({"keys":[rsa("weak", 1024)]})).unwrap_err(),
            JwksError::NoUsableKeys
        );
        assert!(matches!(
            KeySet::parse(b"<html>", 0),
            Err(JwksError::Invalid(_))
        ));
    }
}
