//! The in-memory revocation set and offboarding blocks: O(1) checks
//! whatever the number of rules.
//!
//! Readers take short read locks: jtis are spread over [`SHARDS`] locks so an
//! insert locks 1/64th of the set for the time of one hash insert, and the
//! cutoff maps (one entry per project, namespace, role or issuer, not per
//! credential) sit behind their own lock. A bulk load is built off-lock and
//! swapped in shard by shard. `arc-swap` of immutable maps was ruled out:
//! every rule would copy a map of up to a million jtis.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use foldhash::fast::RandomState;

use super::{Block, BlockGrain, Grain, RevocationRule};

/// jti shards: enough that writers rarely meet readers on the same lock.
pub const SHARDS: usize = 64;

/// How long after its credential's expiry a revoked jti is still held. A
/// token past `exp` is refused by verification before the set is asked;
/// the margin covers clocks that disagree between replicas.
pub const PRUNE_GRACE_MS: i64 = 10 * 60 * 1000;

/// How often [`RevocationSet::prune_if_due`] walks the jtis.
pub const PRUNE_EVERY_MS: i64 = 10 * 60 * 1000;

/// Whether a jti revoked for a credential expiring at `expires_at_ms` no
/// longer needs holding at `now_ms`.
pub fn outlived(expires_at_ms: i64, now_ms: i64) -> bool {
    expires_at_ms.saturating_add(PRUNE_GRACE_MS) <= now_ms
}

/// The credential being checked, as its signed claims describe it.
#[derive(Debug, Clone, Copy)]
pub struct Credential<'a> {
    /// Token id.
    pub jti: &'a str,
    /// Configured issuer name of the job's ID token.
    pub issuer: &'a str,
    /// Project id (the project the job ran in).
    pub project_id: &'a str,
    /// Namespace id (of the ID token's project).
    pub namespace_id: &'a str,
    /// The namespace the job runs in: the same as `namespace_id` except in
    /// fork merge-request pipelines. A namespace rule on either covers the
    /// credential, as offboarding blocks do.
    pub job_namespace_id: &'a str,
    /// Role granted.
    pub role: &'a str,
    /// Issue time, milliseconds.
    pub issued_at_ms: i64,
}

/// Per id: the issuers it applies to (`""` = every issuer) and the newest
/// cutoff for each. Almost always one entry, so a scan beats a second map.
type Scoped = HashMap<Box<str>, Vec<(Box<str>, i64)>, RandomState>;

#[derive(Default)]
struct Cutoffs {
    project: Scoped,
    namespace: Scoped,
    role: HashMap<Box<str>, i64, RandomState>,
    issuer: HashMap<Box<str>, i64, RandomState>,
}

#[derive(Default)]
struct Blocks {
    project: HashMap<Box<str>, Vec<Box<str>>, RandomState>,
    namespace: HashMap<Box<str>, Vec<Box<str>>, RandomState>,
    role: HashSet<Box<str>, RandomState>,
}

/// Revoked credentials and blocked identities, checked in O(1).
pub struct RevocationSet {
    hasher: RandomState,
    /// UUID jtis (all of cistern's own) as 128-bit integers, each with its
    /// credential's expiry (ms; `i64::MAX` when unknown), so a jti is let go
    /// once its credential has expired ([`Self::prune_if_due`]): revoking
    /// their own token at the end of every job would otherwise grow the set
    /// by one entry per job for ever.
    uuids: Vec<RwLock<HashMap<u128, i64, RandomState>>>,
    /// Any other jti an operator named.
    others: RwLock<HashSet<Box<str>, RandomState>>,
    cutoffs: RwLock<Cutoffs>,
    /// `all`: everything issued before this instant (ms); `i64::MIN` if none.
    all: AtomicI64,
    blocks: RwLock<Blocks>,
    /// Highest rule id applied from the store.
    last_seen: AtomicI64,
    /// When the jtis were last pruned (ms).
    last_pruned: AtomicI64,
}

impl std::fmt::Debug for RevocationSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocationSet")
            .field("jtis", &self.jti_count())
            .field("last_seen", &self.last_seen())
            .finish_non_exhaustive()
    }
}

