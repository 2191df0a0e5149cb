//! The upstream side of a route: its pooled HTTP/1.1 + HTTP/2 client
//! (rustls) and the credential cistern injects.

use std::sync::Arc;

use axum::body::Body;
use base64::Engine as _;
use http::header::{AUTHORIZATION, HeaderName, HeaderValue};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use zeroize::Zeroizing;

use super::config::{Presentation, RouteConfig};
use crate::provider::gitlab::GitLab;
use crate::provider::{CredentialProvider, MintRequest, Providers};

/// The pooled client of one route.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Body>;

/// Why a route could not be set up (start-up errors).
#[derive(Debug, thiserror::Error)]
pub enum RouteSetupError {
    /// The CA bundle could not be read or holds no certificate.
    #[error("ca_file: {0}")]
    CaFile(String),
    /// The injected secret could not be read.
    #[error("secret: {0}")]
    Secret(String),
    /// The named provider is not configured.
    #[error("provider {0} is not configured")]
    Provider(String),
    /// The sealed secret is missing or cannot be opened.
    #[error("sealed secret: {0}")]
    Sealed(String),
}

/// Builds a route's client: connect timeout, TCP_NODELAY, TLS by rustls
/// (aws-lc-rs) against the system roots or the route's CA bundle, ALPN
/// `h2` and `http/1.1`.
pub fn client(cfg: &RouteConfig) -> Result<UpstreamClient, RouteSetupError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| RouteSetupError::CaFile(e.to_string()))?;
    let tls = match &cfg.ca_file {
        Some(path) => {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject as _;
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| RouteSetupError::CaFile(format!("{}: {e}", path.display())))?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| RouteSetupError::CaFile(format!("{}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| RouteSetupError::CaFile(format!("{}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(RouteSetupError::CaFile(format!(
                    "{}: no certificate",
                    path.display()
                )));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // A system bundle may hold certificates rustls cannot use; skip those.
                let _ = roots.add(cert);
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        // A connection opened in a checkout race beyond the cap is closed
        // when it comes back rather than kept.
        .pool_max_idle_per_host(cfg.max_connections as usize)
        .build(https))
}

/// Where the injected credential comes from.
pub enum CredentialSource {
    /// A secret held by cistern only (environment or file, read at start).
    Static(Zeroizing<String>),
    /// A secret sealed in the store, re-read by [`CredentialSource::refresh`].
    Sealed {
        /// The secret in use.
        current: arc_swap::ArcSwap<Zeroizing<String>>,
        /// Its name in the store.
        store_name: String,
        /// The key it is sealed under.
        kek: crate::provider::sealed::Kek,
    },
    /// A GitLab provider's own credential, as rotated by cistern.
    GitLab(Arc<GitLab>),
    /// A token from an OAuth 2.0 provider (cached there until near expiry).
    OAuth {
        /// The provider.
        provider: Arc<dyn CredentialProvider>,
        /// Scopes asked for.
        scopes: Vec<String>,
        /// The route, for the provider's records.
        route: String,
    },
}

impl std::fmt::Debug for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CredentialSource::Static(_) => "Static(<redacted>)",
            CredentialSource::Sealed { .. } => "Sealed(<redacted>)",
            CredentialSource::GitLab(_) => "GitLab",
            CredentialSource::OAuth { .. } => "OAuth",
        })
    }
}

impl CredentialSource {
    /// The route's source, from its config (a sealed secret is read from
    /// `store` now).
    pub async fn of(
        name: &str,
        cfg: &RouteConfig,
        providers: &Providers,
        store: &dyn crate::store::Store,
    ) -> Result<CredentialSource, RouteSetupError> {
        if let Some(kek) = cfg.kek().map_err(RouteSetupError::Sealed)? {
            let store_name = RouteConfig::sealed_name(name);
            // None yet: the route answers 502 until `set-secret` runs (picked
            // up by the refresh), instead of the server refusing to start.
            let secret = match open_sealed(store, &store_name, &kek).await? {
                Some(s) => s,
                None => {
                    tracing::warn!(
                        route = name,
                        "no sealed secret in the store yet: run `cistern route set-secret {name}`"
                    );
                    Zeroizing::new(String::new())
                }
            };
            return Ok(CredentialSource::Sealed {
                current: arc_swap::ArcSwap::from_pointee(secret),
                store_name,
                kek,
            });
        }
        if let Some(p) = &cfg.provider {
            if let Some(g) = providers.gitlab(p) {
                return Ok(CredentialSource::GitLab(g.clone()));
            }
            let provider = providers
                .get(p)
                .ok_or_else(|| RouteSetupError::Provider(p.clone()))?;
            return Ok(CredentialSource::OAuth {
                provider: provider.clone(),
                scopes: cfg.scopes.clone(),
                route: name.to_owned(),
            });
        }
        crate::provider::read_secret(cfg.secret_env.as_deref(), cfg.secret_file.as_deref())
            .map(CredentialSource::Static)
            .map_err(|e| RouteSetupError::Secret(e.to_string()))
    }

