//! `[proxy]` and `[proxy.routes.<name>]`: where the identity-aware proxy
//! forwards, and which credential it injects.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::config::{ProviderConfig, is_loopback_host};
use crate::source::{Source, SourceError};

/// `[proxy]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Listener of `cistern proxy` (the proxy run alone). Under
    /// `cistern serve` the routes are served on `server.listen`.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Verified tokens kept in memory (by token hash, until their `exp`).
    #[serde(default = "default_token_cache")]
    pub token_cache: usize,
    /// How often sealed route secrets are re-read from the store.
    #[serde(default = "default_secret_refresh", with = "humantime_serde")]
    pub secret_refresh: Duration,
    /// Routes by name.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteConfig>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: None,
            token_cache: default_token_cache(),
            secret_refresh: default_secret_refresh(),
            routes: BTreeMap::new(),
        }
    }
}

fn default_secret_refresh() -> Duration {
    Duration::from_secs(30)
}

fn default_token_cache() -> usize {
    100_000
}

/// How the injected credential is presented upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Presentation {
    /// `Authorization: Bearer <credential>`.
    Bearer,
    /// `PRIVATE-TOKEN: <credential>` (GitLab).
    PrivateToken,
    /// `Authorization: Basic base64(<basic_username>:<credential>)`.
    Basic,
    /// `<header_name>: <credential>`.
    Header,
}

/// `[proxy.routes.<name>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix on cistern's listener (default `/proxy/<name>`)…
    #[serde(default)]
    pub prefix: Option<String>,
    /// …or a host name: every request whose `Host` (HTTP/2 `:authority`)
    /// is this name, whatever its path, goes to this route (a DNS name
    /// pointed at cistern, e.g. `gitlab-proxy.example.com`).
    #[serde(default)]
    pub host: Option<String>,
    /// Upstream base URL; the request path below the prefix is appended.
    pub upstream: Url,
    /// The audience a cistern token must carry to use this route; policies
    /// grant it (`[grant] audience`).
    pub audience: String,
    /// Where clients reach this route, for rewriting upstream `Location`
    /// and `Link` headers (default: `server.issuer` + prefix).
    #[serde(default)]
    pub public_url: Option<Url>,
    /// The credential injected: read from this environment variable…
    #[serde(default)]
    pub secret_env: Option<String>,
    /// …or this file (held by cistern only)…
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// …or taken from this provider: a GitLab provider's own (rotated)
    /// credential, or an OAuth 2.0 provider's token for `scopes`…
    #[serde(default)]
    pub provider: Option<String>,
    /// …or sealed in the store (`cistern route set-secret <name>`),
    /// encrypted at rest under the key-encryption key below and re-read
    /// every `secret_refresh`, so a replaced secret is picked up without a
    /// restart.
    #[serde(default)]
    pub sealed: bool,
    /// The key-encryption key of a sealed secret (32 bytes, base64), from
    /// this environment variable…
    #[serde(default)]
    pub kek_env: Option<String>,
    /// …or this file.
    #[serde(default)]
    pub kek_file: Option<PathBuf>,
    /// Scopes asked of an OAuth 2.0 provider.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// How the credential is presented.
    pub present: Presentation,
    /// The header of `present = "header"`.
    #[serde(default)]
    pub header_name: Option<String>,
    /// The user name of `present = "basic"`.
    #[serde(default)]
    pub basic_username: Option<String>,
    /// PEM CA bundle trusted for the upstream instead of the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Allow `http://` upstreams on loopback (tests, sidecars).
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// Connecting to the upstream (TCP + TLS).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Until the upstream's response headers arrive (bodies stream on);
    /// waiting for a free upstream connection counts.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Upstream connections open at most. A request beyond it waits for
    /// one to come free (within `timeout`), so a burst of clients cannot
    /// open a connection, and its buffers, each.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

