// Tests may panic on unexpected results; that is how they fail.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rusqlite::Connection;
use serde_json::json;
use tokio::task::JoinSet;

use super::replay::ReplaySet;
use super::*;
use crate::store::{AuditKind, ReplayEntry};

fn db_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("state").join("nested").join("cistern.db")
}

fn open(path: &Path) -> SqliteStore {
    SqliteStore::open(path, Synchronous::Normal).unwrap()
}

/// A granted exchange for ID token `id-{n}` minting access token `at-{n}`.
pub(super) fn record(n: usize) -> ExchangeRecord {
    ExchangeRecord {
        replay: Some(ReplayEntry {
            issuer: "gitlab".into(),
            jti: format!("id-{n}"),
            expires_at_ms: 2_000_000,
        }),
        identity: Identity {
            issuer: "gitlab".into(),
            project_id: "42".into(),
            namespace_id: "7".into(),
            role: "deploy".into(),
            project_path: "group/app".into(),
            namespace_path: "group".into(),
            owner: "team-a".into(),
        },
        token: IssuedToken {
            jti: format!("at-{n}"),
            kind: "access_token".into(),
            audience: "https://api.example".into(),
            scope: "read write".into(),
            issued_at_ms: 1_000_000 + n as i64,
            expires_at_ms: 1_600_000 + n as i64,
            subject_jti: format!("id-{n}"),
            pipeline_id: "900".into(),
            job_id: format!("{}", 5000 + n),
            git_ref: "refs/heads/main".into(),
        },
        audit: AuditEvent {
            at_ms: 1_000_000 + n as i64,
            kind: AuditKind::ExchangeGranted,
            issuer: Some("gitlab".into()),
            role: Some("deploy".into()),
            project_id: Some("42".into()),
            reason: None,
            detail: json!({ "jti": format!("at-{n}"), "n": n }).into(),
        },
        downstream: None,
    }
}

fn count(path: &Path, table: &str) -> i64 {
    let conn = Connection::open(path).unwrap();
    conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn request(op: WriteOp) -> (WriteRequest, oneshot::Receiver<Result<u64, StoreError>>) {
    let (reply, rx) = oneshot::channel();
    (WriteRequest { op, reply }, rx)
}

#[tokio::test]
async fn open_creates_private_directories_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open(&path);
    store.commit_exchange(record(1)).await.unwrap();

    assert_eq!(mode(&dir.path().join("state")), 0o700);
    assert_eq!(mode(&dir.path().join("state").join("nested")), 0o700);
    assert_eq!(mode(&path), 0o600);
    for suffix in ["-wal", "-shm"] {
        let companion = schema::companion_path(&path, suffix);
        assert!(companion.exists(), "{suffix} should exist in WAL mode");
        assert_eq!(mode(&companion), 0o600, "{suffix}");
    }
}

#[tokio::test]
async fn open_leaves_existing_parent_directories_alone() {
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("existing");
    std::fs::create_dir(&existing).unwrap();
    std::fs::set_permissions(&existing, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _store = open(&existing.join("new").join("cistern.db"));
    assert_eq!(mode(&existing), 0o755);
    assert_eq!(mode(&existing.join("new")), 0o700);
}

#[tokio::test]
async fn open_tightens_an_existing_world_readable_database_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cistern.db");
    std::fs::write(&path, b"").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let _store = open(&path);
    assert_eq!(mode(&path), 0o600);
}

#[tokio::test]
async fn opening_twice_runs_migrations_once_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let first = open(&path);
    first.commit_exchange(record(1)).await.unwrap();
    let second = open(&path);
    assert_eq!(count(&path, "schema_version"), 7);
    assert_eq!(second.issued_tokens(10).await.unwrap().len(), 1);
    second.ping().await.unwrap();
}

#[tokio::test]
async fn a_committed_exchange_is_visible_in_every_listing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    let rec = record(1);
    store.commit_exchange(rec.clone()).await.unwrap();

    let issued = store.issued_tokens(10).await.unwrap();
    assert_eq!(issued, vec![(rec.identity.clone(), rec.token.clone())]);

    let identities = store.identities().await.unwrap();
    assert_eq!(identities.len(), 1);
    assert_eq!(identities[0].identity, rec.identity);
    assert_eq!(identities[0].exchanges, 1);
    assert_eq!(identities[0].first_seen_ms, rec.token.issued_at_ms);
    assert_eq!(identities[0].last_used_ms, rec.token.issued_at_ms);

    let audit = store.recent_audit(10).await.unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].kind, "exchange_granted");
    assert_eq!(audit[0].at_ms, rec.audit.at_ms);
    assert_eq!(audit[0].issuer.as_deref(), Some("gitlab"));
    assert_eq!(audit[0].role.as_deref(), Some("deploy"));
    assert_eq!(audit[0].project_id.as_deref(), Some("42"));
    assert_eq!(audit[0].reason, None);
    assert_eq!(audit[0].detail.to_string(), rec.audit.detail.as_str());
}

