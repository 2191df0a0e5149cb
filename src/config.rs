//! The main configuration file (`cistern.toml`).
//!
//! Parsed strictly into [`Config`], then validated as a whole; every error
//! names the file, line and field. `examples/cistern.toml` documents every
//! field. Trusted issuers come only from here: no URL is ever built from
//! token content.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::source::{Source, SourceError};

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTP listener and public identity.
    pub server: ServerConfig,
    /// Where records are kept.
    #[serde(default)]
    pub store: StoreConfig,
    /// Keys for cistern's own tokens.
    pub signing: SigningConfig,
    /// Trusted OIDC issuers by name.
    pub issuers: BTreeMap<String, IssuerConfig>,
    /// Where trust policies live.
    pub policy: PolicyConfig,
    /// The operator's ceiling over every policy.
    pub ceiling: CeilingConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// `cistern inventory` and `cistern report`.
    #[serde(default)]
    pub inventory: InventoryConfig,
    /// Admin API authentication.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The in-memory revocation set.
    #[serde(default)]
    pub revocation: RevocationConfig,
    /// The tamper-evident audit log: checkpoints, sinks, fail-closed mode.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Downstream credential providers by name (policies name one in their grant).
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// The identity-aware proxy's routes.
    #[serde(default)]
    pub proxy: crate::proxy::config::ProxyConfig,
}

/// `[providers.<name>]`: where downstream credentials are minted.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ProviderConfig {
    /// GitLab project access tokens, minted through the REST API.
    Gitlab(GitLabProviderConfig),
    /// OAuth 2.0 client-credentials tokens from the company IdP (RFC 6749 §4.4).
    Oauth2ClientCredentials(OAuth2ClientCredentialsConfig),
    /// OAuth 2.0 access tokens minted from a refresh token an operator
    /// obtained once (authorization code + PKCE, `cistern provider authorize`).
    Oauth2RefreshToken(OAuth2RefreshTokenConfig),
}

/// `[providers.<name>] kind = "oauth2_refresh_token"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2RefreshTokenConfig {
    /// The IdP's token endpoint.
    pub token_url: Url,
    /// The IdP's authorization endpoint (the operator's browser opens it).
    pub authorization_url: Url,
    /// cistern's client id at the IdP.
    pub client_id: String,
    /// Environment variable holding the client secret (none for a public
    /// client, `auth_method = "none"`).
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// File holding it instead (mode 0600).
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// `client_secret_basic` (default), `client_secret_post` or `none`.
    #[serde(default)]
    pub auth_method: ClientAuthMethod,
    /// Scopes the operator authorizes (sent with the authorization request);
    /// policies may ask for these (a refresh may only narrow them).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Resource indicators (RFC 8707) policies may ask for, as `audience`.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Extra authorization request parameters the IdP needs to issue a
    /// refresh token (`prompt = "consent"`, Google's `access_type = "offline"`).
    #[serde(default)]
    pub authorization_params: BTreeMap<String, String>,
    /// Loopback port of the redirect listener (`http://127.0.0.1:PORT/callback`);
    /// 0 picks a free one (RFC 8252 §7.3; IdPs that match ports exactly need a fixed one).
    #[serde(default)]
    pub redirect_port: u16,
    /// How long `cistern provider authorize` waits for the redirect.
    #[serde(
        default = "defaults::oauth2_authorize_timeout",
        with = "humantime_serde"
    )]
    pub authorize_timeout: Duration,
    /// Environment variable holding the key-encryption key (32 bytes,
    /// base64) the refresh token is sealed under; exactly one of the two.
    #[serde(default)]
    pub kek_env: Option<String>,
    /// File holding the KEK instead (mode 0600).
    #[serde(default)]
    pub kek_file: Option<PathBuf>,
    /// A cached access token is handed out until it has this little life left.
    #[serde(default = "defaults::oauth2_refresh_before", with = "humantime_serde")]
    pub refresh_before: Duration,
    /// Bound on each call.
    #[serde(default = "defaults::fetch_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Retries after 429, 5xx or a transport error.
    #[serde(default = "defaults::gitlab_max_retries")]
    pub max_retries: u32,
    /// Allow plain http to a loopback IdP (tests).
    #[serde(default)]
    pub allow_insecure_http: bool,
}

/// `[providers.<name>] kind = "oauth2_client_credentials"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2ClientCredentialsConfig {
    /// The IdP's token endpoint.
    pub token_url: Url,
    /// cistern's client id at the IdP.
    pub client_id: String,
    /// Environment variable holding the client secret.
    #[serde(default)]
    pub client_secret_env: Option<String>,
    /// File holding it instead (mode 0600); exactly one of the two.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// `client_secret_basic` (default) or `client_secret_post`.
    #[serde(default)]
    pub auth_method: ClientAuthMethod,
    /// Scopes policies may ask for (empty: none).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Resource indicators (RFC 8707) policies may ask for, as `audience`.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// A cached token is handed out until it has this little life left.
    #[serde(default = "defaults::oauth2_refresh_before", with = "humantime_serde")]
    pub refresh_before: Duration,
    /// Bound on each call.
    #[serde(default = "defaults::fetch_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Retries after 429, 5xx or a transport error.
    #[serde(default = "defaults::gitlab_max_retries")]
    pub max_retries: u32,
    /// Allow plain http to a loopback IdP (tests).
    #[serde(default)]
    pub allow_insecure_http: bool,
}

/// How cistern authenticates to a token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    /// HTTP Basic with the form-encoded id and secret.
    #[default]
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body.
    ClientSecretPost,
    /// A public client: `client_id` in the form, no secret (refresh-token
    /// providers only; PKCE protects the authorization code).
    None,
}