fn default_max_connections() -> u32 {
    128
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

impl RouteConfig {
    /// The name a sealed secret of route `name` has in the store.
    pub fn sealed_name(name: &str) -> String {
        format!("proxy:{name}")
    }

    /// The key-encryption key of a sealed secret (`None` when not sealed).
    pub fn kek(&self) -> Result<Option<crate::provider::sealed::Kek>, String> {
        if !self.sealed {
            return Ok(None);
        }
        let text = crate::provider::read_secret(self.kek_env.as_deref(), self.kek_file.as_deref())?;
        crate::provider::sealed::Kek::from_base64(&text)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// The route's prefix, normalized (no trailing `/`); empty for a host route.
    pub fn prefix_of(&self, name: &str) -> String {
        if self.host.is_some() {
            return String::new();
        }
        let p = self
            .prefix
            .clone()
            .unwrap_or_else(|| format!("/proxy/{name}"));
        p.trim_end_matches('/').to_owned()
    }
}

/// Headers a route may not inject into: they are cistern's own or framing.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "cookie",
];

impl ProxyConfig {
    /// Cross-field checks; errors name the field and line.
    pub fn validate(
        &self,
        src: &Source,
        providers: &BTreeMap<String, ProviderConfig>,
    ) -> Result<(), SourceError> {
        if self.token_cache == 0 {
            return Err(src.error("proxy.token_cache", "must be at least 1"));
        }
        if self.secret_refresh < Duration::from_millis(10) {
            return Err(src.error("proxy.secret_refresh", "must be at least 10ms"));
        }
        let mut prefixes: BTreeMap<String, &str> = BTreeMap::new();
        let mut audiences: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, r) in &self.routes {
            let field = |f: &str| format!("proxy.routes.{name}.{f}");
            if let Some(host) = &r.host {
                let ok = !host.is_empty()
                    && host.len() <= 253
                    && host.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                    })
                    && !host.starts_with(['.', '-'])
                    && !host.ends_with('.');
                if !ok || r.prefix.is_some() {
                    return Err(src.error(
                        &field("host"),
                        "a lower-case DNS name without port, and no prefix beside it",
                    ));
                }
                if let Some(other) = prefixes.insert(format!("host:{host}"), name) {
                    return Err(src.error(&field("host"), format!("same host as route {other}")));
                }
            }
            if r.host.is_none() {
                let prefix = r.prefix_of(name);
                let ok_prefix = prefix.starts_with('/')
                    && prefix.len() > 1
                    && crate::proxy::path::NormalPath::parse(&prefix)
                        .is_ok_and(|p| p.as_text() == prefix);
                if !ok_prefix {
                    return Err(src.error(
                        &field("prefix"),
                        "must be a normalized absolute path below / (e.g. /proxy/gitlab)",
                    ));
                }
                const API: &[&str] = &[
                    "oauth",
                    "v1",
                    ".well-known",
                    "healthz",
                    "readyz",
                    "metrics",
                    "dev",
                ];
                let first = prefix
                    .trim_start_matches('/')
                    .split('/')
                    .next()
                    .unwrap_or("");
                if API.contains(&first) {
                    return Err(src.error(
                        &field("prefix"),
                        format!("/{first} is cistern's own API; choose another prefix"),
                    ));
                }
                if let Some(other) = prefixes.insert(prefix.clone(), name) {
                    return Err(
                        src.error(&field("prefix"), format!("same prefix as route {other}"))
                    );
                }
            }
            let u = &r.upstream;
            if u.scheme() != "https"
                && !(u.scheme() == "http" && r.allow_insecure_http && is_loopback_host(u))
            {
                return Err(src.error(
                    &field("upstream"),
                    "must be https (http only on loopback with allow_insecure_http)",
                ));
            }
            if u.host().is_none()
                || !u.username().is_empty()
                || u.password().is_some()
                || u.query().is_some()
                || u.fragment().is_some()
            {
                return Err(src.error(
                    &field("upstream"),
                    "must be a base URL with a host and no credentials, query or fragment",
                ));
            }
            if r.audience.is_empty() || r.audience.chars().any(char::is_whitespace) {
                return Err(src.error(&field("audience"), "must be non-empty without whitespace"));
            }
            if let Some(other) = audiences.insert(&r.audience, name) {
                return Err(src.error(
                    &field("audience"),
                    format!("same audience as route {other}: a token must name one route"),
                ));
            }
            let sources = usize::from(r.secret_env.is_some())
                + usize::from(r.secret_file.is_some())
                + usize::from(r.provider.is_some())
                + usize::from(r.sealed);
            if sources != 1 {
                return Err(src.error(
                    &field("secret_env"),
                    "set exactly one of secret_env, secret_file, provider and sealed = true",
                ));
            }
            if r.sealed != (r.kek_env.is_some() != r.kek_file.is_some())
                || (!r.sealed && (r.kek_env.is_some() || r.kek_file.is_some()))
            {
                return Err(src.error(
                    &field("kek_env"),
                    "sealed = true needs exactly one of kek_env and kek_file (and only it uses them)",
                ));
            }
            if let Some(p) = &r.provider {
                match providers.get(p) {
                    None => {
                        return Err(src.error(
                            &field("provider"),
                            format!("no [providers.{p}] in the config"),
                        ));
                    }
                    Some(ProviderConfig::Gitlab(_)) if !r.scopes.is_empty() => {
                        return Err(src.error(
                            &field("scopes"),
                            "a GitLab provider injects its own credential; scopes are for OAuth 2.0 providers",
                        ));
                    }
                    Some(_) => {}
                }
            }
            match r.present {
                Presentation::Header => {
                    let ok = r.header_name.as_deref().is_some_and(|h| {
                        http::HeaderName::from_bytes(h.as_bytes())
                            .is_ok_and(|n| !RESERVED_HEADERS.contains(&n.as_str()))
                    });
                    if !ok {
                        return Err(src.error(
                            &field("header_name"),
                            "present = \"header\" needs a valid header name (not Host, Cookie or a framing header)",
                        ));
                    }
                }
                Presentation::Basic => {
                    if r.basic_username.as_deref().is_none_or(|u| u.contains(':')) {
                        return Err(src.error(
                            &field("basic_username"),
                            "present = \"basic\" needs a user name without `:`",
                        ));
                    }
                }
                Presentation::Bearer | Presentation::PrivateToken => {}
            }
            if r.connect_timeout.is_zero() || r.timeout.is_zero() {
                return Err(src.error(&field("timeout"), "timeouts must be positive"));
            }
            if r.max_connections == 0 {
                return Err(src.error(&field("max_connections"), "must be at least 1"));
            }
        }
        Ok(())
    }

    /// Resolves relative paths against the config file's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        for r in self.routes.values_mut() {
            for p in [&mut r.secret_file, &mut r.ca_file, &mut r.kek_file]
                .into_iter()
                .flatten()
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
    }
}
