//! The command line: `serve`, `policy check|test|diff`, `exchange`,
//! `dev id-token`, `inventory`, `report`, `revoke`, `offboard`, `reenable`,
//! `admin`, `audit verify|export`.

pub mod admin;
pub mod audit;
pub mod client;
pub mod dev;
pub mod inventory;
pub mod policy;
pub mod policy_diff;
pub mod provider;
pub mod report;
pub mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// cistern — a security token service for CI/CD pipelines.
#[derive(Debug, Parser)]
#[command(name = "cistern", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the token service.
    Serve(ServeArgs),
    /// Run the identity-aware proxy alone on `[proxy] listen` (a separate
    /// network zone), beside the `cistern serve` that issues the tokens.
    Proxy {
        /// Config file (the same one `cistern serve` uses).
        #[arg(long, short, env = "CISTERN_CONFIG", default_value = "cistern.toml")]
        config: PathBuf,
    },
    /// Check policies or dry-run them against claims.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Job side: trade the job's ID token for a cistern token.
    Exchange(ExchangeArgs),
    /// Development helpers for `serve --dev`.
    #[command(subcommand)]
    Dev(DevCommand),
    /// List pipeline identities: owners, scopes, use, outstanding credentials.
    Inventory(inventory::InventoryArgs),
    /// The three questions: where credentials exist, who owns them, how fast revocation works.
    Report(report::ReportArgs),
    /// Revoke credentials: one jti, a project, namespace, role, issuer, or all.
    Revoke(RevokeArgs),
    /// Block new exchanges for a project, namespace or role and revoke what it holds.
    Offboard(BlockArgs),
    /// Lift an offboarding block.
    Reenable(BlockArgs),
    /// Admin credentials and listings.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// The tamper-evident audit log: verify the chain, export records.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Downstream credential providers: cistern's own credentials.
    #[command(subcommand)]
    Provider(provider::ProviderCommand),
    /// Proxy routes: the secrets they inject.
    #[command(subcommand)]
    Route(provider::RouteCommand),
}

/// How an admin command reaches cistern.
#[derive(Debug, Args)]
pub struct AdminConnection {
    /// cistern's base URL (admin API).
    #[arg(long, env = "CISTERN_URL", conflicts_with = "direct")]
    pub server: Option<String>,
    /// File holding the admin credential (bootstrap or `cistern:admin` token);
    /// default: env `CISTERN_ADMIN_TOKEN`.
    #[arg(long, conflicts_with = "direct")]
    pub token_file: Option<PathBuf>,
    /// Config file (with `--direct`).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Act on the store named by `--config` directly (on the server's host);
    /// the running server applies the change at its next poll.
    #[arg(long, requires = "config")]
    pub direct: bool,
}

/// `cistern revoke`
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("grain").required(true).args(["jti", "project", "namespace", "role", "all", "issuer"]).multiple(true)))]
pub struct RevokeArgs {
    /// One credential by jti.
    #[arg(long, conflicts_with_all = ["project", "namespace", "role", "all", "issuer", "before"])]
    pub jti: Option<String>,
    /// Everything issued to this project id.
    #[arg(long, conflicts_with_all = ["namespace", "role", "all"])]
    pub project: Option<String>,
    /// Everything issued to this namespace id.
    #[arg(long, conflicts_with_all = ["role", "all"])]
    pub namespace: Option<String>,
    /// Everything issued for this role.
    #[arg(long, conflicts_with_all = ["all", "issuer"])]
    pub role: Option<String>,
    /// Issuer (name or URL): scopes --project/--namespace, or alone revokes
    /// everything issued to that issuer's jobs.
    #[arg(long)]
    pub issuer: Option<String>,
    /// Everything.
    #[arg(long, conflicts_with = "issuer")]
    pub all: bool,
    /// Only credentials issued before this RFC 3339 instant (default: now).
    #[arg(long)]
    pub before: Option<String>,
    /// Why (recorded in the audit log).
    #[arg(long)]
    pub reason: String,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
    /// Connection.
    #[command(flatten)]
    pub conn: AdminConnection,
}

