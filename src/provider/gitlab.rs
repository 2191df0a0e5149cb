//! GitLab project access tokens, minted through the REST API
//! (`POST /projects/:id/access_tokens`), one per job.
//!
//! GitLab's expiry is a date: a token lives until 00:00 UTC of its
//! `expires_at`. cistern asks for the first date that covers the lifetime
//! the policy grants and revokes the token itself when that lifetime ends
//! (the reaper), so the real lifetime is minutes, not days. Every token
//! carries cistern's mark, its name `cistern-<jti>`, so reconciliation can
//! find and revoke any token the store does not account for.
//!
//! Every call is bounded by `timeout`; 429 waits for `Retry-After` (capped),
//! 5xx and transport errors back off exponentially with jitter, at most
//! `max_retries` times; 400/401/403/404 are final. Responses are parsed
//! leniently (GitLab adds fields) but a missing `token` or `id` is an error.
//!
//! Bot users: GitLab creates one bot user per project access token and
//! deletes it with the token after `inactive_resource_access_tokens_delete_after_days`
//! (30 by default). cistern revokes tokens minutes after minting, so bots
//! are deleted a month later; a busy project accumulates one inactive bot per
//! job in that window. The alternative — one long-lived token per project,
//! rotated per job — would put every job's credential on one bot user and
//! make revoking one job's token revoke the others'; the per-job token is the
//! narrower credential, and the pile-up is GitLab housekeeping.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::json;
use zeroize::Zeroizing;

use super::{CredentialProvider, Listed, MintRequest, Minted, ProviderError, backoff};
use crate::config::GitLabProviderConfig;

/// The name prefix that marks a token as cistern's.
pub const MARK: &str = "cistern-";

/// Scopes GitLab accepts for project and group access tokens
/// (`Gitlab::Auth.resource_bot_scopes`).
pub const RESOURCE_SCOPES: &[&str] = &[
    "api",
    "read_api",
    "create_runner",
    "manage_runner",
    "k8s_proxy",
    "self_rotate",
    "read_repository",
    "write_repository",
    "read_registry",
    "write_registry",
    "read_virtual_registry",
    "write_virtual_registry",
    "read_observability",
    "write_observability",
    "ai_features",
];

/// Whether `s` is a resource-token scope.
pub fn is_resource_scope(s: &str) -> bool {
    RESOURCE_SCOPES.contains(&s)
}

/// Longest `Retry-After` honoured; beyond it the call counts as failed.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Page size for listings (GitLab's maximum).
const PER_PAGE: u32 = 100;
/// Pages read per listing at most (10,000 tokens per project).
const MAX_PAGES: u32 = 100;
/// Largest response body read.
const MAX_BODY: usize = 1 << 20;

/// A GitLab instance cistern mints project access tokens on.
pub struct GitLab {
    name: String,
    api: String,
    /// cistern's own credential; swapped whole when it is rotated.
    token: arc_swap::ArcSwap<Zeroizing<String>>,
    http: reqwest::Client,
    max_retries: u32,
}

impl std::fmt::Debug for GitLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitLab")
            .field("name", &self.name)
            .field("api", &self.api)
            .finish_non_exhaustive()
    }
}

/// The token fields cistern reads; GitLab sends more.
#[derive(Debug, Deserialize)]
struct TokenBody {
    id: u64,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    active: Option<bool>,
    #[serde(default)]
    revoked: Option<bool>,
}

