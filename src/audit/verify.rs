//! `cistern audit verify`: walk the chain in order, re-hash every record,
//! check every link and every signed checkpoint, and name the first record
//! that is wrong. Streaming: memory stays flat whatever the log's size
//! (checkpoints, a few per minute of traffic, are the only thing held).

use std::collections::BTreeMap;
use std::fmt;
use std::io::BufRead;
use std::path::Path;

use rusqlite::Connection;

use super::chain::{ChainFields, GENESIS, hash_from_slice, record_hash};
use super::prune::PrunedDetail;
use super::record::{
    CHECKPOINT_TYP, CheckpointLine, CheckpointPayload, CheckpointWrapper, RecordLineIn,
};
use crate::mint::{JwsError, PublishedKeys};
use crate::store::AuditKind;

/// The first thing found wrong. Each names a record (by `seq`) or, for a
/// rewritten span, the checkpoint that exposes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Record `seq` is absent: the log jumps from `seq - 1` to `found`.
    Deleted {
        /// The first missing sequence number.
        seq: i64,
        /// The next record present.
        found: i64,
    },
    /// Record `seq` does not link to the record before it: records were
    /// deleted, inserted or reordered here (sequence numbers rewritten).
    BrokenLink {
        /// The record whose `prev_hash` is wrong.
        seq: i64,
    },
    /// Record `seq` no longer matches its own hash: it was modified.
    Modified {
        /// The modified record.
        seq: i64,
    },
    /// Record `seq` comes after a higher sequence number (a file only).
    OutOfOrder {
        /// The record out of place.
        seq: i64,
        /// The sequence number it follows.
        after: i64,
    },
    /// Record `seq` carries no hash at all.
    Unsealed {
        /// The record.
        seq: i64,
    },
    /// The chain at `seq` differs from what the checkpoint signed: the
    /// span after `since` (the previous checkpoint that matched, or the
    /// start) was rewritten, hashes and all.
    Rewritten {
        /// The checkpoint's sequence number.
        seq: i64,
        /// The last checkpoint that matched, if any.
        since: Option<i64>,
    },
    /// A checkpoint's signature or payload is wrong.
    BadCheckpoint {
        /// The checkpoint's sequence number.
        seq: i64,
        /// Why.
        why: String,
    },
    /// A signed checkpoint covers records the log no longer has: the tail
    /// after `last` was cut off.
    Truncated {
        /// The last record present (`None` for an empty log).
        last: Option<i64>,
        /// The highest signed checkpoint.
        checkpoint: i64,
    },
    /// The log starts after seq 1 and no `audit_pruned` record in it,
    /// covered by a checkpoint, vouches for the records before: they were
    /// deleted, not pruned.
    PrefixDeleted {
        /// The first record present.
        first: i64,
    },
    /// A line or row could not be read as a record.
    Malformed {
        /// Where (`line 12`, `seq 7`).
        at: String,
        /// What is wrong.
        why: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Deleted { seq, found } => write!(
                f,
                "first bad record: seq {seq}: deleted (the log jumps from {} to {found})",
                seq - 1
            ),
            Problem::BrokenLink { seq } => write!(
                f,
                "first bad record: seq {seq}: does not link to seq {} (records deleted, inserted or reordered here)",
                seq - 1
            ),
            Problem::Modified { seq } => write!(
                f,
                "first bad record: seq {seq}: modified (its content no longer matches its hash)"
            ),
            Problem::OutOfOrder { seq, after } => {
                write!(
                    f,
                    "first bad record: seq {seq}: out of order (after seq {after})"
                )
            }
            Problem::Unsealed { seq } => write!(f, "first bad record: seq {seq}: has no hash"),
            Problem::Rewritten { seq, since } => match since {
                Some(s) => write!(
                    f,
                    "records {}..={seq} were rewritten: seq {seq} differs from its signed checkpoint (the checkpoint at seq {s} still matches)",
                    s + 1
                ),
                None => write!(
                    f,
                    "records up to seq {seq} were rewritten: seq {seq} differs from its signed checkpoint"
                ),
            },
            Problem::BadCheckpoint { seq, why } => write!(f, "checkpoint at seq {seq}: {why}"),
            Problem::Truncated { last, checkpoint } => match last {
                Some(l) => write!(
                    f,
                    "truncated: a checkpoint signed seq {checkpoint} but the log ends at seq {l}; first bad record: seq {} (missing)",
                    l + 1
                ),
                None => write!(
                    f,
                    "truncated: a checkpoint signed seq {checkpoint} but the log is empty"
                ),
            },
            Problem::PrefixDeleted { first } => write!(
                f,
                "first bad record: seq 1: deleted (the log starts at seq {first} and no audit_pruned record in it, under a signed checkpoint, covers the records before)"
            ),
            Problem::Malformed { at, why } => write!(f, "{at}: unreadable record: {why}"),
        }
    }
}

