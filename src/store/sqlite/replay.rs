//! The replay check: which ID tokens were already exchanged.
//!
//! Rows are appended to `replay` in the order tokens are consumed (`seq`,
//! the rowid), so each insert lands on the table's last page. Keying the
//! table by `(exp, issuer, jti)` instead had put every insert at a random
//! place among the tokens that expire in the same second: at a high rate
//! (and in any burst of jobs with the same timeout) one dirty 4 KiB page,
//! one WAL frame and one checkpoint copy per exchange, measured at a third
//! of the writer's CPU (BENCHMARKS.md, session 7).
//!
//! The lookup an append-only table cannot answer runs in memory, in the
//! writer thread that owns the set: a hash of `(issuer, jti)` per live row.
//! Other processes may write the same file, so every batch first reads the
//! rows appended since this process last looked, inside its `BEGIN
//! IMMEDIATE` transaction where no one else can append; a token consumed
//! anywhere is refused everywhere. `seq` never goes back: pruning keeps the
//! newest row, so SQLite never reuses a rowid this process has already
//! passed.

use std::collections::HashMap;

use aws_lc_rs::digest;
use rusqlite::{Connection, params};

use super::db_err;
use crate::store::{ReplayEntry, StoreError};

/// Consumed ID tokens, as this process knows them.
#[derive(Default)]
pub(super) struct ReplaySet {
    /// Key → the ID token's expiry (ms). `None` until the first claim, so a
    /// process that never exchanges (the CLI) never loads it.
    seen: Option<HashMap<u128, i64>>,
    /// The highest `replay.seq` read or written.
    through: i64,
    /// Whether the open transaction has caught up with other processes.
    synced: bool,
    /// What the open transaction claimed, undone if it rolls back.
    pending: Vec<u128>,
    /// `through` when the transaction began.
    through_at_begin: i64,
}

impl ReplaySet {
    /// Marks the start of a write transaction.
    pub(super) fn begin(&mut self) {
        self.synced = false;
        self.pending.clear();
        self.through_at_begin = self.through;
    }

    /// The transaction committed: its claims stand.
    pub(super) fn commit(&mut self) {
        self.pending.clear();
    }

    /// The transaction rolled back: forget its claims and read its rows'
    /// range again next time.
    pub(super) fn rollback(&mut self) {
        if let Some(seen) = self.seen.as_mut() {
            for key in self.pending.drain(..) {
                seen.remove(&key);
            }
        }
        self.pending.clear();
        self.through = self.through_at_begin;
    }

    /// Records `entry` as consumed: `Ok(true)` when it was not yet,
    /// `Ok(false)` for a replay (nothing written). Call inside a write
    /// transaction opened after [`ReplaySet::begin`].
    pub(super) fn claim(
        &mut self,
        conn: &Connection,
        entry: &ReplayEntry,
    ) -> Result<bool, StoreError> {
        if !self.synced {
            self.catch_up(conn)?;
            self.synced = true;
        }
        let key = key(&entry.issuer, &entry.jti);
        let seen = self.seen.get_or_insert_with(HashMap::new);
        if seen.contains_key(&key) {
            return Ok(false);
        }
        conn.prepare_cached("INSERT INTO replay (expires_at_ms, issuer, jti) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![entry.expires_at_ms, entry.issuer, entry.jti]))
            .map_err(|e| db_err("insert replay", e))?;
        self.through = conn.last_insert_rowid();
        seen.insert(key, entry.expires_at_ms);
        self.pending.push(key);
        Ok(true)
    }

    /// Reads the rows appended since `through` (all of them the first time).
    fn catch_up(&mut self, conn: &Connection) -> Result<(), StoreError> {
        let seen = self.seen.get_or_insert_with(HashMap::new);
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, expires_at_ms, issuer, jti FROM replay WHERE seq > ?1 ORDER BY seq",
            )
            .map_err(|e| db_err("read replay", e))?;
        let mut rows = stmt
            .query([self.through])
            .map_err(|e| db_err("read replay", e))?;
        while let Some(row) = rows.next().map_err(|e| db_err("read replay", e))? {
            let read = (|| -> rusqlite::Result<(i64, i64, u128)> {
                let issuer: String = row.get(2)?;
                let jti: String = row.get(3)?;
                Ok((row.get(0)?, row.get(1)?, key(&issuer, &jti)))
            })();
            let (seq, expires_at_ms, key) = read.map_err(|e| db_err("read replay", e))?;
            seen.insert(key, expires_at_ms);
            self.through = self.through.max(seq);
        }
        Ok(())
    }

    /// Deletes entries that expired before `now_ms`, from the table and
    /// from memory; returns how many rows went. The newest row stays (see
    /// the module docs); an expired token is refused before the replay
    /// check, so keeping it changes no answer.
    pub(super) fn prune(&mut self, conn: &Connection, now_ms: i64) -> Result<u64, StoreError> {
        let n = conn
            .prepare_cached(
                "DELETE FROM replay WHERE expires_at_ms < ?1
                     AND seq < (SELECT MAX(seq) FROM replay)",
            )
            .and_then(|mut s| s.execute([now_ms]))
            .map_err(|e| db_err("prune replay", e))?;
        if let Some(seen) = self.seen.as_mut() {
            seen.retain(|_, expires_at_ms| *expires_at_ms >= now_ms);
        }
        Ok(n as u64)
    }

