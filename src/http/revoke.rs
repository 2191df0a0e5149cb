//! RFC 7009 token revocation and RFC 7662 token introspection.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Serialize;
use serde_json::json;
use subtle::ConstantTimeEq as _;

use super::AppState;
use super::error::{AppError, OAuthCode};
use crate::exchange::token_hash;
use crate::mint::{AccessTokenClaims, verify_access_token};
use crate::revoke::{Grain, Requester, credential_of};
use crate::store::{AuditEvent, AuditKind};

/// Parses an `application/x-www-form-urlencoded` body into its parameters;
/// a repeated parameter is refused (RFC 6749 §3.2).
pub(crate) fn form(headers: &HeaderMap, body: &[u8]) -> Result<HashMap<String, String>, AppError> {
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
    let mut out = HashMap::new();
    for (k, v) in super::form::pairs(body) {
        if out.insert(k.clone().into_owned(), v.into_owned()).is_some() {
            return Err(AppError::invalid_request(format!(
                "parameter {k} must not be repeated"
            )));
        }
    }
    Ok(out)
}

fn no_store(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    res
}

/// Verifies one of cistern's tokens and checks it is not revoked.
fn active_claims(state: &AppState, token: &str) -> Option<AccessTokenClaims> {
    let ex = &state.exchanger;
    let claims =
        verify_access_token(&ex.keys, token, &ex.issuer_url, None, ex.clock.now_secs()).ok()?;
    (!ex.revocations.is_revoked(&credential_of(&claims))).then_some(claims)
}

/// `POST /oauth/revoke` (RFC 7009). The token proves itself: whoever holds a
/// cistern access token may revoke it (a job at its end, `after_script`).
/// Invalid, unknown, expired or already revoked tokens get 200 too (§2.2);
/// `token_type_hint` is ignored (only access tokens exist here).
pub async fn revoke(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let params = form(&headers, &body)?;
    let Some(token) = params.get("token").filter(|t| !t.is_empty()) else {
        return Err(AppError::invalid_request("the token parameter is required"));
    };
    if let Some(claims) = active_claims(&state, token) {
        let outcome = state
            .lifecycle
            .lifecycle
            .revoke(
                Grain::Jti,
                &claims.jti,
                "",
                None,
                &Requester {
                    actor: &claims.sub,
                    reason: "self-revocation (RFC 7009)",
                    source: "rfc7009",
                },
            )
            .await;
        match outcome {
            Ok(o) => {
                tracing::info!(jti = %claims.jti, rule_id = o.rule_id, "token revoked by its holder")
            }
            Err(e) => {
                tracing::error!(jti = %claims.jti, error = %e, "self-revocation failed");
                // RFC 7009 §2.2.1: 503 tells the client to retry.
                return Err(AppError::new(
                    OAuthCode::TemporarilyUnavailable,
                    "the revocation could not be recorded; retry",
                ));
            }
        }
    }
    Ok(no_store(StatusCode::OK.into_response()))
}

/// The client a resource server authenticated as, or why not.
fn authenticate_client(
    state: &AppState,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
) -> Result<String, AppError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        })
        .map(|(_, creds)| creds.trim());
    let post = params.get("client_secret");
    let (id, secret) = match (basic, post) {
        (Some(_), Some(_)) => {
            return Err(AppError::invalid_request(
                "use one client authentication method, not several",
            ));
        }
        (Some(creds), None) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(creds)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(invalid_client)?;
            let (id, secret) = decoded.split_once(':').ok_or_else(invalid_client)?;
            (id.to_owned(), secret.to_owned())
        }
        (None, Some(secret)) => (
            params.get("client_id").cloned().unwrap_or_default(),
            secret.clone(),
        ),
        (None, None) => return Err(invalid_client()),
    };
    let lc = &state.lifecycle;
    // RFC 6749 §2.3.1 says Basic credentials are form-urlencoded first, but
    // many clients (curl -u, reqwest) send them raw: either form is accepted.
    let raw = sha256(secret.as_bytes());
    let decoded = sha256(form_decode(&secret).as_bytes());
    let id_decoded = form_decode(&id);
    let client = lc.clients.get(&id).or_else(|| lc.clients.get(&id_decoded));
    // Unknown clients are compared too, so timing does not tell which names exist.
    let (expected, known) = match client {
        Some(h) => (*h, true),
        None => ([0u8; 32], false),
    };
    let matches = raw.ct_eq(&expected) | decoded.ct_eq(&expected);
    if bool::from(matches) && known {
        Ok(if lc.clients.contains_key(&id) {
            id
        } else {
            id_decoded
        })
    } else {
        Err(invalid_client())
    }
}