/// `[providers.<name>] kind = "gitlab"`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitLabProviderConfig {
    /// The GitLab instance (`https://gitlab.example.com`); the API is `<url>/api/v4`.
    pub url: Url,
    /// Environment variable holding cistern's own GitLab credential (a
    /// personal or service-account access token with `api` scope).
    #[serde(default)]
    pub token_env: Option<String>,
    /// File holding it instead (mode 0600); exactly one of the two.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Highest access level a policy may ask for (10 Guest .. 50 Owner).
    #[serde(default = "defaults::gitlab_max_access_level")]
    pub max_access_level: u8,
    /// Scopes policies may grant (GitLab's resource-token scopes).
    #[serde(default = "defaults::gitlab_scopes")]
    pub scopes: Vec<String>,
    /// Bound on each API call.
    #[serde(default = "defaults::fetch_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Retries of a call that failed with 429, 5xx or a transport error.
    #[serde(default = "defaults::gitlab_max_retries")]
    pub max_retries: u32,
    /// Allow plain http to a loopback GitLab (tests, local mocks).
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// Environment variable holding the key-encryption key (32 bytes,
    /// base64). With a KEK, cistern keeps its own credential sealed in the
    /// store and rotates it before it expires; without, it only reads it.
    #[serde(default)]
    pub kek_env: Option<String>,
    /// File holding the KEK instead (mode 0600).
    #[serde(default)]
    pub kek_file: Option<PathBuf>,
    /// Rotate cistern's own credential when it expires within this long.
    #[serde(default = "defaults::gitlab_rotate_before", with = "humantime_serde")]
    pub rotate_before: Duration,
    /// Lifetime asked for a rotated credential (GitLab allows at most a year).
    #[serde(default = "defaults::gitlab_rotate_lifetime", with = "humantime_serde")]
    pub rotate_lifetime: Duration,
    /// How often the credential's expiry is checked.
    #[serde(default = "defaults::gitlab_rotation_check", with = "humantime_serde")]
    pub rotation_check_interval: Duration,
    /// How often managed projects are listed to revoke marked tokens that
    /// are past their lifetime or unknown to the store.
    #[serde(
        default = "defaults::gitlab_reconcile_interval",
        with = "humantime_serde"
    )]
    pub reconcile_interval: Duration,
}

/// What a provider lets policies ask for: the ceiling over downstream grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderLimits {
    /// Provider kind (`gitlab`).
    pub kind: &'static str,
    /// Highest access level.
    pub max_access_level: u8,
    /// Grantable scopes.
    pub scopes: Vec<String>,
    /// Grantable audiences (resource indicators); empty for GitLab.
    pub audiences: Vec<String>,
}

/// What both OAuth provider kinds configure about cistern's client at the
/// token endpoint.
#[derive(Debug, Clone, Copy)]
pub struct OAuthClientConfig<'a> {
    /// The token endpoint.
    pub token_url: &'a Url,
    /// cistern's client id.
    pub client_id: &'a str,
    /// Environment variable holding the client secret.
    pub client_secret_env: Option<&'a str>,
    /// File holding it.
    pub client_secret_file: Option<&'a Path>,
    /// Client authentication.
    pub auth_method: ClientAuthMethod,
    /// Bound on each call.
    pub timeout: Duration,
    /// Retries after 429, 5xx or a transport error.
    pub max_retries: u32,
}

impl ProviderConfig {
    /// cistern's OAuth client, for the OAuth kinds.
    pub fn oauth_client(&self) -> Option<OAuthClientConfig<'_>> {
        macro_rules! view {
            ($o:expr) => {
                OAuthClientConfig {
                    token_url: &$o.token_url,
                    client_id: &$o.client_id,
                    client_secret_env: $o.client_secret_env.as_deref(),
                    client_secret_file: $o.client_secret_file.as_deref(),
                    auth_method: $o.auth_method,
                    timeout: $o.timeout,
                    max_retries: $o.max_retries,
                }
            };
        }
        match self {
            ProviderConfig::Gitlab(_) => None,
            ProviderConfig::Oauth2ClientCredentials(o) => Some(view!(o)),
            ProviderConfig::Oauth2RefreshToken(o) => Some(view!(o)),
        }
    }

    /// The limits policies are compiled against.
    pub fn limits(&self) -> ProviderLimits {
        match self {
            ProviderConfig::Gitlab(g) => ProviderLimits {
                kind: "gitlab",
                max_access_level: g.max_access_level,
                scopes: g.scopes.clone(),
                audiences: Vec::new(),
            },
            ProviderConfig::Oauth2ClientCredentials(o) => ProviderLimits {
                kind: "oauth2_client_credentials",
                max_access_level: 0,
                scopes: o.scopes.clone(),
                audiences: o.audiences.clone(),
            },
            ProviderConfig::Oauth2RefreshToken(o) => ProviderLimits {
                kind: "oauth2_refresh_token",
                max_access_level: 0,
                scopes: o.scopes.clone(),
                audiences: o.audiences.clone(),
            },
        }
    }
}

/// `[audit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// When true (the default), a request whose audit record cannot be
    /// written durably to every sink is refused (like Vault's audit
    /// devices). The store's own copy is always written in the same
    /// transaction as the credential, whatever this says.
    #[serde(default = "defaults::yes")]
    pub fail_closed: bool,
    /// A signed checkpoint of the chain head is written at least this often
    /// while new records arrive.
    #[serde(
        default = "defaults::audit_checkpoint_interval",
        with = "humantime_serde"
    )]
    pub checkpoint_interval: Duration,
    /// ... and after at most this many new records.
    #[serde(default = "defaults::audit_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Copies of every record outside the store, written after each commit.
    #[serde(default)]
    pub sinks: Vec<AuditSinkConfig>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            fail_closed: true,
            checkpoint_interval: defaults::audit_checkpoint_interval(),
            checkpoint_every: defaults::audit_checkpoint_every(),
            sinks: Vec::new(),
        }
    }
}

/// `[[audit.sinks]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuditSinkConfig {
    /// JSON Lines to a file (0600), fsynced per batch, rotated by size.
    File {
        /// The file; rotated copies are `<path>.1` (newest) .. `<path>.<keep>`.
        path: PathBuf,
        /// Rotate once the file reaches this many bytes.
        #[serde(default = "defaults::audit_file_max_bytes")]
        max_bytes: u64,
        /// Rotated files kept.
        #[serde(default = "defaults::audit_file_keep")]
        keep: u32,
    },
    /// JSON Lines to standard output (for a container log collector).
    Stdout,
}

/// `[inventory]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryConfig {
    /// An identity not used for this many days is flagged `unused` (and
    /// listed by `cistern report` as a candidate for offboarding).
    #[serde(default = "defaults::unused_after_days")]
    pub unused_after_days: u32,
}

impl Default for InventoryConfig {
    fn default() -> Self {
        Self {
            unused_after_days: defaults::unused_after_days(),
        }
    }
}

/// `[admin]`: who may call `/v1/admin/*`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Hex SHA-256 of the break-glass bootstrap credential
    /// (`cistern admin bootstrap` prints it); unset = no bootstrap access.
    #[serde(default)]
    pub bootstrap_sha256: Option<String>,
    /// The `aud` an admin access token must carry; default: cistern's issuer URL.
    #[serde(default)]
    pub audience: Option<String>,
}