    /// Live entries held in memory (for tests and diagnostics).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.seen.as_ref().map_or(0, HashMap::len)
    }
}

/// 128 bits of SHA-256 over the issuer, a separator no issuer name holds,
/// and the `jti`: a collision (a fresh token refused as a replay) has
/// probability 2^-128 per pair.
fn key(issuer: &str, jti: &str) -> u128 {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(&(issuer.len() as u64).to_be_bytes());
    ctx.update(issuer.as_bytes());
    ctx.update(jti.as_bytes());
    let d = ctx.finish();
    let mut first = [0u8; 16];
    first.copy_from_slice(&d.as_ref()[..16]);
    u128::from_be_bytes(first)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE replay (seq INTEGER PRIMARY KEY, expires_at_ms INTEGER NOT NULL,
                 issuer TEXT NOT NULL, jti TEXT NOT NULL);",
        )
        .unwrap();
        conn
    }

    fn entry(jti: &str, expires_at_ms: i64) -> ReplayEntry {
        ReplayEntry {
            issuer: "gitlab".into(),
            jti: jti.into(),
            expires_at_ms,
        }
    }

    fn rows(conn: &Connection) -> i64 {
        conn.query_row("SELECT COUNT(*) FROM replay", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_token_is_consumed_once() {
        let conn = conn();
        let mut set = ReplaySet::default();
        set.begin();
        assert!(set.claim(&conn, &entry("a", 10)).unwrap());
        assert!(!set.claim(&conn, &entry("a", 10)).unwrap());
        assert!(set.claim(&conn, &entry("b", 10)).unwrap());
        set.commit();
        set.begin();
        assert!(!set.claim(&conn, &entry("a", 10)).unwrap());
        assert_eq!(rows(&conn), 2);
    }

    #[test]
    fn the_same_jti_from_another_issuer_is_another_token() {
        let conn = conn();
        let mut set = ReplaySet::default();
        set.begin();
        assert!(set.claim(&conn, &entry("a", 10)).unwrap());
        let other = ReplayEntry {
            issuer: "gitlab-2".into(),
            ..entry("a", 10)
        };
        assert!(set.claim(&conn, &other).unwrap());
        // The length prefix keeps ("ab", "c") apart from ("a", "bc").
        assert_ne!(key("ab", "c"), key("a", "bc"));
    }

    #[test]
    fn rows_written_by_another_process_are_seen_before_the_next_claim() {
        let conn = conn();
        let mut set = ReplaySet::default();
        set.begin();
        assert!(set.claim(&conn, &entry("mine", 10)).unwrap());
        set.commit();
        // Another process appends between two of our transactions.
        conn.execute(
            "INSERT INTO replay (expires_at_ms, issuer, jti) VALUES (10, 'gitlab', 'theirs')",
            [],
        )
        .unwrap();
        set.begin();
        assert!(!set.claim(&conn, &entry("theirs", 10)).unwrap());
        assert!(!set.claim(&conn, &entry("mine", 10)).unwrap());
    }

    #[test]
    fn a_rolled_back_claim_is_forgotten() {
        let conn = conn();
        let mut set = ReplaySet::default();
        set.begin();
        conn.execute_batch("BEGIN").unwrap();
        assert!(set.claim(&conn, &entry("a", 10)).unwrap());
        conn.execute_batch("ROLLBACK").unwrap();
        set.rollback();
        set.begin();
        assert!(set.claim(&conn, &entry("a", 10)).unwrap());
        assert_eq!(rows(&conn), 1);
    }

    #[test]
    fn pruning_drops_expired_entries_but_keeps_the_newest_row() {
        let conn = conn();
        let mut set = ReplaySet::default();
        set.begin();
        for (jti, exp) in [("a", 100), ("b", 300), ("c", 200)] {
            assert!(set.claim(&conn, &entry(jti, exp)).unwrap());
        }
        set.commit();
        assert_eq!(set.prune(&conn, 250).unwrap(), 1, "a; c is the newest row");
        assert_eq!(set.len(), 1, "only b is live");
        assert_eq!(rows(&conn), 2);
        // A later row makes c prunable, and seq keeps rising past it.
        set.begin();
        assert!(set.claim(&conn, &entry("d", 400)).unwrap());
        set.commit();
        assert_eq!(set.prune(&conn, 250).unwrap(), 1);
        let max: i64 = conn
            .query_row("SELECT MAX(seq) FROM replay", [], |r| r.get(0))
            .unwrap();
        assert_eq!(max, 4);
    }

    #[test]
    fn a_new_process_loads_what_earlier_ones_consumed() {
        let conn = conn();
        let mut first = ReplaySet::default();
        first.begin();
        assert!(first.claim(&conn, &entry("a", 10)).unwrap());
        first.commit();
        let mut second = ReplaySet::default();
        second.begin();
        assert!(!second.claim(&conn, &entry("a", 10)).unwrap());
        assert!(second.claim(&conn, &entry("b", 10)).unwrap());
    }
}
