//! OAuth 2.0 client-credentials tokens from the company IdP (RFC 6749 §4.4,
//! resource indicators per RFC 8707): cistern holds the client secret, asks
//! for a token with the scopes and resource the policy allows, caches it
//! until `refresh_before` its expiry, and hands it to jobs.
//!
//! The token belongs to cistern's client, not to one job, and jobs with the
//! same grant share it while it is cached: its lifetime is the IdP's (the
//! policy has no `ttl` for this kind; bound it at the IdP), and it cannot be
//! revoked for one job without breaking the others. Revoking one (a rule,
//! offboarding) evicts it from the cache so no later job receives it; it
//! stays valid at the IdP until its own expiry, which the record shows.
//! Rotating the client secret: add the new secret at the IdP, point
//! `client_secret_env`/`client_secret_file` at it, restart cistern, remove
//! the old one at the IdP (two secrets are valid in between).

use std::collections::HashMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::{CredentialProvider, Listed, MintRequest, Minted, ProviderError};
use crate::config::{
    ClientAuthMethod, OAuth2ClientCredentialsConfig, OAuthClientConfig, ProviderConfig,
};

/// Largest token response read.
const MAX_BODY: usize = 256 * 1024;
/// Longest refresh token accepted (it is sealed into the store).
const MAX_REFRESH_TOKEN: usize = 8 * 1024;

/// A cached access token.
pub(crate) struct Cached {
    pub(crate) secret: Zeroizing<String>,
    pub(crate) external_id: String,
    pub(crate) expires_at_ms: i64,
}

impl Cached {
    /// Whether it may still be handed out at `now_ms`.
    pub(crate) fn fresh(&self, now_ms: i64, refresh_before_ms: i64) -> bool {
        self.expires_at_ms.saturating_sub(now_ms) > refresh_before_ms
    }

    /// The credential handed to a job.
    pub(crate) fn minted(&self) -> Minted {
        Minted {
            secret: self.secret.clone(),
            external_id: self.external_id.clone(),
            provider_expires_at_ms: self.expires_at_ms,
        }
    }
}

/// A short, non-reversible name for a secret in records and logs:
/// `sha256:` and the first 16 hex digits of its SHA-256.
pub(crate) fn fingerprint(secret: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes());
    format!("sha256:{}", &hex::encode(digest)[..16])
}

/// A successful token endpoint answer (RFC 6749 §5.1), checked.
pub(crate) struct TokenAnswer {
    /// The access token, cached under its fingerprint.
    pub(crate) access: Cached,
    /// A (rotated) refresh token, when the IdP issued one.
    pub(crate) refresh_token: Option<Zeroizing<String>>,
    /// The scope the IdP says it granted, when it says.
    pub(crate) scope: Option<String>,
}

/// Why a token endpoint call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokenError {
    /// An RFC 6749 §5.2 error answer: retrying will not help.
    #[error("{status} {code} {description}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The `error` code (`invalid_grant`, `invalid_client`, ...).
        code: String,
        /// `error_description`, control characters removed, bounded.
        description: String,
    },
    /// Failing or unreachable after the retries.
    #[error("{0}")]
    Unavailable(String),
    /// An answer that makes no sense.
    #[error("{0}")]
    BadResponse(String),
}

impl TokenError {
    /// As a provider error of `provider`.
    pub(crate) fn into_provider(self, provider: &str) -> ProviderError {
        let provider = provider.to_owned();
        match self {
            TokenError::Refused {
                status,
                code,
                description,
            } => ProviderError::Refused {
                provider,
                status,
                message: format!("{code} {description}").trim_end().to_owned(),
            },
            TokenError::Unavailable(message) => ProviderError::Unavailable { provider, message },
            TokenError::BadResponse(message) => ProviderError::BadResponse { provider, message },
        }
    }
}

/// Parsed into plain `String`s, wrapped in `Zeroizing` at once.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    scope: Option<String>,
}