impl Default for RevocationSet {
    fn default() -> Self {
        Self::new()
    }
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    // Writers only insert into or replace whole maps; a panic cannot leave
    // one half-updated, so a poisoned lock is still consistent.
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

fn raise(slot: &mut i64, cutoff: i64) {
    *slot = (*slot).max(cutoff);
}

fn raise_scoped(map: &mut Scoped, id: &str, issuer: &str, cutoff: i64) {
    let entries = map.entry(id.into()).or_default();
    match entries.iter_mut().find(|(i, _)| &**i == issuer) {
        Some((_, c)) => raise(c, cutoff),
        None => entries.push((issuer.into(), cutoff)),
    }
}

fn scoped_cutoff(map: &Scoped, id: &str, issuer: &str) -> i64 {
    map.get(id).map_or(i64::MIN, |entries| {
        entries
            .iter()
            .filter(|(i, _)| i.is_empty() || &**i == issuer)
            .map(|(_, c)| *c)
            .max()
            .unwrap_or(i64::MIN)
    })
}

/// Holds `id` until `expires` (a known expiry replaces an unknown one).
fn hold(shard: &mut HashMap<u128, i64, RandomState>, id: u128, expires: Option<i64>) {
    let slot = shard.entry(id).or_insert(i64::MAX);
    if let Some(e) = expires {
        *slot = e;
    }
}

fn uuid_of(jti: &str) -> Option<u128> {
    // Only the canonical hyphenated form, so one jti has one key.
    (jti.len() == 36)
        .then(|| uuid::Uuid::try_parse(jti).ok())
        .flatten()
        .map(|u| u.as_u128())
}

impl RevocationSet {
    /// An empty set.
    pub fn new() -> Self {
        Self {
            hasher: RandomState::default(),
            uuids: (0..SHARDS).map(|_| RwLock::default()).collect(),
            others: RwLock::default(),
            cutoffs: RwLock::default(),
            all: AtomicI64::new(i64::MIN),
            blocks: RwLock::default(),
            last_seen: AtomicI64::new(0),
            last_pruned: AtomicI64::new(i64::MIN),
        }
    }

    fn shard(&self, id: u128) -> usize {
        (self.hasher.hash_one(id) as usize) % SHARDS
    }

    /// Whether `c` is revoked: its jti was revoked, or a rule matching its
    /// issuer, project, namespace or role (or `all`) cut off credentials
    /// issued before a time after `c.issued_at_ms`.
    pub fn is_revoked(&self, c: &Credential<'_>) -> bool {
        if c.issued_at_ms < self.all.load(Ordering::Acquire) {
            return true;
        }
        let jti_revoked = match uuid_of(c.jti) {
            Some(id) => read(&self.uuids[self.shard(id)]).contains_key(&id),
            None => read(&self.others).contains(c.jti),
        };
        if jti_revoked {
            return true;
        }
        let cut = read(&self.cutoffs);
        let newest = scoped_cutoff(&cut.project, c.project_id, c.issuer)
            .max(scoped_cutoff(&cut.namespace, c.namespace_id, c.issuer))
            .max(if c.job_namespace_id == c.namespace_id {
                i64::MIN
            } else {
                scoped_cutoff(&cut.namespace, c.job_namespace_id, c.issuer)
            })
            .max(cut.role.get(c.role).copied().unwrap_or(i64::MIN))
            .max(cut.issuer.get(c.issuer).copied().unwrap_or(i64::MIN));
        c.issued_at_ms < newest
    }

    /// Applies one rule (idempotent). Does not move [`Self::last_seen`]:
    /// a rule this server just made may have a higher id than rules another
    /// process wrote that the poll has not read yet.
    pub fn apply(&self, rule: &RevocationRule) {
        self.apply_expiring(rule, None);
    }

    /// [`Self::apply`], knowing when a jti rule's credential expires.
    pub fn apply_expiring(&self, rule: &RevocationRule, expires_at_ms: Option<i64>) {
        let cutoff = rule.issued_before_ms;
        match rule.grain {
            Grain::Jti => match uuid_of(&rule.value) {
                Some(id) => {
                    hold(&mut write(&self.uuids[self.shard(id)]), id, expires_at_ms);
                }
                None => {
                    write(&self.others).insert(rule.value.as_str().into());
                }
            },
            Grain::All => {
                self.all.fetch_max(cutoff, Ordering::AcqRel);
            }
            Grain::Project => raise_scoped(
                &mut write(&self.cutoffs).project,
                &rule.value,
                &rule.issuer,
                cutoff,
            ),
            Grain::Namespace => raise_scoped(
                &mut write(&self.cutoffs).namespace,
                &rule.value,
                &rule.issuer,
                cutoff,
            ),
            Grain::Role => raise(
                write(&self.cutoffs)
                    .role
                    .entry(rule.value.as_str().into())
                    .or_insert(i64::MIN),
                cutoff,
            ),
            Grain::Issuer => raise(
                write(&self.cutoffs)
                    .issuer
                    .entry(rule.value.as_str().into())
                    .or_insert(i64::MIN),
                cutoff,
            ),
        }
    }

    /// Applies every rule read from the store (start-up load and poll) and
    /// moves [`Self::last_seen`] to the highest id. jtis are grouped by
    /// shard off-lock, so each shard lock is taken once.
    pub fn apply_all(&self, rules: &[RevocationRule]) {
        self.apply_all_expiring(rules.iter().map(|r| (r, None)));
        if let Some(max) = rules.iter().map(|r| r.id).max() {
            self.mark_seen(max);
        }
    }

