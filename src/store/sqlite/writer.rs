//! The single writer: one thread, one connection, group commit.
//!
//! Requests arrive on a bounded channel. The thread takes whatever is
//! pending (up to [`MAX_BATCH`]), runs every request in one
//! `BEGIN IMMEDIATE` transaction, commits once, and only then answers every
//! request. A replayed ID token is refused alone (its request writes
//! nothing); any other failure, or a failed commit, refuses the whole batch
//! and every request in it is told so.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{Connection, params};
use tokio::sync::{mpsc, oneshot};

use super::db_err;
use crate::store::{AuditEvent, ExchangeRecord, Identity, StoreError};

/// Most requests committed in one transaction. Past ~256 rows the commit
/// cost is already amortised (crates.md §C) and a larger batch only delays
/// the first reply in it.
pub(super) const MAX_BATCH: usize = 256;

/// One write and where to send its outcome.
pub(super) struct WriteRequest {
    pub(super) op: WriteOp,
    pub(super) reply: oneshot::Sender<Result<u64, StoreError>>,
}

/// What to write. The `u64` reply is the number of rows a prune removed,
/// and 0 for the others.
pub(super) enum WriteOp {
    Exchange(Box<ExchangeRecord>),
    Audit(AuditEvent),
    PruneReplay {
        now_ms: i64,
    },
    /// Revocation rules and offboarding blocks (`lifecycle.rs`).
    Lifecycle(Box<super::lifecycle::LifecycleOp>),
}

/// A message to the writer thread.
pub(super) enum Message {
    Write(WriteRequest),
    /// Stop accepting writes, finish what is queued, close the connection,
    /// then answer.
    Close(oneshot::Sender<()>),
}

/// How many times the writer yields the CPU, per batch, waiting for more
/// requests before it commits. On a busy single core this turns one commit
/// per request into one commit per wave of requests.
const GROUP_COMMIT_YIELDS: u32 = 4;

/// Batches committed between two checkpoints run by the writer itself.
/// At ~14 requests per batch and under one WAL frame per request this
/// keeps the WAL near 1 MB under sustained load.
const CHECKPOINT_EVERY_BATCHES: u32 = 64;

/// Counters kept by the writer (read with relaxed ordering: they are
/// statistics, not synchronisation).
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) requests: AtomicU64,
    pub(super) commits: AtomicU64,
    pub(super) failed_batches: AtomicU64,
}

/// The writer loop. Returns when the channel is closed and drained.
pub(super) fn run(mut conn: Connection, mut rx: mpsc::Receiver<Message>, counters: Arc<Counters>) {
    let mut batch: Vec<WriteRequest> = Vec::with_capacity(MAX_BATCH);
    let mut closers: Vec<oneshot::Sender<()>> = Vec::new();
    let mut since_checkpoint = 0u32;
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        let mut yields = 0;
        while let Some(message) = next.take() {
            match message {
                Message::Write(request) => batch.push(request),
                Message::Close(reply) => {
                    // Refuse new sends; whatever is already queued is still
                    // received below, so no accepted write is dropped.
                    rx.close();
                    closers.push(reply);
                }
            }
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
                // Group-commit window: the queue looks empty, so give the
                // request threads a chance to join this batch before paying
                // for a commit. A yield, not a sleep: when nothing else is
                // runnable it returns at once and costs no latency.
                while next.is_none() && yields < GROUP_COMMIT_YIELDS && !rx.is_closed() {
                    std::thread::yield_now();
                    yields += 1;
                    next = rx.try_recv().ok();
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let outcomes = commit_batch(&mut conn, &batch);
        counters
            .requests
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        match outcomes {
            Ok(_) => counters.commits.fetch_add(1, Ordering::Relaxed),
            Err(_) => counters.failed_batches.fetch_add(1, Ordering::Relaxed),
        };
        answer(batch.drain(..), outcomes);
        // Under sustained load the checkpointer's PASSIVE checkpoints never
        // catch up with a writer that keeps appending, so the WAL grew
        // without bound (measured: 130 MB in 15 s, every append extending
        // the file). Here, between batches and after the replies are sent,
        // nothing else writes, so a checkpoint copies every frame and the
        // next transaction starts the WAL again from its beginning.
        since_checkpoint += 1;
        if since_checkpoint >= CHECKPOINT_EVERY_BATCHES {
            super::checkpoint::checkpoint(&conn);
            since_checkpoint = 0;
        }
    }
    // Closing the last connection checkpoints the WAL into the main file.
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the SQLite writer connection failed");
    }
    for closer in closers {
        let _ = closer.send(());
    }
}

