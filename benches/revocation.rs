//! Revocation-set benchmarks: the check with 1,000,000 revoked jtis plus
//! 10,000 project, 1,000 namespace and 100 role rules (hit and miss), the
//! cost of applying one rule to that set, and the start-up bulk load.
//!
//! Run with `cargo bench --bench revocation`.

// Setup failures should abort the bench loudly.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use cistern::revoke::{Credential, Grain, RevocationRule, RevocationSet};
use criterion::{Criterion, criterion_group, criterion_main};
use uuid::{NoContext, Timestamp, Uuid};

const T0: i64 = 1_767_225_600_000;
const JTIS: i64 = 1_000_000;

fn v7(ms: i64) -> String {
    let secs = u64::try_from(ms / 1000).expect("positive");
    let nanos = u32::try_from((ms % 1000) * 1_000_000).expect("small");
    Uuid::new_v7(Timestamp::from_unix(NoContext, secs, nanos)).to_string()
}

fn rule(id: i64, grain: Grain, value: String) -> RevocationRule {
    RevocationRule {
        id,
        grain,
        value,
        issuer: String::new(),
        issued_before_ms: T0,
    }
}

fn rules() -> Vec<RevocationRule> {
    let mut out: Vec<RevocationRule> = (0..JTIS)
        .map(|i| rule(i + 1, Grain::Jti, v7(T0 + i)))
        .collect();
    let mut id = JTIS;
    for (grain, n) in [
        (Grain::Project, 10_000),
        (Grain::Namespace, 1_000),
        (Grain::Role, 100),
    ] {
        for i in 0..n {
            id += 1;
            out.push(rule(id, grain, format!("{}", 100_000 + i)));
        }
    }
    out
}

fn benches(c: &mut Criterion) {
    let rules = rules();
    let set = RevocationSet::new();
    let started = Instant::now();
    set.apply_all(&rules);
    eprintln!(
        "bulk load of {} rules ({} jtis): {:?}",
        rules.len(),
        set.jti_count(),
        started.elapsed()
    );
    let hit = rules[JTIS as usize / 2].value.clone();
    let miss = v7(T0 + 3 * JTIS);

    let mut g = c.benchmark_group("revocation_check_1M");
    g.bench_function("jti_hit", |b| {
        b.iter(|| {
            black_box(set.is_revoked(black_box(&Credential {
                jti: &hit,
                issuer: "gitlab",
                project_id: "42",
                namespace_id: "7",
                job_namespace_id: "7",
                role: "deploy",
                issued_at_ms: T0 + 5,
            })))
        })
    });
    g.bench_function("miss", |b| {
        b.iter(|| {
            black_box(set.is_revoked(black_box(&Credential {
                jti: &miss,
                issuer: "gitlab",
                project_id: "42",
                namespace_id: "7",
                job_namespace_id: "7",
                role: "deploy",
                issued_at_ms: T0 + 5,
            })))
        })
    });
    g.bench_function("project_rule_hit", |b| {
        b.iter(|| {
            black_box(set.is_revoked(black_box(&Credential {
                jti: &miss,
                issuer: "gitlab",
                project_id: "105000",
                namespace_id: "7",
                job_namespace_id: "7",
                role: "deploy",
                issued_at_ms: T0 - 5,
            })))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("revocation_apply_1M");
    let next = AtomicI64::new(10 * JTIS);
    g.bench_function("jti_rule", |b| {
        b.iter(|| {
            let i = next.fetch_add(1, Ordering::Relaxed);
            set.apply(&rule(i, Grain::Jti, v7(T0 + i)));
        })
    });
    g.bench_function("project_rule", |b| {
        b.iter(|| {
            let i = next.fetch_add(1, Ordering::Relaxed);
            set.apply(&rule(i, Grain::Project, format!("{}", i % 50_000)));
        })
    });
    g.finish();
}

criterion_group! {
    name = revocation;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(revocation);