/// What was checked.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// Records whose hash and link were checked.
    pub records: u64,
    /// First sequence number seen.
    pub first_seq: Option<i64>,
    /// Last sequence number that verified.
    pub last_seq: Option<i64>,
    /// Hex hash of the last record that verified.
    pub head: Option<String>,
    /// Checkpoints whose hash matched and whose signature verified.
    pub checkpoints_verified: u64,
    /// Older checkpoints signed by a key no longer held (their hash still
    /// matched; the newest checkpoint vouches for everything before it).
    pub checkpoints_unverifiable: u64,
    /// Whether signatures were checked at all (keys available).
    pub signatures_checked: bool,
    /// The newest checkpoint's sequence number.
    pub newest_checkpoint: Option<i64>,
    /// Records after the newest checkpoint: protected by the chain only
    /// until the next checkpoint (a cut there is not detectable).
    pub uncovered: u64,
    /// The log's older records through this seq were pruned (archived by
    /// `cistern audit prune`), as an `audit_pruned` record in it says.
    pub pruned_through: Option<i64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.first_seq, self.last_seq) {
            (Some(a), Some(b)) => write!(f, "{} records (seq {a}..={b})", self.records)?,
            _ => write!(f, "{} records", self.records)?,
        }
        write!(f, ", {} checkpoints verified", self.checkpoints_verified)?;
        if !self.signatures_checked {
            write!(f, " (signatures NOT checked: no keys)")?;
        }
        if self.checkpoints_unverifiable > 0 {
            write!(
                f,
                ", {} older checkpoints signed by keys no longer held",
                self.checkpoints_unverifiable
            )?;
        }
        if let Some(n) = self.newest_checkpoint {
            write!(f, "; newest checkpoint at seq {n}")?;
        }
        if self.uncovered > 0 {
            write!(f, "; {} records after it", self.uncovered)?;
        }
        if let Some(p) = self.pruned_through {
            write!(f, "; records through seq {p} pruned (archived)")?;
        }
        if let Some(h) = &self.head {
            write!(f, "; head {h}")?;
        }
        Ok(())
    }
}

/// The outcome: what verified, and the first problem if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// What was checked before stopping.
    pub report: Report,
    /// `None` when the whole log verified.
    pub problem: Option<Problem>,
}

/// A checkpoint to check against the chain.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Sequence number covered.
    pub seq: i64,
    /// Hash of record `seq`, as the checkpoint row states it.
    pub hash: [u8; 32],
    /// Compact JWS over the payload.
    pub jws: String,
}

/// Why verification could not run at all (as opposed to finding a problem).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The database could not be read.
    #[error("reading the audit log: {0}")]
    Database(#[from] rusqlite::Error),
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Where the chain must start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At seq 1 from the genesis hash (the whole log, in the store), or
    /// after the records an `audit_pruned` record in the log says were
    /// pruned.
    Genesis,
    /// Wherever the first record is, trusting its `prev_hash` (an export or
    /// a sink file whose older part was rotated away).
    Anywhere,
}

/// One record to check.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    /// Its hashed fields.
    pub fields: ChainFields<'a>,
    /// Stored previous hash.
    pub prev_hash: Option<&'a [u8]>,
    /// Stored hash.
    pub hash: Option<&'a [u8]>,
}

/// The streaming verifier: feed rows in order, then [`Verifier::finish`].
pub struct Verifier<'k> {
    checkpoints: BTreeMap<i64, Checkpoint>,
    keys: Option<&'k PublishedKeys>,
    issuer: Option<String>,
    start: Start,
    next_seq: Option<i64>,
    running: [u8; 32],
    last_good_checkpoint: Option<i64>,
    /// A store log that starts after seq 1: its first seq and `prev_hash`,
    /// trusted only once an `audit_pruned` record vouches for them.
    unvouched_start: Option<(i64, [u8; 32])>,
    /// The `audit_pruned` record (its seq, its cut) that vouches for the
    /// start, waiting for a checkpoint to cover it.
    pending_vouch: Option<(i64, i64)>,
    report: Report,
}