/// Sends each request its outcome; a whole-batch failure goes to everyone.
pub(super) fn answer(
    requests: impl Iterator<Item = WriteRequest>,
    outcomes: Result<Vec<Result<u64, StoreError>>, StoreError>,
) {
    match outcomes {
        Ok(outcomes) => {
            for (request, outcome) in requests.zip(outcomes) {
                // The caller may have given up waiting; the write stands.
                let _ = request.reply.send(outcome);
            }
        }
        Err(e) => {
            let message = e.to_string();
            for request in requests {
                let _ = request
                    .reply
                    .send(Err(StoreError::Database(message.clone())));
            }
        }
    }
}

/// Runs `batch` in one transaction. `Ok` holds
/// one outcome per request, in order, and means the transaction committed;
/// `Err` means nothing in the batch was written.
pub(super) fn commit_batch(
    conn: &mut Connection,
    batch: &[WriteRequest],
) -> Result<Vec<Result<u64, StoreError>>, StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(|e| db_err("begin batch", e))?;
    match run_requests(conn, batch) {
        Ok(outcomes) => match conn.execute_batch("COMMIT") {
            Ok(()) => Ok(outcomes),
            Err(e) => {
                rollback(conn);
                Err(db_err("commit batch", e))
            }
        },
        Err(e) => {
            rollback(conn);
            Err(e)
        }
    }
}

fn rollback(conn: &Connection) {
    // SQLite may already have rolled back on its own (e.g. SQLITE_FULL).
    if !conn.is_autocommit()
        && let Err(e) = conn.execute_batch("ROLLBACK")
    {
        tracing::error!(error = %e, "rolling back a failed SQLite batch failed");
    }
}

/// `Err` only when the transaction as a whole must not commit.
///
/// No savepoint per request (two more statements each; the writer's CPU per
/// exchange fell from ~27 to ~22 µs without them): the one expected
/// failure, a replayed ID token, is the first statement of its request and
/// writes nothing when it fails. Any other failure means the database
/// itself is failing (keys and values are cistern's own, so no request can
/// provoke a constraint error), and the whole batch is refused.
fn run_requests(
    conn: &Connection,
    batch: &[WriteRequest],
) -> Result<Vec<Result<u64, StoreError>>, StoreError> {
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut sightings = IdentitySightings::default();
    for request in batch {
        match apply(conn, &request.op) {
            Err(StoreError::Replay) => outcomes.push(Err(StoreError::Replay)),
            Err(e) => return Err(e),
            Ok(n) => {
                if let WriteOp::Exchange(record) = &request.op {
                    sightings.add(&record.identity, record.token.issued_at_ms);
                }
                outcomes.push(Ok(n));
            }
        }
    }
    // One upsert per identity per batch, not one per exchange: in a burst
    // most exchanges come from the same few pipeline identities.
    for s in &sightings.0 {
        upsert_identity(conn, s).map_err(|e| db_err("upsert identity", e))?;
    }
    Ok(outcomes)
}

/// Identities seen in one batch, with how often and when.
#[derive(Default)]
struct IdentitySightings<'a>(Vec<Sighting<'a>>);

struct Sighting<'a> {
    identity: &'a Identity,
    first_ms: i64,
    last_ms: i64,
    count: i64,
}

impl<'a> IdentitySightings<'a> {
    fn add(&mut self, identity: &'a Identity, at_ms: i64) {
        match self
            .0
            .iter_mut()
            .find(|s| same_identity(s.identity, identity))
        {
            Some(s) => {
                // The latest sighting's paths and owner win, as they would row by row.
                if at_ms >= s.last_ms {
                    s.identity = identity;
                }
                s.first_ms = s.first_ms.min(at_ms);
                s.last_ms = s.last_ms.max(at_ms);
                s.count += 1;
            }
            None => self.0.push(Sighting {
                identity,
                first_ms: at_ms,
                last_ms: at_ms,
                count: 1,
            }),
        }
    }
}

