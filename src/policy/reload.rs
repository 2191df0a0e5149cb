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
        let mut hangup =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
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
