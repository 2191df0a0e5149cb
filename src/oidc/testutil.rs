//! Test helpers shared by the oidc tests: RS256 token forging (over the dev
//! issuer's signing) and a loopback GitLab stand-in with controllable
//! behaviour and hit counters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};

use crate::clock::{Clock, ManualClock};
use crate::config::IssuerConfig;
use crate::dev::{DevIssuer, DevMode};
use crate::metrics::Metrics;
use crate::oidc::Issuers;

static KEY_A: LazyLock<DevIssuer> =
    LazyLock::new(|| DevIssuer::generate(DevMode::i_am_in_dev_mode()).unwrap());
static KEY_B: LazyLock<DevIssuer> =
    LazyLock::new(|| DevIssuer::generate(DevMode::i_am_in_dev_mode()).unwrap());

/// The usual signing key.
pub(crate) fn key_a() -> &'static DevIssuer {
    &KEY_A
}

/// A second key, for rotation.
pub(crate) fn key_b() -> &'static DevIssuer {
    &KEY_B
}

/// Audience every test issuer accepts.
pub(crate) const AUD: &str = "https://cistern.test";
/// Default "now" of the test clocks.
pub(crate) const NOW: i64 = 1_767_225_600;

/// GitLab-shaped claims for `iss`, issued at `now`, valid 1 h.
pub(crate) fn claims(iss: &str, now: i64) -> Map<String, Value> {
    let t = key_a()
        .mint_id_token(iss, AUD, &Map::new(), now, 3600)
        .unwrap();
    let payload = t.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// The standard header for `key`.
pub(crate) fn header(key: &DevIssuer) -> Value {
    json!({"alg":"RS256","kid":key.kid(),"typ":"JWT"})
}

/// Signs any header and claims with `key` (RS256, whatever `alg` says).
pub(crate) fn forge(key: &DevIssuer, header: &Value, claims: &Value) -> String {
    key.sign_compact(header.to_string().as_bytes(), claims.to_string().as_bytes())
        .unwrap()
}

/// Signs raw header/payload JSON text (for duplicate members).
pub(crate) fn forge_raw(key: &DevIssuer, header: &str, payload: &str) -> String {
    key.sign_compact(header.as_bytes(), payload.as_bytes())
        .unwrap()
}

/// base64url without padding.
pub(crate) fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// How one endpoint of the stand-in answers.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) content_type: String,
    pub(crate) body: String,
    pub(crate) delay: Duration,
    pub(crate) headers: Vec<(String, String)>,
}

impl Reply {
    pub(crate) fn json(body: String) -> Self {
        Self {
            status: 200,
            content_type: "application/json; charset=utf-8".into(),
            body,
            delay: Duration::ZERO,
            headers: vec![],
        }
    }
    pub(crate) fn status(status: u16) -> Self {
        Self {
            status,
            ..Self::json("{}".into())
        }
    }
    pub(crate) fn with_header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
}

/// Hit counters and the replies of the stand-in.
#[derive(Debug)]
pub(crate) struct StandIn {
    pub(crate) base: String,
    pub(crate) discovery_hits: AtomicUsize,
    pub(crate) jwks_hits: AtomicUsize,
    pub(crate) other_hits: AtomicUsize,
    pub(crate) discovery: Mutex<Reply>,
    pub(crate) jwks: Mutex<Reply>,
}

impl StandIn {
    pub(crate) fn set_discovery(&self, r: Reply) {
        *self.discovery.lock().unwrap() = r;
    }
    pub(crate) fn set_jwks(&self, r: Reply) {
        *self.jwks.lock().unwrap() = r;
    }
    /// Serves `keys` as the JWKS, with GitLab's Cache-Control.
    pub(crate) fn serve_keys(&self, keys: &[&DevIssuer]) {
        let keys: Vec<Value> = keys.iter().map(|k| k.jwk()).collect();
        self.set_jwks(
            Reply::json(json!({ "keys": keys }).to_string()).with_header(
                "cache-control",
                "max-age=86400, public, must-revalidate, no-transform",
            ),
        );
    }
    pub(crate) fn hits(&self) -> (usize, usize, usize) {
        (
            self.discovery_hits.load(Ordering::SeqCst),
            self.jwks_hits.load(Ordering::SeqCst),
            self.other_hits.load(Ordering::SeqCst),
        )
    }
}

async fn answer(reply: Reply) -> Response {
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut resp = (
        StatusCode::from_u16(reply.status).unwrap(),
        [("content-type", reply.content_type)],
        reply.body,
    )
        .into_response();
    for (k, v) in reply.headers {
        resp.headers_mut().insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(&v).unwrap(),
        );
    }
    resp
}

/// Starts a stand-in on 127.0.0.1:0, serving key A.
pub(crate) async fn stand_in() -> Arc<StandIn> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let s = Arc::new(StandIn {
        discovery: Mutex::new(Reply::json(
            key_a().discovery_json(&base, &format!("{base}/keys")),
        )),
        jwks: Mutex::new(Reply::status(500)),
        base,
        discovery_hits: AtomicUsize::new(0),
        jwks_hits: AtomicUsize::new(0),
        other_hits: AtomicUsize::new(0),
    });
    s.serve_keys(&[key_a()]);
    let app = Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(|State(s): State<Arc<StandIn>>| async move {
                s.discovery_hits.fetch_add(1, Ordering::SeqCst);
                let r = s.discovery.lock().unwrap().clone();
                answer(r).await
            }),
        )
        .route(
            "/keys",
            get(|State(s): State<Arc<StandIn>>| async move {
                s.jwks_hits.fetch_add(1, Ordering::SeqCst);
                let r = s.jwks.lock().unwrap().clone();
                answer(r).await
            }),
        )
        .fallback(|State(s): State<Arc<StandIn>>| async move {
            s.other_hits.fetch_add(1, Ordering::SeqCst);
            answer(Reply::json(json!({"keys":[key_a().jwk()]}).to_string())).await
        })
        .with_state(s.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    s
}

/// An issuer config for `issuer` (loopback http allowed), with extra TOML lines.
pub(crate) fn issuer_config(issuer: &str, extra: &str) -> IssuerConfig {
    toml::from_str(&format!(
        "issuer = {issuer:?}\naudiences = [{AUD:?}]\nallow_insecure_http = true\n{extra}"
    ))
    .unwrap()
}

/// An issuer set named `gl` over one config, driven by a manual clock.
pub(crate) fn issuers_with(config: IssuerConfig) -> (Issuers, Arc<ManualClock>, Arc<Metrics>) {
    let clock = Arc::new(ManualClock::at_secs(NOW));
    let metrics = Arc::new(Metrics::new());
    let mut m = BTreeMap::new();
    m.insert("gl".to_owned(), config);
    let dyn_clock: Arc<dyn Clock> = clock.clone();
    let issuers = Issuers::new(&m, dyn_clock, metrics.clone()).unwrap();
    (issuers, clock, metrics)
}
