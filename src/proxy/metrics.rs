//! The proxy's Prometheus metrics, registered in cistern's one registry.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of proxied requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route's name.
    pub route: String,
    /// `forwarded`, or the refusal family (`path`, `method`, `revoked`, …).
    pub outcome: String,
}

/// Requests by route and outcome, the time to the response head, audit failures.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    requests: Family<RouteLabels, Counter>,
    latency: Histogram,
    audit_failures: Counter,
}

impl ProxyMetrics {
    /// Registers the proxy's metrics.
    pub fn register(registry: &mut Registry) -> ProxyMetrics {
        let requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "proxy_requests",
            "Proxied requests by route and outcome",
            requests.clone(),
        );
        // 20 µs … ~5 s
        let latency = Histogram::new(exponential_buckets(0.000_02, 2.0, 18));
        registry.register(
            "proxy_duration_seconds",
            "Time from a proxied request to its response head",
            latency.clone(),
        );
        let audit_failures = Counter::default();
        registry.register(
            "proxy_audit_failures",
            "Proxy audit records the store failed to write",
            audit_failures.clone(),
        );
        ProxyMetrics {
            requests,
            latency,
            audit_failures,
        }
    }

    /// Counts one request and its time to the response head.
    pub fn request(&self, route: &str, outcome: &str, elapsed: Duration) {
        self.requests
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        self.latency.observe(elapsed.as_secs_f64());
    }

    /// Counts an audit record the store failed to write.
    pub fn audit_failed(&self) {
        self.audit_failures.inc();
    }
}