/// `[revocation]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    /// How often the store is polled for rules and blocks written by another
    /// process (the CLI acting directly on the store).
    #[serde(
        default = "defaults::revocation_poll_interval",
        with = "humantime_serde"
    )]
    pub poll_interval: Duration,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        Self {
            poll_interval: defaults::revocation_poll_interval(),
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Socket address to listen on.
    pub listen: SocketAddr,
    /// cistern's own issuer URL: the `iss` of minted tokens and the base of
    /// its metadata. Must be https unless it is a loopback address.
    pub issuer: Url,
    /// PEM certificate chain; TLS is served when both `tls_cert` and `tls_key` are set.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Largest accepted request body.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    /// Deadline for one request.
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a client has to send a request's headers: from connecting
    /// (the TLS handshake included), and on a kept-alive HTTP/1 connection
    /// from the previous response. Bounds idle and trickling (slowloris)
    /// connections.
    #[serde(default = "defaults::header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Clients allowed to call the introspection endpoint, as `name = "sha256 hex of the secret"`.
    #[serde(default)]
    pub clients: BTreeMap<String, ClientConfig>,
}

/// A confidential client of cistern's own endpoints (introspection).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Hex SHA-256 of the client secret; the secret itself is never stored.
    pub secret_sha256: String,
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "lowercase")]
pub enum StoreConfig {
    /// Embedded SQLite (default).
    Sqlite {
        /// Database file; created with owner-only permissions.
        #[serde(default = "defaults::sqlite_path")]
        path: PathBuf,
        /// `normal` (durable across process crashes) or `full` (also across power loss).
        #[serde(default)]
        synchronous: Synchronous,
    },
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Sqlite {
            path: defaults::sqlite_path(),
            synchronous: Synchronous::default(),
        }
    }
}

/// SQLite `synchronous` pragma.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// WAL + NORMAL: survives process crashes; may lose the last commits on power loss.
    #[default]
    Normal,
    /// WAL + FULL: fsync on every commit.
    Full,
}

/// `[signing]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// Directory for signing keys (created 0700; key files 0600).
    pub key_dir: PathBuf,
    /// `ES256` (default) or `EdDSA`.
    #[serde(default)]
    pub algorithm: SigningAlgorithm,
    /// A new key becomes current after this long.
    #[serde(default = "defaults::rotation_period", with = "humantime_serde")]
    pub rotation_period: Duration,
}

/// The algorithm of cistern's own tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum SigningAlgorithm {
    /// ECDSA P-256 / SHA-256.
    #[default]
    ES256,
    /// Ed25519.
    EdDSA,
}

impl SigningAlgorithm {
    /// The JOSE `alg` value.
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlgorithm::ES256 => "ES256",
            SigningAlgorithm::EdDSA => "EdDSA",
        }
    }
}

/// `[issuers.NAME]`: one trusted OIDC issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// Issuer kind; only `gitlab` for now.
    #[serde(default)]
    pub kind: IssuerKind,
    /// The issuer URL, compared to `iss` and to the discovery document's
    /// `issuer` by exact string equality.
    pub issuer: String,
    /// Accepted `aud` values; a token must carry at least one.
    pub audiences: Vec<String>,
    /// Allow plain http; only for loopback issuers (tests, dev mode).
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// Hosts other than the issuer's that `jwks_uri` may point at.
    #[serde(default)]
    pub allowed_jwks_hosts: Vec<String>,
    /// Lower bound on how long a fetched JWKS is used before refreshing.
    #[serde(default = "defaults::jwks_min_ttl", with = "humantime_serde")]
    pub jwks_min_ttl: Duration,
    /// Upper bound on the same (GitLab sends max-age=86400).
    #[serde(default = "defaults::jwks_max_ttl", with = "humantime_serde")]
    pub jwks_max_ttl: Duration,
    /// Minimum time between refetches triggered by an unknown `kid`.
    #[serde(default = "defaults::unknown_kid_cooldown", with = "humantime_serde")]
    pub unknown_kid_cooldown: Duration,
    /// How long the last good key set keeps serving while the issuer is unreachable.
    #[serde(default = "defaults::max_stale", with = "humantime_serde")]
    pub max_stale: Duration,
    /// Deadline for one discovery or JWKS fetch.
    #[serde(default = "defaults::fetch_timeout", with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// Largest accepted discovery or JWKS body.
    #[serde(default = "defaults::max_response_bytes")]
    pub max_response_bytes: usize,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    #[serde(default = "defaults::leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// Oldest acceptable token, measured from `iat`.
    #[serde(default = "defaults::max_token_age", with = "humantime_serde")]
    pub max_token_age: Duration,
    /// Refuse a second exchange of the same ID token (`jti`). On by default.
    #[serde(default = "defaults::yes")]
    pub replay_protection: bool,
    /// Largest accepted ID token, in bytes.
    #[serde(default = "defaults::max_token_bytes")]
    pub max_token_bytes: usize,
}

/// Which claim schema an issuer's tokens follow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IssuerKind {
    /// GitLab CI ID tokens.
    #[default]
    Gitlab,
}

/// `[policy]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of policy files (`*.toml`, one role each). Relative paths
    /// are resolved against the config file's directory.
    pub dir: PathBuf,
    /// How often the directory is checked for changes (SIGHUP reloads at once).
    #[serde(default = "defaults::reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

/// `[ceiling]`: bounds every policy, whatever it says.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CeilingConfig {
    /// Issuer names policies may trust.
    pub issuers: Vec<String>,
    /// Longest TTL any grant may have.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// Scopes that may be granted; `*` matches within one `:`-separated segment.
    pub scopes: Vec<String>,
    /// Audiences grants may name; same glob rules as `scopes`. Empty means any.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Whether a policy may opt into fork merge-request pipelines
    /// (`project_id` ≠ `job_project_id`). Off: such opt-ins are refused at load.
    #[serde(default)]
    pub allow_fork_opt_in: bool,
    /// Filled from `[providers]` at load: what downstream grants may ask for.
    #[serde(skip)]
    pub providers: BTreeMap<String, ProviderLimits>,
}

/// `[log]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `cistern=debug`, …); `RUST_LOG` overrides it.
    #[serde(default = "defaults::log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: defaults::log_level(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

mod defaults {
    use std::path::PathBuf;
    use std::time::Duration;

