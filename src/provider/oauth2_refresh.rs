//! OAuth 2.0 access tokens minted from a refresh token (RFC 6749 §6): an
//! operator authorizes cistern once (`cistern provider authorize`,
//! authorization code + PKCE, [`super::authorize`]); cistern keeps the
//! refresh token sealed in the store and trades it for short-lived access
//! tokens (GitLab's OAuth access tokens live 2 hours), cached until
//! `refresh_before` their expiry and shared by jobs with the same grant, as
//! the client-credentials provider does.
//!
//! IdPs rotate refresh tokens (GitLab, Okta, Auth0, oidc-provider): each
//! refresh returns a new one and consumes the old, so the stored token is
//! often the only valid one. The discipline, under one lock (one refresh at
//! a time):
//!
//! 1. read the state from the store (it is the source of truth: an
//!    operator's `authorize` reaches a running server this way);
//! 2. record a *rotation pending* marker (same token, status `rotating`):
//!    the refresh is only sent if the store is writable right now, and a
//!    restart knows a rotation was interrupted;
//! 3. send the refresh;
//! 4. seal and commit the new refresh token (status `active`) — only then
//!    is the new access token cached and handed out. A failed commit keeps
//!    the new state in memory (it is the only valid token now) and retries
//!    the commit before anything else.
//!
//! A crash between the IdP's rotation and step 4 loses the new token. On
//! restart the marker says so, and cistern retries with the stored token:
//! IdPs with a reuse grace period (Okta's "grace period for token
//! rotation", Auth0's "reuse interval") answer with a fresh pair; the others
//! answer `invalid_grant` (and usually revoke the whole grant, reuse
//! detection). Then the provider *needs re-authorization*: recorded sealed
//! in the store (so restarts do not keep asking), audited, in `/metrics`
//! (`provider_needs_authorization`) and `cistern report`, and jobs are
//! refused with `temporarily_unavailable` naming `cistern provider
//! authorize NAME`, which fixes it without a restart.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;
use subtle::ConstantTimeEq as _;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::oauth2::{
    Cached, TokenEndpoint, TokenError, cached, evict, fingerprint, millis, scope_and_resource,
};
use super::sealed::{Kek, SealError, Sealed};
use super::{CredentialProvider, Listed, MintRequest, Minted, ProviderError};
use crate::clock::Clock;
use crate::config::OAuth2RefreshTokenConfig;
use crate::metrics::Metrics;
use crate::store::{AuditEvent, AuditKind, Store};

/// Where the stored refresh token stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Valid as far as cistern knows.
    Active,
    /// A refresh with it was sent and its answer not (yet) committed.
    Rotating,
    /// The IdP refused it: an operator must run `cistern provider authorize`.
    NeedsAuthorization,
}

/// What is sealed in the store for a refresh-token provider.
pub struct State {
    /// The refresh token (the secret).
    pub refresh_token: Zeroizing<String>,
    /// Where it stands.
    pub status: Status,
    /// Rotations since the operator authorized (0 = as authorized).
    pub generation: u64,
    /// When the status was set (ms).
    pub since_ms: i64,
    /// The scope the IdP granted at authorization.
    pub scope: String,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("refresh_token", &fingerprint(&self.refresh_token))
            .field("status", &self.status)
            .field("generation", &self.generation)
            .field("since_ms", &self.since_ms)
            .field("scope", &self.scope)
            .finish()
    }
}

/// The sealed form, version 1.
#[derive(Serialize)]
struct WireOut<'a> {
    v: u8,
    refresh_token: &'a str,
    status: Status,
    generation: u64,
    since_ms: i64,
    scope: &'a str,
}

#[derive(Deserialize)]
struct WireIn {
    v: u8,
    refresh_token: String,
    status: Status,
    generation: u64,
    since_ms: i64,
    #[serde(default)]
    scope: String,
}

/// Why the stored state cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Sealing or opening failed (wrong KEK, tampering, another provider's value).
    #[error(transparent)]
    Seal(#[from] SealError),
    /// It opened but is not a refresh-token state (e.g. the provider's kind changed).
    #[error(
        "the stored credential is not a refresh-token state (run `cistern provider authorize`)"
    )]
    Format,
}

impl State {
    /// A freshly authorized refresh token.
    pub fn authorized(refresh_token: Zeroizing<String>, scope: String, now_ms: i64) -> State {
        State {
            refresh_token,
            status: Status::Active,
            generation: 0,
            since_ms: now_ms,
            scope,
        }
    }

