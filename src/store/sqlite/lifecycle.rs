//! Revocation rules and offboarding blocks in SQLite (schema v3 tables
//! `revocations` and `offboarded`). Writes go through the single writer
//! ([`LifecycleOp`]); reads use the read pool.

use rusqlite::{Connection, OptionalExtension as _, Row, params};

use super::db_err;
use super::writer::Chain;
use crate::revoke::{
    Block, BlockGrain, Grain, NewRevocation, RevocationRule, StoredBlock, StoredRevocation,
    block_audit, revocation_audit,
};
use crate::store::{
    AuditKind, DownstreamRecord, Identity, IssuedToken, OutstandingDownstream, StoreError,
};

/// A lifecycle write. Each is one request of a writer batch; the writer's
/// reply carries the rule id, or the number of rows changed.
pub(crate) enum LifecycleOp {
    /// Insert a rule and its audit event; replies with the rule id.
    Revoke(NewRevocation),
    /// Set `effective_at_ms` where unset on ids in `(after_id, up_to_id]`;
    /// replies with how many rows this set.
    MarkEffective {
        after_id: i64,
        up_to_id: i64,
        at_ms: i64,
    },
    /// Insert (or refresh) a block, insert the rule revoking what it covers,
    /// audit both; replies with the rule id.
    Offboard(Block, NewRevocation),
    /// Delete a block and audit it; replies 1 if there was one.
    Reenable {
        block: Block,
        actor: String,
        reason: String,
        at_ms: i64,
    },
}

/// Runs one op inside the writer's transaction. Its events are appended
/// to the same audit chain as the batch's other records.
pub(super) fn apply(
    conn: &Connection,
    op: &LifecycleOp,
    chain: &mut Chain<'_>,
) -> Result<u64, StoreError> {
    match op {
        LifecycleOp::Revoke(new) => {
            let id = insert_rule(conn, new)?;
            chain.append(conn, &revocation_audit(id, new))?;
            Ok(id.unsigned_abs())
        }
        LifecycleOp::MarkEffective {
            after_id,
            up_to_id,
            at_ms,
        } => conn
            .prepare_cached(
                "UPDATE revocations SET effective_at_ms = ?3
                 WHERE id > ?1 AND id <= ?2 AND effective_at_ms IS NULL",
            )
            .and_then(|mut s| s.execute(params![after_id, up_to_id, at_ms]))
            .map(|n| n as u64)
            .map_err(|e| db_err("mark revocation effective", e)),
        LifecycleOp::Offboard(block, new) => {
            conn.prepare_cached(
                "INSERT INTO offboarded (grain, issuer, value, actor, reason, at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (grain, issuer, value) DO UPDATE SET
                     actor = excluded.actor, reason = excluded.reason, at_ms = excluded.at_ms",
            )
            .and_then(|mut s| {
                s.execute(params![
                    block.grain.as_str(),
                    block.issuer,
                    block.value,
                    new.actor,
                    new.reason,
                    new.requested_at_ms
                ])
            })
            .map_err(|e| db_err("insert offboarded", e))?;
            let id = insert_rule(conn, new)?;
            chain.append(
                conn,
                &block_audit(
                    AuditKind::Offboarded,
                    block,
                    &new.actor,
                    &new.reason,
                    new.requested_at_ms,
                    Some(id),
                ),
            )?;
            chain.append(conn, &revocation_audit(id, new))?;
            Ok(id.unsigned_abs())
        }
        LifecycleOp::Reenable {
            block,
            actor,
            reason,
            at_ms,
        } => {
            let n = conn
                .prepare_cached(
                    "DELETE FROM offboarded WHERE grain = ?1 AND issuer = ?2 AND value = ?3",
                )
                .and_then(|mut s| {
                    s.execute(params![block.grain.as_str(), block.issuer, block.value])
                })
                .map_err(|e| db_err("delete offboarded", e))?;
            chain.append(
                conn,
                &block_audit(AuditKind::Reenabled, block, actor, reason, *at_ms, None),
            )?;
            Ok(n as u64)
        }
    }
}

