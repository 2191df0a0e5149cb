//! The admin API (`/v1/admin/*`): revocation at every grain, offboarding.
//! Never open: a caller presents either the break-glass bootstrap
//! credential (`cst_bg_…`, compared by SHA-256 in constant time) or a
//! cistern access token carrying the `cistern:admin` scope for the admin
//! audience, not revoked.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq as _;

use super::AppState;
use super::revoke::sha256;
use crate::mint::verify_access_token;
use crate::revoke::{
    Block, BlockGrain, Grain, Lifecycle, LifecycleError, Requester, credential_of,
};
use crate::store::{AuditEvent, AuditKind};

/// The scope an admin token must carry.
pub const ADMIN_SCOPE: &str = "cistern:admin";
/// Prefix of bootstrap credentials.
pub const BOOTSTRAP_PREFIX: &str = "cst_bg_";

/// Lifecycle state of the HTTP layer: the operations and who may call them.
pub struct LifecycleState {
    /// Records and applies rules (with the server's set).
    pub lifecycle: Lifecycle,
    /// Introspection clients: name → SHA-256 of the secret.
    pub clients: HashMap<String, [u8; 32]>,
    /// SHA-256 of the bootstrap credential, if configured.
    pub bootstrap_sha256: Option<[u8; 32]>,
    /// `aud` an admin token must carry.
    pub admin_audience: String,
}

/// A refused admin request, rendered on the way out (small, so `Result`s
/// carrying it stay cheap).
enum Refusal {
    /// RFC 6750: no credential (`None`) or a bad one.
    Unauthorized(Option<&'static str>),
    /// A malformed body.
    BadRequest(String),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Unauthorized(e) => unauthorized(e),
            Refusal::BadRequest(m) => bad_request(m),
        }
    }
}

/// A refused admin request (RFC 6750 error codes).
fn unauthorized(error: Option<&'static str>) -> Response {
    let challenge = match error {
        Some(e) => format!("Bearer realm=\"cistern-admin\", error=\"{e}\""),
        None => "Bearer realm=\"cistern-admin\"".to_owned(),
    };
    let status = if error == Some("insufficient_scope") {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::UNAUTHORIZED
    };
    let mut res = (
        status,
        Json(json!({ "error": error.unwrap_or("invalid_token") })),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    res
}

/// [`authenticate`], auditing a refusal (`admin_action`, reason
/// `unauthorized`, the refusal code and the credential's SHA-256, never the
/// credential): failed admin attempts are what an auditor looks for first.
async fn admit(state: &AppState, headers: &HeaderMap, operation: &str) -> Result<String, Response> {
    match authenticate(state, headers) {
        Ok(actor) => Ok(actor),
        Err(refusal) => {
            let code = match &refusal {
                Refusal::Unauthorized(e) => e.unwrap_or("no_credential"),
                Refusal::BadRequest(_) => "bad_request",
            };
            let credential_sha256 = bearer(headers).map(|t| hex::encode(sha256(t.as_bytes())));
            let ex = &state.exchanger;
            let event = AuditEvent {
                at_ms: ex.clock.now_millis(),
                kind: AuditKind::AdminAction,
                issuer: None,
                role: None,
                project_id: None,
                reason: Some("unauthorized".to_owned()),
                detail: json!({
                    "operation": operation,
                    "refused": code,
                    "credential_sha256": credential_sha256,
                })
                .into(),
            };
            if let Err(e) = ex.store.append_audit(event).await {
                tracing::error!(error = %e, "audit of a refused admin call failed");
            }
            Err(refusal.into_response())
        }
    }
}

/// The bearer credential of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
}

/// Who is calling: `bootstrap`, or the admin token's `sub` and `jti`.
fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<String, Refusal> {
    let bearer = bearer(headers).ok_or(Refusal::Unauthorized(None))?;
    let lc = &state.lifecycle;
    if bearer.starts_with(BOOTSTRAP_PREFIX) {
        let expected = lc
            .bootstrap_sha256
            .ok_or(Refusal::Unauthorized(Some("invalid_token")))?;
        return if bool::from(sha256(bearer.as_bytes()).ct_eq(&expected)) {
            Ok("bootstrap".to_owned())
        } else {
            Err(Refusal::Unauthorized(Some("invalid_token")))
        };
    }
    let ex = &state.exchanger;
    let claims = verify_access_token(
        &ex.keys,
        bearer,
        &ex.issuer_url,
        Some(&lc.admin_audience),
        ex.clock.now_secs(),
    )
    .map_err(|_| Refusal::Unauthorized(Some("invalid_token")))?;
    if ex.revocations.is_revoked(&credential_of(&claims)) {
        return Err(Refusal::Unauthorized(Some("invalid_token")));
    }
    if !claims.scope.split(' ').any(|s| s == ADMIN_SCOPE) {
        return Err(Refusal::Unauthorized(Some("insufficient_scope")));
    }
    Ok(format!("{} jti={}", claims.sub, claims.jti))
}

