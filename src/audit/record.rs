//! The JSON Lines form of audit records and checkpoints: what the sinks
//! write, `cistern audit export` prints and `cistern audit verify --file`
//! reads back. One line per record:
//!
//! ```json
//! {"seq":7,"at_ms":1700000000000,"time":"2023-11-14T22:13:20.000Z","kind":"exchange_granted",
//!  "issuer":"gitlab","role":"deploy","project_id":"42","reason":null,"detail":{...},
//!  "prev_hash":"<64 hex>","hash":"<64 hex>"}
//! ```
//!
//! and one per signed checkpoint: `{"checkpoint":{"seq":…,"at_ms":…,"hash":…,"kid":…,"jws":…}}`.
//! `detail` is the stored JSON text, verbatim, so a line can be re-hashed.

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::chain::ChainFields;

/// A record line, borrowing its fields.
#[derive(Debug, Serialize)]
pub struct RecordLine<'a> {
    /// Sequence number.
    pub seq: i64,
    /// When it happened (ms since the epoch).
    pub at_ms: i64,
    /// The same instant, RFC 3339 UTC, for people and SIEMs.
    pub time: String,
    /// Event kind.
    pub kind: &'a str,
    /// Issuer name.
    pub issuer: Option<&'a str>,
    /// Role.
    pub role: Option<&'a str>,
    /// Project id.
    pub project_id: Option<&'a str>,
    /// Reason code.
    pub reason: Option<&'a str>,
    /// Detail JSON, verbatim.
    pub detail: &'a RawValue,
    /// Hex hash of the previous record.
    pub prev_hash: String,
    /// Hex hash of this record.
    pub hash: String,
}

impl<'a> RecordLine<'a> {
    /// The line for `fields` chained after `prev` with hash `hash`.
    pub fn new(f: &ChainFields<'a>, detail: &'a RawValue, prev: &[u8], hash: &[u8]) -> Self {
        RecordLine {
            seq: f.seq,
            at_ms: f.at_ms,
            time: rfc3339_millis(f.at_ms),
            kind: f.kind,
            issuer: f.issuer,
            role: f.role,
            project_id: f.project_id,
            reason: f.reason,
            detail,
            prev_hash: hex::encode(prev),
            hash: hex::encode(hash),
        }
    }

    /// Appends the line and its `\n` to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        // Serializing borrowed strings and a RawValue cannot fail.
        if serde_json::to_writer(&mut *out, self).is_ok() {
            out.push(b'\n');
        }
    }
}

/// A record line as read back (`audit verify --file`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordLineIn {
    /// Sequence number.
    pub seq: i64,
    /// When (ms).
    pub at_ms: i64,
    /// Informational; not hashed.
    #[serde(default)]
    pub time: Option<String>,
    /// Kind.
    pub kind: String,
    /// Issuer name.
    pub issuer: Option<String>,
    /// Role.
    pub role: Option<String>,
    /// Project id.
    pub project_id: Option<String>,
    /// Reason code.
    pub reason: Option<String>,
    /// Detail, verbatim.
    pub detail: Box<RawValue>,
    /// Hex hash of the previous record.
    pub prev_hash: String,
    /// Hex hash of this record.
    pub hash: String,
}

/// A signed checkpoint: the chain head at `seq`, signed by cistern's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointLine {
    /// The record the checkpoint covers up to (inclusive).
    pub seq: i64,
    /// When it was signed (ms).
    pub at_ms: i64,
    /// Hex hash of record `seq`.
    pub hash: String,
    /// The signing key.
    pub kid: String,
    /// Compact JWS over [`CheckpointPayload`].
    pub jws: String,
}

/// `{"checkpoint": …}`
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointWrapper {
    /// The checkpoint.
    pub checkpoint: CheckpointLine,
}

/// What a checkpoint's JWS signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointPayload {
    /// cistern's issuer URL (whose log this is).
    pub iss: String,
    /// Sequence number of the chain head.
    pub seq: i64,
    /// Hex hash of that record.
    pub hash: String,
    /// Signing time (ms).
    pub at_ms: i64,
}

/// The JWS `typ` of a checkpoint.
pub const CHECKPOINT_TYP: &str = "cistern-audit-checkpoint";

/// The last instant RFC 3339 can write (9999-12-31T23:59:59.999Z), in ms.
const RFC3339_MAX_MS: i64 = 253_402_300_799_999;

/// RFC 3339 UTC with milliseconds; the epoch for times before it. A time
/// past year 9999 (only an edited row holds one) is written as its number:
/// the formatter would fail on it, and a record line must never panic.
pub fn rfc3339_millis(at_ms: i64) -> String {
    if at_ms > RFC3339_MAX_MS {
        return format!("{at_ms} ms after the epoch (past year 9999)");
    }
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(at_ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod time_tests {
    use super::rfc3339_millis;

    #[test]
    fn every_instant_formats_without_panicking() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            rfc3339_millis(253_402_300_799_999),
            "9999-12-31T23:59:59.999Z"
        );
        assert!(rfc3339_millis(253_402_300_800_000).contains("past year 9999"));
        assert!(rfc3339_millis(i64::MAX).starts_with(&i64::MAX.to_string()));
    }
}
