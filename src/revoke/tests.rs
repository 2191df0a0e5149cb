// Tests may panic on unexpected results; that is how they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use uuid::{NoContext, Timestamp, Uuid};

use super::*;
use crate::clock::ManualClock;
use crate::config::Synchronous;
use crate::store::sqlite::SqliteStore;
use crate::store::{AuditEvent, AuditKind, ExchangeRecord, Identity, IssuedToken};

const T0: i64 = 1_767_225_600_000;

fn by<'a>(actor: &'a str, reason: &'a str, source: &'a str) -> Requester<'a> {
    Requester {
        actor,
        reason,
        source,
    }
}

fn v7(ms: i64) -> String {
    let secs = (ms / 1000) as u64;
    let nanos = ((ms % 1000) * 1_000_000) as u32;
    Uuid::new_v7(Timestamp::from_unix(NoContext, secs, nanos)).to_string()
}

fn cred<'a>(jti: &'a str, at_ms: i64) -> Credential<'a> {
    Credential {
        jti,
        issuer: "gitlab",
        project_id: "42",
        namespace_id: "7",
        job_namespace_id: "7",
        role: "deploy",
        issued_at_ms: at_ms,
    }
}

fn rule(id: i64, grain: Grain, value: &str, issuer: &str, before: i64) -> RevocationRule {
    RevocationRule {
        id,
        grain,
        value: value.into(),
        issuer: issuer.into(),
        issued_before_ms: before,
    }
}

#[test]
fn issue_time_comes_from_the_v7_jti_to_the_millisecond() {
    let jti = v7(T0 + 987);
    assert_eq!(issued_at_ms(&jti, T0 / 1000), T0 + 987);
    // Not a v7 UUID: `iat` seconds.
    assert_eq!(issued_at_ms("not-a-uuid", 17), 17_000);
    assert_eq!(issued_at_ms(&Uuid::new_v4().to_string(), 17), 17_000);
}

#[test]
fn a_revoked_jti_is_revoked_and_no_other() {
    let set = RevocationSet::new();
    let (a, b) = (v7(T0), v7(T0));
    set.apply(&rule(1, Grain::Jti, &a, "", T0));
    assert!(set.is_revoked(&cred(&a, T0)));
    assert!(!set.is_revoked(&cred(&b, T0)));
    // A jti that is not a UUID (named by an operator) works too.
    set.apply(&rule(2, Grain::Jti, "opaque-1", "", T0));
    assert!(set.is_revoked(&cred("opaque-1", T0)));
    assert!(!set.is_revoked(&cred("opaque-2", T0)));
    // Only rules read from the store move the poll's position.
    assert_eq!(set.last_seen(), 0);
    assert_eq!(set.jti_count(), 2);
}

#[test]
fn cutoffs_revoke_strictly_before_and_never_after() {
    for grain in [
        Grain::Project,
        Grain::Namespace,
        Grain::Role,
        Grain::Issuer,
        Grain::All,
    ] {
        let set = RevocationSet::new();
        let value = match grain {
            Grain::Project => "42",
            Grain::Namespace => "7",
            Grain::Role => "deploy",
            Grain::Issuer => "gitlab",
            _ => "",
        };
        set.apply(&rule(1, grain, value, "", T0));
        assert!(set.is_revoked(&cred("x", T0 - 1)), "{grain:?} before");
        assert!(!set.is_revoked(&cred("x", T0)), "{grain:?} at the cutoff");
        assert!(!set.is_revoked(&cred("x", T0 + 1)), "{grain:?} after");
        // An older rule never lowers the cutoff.
        set.apply(&rule(2, grain, value, "", T0 - 500));
        assert!(set.is_revoked(&cred("x", T0 - 1)), "{grain:?} kept");
    }
}

#[test]
fn other_identities_are_untouched() {
    let set = RevocationSet::new();
    set.apply(&rule(1, Grain::Project, "43", "", T0));
    set.apply(&rule(2, Grain::Namespace, "8", "", T0));
    set.apply(&rule(3, Grain::Role, "admin", "", T0));
    set.apply(&rule(4, Grain::Issuer, "other", "", T0));
    assert!(!set.is_revoked(&cred("x", T0 - 10)));
}