/// `cistern offboard` / `cistern reenable`
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["project", "namespace", "role"])))]
pub struct BlockArgs {
    /// A project id.
    #[arg(long)]
    pub project: Option<String>,
    /// A namespace id.
    #[arg(long)]
    pub namespace: Option<String>,
    /// A role.
    #[arg(long, conflicts_with = "issuer")]
    pub role: Option<String>,
    /// Issuer (name or URL) scoping --project/--namespace; default: every issuer.
    #[arg(long)]
    pub issuer: Option<String>,
    /// Why (recorded in the audit log).
    #[arg(long)]
    pub reason: String,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
    /// Connection.
    #[command(flatten)]
    pub conn: AdminConnection,
}

/// `cistern admin …`
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Generate a break-glass bootstrap credential: printed once, with the
    /// `[admin] bootstrap_sha256` line to put in the config.
    Bootstrap,
    /// List the offboarding blocks in force (JSON).
    Offboarded(AdminConnection),
}

/// `cistern serve`
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Config file.
    #[arg(long, short, env = "CISTERN_CONFIG", default_value = "cistern.toml")]
    pub config: PathBuf,
    /// Zero-setup local mode: temporary store and keys, a built-in development
    /// issuer and example policies. Never use in production.
    #[arg(long)]
    pub dev: bool,
    /// Listen address (dev mode only; otherwise set `server.listen`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
}

/// `cistern policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy directory against the config's ceiling and issuers.
    Check {
        /// Policy directory (default: the config's `policy.dir`).
        dir: Option<PathBuf>,
        /// Config file.
        #[arg(long, short, env = "CISTERN_CONFIG", default_value = "cistern.toml")]
        config: PathBuf,
    },
    /// Dry-run: which roles would these claims get, and why not the others.
    Test(PolicyTestArgs),
    /// Replay recorded exchanges against a proposed policy directory: which
    /// roles and scopes each identity would gain or lose.
    Diff(policy_diff::PolicyDiffArgs),
}

/// `cistern policy test`
#[derive(Debug, Args)]
pub struct PolicyTestArgs {
    /// Claims as a JSON file (a decoded ID token payload).
    #[arg(long, conflicts_with = "token", required_unless_present = "token")]
    pub claims: Option<PathBuf>,
    /// An ID token; its signature is NOT verified here (this only explains policy).
    #[arg(long)]
    pub token: Option<String>,
    /// Only this role.
    #[arg(long)]
    pub role: Option<String>,
    /// Issuer name (default: the issuer whose URL equals the claims' `iss`).
    #[arg(long)]
    pub issuer: Option<String>,
    /// Policy directory (default: the config's `policy.dir`).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Config file.
    #[arg(long, short, env = "CISTERN_CONFIG", default_value = "cistern.toml")]
    pub config: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = TextOrJson::Text)]
    pub format: TextOrJson,
}

/// Text or JSON output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TextOrJson {
    /// For people.
    Text,
    /// For programs.
    Json,
}

/// `cistern exchange`
#[derive(Debug, Args)]
pub struct ExchangeArgs {
    /// cistern's base URL.
    #[arg(long, env = "CISTERN_URL")]
    pub url: String,
    /// Role to ask for.
    #[arg(long, env = "CISTERN_ROLE")]
    pub role: Option<String>,
    /// Scope to ask for (repeatable); a subset of the role's scopes.
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    /// Audience to ask for.
    #[arg(long)]
    pub audience: Option<String>,
    /// Environment variable holding the ID token (`id_tokens:` in .gitlab-ci.yml).
    #[arg(long, default_value = "CISTERN_ID_TOKEN")]
    pub token_env: String,
    /// Read the ID token from this file instead.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Token)]
    pub format: OutputFormat,
    /// Variable name for `env`/`dotenv` output; default `CISTERN_TOKEN`, or
    /// `GITLAB_TOKEN` for a GitLab access token.
    #[arg(long)]
    pub var: Option<String>,
    /// Evaluate without issuing anything and print the decision trace.
    #[arg(long)]
    pub dry_run: bool,
    /// Request deadline.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

/// How `exchange` prints the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// The token alone.
    Token,
    /// `export NAME='token'` for `eval`.
    Env,
    /// `NAME=token` (a GitLab `artifacts:reports:dotenv` file).
    Dotenv,
    /// The whole token response.
    Json,
}