fn insert_rule(conn: &Connection, new: &NewRevocation) -> Result<i64, StoreError> {
    let r = &new.rule;
    conn.prepare_cached(
        "INSERT INTO revocations (grain, value, issuer, issued_before_ms, requested_at_ms,
             actor, reason, source)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .and_then(|mut s| {
        s.execute(params![
            r.grain.as_str(),
            r.value,
            r.issuer,
            r.issued_before_ms,
            new.requested_at_ms,
            new.actor,
            new.reason,
            new.source
        ])
    })
    .map_err(|e| db_err("insert revocation", e))?;
    Ok(conn.last_insert_rowid())
}

/// Rules above `after_id`, in id order.
pub(super) fn revocations_since(
    conn: &Connection,
    after_id: i64,
    limit: usize,
) -> Result<Vec<StoredRevocation>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT r.id, r.grain, r.value, r.issuer, r.issued_before_ms, r.requested_at_ms,
                    r.effective_at_ms, r.actor, r.reason, r.source, t.expires_at_ms
             FROM revocations r
             LEFT JOIN issued_tokens t ON r.grain = 'jti' AND t.jti = r.value
             WHERE r.id > ?1 ORDER BY r.id LIMIT ?2",
        )
        .map_err(|e| db_err("read revocations", e))?;
    let rows = stmt
        .query_map(
            [after_id, i64::try_from(limit).unwrap_or(i64::MAX)],
            |row| {
                Ok((
                    row.get::<_, String>(1)?,
                    StoredRevocation {
                        rule: RevocationRule {
                            id: row.get(0)?,
                            grain: Grain::All,
                            value: row.get(2)?,
                            issuer: row.get(3)?,
                            issued_before_ms: row.get(4)?,
                        },
                        requested_at_ms: row.get(5)?,
                        effective_at_ms: row.get(6)?,
                        actor: row.get(7)?,
                        reason: row.get(8)?,
                        source: row.get(9)?,
                        credential_expires_at_ms: row.get(10)?,
                    },
                ))
            },
        )
        .map_err(|e| db_err("read revocations", e))?;
    rows.map(|row| {
        let (grain, mut r) = row.map_err(|e| db_err("read revocations", e))?;
        // An unknown grain (a newer build's rule) must not be dropped
        // silently: refusing the load keeps the server from under-revoking.
        r.rule.grain = Grain::parse(&grain).ok_or_else(|| {
            StoreError::Database(format!("revocation {}: unknown grain {grain:?}", r.rule.id))
        })?;
        Ok(r)
    })
    .collect()
}

/// jtis of unexpired credentials the rule covers. The stored `issued_at_ms`
/// is `iat` (whole seconds), so SQL selects a superset and the UUID v7
/// millisecond time of each jti decides.
pub(super) fn outstanding_for_rule(
    conn: &Connection,
    rule: &RevocationRule,
    now_ms: i64,
) -> Result<Vec<String>, StoreError> {
    let (filter, value) = match rule.grain {
        Grain::Jti => {
            return conn
                .prepare_cached(
                    "SELECT jti FROM issued_tokens WHERE jti = ?1 AND expires_at_ms > ?2",
                )
                .and_then(|mut s| {
                    s.query_map(params![rule.value, now_ms], |r| r.get(0))?
                        .collect::<Result<Vec<String>, _>>()
                })
                .map_err(|e| db_err("read outstanding", e));
        }
        Grain::Project => ("project_id = ?3 AND (?4 = '' OR issuer = ?4)", &rule.value),
        Grain::Namespace => (
            "namespace_id = ?3 AND (?4 = '' OR issuer = ?4)",
            &rule.value,
        ),
        Grain::Role => ("role = ?3 AND ?4 = ''", &rule.value),
        Grain::Issuer => ("issuer = ?3 AND ?4 = ''", &rule.value),
        Grain::All => ("?3 = '' AND ?4 = ''", &rule.value),
    };
    let sql = format!(
        "SELECT jti, issued_at_ms FROM issued_tokens
         WHERE expires_at_ms > ?1 AND issued_at_ms < ?2 AND {filter}"
    );
    let mut stmt = conn
        .prepare_cached(&sql)
        .map_err(|e| db_err("read outstanding", e))?;
    let rows = stmt
        .query_map(
            params![now_ms, rule.issued_before_ms, value, rule.issuer],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
        )
        .map_err(|e| db_err("read outstanding", e))?;
    let mut out = Vec::new();
    for row in rows {
        let (jti, iat_ms) = row.map_err(|e| db_err("read outstanding", e))?;
        if crate::revoke::issued_at_ms(&jti, iat_ms.div_euclid(1000)) < rule.issued_before_ms {
            out.push(jti);
        }
    }
    Ok(out)
}