#[test]
fn a_namespace_rule_covers_a_fork_pipelines_credential_by_either_namespace() {
    // A fork merge-request pipeline: the ID token's namespace (the fork's, 7)
    // and the namespace the job runs in (9) differ.
    let fork = |at_ms| Credential {
        job_namespace_id: "9",
        ..cred("x", at_ms)
    };
    for value in ["7", "9"] {
        let set = RevocationSet::new();
        set.apply(&rule(1, Grain::Namespace, value, "", T0));
        assert!(set.is_revoked(&fork(T0 - 1)), "rule on namespace {value}");
        assert!(!set.is_revoked(&fork(T0 + 1)), "issued after the rule");
    }
    // An ordinary credential of namespace 7 is not covered by a rule on 9.
    let set = RevocationSet::new();
    set.apply(&rule(1, Grain::Namespace, "9", "", T0));
    assert!(!set.is_revoked(&cred("x", T0 - 1)));
}

#[test]
fn an_issuer_scope_limits_project_and_namespace_rules() {
    let set = RevocationSet::new();
    set.apply(&rule(1, Grain::Project, "42", "other", T0));
    assert!(!set.is_revoked(&cred("x", T0 - 1)));
    set.apply(&rule(2, Grain::Namespace, "7", "gitlab", T0));
    assert!(set.is_revoked(&cred("x", T0 - 1)));
}

#[test]
fn blocks_cover_their_grain_and_are_lifted() {
    let set = RevocationSet::new();
    let p = Block {
        grain: BlockGrain::Project,
        issuer: "gitlab".into(),
        value: "42".into(),
    };
    set.add_block(&p);
    assert_eq!(
        set.blocked("gitlab", "42", &["7"], "deploy"),
        Some(BlockGrain::Project)
    );
    assert_eq!(set.blocked("other", "42", &["7"], "deploy"), None);
    set.remove_block(&p);
    assert_eq!(set.blocked("gitlab", "42", &["7"], "deploy"), None);
    let n = Block {
        grain: BlockGrain::Namespace,
        issuer: String::new(),
        value: "9".into(),
    };
    set.add_block(&n);
    // Either of the job's namespaces.
    assert_eq!(
        set.blocked("any", "1", &["7", "9"], "deploy"),
        Some(BlockGrain::Namespace)
    );
    let r = Block {
        grain: BlockGrain::Role,
        issuer: String::new(),
        value: "deploy".into(),
    };
    set.set_blocks(std::slice::from_ref(&r));
    assert_eq!(
        set.blocked("any", "1", &["9"], "deploy"),
        Some(BlockGrain::Role)
    );
    assert_eq!(set.blocked("any", "1", &["9"], "read"), None);
}

#[test]
fn a_million_revoked_jtis_load_and_check_in_constant_time() {
    let set = RevocationSet::new();
    let rules: Vec<RevocationRule> = (0..1_000_000)
        .map(|i| rule(i + 1, Grain::Jti, &v7(T0 + i), "", T0))
        .collect();
    let started = Instant::now();
    set.apply_all(&rules);
    let load = started.elapsed();
    assert_eq!(set.jti_count(), 1_000_000);
    assert_eq!(set.last_seen(), 1_000_000);
    for r in rules.iter().step_by(9973) {
        assert!(set.is_revoked(&cred(&r.value, T0)));
    }
    let miss = v7(T0 + 5);
    assert!(!set.is_revoked(&cred(&miss, T0 + 5)));
    // Generous bound for a debug build on a shared machine; the bench measures.
    assert!(load.as_secs() < 60, "load took {load:?}");
}

