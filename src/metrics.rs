//! Prometheus metrics, in an explicit registry held by the app state.

use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
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
    store: Arc<StoreCollector>,
}

/// The store's writer counters, read from the store on each scrape (they
/// live in the writer; copying them into the registry on every batch
/// would cost the hot path for nothing).
#[derive(Default)]
struct StoreCollector {
    store: OnceLock<Arc<dyn crate::store::Store>>,
}

impl std::fmt::Debug for StoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreCollector")
            .field("watching", &self.store.get().is_some())
            .finish()
    }
}

impl Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(store) = self.store.get() else {
            return Ok(());
        };
        let s = store.stats();
        // Counts as f64: exact far beyond any count a store reaches, and
        // the batch time is seconds.
        #[allow(clippy::cast_precision_loss)]
        let counters: [(&str, &str, f64); 5] = [
            (
                "store_write_requests",
                "Write requests the store's writer answered (exchanges, audit records, revocations, …)",
                s.requests as f64,
            ),
            (
                "store_commits",
                "Transactions the store's writer committed (write requests / commits = the mean group-commit batch)",
                s.commits as f64,
            ),
            (
                "store_failed_batches",
                "Batches whose transaction failed as a whole: every request in them was refused (alert on any)",
                s.failed_batches as f64,
            ),
            (
                "audit_sink_failures",
                "Batches an audit sink ([[audit.sinks]]) failed to write: the sink misses them (alert on any)",
                s.sink_failures as f64,
            ),
            (
                "store_batch_seconds",
                "Time the store's writer spent writing and committing batches (with cistern_store_commits_total: the mean time a batch holds its requests)",
                s.batch_nanos as f64 / 1e9,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
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
        let store = Arc::new(StoreCollector::default());
        registry.register_collector(Box::new(store.clone()));
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
            store,
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

    /// Reports `store`'s writer counters from now on (`cistern_store_*`,
    /// `cistern_audit_sink_failures_total`). Only the first store given is
    /// watched: a process serves from one store.
    pub fn watch_store(&self, store: Arc<dyn crate::store::Store>) {
        if self.store.store.set(store).is_err() {
            tracing::debug!("metrics already watch a store; the second one is not reported");
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::audit::sink::FileSink;
    use crate::config::Synchronous;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{AuditEvent, AuditKind, Store};

    fn event() -> AuditEvent {
        AuditEvent {
            at_ms: 1_700_000_000_000,
            kind: AuditKind::ExchangeDenied,
            issuer: None,
            role: None,
            project_id: None,
            reason: Some("malformed".into()),
            detail: serde_json::json!({ "n": 1 }).into(),
        }
    }

    fn value(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test]
    async fn the_store_counters_are_read_on_each_scrape() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("c.db"), Synchronous::Normal).unwrap();
        let metrics = Metrics::new();
        // Not watching yet: nothing about a store.
        assert!(!metrics.encode().contains("cistern_store_"));
        metrics.watch_store(Arc::new(store.clone()));
        assert_eq!(
            value(&metrics.encode(), "cistern_store_commits_total"),
            Some(0.0)
        );
        for _ in 0..3 {
            store.append_audit(event()).await.unwrap();
        }
        let text = metrics.encode();
        assert_eq!(
            value(&text, "cistern_store_write_requests_total"),
            Some(3.0),
            "{text}"
        );
        let commits = value(&text, "cistern_store_commits_total").unwrap();
        assert!((1.0..=3.0).contains(&commits), "{text}");
        assert_eq!(
            value(&text, "cistern_store_failed_batches_total"),
            Some(0.0)
        );
        assert_eq!(value(&text, "cistern_audit_sink_failures_total"), Some(0.0));
        assert!(
            value(&text, "cistern_store_batch_seconds_total").unwrap() > 0.0,
            "{text}"
        );
        assert!(
            text.contains("# TYPE cistern_store_commits counter"),
            "{text}"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn a_failing_audit_sink_shows_in_the_metrics() {
        let dir = tempfile::tempdir().unwrap();
        // A sink that cannot write, and the store told to carry on without it.
        let sink = FileSink::open(Path::new("/dev/full"), 1 << 20, 1).unwrap();
        let store = SqliteStore::open_with_sinks(
            &dir.path().join("c.db"),
            Synchronous::Normal,
            vec![Box::new(sink)],
            false,
        )
        .unwrap();
        let metrics = Metrics::new();
        metrics.watch_store(Arc::new(store.clone()));
        store.append_audit(event()).await.unwrap();
        let text = metrics.encode();
        assert_eq!(
            value(&text, "cistern_audit_sink_failures_total"),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            value(&text, "cistern_store_failed_batches_total"),
            Some(0.0),
            "{text}"
        );
        store.close().await;
    }
}