    /// Seals the state for `provider`.
    pub fn seal(&self, kek: &Kek, provider: &str) -> Result<Sealed, StateError> {
        let text = Zeroizing::new(
            serde_json::to_string(&WireOut {
                v: 1,
                refresh_token: &self.refresh_token,
                status: self.status,
                generation: self.generation,
                since_ms: self.since_ms,
                scope: &self.scope,
            })
            .map_err(|_| StateError::Format)?,
        );
        Ok(kek.seal(provider, &text)?)
    }

    /// Opens a state sealed for `provider`.
    pub fn open(kek: &Kek, provider: &str, sealed: &Sealed) -> Result<State, StateError> {
        let text = kek.open(provider, sealed)?;
        let w: WireIn = serde_json::from_str(&text).map_err(|_| StateError::Format)?;
        let refresh_token = Zeroizing::new(w.refresh_token);
        if w.v != 1 || refresh_token.is_empty() {
            return Err(StateError::Format);
        }
        Ok(State {
            refresh_token,
            status: w.status,
            generation: w.generation,
            since_ms: w.since_ms,
            scope: w.scope,
        })
    }

    fn with(&self, status: Status, since_ms: i64) -> State {
        State {
            refresh_token: self.refresh_token.clone(),
            status,
            generation: self.generation,
            since_ms,
            scope: self.scope.clone(),
        }
    }
}

/// An audit event about provider `provider`'s own credential.
pub fn audit_event(at_ms: i64, reason: &str, detail: serde_json::Value) -> AuditEvent {
    AuditEvent {
        at_ms,
        kind: AuditKind::AdminAction,
        issuer: None,
        role: None,
        project_id: None,
        reason: Some(reason.to_owned()),
        detail: detail.into(),
    }
}

/// The KEK a refresh-token provider config names (required).
pub fn kek_of(cfg: &OAuth2RefreshTokenConfig) -> Result<Kek, String> {
    let text = super::read_secret(cfg.kek_env.as_deref(), cfg.kek_file.as_deref())?;
    Kek::from_base64(&text).map_err(|e| e.to_string())
}

/// A rotation the IdP answered that the store has not committed yet.
struct Unsaved {
    state: State,
    key: (String, String),
    access: Cached,
    recovered: bool,
    previous: String,
}

struct Inner {
    /// (scope, resource) → access token.
    cache: HashMap<(String, String), Cached>,
    /// Holds the only valid refresh token while its commit is failing.
    unsaved: Option<Unsaved>,
}

/// A refresh-token client of one IdP.
pub struct RefreshTokenProvider {
    name: String,
    endpoint: TokenEndpoint,
    kek: Kek,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    refresh_before_ms: i64,
    /// One refresh at a time; held across the request.
    inner: Mutex<Inner>,
    /// Why the needs-authorization flag is up, if it is.
    flagged: std::sync::Mutex<Option<Dead>>,
}

/// What the needs-authorization flag was raised for. It comes down when
/// the store holds a usable refresh token that is not this one: the
/// operator authorized again (`cistern provider authorize`, another
/// process), noticed by [`RefreshTokenProvider::watch_authorization`]
/// without waiting for a job to need the token. A dead token whose new
/// status could not be saved still looks usable in the store; its
/// fingerprint keeps the flag up.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dead {
    /// No refresh token stored at all.
    NeverAuthorized,
    /// The fingerprint of the refresh token found dead.
    Token(String),
}

/// How often a raised needs-authorization flag checks the store.
pub const AUTHORIZATION_WATCH: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for RefreshTokenProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefreshTokenProvider")
            .field("name", &self.name)
            .field("token_url", &self.endpoint.url())
            .finish_non_exhaustive()
    }
}