impl<'k> Verifier<'k> {
    /// A verifier over `checkpoints`. With `keys`, every checkpoint's
    /// signature is checked (and `issuer`, when given, must be the one it
    /// names); without, only their hashes.
    pub fn new(
        checkpoints: impl IntoIterator<Item = Checkpoint>,
        keys: Option<&'k PublishedKeys>,
        issuer: Option<String>,
        start: Start,
    ) -> Self {
        let checkpoints: BTreeMap<i64, Checkpoint> =
            checkpoints.into_iter().map(|c| (c.seq, c)).collect();
        let report = Report {
            signatures_checked: keys.is_some(),
            newest_checkpoint: checkpoints.keys().next_back().copied(),
            ..Report::default()
        };
        Verifier {
            checkpoints,
            keys,
            issuer,
            start,
            next_seq: None,
            running: GENESIS,
            last_good_checkpoint: None,
            unvouched_start: None,
            pending_vouch: None,
            report,
        }
    }

    /// Checks one record, the next in order.
    pub fn feed(&mut self, row: &Row<'_>) -> Result<(), Problem> {
        let seq = row.fields.seq;
        let (Some(prev), Some(hash)) = (row.prev_hash, row.hash) else {
            return Err(Problem::Unsealed { seq });
        };
        let (Some(prev), Some(hash)) = (hash_from_slice(prev), hash_from_slice(hash)) else {
            return Err(Problem::Malformed {
                at: format!("seq {seq}"),
                why: "hash is not 32 bytes".into(),
            });
        };
        match (self.next_seq, self.start) {
            (None, Start::Genesis) if seq != 1 => {
                // A pruned log; `finish` refuses it unless vouched for.
                self.unvouched_start = Some((seq, prev));
                self.running = prev;
            }
            (None, Start::Anywhere) => self.running = prev,
            (None, Start::Genesis) => {}
            (Some(n), _) if seq > n => return Err(Problem::Deleted { seq: n, found: seq }),
            (Some(n), _) if seq < n => {
                return Err(Problem::OutOfOrder { seq, after: n - 1 });
            }
            (Some(_), _) => {}
        }
        if prev != self.running {
            return Err(Problem::BrokenLink { seq });
        }
        let computed = record_hash(&self.running, &row.fields);
        if computed != hash {
            return Err(Problem::Modified { seq });
        }
        self.running = computed;
        self.next_seq = Some(seq + 1);
        if row.fields.kind == AuditKind::AuditPruned.as_str() {
            self.note_pruned(seq, row.fields.detail);
        }
        self.report.records += 1;
        self.report.first_seq.get_or_insert(seq);
        self.report.last_seq = Some(seq);
        if self.report.newest_checkpoint.is_some_and(|n| seq > n) {
            self.report.uncovered += 1;
        }
        // Each seq is visited once, so the checkpoint can be taken out.
        if let Some(cp) = self.checkpoints.remove(&seq) {
            self.check_checkpoint(&cp, &computed)?;
        }
        Ok(())
    }

    /// An `audit_pruned` record vouches for a log starting right after its
    /// cut (with the cut's hash as the first `prev_hash`), or anywhere at
    /// or before it: a prune whose deletions are not finished. It counts
    /// only once a checkpoint at or after it holds (see
    /// [`Self::check_checkpoint`]): a record appended after the newest
    /// checkpoint is protected by the chain alone, and anyone who can write
    /// the database could append one.
    fn note_pruned(&mut self, seq: i64, detail: &str) {
        let Some(d) = PrunedDetail::parse(detail) else {
            return;
        };
        let vouches = match self.unvouched_start {
            Some((first, prev)) => {
                d.through_seq >= first
                    || (d.through_seq == first - 1 && d.through_hash == hex::encode(prev))
            }
            None => false,
        };
        if vouches && self.pending_vouch.is_none() {
            self.pending_vouch = Some((seq, d.through_seq));
        }
    }

