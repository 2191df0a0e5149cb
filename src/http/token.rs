//! `POST /oauth/token` (RFC 8693 token exchange) and `POST /v1/exchange/dry-run`.

use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::error::{AppError, OAuthCode};
use crate::exchange::{ExchangeError, ExchangeRequest};

/// `grant_type` for token exchange.
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Token type URI of a JWT.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// Token type URI of an OIDC ID token.
pub const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
/// Token type URI of an access token.
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// A parsed, checked token-exchange request.
#[derive(Debug)]
pub struct TokenExchangeForm {
    /// The ID token.
    pub subject_token: String,
    /// Role, audience, scopes.
    pub request: ExchangeRequest,
}

/// Parses an `application/x-www-form-urlencoded` token-exchange body.
/// Repeated parameters are refused (RFC 6749 §3.2), as are `actor_token`
/// (no delegation) and token types cistern does not take.
pub fn parse_form(headers: &HeaderMap, body: &[u8]) -> Result<TokenExchangeForm, AppError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(AppError::invalid_request(
            "the request body must be application/x-www-form-urlencoded",
        ));
    }
    let mut grant_type = None;
    let mut subject_token = None;
    let mut subject_token_type = None;
    let mut requested_token_type = None;
    let mut role = None;
    let mut audience = None;
    let mut resource = None;
    let mut scope = None;
    for (k, v) in super::form::pairs(body) {
        let slot = match &*k {
            "grant_type" => &mut grant_type,
            "subject_token" => &mut subject_token,
            "subject_token_type" => &mut subject_token_type,
            "requested_token_type" => &mut requested_token_type,
            "role" => &mut role,
            "audience" => &mut audience,
            "resource" => &mut resource,
            "scope" => &mut scope,
            "actor_token" | "actor_token_type" => {
                return Err(AppError::invalid_request(
                    "actor_token is not supported: cistern does not do delegation",
                ));
            }
            // Unknown parameters are ignored (RFC 6749 §3.2), e.g. client_id sent by some clients.
            _ => continue,
        };
        if slot.is_some() {
            return Err(AppError::invalid_request(format!(
                "parameter {k} must not be repeated"
            )));
        }
        *slot = Some(v.into_owned());
    }
    match grant_type.as_deref() {
        None => return Err(AppError::invalid_request("grant_type is required")),
        Some(GRANT_TOKEN_EXCHANGE) => {}
        Some(_) => {
            return Err(AppError::new(
                OAuthCode::UnsupportedGrantType,
                format!("only {GRANT_TOKEN_EXCHANGE} is supported"),
            ));
        }
    }
    let subject_token = subject_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| AppError::invalid_request("subject_token is required"))?;
    match subject_token_type.as_deref() {
        Some(TOKEN_TYPE_JWT | TOKEN_TYPE_ID_TOKEN) => {}
        None => return Err(AppError::invalid_request("subject_token_type is required")),
        Some(_) => {
            return Err(AppError::invalid_request(format!(
                "subject_token_type must be {TOKEN_TYPE_JWT} or {TOKEN_TYPE_ID_TOKEN}"
            )));
        }
    }
    match requested_token_type.as_deref() {
        None | Some(TOKEN_TYPE_ACCESS_TOKEN | TOKEN_TYPE_JWT) => {}
        Some(_) => {
            return Err(AppError::invalid_request(
                "requested_token_type must be an access token",
            ));
        }
    }
    // `resource` and `audience` both name the target; accept either, not two different ones.
    let audience = match (
        audience.filter(|a| !a.is_empty()),
        resource.filter(|r| !r.is_empty()),
    ) {
        (Some(a), Some(r)) if a != r => {
            return Err(AppError::new(
                OAuthCode::InvalidTarget,
                "audience and resource name different targets",
            ));
        }
        (a, r) => a.or(r),
    };
    let scopes = match scope {
        None => None,
        Some(s) => {
            let list: Vec<String> = s
                .split(' ')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect();
            if list.is_empty() { None } else { Some(list) }
        }
    };
    let role = role.filter(|r| !r.is_empty());
    Ok(TokenExchangeForm {
        subject_token,
        request: ExchangeRequest {
            role,
            audience,
            scopes,
        },
    })
}

#[derive(Serialize)]
struct TokenResponse<'a> {
    access_token: &'a str,
    issued_token_type: &'static str,
    token_type: &'static str,
    expires_in: i64,
    scope: &'a str,
    /// What was issued (`access_token`, `gitlab_project_token`): an
    /// additional response parameter (RFC 6749 §5.1) so `cistern exchange`
    /// can export it under the conventional variable name.
    cistern_credential_kind: &'a str,
}

