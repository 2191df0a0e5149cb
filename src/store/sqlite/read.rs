//! Reads, on their own connections so they never queue behind the writer.
//! WAL lets them see the last committed state while a batch is in flight.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, TryLockError};

use rusqlite::{Connection, Row};

use super::{db_err, schema};
use crate::store::{Identity, IssuedToken, StoreError, StoredAudit, StoredIdentity};

/// A fixed handful of read connections. Reads are operator queries and
/// readiness probes, so a small pool keeps a slow audit listing from
/// stalling `/readyz` without holding many file handles.
pub(super) struct ReadPool {
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl ReadPool {
    /// Opens `size` (at least one) read connections to `path`.
    pub(super) fn open(path: &Path, size: usize) -> Result<Self, StoreError> {
        let conns = (0..size.max(1))
            .map(|_| schema::open_reader(path).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            conns,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `f` on an idle connection, or waits for one in turn. Blocking:
    /// call from `spawn_blocking`.
    pub(super) fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        for conn in &self.conns {
            match conn.try_lock() {
                Ok(guard) => return f(&guard),
                // A panic elsewhere cannot leave a read connection mid-write;
                // it is safe to keep using it.
                Err(TryLockError::Poisoned(p)) => return f(&p.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let guard = self.conns[i].lock().unwrap_or_else(PoisonError::into_inner);
        f(&guard)
    }
}

fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Checks the schema is readable.
pub(super) fn ping(conn: &Connection) -> Result<(), StoreError> {
    conn.prepare_cached("SELECT MAX(version) FROM schema_version")
        .and_then(|mut s| s.query_row([], |row| row.get::<_, Option<i64>>(0)))
        .map(drop)
        .map_err(|e| db_err("ping", e))
}

/// The newest `limit` audit rows, oldest first.
pub(super) fn recent_audit(
    conn: &Connection,
    limit: usize,
) -> Result<Vec<StoredAudit>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, at_ms, kind, issuer, role, project_id, reason, detail FROM (
                 SELECT * FROM audit ORDER BY seq DESC LIMIT ?1
             ) ORDER BY seq ASC",
        )
        .map_err(|e| db_err("read audit", e))?;
    let rows = stmt
        .query_map([sql_limit(limit)], |row| {
            Ok((
                StoredAudit {
                    seq: row.get(0)?,
                    at_ms: row.get(1)?,
                    kind: row.get(2)?,
                    issuer: row.get(3)?,
                    role: row.get(4)?,
                    project_id: row.get(5)?,
                    reason: row.get(6)?,
                    detail: serde_json::Value::Null,
                },
                row.get::<_, String>(7)?,
            ))
        })
        .map_err(|e| db_err("read audit", e))?;
    rows.map(|row| {
        let (mut audit, detail) = row.map_err(|e| db_err("read audit", e))?;
        audit.detail = serde_json::from_str(&detail).map_err(|e| {
            StoreError::Database(format!("audit row {}: detail is not JSON: {e}", audit.seq))
        })?;
        Ok(audit)
    })
    .collect()
}

/// The newest `limit` issued credentials, oldest first.
pub(super) fn issued_tokens(
    conn: &Connection,
    limit: usize,
) -> Result<Vec<(Identity, IssuedToken)>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT issuer, project_id, namespace_id, role, project_path, namespace_path, owner,
                    jti, kind, audience, scope, issued_at_ms, expires_at_ms, subject_jti,
                    pipeline_id, job_id, git_ref
             FROM (SELECT * FROM issued_tokens ORDER BY jti DESC LIMIT ?1)
             ORDER BY jti ASC",
        )
        .map_err(|e| db_err("read issued tokens", e))?;
    let rows = stmt
        .query_map([sql_limit(limit)], |row| {
            Ok((
                identity(row)?,
                IssuedToken {
                    jti: row.get(7)?,
                    kind: row.get(8)?,
                    audience: row.get(9)?,
                    scope: row.get(10)?,
                    issued_at_ms: row.get(11)?,
                    expires_at_ms: row.get(12)?,
                    subject_jti: row.get(13)?,
                    pipeline_id: row.get(14)?,
                    job_id: row.get(15)?,
                    git_ref: row.get(16)?,
                },
            ))
        })
        .map_err(|e| db_err("read issued tokens", e))?;
    rows.collect::<Result<_, _>>()
        .map_err(|e| db_err("read issued tokens", e))
}

/// Every identity, in key order.
pub(super) fn identities(conn: &Connection) -> Result<Vec<StoredIdentity>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT issuer, project_id, namespace_id, role, project_path, namespace_path, owner,
                    first_seen_ms, last_used_ms, exchanges
             FROM identities ORDER BY issuer, project_id, namespace_id, role",
        )
        .map_err(|e| db_err("read identities", e))?;
    let rows = stmt
        .query_map([], |row| {
            Ok(StoredIdentity {
                identity: identity(row)?,
                first_seen_ms: row.get(7)?,
                last_used_ms: row.get(8)?,
                exchanges: row.get(9)?,
            })
        })
        .map_err(|e| db_err("read identities", e))?;
    rows.collect::<Result<_, _>>()
        .map_err(|e| db_err("read identities", e))
}

/// Columns 0..7 as an [`Identity`].
fn identity(row: &Row<'_>) -> rusqlite::Result<Identity> {
    Ok(Identity {
        issuer: row.get(0)?,
        project_id: row.get(1)?,
        namespace_id: row.get(2)?,
        role: row.get(3)?,
        project_path: row.get(4)?,
        namespace_path: row.get(5)?,
        owner: row.get(6)?,
    })
}

/// The newest audit record's seq and hash, and the newest checkpoint.
pub(super) fn audit_head(conn: &Connection) -> Result<crate::store::AuditStatus, StoreError> {
    use rusqlite::OptionalExtension as _;
    let head = conn
        .prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        .and_then(|mut s| {
            s.query_row([], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Option<Vec<u8>>>(1)?))
            })
            .optional()
        })
        .map_err(|e| db_err("read audit head", e))?;
    let head = match head {
        None => None,
        Some((seq, hash)) => Some(crate::store::AuditHead {
            seq,
            hash: hash
                .as_deref()
                .and_then(crate::audit::chain::hash_from_slice)
                .ok_or_else(|| {
                    StoreError::Database(format!("audit record {seq} has no valid hash"))
                })?,
        }),
    };
    let last_checkpoint = conn
        .prepare_cached("SELECT MAX(seq) FROM audit_checkpoints")
        .and_then(|mut s| s.query_row([], |r| r.get::<_, Option<i64>>(0)))
        .map_err(|e| db_err("read audit checkpoints", e))?;
    Ok(crate::store::AuditStatus {
        head,
        last_checkpoint,
    })
}
