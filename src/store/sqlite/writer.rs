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
use std::time::Instant;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::db_err;
use super::replay::ReplaySet;
use crate::audit::chain::{ChainFields, GENESIS, OwnedFields, hash_from_slice, record_hash};
use crate::audit::record::{CheckpointLine, CheckpointWrapper, RecordLine};
use crate::audit::sink::Sink;
use crate::store::{AuditEvent, AuditKind, ExchangeRecord, Identity, StoreError};

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
    /// Several records, appended in order.
    AuditBatch(Vec<AuditEvent>),
    PruneReplay {
        now_ms: i64,
    },
    /// Delete up to `limit` of the oldest audit records through
    /// `through_seq`, vouched for by the `audit_pruned` record `vouched_by`.
    PruneAudit {
        through_seq: i64,
        vouched_by: i64,
        limit: u32,
    },
    /// Revocation rules and offboarding blocks (`lifecycle.rs`).
    Lifecycle(Box<super::lifecycle::LifecycleOp>),
    /// A signed checkpoint of the chain head.
    Checkpoint(Box<CheckpointLine>),
    /// Audit `credential_expired` for up to `limit` credentials that expired
    /// at or before `now_ms` and have no such record yet.
    SweepExpired {
        now_ms: i64,
        limit: u32,
    },
    /// Replace a provider's sealed credential and audit it.
    SealedCredential(Box<SealedCredentialOp>),
    /// A target a provider is about to mint on.
    DownstreamTarget {
        provider: String,
        target: String,
        at_ms: i64,
    },
    /// A downstream credential was revoked at its provider: mark it and
    /// audit it (once). Replies 1 when this call marked it.
    DownstreamRevoked {
        jti: String,
        at_ms: i64,
        cause: String,
        audit: Box<AuditEvent>,
    },
}

/// [`WriteOp::SealedCredential`]'s fields (boxed: the op stays small).
pub(super) struct SealedCredentialOp {
    pub(super) provider: String,
    pub(super) sealed: crate::provider::sealed::Sealed,
    pub(super) expires_on: Option<String>,
    pub(super) audit: AuditEvent,
}

/// Where audit records go besides the store, and what a sink failure means.
pub(crate) struct AuditOutput {
    /// Written after each commit, before anyone is answered.
    pub(crate) sinks: Vec<Box<dyn Sink>>,
    /// A sink failure fails the batch's requests (their records are in the
    /// store; their responses are refused).
    pub(crate) fail_closed: bool,
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
    pub(super) sink_failures: AtomicU64,
    pub(super) batch_nanos: AtomicU64,
}

/// The writer loop. Returns when the channel is closed and drained.
pub(super) fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Message>,
    counters: Arc<Counters>,
    mut audit: AuditOutput,
) {
    let mut batch: Vec<WriteRequest> = Vec::with_capacity(MAX_BATCH);
    let mut closers: Vec<oneshot::Sender<()>> = Vec::new();
    // Sinks get the records written from here on.
    let mut lines = if audit.sinks.is_empty() {
        None
    } else {
        match chain_head_seq(&conn) {
            Ok(seq) => {
                catch_up_sinks(&conn, &mut audit.sinks, seq, &counters);
                Some(SinkLines::after(seq))
            }
            Err(e) => {
                // Never "from 0": that would copy the whole log to the
                // sinks. Catching up starts from the first committed batch.
                tracing::error!(error = %e, "reading the audit chain head for the sinks failed");
                Some(SinkLines::after(i64::MAX))
            }
        }
    };
    let mut since_checkpoint = 0u32;
    let mut replay = ReplaySet::default();
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
        if let Some(l) = lines.as_mut() {
            l.buf.clear();
        }
        let started = Instant::now();
        let mut outcomes = commit_batch(&mut conn, &batch, &mut replay, lines.as_mut());
        if let (Ok(_), Some(l)) = (&outcomes, lines.as_mut()) {
            l.through = l.end;
        }
        if let (Ok(_), Some(l)) = (&outcomes, &lines)
            && !l.buf.is_empty()
            && let Err(e) = write_sinks(&mut audit.sinks, &l.buf)
        {
            counters.sink_failures.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, fail_closed = audit.fail_closed, "audit sink write failed");
            if audit.fail_closed {
                outcomes = Err(StoreError::Unavailable(format!(
                    "audit record could not be written durably: {e}"
                )));
            }
        }
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        counters.batch_nanos.fetch_add(nanos, Ordering::Relaxed);
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
            let _ = super::checkpoint::checkpoint(&conn);
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

