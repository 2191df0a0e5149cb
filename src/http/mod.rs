//! Stage 5 — respond: the HTTP API. `fn app(state) -> Router`; handlers are
//! thin and every error goes through [`error::AppError`].

pub mod admin;
pub mod error;
pub mod form;
pub mod revoke;
pub mod serve;
pub mod token;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tower_http::timeout::TimeoutLayer;

use crate::dev::DevIssuer;
use crate::exchange::Exchanger;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    /// The exchange and everything it depends on.
    pub exchanger: Arc<Exchanger>,
    /// RFC 8414 metadata, serialized once.
    pub metadata: Arc<str>,
    /// The development issuer; `Some` only under `serve --dev`.
    pub dev: Option<Arc<DevIssuer>>,
    /// Revocation, introspection clients and admin authentication.
    pub lifecycle: Arc<admin::LifecycleState>,
}

/// Path of the development issuer under cistern's own base URL.
pub const DEV_ISSUER_PATH: &str = "/dev/oidc";

/// Builds the RFC 8414 authorization server metadata for `issuer`.
pub fn metadata_json(issuer: &str) -> String {
    let base = issuer.trim_end_matches('/');
    json!({
        "issuer": issuer,
        "token_endpoint": format!("{base}/oauth/token"),
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "grant_types_supported": [token::GRANT_TOKEN_EXCHANGE],
        "response_types_supported": ["none"],
        "token_endpoint_auth_methods_supported": ["none"],
        "subject_token_types_supported": [token::TOKEN_TYPE_JWT, token::TOKEN_TYPE_ID_TOKEN],
        "dry_run_endpoint": format!("{base}/v1/exchange/dry-run"),
        "revocation_endpoint": format!("{base}/oauth/revoke"),
        "revocation_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint": format!("{base}/oauth/introspect"),
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
    })
    .to_string()
}

/// The router, with limits. `max_body` bounds request bodies, `timeout` each request.
pub fn app(state: AppState, max_body: usize, timeout: Duration) -> Router {
    let mut router = Router::new()
        .route("/oauth/token", post(token::token))
        .route("/v1/exchange/dry-run", post(token::dry_run))
        .route("/oauth/revoke", post(revoke::revoke))
        .route("/oauth/introspect", post(revoke::introspect))
        .route("/v1/admin/revoke", post(admin::revoke))
        .route("/v1/admin/offboard", post(admin::offboard))
        .route("/v1/admin/reenable", post(admin::reenable))
        .route("/v1/admin/offboarded", get(admin::offboarded))
        .route("/.well-known/oauth-authorization-server", get(metadata))
        .route("/.well-known/jwks.json", get(jwks));
    if state.dev.is_some() {
        router = router
            .route(
                &format!("{DEV_ISSUER_PATH}/.well-known/openid-configuration"),
                get(dev_discovery),
            )
            .route(&format!("{DEV_ISSUER_PATH}/keys"), get(dev_keys))
            .route(&format!("{DEV_ISSUER_PATH}/mint"), post(dev_mint));
    }
    router
        .merge(ops_routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(state)
}

fn ops_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// Liveness, readiness and metrics alone: what `cistern proxy` serves
/// beside its routes.
pub fn ops_router(state: AppState) -> Router {
    ops_routes().fallback(not_found).with_state(state)
}

fn json_response(body: impl Into<axum::body::Body>, cache: &'static str) -> Response {
    let mut res = Response::new(body.into());
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    res
}

async fn metadata(State(s): State<AppState>) -> Response {
    json_response(s.metadata.to_string(), "public, max-age=300")
}

async fn jwks(State(s): State<AppState>) -> Response {
    // Short cache: verifiers must see a rotated key well before it signs anything.
    json_response(
        s.exchanger.keys.jwks_json().to_string(),
        "public, max-age=60",
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(s): State<AppState>) -> Response {
    let policies = s.exchanger.policies.current().len();
    match s.exchanger.store.ping().await {
        Ok(()) if policies > 0 => (StatusCode::OK, "ready").into_response(),
        Ok(()) => (StatusCode::SERVICE_UNAVAILABLE, "no policies loaded").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: store unavailable");
            (StatusCode::SERVICE_UNAVAILABLE, "store unavailable").into_response()
        }
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    s.exchanger.issuers.export_metrics();
    let mut res = Response::new(s.exchanger.metrics.encode().into());
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    res
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({ "error": "not_found" })),
    )
        .into_response()
}

fn dev_issuer_url(s: &AppState) -> String {
    format!(
        "{}{DEV_ISSUER_PATH}",
        s.exchanger.issuer_url.trim_end_matches('/')
    )
}

async fn dev_discovery(State(s): State<AppState>) -> Response {
    let Some(dev) = &s.dev else {
        return not_found().await;
    };
    let iss = dev_issuer_url(&s);
    json_response(dev.discovery_json(&iss, &format!("{iss}/keys")), "no-store")
}

async fn dev_keys(State(s): State<AppState>) -> Response {
    let Some(dev) = &s.dev else {
        return not_found().await;
    };
    json_response(dev.jwks_json(), "public, max-age=300")
}

/// Body of `POST /dev/oidc/mint`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DevMintRequest {
    #[serde(default)]
    claims: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default)]
    ttl_secs: Option<i64>,
}

async fn dev_mint(State(s): State<AppState>, body: axum::body::Bytes) -> Response {
    let Some(dev) = &s.dev else {
        return not_found().await;
    };
    let req: DevMintRequest = if body.is_empty() {
        DevMintRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return error::AppError::invalid_request(format!("bad mint request: {e}"))
                    .into_response();
            }
        }
    };
    let audience = req
        .audience
        .unwrap_or_else(|| s.exchanger.issuer_url.clone());
    let now = s.exchanger.clock.now_secs();
    match dev.mint_id_token(
        &dev_issuer_url(&s),
        &audience,
        &req.claims,
        now,
        req.ttl_secs.unwrap_or(3600).clamp(1, 86400),
    ) {
        Ok(token) => json_response(json!({ "id_token": token }).to_string(), "no-store"),
        Err(e) => {
            tracing::error!(error = %e, "dev mint failed");
            error::AppError::internal().into_response()
        }
    }
}