impl RefreshTokenProvider {
    /// Reads the KEK and client secret and builds the provider.
    pub fn new(
        name: &str,
        cfg: &OAuth2RefreshTokenConfig,
        ctx: &super::ProviderContext,
    ) -> Result<RefreshTokenProvider, ProviderError> {
        let cred_err = |message: String| ProviderError::Credential {
            provider: name.to_owned(),
            message,
        };
        let kek = kek_of(cfg).map_err(|e| cred_err(format!("key-encryption key: {e}")))?;
        let endpoint = super::oauth2::endpoint_of(
            name,
            &crate::config::ProviderConfig::Oauth2RefreshToken(cfg.clone()),
        )?;
        Ok(RefreshTokenProvider {
            name: name.to_owned(),
            endpoint,
            kek,
            store: ctx.store.clone(),
            clock: ctx.clock.clone(),
            metrics: ctx.metrics.clone(),
            refresh_before_ms: millis(cfg.refresh_before),
            inner: Mutex::new(Inner {
                cache: HashMap::new(),
                unsaved: None,
            }),
            flagged: std::sync::Mutex::new(None),
        })
    }

    fn needs_authorization(&self, dead: Dead, reason: &str) -> ProviderError {
        self.flag(dead);
        ProviderError::NeedsAuthorization {
            provider: self.name.clone(),
            reason: reason.to_owned(),
        }
    }

    fn flagged(&self) -> std::sync::MutexGuard<'_, Option<Dead>> {
        // Only whole values are ever stored: a poisoned lock is consistent.
        self.flagged
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Raises the needs-authorization flag for `dead`. The metric is set
    /// under the flag's lock, so the two never disagree.
    fn flag(&self, dead: Dead) {
        let mut flagged = self.flagged();
        *flagged = Some(dead);
        self.metrics.set_needs_authorization(&self.name, true);
    }

    /// Lowers the flag (a usable refresh token is in force).
    fn unflag(&self) {
        let mut flagged = self.flagged();
        *flagged = None;
        self.metrics.set_needs_authorization(&self.name, false);
    }