    fn check_checkpoint(&mut self, cp: &Checkpoint, computed: &[u8; 32]) -> Result<(), Problem> {
        let seq = cp.seq;
        if &cp.hash != computed {
            return Err(Problem::Rewritten {
                seq,
                since: self.last_good_checkpoint,
            });
        }
        let bad = |why: String| Problem::BadCheckpoint { seq, why };
        if let Some(keys) = self.keys {
            match keys.verify_compact(&cp.jws, CHECKPOINT_TYP) {
                Ok((_, payload)) => {
                    let p: CheckpointPayload = serde_json::from_slice(&payload)
                        .map_err(|e| bad(format!("unreadable payload: {e}")))?;
                    if p.seq != seq || p.hash != hex::encode(computed) {
                        return Err(Problem::Rewritten {
                            seq,
                            since: self.last_good_checkpoint,
                        });
                    }
                    if let Some(iss) = &self.issuer
                        && &p.iss != iss
                    {
                        return Err(bad(format!("signed for another issuer ({})", p.iss)));
                    }
                    self.report.checkpoints_verified += 1;
                }
                // Keys are dropped some time after rotation; the newest
                // checkpoint (checked in `finish`) must still verify.
                Err(JwsError::UnknownKey(_)) if self.report.newest_checkpoint != Some(seq) => {
                    self.report.checkpoints_unverifiable += 1;
                }
                Err(e) => return Err(bad(e.to_string())),
            }
        } else {
            self.report.checkpoints_verified += 1;
        }
        self.last_good_checkpoint = Some(seq);
        // A checkpoint at or after the vouching record: the newest
        // checkpoint must verify and reaches it through the chain.
        if let Some((_, through)) = self.pending_vouch.filter(|(at, _)| seq >= *at) {
            self.pending_vouch = None;
            self.unvouched_start = None;
            self.report.pruned_through = Some(through);
        }
        Ok(())
    }

    /// Ends the walk: a checkpoint beyond the last record means truncation.
    pub fn finish(mut self) -> Verdict {
        self.report.head = self.report.last_seq.map(|_| hex::encode(self.running));
        let problem = match (self.unvouched_start, self.report.newest_checkpoint) {
            (Some((first, _)), _) => Some(Problem::PrefixDeleted { first }),
            (None, Some(cp)) if self.report.last_seq.is_none_or(|l| cp > l) => {
                Some(Problem::Truncated {
                    last: self.report.last_seq,
                    checkpoint: cp,
                })
            }
            _ => None,
        };
        Verdict {
            report: self.report,
            problem,
        }
    }

    fn fail(mut self, problem: Problem) -> Verdict {
        self.report.head = None;
        Verdict {
            report: self.report,
            problem: Some(problem),
        }
    }
}

/// Verifies the audit log in the SQLite store at `path` (opened read-only).
pub fn verify_sqlite(
    path: &Path,
    keys: Option<&PublishedKeys>,
    issuer: Option<String>,
) -> Result<Verdict, VerifyError> {
    let conn = super::open_read_only(path)?;
    verify_connection(&conn, keys, issuer)
}

/// [`verify_sqlite`] on an open connection (inside one read transaction,
/// so a running server's appends do not move the end under the walk).
pub fn verify_connection(
    conn: &Connection,
    keys: Option<&PublishedKeys>,
    issuer: Option<String>,
) -> Result<Verdict, VerifyError> {
    conn.execute_batch("BEGIN")?;
    let checkpoints = {
        let mut stmt = conn.prepare("SELECT seq, hash, jws FROM audit_checkpoints ORDER BY seq")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, hash, jws) = row?;
            // A checkpoint row with a bad hash can never match: it fails
            // as a rewrite at its seq.
            let hash = hash_from_slice(&hash).unwrap_or([0xff; 32]);
            out.push(Checkpoint { seq, hash, jws });
        }
        out
    };
    let mut verifier = Verifier::new(checkpoints, keys, issuer, Start::Genesis);
    let mut stmt = conn.prepare(&format!(
        "SELECT {} FROM audit ORDER BY seq",
        super::RECORD_COLUMNS
    ))?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        let outcome = (|| -> Result<Result<(), Problem>, rusqlite::Error> {
            let row = super::stored_row(r)?;
            Ok(verifier.feed(&row))
        })();
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(problem)) => return Ok(verifier.fail(problem)),
            Err(e) => {
                let seq = r
                    .get::<_, i64>(0)
                    .map_or("a row".to_owned(), |s| format!("seq {s}"));
                return Ok(verifier.fail(Problem::Malformed {
                    at: seq,
                    why: e.to_string(),
                }));
            }
        }
    }
    drop(rows);
    drop(stmt);
    conn.execute_batch("COMMIT")?;
    Ok(verifier.finish())
}

