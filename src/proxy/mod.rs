//! The identity-aware proxy: a job holding only its cistern access token
//! reaches an upstream (GitLab's API, an internal service) through cistern,
//! which injects the upstream credential. One request flows through one
//! stage each:
//!
//! authenticate ([`cache`], the bearer token verified once and cached by
//! hash until `exp`; revocation checked on every request) → authorize
//! ([`path`] normalizes once, [`rules`] matches the role's rules on that
//! same path) → inject ([`upstream::CredentialSource`], [`headers`] strips
//! what the job sent) → forward ([`upstream::UpstreamClient`], bodies
//! streamed both ways) → audit ([`audit`], queued so the hot path never
//! waits on disk; one record per request when its response body ends).

pub mod audit;
pub mod cache;
pub mod config;
pub mod headers;
pub mod metrics;
pub mod path;
pub mod rules;
pub mod upstream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use http::{HeaderValue, Method, StatusCode, Uri, header};
use serde::Serialize;

use crate::clock::Clock;
use crate::mint::{AccessTokenClaims, KeyRing, OwnTokenError, verify_access_token};
use crate::policy::PolicyStore;
use crate::provider::Providers;
use crate::revoke::{RevocationSet, credential_of};
use audit::{AuditQueue, ProxyRecord};
use cache::TokenCache;
use config::ProxyConfig;
use path::{NormalPath, PathError};
use rules::RuleMiss;
use upstream::{CredentialSource, Presenter, RouteSetupError, UpstreamClient};

/// One configured route, ready to serve.
pub struct Route {
    name: String,
    /// A host route's name (lower case); `None` for a prefix route.
    host: Option<String>,
    prefix: String,
    prefix_segments: Vec<String>,
    /// Upstream base URL without a trailing `/`.
    upstream: String,
    /// Public base URL of the route without a trailing `/`.
    public: String,
    audience: String,
    credential: CredentialSource,
    presenter: Presenter,
    client: UpstreamClient,
    /// One permit per upstream connection in use (`max_connections`).
    connections: Arc<Semaphore>,
    timeout: Duration,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("name", &self.name)
            .field("prefix", &self.prefix)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

/// Everything the proxy's handlers share.
pub struct Proxy {
    store: Arc<dyn crate::store::Store>,
    routes: Vec<Route>,
    keys: Arc<KeyRing>,
    issuer_url: String,
    policies: Arc<PolicyStore>,
    revocations: Arc<RevocationSet>,
    clock: Arc<dyn Clock>,
    cache: TokenCache,
    audit: AuditQueue,
    metrics: Arc<crate::metrics::Metrics>,
}

/// What [`Proxy::new`] needs from the rest of cistern.
pub struct ProxyDeps {
    /// cistern's signing keys (tokens are verified against them).
    pub keys: Arc<KeyRing>,
    /// cistern's issuer URL (`iss` of its tokens).
    pub issuer_url: String,
    /// Trust policies: the role's proxy rules, always the current set.
    pub policies: Arc<PolicyStore>,
    /// Revoked credentials, checked on every request.
    pub revocations: Arc<RevocationSet>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Where audit records go.
    pub store: Arc<dyn crate::store::Store>,
    /// Credential providers a route may take its credential from.
    pub providers: Providers,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Proxy {
    /// Builds every route (clients, credentials) and starts the audit queue.
    pub async fn new(
        cfg: &ProxyConfig,
        deps: ProxyDeps,
    ) -> Result<Proxy, (String, RouteSetupError)> {
        let mut routes = Vec::with_capacity(cfg.routes.len());
        for (name, r) in &cfg.routes {
            let prefix = r.prefix_of(name);
            let prefix_segments = NormalPath::parse(&prefix)
                .map(|p| p.segments().to_vec())
                .unwrap_or_default();
            let public = match (&r.public_url, &r.host) {
                (Some(u), _) => u.as_str().trim_end_matches('/').to_owned(),
                (None, Some(host)) => {
                    let scheme = deps.issuer_url.split("://").next().unwrap_or("https");
                    format!("{scheme}://{host}")
                }
                (None, None) => format!("{}{prefix}", deps.issuer_url.trim_end_matches('/')),
            };
            routes.push(Route {
                name: name.clone(),
                host: r.host.clone(),
                prefix_segments,
                prefix,
                upstream: r.upstream.as_str().trim_end_matches('/').to_owned(),
                public,
                audience: r.audience.clone(),
                credential: CredentialSource::of(name, r, &deps.providers, &*deps.store)
                    .await
                    .map_err(|e| (name.clone(), e))?,
                presenter: Presenter::of(r),
                client: upstream::client(r).map_err(|e| (name.clone(), e))?,
                connections: Arc::new(Semaphore::new(r.max_connections as usize)),
                timeout: r.timeout,
            });
        }
        Ok(Proxy {
            store: deps.store.clone(),
            routes,
            keys: deps.keys,
            issuer_url: deps.issuer_url,
            policies: deps.policies,
            revocations: deps.revocations,
            clock: deps.clock,
            cache: TokenCache::new(cfg.token_cache),
            audit: AuditQueue::start(deps.store, deps.metrics.clone()),
            metrics: deps.metrics,
        })
    }

    /// Whether any route is configured.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Re-reads sealed route secrets every `interval` (a secret replaced
    /// with `cistern route set-secret` takes over without a restart).
    pub async fn run_refresh(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            for route in &self.routes {
                if let Err(e) = route.credential.refresh(&*self.store).await {
                    tracing::warn!(route = %route.name, error = %e, "re-reading a sealed proxy secret failed");
                }
            }
        }
    }