/// The token response as JSON, written into a buffer sized for it once
/// (`Json` starts at 128 bytes and grows several times around a ~1 KB
/// token).
fn token_json(body: &TokenResponse<'_>) -> Response {
    let mut buf = Vec::with_capacity(192 + body.access_token.len() + body.scope.len());
    match serde_json::to_writer(&mut buf, body) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            buf,
        )
            .into_response(),
        // Strings and integers only: cannot fail; answered as `Json` would.
        Err(_) => Json(body).into_response(),
    }
}

fn no_store(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    res
}

fn log_failure(e: &ExchangeError) {
    match e {
        ExchangeError::Mint(_) | ExchangeError::Store(_) => {
            tracing::error!(error = %e, "exchange failed")
        }
        _ => tracing::info!(error = %e, "exchange refused"),
    }
}

/// `POST /oauth/token`
pub async fn token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let started = Instant::now();
    let metrics = &state.exchanger.metrics;
    let form = match parse_form(&headers, &body) {
        Ok(f) => f,
        Err(e) => {
            metrics.exchange("invalid", "");
            metrics.error(e.code.as_str());
            return Err(e);
        }
    };
    let role = form.request.role.clone().unwrap_or_default();
    let result = state
        .exchanger
        .exchange(&form.subject_token, &form.request)
        .await;
    metrics.observe_latency(started.elapsed().as_secs_f64());
    match result {
        Ok(minted) => {
            metrics.exchange("granted", &role);
            tracing::info!(jti = %minted.jti, role = %role, expires_at = minted.expires_at, "exchange granted");
            let now = state.exchanger.clock.now_secs();
            let body = TokenResponse {
                access_token: &minted.access_token,
                issued_token_type: TOKEN_TYPE_ACCESS_TOKEN,
                token_type: "Bearer",
                expires_in: (minted.expires_at - now).max(0),
                scope: &minted.scope,
                cistern_credential_kind: minted.kind.as_str(),
            };
            Ok(no_store(token_json(&body)))
        }
        Err(e) => {
            log_failure(&e);
            let app = AppError::from(&e);
            metrics.exchange(
                if app.code == OAuthCode::ServerError {
                    "error"
                } else {
                    "denied"
                },
                &role,
            );
            metrics.error(app.code.as_str());
            Err(app)
        }
    }
}

/// `POST /v1/exchange/dry-run`: the same form as the token endpoint; answers
/// the decision trace and issues nothing.
pub async fn dry_run(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let form = parse_form(&headers, &body)?;
    let role = form.request.role.clone().unwrap_or_default();
    match state
        .exchanger
        .dry_run(&form.subject_token, &form.request)
        .await
    {
        Ok(report) => {
            state.exchanger.metrics.exchange("dry_run", &role);
            Ok(no_store(Json(report).into_response()))
        }
        Err(e) => {
            log_failure(&e);
            Err(AppError::from(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> Result<TokenExchangeForm, AppError> {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded;charset=UTF-8"),
        );
        parse_form(&h, body.as_bytes())
    }

    const OK: &str = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange\
        &subject_token=a.b.c&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt";

    #[test]
    fn a_well_formed_request_parses_with_charset_and_scopes() {
        let f = form(&format!("{OK}&role=deploy&scope=a%20b")).unwrap();
        assert_eq!(f.request.role.as_deref(), Some("deploy"));
        assert_eq!(f.request.scopes, Some(vec!["a".to_owned(), "b".to_owned()]));
    }

    #[test]
    fn repeated_parameters_are_refused() {
        assert_eq!(
            form(&format!("{OK}&role=a&role=b")).unwrap_err().code,
            OAuthCode::InvalidRequest
        );
    }

    #[test]
    fn other_grant_types_are_unsupported() {
        let e = form("grant_type=client_credentials").unwrap_err();
        assert_eq!(e.code, OAuthCode::UnsupportedGrantType);
    }

    #[test]
    fn a_missing_subject_token_type_or_actor_token_is_invalid_request() {
        let e = form(
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token=x",
        )
        .unwrap_err();
        assert_eq!(e.code, OAuthCode::InvalidRequest);
        assert_eq!(
            form(&format!("{OK}&actor_token=x")).unwrap_err().code,
            OAuthCode::InvalidRequest
        );
    }

    #[test]
    fn an_access_token_subject_type_is_refused() {
        let body = OK.replace("token-type%3Ajwt", "token-type%3Aaccess_token");
        assert_eq!(form(&body).unwrap_err().code, OAuthCode::InvalidRequest);
    }

    #[test]
    fn conflicting_audience_and_resource_are_invalid_target() {
        assert_eq!(
            form(&format!("{OK}&audience=a&resource=b"))
                .unwrap_err()
                .code,
            OAuthCode::InvalidTarget
        );
    }

    #[test]
    fn a_json_body_is_refused() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(parse_form(&h, b"{}").is_err());
    }
}
