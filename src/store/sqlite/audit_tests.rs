//! The audit chain as the store writes it, checked by the verifier: under
//! concurrency, across processes, with sinks, and after tampering.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::Connection;
use serde_json::json;
use tokio::task::JoinSet;

use super::tests::record;
use super::*;
use crate::audit::checkpoint::checkpoint_now;
use crate::audit::sink::FileSink;
use crate::audit::verify::{Problem, Verdict, verify_files, verify_sqlite};
use crate::clock::SystemClock;
use crate::config::{SigningAlgorithm, SigningConfig};
use crate::mint::{KeyRing, PublishedKeys};
use crate::revoke::{Grain, NewRevocation, RevocationRule};
use crate::store::AuditKind;

const ISSUER: &str = "https://cistern.test";

struct World {
    _dir: tempfile::TempDir,
    db: PathBuf,
    key_dir: PathBuf,
    keys: KeyRing,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let key_dir = dir.path().join("keys");
    let keys = KeyRing::open(
        &SigningConfig {
            key_dir: key_dir.clone(),
            algorithm: SigningAlgorithm::ES256,
            rotation_period: Duration::from_secs(86400),
        },
        Arc::new(SystemClock),
        Duration::from_secs(3600),
    )
    .unwrap();
    World {
        db: dir.path().join("cistern.db"),
        key_dir,
        keys,
        _dir: dir,
    }
}

fn event(n: usize) -> AuditEvent {
    AuditEvent {
        at_ms: 5_000 + n as i64,
        kind: AuditKind::ExchangeDenied,
        issuer: Some("gitlab".into()),
        role: None,
        project_id: Some("42".into()),
        reason: Some("binding_mismatch".into()),
        detail: json!({ "n": n }).into(),
    }
}

fn revocation(n: usize) -> NewRevocation {
    NewRevocation {
        rule: RevocationRule {
            id: 0,
            grain: Grain::Jti,
            value: format!("at-{n}"),
            issuer: String::new(),
            issued_before_ms: i64::MAX,
        },
        requested_at_ms: 7_000 + n as i64,
        actor: "test".into(),
        reason: "test".into(),
        source: "cli_direct".into(),
    }
}

fn verify(w: &World, db: &Path) -> Verdict {
    let keys = PublishedKeys::load(&w.key_dir).unwrap();
    verify_sqlite(db, Some(&keys), Some(ISSUER.into())).unwrap()
}

fn ok(v: &Verdict) {
    assert_eq!(v.problem, None, "{:?}", v.report);
}

/// Fills a store with `n` exchanges, checkpointing every 10, and closes it.
async fn filled(w: &World, n: usize) {
    let store = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
    for i in 0..n {
        store.commit_exchange(record(i)).await.unwrap();
        if i % 10 == 9 {
            checkpoint_now(&store, &w.keys, &SystemClock, ISSUER)
                .await
                .unwrap();
        }
    }
    store.close().await;
}

/// A copy of the database with `sql` run on it.
fn tampered(w: &World, name: &str, sql: &str) -> PathBuf {
    let (p, c) = copy(w, name);
    c.execute_batch(sql).unwrap();
    p
}

/// A copy of the database to tamper with.
fn copy(w: &World, name: &str) -> (PathBuf, Connection) {
    let path = w.db.with_file_name(name);
    std::fs::copy(&w.db, &path).unwrap();
    // Committed pages may still be in the WAL (readers keep it open).
    let wal = schema::companion_path(&w.db, "-wal");
    if wal.exists() {
        std::fs::copy(&wal, schema::companion_path(&path, "-wal")).unwrap();
    }
    let conn = Connection::open(&path).unwrap();
    (path, conn)
}