#[test]
fn concurrent_readers_see_a_rule_once_it_is_applied() {
    let set = Arc::new(RevocationSet::new());
    let jti = v7(T0);
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (set, jti) = (set.clone(), jti.clone());
            std::thread::spawn(move || {
                let mut seen = false;
                for _ in 0..200_000 {
                    let now = set.is_revoked(&cred(&jti, T0));
                    // Monotonic: once revoked, always revoked.
                    assert!(!seen || now);
                    seen |= now;
                }
            })
        })
        .collect();
    for i in 0..10_000 {
        set.apply(&rule(i + 2, Grain::Jti, &v7(T0 + i), "", T0));
    }
    set.apply(&rule(1, Grain::Jti, &jti, "", T0));
    for r in readers {
        r.join().unwrap();
    }
    assert!(set.is_revoked(&cred(&jti, T0)));
}

#[test]
fn a_revoked_jti_is_let_go_once_its_credential_has_expired() {
    let set = RevocationSet::new();
    let (short, long, unknown) = (v7(T0), v7(T0 + 1), v7(T0 + 2));
    set.apply_expiring(&rule(1, Grain::Jti, &short, "", 0), Some(T0 + 60_000));
    set.apply_all_expiring([
        (&rule(2, Grain::Jti, &long, "", 0), Some(T0 + 3_600_000)),
        // Revoked in-process before the store said when it expires.
        (&rule(3, Grain::Jti, &unknown, "", 0), None),
    ]);
    assert_eq!(set.jti_count(), 3);
    // Expired, but within the margin: still held.
    assert_eq!(set.prune(T0 + 60_000 + set::PRUNE_GRACE_MS - 1), 0);
    assert!(set.is_revoked(&cred(&short, T0)));
    assert_eq!(set.prune(T0 + 60_000 + set::PRUNE_GRACE_MS), 1);
    assert!(!set.is_revoked(&cred(&short, T0)));
    assert!(set.is_revoked(&cred(&long, T0 + 1)));
    // An unknown expiry is held for ever, until the store supplies one.
    assert_eq!(set.prune(i64::MAX - 1), 1);
    assert!(set.is_revoked(&cred(&unknown, T0 + 2)));
    set.apply_expiring(&rule(3, Grain::Jti, &unknown, "", 0), Some(T0));
    assert_eq!(set.prune(T0 + set::PRUNE_GRACE_MS), 1);
    assert_eq!(set.jti_count(), 0);
    // Pruning on schedule: due at once, then not again until the interval.
    assert_eq!(set.prune_if_due(T0), Some(0));
    assert_eq!(set.prune_if_due(T0 + set::PRUNE_EVERY_MS - 1), None);
    assert_eq!(set.prune_if_due(T0 + set::PRUNE_EVERY_MS), Some(0));
}

// --- store methods and the Lifecycle service ---

fn exchange(
    jti: &str,
    project: &str,
    role: &str,
    issued_ms: i64,
    expires_ms: i64,
) -> ExchangeRecord {
    ExchangeRecord {
        replay: None,
        identity: Identity {
            issuer: "gitlab".into(),
            project_id: project.into(),
            namespace_id: "7".into(),
            role: role.into(),
            project_path: format!("group/p{project}"),
            namespace_path: "group".into(),
            owner: "team-a".into(),
        },
        token: IssuedToken {
            jti: jti.into(),
            kind: "access_token".into(),
            audience: "https://api.example".into(),
            scope: "deploy:prod".into(),
            // As the exchange records it: whole seconds.
            issued_at_ms: issued_ms / 1000 * 1000,
            expires_at_ms: expires_ms,
            subject_jti: format!("id-{jti}"),
            pipeline_id: "1".into(),
            job_id: "2".into(),
            git_ref: "main".into(),
        },
        audit: AuditEvent {
            at_ms: issued_ms,
            kind: AuditKind::ExchangeGranted,
            issuer: Some("gitlab".into()),
            role: Some(role.into()),
            project_id: Some(project.into()),
            reason: None,
            detail: json!({ "jti": jti }).into(),
        },
        downstream: None,
    }
}

