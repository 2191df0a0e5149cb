//! `cistern audit verify`, `cistern audit export` and `cistern audit prune`.

use std::path::{Path, PathBuf};
use std::time::{Instant, UNIX_EPOCH};

use clap::{Args, Subcommand};

use super::inventory::load_config;
use super::{CliError, exit};
use crate::audit::export::{self, Filter};
use crate::audit::verify::{self, Verdict};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, StoreConfig};
use crate::mint::PublishedKeys;

/// `cistern audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain and the signed checkpoints; name the first bad record.
    Verify(VerifyArgs),
    /// Stream records as JSON Lines (for a SIEM), filtered by time, identity and kind.
    Export(ExportArgs),
    /// Archive the records older than a cutoff to a file that verifies on
    /// its own, then delete them from the store; the store's log still verifies.
    Prune(PruneArgs),
}

/// `cistern audit prune`
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Config file: names the store, the key directory and the issuer.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Records older than this may go: an RFC 3339 instant or an age
    /// (`400d`). The cut is the newest signed checkpoint before it.
    #[arg(long)]
    pub before: String,
    /// The archive to create (JSON Lines with its checkpoints; check it with
    /// `cistern audit verify --file`). Must not exist.
    #[arg(long)]
    pub archive: PathBuf,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `cistern audit verify`
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "db", "files"]).multiple(true)))]
pub struct VerifyArgs {
    /// Config file: names the store, the key directory and the issuer.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// A SQLite store file (a copy is fine); default: the one `--config` names.
    #[arg(long, conflicts_with = "files")]
    pub db: Option<PathBuf>,
    /// JSON Lines files instead of a store (a file sink's output or an
    /// unfiltered export), oldest first. Repeat for rotated files.
    #[arg(long = "file")]
    pub files: Vec<PathBuf>,
    /// Signing key directory for checkpoint signatures; default: the one `--config` names.
    #[arg(long)]
    pub key_dir: Option<PathBuf>,
    /// Check checkpoints by hash only (no keys at hand). Truncation and
    /// rewrites are then caught only against the checkpoints' own word.
    #[arg(long, conflicts_with = "key_dir")]
    pub no_signatures: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `cistern audit export`
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "db"])))]
pub struct ExportArgs {
    /// Config file naming the store.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// A SQLite store file.
    #[arg(long)]
    pub db: Option<PathBuf>,
    /// Records at or after: an RFC 3339 instant or an age (`24h`, `30d`).
    #[arg(long)]
    pub since: Option<String>,
    /// Records before: an RFC 3339 instant or an age.
    #[arg(long)]
    pub until: Option<String>,
    /// Only these kinds (repeatable): exchange_granted, exchange_denied,
    /// token_revoked, offboarded, policy_loaded, …
    #[arg(long = "kind")]
    pub kinds: Vec<String>,
    /// Only this issuer (configured name).
    #[arg(long)]
    pub issuer: Option<String>,
    /// Only this project id.
    #[arg(long)]
    pub project: Option<String>,
    /// Only this role.
    #[arg(long)]
    pub role: Option<String>,
    /// Write here instead of standard output.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

/// Every kind a record can have (`AuditKind`'s stored spellings).
const KINDS: &[&str] = &[
    "exchange_granted",
    "exchange_denied",
    "exchange_dry_run",
    "policy_loaded",
    "policy_rejected",
    "key_rotated",
    "token_revoked",
    "credential_expired",
    "offboarded",
    "reenabled",
    "admin_action",
    "introspected",
    "proxy_request",
    "proxy_denied",
    "audit_pruned",
];

/// Runs `cistern audit verify`.
pub fn verify(args: &VerifyArgs) -> Result<(), CliError> {
    let config = args.config.as_deref().map(load_config).transpose()?;
    let keys = if args.no_signatures {
        None
    } else {
        let dir = args
            .key_dir
            .clone()
            .or_else(|| config.as_ref().map(|c| c.signing.key_dir.clone()))
            .ok_or_else(|| {
                CliError::new(
                    exit::USAGE,
                    "no signing keys: pass --config or --key-dir (or --no-signatures)",
                )
            })?;
        Some(PublishedKeys::load(&dir).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?)
    };
    let issuer = config
        .as_ref()
        .map(|c| c.server.issuer.as_str().trim_end_matches('/').to_owned());
    let started = Instant::now();
    let verdict = if args.files.is_empty() {
        let path = store_path(args.db.as_deref(), config.as_ref())?;
        verify::verify_sqlite(&path, keys.as_ref(), issuer)
    } else {
        let paths: Vec<&Path> = args.files.iter().map(PathBuf::as_path).collect();
        verify::verify_files(&paths, keys.as_ref(), issuer)
    }
    .map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    report(&verdict, started.elapsed().as_secs_f64(), args.json)
}

fn report(verdict: &Verdict, secs: f64, json: bool) -> Result<(), CliError> {
    let rate = if secs > 0.0 {
        verdict.report.records as f64 / secs
    } else {
        0.0
    };
    if json {
        let out = serde_json::json!({
            "ok": verdict.problem.is_none(),
            "problem": verdict.problem.as_ref().map(ToString::to_string),
            "first_bad_seq": verdict.problem.as_ref().and_then(first_bad_seq),
            "report": verdict.report,
            "records_per_second": rate.round(),
        });
        println!("{out}");
    } else {
        let status = if verdict.problem.is_none() {
            "audit log verified"
        } else {
            "verified before the problem"
        };
        println!("{status}: {} ({:.0} records/s)", verdict.report, rate);
    }
    match &verdict.problem {
        None => Ok(()),
        Some(p) => Err(CliError::new(
            exit::DENIED,
            format!("audit log tampered: {p}"),
        )),
    }
}

/// The sequence number of the first bad record a problem names.
fn first_bad_seq(p: &verify::Problem) -> Option<i64> {
    use verify::Problem::*;
    match p {
        Deleted { seq, .. }
        | BrokenLink { seq }
        | Modified { seq }
        | OutOfOrder { seq, .. }
        | Unsealed { seq } => Some(*seq),
        Rewritten { since, .. } => Some(since.unwrap_or(0) + 1),
        Truncated { last, .. } => Some(last.unwrap_or(0) + 1),
        PrefixDeleted { .. } => Some(1),
        BadCheckpoint { .. } | Malformed { .. } => None,
    }
}

/// Runs `cistern audit prune`.
pub async fn prune(args: &PruneArgs) -> Result<(), CliError> {
    use crate::audit::prune::{self, PruneError, PruneRequest, Signing};
    use crate::mint::KeyRing;
    use crate::store::sqlite::SqliteStore;

    let config = load_config(&args.config)?;
    let path = store_path(None, Some(&config))?;
    let StoreConfig::Sqlite { synchronous, .. } = &config.store;
    let issuer = config
        .server
        .issuer
        .as_str()
        .trim_end_matches('/')
        .to_owned();
    let clock: std::sync::Arc<dyn Clock> = std::sync::Arc::new(SystemClock);
    // Only checkpoints are signed here; keys are never generated or rotated.
    let signer = KeyRing::open_existing(&config.signing, clock.clone(), config.ceiling.max_ttl)
        .map_err(|e| CliError::new(exit::USAGE, format!("signing keys: {e}")))?;
    let keys = signer.published_keys();
    let now_ms = clock.now_millis();
    let before_ms = instant_ms(&args.before, now_ms, "--before")?;
    let store = SqliteStore::open(&path, *synchronous).map_err(|e| {
        CliError::new(
            exit::UNAVAILABLE,
            format!("opening store {}: {e}", path.display()),
        )
    })?;
    let failed = |e: PruneError| {
        let code = match &e {
            PruneError::DoesNotVerify(_) | PruneError::BadArchive { .. } => exit::DENIED,
            PruneError::ArchiveExists(_) => exit::USAGE,
            _ => exit::UNAVAILABLE,
        };
        CliError::new(code, e.to_string())
    };
    // An earlier prune stopped half-way: its records go first.
    let signing = Signing {
        signer: &signer,
        issuer: &issuer,
        clock: &*clock,
    };
    let finished = prune::finish_pending(&store, &path, signing)
        .await
        .map_err(failed)?;
    let outcome = prune::prune(
        &store,
        &PruneRequest {
            db: &path,
            before_ms,
            archive: &args.archive,
            keys: Some(&keys),
            signing,
        },
    )
    .await;
    store.close().await;
    let outcome = outcome.map_err(failed)?;
    if args.json {
        let out = match &outcome {
            Some(o) => serde_json::json!({
                "pruned": true,
                "record_seq": o.record_seq,
                "deleted": o.deleted + finished,
                "detail": o.detail,
            }),
            None => serde_json::json!({ "pruned": false, "deleted": finished }),
        };
        println!("{out}");
        return Ok(());
    }
    if finished > 0 {
        println!("finished an earlier prune: {finished} records deleted");
    }
    match outcome {
        Some(o) => println!(
            "pruned seq {}..={} ({} records, {} checkpoints) into {} (sha256 {}, {} bytes); \
             audit_pruned record at seq {}; {} records deleted from the store",
            o.detail.first_seq,
            o.detail.through_seq,
            o.detail.records,
            o.detail.checkpoints,
            args.archive.display(),
            o.detail.archive.sha256,
            o.detail.archive.bytes,
            o.record_seq,
            o.deleted,
        ),
        None => println!(
            "nothing to prune: no signed checkpoint on a record before {}",
            crate::audit::record::rfc3339_millis(before_ms)
        ),
    }
    Ok(())
}

/// Runs `cistern audit export`.
pub fn export(args: &ExportArgs) -> Result<(), CliError> {
    let config = args.config.as_deref().map(load_config).transpose()?;
    let path = store_path(args.db.as_deref(), config.as_ref())?;
    for k in &args.kinds {
        if !KINDS.contains(&k.as_str()) {
            return Err(CliError::new(
                exit::USAGE,
                format!("--kind {k}: unknown kind (one of {})", KINDS.join(", ")),
            ));
        }
    }
    let now_ms = SystemClock.now_millis();
    let filter = Filter {
        since_ms: args
            .since
            .as_deref()
            .map(|s| instant_ms(s, now_ms, "--since"))
            .transpose()?,
        until_ms: args
            .until
            .as_deref()
            .map(|s| instant_ms(s, now_ms, "--until"))
            .transpose()?,
        kinds: args.kinds.clone(),
        issuer: args.issuer.clone(),
        project_id: args.project.clone(),
        role: args.role.clone(),
        through_seq: None,
    };
    let result = match &args.output {
        Some(out) => {
            let file = std::fs::File::create(out).map_err(|e| {
                CliError::new(exit::USAGE, format!("cannot create {}: {e}", out.display()))
            })?;
            export::export_sqlite(&path, &filter, std::io::BufWriter::new(file))
        }
        None => export::export_sqlite(&path, &filter, std::io::stdout().lock()),
    };
    match result {
        Ok(n) => {
            if args.output.is_some() {
                eprintln!("exported {n} records");
            }
            Ok(())
        }
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        Err(export::ExportError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::new(exit::UNAVAILABLE, e.to_string())),
    }
}

/// An RFC 3339 instant, or an age before `now_ms` (`30d`, `12h`).
fn instant_ms(s: &str, now_ms: i64, flag: &str) -> Result<i64, CliError> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        return Ok(ms);
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))),
        Err(_) => Err(CliError::new(
            exit::USAGE,
            format!("{flag} {s}: neither an RFC 3339 instant nor an age like 30d"),
        )),
    }
}