#[tokio::test]
async fn concurrent_exchanges_audits_and_revocations_never_fork_the_chain() {
    let w = world();
    let store = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
    let mut tasks = JoinSet::new();
    for t in 0..8 {
        let store = store.clone();
        tasks.spawn(async move {
            for i in 0..100 {
                let n = t * 1000 + i;
                match i % 3 {
                    0 => store.commit_exchange(record(n)).await.unwrap(),
                    1 => store.append_audit(event(n)).await.unwrap(),
                    _ => drop(store.record_revocation(revocation(n)).await.unwrap()),
                }
            }
        });
    }
    // A second store on the same file stands for `cistern revoke --direct`
    // in another process: its own writer, its own connection.
    let other = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
    for n in 0..50 {
        other.append_audit(event(90_000 + n)).await.unwrap();
    }
    tasks.join_all().await;
    other.close().await;
    checkpoint_now(&store, &w.keys, &SystemClock, ISSUER)
        .await
        .unwrap()
        .unwrap();
    store.close().await;
    let v = verify(&w, &w.db);
    ok(&v);
    assert_eq!(v.report.records, 8 * 100 + 50);
    assert_eq!(v.report.checkpoints_verified, 1);
    assert_eq!(v.report.uncovered, 0);
}

#[tokio::test]
async fn a_batch_of_records_is_appended_in_order_on_one_chain() {
    let w = world();
    let store = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
    store.append_audit(event(0)).await.unwrap();
    store
        .append_audits((1..=300).map(event).collect())
        .await
        .unwrap();
    store.append_audits(Vec::new()).await.unwrap();
    store.append_audit(event(301)).await.unwrap();
    store.close().await;
    let v = verify(&w, &w.db);
    ok(&v);
    assert_eq!(v.report.records, 302);
    let conn = Connection::open(&w.db).unwrap();
    let at: Vec<i64> = conn
        .prepare("SELECT at_ms FROM audit ORDER BY seq")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(at, (0..=301).map(|n| 5_000 + n).collect::<Vec<i64>>());
}

#[tokio::test]
async fn a_checkpoint_is_written_only_for_new_records() {
    let w = world();
    let store = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
    assert!(
        checkpoint_now(&store, &w.keys, &SystemClock, ISSUER)
            .await
            .unwrap()
            .is_none()
    );
    store.append_audit(event(1)).await.unwrap();
    let c = checkpoint_now(&store, &w.keys, &SystemClock, ISSUER)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.seq, 1);
    assert!(
        checkpoint_now(&store, &w.keys, &SystemClock, ISSUER)
            .await
            .unwrap()
            .is_none()
    );
    // A checkpoint naming a hash the store does not hold is refused.
    let mut forged = c.clone();
    forged.hash = "00".repeat(32);
    assert!(store.append_checkpoint(forged).await.is_err());
    store.close().await;
}

#[tokio::test]
async fn tampering_is_caught_and_the_first_bad_record_named() {
    let w = world();
    filled(&w, 30).await;
    ok(&verify(&w, &w.db));

    // Modified: a field changed in place.
    let p = tampered(
        &w,
        "modified.db",
        "UPDATE audit SET project_id = '43' WHERE seq = 12",
    );
    assert_eq!(verify(&w, &p).problem, Some(Problem::Modified { seq: 12 }));

    // Modified detail text (a claim changed inside the JSON).
    let p = tampered(
        &w,
        "detail.db",
        "UPDATE audit SET detail = replace(detail, '\"n\":5', '\"n\":6') WHERE seq = 6",
    );
    assert_eq!(verify(&w, &p).problem, Some(Problem::Modified { seq: 6 }));

    // Deleted: one record removed.
    let p = tampered(&w, "deleted.db", "DELETE FROM audit WHERE seq = 17");
    assert_eq!(
        verify(&w, &p).problem,
        Some(Problem::Deleted { seq: 17, found: 18 })
    );

    // Reordered: two records swap places (sequence numbers swapped).
    let p = tampered(
        &w,
        "reordered.db",
        "UPDATE audit SET seq = -1 WHERE seq = 21;
         UPDATE audit SET seq = 21 WHERE seq = 22;
         UPDATE audit SET seq = 22 WHERE seq = -1;",
    );
    assert_eq!(
        verify(&w, &p).problem,
        Some(Problem::BrokenLink { seq: 21 })
    );

    // Deleted and renumbered to hide the gap.
    let p = tampered(
        &w,
        "renumbered.db",
        "DELETE FROM audit WHERE seq = 9; UPDATE audit SET seq = seq - 1 WHERE seq > 9;",
    );
    assert_eq!(verify(&w, &p).problem, Some(Problem::BrokenLink { seq: 9 }));

    // Truncated: the tail cut off below the newest checkpoint (seq 30).
    let p = tampered(&w, "truncated.db", "DELETE FROM audit WHERE seq > 25");
    assert_eq!(
        verify(&w, &p).problem,
        Some(Problem::Truncated {
            last: Some(25),
            checkpoint: 30
        })
    );

    // The first record deleted.
    let p = tampered(&w, "head.db", "DELETE FROM audit WHERE seq = 1");
    assert_eq!(
        verify(&w, &p).problem,
        Some(Problem::PrefixDeleted { first: 2 })
    );
}