/// `cistern dev …`
#[derive(Debug, Subcommand)]
pub enum DevCommand {
    /// Mint a GitLab-shaped ID token from a running `serve --dev`.
    IdToken {
        /// The dev server's base URL.
        #[arg(long, env = "CISTERN_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// Override a claim with a string value (`project_id=43`); repeatable.
        #[arg(long = "claim")]
        claims: Vec<String>,
        /// Override a claim with a JSON value (`runner_id=7`); repeatable.
        #[arg(long = "claim-json")]
        claims_json: Vec<String>,
        /// Audience (default: the dev server's URL).
        #[arg(long)]
        audience: Option<String>,
    },
}

/// Exit codes, documented in the README.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// Denied or invalid (policy refused, bad token, invalid policy files).
    pub const DENIED: u8 = 1;
    /// Bad usage or local input (missing token, unreadable file, bad config).
    pub const USAGE: u8 = 2;
    /// cistern unreachable or failing (network error, 5xx).
    pub const UNAVAILABLE: u8 = 3;
}

/// An error that ends the command with a code and one line on stderr.
#[derive(Debug)]
pub struct CliError {
    /// Exit code.
    pub code: u8,
    /// One line.
    pub message: String,
}

impl CliError {
    /// Builds one.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        // `{:#}` joins the context chain on one line.
        Self::new(exit::USAGE, format!("{e:#}"))
    }
}

/// Sends a request to cistern and reads its JSON answer; transport failures
/// and unreadable bodies become one-line `UNAVAILABLE` errors.
pub(crate) async fn send_json(
    base: &str,
    request: reqwest::RequestBuilder,
) -> Result<(reqwest::StatusCode, serde_json::Value), CliError> {
    let res = request.send().await.map_err(|e| {
        CliError::new(
            exit::UNAVAILABLE,
            format!("cannot reach cistern at {base}: {e}"),
        )
    })?;
    let status = res.status();
    let body = res.json().await.map_err(|e| {
        CliError::new(
            exit::UNAVAILABLE,
            format!("cistern answered {status} with an unreadable body: {e}"),
        )
    })?;
    Ok((status, body))
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Proxy { config } => serve::run_proxy(&config)
            .await
            .map_err(|e| CliError::new(exit::USAGE, format!("{e:#}"))),
        Command::Serve(args) => serve::run(args)
            .await
            .map_err(|e| CliError::new(exit::USAGE, format!("{e:#}"))),
        Command::Policy(PolicyCommand::Check { dir, config }) => {
            policy::check(&config, dir.as_deref())
        }
        Command::Policy(PolicyCommand::Test(args)) => policy::test(&args),
        Command::Exchange(args) => client::exchange(&args).await,
        Command::Dev(DevCommand::IdToken {
            url,
            claims,
            claims_json,
            audience,
        }) => dev::id_token(&url, &claims, &claims_json, audience.as_deref()).await,
        Command::Inventory(args) => inventory::run(&args),
        Command::Report(args) => report::run(&args),
        Command::Policy(PolicyCommand::Diff(args)) => policy::diff(&args),
        Command::Revoke(args) => admin::revoke(&args).await,
        Command::Offboard(args) => admin::offboard(&args).await,
        Command::Reenable(args) => admin::reenable(&args).await,
        Command::Admin(AdminCommand::Bootstrap) => admin::bootstrap(),
        Command::Audit(audit::AuditCommand::Verify(args)) => audit::verify(&args),
        Command::Audit(audit::AuditCommand::Export(args)) => audit::export(&args),
        Command::Audit(audit::AuditCommand::Prune(args)) => audit::prune(&args).await,
        Command::Provider(provider::ProviderCommand::SetCredential(args)) => {
            provider::set_credential(&args).await
        }
        Command::Provider(provider::ProviderCommand::Authorize(args)) => {
            provider::authorize(&args).await
        }
        Command::Provider(provider::ProviderCommand::CheckSecret(args)) => {
            provider::check_secret(&args).await
        }
        Command::Route(provider::RouteCommand::SetSecret(args)) => {
            provider::set_route_secret(&args).await
        }
        Command::Admin(AdminCommand::Offboarded(conn)) => admin::list_offboarded(&conn).await,
    }
}