fn store_path(db: Option<&Path>, config: Option<&Config>) -> Result<PathBuf, CliError> {
    let path = match (db, config) {
        (Some(p), _) => p.to_owned(),
        (None, Some(c)) => match &c.store {
            StoreConfig::Sqlite { path, .. } => path.clone(),
        },
        (None, None) => return Err(CliError::new(exit::USAGE, "pass --config or --db")),
    };
    if !path.is_file() {
        return Err(CliError::new(
            exit::USAGE,
            format!("no store at {}", path.display()),
        ));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AuditKind;

    #[test]
    fn the_kind_list_names_every_audit_kind() {
        let all = [
            AuditKind::ExchangeGranted,
            AuditKind::ExchangeDenied,
            AuditKind::ExchangeDryRun,
            AuditKind::PolicyLoaded,
            AuditKind::PolicyRejected,
            AuditKind::KeyRotated,
            AuditKind::TokenRevoked,
            AuditKind::CredentialExpired,
            AuditKind::Offboarded,
            AuditKind::Reenabled,
            AuditKind::AdminAction,
            AuditKind::Introspected,
            AuditKind::ProxyRequest,
            AuditKind::ProxyDenied,
            AuditKind::AuditPruned,
        ];
        assert_eq!(all.len(), KINDS.len());
        for k in all {
            assert!(KINDS.contains(&k.as_str()), "{}", k.as_str());
        }
    }
}