    pub(super) fn yes() -> bool {
        true
    }
    pub(super) fn max_body_bytes() -> usize {
        64 * 1024
    }
    pub(super) fn gitlab_max_access_level() -> u8 {
        30
    }
    pub(super) fn gitlab_scopes() -> Vec<String> {
        vec!["read_api".into(), "read_repository".into()]
    }
    pub(super) fn gitlab_max_retries() -> u32 {
        3
    }
    pub(super) fn oauth2_refresh_before() -> Duration {
        Duration::from_secs(60)
    }
    pub(super) fn oauth2_authorize_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub(super) fn gitlab_rotate_before() -> Duration {
        Duration::from_secs(7 * 86400)
    }
    pub(super) fn gitlab_rotate_lifetime() -> Duration {
        Duration::from_secs(30 * 86400)
    }
    pub(super) fn gitlab_rotation_check() -> Duration {
        Duration::from_secs(3600)
    }
    pub(super) fn gitlab_reconcile_interval() -> Duration {
        Duration::from_secs(300)
    }
    pub(super) fn audit_checkpoint_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn audit_checkpoint_every() -> u64 {
        1000
    }
    pub(super) fn audit_file_max_bytes() -> u64 {
        64 * 1024 * 1024
    }
    pub(super) fn audit_file_keep() -> u32 {
        10
    }
    pub(super) fn revocation_poll_interval() -> Duration {
        Duration::from_millis(250)
    }
    pub(super) fn request_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub(super) fn header_read_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn max_connections() -> usize {
        10_000
    }
    pub(super) fn sqlite_path() -> PathBuf {
        PathBuf::from("cistern-data/cistern.db")
    }
    pub(super) fn rotation_period() -> Duration {
        Duration::from_secs(30 * 86400)
    }
    pub(super) fn jwks_min_ttl() -> Duration {
        Duration::from_secs(300)
    }
    pub(super) fn jwks_max_ttl() -> Duration {
        Duration::from_secs(86400)
    }
    pub(super) fn unknown_kid_cooldown() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn max_stale() -> Duration {
        // Longer than jwks_max_ttl, so a refresh failing right at the TTL
        // does not make the key set stale at once.
        Duration::from_secs(72 * 3600)
    }
    pub(super) fn fetch_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub(super) fn max_response_bytes() -> usize {
        256 * 1024
    }
    pub(super) fn leeway() -> Duration {
        Duration::from_secs(30)
    }
    pub(super) fn max_token_age() -> Duration {
        Duration::from_secs(8 * 3600)
    }
    pub(super) fn max_token_bytes() -> usize {
        16 * 1024
    }
    pub(super) fn reload_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub(super) fn unused_after_days() -> u32 {
        30
    }
    pub(super) fn log_level() -> String {
        "info".to_owned()
    }
}

/// True for `localhost` and loopback IP literals.
pub fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Authorization request parameters cistern sets itself; `authorization_params`
/// may not override them.
pub const RESERVED_AUTHORIZATION_PARAMS: [&str; 8] = [
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "response_mode",
];

/// `[providers.<name>] kind = "oauth2_refresh_token"` checks.
fn validate_refresh_token_provider(
    o: &OAuth2RefreshTokenConfig,
    src: &Source,
    field: &dyn Fn(&str) -> String,
) -> Result<(), SourceError> {
    for (name, url) in [
        ("token_url", &o.token_url),
        ("authorization_url", &o.authorization_url),
    ] {
        if url.scheme() != "https"
            && !(url.scheme() == "http" && o.allow_insecure_http && is_loopback_host(url))
        {
            return Err(src.error(
                &field(name),
                "must be https (http only on loopback with allow_insecure_http)",
            ));
        }
        if url.fragment().is_some() {
            return Err(src.error(&field(name), "must not contain a fragment"));
        }
    }
    if o.client_id.is_empty() || o.client_id.chars().any(char::is_control) {
        return Err(src.error(&field("client_id"), "must be non-empty"));
    }
    let has_secret = o.client_secret_env.is_some() || o.client_secret_file.is_some();
    if o.client_secret_env.is_some() && o.client_secret_file.is_some() {
        return Err(src.error(
            &field("client_secret_env"),
            "set at most one of client_secret_env and client_secret_file",
        ));
    }
    if has_secret == (o.auth_method == ClientAuthMethod::None) {
        return Err(src.error(
            &field("auth_method"),
            "a client secret (client_secret_env or client_secret_file) goes with client_secret_basic or client_secret_post; a public client has none and auth_method = \"none\"",
        ));
    }
    if o.kek_env.is_some() == o.kek_file.is_some() {
        return Err(src.error(
            &field("kek_env"),
            "set exactly one of kek_env and kek_file: the refresh token is kept sealed",
        ));
    }
    if o.scopes
        .iter()
        .chain(&o.audiences)
        .any(|s| s.is_empty() || s.contains(char::is_whitespace))
    {
        return Err(src.error(
            &field("scopes"),
            "scopes and audiences are non-empty and contain no whitespace",
        ));
    }
    for (k, v) in &o.authorization_params {
        if RESERVED_AUTHORIZATION_PARAMS.contains(&k.as_str()) {
            return Err(src.error(
                &field("authorization_params"),
                format!("{k} is set by cistern itself"),
            ));
        }
        if k.is_empty() || k.chars().chain(v.chars()).any(char::is_control) {
            return Err(src.error(
                &field("authorization_params"),
                "names are non-empty; no control characters",
            ));
        }
    }
    if o.authorize_timeout < Duration::from_secs(1)
        || o.authorize_timeout > Duration::from_secs(3600)
    {
        return Err(src.error(&field("authorize_timeout"), "must be between 1s and 1h"));
    }
    if o.timeout.is_zero() || o.timeout > Duration::from_secs(120) {
        return Err(src.error(&field("timeout"), "must be between 1ms and 120s"));
    }
    if o.max_retries > 10 {
        return Err(src.error(&field("max_retries"), "must be at most 10"));
    }
    Ok(())
}

/// Checks an issuer URL's shape: https (or http on loopback when allowed),
/// a host, no userinfo, query or fragment, no `.`/`..` or empty path segments.
pub fn check_issuer_url(raw: &str, allow_insecure_http: bool) -> Result<Url, String> {
    let url = Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_insecure_http && is_loopback_host(&url) => {}
        "http" if allow_insecure_http => {
            return Err("plain http is allowed only for loopback issuers".into());
        }
        "http" => {
            return Err(
                "must be https (set allow_insecure_http for a loopback test issuer)".into(),
            );
        }
        s => return Err(format!("unsupported scheme {s:?}")),
    }
    if url.host().is_none() {
        return Err("has no host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain userinfo".into());
    }
    if url.query().is_some() || url.fragment().is_some() || raw.contains(['?', '#']) {
        return Err("must not contain a query or fragment".into());
    }
    // `Url` normalises dot segments away, so look at the raw text.
    let path = raw
        .split_once("://")
        .map_or("", |(_, rest)| rest.split_once('/').map_or("", |(_, p)| p));
    if !path.is_empty()
        && path
            .trim_end_matches('/')
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err("path must not contain empty, `.` or `..` segments".into());
    }
    Ok(url)
}