/// `application/x-www-form-urlencoded` decoding of one value (`+` is a
/// space, `%XX` a byte); a raw `&` or `=` is kept as is.
fn form_decode(s: &str) -> String {
    let escaped = s.replace('&', "%26").replace('=', "%3D");
    url::form_urlencoded::parse(format!("x={escaped}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

pub(crate) fn sha256(b: &[u8]) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn invalid_client() -> AppError {
    AppError::new(OAuthCode::InvalidClient, "client authentication failed")
}

/// An RFC 7662 answer for an active token.
#[derive(Serialize)]
struct Active<'a> {
    active: bool,
    scope: &'a str,
    client_id: &'a str,
    sub: &'a str,
    aud: &'a str,
    iss: &'a str,
    exp: i64,
    iat: i64,
    nbf: i64,
    jti: &'a str,
    token_type: &'static str,
    role: &'a str,
    owner: &'a str,
    issuer: &'a str,
    project_id: &'a str,
    namespace_id: &'a str,
    project_path: &'a str,
}

/// `POST /oauth/introspect` (RFC 7662), for configured clients only.
pub async fn introspect(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, AppError> {
    let params = form(&headers, &body)?;
    let client = match authenticate_client(&state, &headers, &params) {
        Ok(c) => c,
        Err(e) => {
            let mut res = e.into_response();
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"cistern\""),
            );
            return Ok(res);
        }
    };
    let Some(token) = params.get("token").filter(|t| !t.is_empty()) else {
        return Err(AppError::invalid_request("the token parameter is required"));
    };
    let claims = active_claims(&state, token);
    let record = match &claims {
        Some(c) => state
            .exchanger
            .store
            .issued_token(&c.jti)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "introspection lookup failed");
                AppError::internal()
            })?,
        None => None,
    };
    let event = AuditEvent {
        at_ms: state.exchanger.clock.now_millis(),
        kind: AuditKind::Introspected,
        issuer: claims.as_ref().map(|c| c.pipeline.issuer.clone()),
        role: claims.as_ref().map(|c| c.role.clone()),
        project_id: claims.as_ref().map(|c| c.pipeline.job_project_id.clone()),
        reason: None,
        detail: json!({
            "client": client,
            "active": claims.is_some(),
            "jti": claims.as_ref().map(|c| &c.jti),
            "token_sha256": token_hash(token),
        })
        .into(),
    };
    if let Err(e) = state.exchanger.store.append_audit(event).await {
        tracing::error!(error = %e, "audit of introspection failed");
        return Err(AppError::internal());
    }
    let body = match &claims {
        None => Json(json!({ "active": false })).into_response(),
        Some(c) => {
            let (project_id, namespace_id, project_path) = match &record {
                Some((id, _)) => (&*id.project_id, &*id.namespace_id, &*id.project_path),
                None => (
                    &*c.pipeline.job_project_id,
                    &*c.pipeline.namespace_id,
                    &*c.pipeline.project_path,
                ),
            };
            Json(Active {
                active: true,
                scope: &c.scope,
                client_id: &c.client_id,
                sub: &c.sub,
                aud: &c.aud,
                iss: &c.iss,
                exp: c.exp,
                iat: c.iat,
                nbf: c.nbf,
                jti: &c.jti,
                token_type: "Bearer",
                role: &c.role,
                owner: &c.owner,
                issuer: &c.pipeline.issuer,
                project_id,
                namespace_id,
                project_path,
            })
            .into_response()
        }
    };
    Ok(no_store(body))
}
