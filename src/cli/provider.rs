//! `cistern provider set-credential`: loads cistern's own credential for a
//! provider once, sealed into the store (on the server's host).

use std::io::Read as _;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;
use zeroize::Zeroizing;

use super::inventory::load_config;
use super::{CliError, exit};
use crate::config::{ProviderConfig, StoreConfig};
use crate::store::sqlite::SqliteStore;
use crate::store::{AuditEvent, AuditKind, Store};

/// `cistern provider …`
#[derive(Debug, Subcommand)]
pub enum ProviderCommand {
    /// Seal cistern's own credential for a provider (read from standard
    /// input) into the store; the server uses it from its next start and
    /// rotates it from then on.
    SetCredential(SetCredentialArgs),
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
    let mut input = Zeroizing::new(String::new());
    std::io::stdin()
        .take(64 * 1024)
        .read_to_string(&mut input)
        .map_err(|e| usage(format!("reading the credential from standard input: {e}")))?;
    let token = Zeroizing::new(input.trim().to_owned());
    if token.is_empty() || token.chars().any(|c| c.is_control() || c == ' ') {
        return Err(usage(
            "the credential on standard input is empty or malformed".into(),
        ));
    }
    let sealed = kek
        .seal(&args.name, token.as_str())
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    let StoreConfig::Sqlite { path, synchronous } = &config.store;
    let store = SqliteStore::open(path, *synchronous)
        .map_err(|e| CliError::new(exit::UNAVAILABLE, format!("opening the store: {e}")))?;
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let audit = AuditEvent {
        at_ms,
        kind: AuditKind::AdminAction,
        issuer: None,
        role: None,
        project_id: None,
        reason: Some("provider_credential_loaded".into()),
        detail: json!({ "provider": args.name, "source": "cli" }).into(),
    };
    store
        .save_sealed_credential(&args.name, sealed, None, audit)
        .await
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    store.close().await;
    eprintln!(
        "sealed the credential for provider {} into the store; restart the server to use it",
        args.name
    );
    Ok(())
}