impl Config {
    /// Reads, parses and validates a config file. Relative paths in it are
    /// resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Self, SourceError> {
        let source = Source::read(path)?;
        let mut config: Config = source.parse()?;
        config.validate(&source)?;
        config.fill_provider_limits();
        // `cistern.toml` has the empty path as parent: that is the current directory.
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        config.resolve_paths(&base);
        Ok(config)
    }

    /// Parses and validates config text (paths stay as written).
    pub fn from_source(source: &Source) -> Result<Self, SourceError> {
        let mut config: Config = source.parse()?;
        config.validate(source)?;
        config.fill_provider_limits();
        Ok(config)
    }

    fn fill_provider_limits(&mut self) {
        self.ceiling.providers = self
            .providers
            .iter()
            .map(|(name, p)| (name.clone(), p.limits()))
            .collect();
    }

    fn resolve_paths(&mut self, base: &Path) {
        let join = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        join(&mut self.signing.key_dir);
        for p in self.providers.values_mut() {
            match p {
                ProviderConfig::Gitlab(g) => {
                    if let Some(f) = &mut g.token_file {
                        join(f);
                    }
                    if let Some(f) = &mut g.kek_file {
                        join(f);
                    }
                }
                ProviderConfig::Oauth2ClientCredentials(o) => {
                    if let Some(f) = &mut o.client_secret_file {
                        join(f);
                    }
                }
                ProviderConfig::Oauth2RefreshToken(o) => {
                    if let Some(f) = &mut o.client_secret_file {
                        join(f);
                    }
                    if let Some(f) = &mut o.kek_file {
                        join(f);
                    }
                }
            }
        }
        join(&mut self.policy.dir);
        self.proxy.resolve_paths(base);
        if let Some(p) = &mut self.server.tls_cert {
            join(p);
        }
        if let Some(p) = &mut self.server.tls_key {
            join(p);
        }
        match &mut self.store {
            StoreConfig::Sqlite { path, .. } => join(path),
        }
    }

    /// Cross-field checks that serde cannot express.
    pub fn validate(&self, src: &Source) -> Result<(), SourceError> {
        self.proxy.validate(src, &self.providers)?;
        let s = &self.server;
        if s.issuer.scheme() != "https"
            && !(s.issuer.scheme() == "http" && is_loopback_host(&s.issuer))
        {
            return Err(src.error("server.issuer", "must be https (http only on loopback)"));
        }
        if s.issuer.query().is_some() || s.issuer.fragment().is_some() {
            return Err(src.error("server.issuer", "must not contain a query or fragment"));
        }
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            return Err(src.error(
                "server.tls_cert",
                "tls_cert and tls_key must be set together",
            ));
        }
        if s.max_body_bytes < 4096 {
            return Err(src.error("server.max_body_bytes", "must be at least 4096"));
        }
        if !(Duration::from_millis(100)..=Duration::from_secs(3600))
            .contains(&s.header_read_timeout)
        {
            return Err(src.error("server.header_read_timeout", "must be between 100ms and 1h"));
        }
        if !(1..=1_000_000).contains(&s.max_connections) {
            return Err(src.error("server.max_connections", "must be between 1 and 1000000"));
        }
        for (name, c) in &s.clients {
            if c.secret_sha256.len() != 64 || hex::decode(&c.secret_sha256).is_err() {
                return Err(src.error(
                    &format!("server.clients.{name}.secret_sha256"),
                    "must be 64 hex digits (sha256 of the secret)",
                ));
            }
        }
        if let Some(h) = &self.admin.bootstrap_sha256
            && (h.len() != 64 || hex::decode(h).is_err())
        {
            return Err(src.error(
                "admin.bootstrap_sha256",
                "must be 64 hex digits (sha256 of the credential)",
            ));
        }
        if self.admin.audience.as_deref() == Some("") {
            return Err(src.error("admin.audience", "must not be empty"));
        }
        if self.revocation.poll_interval < Duration::from_millis(10)
            || self.revocation.poll_interval > Duration::from_secs(60)
        {
            return Err(src.error("revocation.poll_interval", "must be between 10ms and 60s"));
        }
        for (name, p) in &self.providers {
            let field = |f: &str| format!("providers.{name}.{f}");
            let g = match p {
                ProviderConfig::Gitlab(g) => g,
                ProviderConfig::Oauth2ClientCredentials(o) => {
                    if o.token_url.scheme() != "https"
                        && !(o.token_url.scheme() == "http"
                            && o.allow_insecure_http
                            && is_loopback_host(&o.token_url))
                    {
                        return Err(src.error(
                            &field("token_url"),
                            "must be https (http only on loopback with allow_insecure_http)",
                        ));
                    }
                    if o.client_id.is_empty() || o.client_id.chars().any(char::is_control) {
                        return Err(src.error(&field("client_id"), "must be non-empty"));
                    }
                    if o.client_secret_env.is_some() == o.client_secret_file.is_some() {
                        return Err(src.error(
                            &field("client_secret_env"),
                            "set exactly one of client_secret_env and client_secret_file",
                        ));
                    }
                    if o.auth_method == ClientAuthMethod::None {
                        return Err(src.error(
                            &field("auth_method"),
                            "client credentials need a secret: client_secret_basic or client_secret_post",
                        ));
                    }
                    if o.scopes
                        .iter()
                        .chain(&o.audiences)
                        .any(|s| s.is_empty() || s.contains(char::is_whitespace))
                    {
                        return Err(src.error(
                            &field("scopes"),
                            "scopes and audiences are non-empty and contain no whitespace",
                        ));
                    }
                    if o.timeout.is_zero() || o.timeout > Duration::from_secs(120) {
                        return Err(src.error(&field("timeout"), "must be between 1ms and 120s"));
                    }
                    if o.max_retries > 10 {
                        return Err(src.error(&field("max_retries"), "must be at most 10"));
                    }
                    continue;
                }
                ProviderConfig::Oauth2RefreshToken(o) => {
                    validate_refresh_token_provider(o, src, &field)?;
                    continue;
                }
            };
            if g.url.scheme() != "https"
                && !(g.url.scheme() == "http" && g.allow_insecure_http && is_loopback_host(&g.url))
            {
                return Err(src.error(
                    &field("url"),
                    "must be https (http only on loopback with allow_insecure_http)",
                ));
            }
            if g.token_env.is_some() == g.token_file.is_some() {
                return Err(src.error(
                    &field("token_env"),
                    "set exactly one of token_env and token_file",
                ));
            }
            if ![10, 15, 20, 25, 30, 40, 50].contains(&g.max_access_level) {
                return Err(src.error(
                    &field("max_access_level"),
                    "must be a GitLab access level: 10, 15, 20, 25, 30, 40 or 50",
                ));
            }
            if g.scopes.is_empty()
                || g.scopes
                    .iter()
                    .any(|s| !crate::provider::gitlab::is_resource_scope(s))
            {
                return Err(src.error(
                    &field("scopes"),
                    format!(
                        "must list GitLab resource-token scopes ({})",
                        crate::provider::gitlab::RESOURCE_SCOPES.join(", ")
                    ),
                ));
            }
            if g.timeout.is_zero() || g.timeout > Duration::from_secs(120) {
                return Err(src.error(&field("timeout"), "must be between 1ms and 120s"));
            }
            if g.max_retries > 10 {
                return Err(src.error(&field("max_retries"), "must be at most 10"));
            }
            if g.kek_env.is_some() && g.kek_file.is_some() {
                return Err(src.error(&field("kek_env"), "set at most one of kek_env and kek_file"));
            }
            if g.rotate_lifetime <= g.rotate_before
                || g.rotate_lifetime > Duration::from_secs(365 * 86400)
            {
                return Err(src.error(
                    &field("rotate_lifetime"),
                    "must be longer than rotate_before and at most 365 days",
                ));
            }
            if g.rotation_check_interval < Duration::from_secs(1) {
                return Err(src.error(&field("rotation_check_interval"), "must be at least 1s"));
            }
            if g.reconcile_interval < Duration::from_secs(1) {
                return Err(src.error(&field("reconcile_interval"), "must be at least 1s"));
            }
        }
        let a = &self.audit;
        if a.checkpoint_interval < Duration::from_millis(100)
            || a.checkpoint_interval > Duration::from_secs(3600)
        {
            return Err(src.error("audit.checkpoint_interval", "must be between 100ms and 1h"));
        }
        if a.checkpoint_every == 0 {
            return Err(src.error("audit.checkpoint_every", "must be at least 1"));
        }
        for (i, sink) in a.sinks.iter().enumerate() {
            if let AuditSinkConfig::File {
                max_bytes, keep, ..
            } = sink
            {
                if *max_bytes < 4096 {
                    return Err(src.error(
                        "audit.sinks",
                        format!("sink {}: max_bytes must be at least 4096", i + 1),
                    ));
                }
                if *keep == 0 || *keep > 1000 {
                    return Err(src.error(
                        "audit.sinks",
                        format!("sink {}: keep must be between 1 and 1000", i + 1),
                    ));
                }
            }
        }
        if a.sinks
            .iter()
            .filter(|s| matches!(s, AuditSinkConfig::Stdout))
            .count()
            > 1
        {
            return Err(src.error("audit.sinks", "at most one stdout sink"));
        }
        if self.signing.rotation_period < Duration::from_secs(3600) {
            return Err(src.error("signing.rotation_period", "must be at least 1h"));
        }
        if self.issuers.is_empty() {
            return Err(src.error("issuers", "at least one issuer must be configured"));
        }
        for (name, i) in &self.issuers {
            let at = |f: &str| format!("issuers.{name}.{f}");
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(src.error(
                    &format!("issuers.{name}"),
                    "issuer names use letters, digits, - and _",
                ));
            }
            check_issuer_url(&i.issuer, i.allow_insecure_http)
                .map_err(|m| src.error(&at("issuer"), m))?;
            if i.audiences.is_empty() || i.audiences.iter().any(String::is_empty) {
                return Err(src.error(&at("audiences"), "list at least one non-empty audience"));
            }
            if i.jwks_min_ttl > i.jwks_max_ttl {
                return Err(src.error(&at("jwks_min_ttl"), "must not exceed jwks_max_ttl"));
            }
            if i.max_stale < i.jwks_min_ttl {
                return Err(src.error(&at("max_stale"), "must be at least jwks_min_ttl"));
            }
            if i.leeway > Duration::from_secs(300) {
                return Err(src.error(&at("leeway"), "must be at most 5m"));
            }
            if i.max_token_age.is_zero() {
                return Err(src.error(&at("max_token_age"), "must be positive"));
            }
            if i.fetch_timeout.is_zero() || i.fetch_timeout > Duration::from_secs(60) {
                return Err(src.error(&at("fetch_timeout"), "must be between 1ms and 60s"));
            }
            if i.max_response_bytes < 1024 || i.max_response_bytes > 16 * 1024 * 1024 {
                return Err(src.error(
                    &at("max_response_bytes"),
                    "must be between 1 KiB and 16 MiB",
                ));
            }
            if i.max_token_bytes < 1024 || i.max_token_bytes > 1024 * 1024 {
                return Err(src.error(&at("max_token_bytes"), "must be between 1 KiB and 1 MiB"));
            }
        }
        let c = &self.ceiling;
        for (n, name) in c.issuers.iter().enumerate() {
            if !self.issuers.contains_key(name) {
                return Err(src.error(
                    "ceiling.issuers",
                    format!("entry {n} names unknown issuer {name:?}"),
                ));
            }
        }
        if c.max_ttl < Duration::from_secs(1) || c.max_ttl > Duration::from_secs(24 * 3600) {
            return Err(src.error("ceiling.max_ttl", "must be between 1s and 24h"));
        }
        if c.scopes
            .iter()
            .any(|s| s.is_empty() || s.contains(char::is_whitespace))
        {
            return Err(src.error(
                "ceiling.scopes",
                "scopes are non-empty and contain no whitespace",
            ));
        }
        if self.signing.rotation_period < c.max_ttl * 2 {
            return Err(src.error(
                "signing.rotation_period",
                "must be at least twice ceiling.max_ttl",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:0"
issuer = "http://127.0.0.1:8080"

[signing]
key_dir = "keys"

[issuers.gitlab]
issuer = "https://gitlab.example.com"
audiences = ["https://cistern.example.com"]

[policy]
dir = "policies"

[ceiling]
issuers = ["gitlab"]
max_ttl = "1h"
scopes = ["deploy:*"]
"#;

    fn load(text: &str) -> Result<Config, SourceError> {
        Config::from_source(&Source::from_text(
            Path::new("cistern.toml"),
            text.to_owned(),
        ))
    }

    #[test]
    fn the_minimal_config_loads_with_documented_defaults() {
        let c = load(MINIMAL).unwrap();
        let g = &c.issuers["gitlab"];
        assert!(g.replay_protection);
        assert_eq!(g.leeway, Duration::from_secs(30));
        assert_eq!(c.signing.algorithm, SigningAlgorithm::ES256);
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let text = include_str!("../examples/cistern.toml");
        load(text).unwrap();
    }

    #[test]
    fn the_example_audit_sinks_load_when_uncommented() {
        let full = include_str!("../examples/cistern.toml");
        let end = full.find("# Downstream credential providers").unwrap();
        let text = full[..end]
            .replace("# [[audit.sinks]]", "[[audit.sinks]]")
            .replace("# kind = ", "kind = ")
            .replace("# path = ", "path = ")
            .replace("# max_bytes = ", "max_bytes = ")
            .replace("# keep = ", "keep = ");
        let c = load(&text).unwrap();
        assert!(c.audit.fail_closed);
        assert_eq!(c.audit.checkpoint_every, 1000);
        assert!(matches!(
            &c.audit.sinks[..],
            [
                AuditSinkConfig::File { keep: 10, .. },
                AuditSinkConfig::Stdout
            ]
        ));
    }

    #[test]
    fn a_gitlab_provider_loads_and_bad_ones_name_their_field() {
        let ok = format!(
            "{MINIMAL}\n[providers.gitlab]\nkind = \"gitlab\"\nurl = \"https://gitlab-api.example.com\"\ntoken_env = \"GITLAB_BROKER_TOKEN\"\nscopes = [\"read_api\"]\n"
        );
        let c = load(&ok).unwrap();
        assert_eq!(c.ceiling.providers["gitlab"].max_access_level, 30);
        assert_eq!(c.ceiling.providers["gitlab"].scopes, ["read_api"]);
        for (from, to, field) in [
            (
                "https://gitlab-api.example.com",
                "http://gitlab-api.example.com",
                "providers.gitlab.url",
            ),
            (
                "token_env = \"GITLAB_BROKER_TOKEN\"",
                "",
                "providers.gitlab.token_env",
            ),
            (
                "[\"read_api\"]",
                "[\"read_user\"]",
                "providers.gitlab.scopes",
            ),
            (
                "token_env =",
                "max_access_level = 45\ntoken_env =",
                "providers.gitlab.max_access_level",
            ),
        ] {
            let e = load(&ok.replace(from, to)).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{from}: {e}");
        }
    }

    #[test]
    fn refresh_token_providers_are_checked_field_by_field() {
        let ok = format!(
            "{MINIMAL}\n[providers.idp]\nkind = \"oauth2_refresh_token\"\n\
             token_url = \"https://idp.example/token\"\n\
             authorization_url = \"https://idp.example/authorize\"\n\
             client_id = \"cistern\"\nclient_secret_env = \"S\"\nkek_env = \"K\"\n\
             scopes = [\"openid\", \"offline_access\"]\n\
             authorization_params = {{ prompt = \"consent\" }}\n"
        );
        let c = load(&ok).unwrap();
        assert_eq!(c.ceiling.providers["idp"].kind, "oauth2_refresh_token");
        for (from, to, field) in [
            ("kek_env = \"K\"\n", "", "providers.idp.kek_env"),
            (
                "kek_env = \"K\"",
                "kek_env = \"K\"\nkek_file = \"k\"",
                "providers.idp.kek_env",
            ),
            (
                "client_secret_env = \"S\"",
                "client_secret_env = \"S\"\nauth_method = \"none\"",
                "providers.idp.auth_method",
            ),
            (
                "client_secret_env = \"S\"\n",
                "",
                "providers.idp.auth_method",
            ),
            (
                "prompt = \"consent\"",
                "state = \"fixed\"",
                "providers.idp.authorization_params",
            ),
            (
                "https://idp.example/authorize",
                "http://idp.example/authorize",
                "providers.idp.authorization_url",
            ),
        ] {
            let e = load(&ok.replace(from, to)).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{from}: {e}");
        }
        // A public client: no secret, auth_method none.
        load(&ok.replace("client_secret_env = \"S\"", "auth_method = \"none\"")).unwrap();
        // Client credentials always need a secret.
        let cc = "[providers.cc]\nkind = \"oauth2_client_credentials\"\n\
                  token_url = \"https://idp.example/token\"\nclient_id = \"c\"\n\
                  client_secret_env = \"S\"\nauth_method = \"none\"\n";
        let e = load(&format!("{MINIMAL}\n{cc}")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("providers.cc.auth_method"));
    }

    #[test]
    fn the_example_provider_loads_when_uncommented_and_its_example_policy_compiles() {
        let text = include_str!("../examples/cistern.toml");
        let start = text.find("# [providers.gitlab]").unwrap();
        let end = text
            .find("# An OAuth 2.0 client-credentials provider")
            .unwrap();
        let idp = text.find("# [providers.idp]").unwrap();
        let idp_end = text.find("# An OAuth 2.0 refresh-token provider").unwrap();
        let company = text.find("# [providers.company-idp]").unwrap();
        let company_end = text.find("# The identity-aware proxy").unwrap();
        let proxy = text.find("# [proxy]").unwrap();
        let uncommented: String = text[start..end]
            .lines()
            .chain(text[idp..idp_end].lines())
            .chain(text[company..company_end].lines())
            .chain(text[proxy..].lines())
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .filter(|l| {
                !l.starts_with("# ") && !l.starts_with("token_file") && !l.starts_with("kek_file")
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c = load(&format!("{}{uncommented}", &text[..start])).unwrap();
        let limits = &c.ceiling.providers["gitlab"];
        assert_eq!(limits.max_access_level, 30);
        assert_eq!(
            c.ceiling.providers["idp"].audiences,
            ["https://api.internal.example.com"]
        );
        assert_eq!(
            c.ceiling.providers["company-idp"].kind,
            "oauth2_refresh_token"
        );
        assert_eq!(c.ceiling.providers["company-idp"].scopes, ["read_api"]);
        let route = &c.proxy.routes["gitlab"];
        assert_eq!(route.prefix_of("gitlab"), "/proxy/gitlab");
        assert_eq!(route.provider.as_deref(), Some("gitlab"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.toml"),
            include_str!("../examples/downstream/gitlab-read-api.toml"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("proxy.toml"),
            include_str!("../examples/proxy/gitlab-api.toml"),
        )
        .unwrap();
        crate::policy::PolicyStore::load(dir.path(), &c.ceiling, &c.issuers).unwrap();
    }

    #[test]
    fn proxy_routes_are_checked_with_their_field() {
        let route = |extra: &str| {
            format!(
                "{MINIMAL}\n[proxy.routes.r]\nupstream = \"https://up.example\"\n\
                 audience = \"https://r.test\"\nsecret_env = \"S\"\npresent = \"bearer\"\n{extra}"
            )
        };
        let c = load(&route("")).unwrap();
        assert_eq!(c.proxy.routes["r"].prefix_of("r"), "/proxy/r");
        let field = |text: &str| load(text).unwrap_err().field.unwrap_or_default();
        assert_eq!(
            field(&route("prefix = \"/oauth\"")),
            "proxy.routes.r.prefix"
        );
        assert_eq!(
            field(&route("prefix = \"/a/../b\"")),
            "proxy.routes.r.prefix"
        );
        assert_eq!(field(&route("prefix = \"/\"")), "proxy.routes.r.prefix");
        assert_eq!(
            field(&route("secret_file = \"f\"")),
            "proxy.routes.r.secret_env"
        );
        assert_eq!(
            field(&route("provider = \"nope\"")),
            "proxy.routes.r.secret_env"
        );
        let http = route("").replace("https://up.example", "http://up.example");
        assert_eq!(field(&http), "proxy.routes.r.upstream");
        let loopback =
            route("allow_insecure_http = true").replace("https://up.example", "http://127.0.0.1:9");
        assert!(load(&loopback).is_ok());
        let header = route("").replace("\"bearer\"", "\"header\"");
        assert_eq!(field(&header), "proxy.routes.r.header_name");
        let host = route("header_name = \"Host\"").replace("\"bearer\"", "\"header\"");
        assert_eq!(field(&host), "proxy.routes.r.header_name");
        let basic = route("").replace("\"bearer\"", "\"basic\"");
        assert_eq!(field(&basic), "proxy.routes.r.basic_username");
        let twice = format!(
            "{}\n[proxy.routes.s]\nupstream = \"https://up.example\"\n\
             audience = \"https://r.test\"\nsecret_env = \"S\"\npresent = \"bearer\"\n",
            route("")
        );
        assert_eq!(field(&twice), "proxy.routes.s.audience");
        let creds = route("").replace("https://up.example", "https://u:p@up.example");
        assert_eq!(field(&creds), "proxy.routes.r.upstream");
        let sealed = route("").replace("secret_env = \"S\"", "sealed = true");
        assert_eq!(field(&sealed), "proxy.routes.r.kek_env");
        assert!(load(&format!("{sealed}kek_env = \"K\"\n")).is_ok());
        assert_eq!(
            field(&format!("{sealed}kek_env = \"K\"\nkek_file = \"f\"\n")),
            "proxy.routes.r.kek_env"
        );
        assert_eq!(field(&route("kek_env = \"K\"")), "proxy.routes.r.kek_env");
        assert_eq!(
            field(&route("max_connections = 0")),
            "proxy.routes.r.max_connections"
        );
        assert_eq!(
            load(&route("max_connections = 8")).unwrap().proxy.routes["r"].max_connections,
            8
        );
        assert_eq!(
            load(&route("")).unwrap().proxy.routes["r"].max_connections,
            128
        );
        assert!(load(&route("host = \"gitlab-proxy.example.com\"")).is_ok());
        for bad in ["Upper.example", "h.example:443", "", "-a.example"] {
            assert_eq!(
                field(&route(&format!("host = \"{bad}\""))),
                "proxy.routes.r.host",
                "{bad}"
            );
        }
        assert_eq!(
            field(&route("host = \"h.example\"\nprefix = \"/p\"")),
            "proxy.routes.r.host"
        );
        assert_eq!(
            field(&route("sealed = true\nkek_env = \"K\"")),
            "proxy.routes.r.secret_env"
        );
    }

    #[test]
    fn connection_limits_default_and_are_checked_with_their_field() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(30));
        assert_eq!(c.server.max_connections, 10_000);
        let with = |line: &str| {
            MINIMAL.replace(
                "issuer = \"http://127.0.0.1:8080\"\n",
                &format!("issuer = \"http://127.0.0.1:8080\"\n{line}\n"),
            )
        };
        for (line, field) in [
            (
                "header_read_timeout = \"10ms\"",
                "server.header_read_timeout",
            ),
            ("header_read_timeout = \"2h\"", "server.header_read_timeout"),
            ("max_connections = 0", "server.max_connections"),
        ] {
            let e = load(&with(line)).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{line}: {e}");
            assert!(e.line.is_some(), "{line}: {e}");
        }
        let c = load(&with("header_read_timeout = \"5s\"\nmax_connections = 64")).unwrap();
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(5));
        assert_eq!(c.server.max_connections, 64);
    }

    #[test]
    fn bad_audit_settings_are_refused_with_their_field() {
        let e = load(&format!("{MINIMAL}\n[audit]\ncheckpoint_every = 0\n")).unwrap_err();
        assert!(e.to_string().contains("audit.checkpoint_every"), "{e}");
        let e = load(&format!(
            "{MINIMAL}\n[[audit.sinks]]\nkind = \"file\"\npath = \"a\"\nkeep = 0\n"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("sink 1: keep"), "{e}");
        let e = load(&format!("{MINIMAL}\n[[audit.sinks]]\nkind = \"syslog\"\n")).unwrap_err();
        assert!(e.to_string().contains("syslog"), "{e}");
    }

    #[test]
    fn an_http_issuer_is_refused_with_file_line_and_field() {
        let text = MINIMAL.replace("https://gitlab.example.com", "http://gitlab.example.com");
        let e = load(&text).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("issuers.gitlab.issuer"));
        assert_eq!(e.line, Some(10), "{e}");
    }

    #[test]
    fn a_ceiling_naming_an_unknown_issuer_is_refused() {
        let e =
            load(&MINIMAL.replace("issuers = [\"gitlab\"]", "issuers = [\"github\"]")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("ceiling.issuers"));
    }

    #[test]
    fn issuer_urls_with_tricks_are_refused() {
        for bad in [
            "https://gitlab.example.com/controllablepath#",
            "https://gitlab.example.com?x=1",
            "https://user@gitlab.example.com",
            "https://gitlab.example.com/a/../b",
            "https://gitlab.example.com//a",
            "ftp://gitlab.example.com",
            "http://gitlab.example.com",
        ] {
            assert!(check_issuer_url(bad, false).is_err(), "{bad}");
        }
        assert!(check_issuer_url("http://127.0.0.1:9000", true).is_ok());
        assert!(check_issuer_url("http://10.0.0.1:9000", true).is_err());
        assert!(check_issuer_url("https://gitlab.example.com/gitlab", false).is_ok());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = load(&MINIMAL.replace("[policy]", "[policy]\nbogus = 1")).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("bogus"));
    }
}
