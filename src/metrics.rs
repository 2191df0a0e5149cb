//! Prometheus metrics, in an explicit registry held by the app state.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `cistern_exchanges_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExchangeLabels {
    /// `granted`, `denied`, `dry_run` or `error`.
    pub outcome: String,
    /// The requested role, or `""` when none was named.
    pub role: String,
}

/// Labels of `cistern_jwks_fetches_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    /// Configured issuer name.
    pub issuer: String,
    /// `discovery` or `jwks`.
    pub document: String,
    /// `ok`, `error` or `not_modified`.
    pub outcome: String,
}

/// Labels of `cistern_errors_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The OAuth error code or internal error class.
    pub kind: String,
}

/// Labels keyed by issuer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabels {
    /// Configured issuer name.
    pub issuer: String,
}

/// All of cistern's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    exchanges: Family<ExchangeLabels, Counter>,
    latency: Histogram,
    fetches: Family<FetchLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    jwks_age: Family<IssuerLabels, Gauge>,
    policies_loaded: Gauge,
    credential_expiry: Family<ProviderLabels, Gauge>,
    credential_rotated: Family<ProviderLabels, Gauge>,
    credential_errors: Family<ProviderLabels, Counter>,
    needs_authorization: Family<ProviderLabels, Gauge>,
    proxy: crate::proxy::metrics::ProxyMetrics,
    connections: ConnectionMetrics,
}

/// What the listeners (`http/serve.rs`) report about their connections.
/// Cloning shares the values.
#[derive(Clone, Debug, Default)]
pub struct ConnectionMetrics {
    /// Connections being served now.
    pub open: Gauge,
    /// The `max_connections` in force.
    pub limit: Gauge,
    /// Connections closed because the client sent no first bytes, TLS
    /// handshake or whole request head in time.
    pub timed_out: Counter,
}

/// Labels of per-provider metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// Configured provider name.
    pub provider: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cistern");
        let exchanges = Family::<ExchangeLabels, Counter>::default();
        registry.register(
            "exchanges",
            "Token exchanges by outcome and role",
            exchanges.clone(),
        );
        // 50 µs … ~3.3 s
        let latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 17));
        registry.register(
            "exchange_duration_seconds",
            "Time to answer a token exchange",
            latency.clone(),
        );
        let fetches = Family::<FetchLabels, Counter>::default();
        registry.register(
            "jwks_fetches",
            "Discovery and JWKS fetches by issuer and outcome",
            fetches.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register("errors", "Errors answered, by kind", errors.clone());
        let jwks_age = Family::<IssuerLabels, Gauge>::default();
        registry.register(
            "jwks_age_seconds",
            "Age of the key set in use, per issuer",
            jwks_age.clone(),
        );
        let policies_loaded = Gauge::default();
        registry.register(
            "policies_loaded",
            "Roles in the policy set in force",
            policies_loaded.clone(),
        );
        let credential_expiry = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "provider_credential_expiry_timestamp_seconds",
            "When cistern's own credential for a provider expires (unix seconds)",
            credential_expiry.clone(),
        );
        let credential_rotated = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "provider_credential_rotated_timestamp_seconds",
            "When cistern last rotated its own credential for a provider (unix seconds)",
            credential_rotated.clone(),
        );
        let credential_errors = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "provider_credential_errors",
            "Failed checks or rotations of cistern's own provider credential",
            credential_errors.clone(),
        );
        let needs_authorization = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "provider_needs_authorization",
            "1 while a refresh-token provider has no usable refresh token, as of its last refresh or start (run `cistern provider authorize`)",
            needs_authorization.clone(),
        );
        let proxy = crate::proxy::metrics::ProxyMetrics::register(&mut registry);
        let connections = ConnectionMetrics::default();
        registry.register(
            "connections_open",
            "Connections being served (alert as it nears cistern_connections_limit)",
            connections.open.clone(),
        );
        registry.register(
            "connections_limit",
            "[server] max_connections: beyond it new clients wait in the listen backlog",
            connections.limit.clone(),
        );
        registry.register(
            "connections_timed_out",
            "Connections closed for sending no first bytes, TLS handshake or whole request head within [server] header_read_timeout",
            connections.timed_out.clone(),
        );
        Self {
            proxy,
            connections,
            registry,
            exchanges,
            latency,
            fetches,
            errors,
            jwks_age,
            policies_loaded,
            credential_expiry,
            credential_rotated,
            credential_errors,
            needs_authorization,
        }
    }

    /// The proxy's metrics.
    pub fn proxy(&self) -> &crate::proxy::metrics::ProxyMetrics {
        &self.proxy
    }

    /// The listeners' connection metrics, for [`crate::http::serve`].
    pub fn connections(&self) -> ConnectionMetrics {
        self.connections.clone()
    }

    /// Counts one exchange.
    pub fn exchange(&self, outcome: &str, role: &str) {
        self.exchanges
            .get_or_create(&ExchangeLabels {
                outcome: outcome.to_owned(),
                role: role.to_owned(),
            })
            .inc();
    }

    /// Records one exchange's latency.
    pub fn observe_latency(&self, secs: f64) {
        self.latency.observe(secs);
    }

    /// Counts one discovery/JWKS fetch.
    pub fn fetch(&self, issuer: &str, document: &str, outcome: &str) {
        self.fetches
            .get_or_create(&FetchLabels {
                issuer: issuer.to_owned(),
                document: document.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Counts one error by kind.
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Sets the age of an issuer's key set.
    pub fn set_jwks_age(&self, issuer: &str, secs: i64) {
        self.jwks_age
            .get_or_create(&IssuerLabels {
                issuer: issuer.to_owned(),
            })
            .set(secs);
    }

    /// Records the expiry (unix seconds) of cistern's own provider credential.
    pub fn set_credential_expiry(&self, provider: &str, unix_secs: i64) {
        self.credential_expiry
            .get_or_create(&ProviderLabels {
                provider: provider.to_owned(),
            })
            .set(unix_secs);
    }

    /// Records a rotation of cistern's own provider credential.
    pub fn set_credential_rotated(&self, provider: &str, unix_secs: i64) {
        self.credential_rotated
            .get_or_create(&ProviderLabels {
                provider: provider.to_owned(),
            })
            .set(unix_secs);
    }

    /// Whether a refresh-token provider needs an operator to re-authorize it.
    pub fn set_needs_authorization(&self, provider: &str, needed: bool) {
        self.needs_authorization
            .get_or_create(&ProviderLabels {
                provider: provider.to_owned(),
            })
            .set(i64::from(needed));
    }

    /// Counts a failed check or rotation of cistern's own provider credential.
    pub fn credential_error(&self, provider: &str) {
        self.credential_errors
            .get_or_create(&ProviderLabels {
                provider: provider.to_owned(),
            })
            .inc();
    }

    /// Sets the number of roles in force.
    pub fn set_policies_loaded(&self, n: usize) {
        self.policies_loaded
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