struct World {
    _dir: tempfile::TempDir,
    store: SqliteStore,
    clock: Arc<ManualClock>,
    set: Arc<RevocationSet>,
    lc: Lifecycle,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("c.db"), Synchronous::Normal).unwrap();
    let clock = Arc::new(ManualClock::at_secs(T0 / 1000));
    let set = Arc::new(RevocationSet::new());
    let names: HashMap<String, String> = [
        ("gitlab".to_owned(), "gitlab".to_owned()),
        ("https://gitlab.com".to_owned(), "gitlab".to_owned()),
    ]
    .into();
    let lc = Lifecycle {
        store: Arc::new(store.clone()),
        set: Some(set.clone()),
        clock: clock.clone(),
        issuer_names: Arc::new(names),
    };
    World {
        _dir: dir,
        store,
        clock,
        set,
        lc,
    }
}

#[tokio::test]
async fn a_revocation_is_recorded_applied_marked_effective_and_counts_what_it_covers() {
    let w = world();
    let (old, young) = (v7(T0 - 2000), v7(T0 + 400));
    w.store
        .commit_exchange(exchange(&old, "42", "deploy", T0 - 2000, T0 + 60_000))
        .await
        .unwrap();
    w.store
        .commit_exchange(exchange(
            &v7(T0 - 1500),
            "43",
            "deploy",
            T0 - 1500,
            T0 + 60_000,
        ))
        .await
        .unwrap();
    // Expired: not outstanding.
    w.store
        .commit_exchange(exchange(&v7(T0 - 9000), "42", "deploy", T0 - 9000, T0 - 1))
        .await
        .unwrap();
    w.clock.advance_secs(0);
    let out =
        w.lc.revoke(
            Grain::Project,
            "42",
            "https://gitlab.com",
            None,
            &by("tester", "leaked", "admin_api"),
        )
        .await
        .unwrap();
    assert_eq!(out.issuer, "gitlab", "issuer URL resolved to its name");
    assert_eq!(out.outstanding, 1);
    assert_eq!(out.jtis, vec![old.clone()]);
    assert_eq!(out.effective_at_ms, Some(T0));
    assert!(w.set.is_revoked(&Credential {
        jti: &old,
        issuer: "gitlab",
        project_id: "42",
        namespace_id: "7",
        job_namespace_id: "7",
        role: "deploy",
        issued_at_ms: T0 - 2000
    }));
    // Issued after the cutoff (same second as the rule): not covered.
    assert!(!w.set.is_revoked(&Credential {
        jti: &young,
        issuer: "gitlab",
        project_id: "42",
        namespace_id: "7",
        job_namespace_id: "7",
        role: "deploy",
        issued_at_ms: T0 + 400
    }));

    let rows = w.store.revocations_since(0, 100).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].rule.id, out.rule_id);
    assert_eq!(rows[0].effective_at_ms, Some(T0));
    assert_eq!(rows[0].actor, "tester");
    // Marking again does nothing.
    assert_eq!(
        w.store
            .mark_revocations_effective(0, out.rule_id, T0 + 5)
            .await
            .unwrap(),
        0
    );
    let audit = w.store.recent_audit(10).await.unwrap();
    let last = audit.last().unwrap();
    assert_eq!(last.kind, "token_revoked");
    assert_eq!(last.detail["rule_id"], out.rule_id);
    assert_eq!(last.detail["reason"], "leaked");
}

#[tokio::test]
async fn invalid_requests_are_refused_before_anything_is_written() {
    let w = world();
    let cases: Vec<(Grain, &str, &str, Option<i64>, &str)> = vec![
        (Grain::Project, "42", "", None, " "),
        (Grain::Project, "", "", None, "r"),
        (Grain::All, "x", "", None, "r"),
        (Grain::Role, "deploy", "gitlab", None, "r"),
        (Grain::Project, "42", "nope", None, "r"),
        (Grain::All, "", "", Some(T0 + 1), "r"),
        (Grain::Jti, "j", "", Some(T0 - 1), "r"),
    ];
    for (g, v, i, b, r) in cases {
        let e =
            w.lc.revoke(g, v, i, b, &by("t", r, "admin_api"))
                .await
                .unwrap_err();
        assert!(
            matches!(e, LifecycleError::Invalid(_)),
            "{g:?} {v:?} {i:?}: {e}"
        );
    }
    assert!(w.store.revocations_since(0, 100).await.unwrap().is_empty());
}

