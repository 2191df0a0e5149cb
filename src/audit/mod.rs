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
//! [`export`] streams a filtered range for a SIEM.
//!
//! Records never hold a token or a secret: `jti`s, hashes and claims only.

pub mod chain;
pub mod checkpoint;
pub mod export;
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