fn bad_request(message: impl std::fmt::Display) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": "invalid_request", "error_description": message.to_string() })),
    )
        .into_response()
}

fn failure(e: LifecycleError) -> Response {
    match e {
        LifecycleError::Invalid(m) => bad_request(m),
        LifecycleError::Store(e) => {
            tracing::error!(error = %e, "admin operation failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": "server_error" })),
            )
                .into_response()
        }
    }
}

fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| Refusal::BadRequest(format!("bad request body: {e}")))
}

/// Body of `POST /v1/admin/revoke`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    /// `jti`, `project`, `namespace`, `role`, `issuer` or `all`.
    pub grain: Grain,
    /// The jti, id, role or issuer; omitted for `all`.
    #[serde(default)]
    pub value: String,
    /// Issuer (name or URL) scoping a project or namespace.
    #[serde(default)]
    pub issuer: String,
    /// RFC 3339 instant: revoke what was issued before it (default now).
    #[serde(default)]
    pub before: Option<String>,
    /// Why (required).
    pub reason: String,
}

/// Body of `POST /v1/admin/offboard` and `/v1/admin/reenable`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockBody {
    /// `project`, `namespace` or `role`.
    pub grain: BlockGrain,
    /// The id or role.
    pub value: String,
    /// Issuer (name or URL) scoping a project or namespace.
    #[serde(default)]
    pub issuer: String,
    /// Why (required).
    pub reason: String,
}

/// Parses an RFC 3339 instant into epoch milliseconds.
pub fn parse_instant(s: &str) -> Result<i64, String> {
    let t = humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("before must be an RFC 3339 instant: {e}"))?;
    let d = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| "before must be after 1970".to_owned())?;
    i64::try_from(d.as_millis()).map_err(|_| "before is out of range".to_owned())
}

/// `POST /v1/admin/revoke`
pub async fn revoke(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let actor = match admit(&state, &headers, "revoke").await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let b: RevokeBody = match parse_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let before = match b.before.as_deref().map(parse_instant).transpose() {
        Ok(b) => b,
        Err(m) => return bad_request(m),
    };
    match state
        .lifecycle
        .lifecycle
        .revoke(
            b.grain,
            &b.value,
            &b.issuer,
            before,
            &Requester {
                actor: &actor,
                reason: &b.reason,
                source: "admin_api",
            },
        )
        .await
    {
        Ok(o) => Json(o).into_response(),
        Err(e) => failure(e),
    }
}

/// `POST /v1/admin/offboard`
pub async fn offboard(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let actor = match admit(&state, &headers, "offboard").await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let b: BlockBody = match parse_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let block = Block {
        grain: b.grain,
        issuer: b.issuer,
        value: b.value,
    };
    match state
        .lifecycle
        .lifecycle
        .offboard(block, &actor, &b.reason, "admin_api")
        .await
    {
        Ok(o) => Json(o).into_response(),
        Err(e) => failure(e),
    }
}

/// `POST /v1/admin/reenable`
pub async fn reenable(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let actor = match admit(&state, &headers, "reenable").await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let b: BlockBody = match parse_body(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let block = Block {
        grain: b.grain,
        issuer: b.issuer,
        value: b.value,
    };
    match state
        .lifecycle
        .lifecycle
        .reenable(block, &actor, &b.reason)
        .await
    {
        Ok(o) => {
            Json(json!({ "reenabled": o.block, "was_blocked": o.was_blocked })).into_response()
        }
        Err(e) => failure(e),
    }
}

/// `GET /v1/admin/offboarded`
pub async fn offboarded(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = admit(&state, &headers, "offboarded").await {
        return r;
    }
    match state.exchanger.store.offboarded().await {
        Ok(list) => Json(json!({ "offboarded": list })).into_response(),
        Err(e) => failure(e.into()),
    }
}
