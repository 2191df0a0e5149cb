//! WAL checkpoints off the commit path.
//!
//! With SQLite's automatic checkpoints, the commit that crosses the
//! threshold copies the WAL into the database and syncs it while every
//! request in that batch waits for its reply. Here a thread of its own, on
//! its own connection, runs `PASSIVE` checkpoints that never block the
//! writer, every few milliseconds while the WAL grows: the database file's
//! pages are then copied and synced a little at a time, and the writer's
//! own checkpoint (the one that lets the WAL restart, `writer.rs`) finds
//! almost nothing left to copy or sync. Measured on the VM's disk: at half
//! the peak rate, p99 8.5–16 ms with a checkpoint every 500 ms, 5.6 ms
//! every 20 ms, 4.2–4.4 ms every 5 ms (BENCHMARKS.md, session 5).

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use rusqlite::Connection;

/// The wait while the WAL keeps growing.
pub(super) const BUSY_INTERVAL: Duration = Duration::from_millis(5);

/// The longest wait, reached by doubling while nothing is written.
pub(super) const IDLE_INTERVAL: Duration = Duration::from_millis(500);

/// Checkpoints until `stop` is disconnected (the writer has exited), then
/// once more.
pub(super) fn run(conn: Connection, stop: Receiver<()>) {
    let mut wait = IDLE_INTERVAL;
    let mut last = None;
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(wait) {
        let now = checkpoint(&conn);
        wait = next_wait(wait, last, now);
        last = now;
    }
    checkpoint(&conn);
}

/// Short while the WAL changed since the last checkpoint; otherwise
/// (idle, or a failing checkpoint) doubling up to [`IDLE_INTERVAL`], so an
/// idle server wakes rarely and a failure is not retried in a busy loop.
fn next_wait(wait: Duration, last: Option<WalState>, now: Option<WalState>) -> Duration {
    if now.is_some() && now != last {
        BUSY_INTERVAL
    } else {
        (wait * 2).min(IDLE_INTERVAL)
    }
}

/// Frames in the WAL and frames already copied into the database.
pub(super) type WalState = (i64, i64);

/// One `PASSIVE` checkpoint; a failure is logged, never fatal (and gives
/// `None`).
pub(super) fn checkpoint(conn: &Connection) -> Option<WalState> {
    // (busy, frames in the WAL, frames checkpointed)
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    });
    match result {
        Ok(state) => Some(state),
        Err(e) => {
            tracing::warn!(error = %e, "SQLite WAL checkpoint failed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_waits_while_the_wal_grows_and_doubling_waits_when_idle() {
        let ms = Duration::from_millis;
        assert_eq!(next_wait(ms(500), None, Some((10, 10))), BUSY_INTERVAL);
        assert_eq!(
            next_wait(ms(5), Some((10, 4)), Some((20, 20))),
            BUSY_INTERVAL
        );
        assert_eq!(next_wait(ms(5), Some((20, 20)), Some((20, 20))), ms(10));
        assert_eq!(
            next_wait(ms(400), Some((20, 20)), Some((20, 20))),
            IDLE_INTERVAL
        );
        // A restarted WAL is a change.
        assert_eq!(
            next_wait(IDLE_INTERVAL, Some((20, 20)), Some((3, 0))),
            BUSY_INTERVAL
        );
        // A failing checkpoint backs off like an idle one.
        assert_eq!(next_wait(ms(40), Some((20, 20)), None), ms(80));
    }
}
