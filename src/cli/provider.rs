//! `cistern provider set-credential`: loads cistern's own credential for a
//! provider once, sealed into the store (on the server's host).
//! `cistern provider authorize`: the one-time authorization of a
//! refresh-token provider (authorization code + PKCE through the operator's
//! browser, a loopback redirect), sealing the refresh token into the store.
//! `cistern provider check-secret`: proves a client secret at the IdP's
//! token endpoint, for rotating it without an outage.

use std::io::Read as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use super::inventory::load_config;
use super::{CliError, exit};
use crate::config::{ClientAuthMethod, ProviderConfig, StoreConfig};
use crate::provider::authorize::{Attempt, AuthorizeError};
use crate::provider::oauth2::{TokenEndpoint, TokenError, fingerprint};
use crate::provider::oauth2_refresh::{State, audit_event, kek_of};
use crate::store::sqlite::SqliteStore;
use crate::store::{AuditEvent, AuditKind, Store};

/// `cistern provider …`
#[derive(Debug, Subcommand)]
pub enum ProviderCommand {
    /// Seal cistern's own credential for a provider (read from standard
    /// input) into the store; the server uses it from its next start and
    /// rotates it from then on.
    SetCredential(SetCredentialArgs),
    /// Authorize a refresh-token provider once: prints the IdP's
    /// authorization URL (open it in a browser), receives the redirect on a
    /// loopback port, and seals the refresh token into the store. Also the
    /// fix when the provider needs re-authorization; a running server picks
    /// it up without a restart.
    Authorize(AuthorizeArgs),
    /// Prove a client secret at the provider's token endpoint without
    /// minting anything (rotation: check the new secret before removing the
    /// old one at the IdP). Exit 0 accepted, 1 refused, 3 unreachable.
    CheckSecret(CheckSecretArgs),
}

/// `cistern provider authorize`
#[derive(Debug, Args)]
pub struct AuthorizeArgs {
    /// The provider's name (`[providers.<name>]`, kind `oauth2_refresh_token`).
    pub name: String,
    /// Config file (names the provider, the store and the key-encryption key).
    #[arg(long, short, env = "CISTERN_CONFIG", default_value = "cistern.toml")]
    pub config: PathBuf,
    /// Loopback port for the redirect (default: the provider's `redirect_port`; 0 = any free one).
    #[arg(long)]
    pub port: Option<u16>,
    /// How long to wait for the redirect (default: the provider's `authorize_timeout`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

/// `cistern provider check-secret`
#[derive(Debug, Args)]
pub struct CheckSecretArgs {
    /// The provider's name (an `oauth2_client_credentials` or `oauth2_refresh_token` provider).
    pub name: String,
    /// Config file.
    #[arg(long, short, env = "CISTERN_CONFIG", default_value = "cistern.toml")]
    pub config: PathBuf,
    /// Check the secret in this environment variable instead of the configured one.
    #[arg(long, conflicts_with = "secret_file")]
    pub secret_env: Option<String>,
    /// Check the secret in this file instead of the configured one.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
}

/// `cistern provider set-credential`
#[derive(Debug, Args)]
pub struct SetCredentialArgs {
    /// The provider's name (`[providers.<name>]`).
    pub name: String,
    /// Config file (names the store and the key-encryption key).
    #[arg(long, short, env = "CISTERN_CONFIG", default_value = "cistern.toml")]
    pub config: PathBuf,
}

/// `cistern route …`
#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Seal the secret a proxy route injects (read from standard input)
    /// into the store, encrypted under the route's key-encryption key; a
    /// running server picks it up within `[proxy] secret_refresh`.
    SetSecret(SetSecretArgs),
}

/// `cistern route set-secret`
#[derive(Debug, Args)]
pub struct SetSecretArgs {
    /// The route's name (`[proxy.routes.<name>]`, with `sealed = true`).
    pub name: String,
    /// Config file (names the store and the key-encryption key).
    #[arg(long, short, env = "CISTERN_CONFIG", default_value = "cistern.toml")]
    pub config: PathBuf,
}

/// Runs `cistern route set-secret`.
pub async fn set_route_secret(args: &SetSecretArgs) -> Result<(), CliError> {
    let config = load_config(&args.config)?;
    let usage = |m: String| CliError::new(exit::USAGE, m);
    let route = config
        .proxy
        .routes
        .get(&args.name)
        .ok_or_else(|| usage(format!("no [proxy.routes.{}] in the config", args.name)))?;
    let kek = route
        .kek()
        .map_err(|e| {
            usage(format!(
                "proxy.routes.{}: key-encryption key: {e}",
                args.name
            ))
        })?
        .ok_or_else(|| {
            usage(format!(
                "proxy.routes.{} is not `sealed = true`: nothing would be sealed",
                args.name
            ))
        })?;
    let store_name = crate::proxy::config::RouteConfig::sealed_name(&args.name);
    seal_from_stdin(
        &config,
        &store_name,
        &kek,
        "proxy_secret_loaded",
        json!({ "route": args.name, "source": "cli" }),
    )
    .await?;
    eprintln!(
        "sealed the secret of proxy route {} into the store; a running server uses it within [proxy] secret_refresh",
        args.name
    );
    Ok(())
}