/// Records at most this many at a time in a sink's catch-up, so a long
/// gap is never held in memory whole.
const CATCH_UP_CHUNK: i64 = 10_000;

/// Sends each sink that can say how far it got (a file) the records
/// appended since, up to `head`: what other processes wrote while no
/// server ran (`cistern revoke --direct`, …) and what a crash kept from
/// it. A sink that cannot tell (standard output), or holds nothing yet,
/// gets records from here on. Failures are logged and counted; the sink
/// then misses that range (`cistern audit export` has it).
fn catch_up_sinks(conn: &Connection, sinks: &mut [Box<dyn Sink>], head: i64, counters: &Counters) {
    let mut buf = Vec::new();
    for sink in sinks.iter_mut() {
        let from = match sink.last_seq() {
            Ok(Some(seq)) => seq,
            Ok(None) => continue,
            Err(e) => {
                counters.sink_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(sink = sink.name(), error = %e, "cannot tell which records the audit sink holds; it gets new records only");
                continue;
            }
        };
        if from > head {
            tracing::warn!(
                sink = sink.name(),
                sink_seq = from,
                head,
                "the audit sink holds records past the store's newest (a restored database, or another store's sink?)"
            );
            continue;
        }
        // Records pruned (`cistern audit prune`) before the sink caught up
        // are in the prune's archive, not here: say so, then go on.
        let oldest: Option<i64> = conn
            .query_row("SELECT MIN(seq) FROM audit", [], |r| r.get(0))
            .unwrap_or(None);
        if let Some(oldest) = oldest.filter(|&o| o > from + 1) {
            tracing::warn!(
                sink = sink.name(),
                missing_from = from + 1,
                missing_through = oldest - 1,
                "the audit sink misses records pruned from the store before it caught up; they are in the prune's archive"
            );
        }
        let mut after = from;
        while after < head {
            let through = head.min(after.saturating_add(CATCH_UP_CHUNK));
            buf.clear();
            let sent = crate::audit::export::lines_between(conn, after, through, &mut buf)
                .map_err(|e| e.to_string())
                .and_then(|_| sink.write_lines(&buf).map_err(|e| e.to_string()));
            if let Err(e) = sent {
                counters.sink_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(sink = sink.name(), error = %e, after, through = head, "catching the audit sink up failed; the range is missing from it");
                break;
            }
            after = through;
        }
        if after > from {
            tracing::info!(
                sink = sink.name(),
                from = from + 1,
                through = after,
                "audit sink caught up with records written while it was not fed"
            );
        }
    }
}

/// Hands a committed batch's lines to every sink; the first failure is
/// returned after every sink had its chance.
fn write_sinks(sinks: &mut [Box<dyn Sink>], lines: &[u8]) -> Result<(), String> {
    let mut first = None;
    for sink in sinks.iter_mut() {
        if let Err(e) = sink.write_lines(lines) {
            first.get_or_insert_with(|| format!("{}: {e}", sink.name()));
        }
    }
    first.map_or(Ok(()), Err)
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
            for request in requests {
                let e = match &e {
                    StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
                    other => StoreError::Database(other.to_string()),
                };
                let _ = request.reply.send(Err(e));
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
    replay: &mut ReplaySet,
    lines: Option<&mut SinkLines>,
) -> Result<Vec<Result<u64, StoreError>>, StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE")
        .map_err(|e| db_err("begin batch", e))?;
    replay.begin();
    // The head is read inside the write transaction, so another process
    // writing the same file (`cistern revoke --direct`) can never fork the
    // chain: SQLite admits one writer at a time and this one sees its work.
    let result = Chain::head(conn, lines).and_then(|mut chain| {
        let outcomes = run_requests(conn, batch, replay, &mut chain)?;
        if let Some(l) = chain.lines.as_deref_mut() {
            l.end = chain.seq;
        }
        Ok((outcomes, chain))
    });
    match result.map(|(outcomes, _)| outcomes) {
        Ok(outcomes) => match conn.execute_batch("COMMIT") {
            Ok(()) => {
                replay.commit();
                Ok(outcomes)
            }
            Err(e) => {
                rollback(conn, replay);
                Err(db_err("commit batch", e))
            }
        },
        Err(e) => {
            rollback(conn, replay);
            Err(e)
        }
    }
}