    /// Applies rules with their credentials' expiries (as read from the
    /// store) without moving [`Self::last_seen`]; see [`Self::mark_seen`].
    pub fn apply_all_expiring<'a>(
        &self,
        rules: impl IntoIterator<Item = (&'a RevocationRule, Option<i64>)>,
    ) {
        let mut by_shard: Vec<Vec<(u128, Option<i64>)>> = vec![Vec::new(); SHARDS];
        for (rule, expires) in rules {
            match (rule.grain, uuid_of(&rule.value)) {
                (Grain::Jti, Some(id)) => by_shard[self.shard(id)].push((id, expires)),
                _ => self.apply_expiring(rule, expires),
            }
        }
        for (shard, ids) in self.uuids.iter().zip(by_shard) {
            if !ids.is_empty() {
                let mut shard = write(shard);
                for (id, expires) in ids {
                    hold(&mut shard, id, expires);
                }
            }
        }
    }

    /// Moves [`Self::last_seen`] to `id` (if higher): every rule up to it
    /// has been read from the store.
    pub fn mark_seen(&self, id: i64) {
        self.last_seen.fetch_max(id, Ordering::AcqRel);
    }

    /// Lets go of jtis whose credentials have [`outlived`] their expiry, at
    /// most once per [`PRUNE_EVERY_MS`]. Returns how many went, or `None`
    /// when it was not yet due.
    pub fn prune_if_due(&self, now_ms: i64) -> Option<usize> {
        let last = self.last_pruned.load(Ordering::Acquire);
        if now_ms.saturating_sub(last) < PRUNE_EVERY_MS
            || self
                .last_pruned
                .compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return None;
        }
        Some(self.prune(now_ms))
    }

    /// Lets go of every jti whose credential has [`outlived`] its expiry.
    pub fn prune(&self, now_ms: i64) -> usize {
        self.uuids
            .iter()
            .map(|shard| {
                let mut shard = write(shard);
                let before = shard.len();
                shard.retain(|_, expires| !outlived(*expires, now_ms));
                before - shard.len()
            })
            .sum()
    }

    /// Highest rule id read from the store and applied (0 if none).
    pub fn last_seen(&self) -> i64 {
        self.last_seen.load(Ordering::Acquire)
    }

    /// Revoked jtis held.
    pub fn jti_count(&self) -> usize {
        self.uuids.iter().map(|s| read(s).len()).sum::<usize>() + read(&self.others).len()
    }

    /// The block that refuses new exchanges for this identity, if any.
    /// `namespace_ids` lists every namespace the job belongs to (the job's
    /// and the token's, which differ in fork pipelines).
    pub fn blocked(
        &self,
        issuer: &str,
        project_id: &str,
        namespace_ids: &[&str],
        role: &str,
    ) -> Option<BlockGrain> {
        let b = read(&self.blocks);
        let scoped = |list: Option<&Vec<Box<str>>>| {
            list.is_some_and(|l| l.iter().any(|i| i.is_empty() || &**i == issuer))
        };
        if scoped(b.project.get(project_id)) {
            return Some(BlockGrain::Project);
        }
        if namespace_ids.iter().any(|n| scoped(b.namespace.get(*n))) {
            return Some(BlockGrain::Namespace);
        }
        b.role.contains(role).then_some(BlockGrain::Role)
    }

    /// Replaces every block with `blocks` (the offboarded table).
    pub fn set_blocks(&self, blocks: &[Block]) {
        let mut next = Blocks::default();
        for b in blocks {
            match b.grain {
                BlockGrain::Project => next
                    .project
                    .entry(b.value.as_str().into())
                    .or_default()
                    .push(b.issuer.as_str().into()),
                BlockGrain::Namespace => next
                    .namespace
                    .entry(b.value.as_str().into())
                    .or_default()
                    .push(b.issuer.as_str().into()),
                BlockGrain::Role => {
                    next.role.insert(b.value.as_str().into());
                }
            }
        }
        *write(&self.blocks) = next;
    }

    /// Adds one block (applied at once by the server that made it).
    pub fn add_block(&self, block: &Block) {
        let mut b = write(&self.blocks);
        let list = match block.grain {
            BlockGrain::Project => b.project.entry(block.value.as_str().into()).or_default(),
            BlockGrain::Namespace => b.namespace.entry(block.value.as_str().into()).or_default(),
            BlockGrain::Role => {
                b.role.insert(block.value.as_str().into());
                return;
            }
        };
        if !list.iter().any(|i| **i == *block.issuer) {
            list.push(block.issuer.as_str().into());
        }
    }

    /// Lifts one block.
    pub fn remove_block(&self, block: &Block) {
        let mut b = write(&self.blocks);
        let map = match block.grain {
            BlockGrain::Project => &mut b.project,
            BlockGrain::Namespace => &mut b.namespace,
            BlockGrain::Role => {
                b.role.remove(block.value.as_str());
                return;
            }
        };
        if let Some(list) = map.get_mut(block.value.as_str()) {
            list.retain(|i| **i != *block.issuer);
            if list.is_empty() {
                map.remove(block.value.as_str());
            }
        }
    }
}