/// Verifies JSON Lines files (a sink's output or an unfiltered export),
/// oldest first, as one log. The log may start anywhere (older files
/// rotated away); checkpoints are read in a first pass.
pub fn verify_files(
    paths: &[&Path],
    keys: Option<&PublishedKeys>,
    issuer: Option<String>,
) -> Result<Verdict, VerifyError> {
    let mut checkpoints = Vec::new();
    for_each_line(paths, |_, line| {
        if line.starts_with(CHECKPOINT_PREFIX)
            && let Ok(w) = serde_json::from_str::<CheckpointWrapper>(line)
        {
            checkpoints.push(w.checkpoint);
        }
        Ok(())
    })?;
    let mut first: Option<i64> = None;
    let mut verifier = Verifier::new(
        Vec::<Checkpoint>::new(),
        keys,
        issuer.clone(),
        Start::Anywhere,
    );
    // Checkpoints signed before the first record present are of no use.
    let mut problem = None;
    let mut pending = Some(checkpoints);
    for_each_line(paths, |at, line| {
        if problem.is_some() || line.is_empty() || line.starts_with(CHECKPOINT_PREFIX) {
            return Ok(());
        }
        let rec: RecordLineIn = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => {
                problem = Some(Problem::Malformed {
                    at: at.to_owned(),
                    why: e.to_string(),
                });
                return Ok(());
            }
        };
        if first.is_none() {
            first = Some(rec.seq);
            let cps = pending.take().unwrap_or_default();
            let mut usable = Vec::new();
            for c in cps.into_iter().filter(|c| c.seq >= rec.seq) {
                match hex::decode(&c.hash)
                    .ok()
                    .as_deref()
                    .and_then(hash_from_slice)
                {
                    Some(hash) => usable.push(Checkpoint {
                        seq: c.seq,
                        hash,
                        jws: c.jws,
                    }),
                    None => {
                        problem = Some(Problem::BadCheckpoint {
                            seq: c.seq,
                            why: "hash is not 64 hex digits".into(),
                        });
                        return Ok(());
                    }
                }
            }
            verifier = Verifier::new(usable, keys, issuer.clone(), Start::Anywhere);
        }
        let (Ok(prev), Ok(hash)) = (hex::decode(&rec.prev_hash), hex::decode(&rec.hash)) else {
            problem = Some(Problem::Malformed {
                at: at.to_owned(),
                why: "hash is not hex".into(),
            });
            return Ok(());
        };
        let row = Row {
            fields: ChainFields {
                seq: rec.seq,
                at_ms: rec.at_ms,
                kind: &rec.kind,
                issuer: rec.issuer.as_deref(),
                role: rec.role.as_deref(),
                project_id: rec.project_id.as_deref(),
                reason: rec.reason.as_deref(),
                detail: rec.detail.get(),
            },
            prev_hash: Some(&prev),
            hash: Some(&hash),
        };
        if let Err(p) = verifier.feed(&row) {
            problem = Some(p);
        }
        Ok(())
    })?;
    Ok(match problem {
        Some(p) => verifier.fail(p),
        None => verifier.finish(),
    })
}

const CHECKPOINT_PREFIX: &str = "{\"checkpoint\"";

fn for_each_line(
    paths: &[&Path],
    mut f: impl FnMut(&str, &str) -> Result<(), VerifyError>,
) -> Result<(), VerifyError> {
    for path in paths {
        let io = |source| VerifyError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let mut reader = std::io::BufReader::new(file);
        let mut line = String::new();
        let mut n = 0u64;
        loop {
            line.clear();
            if reader.read_line(&mut line).map_err(io)? == 0 {
                break;
            }
            n += 1;
            f(
                &format!("{}:{n}", path.display()),
                line.trim_end_matches(['\n', '\r']),
            )?;
        }
    }
    Ok(())
}

/// A [`CheckpointLine`] as stored in the `audit_checkpoints` table.
pub fn checkpoint_from_line(line: &CheckpointLine) -> Option<Checkpoint> {
    Some(Checkpoint {
        seq: line.seq,
        hash: hash_from_slice(&hex::decode(&line.hash).ok()?)?,
        jws: line.jws.clone(),
    })
}
