//! `cistern serve`: wire the stages together and run the HTTP API.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;

use super::ServeArgs;
use crate::audit::checkpoint;
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, LogFormat, StoreConfig, is_loopback_host};
use crate::dev::{DevIssuer, DevMode};
use crate::exchange::Exchanger;
use crate::http::admin::LifecycleState;
use crate::http::{self, AppState, DEV_ISSUER_PATH};
use crate::metrics::Metrics;
use crate::mint::KeyRing;
use crate::oidc::Issuers;
use crate::policy::{PolicyErrors, PolicyStore, ReloadOutcome, spawn_reloader};
use crate::revoke::{Lifecycle, RevocationSet, issuer_names};
use crate::store::sqlite::SqliteStore;
use crate::store::{AuditEvent, AuditKind, Store};

/// How often expired credentials are audited as `credential_expired`.
const EXPIRY_SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// Records per sweep transaction.
const EXPIRY_SWEEP_BATCH: u32 = 5000;

/// Runs the server until SIGINT/SIGTERM.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let dev_setup = if args.dev {
        Some(DevSetup::create(&args)?)
    } else {
        None
    };
    let config_path = dev_setup
        .as_ref()
        .map_or(args.config.clone(), |d| d.config_path.clone());
    let config = Config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    init_tracing(&config);
    let dev = match &dev_setup {
        Some(_) => Some(Arc::new(
            DevIssuer::generate(DevMode::i_am_in_dev_mode()).context("dev issuer")?,
        )),
        None => None,
    };
    let built = build(&config, dev, Mode::Serve).await?;
    serve(&config, built, dev_setup).await
}

/// What a process built by [`build`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `cistern serve`: everything; this process owns keys, rotation,
    /// reaping and checkpoints.
    Serve,
    /// `cistern proxy`: the proxy alone beside a `cistern serve` that owns
    /// the keys (read here, never written) and the background work.
    ProxyOnly,
}

/// `cistern proxy`: the proxy's routes alone on `[proxy] listen`, for a
/// separate network zone. Shares the config, key directory and store with
/// the `cistern serve` that issues the tokens; follows its key rotations,
/// policy changes, revocations and credential rotations.
pub async fn run_proxy(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    init_tracing(&config);
    let listen = config
        .proxy
        .listen
        .context("`cistern proxy` needs [proxy] listen")?;
    if config.proxy.routes.is_empty() {
        bail!("`cistern proxy` needs at least one [proxy.routes.<name>]");
    }
    let built = build(&config, None, Mode::ProxyOnly).await?;
    let proxy = built.proxy.clone().context("the proxy was not built")?;
    spawn_proxy_background(&config, &built);
    let app = crate::proxy::with_host_routes(
        http::ops_router(built.state.clone()).merge(crate::proxy::router(proxy.clone())),
        proxy.clone(),
    );
    open_files_for(config.server.max_connections);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr().context("local address")?;
    tracing::info!(%addr, routes = config.proxy.routes.len(), "cistern proxy listening");
    println!("cistern: proxy listening on {addr}");
    let _ = std::io::stdout().flush();
    let limits = crate::http::serve::Limits::of(&config.server);
    let metrics = built.state.exchanger.metrics.connections();
    crate::http::serve::serve(listener, app, limits, metrics, shutdown_signal()).await;
    proxy.flush_audit().await;
    tracing::info!("cistern proxy stopped");
    Ok(())
}

/// The proxy process's background work: follow what `cistern serve` changes.
fn spawn_proxy_background(config: &Config, built: &Built) {
    spawn_followers(config, built);
    let policies = built.policies.clone();
    spawn_reloader(
        policies.clone(),
        config.policy.reload_interval,
        Arc::new(
            move |result: Result<ReloadOutcome, PolicyErrors>| match result {
                Ok(o) if o.changed => {
                    tracing::info!(roles = o.roles, "policy set reloaded");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(errors = %e, "new policy set rejected; the previous set stays in force")
                }
            },
        ),
    );
    // Keys rotated by `cistern serve`: picked up within a second.
    let keys = built.state.exchanger.keys.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            match keys.reload_if_changed() {
                Ok(true) => tracing::info!("signing keys reloaded"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "reloading signing keys failed"),
            }
        }
    });
    // cistern's own provider credentials, rotated by `cistern serve`.
    for (keeper, _) in &built.keepers {
        let keeper = keeper.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(30));
            loop {
                tick.tick().await;
                if let Err(e) = keeper.load_or_seal().await {
                    tracing::warn!(error = %e, "re-reading a sealed provider credential failed");
                }
            }
        });
    }
}