impl GitLab {
    /// Reads cistern's own credential (environment or file) and builds the
    /// client. Never logs the credential.
    pub fn new(name: &str, cfg: &GitLabProviderConfig) -> Result<GitLab, ProviderError> {
        let cred_err = |message: String| ProviderError::Credential {
            provider: name.to_owned(),
            message,
        };
        let token = super::read_secret(cfg.token_env.as_deref(), cfg.token_file.as_deref())
            .map_err(|e| cred_err(format!("own credential: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| cred_err(format!("HTTP client: {e}")))?;
        Ok(GitLab {
            name: name.to_owned(),
            api: format!("{}/api/v4", cfg.url.as_str().trim_end_matches('/')),
            token: arc_swap::ArcSwap::from_pointee(token),
            http,
            max_retries: cfg.max_retries,
        })
    }

    /// Puts `token` in use for every later call.
    pub fn set_credential(&self, token: Zeroizing<String>) {
        self.token.store(std::sync::Arc::new(token));
    }

    /// The credential in use.
    pub(crate) fn credential(&self) -> std::sync::Arc<Zeroizing<String>> {
        self.token.load_full()
    }

    /// The expiry date of cistern's own credential (`GET
    /// /personal_access_tokens/self`); `None` when it never expires.
    pub async fn own_expiry(&self) -> Result<Option<String>, ProviderError> {
        let (status, _, bytes) = self
            .call(Method::GET, "/personal_access_tokens/self", &[], None)
            .await?;
        if status != StatusCode::OK {
            return Err(if status.is_client_error() {
                self.refused(status, &bytes)
            } else {
                self.bad(format!("unexpected status {status}"))
            });
        }
        #[derive(Deserialize)]
        struct SelfBody {
            #[serde(default)]
            expires_at: Option<String>,
        }
        let body: SelfBody = serde_json::from_slice(&bytes)
            .map_err(|e| self.bad(format!("self answered an unreadable token: {e}")))?;
        match body.expires_at {
            Some(d) if date_ms(&d).is_none() => {
                Err(self.bad(format!("expires_at {d:?} is not a date")))
            }
            other => Ok(other),
        }
    }

    /// Rotates cistern's own credential (`POST
    /// /personal_access_tokens/self/rotate`): GitLab revokes the old one at
    /// once and answers the new one, which is *not* put in use here (the
    /// caller persists it first). Returns it with its expiry date.
    pub async fn rotate_own(
        &self,
        expires_at: &str,
    ) -> Result<(Zeroizing<String>, Option<String>), ProviderError> {
        let body = json!({ "expires_at": expires_at });
        let (status, _, bytes) = self
            .call(
                Method::POST,
                "/personal_access_tokens/self/rotate",
                &[],
                Some(&body),
            )
            .await?;
        if status != StatusCode::OK && status != StatusCode::CREATED {
            return Err(if status.is_client_error() {
                self.refused(status, &bytes)
            } else {
                self.bad(format!("unexpected status {status}"))
            });
        }
        #[derive(Deserialize)]
        struct Rotated {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            expires_at: Option<String>,
        }
        let r: Rotated = serde_json::from_slice(&bytes)
            .map_err(|e| self.bad(format!("rotate answered an unreadable token: {e}")))?;
        let token = r
            .token
            .filter(|t| !t.is_empty() && !t.chars().any(|c| c.is_control() || c == ' '))
            .ok_or_else(|| self.bad("rotate answered without a usable token".into()))?;
        Ok((Zeroizing::new(token), r.expires_at))
    }

    fn unavailable(&self, message: String) -> ProviderError {
        ProviderError::Unavailable {
            provider: self.name.clone(),
            message,
        }
    }

    fn bad(&self, message: String) -> ProviderError {
        ProviderError::BadResponse {
            provider: self.name.clone(),
            message,
        }
    }

    /// One API call with retries. Returns the final status, headers and body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, reqwest::header::HeaderMap, bytes::Bytes), ProviderError> {
        let url = format!("{}{path}", self.api);
        let mut attempt = 0u32;
        loop {
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header("PRIVATE-TOKEN", self.token.load().as_str())
                .query(query);
            if let Some(b) = body {
                req = req.json(b);
            }
            let outcome = match req.send().await {
                Ok(res) => {
                    let status = res.status();
                    let headers = res.headers().clone();
                    match read_body(res).await {
                        Ok(body) => Ok((status, headers, body)),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(if e.is_timeout() {
                    "timed out".to_owned()
                } else {
                    // reqwest's message names the URL, never headers.
                    format!("transport error: {e}")
                }),
            };
            let wait = match &outcome {
                Ok((status, headers, _)) if *status == StatusCode::TOO_MANY_REQUESTS => {
                    match retry_after(headers) {
                        Some(d) if d <= MAX_RETRY_AFTER => Some(d),
                        Some(d) => {
                            return Err(self.unavailable(format!(
                                "429 Too Many Requests, Retry-After {}s is beyond the {}s cistern waits",
                                d.as_secs(),
                                MAX_RETRY_AFTER.as_secs()
                            )));
                        }
                        None => Some(backoff(attempt)),
                    }
                }
                Ok((status, _, _)) if status.is_server_error() => Some(backoff(attempt)),
                Ok(_) => None,
                Err(_) => Some(backoff(attempt)),
            };
            match (wait, outcome) {
                (None, Ok(done)) => return Ok(done),
                (Some(_), last) if attempt >= self.max_retries => {
                    let message = match last {
                        Ok((status, _, body)) => format!("{status} {}", gitlab_message(&body)),
                        Err(e) => e,
                    };
                    return Err(
                        self.unavailable(format!("{message} (after {} attempts)", attempt + 1))
                    );
                }
                (Some(d), _) => {
                    tracing::warn!(provider = %self.name, path, attempt, wait_ms = d.as_millis() as u64, "GitLab call failed; retrying");
                    tokio::time::sleep(d).await;
                    attempt += 1;
                }
                (None, Err(e)) => return Err(self.unavailable(e)),
            }
        }
    }

    fn refused(&self, status: StatusCode, body: &[u8]) -> ProviderError {
        ProviderError::Refused {
            provider: self.name.clone(),
            status: status.as_u16(),
            message: gitlab_message(body),
        }
    }
}

async fn read_body(res: reqwest::Response) -> Result<bytes::Bytes, String> {
    if res.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err("response body too large".into());
    }
    let body = res
        .bytes()
        .await
        .map_err(|e| format!("reading the response: {e}"))?;
    if body.len() > MAX_BODY {
        return Err("response body too large".into());
    }
    Ok(body)
}

/// `Retry-After` in seconds (GitLab sends seconds).
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// GitLab's error text: `{"message": "..."}` (string or object), or
/// `{"error": "...", "error_description": "..."}`; bounded, one line.
fn gitlab_message(body: &[u8]) -> String {
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => match (v.get("message"), v.get("error"), v.get("error_description")) {
            (Some(serde_json::Value::String(m)), _, _) => m.clone(),
            (Some(m), _, _) => m.to_string(),
            (None, Some(e), Some(d)) => format!(
                "{} ({})",
                e.as_str().unwrap_or("error"),
                d.as_str().unwrap_or("")
            ),
            (None, Some(e), None) => e.as_str().map_or_else(|| e.to_string(), str::to_owned),
            _ => String::new(),
        },
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let one_line: String = text.chars().filter(|c| !c.is_control()).take(300).collect();
    one_line
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01 (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A GitLab date (`YYYY-MM-DD`) as the ms of its 00:00 UTC, when GitLab
/// considers a token expired.
pub fn date_ms(date: &str) -> Option<i64> {
    let mut parts = date.split('-');
    let (Some(y), Some(m), Some(d), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d) = (
        y.parse::<i64>().ok()?,
        m.parse::<u32>().ok()?,
        d.parse::<u32>().ok()?,
    );
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let days = days_from_civil(y, m, d);
    // Reject dates that do not exist (2026-02-30).
    (civil_from_days(days) == (y, m, d)).then_some(days * 86_400_000)
}

/// The `expires_at` date that keeps a token valid until at least
/// `until_ms`: GitLab expires tokens at 00:00 UTC *on* that date, so the
/// day after `until_ms`'s day. Returns the date and its midnight in ms.
pub fn expires_at_for(until_ms: i64) -> (String, i64) {
    const DAY_MS: i64 = 86_400_000;
    let day = until_ms.div_euclid(DAY_MS) + 1;
    let (y, m, d) = civil_from_days(day);
    (format!("{y:04}-{m:02}-{d:02}"), day * DAY_MS)
}

#[async_trait::async_trait]
impl CredentialProvider for GitLab {
    fn name(&self) -> &str {
        &self.name
    }

    async fn mint(&self, req: &MintRequest<'_>) -> Result<Minted, ProviderError> {
        let ttl_ms = i64::try_from(req.ttl.as_millis()).unwrap_or(i64::MAX);
        let (expires_at, provider_expires_at_ms) =
            expires_at_for(req.now_ms.saturating_add(ttl_ms));
        let description: String = req.description.chars().take(255).collect();
        let body = json!({
            "name": format!("{MARK}{}", req.jti),
            "description": description,
            "scopes": req.scopes,
            "access_level": req.access_level,
            "expires_at": expires_at,
        });
        let path = tokens_path(req.target);
        let (status, _, bytes) = self.call(Method::POST, &path, &[], Some(&body)).await?;
        if status != StatusCode::CREATED && status != StatusCode::OK {
            return Err(if status.is_client_error() {
                self.refused(status, &bytes)
            } else {
                self.bad(format!("unexpected status {status}"))
            });
        }
        let parsed: TokenBody = serde_json::from_slice(&bytes)
            .map_err(|e| self.bad(format!("create answered an unreadable token: {e}")))?;
        let secret = parsed
            .token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| self.bad("create answered without a token".into()))?;
        Ok(Minted {
            secret: Zeroizing::new(secret),
            external_id: parsed.id.to_string(),
            provider_expires_at_ms,
        })
    }

    async fn revoke(&self, target: &str, external_id: &str) -> Result<(), ProviderError> {
        if external_id.is_empty() || !external_id.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.bad(format!("not a token id: {external_id:?}")));
        }
        let path = format!("{}/{external_id}", tokens_path(target));
        let (status, _, bytes) = self.call(Method::DELETE, &path, &[], None).await?;
        match status {
            // 404: already revoked and deleted, or never existed: gone either way.
            StatusCode::NO_CONTENT | StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            s if s.is_client_error() => Err(self.refused(s, &bytes)),
            s => Err(self.bad(format!("unexpected status {s}"))),
        }
    }

    async fn list_marked(&self, target: &str) -> Result<Vec<Listed>, ProviderError> {
        let path = tokens_path(target);
        let mut out = Vec::new();
        let mut page = 1u32;
        loop {
            let query = [
                ("state", "active".to_owned()),
                ("per_page", PER_PAGE.to_string()),
                ("page", page.to_string()),
            ];
            let (status, headers, bytes) = self.call(Method::GET, &path, &query, None).await?;
            if status != StatusCode::OK {
                return Err(if status.is_client_error() {
                    self.refused(status, &bytes)
                } else {
                    self.bad(format!("unexpected status {status}"))
                });
            }
            let tokens: Vec<TokenBody> = serde_json::from_slice(&bytes)
                .map_err(|e| self.bad(format!("list answered an unreadable page: {e}")))?;
            for t in tokens {
                if let Some(jti) = t.name.as_deref().and_then(|n| n.strip_prefix(MARK)) {
                    out.push(Listed {
                        external_id: t.id.to_string(),
                        jti: jti.to_owned(),
                        active: t.active.unwrap_or(true) && !t.revoked.unwrap_or(false),
                    });
                }
            }
            let next = headers
                .get("x-next-page")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u32>().ok());
            match next {
                Some(n) if n > page && n <= MAX_PAGES => page = n,
                _ => return Ok(out),
            }
        }
    }
}

/// A project id or path as one path segment (`group/app` → `group%2Fapp`).
fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The API path of a target's access tokens: `"42"` is a project,
/// `"group:7"` a group.
fn tokens_path(target: &str) -> String {
    match target.strip_prefix("group:") {
        Some(group) => format!("/groups/{}/access_tokens", urlencode(group)),
        None => format!("/projects/{}/access_tokens", urlencode(target)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_date_covers_the_lifetime_and_no_more_than_a_day_beyond() {
        // 2026-11-29T23:30:00Z: expires 2026-11-30; + 40 min crosses midnight: 2026-12-01.
        let t = 1_795_995_000_000;
        assert_eq!(expires_at_for(t).0, "2026-11-30");
        assert_eq!(expires_at_for(t + 10 * 60_000).0, "2026-11-30");
        assert_eq!(expires_at_for(t + 40 * 60_000).0, "2026-12-01");
        // Just before midnight and exactly at it.
        let midnight = 1_795_996_800_000; // 2026-11-30T00:00:00Z
        assert_eq!(expires_at_for(midnight - 1).0, "2026-11-30");
        assert_eq!(expires_at_for(midnight).0, "2026-12-01");
        let (_, at) = expires_at_for(t);
        assert!(at > t && at - t <= 86_400_000);
        // Leap day and year end.
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_818), (2026, 12, 31));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
    }

    #[test]
    fn dates_parse_to_their_midnight_and_nonsense_is_refused() {
        assert_eq!(date_ms("2026-11-30"), Some(1_795_996_800_000));
        assert_eq!(date_ms("1970-01-01"), Some(0));
        assert_eq!(date_ms("2024-02-29"), Some(19_782 * 86_400_000));
        for bad in [
            "2026-02-30",
            "2026-13-01",
            "26-01-01",
            "2026-1-01",
            "2026-01-01T00:00",
            "",
        ] {
            assert_eq!(date_ms(bad), None, "{bad}");
        }
        let (d, at) = expires_at_for(1_795_995_000_000);
        assert_eq!(date_ms(&d), Some(at));
    }

    #[test]
    fn gitlab_error_bodies_become_one_line() {
        assert_eq!(
            gitlab_message(br#"{"message":"403 Forbidden"}"#),
            "403 Forbidden"
        );
        assert_eq!(
            gitlab_message(br#"{"message":{"expires_at":["must be before 2027-01-01"]}}"#),
            r#"{"expires_at":["must be before 2027-01-01"]}"#
        );
        assert_eq!(
            gitlab_message(br#"{"error":"scopes is missing"}"#),
            "scopes is missing"
        );
        assert_eq!(
            gitlab_message(
                br#"{"error":"invalid_token","error_description":"Token was revoked."}"#
            ),
            "invalid_token (Token was revoked.)"
        );
        assert_eq!(
            gitlab_message(b"<html>\nBad gateway</html>"),
            "<html>Bad gateway</html>"
        );
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
    }

    #[test]
    fn project_paths_are_one_segment() {
        assert_eq!(urlencode("group/app"), "group%2Fapp");
        assert_eq!(urlencode("42"), "42");
        assert_eq!(tokens_path("42"), "/projects/42/access_tokens");
        assert_eq!(tokens_path("group:7"), "/groups/7/access_tokens");
    }
}