#[tokio::test]
async fn a_chain_rewritten_with_fresh_hashes_is_caught_by_the_signed_checkpoints() {
    let w = world();
    filled(&w, 30).await;
    let (p, c) = copy(&w, "rewritten.db");
    // The attacker edits record 14 and recomputes every hash after it
    // (everything but the signing key is in the database).
    c.execute("UPDATE audit SET reason = 'edited' WHERE seq = 14", [])
        .unwrap();
    let rows: Vec<crate::audit::chain::OwnedFields> = c
        .prepare(&format!(
            "{} WHERE seq >= 14 ORDER BY seq",
            writer::SELECT_FIELDS
        ))
        .unwrap()
        .query_map([], writer::owned_fields)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut prev: [u8; 32] = c
        .query_row("SELECT hash FROM audit WHERE seq = 13", [], |r| {
            r.get::<_, Vec<u8>>(0)
        })
        .unwrap()
        .try_into()
        .unwrap();
    for f in &rows {
        let h = crate::audit::chain::record_hash(&prev, &f.borrow());
        c.execute(
            "UPDATE audit SET prev_hash = ?2, hash = ?3 WHERE seq = ?1",
            rusqlite::params![f.seq, &prev[..], &h[..]],
        )
        .unwrap();
        prev = h;
    }
    drop(c);
    // The chain itself links; the checkpoint at 20 (signed before the edit)
    // does not match, and the one at 10 still does.
    assert_eq!(
        verify(&w, &p).problem,
        Some(Problem::Rewritten {
            seq: 20,
            since: Some(10)
        })
    );

    // Rewriting the checkpoint rows too needs the signing key: a checkpoint
    // whose hash is edited no longer matches its signature.
    let c = Connection::open(&p).unwrap();
    let hashes: Vec<(i64, Vec<u8>)> = c
        .prepare("SELECT seq, hash FROM audit WHERE seq IN (20, 30)")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (seq, hash) in hashes {
        c.execute(
            "UPDATE audit_checkpoints SET hash = ?2 WHERE seq = ?1",
            rusqlite::params![seq, hash],
        )
        .unwrap();
    }
    drop(c);
    assert_eq!(
        verify(&w, &p).problem,
        Some(Problem::Rewritten {
            seq: 20,
            since: Some(10)
        }),
        "the signed payload still names the original hash"
    );

    // A checkpoint signed by some other key is refused.
    let other = world();
    let c = Connection::open(&p).unwrap();
    let head = crate::store::AuditHead {
        seq: 30,
        hash: prev,
    };
    let forged = crate::audit::checkpoint::sign(&other.keys, ISSUER, &head, 1).unwrap();
    c.execute(
        "UPDATE audit_checkpoints SET jws = ?1, kid = ?2 WHERE seq = 30",
        rusqlite::params![forged.jws, forged.kid],
    )
    .unwrap();
    c.execute("DELETE FROM audit_checkpoints WHERE seq < 30", [])
        .unwrap();
    drop(c);
    let v = verify(&w, &p);
    assert!(
        matches!(v.problem, Some(Problem::BadCheckpoint { seq: 30, .. })),
        "{:?}",
        v.problem
    );
}

