//! Embedded SQLite store: one writer thread with group commit, a small
//! pool of read connections.
//!
//! # Why group commit
//!
//! Every granted exchange writes a replay row, a credential row, an identity
//! upsert and an audit row, and the client is answered only once they are
//! durable. SQLite admits one writer at a time, and a commit costs about
//! 10 µs of CPU in WAL+NORMAL, plus an fsync in WAL+FULL (0.5–2 ms on
//! ordinary cloud disks). One transaction per exchange would cap cistern at
//! the disk's commit rate; batching N exchanges into one transaction pays
//! that cost once per batch (measured ~100k rows/s at batch 1 against
//! ~390k rows/s at batch 16, crates.md §C), and on slow disks the batch
//! grows by itself because requests pile up while an fsync is in flight.
//!
//! # How
//!
//! * A dedicated OS thread owns the only write connection, so writes never
//!   contend for SQLite's lock and never block a tokio worker.
//! * Callers send a request with a `oneshot` reply slot on a bounded channel
//!   (bounded so a stalled disk pushes back on callers instead of growing
//!   memory without limit).
//! * The writer takes everything pending, up to 256 requests, and runs them
//!   in one `BEGIN IMMEDIATE` transaction. A replayed ID token writes
//!   nothing and is answered [`StoreError::Replay`]; the rest commit. Any
//!   other failure refuses the whole batch.
//! * Replies are sent only after `COMMIT` returns: an acknowledged write is
//!   on disk (to the durability `synchronous` promises). If the commit
//!   fails, every request in the batch gets [`StoreError::Database`].
//! * Reads run on separate connections via `spawn_blocking`; WAL gives them
//!   the last committed snapshot without waiting for the writer.
//! * Dropping the last handle, or [`SqliteStore::close`], closes the
//!   channel; the writer still drains and commits everything already queued
//!   before it exits, so no accepted write is lost.

mod checkpoint;
pub mod inventory;
mod lifecycle;
mod read;
mod replay;
mod schema;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use self::lifecycle::LifecycleOp;
use self::read::ReadPool;
pub(crate) use self::writer::AuditOutput;
use self::writer::{Counters, Message, WriteOp, WriteRequest};
use crate::audit::record::CheckpointLine;
use crate::audit::sink::Sink;
use crate::config::Synchronous;
use crate::revoke::{Block, NewRevocation, RevocationRule, StoredBlock, StoredRevocation};
use crate::store::{
    AuditEvent, AuditStatus, ExchangeRecord, Identity, IssuedToken, OutstandingDownstream,
    ReplayEntry, Store, StoreError, StoreStats, StoredAudit, StoredIdentity,
};

/// Queued writes before callers wait: a few full batches, so the writer
/// always has the next batch ready while committing one.
const CHANNEL_CAPACITY: usize = 4 * writer::MAX_BATCH;

/// Read connections kept open.
const READ_CONNECTIONS: usize = 2;

/// The embedded SQLite store. Cheap to clone; all clones share one writer,
/// which stops once every clone is dropped or [`SqliteStore::close`] is
/// called.
#[derive(Clone)]
pub struct SqliteStore {
    writer: mpsc::Sender<Message>,
    readers: Arc<ReadPool>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and starts the
    /// writer thread.
    ///
    /// Missing parent directories are created 0700 and the database file
    /// and its `-wal`/`-shm` companions are set to 0600 regardless of the
    /// umask. The schema is migrated forward; a database from a newer build
    /// is refused. Does blocking file I/O: call at startup.
    pub fn open(path: &Path, synchronous: Synchronous) -> Result<SqliteStore, StoreError> {
        Self::open_with_sinks(path, synchronous, Vec::new(), true)
    }