/// Everything `serve` starts, built from a config.
pub struct Built {
    /// The router state.
    pub state: AppState,
    /// The policy store (for the reloader).
    pub policies: Arc<PolicyStore>,
    /// The issuers (for the warm-up fetch).
    pub issuers: Arc<Issuers>,
    /// Keepers of cistern's own provider credentials, with their check interval.
    pub keepers: Vec<(Arc<crate::provider::rotation::Keeper>, Duration)>,
    /// The identity-aware proxy, when `[proxy.routes]` names any route.
    pub proxy: Option<Arc<crate::proxy::Proxy>>,
}

/// Opens the store, keys, policies and issuers for `config`.
pub async fn build(
    config: &Config,
    dev: Option<Arc<DevIssuer>>,
    mode: Mode,
) -> anyhow::Result<Built> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let metrics = Arc::new(Metrics::new());
    let sinks = crate::audit::sink::open_sinks(&config.audit.sinks)
        .context("opening the audit sinks ([[audit.sinks]])")?;
    let store: Arc<dyn Store> = match &config.store {
        StoreConfig::Sqlite { path, synchronous } => Arc::new(
            SqliteStore::open_with_sinks(path, *synchronous, sinks, config.audit.fail_closed)
                .with_context(|| format!("opening store {}", path.display()))?,
        ),
    };
    metrics.watch_store(store.clone());
    let keys = match mode {
        Mode::Serve => KeyRing::open(&config.signing, clock.clone(), config.ceiling.max_ttl),
        Mode::ProxyOnly => {
            KeyRing::open_existing(&config.signing, clock.clone(), config.ceiling.max_ttl)
        }
    };
    let keys = Arc::new(keys.with_context(|| {
        format!(
            "opening signing keys in {} (`cistern proxy` reads the keys `cistern serve` created)",
            config.signing.key_dir.display()
        )
    })?);
    let policies = match PolicyStore::load(&config.policy.dir, &config.ceiling, &config.issuers) {
        Ok(p) => Arc::new(p),
        Err(errors) => {
            audit_policy(&*store, &clock, Err(&errors)).await;
            bail!(
                "policies in {} are invalid:\n{errors}",
                config.policy.dir.display()
            );
        }
    };
    let set = policies.current();
    metrics.set_policies_loaded(set.len());
    let outcome = ReloadOutcome {
        changed: true,
        roles: set.len(),
        fingerprint: set.fingerprint().to_owned(),
    };
    audit_policy(&*store, &clock, Ok(&outcome)).await;
    let issuers =
        Arc::new(Issuers::new(&config.issuers, clock.clone(), metrics.clone()).context("issuers")?);
    let revocations = Arc::new(RevocationSet::new());
    let lifecycle = Lifecycle {
        store: store.clone(),
        set: Some(revocations.clone()),
        clock: clock.clone(),
        issuer_names: Arc::new(issuer_names(&config.issuers)),
    };
    // Every rule and block in force before the first request is served.
    let loaded = lifecycle
        .sync()
        .await
        .context("loading revocation rules and offboarding blocks")?;
    tracing::info!(rules = loaded, "revocation set loaded");
    let providers = crate::provider::Providers::from_config(
        &config.providers,
        &crate::provider::ProviderContext {
            store: store.clone(),
            clock: clock.clone(),
            metrics: metrics.clone(),
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))
    .context("downstream credential providers ([providers])")?;
    for p in providers.refresh_token_providers() {
        p.clone()
            .startup()
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("a refresh-token provider's stored state")?;
        tokio::spawn(
            p.clone()
                .watch_authorization(crate::provider::oauth2_refresh::AUTHORIZATION_WATCH),
        );
    }
    let mut keepers = Vec::new();
    for (name, p) in &config.providers {
        let crate::config::ProviderConfig::Gitlab(g) = p else {
            continue;
        };
        let (Some(kek), Some(gl)) = (
            crate::provider::rotation::kek_of(g)
                .map_err(|e| anyhow::anyhow!("providers.{name}: key-encryption key: {e}"))?,
            providers.gitlab(name),
        ) else {
            continue;
        };
        let keeper = Arc::new(crate::provider::rotation::Keeper::new(
            name.clone(),
            gl.clone(),
            kek,
            store.clone(),
            clock.clone(),
            metrics.clone(),
            g.rotate_before,
            g.rotate_lifetime,
        ));
        keeper
            .load_or_seal()
            .await
            .with_context(|| format!("providers.{name}: the sealed own credential"))?;
        keepers.push((keeper, g.rotation_check_interval));
    }
    let exchanger = Arc::new(Exchanger {
        providers,
        issuers: issuers.clone(),
        policies: policies.clone(),
        keys,
        store,
        clock,
        metrics,
        issuer_url: config
            .server
            .issuer
            .as_str()
            .trim_end_matches('/')
            .to_owned(),
        replay_protection: config
            .issuers
            .iter()
            .map(|(n, i)| (n.clone(), i.replay_protection))
            .collect::<HashMap<_, _>>(),
        revocations,
    });
    let lifecycle = Arc::new(LifecycleState {
        lifecycle,
        clients: config
            .server
            .clients
            .iter()
            .filter_map(|(n, c)| Some((n.clone(), hex32(&c.secret_sha256)?)))
            .collect(),
        bootstrap_sha256: config.admin.bootstrap_sha256.as_deref().and_then(hex32),
        admin_audience: config
            .admin
            .audience
            .clone()
            .unwrap_or_else(|| exchanger.issuer_url.clone()),
    });
    let metadata: Arc<str> = http::metadata_json(&exchanger.issuer_url).into();
    let proxy = if config.proxy.routes.is_empty() {
        None
    } else {
        let deps = crate::proxy::ProxyDeps {
            keys: exchanger.keys.clone(),
            issuer_url: exchanger.issuer_url.clone(),
            policies: policies.clone(),
            revocations: exchanger.revocations.clone(),
            clock: exchanger.clock.clone(),
            store: exchanger.store.clone(),
            providers: exchanger.providers.clone(),
            metrics: exchanger.metrics.clone(),
        };
        let proxy = crate::proxy::Proxy::new(&config.proxy, deps)
            .await
            .map_err(|(route, e)| anyhow::anyhow!("proxy.routes.{route}: {e}"))?;
        Some(Arc::new(proxy))
    };
    Ok(Built {
        proxy,
        state: AppState {
            exchanger,
            metadata,
            dev,
            lifecycle,
        },
        policies,
        issuers,
        keepers,
    })
}