    /// Waits until every queued audit record is written (shutdown).
    pub async fn flush_audit(&self) {
        self.audit.flush().await;
    }
}

/// The proxy's prefix routes: `PREFIX` and `PREFIX/…` of every route, any
/// method. Host routes are served by [`with_host_routes`].
pub fn router(proxy: Arc<Proxy>) -> Router {
    let mut router = Router::new();
    for (i, route) in proxy.routes.iter().enumerate() {
        if route.host.is_some() {
            continue;
        }
        let handler = any(move |State(p): State<Arc<Proxy>>, req: Request| handle(p, i, req));
        router = router
            .route(&route.prefix, handler.clone())
            .route(&format!("{}/", route.prefix), handler.clone())
            .route(&format!("{}/{{*rest}}", route.prefix), handler);
    }
    router.with_state(proxy)
}

/// Wraps `app` so that a request for a host route's name goes to that
/// route whatever its path; everything else reaches `app` unchanged.
pub fn with_host_routes(app: Router, proxy: Arc<Proxy>) -> Router {
    if proxy.routes.iter().all(|r| r.host.is_none()) {
        return app;
    }
    app.layer(axum::middleware::from_fn_with_state(proxy, host_dispatch))
}

/// The request's host name: the URI's authority (HTTP/2) or `Host`,
/// without port, lower case.
fn request_host(req: &Request) -> Option<String> {
    let raw = match req.uri().host() {
        Some(h) => h.to_owned(),
        None => {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            h.parse::<http::uri::Authority>().ok()?.host().to_owned()
        }
    };
    Some(raw.trim_end_matches('.').to_ascii_lowercase())
}

async fn host_dispatch(
    State(proxy): State<Arc<Proxy>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let host = request_host(&req);
    let index = host.and_then(|h| {
        proxy
            .routes
            .iter()
            .position(|r| r.host.as_deref() == Some(h.as_str()))
    });
    match index {
        Some(i) => handle(proxy, i, req).await,
        None => next.run(req).await,
    }
}

/// Why a request was not forwarded. The client sees the status and the
/// family; the audit record sees the detail.
#[derive(Debug)]
enum Refusal {
    BadRequest(&'static str, String),
    Unauthenticated(&'static str),
    Forbidden(&'static str),
    Upstream(StatusCode, &'static str, String),
}

impl Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Refusal::BadRequest(..) => StatusCode::BAD_REQUEST,
            Refusal::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
            Refusal::Upstream(s, ..) => *s,
        }
    }

    /// The family: what the client and metrics see.
    fn family(&self) -> &'static str {
        match self {
            Refusal::BadRequest(f, _)
            | Refusal::Unauthenticated(f)
            | Refusal::Forbidden(f)
            | Refusal::Upstream(_, f, _) => f,
        }
    }

    fn response(&self) -> Response {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'a str,
            error_description: String,
        }
        let (error, description) = match self {
            Refusal::BadRequest(_, d) => ("invalid_request", d.clone()),
            Refusal::Unauthenticated(f) => (
                "invalid_token",
                format!("the cistern access token was refused ({f})"),
            ),
            Refusal::Forbidden(f) => (
                "insufficient_scope",
                format!("not allowed by the role's proxy rules ({f})"),
            ),
            Refusal::Upstream(_, f, _) => ("upstream_error", format!("the upstream failed ({f})")),
        };
        let mut res = (
            self.status(),
            axum::Json(Body {
                error,
                error_description: description,
            }),
        )
            .into_response();
        let h = res.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Refusal::Unauthenticated(_) | Refusal::Forbidden(_) = self {
            // RFC 6750 §3.
            let v = match self {
                Refusal::Unauthenticated(_) => "Bearer realm=\"cistern\", error=\"invalid_token\"",
                _ => "Bearer realm=\"cistern\", error=\"insufficient_scope\"",
            };
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(v));
        }
        res
    }
}