#[tokio::test]
async fn listings_return_the_newest_rows_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    for n in 0..5 {
        store.commit_exchange(record(n)).await.unwrap();
    }
    let issued: Vec<String> = store
        .issued_tokens(3)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, t)| t.jti)
        .collect();
    assert_eq!(issued, ["at-2", "at-3", "at-4"]);
    let audit = store.recent_audit(2).await.unwrap();
    assert_eq!(audit.len(), 2);
    assert!(audit[0].seq < audit[1].seq);
    assert_eq!(audit[1].detail["n"], 4);
}

#[tokio::test]
async fn a_replayed_id_token_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open(&path);
    store.commit_exchange(record(1)).await.unwrap();
    let mut replayed = record(1);
    replayed.token.jti = "at-other".into();
    let err = store.commit_exchange(replayed).await.unwrap_err();
    assert!(matches!(err, StoreError::Replay), "{err:?}");
    assert_eq!(count(&path, "issued_tokens"), 1);
    assert_eq!(count(&path, "audit"), 1);
    assert_eq!(store.identities().await.unwrap()[0].exchanges, 1);
}

#[tokio::test]
async fn the_same_jti_from_another_issuer_is_not_a_replay() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    store.commit_exchange(record(1)).await.unwrap();
    let mut other = record(1);
    other.replay.as_mut().unwrap().issuer = "gitlab-2".into();
    other.token.jti = "at-other".into();
    store.commit_exchange(other).await.unwrap();
}

#[tokio::test]
async fn exchanges_without_replay_protection_commit_without_a_replay_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open(&path);
    let mut rec = record(1);
    rec.replay = None;
    store.commit_exchange(rec).await.unwrap();
    assert_eq!(count(&path, "replay"), 0);
    assert_eq!(count(&path, "issued_tokens"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_replay_among_concurrent_commits_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open(&path);
    const N: usize = 300;
    let mut set = JoinSet::new();
    for n in 0..N {
        let store = store.clone();
        set.spawn(async move { (n, store.commit_exchange(record(n)).await) });
    }
    // Same ID token as #150, different credential.
    let mut dup = record(150);
    dup.token.jti = "at-dup".into();
    let dup_store = store.clone();
    set.spawn(async move { (usize::MAX, dup_store.commit_exchange(dup).await) });

    let mut ok = 0;
    let mut replays = 0;
    while let Some(joined) = set.join_next().await {
        match joined.unwrap() {
            (_, Ok(())) => ok += 1,
            (_, Err(StoreError::Replay)) => replays += 1,
            (n, Err(e)) => panic!("request {n} failed: {e}"),
        }
    }
    // Whichever of the two came second lost; everything else landed.
    assert_eq!((ok, replays), (N, 1));
    assert_eq!(count(&path, "replay"), N as i64);
    assert_eq!(count(&path, "issued_tokens"), N as i64);
    assert_eq!(count(&path, "audit"), N as i64);
    let identities = store.identities().await.unwrap();
    assert_eq!(identities.len(), 1);
    assert_eq!(identities[0].exchanges, N as i64);
}

#[tokio::test]
async fn within_one_batch_a_replay_is_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    schema::prepare_files(&path).unwrap();
    let mut conn = schema::open_writer(&path, Synchronous::Normal).unwrap();
    schema::migrate(&mut conn).unwrap();

    let mut dup = record(1);
    dup.token.jti = "at-dup".into();
    let batch = vec![
        request(WriteOp::Exchange(Box::new(record(1)))).0,
        request(WriteOp::Exchange(Box::new(dup))).0,
        request(WriteOp::Exchange(Box::new(record(2)))).0,
    ];
    let outcomes =
        writer::commit_batch(&mut conn, &batch, &mut ReplaySet::default(), None).unwrap();
    assert!(outcomes[0].is_ok());
    assert!(matches!(outcomes[1], Err(StoreError::Replay)));
    assert!(outcomes[2].is_ok());

    let jtis: Vec<String> = conn
        .prepare("SELECT jti FROM replay ORDER BY jti")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(jtis, ["id-1", "id-2"]);
    assert_eq!(count(&path, "issued_tokens"), 2);
    assert_eq!(count(&path, "audit"), 2);
    let exchanges: i64 = conn
        .query_row("SELECT exchanges FROM identities", [], |r| r.get(0))
        .unwrap();
    assert_eq!(exchanges, 2);
}