async fn serve(config: &Config, built: Built, dev_setup: Option<DevSetup>) -> anyhow::Result<()> {
    let mut app = http::app(
        built.state.clone(),
        config.server.max_body_bytes,
        config.server.request_timeout,
    );
    if let Some(proxy) = &built.proxy {
        // Merged after the API's layers: proxied bodies are streamed, not
        // bounded by max_body_bytes, and each route has its own timeout.
        app = app.merge(crate::proxy::router(proxy.clone()));
        app = crate::proxy::with_host_routes(app, proxy.clone());
    }
    open_files_for(config.server.max_connections);
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding {}", config.server.listen))?;
    let addr = listener.local_addr().context("local address")?;
    spawn_background(config, &built);
    if let Some(d) = &dev_setup {
        d.print_banner(config.server.issuer.as_str().trim_end_matches('/'));
    }
    tracing::info!(%addr, issuer = %config.server.issuer, "cistern listening");
    // One machine-readable line, for scripts and tests that wait for readiness.
    println!("cistern: listening on {addr}");
    let _ = std::io::stdout().flush();

    let tls = match (&config.server.tls_cert, &config.server.tls_key) {
        (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
        _ => None,
    };
    let limits = crate::http::serve::Limits::of(&config.server);
    let metrics = built.state.exchanger.metrics.connections();
    match tls {
        None => crate::http::serve::serve(listener, app, limits, metrics, shutdown_signal()).await,
        Some((cert, key)) => {
            let tls = tls_config(&cert, &key).with_context(|| {
                format!(
                    "loading TLS certificate {} / key {}",
                    cert.display(),
                    key.display()
                )
            })?;
            crate::http::serve::serve_tls(listener, app, tls, limits, metrics, shutdown_signal())
                .await;
        }
    }
    // A last signed checkpoint covers everything written before the stop.
    if let Some(proxy) = &built.proxy {
        proxy.flush_audit().await;
    }
    let ex = &built.state.exchanger;
    if let Err(e) =
        checkpoint::checkpoint_now(&*ex.store, &ex.keys, &*ex.clock, &ex.issuer_url).await
    {
        tracing::error!(error = %e, "final audit checkpoint failed");
    }
    tracing::info!("cistern stopped");
    drop(dev_setup);
    Ok(())
}

/// 64 hex digits (validated at config load) as bytes.
fn hex32(h: &str) -> Option<[u8; 32]> {
    hex::decode(h).ok()?.try_into().ok()
}

/// What both `serve` and `proxy` follow: revocation rules and blocks
/// written by other processes (CLI `--direct`, another server), and sealed
/// proxy secrets replaced with `cistern route set-secret`.
fn spawn_followers(config: &Config, built: &Built) {
    if let Some(proxy) = &built.proxy {
        tokio::spawn(proxy.clone().run_refresh(config.proxy.secret_refresh));
    }
    built
        .state
        .lifecycle
        .lifecycle
        .clone()
        .spawn_poller(config.revocation.poll_interval);
}

fn spawn_background(config: &Config, built: &Built) {
    spawn_followers(config, built);

    let ex = built.state.exchanger.clone();
    for (keeper, interval) in &built.keepers {
        tokio::spawn(keeper.clone().run(*interval));
    }
    if !ex.providers.is_empty() {
        let reaper = Arc::new(crate::provider::reaper::Reaper {
            store: ex.store.clone(),
            providers: ex.providers.clone(),
            revocations: ex.revocations.clone(),
            clock: ex.clock.clone(),
        });
        tokio::spawn(reaper.clone().run());
        for (name, p) in &config.providers {
            // Only GitLab's tokens carry a mark to reconcile.
            if let crate::config::ProviderConfig::Gitlab(g) = p {
                tokio::spawn(
                    reaper
                        .clone()
                        .run_reconcile(name.clone(), g.reconcile_interval),
                );
            }
        }
    }
    tokio::spawn(checkpoint::run(
        ex.store.clone(),
        ex.keys.clone(),
        ex.clock.clone(),
        ex.issuer_url.clone(),
        checkpoint::Schedule {
            interval: config.audit.checkpoint_interval,
            every: config.audit.checkpoint_every,
        },
    ));
    let issuers = built.issuers.clone();
    tokio::spawn(async move { issuers.refresh_all().await });

    let (store, clock, metrics) = (ex.store.clone(), ex.clock.clone(), ex.metrics.clone());
    let policies = built.policies.clone();
    let on_result = Arc::new(move |result: Result<ReloadOutcome, PolicyErrors>| {
        let (store, clock, metrics, policies) = (
            store.clone(),
            clock.clone(),
            metrics.clone(),
            policies.clone(),
        );
        tokio::spawn(async move {
            match &result {
                Ok(o) if !o.changed => return,
                Ok(o) => {
                    metrics.set_policies_loaded(policies.current().len());
                    tracing::info!(roles = o.roles, fingerprint = %o.fingerprint, "policy set reloaded");
                }
                Err(e) => {
                    tracing::error!(errors = %e, "new policy set rejected; the previous set stays in force")
                }
            }
            audit_policy(&*store, &clock, result.as_ref()).await;
        });
    });
    spawn_reloader(
        built.policies.clone(),
        config.policy.reload_interval,
        on_result,
    );

    // Key rotation: checked every minute; rotation itself follows `signing.rotation_period`.
    let ex2 = ex.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            match ex2.keys.rotate_if_due() {
                Ok(Some(r)) => {
                    tracing::info!(new_kid = %r.new_kid, "signing key rotated");
                    let event = AuditEvent {
                        at_ms: ex2.clock.now_millis(),
                        kind: AuditKind::KeyRotated,
                        issuer: None,
                        role: None,
                        project_id: None,
                        reason: None,
                        detail: json!({ "new_kid": r.new_kid, "retired_kid": r.retired_kid, "dropped": r.dropped })
                            .into(),
                    };
                    if let Err(e) = ex2.store.append_audit(event).await {
                        tracing::error!(error = %e, "audit of key rotation failed");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "key rotation failed"),
            }
        }
    });

    // Every credential that reaches its expiry gets its `credential_expired`
    // record (bounded batches, so a backlog never holds the writer long).
    let ex3 = ex.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXPIRY_SWEEP_INTERVAL);
        loop {
            tick.tick().await;
            loop {
                match ex3
                    .store
                    .sweep_expired(ex3.clock.now_millis(), EXPIRY_SWEEP_BATCH)
                    .await
                {
                    Ok(n) if n == u64::from(EXPIRY_SWEEP_BATCH) => continue,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "expiry sweep failed");
                        break;
                    }
                }
            }
        }
    });

    // Replay entries are only needed until the ID token expires.
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(300));
        loop {
            tick.tick().await;
            match ex.store.prune_replay(ex.clock.now_millis()).await {
                Ok(n) if n > 0 => tracing::debug!(pruned = n, "replay cache pruned"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "replay prune failed"),
            }
        }
    });
}