/// Every block in force.
pub(super) fn offboarded(conn: &Connection) -> Result<Vec<StoredBlock>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT grain, issuer, value, actor, reason, at_ms FROM offboarded
             ORDER BY grain, issuer, value",
        )
        .map_err(|e| db_err("read offboarded", e))?;
    let rows = stmt
        .query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, i64>(5)?,
            ))
        })
        .map_err(|e| db_err("read offboarded", e))?;
    rows.map(|row| {
        let (grain, issuer, value, actor, reason, at_ms) =
            row.map_err(|e| db_err("read offboarded", e))?;
        let grain = BlockGrain::parse(&grain)
            .ok_or_else(|| StoreError::Database(format!("offboarded: unknown grain {grain:?}")))?;
        Ok(StoredBlock {
            block: Block {
                grain,
                issuer,
                value,
            },
            actor,
            reason,
            at_ms,
        })
    })
    .collect()
}

/// One issued credential by jti.
pub(super) fn issued_token(
    conn: &Connection,
    jti: &str,
) -> Result<Option<(Identity, IssuedToken)>, StoreError> {
    conn.prepare_cached(
        "SELECT issuer, project_id, namespace_id, role, project_path, namespace_path, owner,
                jti, kind, audience, scope, issued_at_ms, expires_at_ms, subject_jti,
                pipeline_id, job_id, git_ref
         FROM issued_tokens WHERE jti = ?1",
    )
    .and_then(|mut s| s.query_row([jti], token_row).optional())
    .map_err(|e| db_err("read issued token", e))
}

fn token_row(row: &Row<'_>) -> rusqlite::Result<(Identity, IssuedToken)> {
    Ok((
        Identity {
            issuer: row.get(0)?,
            project_id: row.get(1)?,
            namespace_id: row.get(2)?,
            role: row.get(3)?,
            project_path: row.get(4)?,
            namespace_path: row.get(5)?,
            owner: row.get(6)?,
        },
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
}

const DOWNSTREAM_COLUMNS: &str = "t.issuer, t.project_id, t.namespace_id, t.role, t.project_path,
    t.namespace_path, t.owner, t.jti, t.kind, t.audience, t.scope, t.issued_at_ms,
    t.expires_at_ms, t.subject_jti, t.pipeline_id, t.job_id, t.git_ref,
    d.provider, d.target, d.external_id, d.provider_expires_at_ms, d.revoked_at_ms";

fn downstream_row(row: &Row<'_>) -> rusqlite::Result<(OutstandingDownstream, Option<i64>)> {
    let (identity, token) = token_row(row)?;
    Ok((
        OutstandingDownstream {
            identity,
            token,
            downstream: DownstreamRecord {
                provider: row.get(17)?,
                target: row.get(18)?,
                external_id: row.get(19)?,
                provider_expires_at_ms: row.get(20)?,
            },
        },
        row.get(21)?,
    ))
}

/// Downstream credentials not yet revoked, soonest expiry first.
pub(super) fn outstanding_downstream(
    conn: &Connection,
    limit: usize,
) -> Result<Vec<OutstandingDownstream>, StoreError> {
    let err = |e| db_err("read outstanding downstream credentials", e);
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {DOWNSTREAM_COLUMNS}
             FROM downstream_credentials d JOIN issued_tokens t ON t.jti = d.jti
             WHERE d.revoked_at_ms IS NULL ORDER BY d.expires_at_ms LIMIT ?1"
        ))
        .map_err(err)?;
    let rows = stmt
        .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], downstream_row)
        .map_err(err)?;
    rows.map(|r| r.map(|(o, _)| o))
        .collect::<Result<_, _>>()
        .map_err(err)
}

/// One downstream credential by `jti`.
pub(super) fn downstream(
    conn: &Connection,
    jti: &str,
) -> Result<Option<(OutstandingDownstream, Option<i64>)>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {DOWNSTREAM_COLUMNS}
         FROM downstream_credentials d JOIN issued_tokens t ON t.jti = d.jti
         WHERE d.jti = ?1"
    ))
    .and_then(|mut s| s.query_row([jti], downstream_row).optional())
    .map_err(|e| db_err("read downstream credential", e))
}