/// Runs `cistern provider set-credential`.
pub async fn set_credential(args: &SetCredentialArgs) -> Result<(), CliError> {
    let config = load_config(&args.config)?;
    let usage = |m: String| CliError::new(exit::USAGE, m);
    let Some(ProviderConfig::Gitlab(g)) = config.providers.get(&args.name) else {
        return Err(usage(format!("no [providers.{}] in the config", args.name)));
    };
    let kek = crate::provider::rotation::kek_of(g)
        .map_err(|e| usage(format!("providers.{}: key-encryption key: {e}", args.name)))?
        .ok_or_else(|| {
            usage(format!(
                "providers.{} has no kek_env or kek_file: nothing would be sealed",
                args.name
            ))
        })?;
    seal_from_stdin(
        &config,
        &args.name,
        &kek,
        "provider_credential_loaded",
        json!({ "provider": args.name, "source": "cli" }),
    )
    .await?;
    eprintln!(
        "sealed the credential for provider {} into the store; restart the server to use it",
        args.name
    );
    Ok(())
}

/// Reads one secret from standard input, seals it under `kek` for
/// `store_name` and saves it in the config's store with an audit record
/// (`reason`, `detail`; never the secret).
pub(super) async fn seal_from_stdin(
    config: &crate::config::Config,
    store_name: &str,
    kek: &crate::provider::sealed::Kek,
    reason: &str,
    detail: serde_json::Value,
) -> Result<(), CliError> {
    let usage = |m: String| CliError::new(exit::USAGE, m);
    let mut input = Zeroizing::new(String::new());
    std::io::stdin()
        .take(64 * 1024)
        .read_to_string(&mut input)
        .map_err(|e| usage(format!("reading the secret from standard input: {e}")))?;
    let secret = Zeroizing::new(input.trim().to_owned());
    if secret.is_empty() || secret.chars().any(|c| c.is_control() || c == ' ') {
        return Err(usage(
            "the secret on standard input is empty or malformed".into(),
        ));
    }
    let sealed = kek
        .seal(store_name, secret.as_str())
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    let StoreConfig::Sqlite { path, synchronous } = &config.store;
    let store = SqliteStore::open(path, *synchronous)
        .map_err(|e| CliError::new(exit::UNAVAILABLE, format!("opening the store: {e}")))?;
    let audit = AuditEvent {
        at_ms: now_ms(),
        kind: AuditKind::AdminAction,
        issuer: None,
        role: None,
        project_id: None,
        reason: Some(reason.to_owned()),
        detail: detail.into(),
    };
    store
        .save_sealed_credential(store_name, sealed, None, audit)
        .await
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    store.close().await;
    Ok(())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn token_error(e: TokenError, what: &str) -> CliError {
    match e {
        TokenError::Refused { .. } => {
            CliError::new(exit::DENIED, format!("{what}: the IdP refused: {e}"))
        }
        TokenError::Unavailable(_) | TokenError::BadResponse(_) => {
            CliError::new(exit::UNAVAILABLE, format!("{what}: {e}"))
        }
    }
}

/// What the redirect listener reports: the code, or why the attempt failed.
type Outcome = Result<Zeroizing<String>, AuthorizeError>;

#[derive(Clone)]
struct Callback {
    attempt: Arc<Attempt>,
    tx: mpsc::Sender<Outcome>,
}

async fn callback(
    axum::extract::State(cb): axum::extract::State<Callback>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> (http::StatusCode, &'static str) {
    let outcome = cb.attempt.code_from(query.as_deref().unwrap_or(""));
    match outcome {
        Err(AuthorizeError::StateMismatch) => {
            // A stale tab or a forgery: not this attempt's answer; keep waiting.
            eprintln!("ignored a redirect whose state does not match this attempt");
            (
                http::StatusCode::BAD_REQUEST,
                "cistern: this redirect does not belong to the running authorization (state mismatch).\n",
            )
        }
        outcome => {
            let ok = outcome.is_ok();
            let _ = cb.tx.send(outcome).await;
            if ok {
                (
                    http::StatusCode::OK,
                    "cistern: authorization received; you can close this window and return to the terminal.\n",
                )
            } else {
                (
                    http::StatusCode::BAD_REQUEST,
                    "cistern: the authorization failed; see the terminal.\n",
                )
            }
        }
    }
}

/// Runs `cistern provider authorize`.
pub async fn authorize(args: &AuthorizeArgs) -> Result<(), CliError> {
    let config = load_config(&args.config)?;
    let usage = |m: String| CliError::new(exit::USAGE, m);
    let name = &args.name;
    let Some(ProviderConfig::Oauth2RefreshToken(cfg)) = config.providers.get(name) else {
        return Err(usage(format!(
            "no [providers.{name}] of kind oauth2_refresh_token in the config"
        )));
    };
    let kek =
        kek_of(cfg).map_err(|e| usage(format!("providers.{name}: key-encryption key: {e}")))?;
    let endpoint = crate::provider::oauth2::endpoint_of(name, &config.providers[name])
        .map_err(|e| usage(e.to_string()))?;
    let StoreConfig::Sqlite { path, synchronous } = &config.store;
    let store = SqliteStore::open(path, *synchronous)
        .map_err(|e| CliError::new(exit::UNAVAILABLE, format!("opening the store: {e}")))?;

    let port = args.port.unwrap_or(cfg.redirect_port);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| {
            usage(format!(
                "listening on 127.0.0.1:{port} for the redirect: {e}"
            ))
        })?;
    let port = listener
        .local_addr()
        .map_err(|e| usage(format!("the redirect listener: {e}")))?
        .port();
    let redirect_uri = format!("http://127.0.0.1:{port}/callback");
    let attempt = Arc::new(Attempt::new().map_err(|e| usage(e.to_string()))?);
    let url = attempt.url(
        &cfg.authorization_url,
        &cfg.client_id,
        &redirect_uri,
        &cfg.scopes,
        &cfg.authorization_params,
    );
    let (tx, mut rx) = mpsc::channel(1);
    let app = axum::Router::new()
        .route("/callback", axum::routing::get(callback))
        .with_state(Callback {
            attempt: attempt.clone(),
            tx,
        });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
    let timeout = args.timeout.unwrap_or(cfg.authorize_timeout);
    eprintln!(
        "To authorize cistern for provider {name}, open this URL in a browser:\n\n  {url}\n\nwaiting up to {} for the redirect to {redirect_uri} ...",
        humantime::format_duration(timeout)
    );
    let outcome = tokio::time::timeout(timeout, rx.recv()).await;
    let _ = stop_tx.send(());
    // Let the browser's answer go out, then stop listening.
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    let code = match outcome {
        Err(_) => {
            return Err(CliError::new(
                exit::UNAVAILABLE,
                format!("no redirect within {}", humantime::format_duration(timeout)),
            ));
        }
        Ok(None) => {
            return Err(CliError::new(
                exit::UNAVAILABLE,
                "the redirect listener stopped",
            ));
        }
        Ok(Some(Err(e))) => return Err(CliError::new(exit::DENIED, e.to_string())),
        Ok(Some(Ok(code))) => code,
    };
    let now = now_ms();
    let answer = endpoint
        .request(
            &[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", &redirect_uri),
                ("code_verifier", attempt.verifier.as_str()),
            ],
            now,
        )
        .await
        .map_err(|e| token_error(e, "exchanging the authorization code"))?;
    let Some(refresh_token) = answer.refresh_token else {
        return Err(CliError::new(
            exit::DENIED,
            "the IdP issued no refresh token: ask for offline access (OpenID providers: scope offline_access, often with authorization_params prompt = \"consent\"; Google: access_type = \"offline\")",
        ));
    };
    let scope = answer.scope.unwrap_or_else(|| cfg.scopes.join(" "));
    let fp = fingerprint(&refresh_token);
    let state = State::authorized(refresh_token, scope.clone(), now);
    let sealed = state
        .seal(&kek, name)
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    store
        .save_sealed_credential(
            name,
            sealed,
            None,
            audit_event(
                now,
                "provider_authorized",
                json!({ "provider": name, "source": "cli", "scope": scope, "refresh_token": fp }),
            ),
        )
        .await
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    store.close().await;
    eprintln!(
        "authorized: the refresh token for provider {name} ({fp}) is sealed in the store; a running server uses it at its next refresh"
    );
    Ok(())
}

/// Runs `cistern provider check-secret`.
pub async fn check_secret(args: &CheckSecretArgs) -> Result<(), CliError> {
    let config = load_config(&args.config)?;
    let usage = |m: String| CliError::new(exit::USAGE, m);
    let name = &args.name;
    let Some(client) = config
        .providers
        .get(name)
        .and_then(ProviderConfig::oauth_client)
    else {
        return Err(usage(format!(
            "no OAuth provider [providers.{name}] in the config"
        )));
    };
    if client.auth_method == ClientAuthMethod::None {
        return Err(usage(format!(
            "providers.{name} is a public client (auth_method = \"none\"): there is no secret to check"
        )));
    }
    let candidate = (args.secret_env.is_some() || args.secret_file.is_some())
        .then_some((args.secret_env.as_deref(), args.secret_file.as_deref()));
    let endpoint = TokenEndpoint::new(&client, candidate)
        .map_err(|e| usage(format!("providers.{name}: {e}")))?;
    let (url, client_id) = (client.token_url, client.client_id);
    match endpoint.probe_client_auth().await {
        Ok(Ok(answer)) => {
            println!(
                "accepted: {url} authenticated client {client_id} with this secret (it answered {answer} to a deliberately invalid grant)"
            );
            Ok(())
        }
        Ok(Err(code)) => Err(CliError::new(
            exit::DENIED,
            format!("refused: {url} does not accept this secret for client {client_id} ({code})"),
        )),
        Err(e) => Err(token_error(e, "checking the client secret")),
    }
}