#[tokio::test]
async fn records_from_before_the_chain_are_sealed_at_open() {
    let w = world();
    filled(&w, 3).await;
    // Rows as a schema-3 build wrote them: no hashes.
    let c = Connection::open(&w.db).unwrap();
    c.execute_batch(
        "DELETE FROM audit_checkpoints;
         UPDATE audit SET prev_hash = NULL, hash = NULL;",
    )
    .unwrap();
    drop(c);
    assert_eq!(
        verify(&w, &w.db).problem,
        Some(Problem::Unsealed { seq: 1 })
    );
    let store = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
    store.append_audit(event(9)).await.unwrap();
    store.close().await;
    let v = verify(&w, &w.db);
    ok(&v);
    assert_eq!(v.report.records, 4);
}

#[tokio::test]
async fn a_file_sink_holds_a_copy_that_verifies_on_its_own() {
    let w = world();
    let sink_path = w.db.with_file_name("audit.jsonl");
    let sink = FileSink::open(&sink_path, 1 << 20, 3).unwrap();
    let store =
        SqliteStore::open_with_sinks(&w.db, Synchronous::Normal, vec![Box::new(sink)], true)
            .unwrap();
    for i in 0..20 {
        store.commit_exchange(record(i)).await.unwrap();
        store.append_audit(event(i)).await.unwrap();
    }
    checkpoint_now(&store, &w.keys, &SystemClock, ISSUER)
        .await
        .unwrap()
        .unwrap();
    store.close().await;
    let keys = PublishedKeys::load(&w.key_dir).unwrap();
    let v = verify_files(&[&sink_path], Some(&keys), Some(ISSUER.into())).unwrap();
    assert_eq!(v.problem, None);
    assert_eq!(v.report.records, 40);
    assert_eq!(v.report.checkpoints_verified, 1);
    // The sink's copy is the store's: same head.
    assert_eq!(v.report.head, verify(&w, &w.db).report.head);

    // A line edited in the copy is caught there too.
    let text = std::fs::read_to_string(&sink_path).unwrap();
    let edited = text.replacen("\"project_id\":\"42\"", "\"project_id\":\"43\"", 1);
    std::fs::write(&sink_path, edited).unwrap();
    let v = verify_files(&[&sink_path], Some(&keys), None).unwrap();
    assert_eq!(v.problem, Some(Problem::Modified { seq: 1 }));
}

#[tokio::test]
async fn a_file_sink_gets_what_was_written_while_it_was_not_fed_once_and_in_order() {
    let w = world();
    let sink_path = w.db.with_file_name("audit.jsonl");
    let with_sink = || {
        let sink = FileSink::open(&sink_path, 1 << 20, 3).unwrap();
        SqliteStore::open_with_sinks(&w.db, Synchronous::Normal, vec![Box::new(sink)], true)
            .unwrap()
    };
    let store = with_sink();
    for i in 0..5 {
        store.commit_exchange(record(i)).await.unwrap();
    }
    store.close().await;
    // The sink lost its last line and a half: a crash in the middle of a
    // write, after the store committed.
    let text = std::fs::read_to_string(&sink_path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5);
    let kept = format!(
        "{}\n{}",
        lines[..3].join("\n"),
        &lines[3][..lines[3].len() / 2]
    );
    std::fs::write(&sink_path, kept).unwrap();
    // Another process writes while no server feeds the sink.
    let cli = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
    for i in 0..3 {
        cli.append_audit(event(i)).await.unwrap();
    }
    cli.close().await;

    let store = with_sink();
    store.append_audit(event(9)).await.unwrap();
    store.close().await;
    let keys = PublishedKeys::load(&w.key_dir).unwrap();
    let v = verify_files(&[&sink_path], Some(&keys), None).unwrap();
    assert_eq!(v.problem, None);
    assert_eq!(
        v.report.records, 9,
        "1–5, the three written without it, and the new one"
    );
    assert_eq!(v.report.head, verify(&w, &w.db).report.head);
}