/// A client of one token endpoint: client authentication (RFC 6749
/// §2.3.1), retries of 429/5xx/transport errors with jittered backoff, a
/// bounded body, and the checks every answer must pass. Shared by the
/// client-credentials and refresh-token providers and the CLI.
pub(crate) struct TokenEndpoint {
    url: String,
    client_id: String,
    secret: Option<Zeroizing<String>>,
    auth: ClientAuthMethod,
    max_retries: u32,
    http: reqwest::Client,
}

impl TokenEndpoint {
    /// The client `cfg` describes, reading its secret from the configured
    /// place, or from `secret_from` (`(env, file)`) when given.
    pub(crate) fn new(
        cfg: &OAuthClientConfig<'_>,
        secret_from: Option<(Option<&str>, Option<&std::path::Path>)>,
    ) -> Result<TokenEndpoint, String> {
        let secret = match secret_from {
            _ if cfg.auth_method == ClientAuthMethod::None => None,
            Some((env, file)) => Some(super::read_secret(env, file)),
            None => Some(super::read_secret(
                cfg.client_secret_env,
                cfg.client_secret_file,
            )),
        }
        .transpose()
        .map_err(|e| format!("client secret: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(TokenEndpoint {
            url: cfg.token_url.to_string(),
            client_id: cfg.client_id.to_owned(),
            secret,
            auth: cfg.auth_method,
            max_retries: cfg.max_retries,
            http,
        })
    }

    /// The token endpoint's URL.
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// POSTs `form` (plus client authentication) and returns the status
    /// and body of the first answer that is not worth retrying.
    async fn post(&self, form: &[(&str, &str)]) -> Result<(StatusCode, bytes::Bytes), TokenError> {
        let mut form = form.to_vec();
        match (self.auth, &self.secret) {
            (ClientAuthMethod::ClientSecretPost, Some(secret)) => {
                form.push(("client_id", &self.client_id));
                form.push(("client_secret", secret.as_str()));
            }
            (ClientAuthMethod::None, _) => form.push(("client_id", &self.client_id)),
            _ => {}
        }
        let mut attempt = 0u32;
        loop {
            let mut req = self.http.post(&self.url).form(&form);
            if let (ClientAuthMethod::ClientSecretBasic, Some(secret)) = (self.auth, &self.secret) {
                // RFC 6749 §2.3.1: form-encode id and secret before Basic.
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                let secret = Zeroizing::new(enc(secret.as_str()));
                req = req.basic_auth(enc(&self.client_id), Some(secret.as_str()));
            }
            let outcome = match req.send().await {
                Ok(res) => {
                    let status = res.status();
                    match res.bytes().await {
                        Ok(b) if b.len() <= MAX_BODY => Ok((status, b)),
                        Ok(_) => Err("response body too large".to_owned()),
                        Err(e) => Err(format!("reading the response: {e}")),
                    }
                }
                Err(e) if e.is_timeout() => Err("timed out".to_owned()),
                // reqwest's message names the URL, never the form body.
                Err(e) => Err(format!("transport error: {e}")),
            };
            let retry = match &outcome {
                Ok((s, _)) => *s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error(),
                Err(_) => true,
            };
            if !retry {
                return outcome.map_err(TokenError::Unavailable);
            }
            if attempt >= self.max_retries {
                return Err(TokenError::Unavailable(match outcome {
                    Ok((s, _)) => format!("{s} (after {} attempts)", attempt + 1),
                    Err(e) => format!("{e} (after {} attempts)", attempt + 1),
                }));
            }
            tokio::time::sleep(super::backoff(attempt)).await;
            attempt += 1;
        }
    }