async fn audit_policy(
    store: &dyn Store,
    clock: &Arc<dyn Clock>,
    result: Result<&ReloadOutcome, &PolicyErrors>,
) {
    let (kind, reason, detail) = match result {
        Ok(o) => (
            AuditKind::PolicyLoaded,
            None,
            json!({ "roles": o.roles, "fingerprint": o.fingerprint }),
        ),
        Err(e) => (
            AuditKind::PolicyRejected,
            Some("invalid_policy".to_owned()),
            json!({ "errors": e.0.iter().map(ToString::to_string).collect::<Vec<_>>() }),
        ),
    };
    let event = AuditEvent {
        at_ms: clock.now_millis(),
        kind,
        issuer: None,
        role: None,
        project_id: None,
        reason,
        detail: detail.into(),
    };
    if let Err(e) = store.append_audit(event).await {
        tracing::error!(error = %e, "audit of policy load failed");
    }
}

/// Descriptors beyond the connections: the store, key and policy files,
/// sinks, the proxy's upstream pools, outbound fetches.
const SPARE_FILES: u64 = 1024;

/// Every connection is a file descriptor, and the usual soft limit (1024)
/// is far below `max_connections`: accepting would fail with `EMFILE`
/// first. Raises the soft limit as far as needed, within the hard limit
/// (Go's runtime raises it at start for the same reason), and warns when
/// even the hard limit is too low.
fn open_files_for(max_connections: usize) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let needed = (max_connections as u64).saturating_add(SPARE_FILES);
    let limit = getrlimit(Resource::Nofile);
    let plan = open_file_plan(limit.current, limit.maximum, needed);
    if let Some(raise_to) = plan.raise_to {
        let raised = rustix::process::Rlimit {
            current: Some(raise_to),
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, raise_to, "cannot raise the open-file limit");
        } else {
            tracing::debug!(from = ?limit.current, to = raise_to, "raised the open-file limit");
        }
    }
    if plan.short {
        tracing::warn!(
            limit = ?limit.maximum,
            max_connections,
            "the open-file limit is below server.max_connections plus {SPARE_FILES} spare: \
             accepting will fail before max_connections is reached (raise the hard limit, \
             e.g. LimitNOFILE= in the systemd unit, or lower max_connections)"
        );
    }
}

