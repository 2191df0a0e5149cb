//! Signed checkpoints: every so often the chain head (seq, hash) is signed
//! with cistern's current signing key and stored beside the log (and sent
//! to the sinks). A hash chain alone cannot show that its tail was cut off,
//! nor that someone rewrote it with fresh hashes; a signature over the head
//! can, for everything up to the newest checkpoint.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Clock;
use crate::mint::{KeyError, KeyRing};
use crate::store::{AuditHead, Store, StoreError};

use super::record::{CHECKPOINT_TYP, CheckpointLine, CheckpointPayload};

/// Why a checkpoint was not written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Signing failed.
    #[error("signing the checkpoint: {0}")]
    Sign(#[from] KeyError),
    /// The store failed.
    #[error("storing the checkpoint: {0}")]
    Store(#[from] StoreError),
}

/// Signs `head` as a checkpoint.
pub fn sign(
    keys: &KeyRing,
    issuer: &str,
    head: &AuditHead,
    at_ms: i64,
) -> Result<CheckpointLine, KeyError> {
    let payload = CheckpointPayload {
        iss: issuer.to_owned(),
        seq: head.seq,
        hash: hex::encode(head.hash),
        at_ms,
    };
    // A struct of strings and integers always serializes.
    let json = serde_json::to_vec(&payload).map_err(|_| KeyError::Sign)?;
    let (jws, kid) = keys.sign_compact_with_kid(CHECKPOINT_TYP, &json)?;
    Ok(CheckpointLine {
        seq: head.seq,
        at_ms,
        hash: payload.hash,
        kid,
        jws,
    })
}

/// Signs and stores a checkpoint of the current head if records were
/// appended since the last one. Returns the checkpoint written, if any.
pub async fn checkpoint_now(
    store: &dyn Store,
    keys: &KeyRing,
    clock: &dyn Clock,
    issuer: &str,
) -> Result<Option<CheckpointLine>, CheckpointError> {
    let status = store.audit_head().await?;
    let Some(head) = status.head else {
        return Ok(None);
    };
    if status.last_checkpoint.is_some_and(|c| c >= head.seq) {
        return Ok(None);
    }
    let line = sign(keys, issuer, &head, clock.now_millis())?;
    store.append_checkpoint(line.clone()).await?;
    Ok(Some(line))
}

/// When to checkpoint.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// At least this often while records arrive.
    pub interval: Duration,
    /// After at most this many new records.
    pub every: u64,
}

/// Runs forever: looks at the head at most once a second (or every
/// `interval` if shorter) and checkpoints when `interval` has passed or
/// `every` records arrived since the last checkpoint.
pub async fn run(
    store: Arc<dyn Store>,
    keys: Arc<KeyRing>,
    clock: Arc<dyn Clock>,
    issuer: String,
    schedule: Schedule,
) {
    let tick = schedule.interval.min(Duration::from_secs(1));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_at = tokio::time::Instant::now();
    loop {
        ticker.tick().await;
        let status = match store.audit_head().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "reading the audit chain head failed");
                continue;
            }
        };
        let Some(head) = status.head else { continue };
        let since = head.seq - status.last_checkpoint.unwrap_or(0);
        if since <= 0 {
            continue;
        }
        let due = last_at.elapsed() >= schedule.interval
            || u64::try_from(since).unwrap_or(0) >= schedule.every;
        if !due {
            continue;
        }
        match checkpoint_now(&*store, &keys, &*clock, &issuer).await {
            Ok(Some(c)) => tracing::debug!(seq = c.seq, kid = %c.kid, "audit checkpoint signed"),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "audit checkpoint failed"),
        }
        last_at = tokio::time::Instant::now();
    }
}