    /// One token request: `form` is the grant (`grant_type` and its
    /// parameters). A success must carry a Bearer access token with a
    /// positive `expires_in`, and a well-formed refresh token if any.
    pub(crate) async fn request(
        &self,
        form: &[(&str, &str)],
        now_ms: i64,
    ) -> Result<TokenAnswer, TokenError> {
        let (status, body) = self.post(form).await?;
        if !status.is_success() {
            return Err(refusal(status, &body));
        }
        let bad = TokenError::BadResponse;
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| bad(format!("unreadable token response: {e}")))?;
        let access_token = Zeroizing::new(t.access_token);
        let refresh_token = t.refresh_token.map(Zeroizing::new);
        if !well_formed(&access_token) {
            return Err(bad("the access token is empty or malformed".into()));
        }
        if !t
            .token_type
            .as_deref()
            .unwrap_or("")
            .eq_ignore_ascii_case("bearer")
        {
            return Err(bad(format!("token_type {:?} is not Bearer", t.token_type)));
        }
        let expires_in = t
            .expires_in
            .filter(|e| *e > 0)
            .ok_or_else(|| bad("no positive expires_in: the lifetime would be unknown".into()))?;
        if let Some(r) = &refresh_token
            && (!well_formed(r) || r.len() > MAX_REFRESH_TOKEN)
        {
            return Err(bad("the refresh token is empty or malformed".into()));
        }
        Ok(TokenAnswer {
            access: Cached {
                // Names the token in records without revealing it.
                external_id: fingerprint(&access_token),
                secret: access_token,
                expires_at_ms: now_ms.saturating_add(expires_in.saturating_mul(1000)),
            },
            refresh_token,
            scope: t.scope,
        })
    }

    /// Proves the client's credentials without minting anything: a
    /// `refresh_token` grant with a random, never-issued token. An IdP
    /// authenticates the client before it looks at the grant (RFC 6749
    /// §5.2), so `invalid_client` (or 401) means the secret is refused and
    /// any other error means it was accepted. Returns the IdP's answer code.
    pub(crate) async fn probe_client_auth(&self) -> Result<Result<String, String>, TokenError> {
        let mut bogus = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bogus)
            .map_err(|_| TokenError::Unavailable("no system randomness".into()))?;
        let bogus = hex::encode(bogus);
        let (status, body) = self
            .post(&[("grant_type", "refresh_token"), ("refresh_token", &bogus)])
            .await?;
        if status.is_success() {
            return Ok(Ok(
                "a token (for a refresh token that was never issued!)".into()
            ));
        }
        match refusal(status, &body) {
            TokenError::Refused { code, .. }
                if code == "invalid_client" || status == StatusCode::UNAUTHORIZED =>
            {
                Ok(Err(code))
            }
            TokenError::Refused { code, .. } => Ok(Ok(code)),
            other => Err(other),
        }
    }
}

/// Non-empty, no control characters or spaces (RFC 6749 Appendix A.12/A.17).
fn well_formed(token: &str) -> bool {
    !token.is_empty() && !token.chars().any(|c| c.is_control() || c == ' ')
}

/// An RFC 6749 §5.2 error answer: `{"error": "...", "error_description": "..."}`.
fn refusal(status: StatusCode, body: &[u8]) -> TokenError {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let clean =
        |s: &str, n: usize| -> String { s.chars().filter(|c| !c.is_control()).take(n).collect() };
    TokenError::Refused {
        status: status.as_u16(),
        code: clean(v["error"].as_str().unwrap_or("error"), 64),
        description: clean(v["error_description"].as_str().unwrap_or(""), 300),
    }
}

/// A client-credentials client of one IdP.
pub struct ClientCredentials {
    name: String,
    endpoint: TokenEndpoint,
    refresh_before_ms: i64,
    /// (scope, resource) → token. A lock held across the fetch: concurrent
    /// jobs with the same grant wait for one request instead of each asking.
    cache: Mutex<HashMap<(String, String), Cached>>,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("name", &self.name)
            .field("token_url", &self.endpoint.url)
            .field("client_id", &self.endpoint.client_id)
            .finish_non_exhaustive()
    }
}

/// The grant parameters shared by both OAuth providers: scope and resource
/// indicator, each only when set.
pub(crate) fn scope_and_resource<'a>(
    form: &mut Vec<(&'static str, &'a str)>,
    scope: &'a str,
    resource: &'a str,
) {
    if !scope.is_empty() {
        form.push(("scope", scope));
    }
    if !resource.is_empty() {
        form.push(("resource", resource));
    }
}

/// The token endpoint client of OAuth provider `name` (reads its secret).
pub(crate) fn endpoint_of(
    name: &str,
    cfg: &ProviderConfig,
) -> Result<TokenEndpoint, ProviderError> {
    let cred_err = |message: String| ProviderError::Credential {
        provider: name.to_owned(),
        message,
    };
    let client = cfg
        .oauth_client()
        .ok_or_else(|| cred_err("not an OAuth provider".into()))?;
    TokenEndpoint::new(&client, None).map_err(cred_err)
}

