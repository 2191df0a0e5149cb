//! Hot reload: a fully compiled new [`PolicySet`] replaces the old one
//! atomically, or the old one stays in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::set::{PolicyErrors, PolicySet, fingerprint_dir};
use crate::config::{CeilingConfig, IssuerConfig};
use crate::source::SourceError;

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// Whether the set in force changed (its fingerprint differs).
    pub changed: bool,
    /// Roles in force after the reload.
    pub roles: usize,
    /// Fingerprint of the set in force.
    pub fingerprint: String,
}

/// The policy set in force, and what it is loaded from.
#[derive(Debug)]
pub struct PolicyStore {
    current: ArcSwap<PolicySet>,
    dir: PathBuf,
    ceiling: CeilingConfig,
    issuers: BTreeMap<String, IssuerConfig>,
}

impl PolicyStore {
    /// Loads `dir` for the first time; any error is fatal to the caller.
    pub fn load(
        dir: &Path,
        ceiling: &CeilingConfig,
        issuers: &BTreeMap<String, IssuerConfig>,
    ) -> Result<Self, PolicyErrors> {
        let set = PolicySet::load_dir(dir, ceiling, issuers)?;
        Ok(Self {
            current: ArcSwap::from_pointee(set),
            dir: dir.to_path_buf(),
            ceiling: ceiling.clone(),
            issuers: issuers.clone(),
        })
    }

    /// The set in force. Hold the `Arc` for one whole decision.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// The directory policies are loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Recompiles the directory and swaps the new set in; on any error the
    /// old set stays in force and the errors are returned.
    pub fn reload(&self) -> Result<ReloadOutcome, PolicyErrors> {
        let new = PolicySet::load_dir(&self.dir, &self.ceiling, &self.issuers)?;
        let changed = new.fingerprint() != self.current.load().fingerprint();
        let outcome = ReloadOutcome {
            changed,
            roles: new.len(),
            fingerprint: new.fingerprint().to_owned(),
        };
        if changed {
            self.current.store(Arc::new(new));
        }
        Ok(outcome)
    }
}

/// Reloads on SIGHUP, and whenever the directory's fingerprint changes on
/// the poll interval (the compile is skipped while it is unchanged; a broken
/// directory is reported once per distinct content, not on every tick).
/// `on_result` is called after every attempted reload. File I/O and
/// compilation run on the blocking pool.
pub fn spawn_reloader(
    store: Arc<PolicyStore>,
    interval: Duration,
    on_result: Arc<dyn Fn(Result<ReloadOutcome, PolicyErrors>) + Send + Sync>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; policy reload polls only");
                None
            }
        };
        let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(100)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate
        // The last content looked at, loaded or not: polling recompiles only on change.
        let mut last_seen = store.current().fingerprint().to_owned();
        loop {
            let forced = tokio::select! {
                _ = ticker.tick() => false,
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => true,
            };
            let s = Arc::clone(&store);
            let seen = last_seen.clone();
            let job = tokio::task::spawn_blocking(move || {
                let now = match fingerprint_dir(s.dir()) {
                    Ok(f) => f,
                    Err(e) => format!("unreadable: {e}"),
                };
                if !forced && now == seen {
                    return (now, None);
                }
                (now, Some(s.reload()))
            });
            match job.await {
                Ok((now, result)) => {
                    last_seen = now;
                    if let Some(r) = result {
                        on_result(r);
                    }
                }
                Err(e) => on_result(Err(PolicyErrors(vec![SourceError {
                    file: store.dir().to_path_buf(),
                    line: None,
                    field: None,
                    message: format!("reload task failed: {e}"),
                }]))),
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::compile::tests::{BASE, ceiling, issuers};
    use super::*;

    fn store_with(text: &str) -> (tempfile::TempDir, PolicyStore) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("deploy.toml"), text).unwrap();
        let s = PolicyStore::load(d.path(), &ceiling(), &issuers()).unwrap();
        (d, s)
    }

    #[test]
    fn a_broken_file_keeps_the_old_set_in_force() {
        let (d, store) = store_with(BASE);
        let before = store.current();
        std::fs::write(d.path().join("broken.toml"), "role = \"x\"\nbogus = 1\n").unwrap();
        let e = store.reload().unwrap_err();
        assert!(e.to_string().contains("broken.toml:2: bogus"), "{e}");
        assert!(Arc::ptr_eq(&before, &store.current()));
        assert_eq!(store.current().len(), 1);
    }

    #[test]
    fn a_good_change_is_swapped_in_and_an_unchanged_directory_is_not() {
        let (d, store) = store_with(BASE);
        let before = store.current();
        let same = store.reload().unwrap();
        assert!(!same.changed);
        assert!(Arc::ptr_eq(&before, &store.current()));

        let other = BASE.replace("role = \"deploy\"", "role = \"deploy-2\"");
        std::fs::write(d.path().join("two.toml"), other).unwrap();
        let out = store.reload().unwrap();
        assert!(out.changed);
        assert_eq!(out.roles, 2);
        assert_eq!(out.fingerprint, store.current().fingerprint());
        assert_eq!(
            before.len(),
            1,
            "holders of the old set keep a consistent view"
        );
        assert!(store.current().role("deploy-2").is_some());
    }

    #[tokio::test]
    async fn the_reloader_picks_up_a_changed_directory_on_its_poll() {
        let (d, store) = store_with(BASE);
        let store = Arc::new(store);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let handle = spawn_reloader(
            Arc::clone(&store),
            Duration::from_millis(100),
            Arc::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        let other = BASE.replace("role = \"deploy\"", "role = \"deploy-2\"");
        std::fs::write(d.path().join("two.toml"), other).unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(r.changed);
        assert_eq!(store.current().len(), 2);

        // A broken file is reported once, not on every tick.
        std::fs::write(d.path().join("three.toml"), "nonsense").unwrap();
        let r = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(r.is_err());
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(rx.try_recv().is_err());
        assert_eq!(store.current().len(), 2);
        handle.abort();
    }
}