/// What the request is, once authenticated and authorized.
struct Allowed {
    claims: Arc<AccessTokenClaims>,
    rule: String,
}

/// The handler. Everything that needs no waiting (authenticate,
/// authorize, build the upstream request) runs before the future is made,
/// so what a request holds while it waits for an upstream connection is
/// only what that wait needs: at 1,000 busy client connections each holds
/// one (BENCHMARKS.md, proxy memory).
fn handle(
    proxy: Arc<Proxy>,
    index: usize,
    req: Request,
) -> impl std::future::Future<Output = Response> + Send + 'static {
    let step = admit(&proxy, index, req);
    async move {
        match (step, proxy.routes.get(index)) {
            (Step::Refuse(r), Some(route)) => refuse(&proxy, route, *r).await,
            (Step::Forward(f), Some(route)) => forward(&proxy, route, f).await,
            _ => StatusCode::NOT_FOUND.into_response(),
        }
    }
}

/// What [`admit`] decided.
enum Step {
    NoRoute,
    Refuse(Box<Refused>),
    Forward(Box<Forwarding>),
}

/// A refusal and its audit record.
struct Refused {
    refusal: Refusal,
    record: ProxyRecord,
    started: Instant,
}

/// An authorized request, ready to forward once the credential is in.
struct Forwarding {
    record: ProxyRecord,
    started: Instant,
    /// The upstream request, without the injected credential yet.
    upstream: http::Request<Body>,
    /// Bytes of the job's request body sent upstream.
    counter: audit::ByteCounter,
}

impl Forwarding {
    /// The refusal of this request, with its record.
    fn refused(self: Box<Self>, refusal: Refusal) -> Refused {
        Refused {
            refusal,
            record: self.record,
            started: self.started,
        }
    }
}

/// Authenticates and authorizes `req`, and builds the upstream request.
fn admit(proxy: &Proxy, index: usize, req: Request) -> Step {
    let started = Instant::now();
    let Some(route) = proxy.routes.get(index) else {
        return Step::NoRoute;
    };
    let mut record = ProxyRecord::new(&route.name, req.method().as_str(), proxy.clock.now_millis());
    let normalized = NormalPath::parse(req.uri().path());
    if let Ok(p) = &normalized {
        record.path = p.as_text();
    }
    let refused = |refusal, record| {
        Step::Refuse(Box::new(Refused {
            refusal,
            record,
            started,
        }))
    };
    let (allowed, rest) = match authorize(proxy, route, &req, normalized) {
        Ok(a) => a,
        Err((refusal, claims)) => {
            record.set_identity(claims.as_deref());
            return refused(refusal, record);
        }
    };
    record.set_identity(Some(&allowed.claims));
    record.path = rest.as_text();
    record.rule = Some(allowed.rule);
    let (parts, body) = req.into_parts();
    let mut target = format!("{}{}", route.upstream, record.path);
    if let Some(q) = parts.uri.query() {
        target.push('?');
        target.push_str(q);
    }
    let Ok(uri) = target.parse::<Uri>() else {
        let refusal = Refusal::BadRequest("path", "the forwarded URL is not valid".into());
        return refused(refusal, record);
    };
    let counter = audit::ByteCounter::default();
    let mut upstream =
        http::Request::new(Body::new(audit::Counted::new(body, counter.clone(), None)));
    *upstream.method_mut() = parts.method;
    *upstream.uri_mut() = uri;
    *upstream.headers_mut() = headers::request_headers(&parts.headers, &route.presenter.name);
    Step::Forward(Box::new(Forwarding {
        record,
        started,
        upstream,
        counter,
    }))
}

/// Answers a refusal: its audit record (waiting for room in the queue),
/// its metric, and the response naming its family.
///
/// Boxed: refusals are the cold path, and a future awaited in
/// [`forward`] takes its whole size in the state of every request.
fn refuse<'a>(
    proxy: &'a Proxy,
    route: &'a Route,
    r: Refused,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send + 'a>> {
    Box::pin(async move {
        let Refused {
            refusal,
            mut record,
            started,
        } = r;
        record.refused(refusal.family(), &refusal_detail(&refusal));
        proxy
            .metrics
            .proxy()
            .request(&route.name, refusal.family(), started.elapsed());
        proxy.audit.send(record).await;
        refusal.response()
    })
}

