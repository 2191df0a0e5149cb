//! The reaper and reconciliation against an in-memory provider and the
//! real SQLite store.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use zeroize::Zeroizing;

use super::reaper::Reaper;
use super::*;
use crate::clock::{Clock, ManualClock};
use crate::config::Synchronous;
use crate::revoke::{Grain, RevocationRule, RevocationSet};
use crate::store::sqlite::SqliteStore;
use crate::store::{
    AuditEvent, AuditKind, DownstreamRecord, ExchangeRecord, Identity, IssuedToken, Store,
};

/// A provider that keeps its tokens in memory and records revocations.
#[derive(Default)]
struct Fake {
    /// (target, external id, jti, active)
    tokens: Mutex<Vec<(String, String, String, bool)>>,
    revoked: Mutex<Vec<String>>,
}

#[async_trait]
impl CredentialProvider for Fake {
    fn name(&self) -> &str {
        "gl"
    }
    async fn mint(&self, req: &MintRequest<'_>) -> Result<Minted, ProviderError> {
        let mut t = self.tokens.lock().unwrap();
        let id = (t.len() + 100).to_string();
        t.push((req.target.into(), id.clone(), req.jti.into(), true));
        Ok(Minted {
            secret: Zeroizing::new(format!("glpat-{id}")),
            external_id: id,
            provider_expires_at_ms: 0,
        })
    }
    async fn revoke(&self, _target: &str, id: &str) -> Result<(), ProviderError> {
        self.revoked.lock().unwrap().push(id.to_owned());
        for t in self.tokens.lock().unwrap().iter_mut() {
            if t.1 == id {
                t.3 = false;
            }
        }
        Ok(())
    }
    async fn list_marked(&self, target: &str) -> Result<Vec<Listed>, ProviderError> {
        Ok(self
            .tokens
            .lock()
            .unwrap()
            .iter()
            .filter(|t| t.0 == target)
            .map(|t| Listed {
                external_id: t.1.clone(),
                jti: t.2.clone(),
                active: t.3,
            })
            .collect())
    }
}

const T0: i64 = 1_795_995_000;

struct World {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    fake: Arc<Fake>,
    set: Arc<RevocationSet>,
    clock: Arc<ManualClock>,
    reaper: Reaper,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("c.db"), Synchronous::Normal).unwrap());
    let fake = Arc::new(Fake::default());
    let set = Arc::new(RevocationSet::new());
    let clock = Arc::new(ManualClock::at_secs(T0));
    let providers = Providers::from_map(BTreeMap::from([(
        "gl".to_owned(),
        fake.clone() as Arc<dyn CredentialProvider>,
    )]));
    let reaper = Reaper {
        store: store.clone(),
        providers,
        revocations: set.clone(),
        clock: clock.clone(),
    };
    World {
        _dir: dir,
        store,
        fake,
        set,
        clock,
        reaper,
    }
}

impl World {
    /// Mints through the fake and records it as the exchange would.
    async fn issue(&self, project: &str, ttl_secs: i64) -> String {
        let now_ms = self.clock.now_millis();
        let jti = crate::mint::new_jti(now_ms).unwrap();
        self.store
            .note_downstream_target("gl", project, now_ms)
            .await
            .unwrap();
        let m = self
            .fake
            .mint(&MintRequest {
                jti: &jti,
                target: project,
                scopes: &["read_api".to_owned()],
                access_level: 20,
                ttl: Duration::from_secs(ttl_secs as u64),
                now_ms,
                description: String::new(),
            })
            .await
            .unwrap();
        let record = ExchangeRecord {
            replay: None,
            identity: Identity {
                issuer: "gitlab".into(),
                project_id: project.into(),
                namespace_id: "7".into(),
                role: "ci".into(),
                project_path: "g/p".into(),
                namespace_path: "g".into(),
                owner: "team".into(),
            },
            token: IssuedToken {
                jti: jti.clone(),
                kind: "gitlab_project_token".into(),
                audience: "gitlab:gl".into(),
                scope: "read_api".into(),
                issued_at_ms: now_ms,
                expires_at_ms: now_ms + ttl_secs * 1000,
                subject_jti: format!("id-{jti}"),
                pipeline_id: "1".into(),
                job_id: "2".into(),
                git_ref: "main".into(),
            },
            audit: AuditEvent {
                at_ms: now_ms,
                kind: AuditKind::ExchangeGranted,
                issuer: Some("gitlab".into()),
                role: Some("ci".into()),
                project_id: Some(project.into()),
                reason: None,
                detail: serde_json::json!({ "jti": jti }).into(),
            },
            downstream: Some(DownstreamRecord {
                provider: "gl".into(),
                target: project.into(),
                external_id: m.external_id,
                provider_expires_at_ms: 0,
            }),
        };
        self.store.commit_exchange(record).await.unwrap();
        jti
    }

    fn revoked(&self) -> Vec<String> {
        self.fake.revoked.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn a_credential_is_revoked_when_its_lifetime_ends_and_only_once() {
    let w = world();
    w.issue("42", 600).await;
    w.issue("42", 1200).await;
    assert_eq!(w.reaper.reap().await.unwrap().revoked, 0);
    assert!(w.revoked().is_empty());
    w.clock.advance_secs(600);
    assert_eq!(w.reaper.reap().await.unwrap().revoked, 1);
    assert_eq!(w.revoked(), ["100"]);
    // Marked: never revoked twice.
    assert_eq!(w.reaper.reap().await.unwrap().revoked, 0);
    w.clock.advance_secs(600);
    w.reaper.reap().await.unwrap();
    assert_eq!(w.revoked(), ["100", "101"]);
    assert!(w.store.outstanding_downstream(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_revocation_rule_ends_the_downstream_credential_before_its_lifetime() {
    let w = world();
    w.issue("42", 3600).await;
    let other = w.issue("43", 3600).await;
    w.clock.advance_secs(1);
    w.set.apply(&RevocationRule {
        id: 1,
        grain: Grain::Project,
        value: "42".into(),
        issuer: String::new(),
        issued_before_ms: w.clock.now_millis(),
    });
    assert_eq!(w.reaper.reap().await.unwrap().revoked, 1);
    assert_eq!(w.revoked(), ["100"]);
    let (o, revoked_at) = w.store.downstream(&other).await.unwrap().unwrap();
    assert_eq!(
        (o.downstream.external_id.as_str(), revoked_at),
        ("101", None)
    );
}

#[tokio::test]
async fn reconciliation_revokes_orphans_duplicates_and_nothing_else() {
    let w = world();
    let kept = w.issue("42", 3600).await;
    // A crash between mint and record: the provider holds a marked token
    // the store never heard of (its target was noted before minting).
    w.store.note_downstream_target("gl", "44", 0).await.unwrap();
    w.fake
        .tokens
        .lock()
        .unwrap()
        .push(("44".into(), "900".into(), "0190aaaa-orphan".into(), true));
    // A retried create: a second token with a recorded jti.
    w.fake
        .tokens
        .lock()
        .unwrap()
        .push(("42".into(), "901".into(), kept.clone(), true));
    assert_eq!(w.reaper.reconcile("gl").await.unwrap(), 2);
    let mut revoked = w.revoked();
    revoked.sort();
    assert_eq!(revoked, ["900", "901"]);
    // The recorded one is untouched, and a second pass finds nothing.
    assert_eq!(w.reaper.reconcile("gl").await.unwrap(), 0);
    assert_eq!(w.store.outstanding_downstream(10).await.unwrap().len(), 1);
}
