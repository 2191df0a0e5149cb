//! The tamper-evident audit log.
//!
//! Every audit record is appended by the store's single writer inside the
//! transaction that makes its event durable, as one link of a SHA-256 hash
//! chain ([`chain`]): a record's hash covers its sequence number, its
//! fields and the previous record's hash. Modifying, deleting or reordering
//! a record breaks the chain at that record. Periodic [`checkpoint`]s sign
//! the chain head with cistern's signing key, so a cut-off tail or a chain
//! rewritten with fresh hashes is caught too. [`verify`] walks a log (the
//! store, or JSON Lines files) and names the first bad record; [`sink`]s
//! copy each committed batch out of the store as JSON Lines ([`record`]);
//! [`export`] streams a filtered range for a SIEM; [`prune`] archives the
//! oldest records and deletes them from the store, leaving a log that still
//! verifies.
//!
//! Records never hold a token or a secret: `jti`s, hashes and claims only.

pub mod chain;
pub mod checkpoint;
pub mod export;
pub mod prune;
pub mod record;
pub mod sink;
pub mod verify;

/// Opens a SQLite store read-only for verification and export (never
/// creates, migrates or writes).
pub(crate) fn open_read_only(path: &std::path::Path) -> rusqlite::Result<rusqlite::Connection> {
    rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

/// The stored columns of a record, in [`stored_row`]'s order.
pub(crate) const RECORD_COLUMNS: &str =
    "seq, at_ms, kind, issuer, role, project_id, reason, detail, prev_hash, hash";

/// One row of `SELECT RECORD_COLUMNS FROM audit`, borrowed: the hashed
/// fields, the stored previous hash and the stored hash.
pub(crate) fn stored_row<'r>(r: &'r rusqlite::Row<'_>) -> rusqlite::Result<verify::Row<'r>> {
    Ok(verify::Row {
        fields: chain::ChainFields {
            seq: r.get(0)?,
            at_ms: r.get(1)?,
            kind: r.get_ref(2)?.as_str()?,
            issuer: r.get_ref(3)?.as_str_or_null()?,
            role: r.get_ref(4)?.as_str_or_null()?,
            project_id: r.get_ref(5)?.as_str_or_null()?,
            reason: r.get_ref(6)?.as_str_or_null()?,
            detail: r.get_ref(7)?.as_str()?,
        },
        prev_hash: r.get_ref(8)?.as_blob_or_null()?,
        hash: r.get_ref(9)?.as_blob_or_null()?,
    })
}