fn rollback(conn: &Connection, replay: &mut ReplaySet) {
    replay.rollback();
    // SQLite may already have rolled back on its own (e.g. SQLITE_FULL).
    if !conn.is_autocommit()
        && let Err(e) = conn.execute_batch("ROLLBACK")
    {
        tracing::error!(error = %e, "rolling back a failed SQLite batch failed");
    }
}

/// Deletes up to `limit` of the oldest records through `through_seq` and
/// the checkpoints up to it, once record `vouched_by` (kept: it comes after
/// `through_seq`) is the `audit_pruned` record naming that very cut. A
/// verifier accepts a log that starts after seq 1 only on that record's
/// word, so no other deletion can pass for a prune.
fn prune_audit(
    conn: &Connection,
    through_seq: i64,
    vouched_by: i64,
    limit: u32,
) -> Result<u64, StoreError> {
    let vouch: Option<(String, String)> = conn
        .prepare_cached("SELECT kind, detail FROM audit WHERE seq = ?1")
        .and_then(|mut s| {
            s.query_row([vouched_by], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(|e| db_err("read the audit_pruned record", e))?;
    let names_cut = vouch.is_some_and(|(kind, detail)| {
        kind == AuditKind::AuditPruned.as_str()
            && crate::audit::prune::PrunedDetail::parse(&detail)
                .is_some_and(|d| d.through_seq == through_seq)
    });
    if vouched_by <= through_seq || !names_cut {
        return Err(StoreError::Refused(format!(
            "record {vouched_by} is not an audit_pruned record naming seq {through_seq}"
        )));
    }
    // Only a checkpoint at or after it puts the record beyond the reach of
    // someone who can merely write the database.
    let covered: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM audit_checkpoints WHERE seq >= ?1)")
        .and_then(|mut s| s.query_row([vouched_by], |r| r.get(0)))
        .map_err(|e| db_err("read checkpoints", e))?;
    if !covered {
        return Err(StoreError::Refused(format!(
            "no signed checkpoint covers the audit_pruned record {vouched_by} yet"
        )));
    }
    let deleted = conn
        .prepare_cached(
            "DELETE FROM audit WHERE seq IN
                 (SELECT seq FROM audit WHERE seq <= ?1 ORDER BY seq LIMIT ?2)",
        )
        .and_then(|mut s| s.execute(params![through_seq, limit]))
        .map_err(|e| db_err("delete pruned audit records", e))?;
    conn.prepare_cached("DELETE FROM audit_checkpoints WHERE seq <= ?1")
        .and_then(|mut s| s.execute([through_seq]))
        .map_err(|e| db_err("delete pruned checkpoints", e))?;
    Ok(deleted as u64)
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
    replay: &mut ReplaySet,
    chain: &mut Chain<'_>,
) -> Result<Vec<Result<u64, StoreError>>, StoreError> {
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut sightings = IdentitySightings::default();
    for request in batch {
        match apply(conn, &request.op, replay, chain) {
            Err(StoreError::Replay) => outcomes.push(Err(StoreError::Replay)),
            // Checked before the op writes anything.
            Err(StoreError::Refused(why)) => outcomes.push(Err(StoreError::Refused(why))),
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

fn apply(
    conn: &Connection,
    op: &WriteOp,
    replay: &mut ReplaySet,
    chain: &mut Chain<'_>,
) -> Result<u64, StoreError> {
    match op {
        WriteOp::Exchange(record) => insert_exchange(conn, record, replay, chain).map(|()| 0),
        WriteOp::Audit(event) => chain.append(conn, event).map(|()| 0),
        WriteOp::AuditBatch(events) => {
            for event in events {
                chain.append(conn, event)?;
            }
            Ok(0)
        }
        WriteOp::Checkpoint(line) => chain.checkpoint(conn, line),
        WriteOp::SweepExpired { now_ms, limit } => sweep_expired(conn, chain, *now_ms, *limit),
        WriteOp::SealedCredential(op) => {
            let SealedCredentialOp {
                provider,
                sealed,
                expires_on,
                audit,
            } = &**op;
            conn.prepare_cached(
                "INSERT INTO provider_credentials (provider, nonce, ciphertext, expires_on, saved_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (provider) DO UPDATE SET nonce = excluded.nonce,
                     ciphertext = excluded.ciphertext, expires_on = excluded.expires_on,
                     saved_at_ms = excluded.saved_at_ms",
            )
            .and_then(|mut s| {
                s.execute(params![
                    provider,
                    sealed.nonce,
                    sealed.ciphertext,
                    expires_on,
                    audit.at_ms
                ])
            })
            .map_err(|e| db_err("save sealed credential", e))?;
            chain.append(conn, audit)?;
            Ok(1)
        }
        WriteOp::DownstreamTarget {
            provider,
            target,
            at_ms,
        } => conn
            .prepare_cached(
                "INSERT INTO downstream_targets (provider, target, first_at_ms)
                 VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![provider, target, at_ms]))
            .map(|n| n as u64)
            .map_err(|e| db_err("note downstream target", e)),
        WriteOp::DownstreamRevoked {
            jti,
            at_ms,
            cause,
            audit,
        } => {
            let n = conn
                .prepare_cached(
                    "UPDATE downstream_credentials SET revoked_at_ms = ?2, revoke_cause = ?3
                     WHERE jti = ?1 AND revoked_at_ms IS NULL",
                )
                .and_then(|mut s| s.execute(params![jti, at_ms, cause]))
                .map_err(|e| db_err("mark downstream revoked", e))?;
            if n > 0 {
                chain.append(conn, audit)?;
            }
            Ok(n as u64)
        }
        WriteOp::PruneReplay { now_ms } => replay.prune(conn, *now_ms),
        WriteOp::PruneAudit {
            through_seq,
            vouched_by,
            limit,
        } => prune_audit(conn, *through_seq, *vouched_by, *limit),
        WriteOp::Lifecycle(op) => super::lifecycle::apply(conn, op, chain),
    }
}

fn insert_exchange(
    conn: &Connection,
    record: &ExchangeRecord,
    replay: &mut ReplaySet,
    chain: &mut Chain<'_>,
) -> Result<(), StoreError> {
    if let Some(entry) = &record.replay
        && !replay.claim(conn, entry)?
    {
        return Err(StoreError::Replay);
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
    if let Some(d) = &record.downstream {
        conn.prepare_cached(
            "INSERT INTO downstream_credentials (jti, provider, target, external_id,
                 provider_expires_at_ms, expires_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .and_then(|mut s| {
            s.execute(params![
                t.jti,
                d.provider,
                d.target,
                d.external_id,
                d.provider_expires_at_ms,
                t.expires_at_ms
            ])
        })
        .map_err(|e| db_err("insert downstream credential", e))?;
    }
    chain.append(conn, &record.audit)
}

/// The lines a batch hands to the audit sinks, and how far the sinks have
/// the chain.
pub(super) struct SinkLines {
    /// This batch's lines.
    buf: Vec<u8>,
    /// The sinks have every record up to this `seq` (from this process).
    through: i64,
    /// The chain's last `seq` once this batch is in.
    end: i64,
}

impl SinkLines {
    fn after(seq: i64) -> SinkLines {
        SinkLines {
            buf: Vec::new(),
            through: seq,
            end: seq,
        }
    }
}

/// The newest record's `seq` (0 for an empty log).
fn chain_head_seq(conn: &Connection) -> Result<i64, StoreError> {
    conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", [], |r| r.get(0))
        .map_err(|e| db_err("read audit chain head", e))
}

/// The chain head during one batch transaction, and the sink lines the
/// batch has produced so far.
pub(crate) struct Chain<'a> {
    seq: i64,
    hash: [u8; 32],
    lines: Option<&'a mut SinkLines>,
}

impl<'a> Chain<'a> {
    /// Reads the head (the newest record) inside the open transaction.
    /// Records another process appended since the last batch (`cistern
    /// revoke --direct`, …) go to the sinks first, so they see the chain
    /// whole and in order.
    fn head(conn: &Connection, mut lines: Option<&'a mut SinkLines>) -> Result<Self, StoreError> {
        let head = conn
            .prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
            .and_then(|mut s| {
                s.query_row([], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, Option<Vec<u8>>>(1)?))
                })
            });
        let (seq, hash) = match head {
            Ok((seq, Some(hash))) => (
                seq,
                hash_from_slice(&hash).ok_or_else(|| {
                    StoreError::Database(format!("audit record {seq} has a malformed hash"))
                })?,
            ),
            Ok((seq, None)) => {
                return Err(StoreError::Database(format!(
                    "audit record {seq} is not sealed into the chain"
                )));
            }
            Err(rusqlite::Error::QueryReturnedNoRows) => (0, GENESIS),
            Err(e) => return Err(db_err("read audit chain head", e)),
        };
        if let Some(l) = lines.as_deref_mut()
            && l.through < seq
        {
            crate::audit::export::lines_between(conn, l.through, seq, &mut l.buf)
                .map_err(|e| StoreError::Database(e.to_string()))?;
        }
        Ok(Chain { seq, hash, lines })
    }

    /// Appends `event` as the next link.
    pub(crate) fn append(
        &mut self,
        conn: &Connection,
        event: &AuditEvent,
    ) -> Result<(), StoreError> {
        let fields = ChainFields {
            seq: self.seq + 1,
            at_ms: event.at_ms,
            kind: event.kind.as_str(),
            issuer: event.issuer.as_deref(),
            role: event.role.as_deref(),
            project_id: event.project_id.as_deref(),
            reason: event.reason.as_deref(),
            // Serialized where the event was built; stored and hashed verbatim.
            detail: event.detail.as_str(),
        };
        let hash = record_hash(&self.hash, &fields);
        conn.prepare_cached(
            "INSERT INTO audit (seq, at_ms, kind, issuer, role, project_id, reason, detail,
                 prev_hash, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .and_then(|mut s| {
            s.execute(params![
                fields.seq,
                fields.at_ms,
                fields.kind,
                fields.issuer,
                fields.role,
                fields.project_id,
                fields.reason,
                fields.detail,
                &self.hash[..],
                &hash[..],
            ])
        })
        .map_err(|e| db_err("append audit", e))?;
        if let Some(lines) = self.lines.as_deref_mut() {
            RecordLine::new(&fields, event.detail.raw(), &self.hash, &hash)
                .write_to(&mut lines.buf);
        }
        self.seq = fields.seq;
        self.hash = hash;
        Ok(())
    }

    /// Stores a signed checkpoint after checking it names a record that
    /// exists with that hash (a replica may sign one already stored: kept
    /// once). Replies 1 when stored.
    fn checkpoint(&mut self, conn: &Connection, line: &CheckpointLine) -> Result<u64, StoreError> {
        let stored: Option<Vec<u8>> = conn
            .prepare_cached("SELECT hash FROM audit WHERE seq = ?1")
            .and_then(|mut s| s.query_row([line.seq], |r| r.get(0)))
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })
            .map_err(|e| db_err("read audit record for checkpoint", e))?;
        if stored.map(hex::encode).as_deref() != Some(line.hash.as_str()) {
            return Err(StoreError::Database(format!(
                "checkpoint for seq {} does not match the stored chain",
                line.seq
            )));
        }
        let hash = hex::decode(&line.hash)
            .map_err(|_| StoreError::Database("checkpoint hash is not hex".into()))?;
        let n = conn
            .prepare_cached(
                "INSERT INTO audit_checkpoints (seq, at_ms, hash, kid, jws)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            )
            .and_then(|mut s| s.execute(params![line.seq, line.at_ms, hash, line.kid, line.jws]))
            .map_err(|e| db_err("insert audit checkpoint", e))?;
        if n > 0
            && let Some(lines) = self.lines.as_deref_mut()
            && serde_json::to_writer(
                &mut lines.buf,
                &CheckpointWrapper {
                    checkpoint: line.clone(),
                },
            )
            .is_ok()
        {
            lines.buf.push(b'\n');
        }
        Ok(n as u64)
    }
}

/// One `credential_expired` record per credential past its expiry, in
/// `(expires_at_ms, jti)` order after the stored watermark; moves the
/// watermark. Replies with how many were recorded (`limit` means: run again).
fn sweep_expired(
    conn: &Connection,
    chain: &mut Chain<'_>,
    now_ms: i64,
    limit: u32,
) -> Result<u64, StoreError> {
    use rusqlite::OptionalExtension as _;
    let err = |e| db_err("sweep expired credentials", e);
    let (mark_ms, mark_jti): (i64, String) = conn
        .prepare_cached("SELECT expires_at_ms, jti FROM expiry_sweep WHERE id = 1")
        .and_then(|mut s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(err)?
        .unwrap_or((i64::MIN, String::new()));
    let mut stmt = conn
        .prepare_cached(
            "SELECT jti, kind, issuer, project_id, namespace_id, role, owner, audience,
                 expires_at_ms
             FROM issued_tokens
             WHERE (expires_at_ms, jti) > (?1, ?2) AND expires_at_ms <= ?3
             ORDER BY expires_at_ms, jti LIMIT ?4",
        )
        .map_err(err)?;
    let rows = stmt
        .query_map(params![mark_ms, mark_jti, now_ms, limit], |r| {
            Ok(ExpiredRow {
                jti: r.get(0)?,
                kind: r.get(1)?,
                issuer: r.get(2)?,
                project_id: r.get(3)?,
                namespace_id: r.get(4)?,
                role: r.get(5)?,
                owner: r.get(6)?,
                audience: r.get(7)?,
                expires_at_ms: r.get(8)?,
            })
        })
        .map_err(err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    let Some(last) = rows.last() else {
        return Ok(0);
    };
    conn.prepare_cached(
        "INSERT INTO expiry_sweep (id, expires_at_ms, jti) VALUES (1, ?1, ?2)
         ON CONFLICT (id) DO UPDATE SET expires_at_ms = excluded.expires_at_ms, jti = excluded.jti",
    )
    .and_then(|mut s| s.execute(params![last.expires_at_ms, last.jti]))
    .map_err(err)?;
    for row in &rows {
        chain.append(
            conn,
            &AuditEvent {
                at_ms: row.expires_at_ms,
                kind: crate::store::AuditKind::CredentialExpired,
                issuer: Some(row.issuer.clone()),
                role: Some(row.role.clone()),
                project_id: Some(row.project_id.clone()),
                reason: None,
                detail: crate::store::AuditDetail::from_serialize(&serde_json::json!({
                    "jti": row.jti,
                    "kind": row.kind,
                    "namespace_id": row.namespace_id,
                    "owner": row.owner,
                    "audience": row.audience,
                    "recorded_at_ms": now_ms,
                })),
            },
        )?;
    }
    Ok(rows.len() as u64)
}

struct ExpiredRow {
    jti: String,
    kind: String,
    issuer: String,
    project_id: String,
    namespace_id: String,
    role: String,
    owner: String,
    audience: String,
    expires_at_ms: i64,
}

/// Seals records written before the chain existed (schema < 4 had no
/// hashes): chains every unsealed record, in order, after the last sealed
/// one. Runs once at open, before the writer starts.
pub(super) fn seal_unchained(conn: &mut Connection) -> Result<u64, StoreError> {
    let tx = conn
        .transaction()
        .map_err(|e| db_err("begin sealing audit records", e))?;
    let unsealed: Vec<OwnedFields> = {
        let mut stmt = tx
            .prepare(&format!("{SELECT_FIELDS} WHERE hash IS NULL ORDER BY seq"))
            .map_err(|e| db_err("read unsealed audit records", e))?;
        let rows = stmt
            .query_map([], owned_fields)
            .map_err(|e| db_err("read unsealed audit records", e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| db_err("read unsealed audit records", e))?
    };
    let Some(first) = unsealed.first() else {
        return Ok(0);
    };
    let mut prev: [u8; 32] = tx
        .query_row(
            "SELECT hash FROM audit WHERE seq < ?1 AND hash IS NOT NULL ORDER BY seq DESC LIMIT 1",
            [first.seq],
            |r| r.get::<_, Vec<u8>>(0),
        )
        .ok()
        .and_then(|h| hash_from_slice(&h))
        .unwrap_or(GENESIS);
    for f in &unsealed {
        let fields = f.borrow();
        let hash = record_hash(&prev, &fields);
        tx.execute(
            "UPDATE audit SET prev_hash = ?2, hash = ?3 WHERE seq = ?1",
            params![f.seq, &prev[..], &hash[..]],
        )
        .map_err(|e| db_err("seal audit record", e))?;
        prev = hash;
    }
    tx.commit()
        .map_err(|e| db_err("commit sealed audit records", e))?;
    Ok(unsealed.len() as u64)
}

/// The hashed columns of `audit`, in [`owned_fields`]' order.
pub(super) const SELECT_FIELDS: &str =
    "SELECT seq, at_ms, kind, issuer, role, project_id, reason, detail FROM audit";

/// Reads a row of [`SELECT_FIELDS`].
pub(super) fn owned_fields(r: &rusqlite::Row<'_>) -> rusqlite::Result<OwnedFields> {
    Ok(OwnedFields {
        seq: r.get(0)?,
        at_ms: r.get(1)?,
        kind: r.get(2)?,
        issuer: r.get(3)?,
        role: r.get(4)?,
        project_id: r.get(5)?,
        reason: r.get(6)?,
        detail: r.get(7)?,
    })
}