/// Same inventory key: issuer + immutable ids + role.
fn same_identity(a: &Identity, b: &Identity) -> bool {
    a.issuer == b.issuer
        && a.project_id == b.project_id
        && a.namespace_id == b.namespace_id
        && a.role == b.role
}

fn upsert_identity(conn: &Connection, s: &Sighting<'_>) -> rusqlite::Result<usize> {
    let id = s.identity;
    conn.prepare_cached(
        "INSERT INTO identities (issuer, project_id, namespace_id, role, project_path,
             namespace_path, owner, first_seen_ms, last_used_ms, exchanges)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT (issuer, project_id, namespace_id, role) DO UPDATE SET
             project_path = CASE WHEN excluded.last_used_ms >= identities.last_used_ms
                 THEN excluded.project_path ELSE identities.project_path END,
             namespace_path = CASE WHEN excluded.last_used_ms >= identities.last_used_ms
                 THEN excluded.namespace_path ELSE identities.namespace_path END,
             owner = CASE WHEN excluded.last_used_ms >= identities.last_used_ms
                 THEN excluded.owner ELSE identities.owner END,
             first_seen_ms = MIN(identities.first_seen_ms, excluded.first_seen_ms),
             last_used_ms = MAX(identities.last_used_ms, excluded.last_used_ms),
             exchanges = identities.exchanges + excluded.exchanges",
    )?
    .execute(params![
        id.issuer,
        id.project_id,
        id.namespace_id,
        id.role,
        id.project_path,
        id.namespace_path,
        id.owner,
        s.first_ms,
        s.last_ms,
        s.count,
    ])
}

fn apply(conn: &Connection, op: &WriteOp) -> Result<u64, StoreError> {
    match op {
        WriteOp::Exchange(record) => insert_exchange(conn, record).map(|()| 0),
        WriteOp::Audit(event) => insert_audit(conn, event).map(|()| 0),
        WriteOp::PruneReplay { now_ms } => conn
            .prepare_cached("DELETE FROM replay WHERE expires_at_ms < ?1")
            .and_then(|mut s| s.execute([now_ms]))
            .map(|n| n as u64)
            .map_err(|e| db_err("prune replay", e)),
        WriteOp::Lifecycle(op) => super::lifecycle::apply(conn, op, insert_audit),
    }
}

fn insert_exchange(conn: &Connection, record: &ExchangeRecord) -> Result<(), StoreError> {
    if let Some(replay) = &record.replay {
        // DO NOTHING + row count rather than matching constraint error
        // codes: a conflict is the expected outcome of a replay, not a fault.
        let inserted = conn
            .prepare_cached(
                "INSERT INTO replay (expires_at_ms, issuer, jti) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![replay.expires_at_ms, replay.issuer, replay.jti]))
            .map_err(|e| db_err("insert replay", e))?;
        if inserted == 0 {
            return Err(StoreError::Replay);
        }
    }
    let id = &record.identity;
    let t = &record.token;
    conn.prepare_cached(
        "INSERT INTO issued_tokens (jti, kind, issuer, project_id, namespace_id, role,
             project_path, namespace_path, owner, audience, scope, issued_at_ms,
             expires_at_ms, subject_jti, pipeline_id, job_id, git_ref)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )
    .and_then(|mut s| {
        s.execute(params![
            t.jti,
            t.kind,
            id.issuer,
            id.project_id,
            id.namespace_id,
            id.role,
            id.project_path,
            id.namespace_path,
            id.owner,
            t.audience,
            t.scope,
            t.issued_at_ms,
            t.expires_at_ms,
            t.subject_jti,
            t.pipeline_id,
            t.job_id,
            t.git_ref,
        ])
    })
    .map_err(|e| db_err("insert issued token", e))?;
    insert_audit(conn, &record.audit)
}

fn insert_audit(conn: &Connection, event: &AuditEvent) -> Result<(), StoreError> {
    // Serialized where the event was built; stored verbatim.
    let detail = event.detail.as_str();
    conn.prepare_cached(
        "INSERT INTO audit (at_ms, kind, issuer, role, project_id, reason, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut s| {
        s.execute(params![
            event.at_ms,
            event.kind.as_str(),
            event.issuer,
            event.role,
            event.project_id,
            event.reason,
            detail,
        ])
    })
    .map(drop)
    .map_err(|e| db_err("append audit", e))
}