fn refusal_detail(r: &Refusal) -> String {
    match r {
        Refusal::BadRequest(_, d) | Refusal::Upstream(_, _, d) => d.clone(),
        Refusal::Unauthenticated(f) | Refusal::Forbidden(f) => (*f).to_owned(),
    }
}

type Denied = (Refusal, Option<Arc<AccessTokenClaims>>);

/// Authenticate, then authorize on the normalized path below the prefix.
fn authorize(
    proxy: &Proxy,
    route: &Route,
    req: &Request,
    path: Result<NormalPath, PathError>,
) -> Result<(Allowed, NormalPath), Denied> {
    let h = req.headers();
    // Protocol switches are refused before anything else. Ambiguous
    // framing never gets this far over HTTP/1.1 (hyper frames a request
    // with both headers by Transfer-Encoding, drops Content-Length and
    // closes the connection, RFC 9112 §6.3); the check stays as a guard,
    // and the upstream always gets cistern's own framing, never the job's.
    if h.contains_key(header::TRANSFER_ENCODING) && h.contains_key(header::CONTENT_LENGTH) {
        return Err((
            Refusal::BadRequest(
                "framing",
                "Content-Length together with Transfer-Encoding".into(),
            ),
            None,
        ));
    }
    if h.contains_key(header::UPGRADE) || req.method() == Method::CONNECT {
        return Err((
            Refusal::BadRequest("upgrade", "upgrades and CONNECT are not proxied".into()),
            None,
        ));
    }
    let path = path.map_err(|e| (Refusal::BadRequest("path", e.to_string()), None))?;
    if !path.starts_with(&route.prefix_segments) {
        return Err((
            Refusal::BadRequest("path", "the path leaves the route's prefix".into()),
            None,
        ));
    }
    let rest = path.strip_segments(route.prefix_segments.len());
    let claims = authenticate(proxy, h).map_err(|f| (Refusal::Unauthenticated(f), None))?;
    let denied = |f| Err((Refusal::Forbidden(f), Some(claims.clone())));
    if claims.aud != route.audience {
        return denied("audience");
    }
    if proxy.revocations.is_revoked(&credential_of(&claims)) {
        return Err((Refusal::Unauthenticated("revoked"), Some(claims)));
    }
    let set = proxy.policies.current();
    let Some(policy) = set.role(&claims.role) else {
        return denied("role");
    };
    match rules::first_match(
        policy.proxy_rules(),
        req.method().as_str(),
        &rest,
        &claims.pipeline,
    ) {
        Ok(rule) => Ok((
            Allowed {
                rule: rule.text().to_owned(),
                claims,
            },
            rest,
        )),
        Err(RuleMiss::NoRules) => denied("role"),
        Err(RuleMiss::Method) => denied("method"),
        Err(RuleMiss::Path) => denied("path"),
    }
}

/// The bearer token's claims, from the cache or verified now.
fn authenticate(
    proxy: &Proxy,
    h: &http::HeaderMap,
) -> Result<Arc<AccessTokenClaims>, &'static str> {
    let mut values = h.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err("missing");
    };
    let value = value.to_str().map_err(|_| "malformed")?;
    let (scheme, token) = value.split_once(' ').ok_or("malformed")?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err("malformed");
    }
    let token = token.trim();
    let now = proxy.clock.now_secs();
    if let Some(claims) = proxy.cache.get(token, now) {
        return Ok(claims);
    }
    let claims = verify_access_token(&proxy.keys, token, &proxy.issuer_url, None, now).map_err(
        |e| match e {
            OwnTokenError::Expired => "expired",
            OwnTokenError::NotYetValid => "not_yet_valid",
            _ => "invalid",
        },
    )?;
    Ok(proxy.cache.insert(token, claims, now))
}