    /// While the needs-authorization flag is up, checks the store every
    /// `interval` ([`Self::check_reauthorized`]). Runs until dropped.
    pub async fn watch_authorization(self: Arc<Self>, interval: std::time::Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.check_reauthorized().await;
        }
    }

    /// Lowers the needs-authorization flag if the store now holds a usable
    /// refresh token other than the dead one (see [`Dead`]); returns
    /// whether it did.
    async fn check_reauthorized(&self) -> bool {
        let Some(dead) = self.flagged().clone() else {
            return false;
        };
        let replaced = match self.load().await {
            Ok(Some(s)) => {
                s.status != Status::NeedsAuthorization
                    && dead != Dead::Token(fingerprint(&s.refresh_token))
            }
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(provider = %self.name, error = %e, "checking for a re-authorization failed");
                false
            }
        };
        if !replaced {
            return false;
        }
        let mut flagged = self.flagged();
        // A refresh may have raised it again meanwhile, for another reason.
        if flagged.as_ref() != Some(&dead) {
            return false;
        }
        *flagged = None;
        self.metrics.set_needs_authorization(&self.name, false);
        drop(flagged);
        tracing::info!(provider = %self.name, "a new refresh token is stored: the provider no longer needs authorization");
        true
    }

    fn unavailable(&self, message: String) -> ProviderError {
        ProviderError::Unavailable {
            provider: self.name.clone(),
            message,
        }
    }

    /// The stored state, if the operator ever authorized.
    async fn load(&self) -> Result<Option<State>, ProviderError> {
        let stored = self
            .store
            .sealed_credential(&self.name)
            .await
            .map_err(|e| self.unavailable(format!("reading the refresh token: {e}")))?;
        stored
            .map(|(sealed, _)| State::open(&self.kek, &self.name, &sealed))
            .transpose()
            .map_err(|e| ProviderError::Credential {
                provider: self.name.clone(),
                message: e.to_string(),
            })
    }

    async fn save(&self, state: &State, audit: AuditEvent) -> Result<(), ProviderError> {
        let sealed = state
            .seal(&self.kek, &self.name)
            .map_err(|e| self.unavailable(format!("sealing the refresh token: {e}")))?;
        self.store
            .save_sealed_credential(&self.name, sealed, None, audit)
            .await
            .map_err(|e| self.unavailable(format!("saving the refresh token: {e}")))
    }

    /// At start: publishes the health, and if a rotation was interrupted
    /// (a crash), recovers at once rather than at the first job.
    pub async fn startup(self: Arc<Self>) -> Result<(), ProviderError> {
        match self.load().await? {
            None => {
                self.flag(Dead::NeverAuthorized);
                tracing::warn!(provider = %self.name, "no refresh token yet: run `cistern provider authorize {}`", self.name);
            }
            Some(s) if s.status == Status::NeedsAuthorization => {
                self.flag(Dead::Token(fingerprint(&s.refresh_token)));
                tracing::error!(provider = %self.name, "the refresh token was refused by the IdP: run `cistern provider authorize {}`", self.name);
            }
            Some(s) => {
                self.unflag();
                if s.status == Status::Rotating {
                    tokio::spawn(async move {
                        let mut inner = self.inner.lock().await;
                        let key = (String::new(), String::new());
                        let now = self.clock.now_millis();
                        match self.refresh(&mut inner, &key, now).await {
                            Ok(c) => {
                                inner.cache.insert(key, c);
                            }
                            Err(e) => {
                                tracing::error!(provider = %self.name, error = %e, "recovering the interrupted refresh-token rotation failed");
                            }
                        }
                    });
                }
            }
        }
        Ok(())
    }

    /// Commits a rotation the store has not committed yet, then caches its
    /// access token (only now may it be handed out).
    async fn commit_unsaved(&self, inner: &mut Inner) -> Result<(), ProviderError> {
        let Some(u) = &inner.unsaved else {
            return Ok(());
        };
        let at = self.clock.now_millis();
        let audit = audit_event(
            at,
            "provider_credential_rotated",
            json!({
                "provider": self.name,
                "generation": u.state.generation,
                "refresh_token": fingerprint(&u.state.refresh_token),
                "previous": u.previous,
                "recovered": u.recovered,
            }),
        );
        if let Err(e) = self.save(&u.state, audit).await {
            self.metrics.credential_error(&self.name);
            tracing::error!(provider = %self.name, error = %e, "the rotated refresh token is NOT saved (the old one is likely consumed); holding it in memory and retrying before the next refresh");
            return Err(e);
        }
        let Some(u) = inner.unsaved.take() else {
            return Ok(());
        };
        self.metrics
            .set_credential_rotated(&self.name, at.div_euclid(1000));
        self.unflag();
        tracing::info!(provider = %self.name, generation = u.state.generation, refresh_token = %fingerprint(&u.state.refresh_token), recovered = u.recovered, "refresh token rotated and saved");
        inner.cache.insert(u.key, u.access);
        Ok(())
    }

    /// One refresh for `key`, following the discipline in the module docs.
    async fn refresh(
        &self,
        inner: &mut Inner,
        key: &(String, String),
        now_ms: i64,
    ) -> Result<Cached, ProviderError> {
        if inner.unsaved.is_some() {
            self.commit_unsaved(inner).await?;
            if let Some(c) = inner.cache.get(key)
                && c.fresh(now_ms, self.refresh_before_ms)
            {
                return Ok(clone_cached(c));
            }
        }
        let Some(state) = self.load().await? else {
            return Err(self.needs_authorization(Dead::NeverAuthorized, "never authorized"));
        };
        match state.status {
            Status::NeedsAuthorization => {
                return Err(self.needs_authorization(
                    Dead::Token(fingerprint(&state.refresh_token)),
                    "the IdP refused the refresh token",
                ));
            }
            Status::Rotating => {
                tracing::warn!(provider = %self.name, generation = state.generation, "the previous refresh was interrupted (crash or lost answer): retrying with the stored refresh token, which works if the IdP allows reuse for a grace period");
            }
            Status::Active => {}
        }
        let interrupted = state.status == Status::Rotating;
        let previous = fingerprint(&state.refresh_token);
        let since = if interrupted { state.since_ms } else { now_ms };
        self.save(
            &state.with(Status::Rotating, since),
            audit_event(
                now_ms,
                "provider_refresh_started",
                json!({ "provider": self.name, "generation": state.generation, "refresh_token": previous, "interrupted_before": interrupted }),
            ),
        )
        .await?;
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", state.refresh_token.as_str()),
        ];
        scope_and_resource(&mut form, &key.0, &key.1);
        match self.endpoint.request(&form, now_ms).await {
            Ok(answer) => {
                let rotated = answer.refresh_token.is_some();
                let next = State {
                    refresh_token: answer
                        .refresh_token
                        .unwrap_or_else(|| state.refresh_token.clone()),
                    status: Status::Active,
                    generation: state.generation + u64::from(rotated),
                    since_ms: now_ms,
                    scope: state.scope.clone(),
                };
                let copy = clone_cached(&answer.access);
                inner.unsaved = Some(Unsaved {
                    state: next,
                    key: key.clone(),
                    access: answer.access,
                    recovered: interrupted,
                    previous,
                });
                self.commit_unsaved(inner).await?;
                Ok(copy)
            }
            Err(TokenError::Refused { code, .. }) if code == "invalid_grant" => {
                let reason = if interrupted {
                    "the IdP refused the stored refresh token (invalid_grant) after an interrupted rotation: it had rotated it and allows no reuse"
                } else {
                    "the IdP refused the refresh token (invalid_grant): revoked, expired, or reused elsewhere"
                };
                self.mark_needs_authorization(&state, reason).await;
                Err(self
                    .needs_authorization(Dead::Token(fingerprint(&state.refresh_token)), reason))
            }
            Err(e) => {
                // The outcome at the IdP is unknown (or it refused the
                // client, which consumed nothing): the marker stays, and the
                // next attempt retries with the stored token.
                self.metrics.credential_error(&self.name);
                Err(e.into_provider(&self.name))
            }
        }
    }

    /// Records that the stored token is dead, unless an operator replaced
    /// it meanwhile (a re-authorization must never be overwritten).
    async fn mark_needs_authorization(&self, dead: &State, reason: &str) {
        self.metrics.credential_error(&self.name);
        let message = format!(
            "needs re-authorization: {reason}; run `cistern provider authorize {}`",
            self.name
        );
        tracing::error!(provider = %self.name, generation = dead.generation, refresh_token = %fingerprint(&dead.refresh_token), "{message}");
        match self.load().await {
            Ok(Some(now))
                if bool::from(
                    now.refresh_token
                        .as_bytes()
                        .ct_eq(dead.refresh_token.as_bytes()),
                ) => {}
            Ok(_) => return,
            Err(e) => {
                tracing::error!(provider = %self.name, error = %e, "cannot record that the refresh token needs re-authorization");
                return;
            }
        }
        let at = self.clock.now_millis();
        let saved = self
            .save(
                &dead.with(Status::NeedsAuthorization, at),
                audit_event(
                    at,
                    "provider_needs_authorization",
                    json!({ "provider": self.name, "generation": dead.generation, "refresh_token": fingerprint(&dead.refresh_token), "reason": reason }),
                ),
            )
            .await;
        if let Err(e) = saved {
            tracing::error!(provider = %self.name, error = %e, "cannot record that the refresh token needs re-authorization");
            return;
        }
        // After the save (strictly later), so `cistern report` shows it as
        // the last error since the credential was saved.
        let event = audit_event(
            self.clock.now_millis().max(at + 1),
            "provider_credential_error",
            json!({ "provider": self.name, "error": message }),
        );
        if let Err(e) = self.store.append_audit(event).await {
            tracing::error!(error = %e, "audit of a credential error failed");
        }
    }
}

