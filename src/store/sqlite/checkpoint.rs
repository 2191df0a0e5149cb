//! WAL checkpoints off the commit path.
//!
//! With SQLite's automatic checkpoints, the commit that crosses the
//! threshold copies the WAL into the database and syncs it while every
//! request in that batch waits for its reply. Here the writer never
//! checkpoints; this thread does, on its own connection, with `PASSIVE`
//! checkpoints that never block the writer.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use rusqlite::Connection;

/// How often the WAL is checkpointed.
pub(super) const INTERVAL: Duration = Duration::from_millis(500);

/// Checkpoints every [`INTERVAL`] until `stop` is disconnected (the writer
/// has exited), then once more.
pub(super) fn run(conn: Connection, stop: Receiver<()>) {
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(INTERVAL) {
        checkpoint(&conn);
    }
    checkpoint(&conn);
}

/// One `PASSIVE` checkpoint; a failure is logged, never fatal.
pub(super) fn checkpoint(conn: &Connection) {
    // (busy, frames in the WAL, frames checkpointed)
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, "SQLite WAL checkpoint failed");
    }
}