#[tokio::test]
async fn offboarding_blocks_revokes_outstanding_and_reenable_lifts() {
    let w = world();
    let jti = v7(T0 - 3000);
    w.store
        .commit_exchange(exchange(&jti, "42", "deploy", T0 - 3000, T0 + 60_000))
        .await
        .unwrap();
    let block = Block {
        grain: BlockGrain::Project,
        issuer: String::new(),
        value: "42".into(),
    };
    let out =
        w.lc.offboard(block.clone(), "tester", "team left", "admin_api")
            .await
            .unwrap();
    assert_eq!(out.revocation.outstanding, 1);
    assert_eq!(
        w.set.blocked("gitlab", "42", &["7"], "deploy"),
        Some(BlockGrain::Project)
    );
    let listed = w.store.offboarded().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].reason, "team left");
    let kinds: Vec<String> = w
        .store
        .recent_audit(10)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.kind)
        .collect();
    assert!(
        kinds.ends_with(&["offboarded".to_owned(), "token_revoked".to_owned()]),
        "{kinds:?}"
    );

    let r =
        w.lc.reenable(block.clone(), "tester", "back")
            .await
            .unwrap();
    assert!(r.was_blocked);
    assert_eq!(w.set.blocked("gitlab", "42", &["7"], "deploy"), None);
    assert!(w.store.offboarded().await.unwrap().is_empty());
    assert!(
        !w.lc
            .reenable(block, "tester", "again")
            .await
            .unwrap()
            .was_blocked
    );
    assert_eq!(w.store.recent_audit(1).await.unwrap()[0].kind, "reenabled");
}

#[tokio::test]
async fn sync_applies_rules_written_elsewhere_and_marks_them_effective() {
    let w = world();
    // Another process (the CLI) acting on the store: no set.
    let cli = Lifecycle {
        set: None,
        ..w.lc.clone()
    };
    let jti = v7(T0 - 10);
    let out = cli
        .revoke(Grain::Jti, &jti, "", None, &by("cli", "r", "cli_direct"))
        .await
        .unwrap();
    assert_eq!(out.effective_at_ms, None);
    cli.offboard(
        Block {
            grain: BlockGrain::Role,
            issuer: String::new(),
            value: "ops".into(),
        },
        "cli",
        "r",
        "cli_direct",
    )
    .await
    .unwrap();
    assert!(!w.set.is_revoked(&cred(&jti, T0 - 10)));
    w.clock.advance_secs(1);
    assert_eq!(w.lc.sync().await.unwrap(), 2);
    assert!(w.set.is_revoked(&cred(&jti, T0 - 10)));
    assert_eq!(
        w.set.blocked("gitlab", "1", &["2"], "ops"),
        Some(BlockGrain::Role)
    );
    let rows = w.store.revocations_since(0, 100).await.unwrap();
    assert!(rows.iter().all(|r| r.effective_at_ms == Some(T0 + 1000)));
    // Nothing new: nothing applied.
    assert_eq!(w.lc.sync().await.unwrap(), 0);
}