#[tokio::test]
async fn fail_closed_refuses_when_a_sink_cannot_write_and_fail_open_answers() {
    for fail_closed in [true, false] {
        let w = world();
        let sink = FileSink::open(Path::new("/dev/full"), 1 << 20, 1).unwrap();
        let store = SqliteStore::open_with_sinks(
            &w.db,
            Synchronous::Normal,
            vec![Box::new(sink)],
            fail_closed,
        )
        .unwrap();
        let outcome = store.commit_exchange(record(1)).await;
        assert_eq!(outcome.is_err(), fail_closed, "fail_closed = {fail_closed}");
        if let Err(e) = outcome {
            assert!(
                e.to_string()
                    .contains("audit record could not be written durably"),
                "{e}"
            );
        }
        assert_eq!(store.stats().sink_failures, 1);
        store.close().await;
        // Either way the store's own chain holds the record and verifies.
        ok(&verify(&w, &w.db));
    }
}

#[tokio::test]
async fn every_expired_credential_gets_one_credential_expired_record() {
    let w = world();
    let store = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
    // `record(n)` expires at 1_600_000 + n; two share an expiry (a tie the
    // watermark must not skip).
    for n in 0..8 {
        store.commit_exchange(record(n)).await.unwrap();
    }
    let mut twin = record(100);
    twin.token.expires_at_ms = 1_600_003;
    store.commit_exchange(twin).await.unwrap();

    let now = 1_600_005;
    let mut swept = Vec::new();
    loop {
        let n = store.sweep_expired(now, 2).await.unwrap();
        swept.push(n);
        if n < 2 {
            break;
        }
    }
    // Expired by `now`: n = 0..=5 plus the twin = 7 credentials.
    assert_eq!(swept.iter().sum::<u64>(), 7, "{swept:?}");
    assert_eq!(
        store.sweep_expired(now, 100).await.unwrap(),
        0,
        "never twice"
    );
    assert_eq!(store.sweep_expired(1_600_010, 100).await.unwrap(), 2);
    store.close().await;

    let c = Connection::open(&w.db).unwrap();
    let jtis: Vec<String> = c
        .prepare(
            "SELECT json_extract(detail, '$.jti') FROM audit
             WHERE kind = 'credential_expired' ORDER BY seq",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        jtis,
        [
            "at-0", "at-1", "at-2", "at-100", "at-3", "at-4", "at-5", "at-6", "at-7"
        ]
    );
    drop(c);
    ok(&verify(&w, &w.db));
}

mod prune {
    use super::*;
    use crate::audit::prune::{
        PruneError, PruneRequest, PrunedDetail, Signing, finish_pending, prune,
    };

