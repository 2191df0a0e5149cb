//! Retention: archive the log's oldest records, then delete them from the
//! store, without losing what makes the log tamper-evident.
//!
//! The cut is the newest signed checkpoint on a record older than the
//! retention cutoff. Before anything is deleted, the whole store must
//! verify, the records up to the cut are exported (with their checkpoints)
//! to a new archive file, synced, and that file must verify on its own and
//! end at the cut's hash. Then an `audit_pruned` record, appended to the
//! chain like any other, names the cut (`through_seq`, `through_hash`) and
//! the archive's SHA-256, a signed checkpoint covers that record, and only
//! then are the records through the cut deleted, a chunk per transaction so
//! a running server's writer never waits long for the lock.
//!
//! Verification of the store accepts a log that starts after seq 1 only
//! when such a record in it, covered by a signed checkpoint, vouches for
//! the start (see [`super::verify::Verifier`]); the store refuses to delete
//! anything else. Without the checkpoint anyone able to write the database
//! could append a vouching record after the newest checkpoint and delete
//! the log's head. A prune interrupted half-way leaves a log that still verifies, and
//! running it again finishes the job.

use std::io::{BufWriter, Read, Write};
use std::path::Path;

use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::checkpoint::{CheckpointError, checkpoint_now};
use super::export::{self, Filter};
use super::record::rfc3339_millis;
use super::verify::{Problem, Verdict, VerifyError, verify_connection, verify_files};
use crate::clock::Clock;
use crate::mint::{KeyRing, PublishedKeys};
use crate::store::{AuditDetail, AuditEvent, AuditKind, Store, StoreError};

/// Records deleted per transaction: small enough that a server writing the
/// same file never waits long on the lock (its busy timeout is seconds).
pub const DELETE_CHUNK: u32 = 5_000;

/// The detail of an `audit_pruned` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrunedDetail {
    /// The last record pruned.
    pub through_seq: i64,
    /// Its hash (hex): the first kept record's `prev_hash`.
    pub through_hash: String,
    /// The first record the archive holds.
    pub first_seq: i64,
    /// Records in the archive.
    pub records: u64,
    /// Signed checkpoints in the archive.
    pub checkpoints: u64,
    /// The retention cutoff asked for (RFC 3339): records before it were
    /// eligible.
    pub before: String,
    /// Where the records went.
    pub archive: ArchiveRef,
}

/// The archive an `audit_pruned` record names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveRef {
    /// The file's name (no directory: it will be moved).
    pub file: String,
    /// SHA-256 of the file (hex).
    pub sha256: String,
    /// Its size.
    pub bytes: u64,
}

impl PrunedDetail {
    /// Reads a stored detail; `None` when it is not one.
    pub fn parse(detail: &str) -> Option<PrunedDetail> {
        serde_json::from_str(detail).ok()
    }
}

/// What to prune.
#[derive(Clone, Copy)]
pub struct PruneRequest<'a> {
    /// The SQLite store file (read directly for verification and export).
    pub db: &'a Path,
    /// Records older than this (ms) may go.
    pub before_ms: i64,
    /// The archive to create; must not exist.
    pub archive: &'a Path,
    /// Checkpoint signatures are checked with these (strongly advised).
    pub keys: Option<&'a PublishedKeys>,
    /// How the checkpoint over the `audit_pruned` record is signed.
    pub signing: Signing<'a>,
}

/// How a prune signs the checkpoint that covers its `audit_pruned` record.
#[derive(Clone, Copy)]
pub struct Signing<'a> {
    /// Signs the covering checkpoint.
    pub signer: &'a KeyRing,
    /// cistern's issuer.
    pub issuer: &'a str,
    /// Time.
    pub clock: &'a dyn Clock,
}

/// What a prune did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneOutcome {
    /// The `audit_pruned` record's detail.
    pub detail: PrunedDetail,
    /// The `audit_pruned` record's seq.
    pub record_seq: i64,
    /// Records deleted from the store by this run.
    pub deleted: u64,
}