/// The cached token for `key`, if it may still be handed out.
pub(crate) fn cached(
    cache: &HashMap<(String, String), Cached>,
    key: &(String, String),
    now_ms: i64,
    refresh_before_ms: i64,
) -> Option<Minted> {
    cache
        .get(key)
        .filter(|c| c.fresh(now_ms, refresh_before_ms))
        .map(Cached::minted)
}

/// Evicts a revoked token: shared with other jobs, it is not revoked at
/// the IdP, but never handed out again.
pub(crate) fn evict(cache: &mut HashMap<(String, String), Cached>, external_id: &str) {
    cache.retain(|_, c| c.external_id != external_id);
}

/// Milliseconds of a duration, saturating.
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl ClientCredentials {
    /// Reads the client secret and builds the client.
    pub fn new(
        name: &str,
        cfg: &OAuth2ClientCredentialsConfig,
    ) -> Result<ClientCredentials, ProviderError> {
        let endpoint = endpoint_of(name, &ProviderConfig::Oauth2ClientCredentials(cfg.clone()))?;
        Ok(ClientCredentials {
            name: name.to_owned(),
            endpoint,
            refresh_before_ms: millis(cfg.refresh_before),
            cache: Mutex::new(HashMap::new()),
        })
    }

    async fn fetch(
        &self,
        scope: &str,
        resource: &str,
        now_ms: i64,
    ) -> Result<Cached, ProviderError> {
        let mut form = vec![("grant_type", "client_credentials")];
        scope_and_resource(&mut form, scope, resource);
        self.endpoint
            .request(&form, now_ms)
            .await
            .map(|a| a.access)
            .map_err(|e| e.into_provider(&self.name))
    }
}

#[async_trait::async_trait]
impl CredentialProvider for ClientCredentials {
    fn name(&self) -> &str {
        &self.name
    }

    async fn mint(&self, req: &MintRequest<'_>) -> Result<Minted, ProviderError> {
        let key = (req.scopes.join(" "), req.target.to_owned());
        let mut cache = self.cache.lock().await;
        if let Some(m) = cached(&cache, &key, req.now_ms, self.refresh_before_ms) {
            return Ok(m);
        }
        let t = self.fetch(&key.0, &key.1, req.now_ms).await?;
        let minted = t.minted();
        cache.insert(key, t);
        Ok(minted)
    }

    async fn revoke(&self, _target: &str, external_id: &str) -> Result<(), ProviderError> {
        evict(&mut *self.cache.lock().await, external_id);
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

    #[test]
    fn error_answers_are_read_bounded_and_cleaned() {
        let e = refusal(
            StatusCode::BAD_REQUEST,
            br#"{"error":"invalid_grant","error_description":"refresh token\nalready used"}"#,
        );
        let TokenError::Refused {
            status,
            code,
            description,
        } = e
        else {
            panic!("not a refusal");
        };
        assert_eq!((status, code.as_str()), (400, "invalid_grant"));
        assert_eq!(description, "refresh tokenalready used");
        let long = format!(r#"{{"error":"{}"}}"#, "x".repeat(500));
        let TokenError::Refused { code, .. } = refusal(StatusCode::UNAUTHORIZED, long.as_bytes())
        else {
            panic!("not a refusal");
        };
        assert_eq!(code.len(), 64);
        let TokenError::Refused { code, .. } = refusal(StatusCode::BAD_GATEWAY, b"<html>") else {
            panic!("not a refusal");
        };
        assert_eq!(code, "error");
    }

    #[test]
    fn tokens_must_be_well_formed_and_are_named_by_a_fingerprint() {
        assert!(well_formed("abc.def-_~+/="));
        assert!(!well_formed(""));
        assert!(!well_formed("a b"));
        assert!(!well_formed("a\nb"));
        let f = fingerprint("secret-token");
        assert!(f.starts_with("sha256:") && f.len() == 23, "{f}");
        assert!(!f.contains("secret"));
    }
}