fn clone_cached(c: &Cached) -> Cached {
    Cached {
        secret: c.secret.clone(),
        external_id: c.external_id.clone(),
        expires_at_ms: c.expires_at_ms,
    }
}

#[async_trait::async_trait]
impl CredentialProvider for RefreshTokenProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn mint(&self, req: &MintRequest<'_>) -> Result<Minted, ProviderError> {
        let key = (req.scopes.join(" "), req.target.to_owned());
        let mut inner = self.inner.lock().await;
        if let Some(m) = cached(&inner.cache, &key, req.now_ms, self.refresh_before_ms) {
            return Ok(m);
        }
        let c = self.refresh(&mut inner, &key, req.now_ms).await?;
        let minted = c.minted();
        inner.cache.insert(key, c);
        Ok(minted)
    }

    async fn revoke(&self, _target: &str, external_id: &str) -> Result<(), ProviderError> {
        evict(&mut self.inner.lock().await.cache, external_id);
        Ok(())
    }

    async fn list_marked(&self, _target: &str) -> Result<Vec<Listed>, ProviderError> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const KEK: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    use std::sync::atomic::{AtomicUsize, Ordering};

    use crate::config::Synchronous;
    use crate::store::sqlite::SqliteStore;

    /// What the mock token endpoint does with a refresh request.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Answer {
        /// 200 with access token `at-N` and refresh token `rt-N`.
        Rotate,
        /// 400 invalid_grant.
        InvalidGrant,
        /// Close the store (the commit will fail), then rotate.
        CloseStoreThenRotate,
    }

    struct World {
        _dir: tempfile::TempDir,
        store: Arc<SqliteStore>,
        provider: RefreshTokenProvider,
        calls: Arc<AtomicUsize>,
        /// The stored status seen by the IdP when each request arrived.
        seen: Arc<std::sync::Mutex<Vec<Status>>>,
    }

    async fn world(answer: Answer) -> World {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(SqliteStore::open(&dir.path().join("c.db"), Synchronous::Normal).unwrap());
        let calls = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, st, sn) = (calls.clone(), store.clone(), seen.clone());
        let app = axum::Router::new().route(
            "/token",
            axum::routing::post(move |form: axum::Form<HashMap<String, String>>| {
                let (c, st, sn) = (c.clone(), st.clone(), sn.clone());
                async move {
                    let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                    assert_eq!(form.0["grant_type"], "refresh_token");
                    let kek = Kek::from_base64(KEK).unwrap();
                    let (sealed, _) = st.sealed_credential("idp").await.unwrap().unwrap();
                    sn.lock()
                        .unwrap()
                        .push(State::open(&kek, "idp", &sealed).unwrap().status);
                    if answer == Answer::InvalidGrant {
                        return (
                            http::StatusCode::BAD_REQUEST,
                            axum::Json(json!({ "error": "invalid_grant" })),
                        );
                    }
                    if answer == Answer::CloseStoreThenRotate {
                        st.close().await;
                    }
                    (
                        http::StatusCode::OK,
                        axum::Json(json!({
                            "access_token": format!("at-{n}"), "token_type": "Bearer",
                            "expires_in": 7200, "refresh_token": format!("rt-{n}"),
                        })),
                    )
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        std::fs::write(dir.path().join("kek"), KEK).unwrap();
        std::fs::write(dir.path().join("secret"), "s3cret").unwrap();
        let cfg: OAuth2RefreshTokenConfig = toml::from_str(&format!(
            "token_url = \"http://{addr}/token\"\nauthorization_url = \"http://{addr}/auth\"\n\
             client_id = \"cistern\"\nclient_secret_file = {:?}\nkek_file = {:?}\nmax_retries = 0\n",
            dir.path().join("secret"),
            dir.path().join("kek"),
        ))
        .unwrap();
        let ctx = super::super::ProviderContext {
            store: store.clone(),
            clock: Arc::new(crate::clock::SystemClock),
            metrics: Arc::new(Metrics::new()),
        };
        let provider = RefreshTokenProvider::new("idp", &cfg, &ctx).unwrap();
        World {
            _dir: dir,
            store,
            provider,
            calls,
            seen,
        }
    }

    impl World {
        async fn authorize(&self, token: &str) {
            let s = State::authorized(Zeroizing::new(token.into()), String::new(), 1);
            let sealed = s.seal(&self.provider.kek, "idp").unwrap();
            let audit = audit_event(1, "provider_authorized", json!({}));
            self.store
                .save_sealed_credential("idp", sealed, None, audit)
                .await
                .unwrap();
        }

        async fn stored(&self) -> State {
            self.provider.load().await.unwrap().unwrap()
        }

        async fn mint(&self) -> Result<Minted, ProviderError> {
            let now = self.provider.clock.now_millis();
            self.provider
                .mint(&MintRequest {
                    jti: "j",
                    target: "",
                    scopes: &[],
                    access_level: 0,
                    ttl: std::time::Duration::from_secs(60),
                    now_ms: now,
                    description: String::new(),
                })
                .await
        }
    }

    #[tokio::test]
    async fn the_marker_is_committed_before_the_refresh_and_the_rotated_token_before_use() {
        let w = world(Answer::Rotate).await;
        assert!(matches!(
            w.mint().await,
            Err(ProviderError::NeedsAuthorization { .. })
        ));
        w.authorize("rt-0").await;
        let m = w.mint().await.unwrap();
        assert_eq!(m.secret.as_str(), "at-1");
        // The IdP saw the marker already committed.
        assert_eq!(*w.seen.lock().unwrap(), [Status::Rotating]);
        let s = w.stored().await;
        assert_eq!(
            (s.refresh_token.as_str(), s.status, s.generation),
            ("rt-1", Status::Active, 1)
        );
        // Cached: no second request while fresh.
        assert_eq!(w.mint().await.unwrap().secret.as_str(), "at-1");
        assert_eq!(w.calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn invalid_grant_needs_reauthorization_and_stops_asking_until_authorized_again() {
        let w = world(Answer::InvalidGrant).await;
        w.authorize("rt-0").await;
        let e = w.mint().await.unwrap_err();
        assert!(
            e.to_string().contains("cistern provider authorize idp"),
            "{e}"
        );
        assert_eq!(w.stored().await.status, Status::NeedsAuthorization);
        assert!(matches!(
            w.mint().await,
            Err(ProviderError::NeedsAuthorization { .. })
        ));
        assert_eq!(
            w.calls.load(Ordering::SeqCst),
            1,
            "the dead token is not sent again"
        );
        // A new authorization is picked up without a restart.
        w.authorize("rt-new").await;
        assert!(w.mint().await.is_err());
        assert_eq!(w.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn no_refresh_is_sent_unless_the_store_can_record_the_marker() {
        let w = world(Answer::Rotate).await;
        w.authorize("rt-0").await;
        w.store.close().await;
        assert!(matches!(
            w.mint().await,
            Err(ProviderError::Unavailable { .. })
        ));
        assert_eq!(w.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_rotated_token_whose_commit_fails_is_held_and_its_access_token_withheld() {
        let w = world(Answer::CloseStoreThenRotate).await;
        w.authorize("rt-0").await;
        assert!(matches!(
            w.mint().await,
            Err(ProviderError::Unavailable { .. })
        ));
        let inner = w.provider.inner.lock().await;
        let held = inner.unsaved.as_ref().unwrap();
        assert_eq!(held.state.refresh_token.as_str(), "rt-1");
        assert!(inner.cache.is_empty(), "the access token is not handed out");
    }

    #[tokio::test]
    async fn the_flag_comes_down_for_a_new_token_and_never_for_the_dead_one() {
        let w = world(Answer::InvalidGrant).await;
        // Never authorized: up, and a stored token brings it down.
        assert!(w.mint().await.is_err());
        assert_eq!(*w.provider.flagged(), Some(Dead::NeverAuthorized));
        assert!(!w.provider.check_reauthorized().await);
        w.authorize("rt-0").await;
        assert!(w.provider.check_reauthorized().await);
        assert_eq!(*w.provider.flagged(), None);

        // The IdP refuses rt-0: up for that token.
        assert!(w.mint().await.is_err());
        assert_eq!(w.stored().await.status, Status::NeedsAuthorization);
        assert!(!w.provider.check_reauthorized().await);
        // As if marking it dead had failed to save: rt-0 looks usable in
        // the store, but it is the dead token, so the flag stays up.
        w.authorize("rt-0").await;
        assert!(!w.provider.check_reauthorized().await);
        assert!(w.provider.flagged().is_some());
        // The operator authorizes again.
        w.authorize("rt-new").await;
        assert!(w.provider.check_reauthorized().await);
        assert_eq!(*w.provider.flagged(), None);
        assert!(!w.provider.check_reauthorized().await, "nothing to lower");
    }

    #[test]
    fn the_state_round_trips_sealed_and_never_shows_the_token() {
        let kek = Kek::from_base64(KEK).unwrap();
        let s = State::authorized(Zeroizing::new("rt-secret-value".into()), "openid".into(), 5);
        let sealed = s.seal(&kek, "idp").unwrap();
        assert!(!sealed.ciphertext.windows(9).any(|w| w == b"rt-secret"));
        let back = State::open(&kek, "idp", &sealed).unwrap();
        assert_eq!(back.refresh_token.as_str(), "rt-secret-value");
        assert_eq!(back.status, Status::Active);
        assert_eq!((back.generation, back.since_ms), (0, 5));
        assert_eq!(back.scope, "openid");
        let rotating = back.with(Status::Rotating, 9);
        let again = State::open(&kek, "idp", &rotating.seal(&kek, "idp").unwrap()).unwrap();
        assert_eq!(again.status, Status::Rotating);
        assert_eq!(again.refresh_token.as_str(), "rt-secret-value");
        assert!(!format!("{again:?}").contains("rt-secret"));
        // Another provider's value, or a GitLab credential, does not open as a state.
        assert!(matches!(
            State::open(&kek, "other", &sealed),
            Err(StateError::Seal(_))
        ));
        let gitlab = kek.seal("idp", "glpat-xyz").unwrap();
        assert!(matches!(
            State::open(&kek, "idp", &gitlab),
            Err(StateError::Format)
        ));
    }
}