#[tokio::test]
async fn any_other_failure_refuses_the_whole_batch_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    schema::prepare_files(&path).unwrap();
    let mut conn = schema::open_writer(&path, Synchronous::Normal).unwrap();
    schema::migrate(&mut conn).unwrap();

    // Same minted jti as #1 with a fresh ID token: the database refuses the
    // credential row after the replay row went in.
    let mut clash = record(3);
    clash.token.jti = "at-1".into();
    let batch = vec![
        request(WriteOp::Exchange(Box::new(record(1)))).0,
        request(WriteOp::Exchange(Box::new(clash))).0,
        request(WriteOp::Exchange(Box::new(record(2)))).0,
    ];
    let mut replay = ReplaySet::default();
    assert!(matches!(
        writer::commit_batch(&mut conn, &batch, &mut replay, None),
        Err(StoreError::Database(_))
    ));
    for table in ["replay", "issued_tokens", "audit", "identities"] {
        assert_eq!(count(&path, table), 0, "{table}");
    }
    // The connection is usable again, and the ID tokens of the refused
    // batch were not consumed: the writer's replay set forgot them too.
    let batch = vec![
        request(WriteOp::Exchange(Box::new(record(1)))).0,
        request(WriteOp::Exchange(Box::new(record(4)))).0,
    ];
    let outcomes = writer::commit_batch(&mut conn, &batch, &mut replay, None).unwrap();
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
}

#[tokio::test]
async fn a_batch_that_cannot_start_fails_every_request_with_a_database_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    schema::prepare_files(&path).unwrap();
    let mut conn = schema::open_writer(&path, Synchronous::Normal).unwrap();
    schema::migrate(&mut conn).unwrap();
    conn.busy_timeout(std::time::Duration::ZERO).unwrap();
    let blocker = Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();

    let (a, a_rx) = request(WriteOp::Exchange(Box::new(record(1))));
    let (b, b_rx) = request(WriteOp::PruneReplay { now_ms: 0 });
    let batch = vec![a, b];
    let outcome = writer::commit_batch(&mut conn, &batch, &mut ReplaySet::default(), None);
    assert!(outcome.is_err());
    writer::answer(batch.into_iter(), outcome);
    assert!(matches!(a_rx.await.unwrap(), Err(StoreError::Database(_))));
    assert!(matches!(b_rx.await.unwrap(), Err(StoreError::Database(_))));
    blocker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(count(&path, "issued_tokens"), 0);
}

#[tokio::test]
async fn each_grant_updates_the_identity_sighting() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    store.commit_exchange(record(1)).await.unwrap();
    let mut renamed = record(2);
    renamed.identity.project_path = "new-group/app".into();
    renamed.identity.namespace_path = "new-group".into();
    renamed.identity.owner = "team-b".into();
    store.commit_exchange(renamed.clone()).await.unwrap();
    // A different role is a different identity.
    let mut other_role = record(3);
    other_role.identity.role = "read".into();
    store.commit_exchange(other_role).await.unwrap();

    let identities = store.identities().await.unwrap();
    assert_eq!(identities.len(), 2);
    let deploy = identities
        .iter()
        .find(|i| i.identity.role == "deploy")
        .unwrap();
    assert_eq!(deploy.identity, renamed.identity);
    assert_eq!(deploy.exchanges, 2);
    assert_eq!(deploy.first_seen_ms, record(1).token.issued_at_ms);
    assert_eq!(deploy.last_used_ms, renamed.token.issued_at_ms);
}

#[tokio::test]
async fn an_id_token_consumed_through_one_writer_is_refused_through_another() {
    // Two stores on one file stand for two processes: each writer checks
    // replays in memory, and catches up with the other's rows first.
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let first = open(&path);
    let second = open(&path);
    first.commit_exchange(record(1)).await.unwrap();
    second.commit_exchange(record(2)).await.unwrap();
    let mut again = record(1);
    again.token.jti = "at-again".into();
    assert!(matches!(
        second.commit_exchange(again.clone()).await,
        Err(StoreError::Replay)
    ));
    again.replay.as_mut().unwrap().jti = "id-2".into();
    assert!(matches!(
        first.commit_exchange(again).await,
        Err(StoreError::Replay)
    ));
    assert_eq!(count(&path, "replay"), 2);
    assert_eq!(count(&path, "issued_tokens"), 2);
}

#[tokio::test]
async fn prune_replay_removes_only_expired_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open(&path);
    for (n, expires) in [(1, 100), (2, 200), (3, 300)] {
        let mut rec = record(n);
        rec.replay.as_mut().unwrap().expires_at_ms = expires;
        store.commit_exchange(rec).await.unwrap();
    }
    assert_eq!(store.prune_replay(200).await.unwrap(), 1);
    assert_eq!(count(&path, "replay"), 2);
    assert_eq!(store.prune_replay(200).await.unwrap(), 0);
    // The newest row stays, so that `seq` never goes back (replay.rs).
    assert_eq!(store.prune_replay(301).await.unwrap(), 1);
    assert_eq!(count(&path, "replay"), 1);
    // Pruning touches nothing else.
    assert_eq!(count(&path, "issued_tokens"), 3);
}

