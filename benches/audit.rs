//! Audit-log benchmarks: the cost of one chain link (SHA-256 over the
//! canonical encoding of a typical `exchange_granted` record), append
//! throughput through the store's single writer (records/s, the chain
//! included, 64 appends in flight), and `audit verify` records/s over a
//! 200,000-record log with checkpoints.
//!
//! Run with `cargo bench --bench audit`.

// Setup failures should abort the bench loudly.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cistern::audit::chain::{ChainFields, GENESIS, record_hash};
use cistern::audit::checkpoint::checkpoint_now;
use cistern::audit::verify::verify_sqlite;
use cistern::clock::SystemClock;
use cistern::config::{SigningAlgorithm, SigningConfig, Synchronous};
use cistern::mint::{KeyRing, PublishedKeys};
use cistern::store::sqlite::SqliteStore;
use cistern::store::{AuditEvent, AuditKind, Store};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::json;

const VERIFY_RECORDS: usize = 200_000;

/// A record shaped like an `exchange_granted` one: jti, owner, policy,
/// the deciding claims (~900 bytes of detail).
fn event(n: usize) -> AuditEvent {
    AuditEvent {
        at_ms: 1_767_225_600_000 + n as i64,
        kind: AuditKind::ExchangeGranted,
        issuer: Some("gitlab".into()),
        role: Some("deploy".into()),
        project_id: Some("42".into()),
        reason: None,
        detail: json!({
            "jti": format!("0190d1a4-{n:04x}-7000-8000-000000000000"),
            "owner": "team-payments", "policy_file": "deploy.toml",
            "audience": "https://deploy.example.com", "scope": "deploy:write",
            "expires_at": 1_767_226_200, "matched": ["project_id", "ref_protected"],
            "claims": {
                "iss": "https://gitlab.example.com", "sub": "project_path:group/app:ref_type:branch:ref:main",
                "aud": "https://cistern.example.com", "project_id": "42", "project_path": "group/app",
                "namespace_id": "7", "namespace_path": "group", "user_id": "1001", "user_login": "alice",
                "pipeline_id": "90001", "pipeline_source": "push", "job_id": "500001",
                "ref": "main", "ref_type": "branch", "ref_protected": "true", "runner_id": 12,
                "runner_environment": "gitlab-hosted", "sha": "0123456789abcdef0123456789abcdef01234567",
                "ci_config_ref_uri": "gitlab.example.com/group/app//.gitlab-ci.yml@refs/heads/main",
                "jti": "b7a1f3c2-0000-4000-8000-000000000000", "iat": 1_767_225_590, "exp": 1_767_229_190
            },
            "request": { "role": "deploy", "scope": null, "audience": null }
        })
        .into(),
    }
}

fn keys(dir: &std::path::Path) -> KeyRing {
    KeyRing::open(
        &SigningConfig {
            key_dir: dir.join("keys"),
            algorithm: SigningAlgorithm::ES256,
            rotation_period: Duration::from_secs(86400),
        },
        Arc::new(SystemClock),
        Duration::from_secs(3600),
    )
    .expect("keys")
}

fn benches(c: &mut Criterion) {
    let e = event(1);
    let fields = ChainFields {
        seq: 12_345,
        at_ms: e.at_ms,
        kind: e.kind.as_str(),
        issuer: e.issuer.as_deref(),
        role: e.role.as_deref(),
        project_id: e.project_id.as_deref(),
        reason: None,
        detail: e.detail.as_str(),
    };
    let mut g = c.benchmark_group("audit");
    g.throughput(Throughput::Bytes(e.detail.as_str().len() as u64));
    g.bench_function("record_hash (one chain link)", |b| {
        b.iter(|| record_hash(black_box(&GENESIS), black_box(&fields)));
    });

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let store =
        SqliteStore::open(&dir.path().join("append.db"), Synchronous::Normal).expect("store");
    const BATCH: usize = 10_000;
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(10);
    g.bench_function(
        "append through the writer (10k records, 64 in flight)",
        |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let events: Vec<AuditEvent> = (0..BATCH).map(event).collect();
                    let store = store.clone();
                    total += rt.block_on(async move {
                        let start = Instant::now();
                        let mut set = tokio::task::JoinSet::new();
                        let mut events = events.into_iter();
                        for _ in 0..64 {
                            let chunk: Vec<AuditEvent> =
                                events.by_ref().take(BATCH / 64 + 1).collect();
                            let store = store.clone();
                            set.spawn(async move {
                                for e in chunk {
                                    store.append_audit(e).await.expect("append");
                                }
                            });
                        }
                        set.join_all().await;
                        start.elapsed()
                    });
                }
                total
            });
        },
    );
    g.finish();

    // A log to verify: VERIFY_RECORDS records, a checkpoint every 1000.
    let ring = keys(dir.path());
    let path = dir.path().join("verify.db");
    rt.block_on(async {
        let store = SqliteStore::open(&path, Synchronous::Normal).expect("store");
        for chunk in (0..VERIFY_RECORDS).collect::<Vec<_>>().chunks(1000) {
            let mut set = tokio::task::JoinSet::new();
            for &n in chunk {
                let store = store.clone();
                set.spawn(async move { store.append_audit(event(n)).await.expect("append") });
            }
            set.join_all().await;
            checkpoint_now(&store, &ring, &SystemClock, "https://cistern.example.com")
                .await
                .expect("checkpoint");
        }
        store.close().await;
    });
    let published = PublishedKeys::load(&dir.path().join("keys")).expect("keys");
    let mut g = c.benchmark_group("audit verify");
    g.throughput(Throughput::Elements(VERIFY_RECORDS as u64));
    g.sample_size(10);
    g.bench_function("verify 200k records + 200 checkpoints", |b| {
        b.iter(|| {
            let v = verify_sqlite(&path, Some(&published), None).expect("verify");
            assert!(v.problem.is_none(), "{:?}", v.problem);
            assert_eq!(v.report.records, VERIFY_RECORDS as u64);
        });
    });
    g.finish();
}

criterion_group! {
    name = audit;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(audit);