    /// [`SqliteStore::open`], also copying every committed audit record to
    /// `sinks` before any request of its batch is answered. With
    /// `fail_closed`, a sink failure refuses the batch's requests.
    pub fn open_with_sinks(
        path: &Path,
        synchronous: Synchronous,
        sinks: Vec<Box<dyn Sink>>,
        fail_closed: bool,
    ) -> Result<SqliteStore, StoreError> {
        schema::prepare_files(path)?;
        let mut conn = schema::open_writer(path, synchronous)?;
        schema::migrate(&mut conn)?;
        let sealed = writer::seal_unchained(&mut conn)?;
        if sealed > 0 {
            tracing::info!(
                records = sealed,
                "sealed audit records written before the hash chain"
            );
        }
        let audit = AuditOutput { sinks, fail_closed };
        schema::restrict_companions(path)?;
        let readers = Arc::new(ReadPool::open(path, READ_CONNECTIONS)?);
        // The readers may have created `-shm`; tighten again.
        schema::restrict_companions(path)?;

        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let counters = Arc::new(Counters::default());
        let writer_counters = Arc::clone(&counters);
        let checkpointer = schema::open_checkpointer(path)?;
        // Dropping `stop_tx` (when the writer thread ends) stops the checkpointer.
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("cistern-sqlite-checkpoint".into())
            .spawn(move || checkpoint::run(checkpointer, stop_rx))
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot start SQLite checkpointer: {e}"))
            })?;
        std::thread::Builder::new()
            .name("cistern-sqlite-writer".into())
            .spawn(move || {
                writer::run(conn, rx, writer_counters, audit);
                drop(stop_tx);
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start SQLite writer: {e}")))?;
        Ok(SqliteStore {
            writer: tx,
            readers,
            counters,
        })
    }

    /// Stops accepting writes, waits until everything already queued is
    /// committed and answered, and closes the write connection. Later
    /// writes fail with [`StoreError::Unavailable`]; reads keep working.
    /// Calling it again is harmless.
    pub async fn close(&self) {
        let (reply, done) = oneshot::channel();
        if self.writer.send(Message::Close(reply)).await.is_ok() {
            // An error means the writer already exited, which is the goal.
            let _ = done.await;
        }
    }

    async fn write(&self, op: WriteOp) -> Result<u64, StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.writer
            .send(Message::Write(WriteRequest { op, reply }))
            .await
            .map_err(|_| closed())?;
        outcome.await.map_err(|_| closed())?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = Arc::clone(&self.readers);
        tokio::task::spawn_blocking(move || readers.with(f))
            .await
            .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("the SQLite writer has stopped".into())
}

/// Maps a SQLite error. rusqlite's messages name the failing statement's
/// table and constraint, never bound values, so no record content leaks.
fn db_err(context: &str, e: rusqlite::Error) -> StoreError {
    StoreError::Database(format!("{context}: {e}"))
}

#[async_trait]
impl Store for SqliteStore {
    fn stats(&self) -> StoreStats {
        StoreStats {
            requests: self.counters.requests.load(Ordering::Relaxed),
            commits: self.counters.commits.load(Ordering::Relaxed),
            failed_batches: self.counters.failed_batches.load(Ordering::Relaxed),
            sink_failures: self.counters.sink_failures.load(Ordering::Relaxed),
            batch_nanos: self.counters.batch_nanos.load(Ordering::Relaxed),
        }
    }

    async fn commit_exchange(&self, record: ExchangeRecord) -> Result<(), StoreError> {
        self.write(WriteOp::Exchange(Box::new(record)))
            .await
            .map(drop)
    }