/// Why nothing (or not everything) was pruned.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// The store's log does not verify: pruning would archive a broken log
    /// and delete the evidence.
    #[error("the store's audit log does not verify ({0}); nothing pruned")]
    DoesNotVerify(Problem),
    /// The archive file exists already.
    #[error("{0} exists; give a new file for the archive")]
    ArchiveExists(String),
    /// The archive did not verify, or ended elsewhere than the cut. It is
    /// left for inspection; nothing was deleted.
    #[error(
        "the archive {path} does not hold the records through seq {through}: {why}; nothing deleted"
    )]
    BadArchive {
        /// The archive.
        path: String,
        /// The cut.
        through: i64,
        /// What was wrong.
        why: String,
    },
    /// Reading the store.
    #[error("reading the audit log: {0}")]
    Read(String),
    /// Writing the archive.
    #[error("writing the archive {path}: {source}")]
    Io {
        /// The archive.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The store refused or failed a write.
    #[error("writing the store: {0}")]
    Store(#[from] StoreError),
    /// The checkpoint over the `audit_pruned` record could not be written.
    #[error("{0}; nothing deleted (run the prune again)")]
    Checkpoint(#[from] CheckpointError),
}

impl From<VerifyError> for PruneError {
    fn from(e: VerifyError) -> Self {
        PruneError::Read(e.to_string())
    }
}

impl From<rusqlite::Error> for PruneError {
    fn from(e: rusqlite::Error) -> Self {
        PruneError::Read(e.to_string())
    }
}

/// The cut: the newest checkpoint whose record is older than `before_ms`,
/// and still matches it. `None` when there is nothing to prune.
fn cut(conn: &Connection, before_ms: i64) -> Result<Option<(i64, Vec<u8>)>, rusqlite::Error> {
    conn.query_row(
        "SELECT c.seq, c.hash FROM audit_checkpoints c JOIN audit a ON a.seq = c.seq
         WHERE a.at_ms < ?1 AND a.hash = c.hash ORDER BY c.seq DESC LIMIT 1",
        [before_ms],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
}

/// The newest `audit_pruned` record naming `through_seq`, after it.
fn pruned_record(conn: &Connection, through_seq: i64) -> Result<Option<i64>, rusqlite::Error> {
    let mut stmt = conn
        .prepare("SELECT seq, detail FROM audit WHERE kind = ?1 AND seq > ?2 ORDER BY seq DESC")?;
    let mut rows = stmt.query(rusqlite::params![
        AuditKind::AuditPruned.as_str(),
        through_seq
    ])?;
    while let Some(r) = rows.next()? {
        let detail: String = r.get(1)?;
        if PrunedDetail::parse(&detail).is_some_and(|d| d.through_seq == through_seq) {
            return Ok(Some(r.get(0)?));
        }
    }
    Ok(None)
}

/// Archives and deletes the records older than `req.before_ms` up to the
/// newest checkpoint before it. `Ok(None)` when there is nothing to prune.
pub async fn prune(
    store: &dyn Store,
    req: &PruneRequest<'_>,
) -> Result<Option<PruneOutcome>, PruneError> {
    let conn = super::open_read_only(req.db)?;
    let issuer = Some(req.signing.issuer.to_owned());
    let verdict = verify_connection(&conn, req.keys, issuer.clone())?;
    if let Some(problem) = verdict.problem {
        return Err(PruneError::DoesNotVerify(problem));
    }
    let Some((through_seq, hash)) = cut(&conn, req.before_ms)? else {
        return Ok(None);
    };
    let first_seq: i64 = conn.query_row("SELECT MIN(seq) FROM audit", [], |r| r.get(0))?;
    if through_seq < first_seq {
        return Ok(None);
    }
    let through_hash = hex::encode(&hash);
    let (bytes, sha256) = write_archive(&conn, req.archive, through_seq)?;
    let archived = verify_files(&[req.archive], req.keys, issuer)?;
    check_archive(
        &archived,
        req.archive,
        first_seq,
        through_seq,
        &through_hash,
    )?;
    let detail = PrunedDetail {
        through_seq,
        through_hash,
        first_seq,
        records: archived.report.records,
        checkpoints: archived.report.checkpoints_verified
            + archived.report.checkpoints_unverifiable,
        before: rfc3339_millis(req.before_ms),
        archive: ArchiveRef {
            file: req
                .archive
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256,
            bytes,
        },
    };
    store
        .append_audit(AuditEvent {
            at_ms: req.signing.clock.now_millis(),
            kind: AuditKind::AuditPruned,
            issuer: None,
            role: None,
            project_id: None,
            reason: None,
            detail: AuditDetail::from_serialize(&detail),
        })
        .await?;
    let Signing {
        signer,
        issuer,
        clock,
    } = req.signing;
    checkpoint_now(store, signer, clock, issuer).await?;
    let record_seq = pruned_record(&conn, through_seq)?.ok_or_else(|| {
        PruneError::Read("the audit_pruned record just written is not in the log".into())
    })?;
    let deleted = delete_through(store, through_seq, record_seq).await?;
    Ok(Some(PruneOutcome {
        detail,
        record_seq,
        deleted,
    }))
}

/// Finishes an interrupted prune: deletes what the newest `audit_pruned`
/// record vouches for and is still in the store. Returns records deleted.
pub async fn finish_pending(
    store: &dyn Store,
    db: &Path,
    signing: Signing<'_>,
) -> Result<u64, PruneError> {
    let conn = super::open_read_only(db)?;
    let newest: Option<(i64, String)> = conn
        .query_row(
            "SELECT seq, detail FROM audit WHERE kind = ?1 ORDER BY seq DESC LIMIT 1",
            [AuditKind::AuditPruned.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((seq, detail)) = newest else {
        return Ok(0);
    };
    let Some(d) = PrunedDetail::parse(&detail) else {
        return Ok(0);
    };
    let left: i64 = conn.query_row(
        "SELECT COUNT(*) FROM audit WHERE seq <= ?1",
        [d.through_seq],
        |r| r.get(0),
    )?;
    if left == 0 {
        return Ok(0);
    }
    // The run that stopped may not have got as far as the checkpoint.
    checkpoint_now(store, signing.signer, signing.clock, signing.issuer).await?;
    delete_through(store, d.through_seq, seq).await
}

async fn delete_through(
    store: &dyn Store,
    through_seq: i64,
    vouched_by: i64,
) -> Result<u64, PruneError> {
    let mut deleted = 0;
    loop {
        let n = store
            .prune_audit(through_seq, vouched_by, DELETE_CHUNK)
            .await?;
        deleted += n;
        if n == 0 {
            return Ok(deleted);
        }
    }
}

fn check_archive(
    v: &Verdict,
    path: &Path,
    first_seq: i64,
    through_seq: i64,
    through_hash: &str,
) -> Result<(), PruneError> {
    let why = if let Some(p) = &v.problem {
        Some(p.to_string())
    } else if v.report.first_seq != Some(first_seq) || v.report.last_seq != Some(through_seq) {
        Some(format!(
            "it holds seq {:?}..={:?}, not {first_seq}..={through_seq}",
            v.report.first_seq, v.report.last_seq
        ))
    } else if v.report.head.as_deref() != Some(through_hash) {
        Some("its last hash is not the cut's".into())
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(PruneError::BadArchive {
            path: path.display().to_string(),
            through: through_seq,
            why,
        }),
    }
}

/// Exports the records through `through_seq` to a new owner-only file,
/// synced to disk with its directory entry; returns its size and SHA-256.
fn write_archive(
    conn: &Connection,
    path: &Path,
    through_seq: i64,
) -> Result<(u64, String), PruneError> {
    let io = |source: std::io::Error| PruneError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PruneError::ArchiveExists(path.display().to_string())
        } else {
            io(e)
        }
    })?;
    let filter = Filter {
        through_seq: Some(through_seq),
        ..Filter::default()
    };
    let mut out = BufWriter::new(file);
    export::export_connection(conn, &filter, &mut out).map_err(|e| match e {
        export::ExportError::Io(e) => io(e),
        other => PruneError::Read(other.to_string()),
    })?;
    out.flush().map_err(io)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The file's directory entry must survive a crash too.
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    drop(file);
    let mut hasher = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut reader = std::fs::File::open(path).map_err(io)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((bytes, hex::encode(hasher.finish())))
}