#[tokio::test]
async fn revoked_jtis_of_expired_credentials_are_neither_loaded_nor_kept() {
    let w = world();
    let cli = Lifecycle {
        set: None,
        ..w.lc.clone()
    };
    // Two credentials a job revoked at its end: one already long expired
    // when a server starts, one still valid.
    let (gone, live) = (v7(T0 - 3_600_000), v7(T0 - 1000));
    w.store
        .commit_exchange(exchange(
            &gone,
            "42",
            "deploy",
            T0 - 3_600_000,
            T0 - 1_800_000,
        ))
        .await
        .unwrap();
    w.store
        .commit_exchange(exchange(&live, "42", "deploy", T0 - 1000, T0 + 600_000))
        .await
        .unwrap();
    for jti in [&gone, &live] {
        cli.revoke(
            Grain::Jti,
            jti,
            "",
            None,
            &by("self", "job done", "rfc7009"),
        )
        .await
        .unwrap();
    }
    // A jti cistern never issued: no expiry is known, so it is held.
    let foreign = v7(T0 - 5000);
    cli.revoke(
        Grain::Jti,
        &foreign,
        "",
        None,
        &by("cli", "r", "cli_direct"),
    )
    .await
    .unwrap();
    let rows = w.store.revocations_since(0, 100).await.unwrap();
    let expiry: Vec<Option<i64>> = rows.iter().map(|r| r.credential_expires_at_ms).collect();
    assert_eq!(expiry, [Some(T0 - 1_800_000), Some(T0 + 600_000), None]);

    assert_eq!(w.lc.sync().await.unwrap(), 3);
    assert_eq!(w.set.jti_count(), 2, "the long-expired jti was not loaded");
    assert!(w.set.is_revoked(&cred(&live, T0 - 1000)));
    assert!(w.set.is_revoked(&cred(&foreign, T0 - 5000)));
    assert_eq!(w.set.last_seen(), rows[2].rule.id);

    // Past the live one's expiry (and the margin), the next due prune lets it go.
    w.clock
        .advance_secs((600_000 + super::set::PRUNE_GRACE_MS + super::set::PRUNE_EVERY_MS) / 1000);
    assert_eq!(w.lc.sync().await.unwrap(), 0);
    assert!(!w.set.is_revoked(&cred(&live, T0 - 1000)));
    assert_eq!(w.set.jti_count(), 1);
    // The rules stay in the store: they are the revocation history.
    assert_eq!(w.store.revocations_since(0, 100).await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_rule_made_in_process_does_not_hide_an_older_unpolled_one() {
    let w = world();
    let cli = Lifecycle {
        set: None,
        ..w.lc.clone()
    };
    let (a, b) = (v7(T0 - 20), v7(T0 - 10));
    let first = cli
        .revoke(Grain::Jti, &a, "", None, &by("cli", "r", "cli_direct"))
        .await
        .unwrap();
    let second =
        w.lc.revoke(Grain::Jti, &b, "", None, &by("admin", "r", "admin_api"))
            .await
            .unwrap();
    assert!(second.rule_id > first.rule_id);
    // The in-process rule marked itself only.
    let rows = w.store.revocations_since(0, 100).await.unwrap();
    assert_eq!(rows[0].effective_at_ms, None);
    assert_eq!(rows[1].effective_at_ms, Some(T0));
    w.clock.advance_secs(2);
    assert_eq!(w.lc.sync().await.unwrap(), 2);
    assert!(w.set.is_revoked(&cred(&a, T0 - 20)));
    let rows = w.store.revocations_since(0, 100).await.unwrap();
    assert_eq!(rows[0].effective_at_ms, Some(T0 + 2000));
    assert_eq!(rows[1].effective_at_ms, Some(T0), "kept its own time");
}

#[tokio::test]
async fn rules_are_read_in_pages_in_id_order() {
    let w = world();
    let cli = Lifecycle {
        set: None,
        ..w.lc.clone()
    };
    for role in ["a", "b", "c"] {
        cli.revoke(Grain::Role, role, "", None, &by("cli", "r", "cli_direct"))
            .await
            .unwrap();
    }
    let first = w.store.revocations_since(0, 2).await.unwrap();
    assert_eq!(
        first
            .iter()
            .map(|r| r.rule.value.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    let rest = w
        .store
        .revocations_since(first[1].rule.id, 2)
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].rule.value, "c");
}

#[tokio::test]
async fn an_issued_token_is_found_by_jti() {
    let w = world();
    let jti = v7(T0);
    w.store
        .commit_exchange(exchange(&jti, "42", "deploy", T0, T0 + 1000))
        .await
        .unwrap();
    let (id, t) = w.store.issued_token(&jti).await.unwrap().unwrap();
    assert_eq!(id.project_path, "group/p42");
    assert_eq!(t.jti, jti);
    assert!(w.store.issued_token("nope").await.unwrap().is_none());
}
