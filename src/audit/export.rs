//! `cistern audit export`: stream records as JSON Lines, filtered by time,
//! identity and kind. An unfiltered export interleaves the signed
//! checkpoints, so the export itself verifies (`audit verify --file`).

use std::io::Write;
use std::path::Path;

use rusqlite::Connection;
use rusqlite::types::Value;
use serde_json::value::RawValue;

use super::record::{CheckpointLine, CheckpointWrapper, RecordLine};

/// Which records to export; every field narrows.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// At or after (ms).
    pub since_ms: Option<i64>,
    /// Before (ms).
    pub until_ms: Option<i64>,
    /// Any of these kinds.
    pub kinds: Vec<String>,
    /// Issuer name.
    pub issuer: Option<String>,
    /// Project id.
    pub project_id: Option<String>,
    /// Role.
    pub role: Option<String>,
    /// Records up to and including this sequence number. The only narrowing
    /// that keeps an export verifiable on its own (a prefix of the chain, with
    /// its checkpoints): `cistern audit prune` archives this way.
    pub through_seq: Option<i64>,
}

impl Filter {
    /// Whether the export is the chain itself (everything, or a prefix of
    /// it), so its checkpoints go along and it verifies on its own.
    pub fn keeps_chain(&self) -> bool {
        self.since_ms.is_none()
            && self.until_ms.is_none()
            && self.kinds.is_empty()
            && self.issuer.is_none()
            && self.project_id.is_none()
            && self.role.is_none()
    }
}

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Reading the store failed.
    #[error("reading the audit log: {0}")]
    Database(#[from] rusqlite::Error),
    /// A stored value had the wrong type.
    #[error("reading the audit log: {0}")]
    Value(#[from] rusqlite::types::FromSqlError),
    /// Writing the output failed.
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
}

/// Exports from the SQLite store at `path` (read-only) to `out`; returns
/// the number of records written.
pub fn export_sqlite(path: &Path, filter: &Filter, out: impl Write) -> Result<u64, ExportError> {
    let conn = super::open_read_only(path)?;
    export_connection(&conn, filter, out)
}

/// [`export_sqlite`] on an open connection, in one read transaction.
pub fn export_connection(
    conn: &Connection,
    filter: &Filter,
    mut out: impl Write,
) -> Result<u64, ExportError> {
    conn.execute_batch("BEGIN")?;
    let mut sql = format!("SELECT {} FROM audit WHERE 1 = 1", super::RECORD_COLUMNS);
    let mut args: Vec<Value> = Vec::new();
    let mut push = |clause: &str, v: Value| {
        args.push(v);
        sql.push_str(&format!(" AND {clause} ?{}", args.len()));
    };
    if let Some(t) = filter.since_ms {
        push("at_ms >=", Value::Integer(t));
    }
    if let Some(t) = filter.until_ms {
        push("at_ms <", Value::Integer(t));
    }
    if let Some(seq) = filter.through_seq {
        push("seq <=", Value::Integer(seq));
    }
    if let Some(v) = &filter.issuer {
        push("issuer =", Value::Text(v.clone()));
    }
    if let Some(v) = &filter.project_id {
        push("project_id =", Value::Text(v.clone()));
    }
    if let Some(v) = &filter.role {
        push("role =", Value::Text(v.clone()));
    }
    if !filter.kinds.is_empty() {
        let first = args.len() + 1;
        let marks: Vec<String> = (first..first + filter.kinds.len())
            .map(|i| format!("?{i}"))
            .collect();
        args.extend(filter.kinds.iter().cloned().map(Value::Text));
        sql.push_str(&format!(" AND kind IN ({})", marks.join(", ")));
    }
    sql.push_str(" ORDER BY seq");

    let mut checkpoints = if filter.keeps_chain() {
        let mut stmt = conn.prepare(
            "SELECT seq, at_ms, hash, kid, jws FROM audit_checkpoints WHERE seq <= ?1 ORDER BY seq DESC",
        )?;
        let rows = stmt.query_map([filter.through_seq.unwrap_or(i64::MAX)], |r| {
            Ok(CheckpointLine {
                seq: r.get(0)?,
                at_ms: r.get(1)?,
                hash: hex::encode(r.get::<_, Vec<u8>>(2)?),
                kid: r.get(3)?,
                jws: r.get(4)?,
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };

    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut n = 0u64;
    while let Some(r) = rows.next()? {
        let seq = write_line(r, &mut buf)?;
        n += 1;
        while checkpoints.last().is_some_and(|c| c.seq <= seq) {
            if let Some(c) = checkpoints.pop()
                && c.seq == seq
            {
                serde_json::to_writer(&mut buf, &CheckpointWrapper { checkpoint: c })
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                buf.push(b'\n');
            }
        }
        if buf.len() >= 60 * 1024 {
            out.write_all(&buf)?;
            buf.clear();
        }
    }
    out.write_all(&buf)?;
    out.flush()?;
    drop(rows);
    drop(stmt);
    conn.execute_batch("COMMIT")?;
    Ok(n)
}

/// Writes the line of one `SELECT RECORD_COLUMNS` row to `buf`; returns its
/// `seq`.
fn write_line(r: &rusqlite::Row<'_>, buf: &mut Vec<u8>) -> Result<i64, ExportError> {
    let row = super::stored_row(r)?;
    let fields = row.fields;
    let (prev, hash) = (
        row.prev_hash.unwrap_or_default(),
        row.hash.unwrap_or_default(),
    );
    // Stored detail is JSON cistern wrote; a row edited into something
    // else is exported as a string (and fails verification, as it should).
    let owned;
    let detail: &RawValue = match serde_json::from_str::<&RawValue>(fields.detail) {
        Ok(raw) => raw,
        Err(_) => {
            owned = serde_json::value::to_raw_value(fields.detail)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            &owned
        }
    };
    RecordLine::new(&fields, detail, prev, hash).write_to(buf);
    Ok(fields.seq)
}

/// Appends the lines of the records with `after < seq <= through` to
/// `buf`, in order, inside whatever transaction `conn` has open (the
/// store's writer uses it to pass records another process wrote on to its
/// sinks). Returns how many.
pub(crate) fn lines_between(
    conn: &Connection,
    after: i64,
    through: i64,
    buf: &mut Vec<u8>,
) -> Result<u64, ExportError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {} FROM audit WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
        super::RECORD_COLUMNS
    ))?;
    let mut rows = stmt.query([after, through])?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        write_line(r, buf)?;
        n += 1;
    }
    Ok(n)
}