/// What [`open_files_for`] does with a soft (`current`) and hard
/// (`maximum`) limit, `None` meaning unlimited.
#[derive(Debug, PartialEq, Eq)]
struct OpenFilePlan {
    /// The new soft limit, when it must rise.
    raise_to: Option<u64>,
    /// Even at the hard limit there are too few.
    short: bool,
}

fn open_file_plan(current: Option<u64>, maximum: Option<u64>, needed: u64) -> OpenFilePlan {
    match current {
        None => OpenFilePlan {
            raise_to: None,
            short: false,
        },
        Some(soft) if soft >= needed => OpenFilePlan {
            raise_to: None,
            short: false,
        },
        Some(soft) => {
            let target = maximum.map_or(needed, |hard| hard.min(needed));
            OpenFilePlan {
                raise_to: (target > soft).then_some(target),
                short: target < needed,
            }
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! { () = ctrl_c => {}, () = term => {} }
}

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The temporary world of `serve --dev`: config, policies, keys and store in
/// a temp dir that is removed on exit.
struct DevSetup {
    dir: tempfile::TempDir,
    config_path: PathBuf,
}

const DEV_POLICIES: &[(&str, &str)] = &[
    (
        "deploy.toml",
        include_str!("../../examples/dev/policies/deploy.toml"),
    ),
    (
        "read-artifacts.toml",
        include_str!("../../examples/dev/policies/read-artifacts.toml"),
    ),
];

impl DevSetup {
    fn create(args: &ServeArgs) -> anyhow::Result<Self> {
        let base = url::Url::parse(&format!("http://{}", args.listen)).context("listen address")?;
        // The dev issuer signs anything it is asked to: it must never be reachable from elsewhere.
        if !is_loopback_host(&base) {
            bail!(
                "--dev listens on loopback only; {} is not a loopback address",
                args.listen
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("cistern-dev-")
            .tempdir()
            .context("temp dir")?;
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir(&policy_dir).context("policy dir")?;
        for (name, text) in DEV_POLICIES {
            std::fs::write(policy_dir.join(name), text)
                .with_context(|| format!("writing {name}"))?;
        }
        let issuer = format!("http://{}", args.listen);
        let text = format!(
            r#"# generated by `cistern serve --dev`
[server]
listen = "{listen}"
issuer = "{issuer}"

[store]
kind = "sqlite"
path = "store/cistern.db"

[signing]
key_dir = "keys"

[issuers.dev]
issuer = "{issuer}{DEV_ISSUER_PATH}"
audiences = ["{issuer}"]
allow_insecure_http = true
unknown_kid_cooldown = "1s"

[policy]
dir = "policies"
reload_interval = "2s"

[ceiling]
issuers = ["dev"]
max_ttl = "1h"
scopes = ["deploy:*", "artifacts:*"]
"#,
            listen = args.listen,
        );
        let config_path = dir.path().join("cistern.toml");
        std::fs::write(&config_path, text).context("writing dev config")?;
        Ok(Self { dir, config_path })
    }

    fn print_banner(&self, issuer: &str) {
        let p: &Path = self.dir.path();
        eprintln!(
            "\n  cistern DEV MODE — not for production\n  state:    {}\n  issuer:   {issuer}{DEV_ISSUER_PATH} (built-in development issuer)\n  policies: {}\n\n  try:\n    export CISTERN_ID_TOKEN=$(cistern dev id-token --url {issuer})\n    cistern exchange --url {issuer} --role deploy\n",
            p.display(),
            p.join("policies").display()
        );
    }
}

/// The listener's rustls configuration: the certificate chain and key in
/// PEM, aws-lc-rs, ALPN `h2` then `http/1.1`.
fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<std::sync::Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .context("reading the certificate")?
        .collect::<Result<Vec<_>, _>>()
        .context("reading the certificate")?;
    if chain.is_empty() {
        anyhow::bail!("no certificate in the PEM file");
    }
    let key = PrivateKeyDer::from_pem_file(key).context("reading the private key")?;
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the certificate and key do not form a usable pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(std::sync::Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_open_file_limit_rises_as_far_as_needed_within_the_hard_one() {
        let plan = |cur, max| open_file_plan(cur, max, 11_024);
        let raise = |to: Option<u64>, short| OpenFilePlan {
            raise_to: to,
            short,
        };
        // The usual default: soft 1024, hard far above.
        assert_eq!(plan(Some(1024), Some(524_288)), raise(Some(11_024), false));
        assert_eq!(plan(Some(1024), None), raise(Some(11_024), false));
        // Enough already, or unlimited: left alone.
        assert_eq!(plan(Some(20_000), Some(20_000)), raise(None, false));
        assert_eq!(plan(None, None), raise(None, false));
        // The hard limit is too low: up to it, and a warning.
        assert_eq!(plan(Some(1024), Some(4096)), raise(Some(4096), true));
        assert_eq!(plan(Some(4096), Some(4096)), raise(None, true));
    }
}