    fn signing(w: &World) -> Signing<'_> {
        Signing {
            signer: &w.keys,
            issuer: ISSUER,
            clock: &SystemClock,
        }
    }

    fn request<'a>(w: &'a World, keys: &'a PublishedKeys, archive: &'a Path) -> PruneRequest<'a> {
        PruneRequest {
            db: &w.db,
            // 2096: after every record here.
            before_ms: 4_000_000_000_000,
            archive,
            keys: Some(keys),
            signing: signing(w),
        }
    }

    /// An `audit_pruned` record, written by hand (as an attacker could).
    fn pruned_event(detail: &PrunedDetail) -> AuditEvent {
        AuditEvent {
            at_ms: 9_000_000,
            kind: AuditKind::AuditPruned,
            issuer: None,
            role: None,
            project_id: None,
            reason: None,
            detail: crate::store::AuditDetail::from_serialize(detail),
        }
    }

    fn count(db: &Path, sql: &str) -> i64 {
        Connection::open(db)
            .unwrap()
            .query_row(sql, [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn the_oldest_records_are_archived_then_deleted_and_both_logs_verify() {
        let w = world();
        filled(&w, 95).await;
        let keys = PublishedKeys::load(&w.key_dir).unwrap();
        let archive = w.db.with_file_name("archive-1.jsonl");
        let store = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
        let out = prune(&store, &request(&w, &keys, &archive))
            .await
            .unwrap()
            .unwrap();
        // The newest checkpoint is at seq 90 (one per 10 records).
        assert_eq!(out.detail.through_seq, 90);
        assert_eq!(out.detail.first_seq, 1);
        assert_eq!(out.detail.records, 90);
        assert_eq!(out.detail.checkpoints, 9);
        assert_eq!(out.deleted, 90);
        assert_eq!(out.record_seq, 96);
        store.close().await;

        // The store keeps 91..=96 (96: the audit_pruned record) and no
        // checkpoint at or below the cut.
        assert_eq!(count(&w.db, "SELECT MIN(seq) FROM audit"), 91);
        assert_eq!(count(&w.db, "SELECT COUNT(*) FROM audit"), 6);
        assert_eq!(
            count(
                &w.db,
                "SELECT COUNT(*) FROM audit_checkpoints WHERE seq <= 90"
            ),
            0
        );
        let v = verify(&w, &w.db);
        ok(&v);
        assert_eq!(v.report.first_seq, Some(91));
        assert_eq!(v.report.pruned_through, Some(90));

        // The archive verifies on its own, ends at the cut's hash, and is
        // the file the record names.
        let a = verify_files(&[archive.as_path()], Some(&keys), Some(ISSUER.into())).unwrap();
        ok(&a);
        assert_eq!((a.report.first_seq, a.report.last_seq), (Some(1), Some(90)));
        assert_eq!(
            a.report.head.as_deref(),
            Some(out.detail.through_hash.as_str())
        );
        let bytes = std::fs::read(&archive).unwrap();
        assert_eq!(out.detail.archive.bytes, bytes.len() as u64);
        assert_eq!(
            out.detail.archive.sha256,
            hex::encode(aws_lc_rs::digest::digest(
                &aws_lc_rs::digest::SHA256,
                &bytes
            ))
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&archive).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        // A second prune, later: the first audit_pruned record goes with the
        // records it covered, the new one vouches for the new start.
        let store = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
        for i in 100..125 {
            store.commit_exchange(record(i)).await.unwrap();
            if i % 10 == 9 {
                checkpoint_now(&store, &w.keys, &SystemClock, ISSUER)
                    .await
                    .unwrap();
            }
        }
        let archive2 = w.db.with_file_name("archive-2.jsonl");
        let out2 = prune(&store, &request(&w, &keys, &archive2))
            .await
            .unwrap()
            .unwrap();
        store.close().await;
        assert_eq!(out2.detail.first_seq, 91);
        assert!(out2.detail.through_seq > 96, "{:?}", out2.detail);
        let v = verify(&w, &w.db);
        ok(&v);
        assert_eq!(v.report.first_seq, Some(out2.detail.through_seq + 1));
        ok(&verify_files(&[archive2.as_path()], Some(&keys), Some(ISSUER.into())).unwrap());
        // Both archives and the store are one log, oldest first.
        ok(&verify_files(
            &[archive.as_path(), archive2.as_path()],
            Some(&keys),
            Some(ISSUER.into()),
        )
        .unwrap());
    }

    #[tokio::test]
    async fn deleting_past_the_cut_or_without_a_prune_is_caught() {
        let w = world();
        filled(&w, 45).await;
        // No prune at all: the head deleted.
        let p = tampered(&w, "no-prune.db", "DELETE FROM audit WHERE seq <= 10");
        assert_eq!(
            verify(&w, &p).problem,
            Some(Problem::PrefixDeleted { first: 11 })
        );

        let keys = PublishedKeys::load(&w.key_dir).unwrap();
        let archive = w.db.with_file_name("a.jsonl");
        let store = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
        let out = prune(&store, &request(&w, &keys, &archive))
            .await
            .unwrap()
            .unwrap();
        store.close().await;
        assert_eq!(out.detail.through_seq, 40);
        ok(&verify(&w, &w.db));
        // One record more than the prune covered.
        let p = tampered(&w, "past-the-cut.db", "DELETE FROM audit WHERE seq = 41");
        assert_eq!(
            verify(&w, &p).problem,
            Some(Problem::PrefixDeleted { first: 42 })
        );
        // An audit_pruned record edited to cover more breaks the chain.
        let p = tampered(
            &w,
            "edited.db",
            "UPDATE audit SET detail = replace(detail, '\"through_seq\":40', '\"through_seq\":41') WHERE kind = 'audit_pruned'; DELETE FROM audit WHERE seq = 41",
        );
        assert!(verify(&w, &p).problem.is_some());
    }

    #[tokio::test]
    async fn a_vouching_record_appended_after_the_newest_checkpoint_counts_for_nothing() {
        // Someone who can write the database but holds no signing key
        // appends an audit_pruned record naming seq 20 (the chain is only
        // SHA-256: they can compute it) and deletes the head.
        let w = world();
        filled(&w, 30).await;
        let hash20: Vec<u8> = Connection::open(&w.db)
            .unwrap()
            .query_row("SELECT hash FROM audit WHERE seq = 20", [], |r| r.get(0))
            .unwrap();
        let forged = PrunedDetail {
            through_seq: 20,
            through_hash: hex::encode(hash20),
            first_seq: 1,
            records: 20,
            checkpoints: 2,
            before: "2020-01-01T00:00:00.000Z".into(),
            archive: crate::audit::prune::ArchiveRef {
                file: "gone.jsonl".into(),
                sha256: "00".repeat(32),
                bytes: 0,
            },
        };
        let store = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
        store.append_audit(pruned_event(&forged)).await.unwrap();
        store.close().await;
        let p = tampered(
            &w,
            "forged-prune.db",
            "DELETE FROM audit WHERE seq <= 20; DELETE FROM audit_checkpoints WHERE seq <= 20",
        );
        assert_eq!(
            verify(&w, &p).problem,
            Some(Problem::PrefixDeleted { first: 21 })
        );
        // Once a signed checkpoint covers it (as `audit prune` writes one),
        // the same record vouches.
        let store = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
        checkpoint_now(&store, &w.keys, &SystemClock, ISSUER)
            .await
            .unwrap();
        store.close().await;
        let p = tampered(&w, "covered-prune.db", "DELETE FROM audit WHERE seq <= 20");
        let v = verify(&w, &p);
        ok(&v);
        assert_eq!(v.report.pruned_through, Some(20));
    }

    #[tokio::test]
    async fn the_store_deletes_only_what_an_audit_pruned_record_vouches_for() {
        let w = world();
        filled(&w, 30).await;
        let store = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
        // Record 5 is an exchange, not a prune; record 40 does not exist.
        for vouched_by in [5, 40] {
            let e = store.prune_audit(20, vouched_by, 100).await.unwrap_err();
            assert!(matches!(e, StoreError::Refused(_)), "{e}");
        }
        // An audit_pruned record naming another cut.
        let detail = PrunedDetail {
            through_seq: 10,
            through_hash: "00".repeat(32),
            first_seq: 1,
            records: 10,
            checkpoints: 1,
            before: "1970-01-01T00:00:00.000Z".into(),
            archive: crate::audit::prune::ArchiveRef {
                file: "x".into(),
                sha256: "00".repeat(32),
                bytes: 0,
            },
        };
        store.append_audit(pruned_event(&detail)).await.unwrap();
        let e = store.prune_audit(20, 31, 100).await.unwrap_err();
        assert!(matches!(e, StoreError::Refused(_)), "{e}");
        assert_eq!(count(&w.db, "SELECT COUNT(*) FROM audit"), 31);
        // The batch it ran in was not failed for it: the writer goes on.
        store.commit_exchange(record(99)).await.unwrap();
        // Interrupted half-way (20 of the 30 records it vouches for went):
        // the store still verifies, and finishing deletes the rest.
        let full = PrunedDetail {
            through_seq: 30,
            through_hash: hex::encode(
                Connection::open(&w.db)
                    .unwrap()
                    .query_row("SELECT hash FROM audit WHERE seq = 30", [], |r| {
                        r.get::<_, Vec<u8>>(0)
                    })
                    .unwrap(),
            ),
            ..detail
        };
        store.append_audit(pruned_event(&full)).await.unwrap();
        // Not before a signed checkpoint covers the record.
        let e = store.prune_audit(30, 33, 20).await.unwrap_err();
        assert!(matches!(e, StoreError::Refused(_)), "{e}");
        checkpoint_now(&store, &w.keys, &SystemClock, ISSUER)
            .await
            .unwrap();
        assert_eq!(store.prune_audit(30, 33, 20).await.unwrap(), 20);
        let v = verify(&w, &w.db);
        ok(&v);
        assert_eq!(v.report.first_seq, Some(21));
        assert_eq!(
            finish_pending(&store, &w.db, signing(&w)).await.unwrap(),
            10
        );
        assert_eq!(finish_pending(&store, &w.db, signing(&w)).await.unwrap(), 0);
        store.close().await;
        let v = verify(&w, &w.db);
        ok(&v);
        assert_eq!(v.report.first_seq, Some(31));
        assert_eq!(v.report.pruned_through, Some(30));
    }

    #[tokio::test]
    async fn nothing_is_archived_or_deleted_from_a_log_that_does_not_verify() {
        let w = world();
        filled(&w, 30).await;
        let keys = PublishedKeys::load(&w.key_dir).unwrap();
        let archive = w.db.with_file_name("a.jsonl");
        // Nothing older than the cutoff: nothing to do.
        let store = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
        let early = PruneRequest {
            before_ms: 0,
            ..request(&w, &keys, &archive)
        };
        assert!(prune(&store, &early).await.unwrap().is_none());
        assert!(!archive.exists());
        // An existing archive is never overwritten.
        std::fs::write(&archive, b"keep me").unwrap();
        let e = prune(&store, &request(&w, &keys, &archive))
            .await
            .unwrap_err();
        assert!(matches!(e, PruneError::ArchiveExists(_)), "{e}");
        assert_eq!(std::fs::read(&archive).unwrap(), b"keep me");
        store.close().await;
        // A modified record: refused before anything is written.
        Connection::open(&w.db)
            .unwrap()
            .execute("UPDATE audit SET reason = 'edited' WHERE seq = 7", [])
            .unwrap();
        let store = SqliteStore::open(&w.db, Synchronous::Normal).unwrap();
        let fresh = w.db.with_file_name("b.jsonl");
        let e = prune(&store, &request(&w, &keys, &fresh))
            .await
            .unwrap_err();
        assert!(
            matches!(e, PruneError::DoesNotVerify(Problem::Modified { seq: 7 })),
            "{e}"
        );
        assert!(!fresh.exists());
        store.close().await;
        assert_eq!(count(&w.db, "SELECT COUNT(*) FROM audit"), 30);
    }
}