#[tokio::test]
async fn appended_audit_events_keep_their_fields() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&db_path(&dir));
    store
        .append_audit(AuditEvent {
            at_ms: 5,
            kind: AuditKind::ExchangeDenied,
            issuer: None,
            role: Some("deploy".into()),
            project_id: None,
            reason: Some("binding_mismatch".into()),
            detail: json!({ "trace": ["a", "b"] }).into(),
        })
        .await
        .unwrap();
    let audit = store.recent_audit(usize::MAX).await.unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].kind, "exchange_denied");
    assert_eq!(audit[0].issuer, None);
    assert_eq!(audit[0].reason.as_deref(), Some("binding_mismatch"));
    assert_eq!(audit[0].detail, json!({ "trace": ["a", "b"] }));
}

#[tokio::test]
async fn data_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open(&path);
    let mut set = JoinSet::new();
    for n in 0..50 {
        let store = store.clone();
        set.spawn(async move { store.commit_exchange(record(n)).await });
    }
    while let Some(joined) = set.join_next().await {
        joined.unwrap().unwrap();
    }
    store.close().await;
    store.close().await;
    assert!(matches!(
        store.commit_exchange(record(99)).await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store.ping().await,
        Err(StoreError::Unavailable(_))
    ));
    drop(store);

    let reopened = open(&path);
    assert_eq!(reopened.issued_tokens(1000).await.unwrap().len(), 50);
    assert_eq!(reopened.identities().await.unwrap()[0].exchanges, 50);
    let mut replayed = record(7);
    replayed.token.jti = "at-again".into();
    assert!(matches!(
        reopened.commit_exchange(replayed).await,
        Err(StoreError::Replay)
    ));
}

#[tokio::test]
async fn dropping_the_last_handle_still_commits_queued_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open(&path);
    // Queue writes without awaiting their replies, then drop the handle.
    let mut replies = Vec::new();
    for n in 0..20 {
        let (req, rx) = request(WriteOp::Exchange(Box::new(record(n))));
        store.writer.send(Message::Write(req)).await.unwrap();
        replies.push(rx);
    }
    drop(store);
    for rx in replies {
        rx.await.unwrap().unwrap();
    }
    assert_eq!(count(&path, "issued_tokens"), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_are_grouped_into_fewer_commits() {
    let dir = tempfile::tempdir().unwrap();
    // FULL makes each commit slower, so requests reliably pile up behind it.
    let store = SqliteStore::open(&db_path(&dir), Synchronous::Full).unwrap();
    let mut set = JoinSet::new();
    for n in 0..200 {
        let store = store.clone();
        set.spawn(async move { store.commit_exchange(record(n)).await });
    }
    while let Some(joined) = set.join_next().await {
        joined.unwrap().unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.requests, 200);
    assert_eq!(stats.failed_batches, 0);
    assert!(stats.commits >= 1);
    assert!(stats.commits < stats.requests, "{stats:?}");
}

/// Load check for the lead: 10k concurrent exchanges all complete. Times
/// nothing (run with `--ignored --nocapture` to see the batch sizes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "load check; run explicitly"]
async fn ten_thousand_concurrent_exchanges_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open(&path);
    const N: usize = 10_000;
    let mut set = JoinSet::new();
    for n in 0..N {
        let store = store.clone();
        set.spawn(async move { store.commit_exchange(record(n)).await });
    }
    while let Some(joined) = set.join_next().await {
        joined.unwrap().unwrap();
    }
    let stats = store.stats();
    println!(
        "{stats:?}, mean batch {}",
        stats.requests / stats.commits.max(1)
    );
    assert_eq!(count(&path, "issued_tokens"), N as i64);
    assert_eq!(stats.requests, N as u64);
}

#[tokio::test]
async fn the_checkpointer_moves_committed_pages_into_the_database_while_the_store_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let store = open(&path);
    let before = std::fs::metadata(&path).unwrap().len();
    for n in 0..200 {
        store.commit_exchange(record(n)).await.unwrap();
    }
    // The writer never checkpoints (wal_autocheckpoint = 0), so only the
    // checkpoint thread can grow the main file while the store is open.
    let mut grown = false;
    for _ in 0..40 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if std::fs::metadata(&path).unwrap().len() > before {
            grown = true;
            break;
        }
    }
    assert!(grown, "no checkpoint reached {}", path.display());
    store.close().await;
}
