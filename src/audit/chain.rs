//! The hash chain: one canonical encoding of a record, one hash function.
//!
//! `hash(n) = SHA-256(DOMAIN ‖ hash(n-1) ‖ encode(record n))`, with
//! `hash(0)` = 32 zero bytes. The encoding is length-prefixed binary over
//! the stored fields, so it is canonical without any JSON normalisation:
//! `detail` is hashed as the exact text stored (and exported), and two
//! different records can never encode to the same bytes.

use aws_lc_rs::digest::{Context, SHA256};

/// The hash before the first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// Domain separation: a record hash can never be confused with any other
/// SHA-256 cistern computes.
const DOMAIN: &[u8] = b"cistern-audit-v1\n";

/// The fields a record's hash covers, borrowed from wherever the record is
/// (the writer's event, a database row, an exported line).
#[derive(Debug, Clone, Copy)]
pub struct ChainFields<'a> {
    /// Sequence number.
    pub seq: i64,
    /// When it happened (ms).
    pub at_ms: i64,
    /// Event kind as stored.
    pub kind: &'a str,
    /// Issuer name.
    pub issuer: Option<&'a str>,
    /// Role.
    pub role: Option<&'a str>,
    /// Project id.
    pub project_id: Option<&'a str>,
    /// Reason code.
    pub reason: Option<&'a str>,
    /// Detail JSON text, exactly as stored.
    pub detail: &'a str,
}

/// [`ChainFields`], owned (a record read back from storage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedFields {
    /// Sequence number.
    pub seq: i64,
    /// When (ms).
    pub at_ms: i64,
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
    /// Detail JSON text.
    pub detail: String,
}

impl OwnedFields {
    /// Borrowed view for hashing.
    pub fn borrow(&self) -> ChainFields<'_> {
        ChainFields {
            seq: self.seq,
            at_ms: self.at_ms,
            kind: &self.kind,
            issuer: self.issuer.as_deref(),
            role: self.role.as_deref(),
            project_id: self.project_id.as_deref(),
            reason: self.reason.as_deref(),
            detail: &self.detail,
        }
    }
}

/// The hash of a record given the hash of the one before it.
pub fn record_hash(prev: &[u8; 32], f: &ChainFields<'_>) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(DOMAIN);
    ctx.update(prev);
    ctx.update(&f.seq.to_be_bytes());
    ctx.update(&f.at_ms.to_be_bytes());
    text(&mut ctx, Some(f.kind));
    text(&mut ctx, f.issuer);
    text(&mut ctx, f.role);
    text(&mut ctx, f.project_id);
    text(&mut ctx, f.reason);
    text(&mut ctx, Some(f.detail));
    let digest = ctx.finish();
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// `0` for absent; `1`, a 64-bit length, then the bytes for present. An
/// absent value and an empty one differ.
fn text(ctx: &mut Context, value: Option<&str>) {
    match value {
        None => ctx.update(&[0]),
        Some(v) => {
            ctx.update(&[1]);
            ctx.update(&(v.len() as u64).to_be_bytes());
            ctx.update(v.as_bytes());
        }
    }
}

/// A stored hash (a 32-byte BLOB) as an array; `None` if it is not 32 bytes.
pub fn hash_from_slice(bytes: &[u8]) -> Option<[u8; 32]> {
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(detail: &str) -> ChainFields<'_> {
        ChainFields {
            seq: 1,
            at_ms: 1000,
            kind: "exchange_granted",
            issuer: Some("gitlab"),
            role: None,
            project_id: Some("42"),
            reason: None,
            detail,
        }
    }

    #[test]
    fn every_field_and_the_previous_hash_change_the_hash() {
        let base = record_hash(&GENESIS, &fields("{}"));
        assert_ne!(base, record_hash(&[1; 32], &fields("{}")));
        assert_ne!(base, record_hash(&GENESIS, &fields("{ }")));
        let mut f = fields("{}");
        f.seq = 2;
        assert_ne!(base, record_hash(&GENESIS, &f));
        let mut f = fields("{}");
        f.at_ms = 1001;
        assert_ne!(base, record_hash(&GENESIS, &f));
        let mut f = fields("{}");
        f.role = Some("");
        assert_ne!(base, record_hash(&GENESIS, &f), "absent differs from empty");
        // Moving bytes between adjacent fields changes the encoding.
        let mut a = fields("{}");
        a.issuer = Some("ab");
        a.role = Some("c");
        let mut b = fields("{}");
        b.issuer = Some("a");
        b.role = Some("bc");
        assert_ne!(record_hash(&GENESIS, &a), record_hash(&GENESIS, &b));
        assert_eq!(base, record_hash(&GENESIS, &fields("{}")), "deterministic");
    }
}