/// Injects, forwards and answers. `record.path` is the normalized path
/// below the route's prefix: the one authorized, and the one forwarded.
///
/// The request stays in its box until it is sent, and a refusal takes it
/// whole: only the box's pointer is in the state across every `.await`.
async fn forward(proxy: &Proxy, route: &Route, mut f: Box<Forwarding>) -> Response {
    let now_ms = proxy.clock.now_millis();
    let secret = match route.credential.ready() {
        Some(ready) => ready,
        // Boxed: only a provider's token can need a round trip.
        None => Box::pin(route.credential.current(now_ms)).await,
    };
    let secret = match secret {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(route = %route.name, error = %e, "proxy: upstream credential unavailable");
            let refusal = Refusal::Upstream(StatusCode::BAD_GATEWAY, "credential", e);
            return refuse(proxy, route, f.refused(refusal)).await;
        }
    };
    let Some(injected) = route.presenter.value(&secret) else {
        let refusal = Refusal::Upstream(
            StatusCode::BAD_GATEWAY,
            "credential",
            "the credential is not a valid header value".into(),
        );
        return refuse(proxy, route, f.refused(refusal)).await;
    };
    drop(secret);
    f.upstream
        .headers_mut()
        .insert(route.presenter.name.clone(), injected);
    // The record's place in the audit queue, before anything is forwarded:
    // when the store falls behind, requests wait here instead of records
    // piling up in memory.
    let slot = proxy.audit.reserve().await;
    // The permit is held until the response body ends, when hyper hands
    // the connection back to the pool.
    let sent = tokio::time::timeout(route.timeout, async {
        // `None` only if the semaphore were closed, which it never is.
        let permit = route.connections.clone().acquire_owned().await.ok()?;
        let upstream = std::mem::take(&mut f.upstream);
        Some((permit, route.client.request(upstream).await))
    })
    .await;
    let (permit, response) = match sent {
        Ok(Some((permit, Ok(r)))) => (permit, r),
        Ok(None) => {
            let refusal = Refusal::Upstream(
                StatusCode::BAD_GATEWAY,
                "unreachable",
                "no upstream connection".into(),
            );
            return refuse(proxy, route, f.refused(refusal)).await;
        }
        Ok(Some((_, Err(e)))) => {
            tracing::warn!(route = %route.name, error = %e, "proxy: upstream request failed");
            let refusal = Refusal::Upstream(StatusCode::BAD_GATEWAY, "unreachable", e.to_string());
            return refuse(proxy, route, f.refused(refusal)).await;
        }
        Err(_) => {
            let refusal = Refusal::Upstream(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("no response within {:?}", route.timeout),
            );
            return refuse(proxy, route, f.refused(refusal)).await;
        }
    };
    let (mut parts, body) = response.into_parts();
    parts.headers = headers::response_headers(&parts.headers, &route.upstream, &route.public);
    // A small body is read before answering so head and body leave in one
    // write (its connection is back in the pool then); anything larger (or
    // unsized) streams, holding the connection's permit until it ends.
    let (body, permit) = match small_body_len(&parts.headers) {
        Some(len) => match tokio::time::timeout(
            route.timeout,
            axum::body::to_bytes(Body::new(body), usize::try_from(len).unwrap_or(0)),
        )
        .await
        {
            Ok(Ok(bytes)) => {
                drop(permit);
                (Body::from(bytes), None)
            }
            _ => {
                let refusal = Refusal::Upstream(
                    StatusCode::BAD_GATEWAY,
                    "unreachable",
                    "the upstream's body failed".into(),
                );
                return refuse(proxy, route, f.refused(refusal)).await;
            }
        },
        None => (Body::new(body), Some(permit)),
    };
    let Forwarding {
        mut record,
        started,
        counter,
        ..
    } = *f;
    record.status = Some(parts.status.as_u16());
    proxy
        .metrics
        .proxy()
        .request(&route.name, "forwarded", started.elapsed());
    // The record is sent when the response body ends (or the client goes
    // away), with both byte counts and the whole duration.
    let finish = audit::Finish {
        record,
        request_bytes: counter,
        started,
        slot,
        permit,
    };
    let body = Body::new(audit::Counted::new(
        body,
        audit::ByteCounter::default(),
        Some(finish),
    ));
    Response::from_parts(parts, body)
}

/// Bodies up to this size are read whole before the response is sent.
const SMALL_BODY: u64 = 16 * 1024;

fn small_body_len(h: &http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse::<u64>()
        .ok()
        .filter(|n| *n <= SMALL_BODY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_small_sized_bodies_are_read_whole() {
        let mut h = http::HeaderMap::new();
        assert_eq!(small_body_len(&h), None, "unsized: streamed");
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("16384"));
        assert_eq!(small_body_len(&h), Some(16_384));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("16385"));
        assert_eq!(small_body_len(&h), None);
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("x"));
        assert_eq!(small_body_len(&h), None);
    }
}
