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

use reqwest::StatusCode;
use serde::Deserialize;
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use super::{CredentialProvider, Listed, MintRequest, Minted, ProviderError};
use crate::config::{ClientAuthMethod, OAuth2ClientCredentialsConfig};

/// Largest token response read.
const MAX_BODY: usize = 256 * 1024;

/// A cached token.
struct Cached {
    secret: Zeroizing<String>,
    external_id: String,
    expires_at_ms: i64,
}

/// A client-credentials client of one IdP.
pub struct ClientCredentials {
    name: String,
    token_url: String,
    client_id: String,
    secret: Zeroizing<String>,
    auth: ClientAuthMethod,
    refresh_before_ms: i64,
    max_retries: u32,
    http: reqwest::Client,
    /// (scope, resource) → token. A lock held across the fetch: concurrent
    /// jobs with the same grant wait for one request instead of each asking.
    cache: Mutex<HashMap<(String, String), Cached>>,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("name", &self.name)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
}

impl ClientCredentials {
    /// Reads the client secret and builds the client.
    pub fn new(
        name: &str,
        cfg: &OAuth2ClientCredentialsConfig,
    ) -> Result<ClientCredentials, ProviderError> {
        let cred_err = |message: String| ProviderError::Credential {
            provider: name.to_owned(),
            message,
        };
        let secret = super::read_secret(
            cfg.client_secret_env.as_deref(),
            cfg.client_secret_file.as_deref(),
        )
        .map_err(|e| cred_err(format!("client secret: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| cred_err(format!("HTTP client: {e}")))?;
        Ok(ClientCredentials {
            name: name.to_owned(),
            token_url: cfg.token_url.to_string(),
            client_id: cfg.client_id.clone(),
            secret,
            auth: cfg.auth_method,
            refresh_before_ms: i64::try_from(cfg.refresh_before.as_millis()).unwrap_or(i64::MAX),
            max_retries: cfg.max_retries,
            http,
            cache: Mutex::new(HashMap::new()),
        })
    }

    async fn fetch(
        &self,
        scope: &str,
        resource: &str,
        now_ms: i64,
    ) -> Result<Cached, ProviderError> {
        let unavailable = |message: String| ProviderError::Unavailable {
            provider: self.name.clone(),
            message,
        };
        let bad = |message: String| ProviderError::BadResponse {
            provider: self.name.clone(),
            message,
        };
        let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
        if !scope.is_empty() {
            form.push(("scope", scope));
        }
        if !resource.is_empty() {
            form.push(("resource", resource));
        }
        if self.auth == ClientAuthMethod::ClientSecretPost {
            form.push(("client_id", &self.client_id));
            form.push(("client_secret", self.secret.as_str()));
        }
        let mut attempt = 0u32;
        let (status, body) = loop {
            let mut req = self.http.post(&self.token_url).form(&form);
            if self.auth == ClientAuthMethod::ClientSecretBasic {
                // RFC 6749 §2.3.1: form-encode id and secret before Basic.
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                req = req.basic_auth(enc(&self.client_id), Some(enc(self.secret.as_str())));
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
                Err(e) => Err(format!("transport error: {e}")),
            };
            let retry = match &outcome {
                Ok((s, _)) => *s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error(),
                Err(_) => true,
            };
            if !retry {
                break outcome.map_err(unavailable)?;
            }
            if attempt >= self.max_retries {
                return Err(unavailable(match outcome {
                    Ok((s, _)) => format!("{s} (after {} attempts)", attempt + 1),
                    Err(e) => format!("{e} (after {} attempts)", attempt + 1),
                }));
            }
            tokio::time::sleep(super::backoff(attempt)).await;
            attempt += 1;
        };
        if !status.is_success() {
            // RFC 6749 §5.2: {"error": "...", "error_description": "..."}.
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let message = format!(
                "{} {}",
                v["error"].as_str().unwrap_or("error"),
                v["error_description"].as_str().unwrap_or("")
            )
            .chars()
            .filter(|c| !c.is_control())
            .take(300)
            .collect();
            return Err(ProviderError::Refused {
                provider: self.name.clone(),
                status: status.as_u16(),
                message,
            });
        }
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| bad(format!("unreadable token response: {e}")))?;
        if t.access_token.is_empty() || t.access_token.chars().any(|c| c.is_control() || c == ' ') {
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
        let digest =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, t.access_token.as_bytes());
        Ok(Cached {
            secret: Zeroizing::new(t.access_token),
            // Names the token in records without revealing it.
            external_id: format!("sha256:{}", &hex::encode(digest)[..16]),
            expires_at_ms: now_ms.saturating_add(expires_in.saturating_mul(1000)),
        })
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
        let fresh = cache
            .get(&key)
            .is_some_and(|c| c.expires_at_ms.saturating_sub(req.now_ms) > self.refresh_before_ms);
        if !fresh {
            let t = self.fetch(&key.0, &key.1, req.now_ms).await?;
            cache.insert(key.clone(), t);
        }
        let c = cache.get(&key).ok_or_else(|| ProviderError::BadResponse {
            provider: self.name.clone(),
            message: "token cache lost an entry".into(),
        })?;
        Ok(Minted {
            secret: c.secret.clone(),
            external_id: c.external_id.clone(),
            provider_expires_at_ms: c.expires_at_ms,
        })
    }

    async fn revoke(&self, _target: &str, external_id: &str) -> Result<(), ProviderError> {
        // Shared with other jobs: not revoked at the IdP, but never handed out again.
        self.cache
            .lock()
            .await
            .retain(|_, c| c.external_id != external_id);
        Ok(())
    }

    async fn list_marked(&self, _target: &str) -> Result<Vec<Listed>, ProviderError> {
        Ok(Vec::new())
    }
}