    async fn append_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.write(WriteOp::Audit(event)).await.map(drop)
    }

    async fn append_audits(&self, events: Vec<AuditEvent>) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        self.write(WriteOp::AuditBatch(events)).await.map(drop)
    }

    async fn prune_audit(
        &self,
        through_seq: i64,
        vouched_by: i64,
        limit: u32,
    ) -> Result<u64, StoreError> {
        self.write(WriteOp::PruneAudit {
            through_seq,
            vouched_by,
            limit,
        })
        .await
    }

    async fn prune_replay(&self, now_ms: i64) -> Result<u64, StoreError> {
        self.write(WriteOp::PruneReplay { now_ms }).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        if self.writer.is_closed() {
            return Err(closed());
        }
        self.read(read::ping).await
    }

    async fn recent_audit(&self, limit: usize) -> Result<Vec<StoredAudit>, StoreError> {
        self.read(move |conn| read::recent_audit(conn, limit)).await
    }

    async fn issued_tokens(
        &self,
        limit: usize,
    ) -> Result<Vec<(Identity, IssuedToken)>, StoreError> {
        self.read(move |conn| read::issued_tokens(conn, limit))
            .await
    }

    async fn identities(&self) -> Result<Vec<StoredIdentity>, StoreError> {
        self.read(read::identities).await
    }

    async fn record_revocation(&self, new: NewRevocation) -> Result<i64, StoreError> {
        let id = self.lifecycle(LifecycleOp::Revoke(new)).await?;
        rule_id(id)
    }

    async fn mark_revocations_effective(
        &self,
        after_id: i64,
        up_to_id: i64,
        at_ms: i64,
    ) -> Result<u64, StoreError> {
        self.lifecycle(LifecycleOp::MarkEffective {
            after_id,
            up_to_id,
            at_ms,
        })
        .await
    }

    async fn revocations_since(
        &self,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<StoredRevocation>, StoreError> {
        self.read(move |conn| lifecycle::revocations_since(conn, after_id, limit))
            .await
    }

    async fn outstanding_for_rule(
        &self,
        rule: &RevocationRule,
        now_ms: i64,
    ) -> Result<Vec<String>, StoreError> {
        let rule = rule.clone();
        self.read(move |conn| lifecycle::outstanding_for_rule(conn, &rule, now_ms))
            .await
    }

    async fn offboard(&self, block: Block, revocation: NewRevocation) -> Result<i64, StoreError> {
        let id = self
            .lifecycle(LifecycleOp::Offboard(block, revocation))
            .await?;
        rule_id(id)
    }

    async fn reenable(
        &self,
        block: Block,
        actor: String,
        reason: String,
        at_ms: i64,
    ) -> Result<bool, StoreError> {
        Ok(self
            .lifecycle(LifecycleOp::Reenable {
                block,
                actor,
                reason,
                at_ms,
            })
            .await?
            > 0)
    }

    async fn offboarded(&self) -> Result<Vec<StoredBlock>, StoreError> {
        self.read(lifecycle::offboarded).await
    }

    async fn issued_token(&self, jti: &str) -> Result<Option<(Identity, IssuedToken)>, StoreError> {
        let jti = jti.to_owned();
        self.read(move |conn| lifecycle::issued_token(conn, &jti))
            .await
    }

    async fn audit_head(&self) -> Result<AuditStatus, StoreError> {
        self.read(read::audit_head).await
    }

    async fn outstanding_downstream(
        &self,
        limit: usize,
    ) -> Result<Vec<OutstandingDownstream>, StoreError> {
        self.read(move |conn| lifecycle::outstanding_downstream(conn, limit))
            .await
    }

    async fn downstream_revoked(
        &self,
        jti: &str,
        at_ms: i64,
        cause: &str,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::DownstreamRevoked {
            jti: jti.to_owned(),
            at_ms,
            cause: cause.to_owned(),
            audit: Box::new(audit),
        })
        .await
        .map(drop)
    }

    async fn sealed_credential(
        &self,
        provider: &str,
    ) -> Result<Option<(crate::provider::sealed::Sealed, Option<String>)>, StoreError> {
        let provider = provider.to_owned();
        self.read(move |conn| {
            use rusqlite::OptionalExtension as _;
            conn.prepare_cached(
                "SELECT nonce, ciphertext, expires_on FROM provider_credentials WHERE provider = ?1",
            )
            .and_then(|mut s| {
                s.query_row([provider], |r| {
                    Ok((
                        crate::provider::sealed::Sealed {
                            nonce: r.get(0)?,
                            ciphertext: r.get(1)?,
                        },
                        r.get(2)?,
                    ))
                })
                .optional()
            })
            .map_err(|e| db_err("read sealed credential", e))
        })
        .await
    }

    async fn save_sealed_credential(
        &self,
        provider: &str,
        sealed: crate::provider::sealed::Sealed,
        expires_on: Option<String>,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::SealedCredential(Box::new(
            writer::SealedCredentialOp {
                provider: provider.to_owned(),
                sealed,
                expires_on,
                audit,
            },
        )))
        .await
        .map(drop)
    }

    async fn note_downstream_target(
        &self,
        provider: &str,
        target: &str,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        self.write(WriteOp::DownstreamTarget {
            provider: provider.to_owned(),
            target: target.to_owned(),
            at_ms,
        })
        .await
        .map(drop)
    }

    async fn downstream_targets(&self, provider: &str) -> Result<Vec<String>, StoreError> {
        let provider = provider.to_owned();
        self.read(move |conn| {
            conn.prepare_cached("SELECT target FROM downstream_targets WHERE provider = ?1")
                .and_then(|mut s| {
                    s.query_map([provider], |r| r.get(0))?
                        .collect::<Result<Vec<String>, _>>()
                })
                .map_err(|e| db_err("read downstream targets", e))
        })
        .await
    }

    async fn replay_consumed(&self, entry: &ReplayEntry) -> Result<bool, StoreError> {
        let e = entry.clone();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT 1 FROM replay WHERE expires_at_ms = ?1 AND issuer = ?2 AND jti = ?3",
            )
            .and_then(|mut s| s.exists(rusqlite::params![e.expires_at_ms, e.issuer, e.jti]))
            .map_err(|err| db_err("read replay", err))
        })
        .await
    }

    async fn downstream(
        &self,
        jti: &str,
    ) -> Result<Option<(OutstandingDownstream, Option<i64>)>, StoreError> {
        let jti = jti.to_owned();
        self.read(move |conn| lifecycle::downstream(conn, &jti))
            .await
    }

    async fn sweep_expired(&self, now_ms: i64, limit: u32) -> Result<u64, StoreError> {
        self.write(WriteOp::SweepExpired { now_ms, limit }).await
    }

    async fn append_checkpoint(&self, checkpoint: CheckpointLine) -> Result<(), StoreError> {
        self.write(WriteOp::Checkpoint(Box::new(checkpoint)))
            .await
            .map(drop)
    }
}

impl SqliteStore {
    async fn lifecycle(&self, op: LifecycleOp) -> Result<u64, StoreError> {
        self.write(WriteOp::Lifecycle(Box::new(op))).await
    }
}

fn rule_id(id: u64) -> Result<i64, StoreError> {
    i64::try_from(id).map_err(|_| StoreError::Database("revocation id out of range".into()))
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod audit_tests;