    /// Re-reads a sealed secret from the store (a replaced one takes over);
    /// other sources have nothing to refresh.
    pub async fn refresh(&self, store: &dyn crate::store::Store) -> Result<(), RouteSetupError> {
        if let CredentialSource::Sealed {
            current,
            store_name,
            kek,
        } = self
        {
            let Some(secret) = open_sealed(store, store_name, kek).await? else {
                return Ok(());
            };
            if secret.as_bytes() != current.load().as_bytes() {
                current.store(Arc::new(secret));
                tracing::info!(route = %store_name, "a replaced sealed proxy secret is in use");
            }
        }
        Ok(())
    }

    /// The credential to inject now, when that needs no I/O (every
    /// source but a provider's token); `None` means call [`Self::current`].
    /// The error never contains a secret.
    pub fn ready(&self) -> Option<Result<Zeroizing<String>, String>> {
        Some(match self {
            CredentialSource::Static(s) => Ok(s.clone()),
            CredentialSource::Sealed {
                current,
                store_name,
                ..
            } => {
                let secret = current.load();
                if secret.is_empty() {
                    let route = store_name.strip_prefix("proxy:").unwrap_or(store_name);
                    Err(format!(
                        "no sealed secret yet: run `cistern route set-secret {route}`"
                    ))
                } else {
                    Ok(Zeroizing::new(secret.as_str().to_owned()))
                }
            }
            CredentialSource::GitLab(g) => Ok(Zeroizing::new(g.credential().as_str().to_owned())),
            CredentialSource::OAuth { .. } => return None,
        })
    }

    /// The credential to inject now. The error never contains a secret.
    pub async fn current(&self, now_ms: i64) -> Result<Zeroizing<String>, String> {
        if let Some(ready) = self.ready() {
            return ready;
        }
        match self {
            CredentialSource::OAuth {
                provider,
                scopes,
                route,
            } => {
                let jti = format!("proxy:{route}");
                provider
                    .mint(&MintRequest {
                        jti: &jti,
                        target: "",
                        scopes,
                        access_level: 0,
                        ttl: std::time::Duration::ZERO,
                        now_ms,
                        description: format!("cistern proxy route {route}"),
                    })
                    .await
                    .map(|m| m.secret)
                    .map_err(|e| e.to_string())
            }
            // Answered by `ready` above.
            _ => Err("no credential source".into()),
        }
    }
}

/// The sealed secret named `store_name`, opened; `None` when there is none yet.
async fn open_sealed(
    store: &dyn crate::store::Store,
    store_name: &str,
    kek: &crate::provider::sealed::Kek,
) -> Result<Option<Zeroizing<String>>, RouteSetupError> {
    let Some((sealed, _)) = store
        .sealed_credential(store_name)
        .await
        .map_err(|e| RouteSetupError::Sealed(e.to_string()))?
    else {
        return Ok(None);
    };
    kek.open(store_name, &sealed)
        .map(Some)
        .map_err(|e| RouteSetupError::Sealed(e.to_string()))
}

/// How a route presents its credential: the header and how to build its value.
#[derive(Debug, Clone)]
pub struct Presenter {
    /// The header set on every forwarded request.
    pub name: HeaderName,
    kind: Presentation,
    basic_username: String,
}

impl Presenter {
    /// From the route's config (already validated).
    pub fn of(cfg: &RouteConfig) -> Presenter {
        let name = match cfg.present {
            Presentation::Bearer | Presentation::Basic => AUTHORIZATION,
            Presentation::PrivateToken => HeaderName::from_static("private-token"),
            Presentation::Header => cfg
                .header_name
                .as_deref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .unwrap_or(AUTHORIZATION),
        };
        Presenter {
            name,
            kind: cfg.present,
            basic_username: cfg.basic_username.clone().unwrap_or_default(),
        }
    }

    /// The header value, marked sensitive (HTTP/2 never indexes it).
    pub fn value(&self, secret: &str) -> Option<HeaderValue> {
        let text = Zeroizing::new(match self.kind {
            Presentation::Bearer => format!("Bearer {secret}"),
            Presentation::Basic => {
                let pair = Zeroizing::new(format!("{}:{secret}", self.basic_username));
                format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
                )
            }
            Presentation::PrivateToken | Presentation::Header => secret.to_owned(),
        });
        let mut v = HeaderValue::from_str(&text).ok()?;
        v.set_sensitive(true);
        Some(v)
    }
}
