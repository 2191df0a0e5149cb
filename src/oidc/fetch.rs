//! Bounded GETs of JSON documents (discovery, JWKS).
//!
//! Every fetch fails closed: a deadline on the whole exchange, a body cap
//! enforced while streaming (Content-Length is only an early hint), no
//! redirects (the client is built with `Policy::none()`, and any 3xx is an
//! error), status 200 only, and a JSON media type only.

use std::time::Duration;

use url::Url;

/// Limits for one fetch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) timeout: Duration,
    pub(crate) max_bytes: usize,
}

/// A fetched JSON body and the freshness the server declared.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub(crate) body: Vec<u8>,
    /// `Cache-Control: max-age`, when present and parsable.
    pub(crate) max_age: Option<Duration>,
}

/// Why a fetch failed. Messages name the URL (from config, never from a
/// token) but never echo the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FetchError {
    /// The deadline passed.
    #[error("GET {0}: timed out")]
    Timeout(String),
    /// Connection or protocol failure.
    #[error("GET {0}: {1}")]
    Transport(String, String),
    /// A redirect, which is never followed.
    #[error("GET {0}: refused redirect (status {1})")]
    Redirect(String, u16),
    /// Any status but 200.
    #[error("GET {0}: status {1}")]
    Status(String, u16),
    /// Not a JSON media type.
    #[error("GET {0}: content type {1:?} is not JSON")]
    ContentType(String, String),
    /// The body exceeded the cap.
    #[error("GET {0}: body larger than {1} bytes")]
    TooLarge(String, usize),
}

/// GETs `url` and returns its body, within `limits`.
pub(crate) async fn get_json(
    client: &reqwest::Client,
    url: &Url,
    limits: Limits,
) -> Result<Fetched, FetchError> {
    // The request timeout covers connect through the last body byte; the
    // outer one also bounds anything reqwest does not count (belt and braces).
    match tokio::time::timeout(limits.timeout, get_inner(client, url, limits)).await {
        Ok(r) => r,
        Err(_) => Err(FetchError::Timeout(url.to_string())),
    }
}

async fn get_inner(
    client: &reqwest::Client,
    url: &Url,
    limits: Limits,
) -> Result<Fetched, FetchError> {
    let at = || url.to_string();
    let transport = |e: reqwest::Error| {
        if e.is_timeout() {
            FetchError::Timeout(at())
        } else {
            // The URL is already in the message; keep the cause chain.
            let e = e.without_url();
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                source = s.source();
            }
            FetchError::Transport(at(), msg)
        }
    };
    let mut resp = client
        .get(url.clone())
        .header(http::header::ACCEPT, "application/json")
        .timeout(limits.timeout)
        .send()
        .await
        .map_err(transport)?;
    let status = resp.status();
    if status.is_redirection() {
        return Err(FetchError::Redirect(at(), status.as_u16()));
    }
    if status != http::StatusCode::OK {
        return Err(FetchError::Status(at(), status.as_u16()));
    }
    let headers = resp.headers();
    let content_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !is_json_media_type(content_type) {
        return Err(FetchError::ContentType(
            at(),
            content_type.chars().take(64).collect(),
        ));
    }
    let max_age = headers
        .get(http::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_max_age);
    if resp
        .content_length()
        .is_some_and(|n| n > limits.max_bytes as u64)
    {
        return Err(FetchError::TooLarge(at(), limits.max_bytes));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > limits.max_bytes {
            return Err(FetchError::TooLarge(at(), limits.max_bytes));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Fetched { body, max_age })
}

/// `application/json`, `application/jwk-set+json` or any `…/…+json`,
/// parameters (`; charset=utf-8`) allowed.
fn is_json_media_type(v: &str) -> bool {
    let essence = v.split(';').next().unwrap_or("").trim();
    let Some((ty, sub)) = essence.split_once('/') else {
        return false;
    };
    ty.eq_ignore_ascii_case("application")
        && (sub.eq_ignore_ascii_case("json")
            || sub.len() > 5
                && sub.is_char_boundary(sub.len() - 5)
                && sub[sub.len() - 5..].eq_ignore_ascii_case("+json"))
}

/// Reads `max-age=N` from a Cache-Control value; `no-store`/`no-cache` mean 0.
fn parse_max_age(v: &str) -> Option<Duration> {
    let mut max_age = None;
    for directive in v.split(',') {
        let d = directive.trim();
        if d.eq_ignore_ascii_case("no-store") || d.eq_ignore_ascii_case("no-cache") {
            return Some(Duration::ZERO);
        }
        if let Some((k, val)) = d.split_once('=')
            && k.trim().eq_ignore_ascii_case("max-age")
        {
            max_age = val
                .trim()
                .trim_matches('"')
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs);
        }
    }
    max_age
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn gitlabs_cache_control_yields_a_day() {
        assert_eq!(
            parse_max_age("max-age=86400, public, must-revalidate, no-transform"),
            Some(Duration::from_secs(86400))
        );
        assert_eq!(parse_max_age("public"), None);
        assert_eq!(parse_max_age("max-age=abc"), None);
        assert_eq!(parse_max_age("no-store, max-age=60"), Some(Duration::ZERO));
    }

    #[test]
    fn only_json_media_types_are_accepted() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/jwk-set+json",
        ] {
            assert!(is_json_media_type(ok), "{ok}");
        }
        for bad in [
            "text/html",
            "",
            "application/jsonp",
            "text/json",
            "application/+json",
        ] {
            assert!(!is_json_media_type(bad), "{bad}");
        }
    }
}
