//! Read-only queries behind `cistern inventory`, `cistern report` and
//! `cistern policy diff`.
//!
//! An operator's CLI opens the database file directly, on one `query_only`
//! connection: no writer thread, no migration, nothing written. WAL lets it
//! read the last committed snapshot while a server keeps writing.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension};
use serde::Serialize;

use super::{db_err, read, schema};
use crate::store::{Identity, IssuedToken, StoreError, StoredIdentity};

/// A read-only view of a SQLite store.
pub struct InventoryReader {
    conn: Connection,
}

impl std::fmt::Debug for InventoryReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InventoryReader").finish_non_exhaustive()
    }
}

/// One path under which an id was seen (paths are display only: GitLab
/// reuses them, ids are forever).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PathSighting {
    /// Configured issuer name.
    pub issuer: String,
    /// Project id.
    pub project_id: String,
    /// Namespace id.
    pub namespace_id: String,
    /// Project path seen with these ids.
    pub project_path: String,
    /// Namespace path seen with these ids.
    pub namespace_path: String,
    /// First credential issued under this path (ms).
    pub first_seen_ms: i64,
}

/// A `revocations` row (schema v3): a rule, not a list of tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RevocationRule {
    /// Row id.
    pub id: i64,
    /// `jti`, `project`, `namespace`, `role`, `issuer` or `all`.
    pub grain: String,
    /// The jti, id, role or issuer (`''` for `all`).
    pub value: String,
    /// Scopes project and namespace ids (`''`: any issuer).
    pub issuer: String,
    /// Credentials issued before this instant are covered (ms).
    pub issued_before_ms: i64,
    /// When the revocation was asked for (ms).
    pub requested_at_ms: i64,
    /// When the running server started refusing (ms); `None` until then.
    pub effective_at_ms: Option<i64>,
    /// Who asked.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// Where the request came from (`rfc7009`, `admin`, `offboard`, …).
    pub source: String,
}

impl RevocationRule {
    /// Whether this rule revokes `token`, issued to `identity`.
    /// `issuer_url` is the configured URL of `identity.issuer` (rules may
    /// name an issuer by its configured name or by its URL).
    pub fn covers(&self, identity: &Identity, token: &IssuedToken, issuer_url: &str) -> bool {
        let same_issuer =
            |i: &str| i == identity.issuer || (!issuer_url.is_empty() && i == issuer_url);
        let scoped = self.issuer.is_empty() || same_issuer(&self.issuer);
        let matches = match self.grain.as_str() {
            // A jti is unique by itself: the rule names one credential.
            "jti" => return self.value == token.jti,
            "project" => scoped && self.value == identity.project_id,
            "namespace" => scoped && self.value == identity.namespace_id,
            "role" => scoped && self.value == identity.role,
            "issuer" => same_issuer(&self.value),
            "all" => scoped,
            // A grain this build does not know revokes nothing it can name;
            // never guess wider.
            _ => false,
        };
        matches && token.issued_at_ms < self.issued_before_ms
    }
}

/// Revocation rules indexed by (grain, value), so checking a credential
/// costs a handful of hash lookups however many rules there are.
#[derive(Debug, Default)]
pub struct RevocationIndex<'a> {
    by_key: HashMap<(&'a str, &'a str), Vec<&'a RevocationRule>>,
}

impl<'a> RevocationIndex<'a> {
    /// Indexes `rules`.
    pub fn new(rules: &'a [RevocationRule]) -> Self {
        let mut by_key: HashMap<(&str, &str), Vec<&RevocationRule>> = HashMap::new();
        for r in rules {
            by_key
                .entry((r.grain.as_str(), r.value.as_str()))
                .or_default()
                .push(r);
        }
        Self { by_key }
    }

    /// Whether any rule revokes `token` (see [`RevocationRule::covers`]).
    pub fn revoked(&self, identity: &Identity, token: &IssuedToken, issuer_url: &str) -> bool {
        let keys = [
            ("jti", token.jti.as_str()),
            ("project", identity.project_id.as_str()),
            ("namespace", identity.namespace_id.as_str()),
            ("role", identity.role.as_str()),
            ("issuer", identity.issuer.as_str()),
            ("issuer", issuer_url),
            ("all", ""),
        ];
        keys.iter()
            .filter_map(|k| self.by_key.get(k))
            .flatten()
            .any(|r| r.covers(identity, token, issuer_url))
    }
}

/// What `cistern report` needs of every revocation rule: how long each
/// took to take effect, and which have not yet.
#[derive(Debug, Clone, Default)]
pub struct RevocationTimes {
    /// `effective_at_ms - requested_at_ms` of every effective rule, unsorted.
    pub effective_ms: Vec<i64>,
    /// How many rules are not yet effective.
    pub pending_total: u64,
    /// The oldest of them (a bounded list).
    pub pending: Vec<RevocationRule>,
}

impl RevocationTimes {
    /// The times of `rules` (all pending ones listed).
    pub fn from_rules(rules: &[RevocationRule]) -> Self {
        Self {
            effective_ms: rules
                .iter()
                .filter_map(|r| {
                    r.effective_at_ms
                        .map(|e| e.saturating_sub(r.requested_at_ms))
                })
                .collect(),
            pending_total: rules.iter().filter(|r| r.effective_at_ms.is_none()).count() as u64,
            pending: rules
                .iter()
                .filter(|r| r.effective_at_ms.is_none())
                .cloned()
                .collect(),
        }
    }
}

fn rule_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RevocationRule> {
    Ok(RevocationRule {
        id: row.get(0)?,
        grain: row.get(1)?,
        value: row.get(2)?,
        issuer: row.get(3)?,
        issued_before_ms: row.get(4)?,
        requested_at_ms: row.get(5)?,
        effective_at_ms: row.get(6)?,
        actor: row.get(7)?,
        reason: row.get(8)?,
        source: row.get(9)?,
    })
}

/// An issued credential that has not expired yet, with its identity.
#[derive(Debug, Clone, Serialize)]
pub struct Credential {
    /// Who it was issued to.
    pub identity: Identity,
    /// The credential (its `jti`, never the token).
    pub token: IssuedToken,
}

/// A granted or denied exchange, as recorded in the audit log, with the
/// verified claims the job presented and what it asked for.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Audit sequence number.
    pub seq: i64,
    /// When (ms).
    pub at_ms: i64,
    /// Configured issuer name.
    pub issuer: String,
    /// `exchange_granted` or `exchange_denied`.
    pub kind: String,
    /// The audit detail, JSON text (holds `claims` and `request` since
    /// they are recorded).
    pub detail: String,
}

/// The health of cistern's own credential for one provider.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProviderCredentialHealth {
    /// Provider name.
    pub provider: String,
    /// Expiry date, when known.
    pub expires_on: Option<String>,
    /// When it was last loaded or rotated (ms).
    pub saved_at_ms: i64,
    /// The newest failed check or rotation since then.
    pub last_error: Option<String>,
}

impl InventoryReader {
    /// Opens the database at `path` for reading. A missing file is an error
    /// (it is never created here).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if !path.is_file() {
            return Err(StoreError::Unavailable(format!(
                "no store at {}",
                path.display()
            )));
        }
        let conn = schema::open_reader(path)?;
        read::ping(&conn)?;
        Ok(Self { conn })
    }

    /// cistern's own provider credentials: expiry, last save (load or
    /// rotation), and the newest failed check or rotation since then.
    pub fn provider_credentials(&self) -> Result<Vec<ProviderCredentialHealth>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT p.provider, p.expires_on, p.saved_at_ms,
                     (SELECT json_extract(a.detail, '$.error') FROM audit a
                      WHERE a.kind = 'admin_action' AND a.reason = 'provider_credential_error'
                        AND json_extract(a.detail, '$.provider') = p.provider
                        AND a.at_ms > p.saved_at_ms
                      ORDER BY a.seq DESC LIMIT 1)
                 FROM provider_credentials p ORDER BY p.provider",
            )
            .map_err(|e| db_err("read provider credentials", e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(ProviderCredentialHealth {
                    provider: r.get(0)?,
                    expires_on: r.get(1)?,
                    saved_at_ms: r.get(2)?,
                    last_error: r.get(3)?,
                })
            })
            .map_err(|e| db_err("read provider credentials", e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| db_err("read provider credentials", e))
    }

    /// Every identity, in key order.
    pub fn identities(&self) -> Result<Vec<StoredIdentity>, StoreError> {
        read::identities(&self.conn)
    }

    /// Credentials with `expires_at_ms > now_ms`, oldest first.
    pub fn unexpired(&self, now_ms: i64) -> Result<Vec<Credential>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT issuer, project_id, namespace_id, role, project_path, namespace_path, owner,
                        jti, kind, audience, scope, issued_at_ms, expires_at_ms, subject_jti,
                        pipeline_id, job_id, git_ref
                 FROM issued_tokens WHERE expires_at_ms > ?1 ORDER BY jti",
            )
            .map_err(|e| db_err("read issued tokens", e))?;
        let rows = stmt
            .query_map([now_ms], |row| {
                Ok(Credential {
                    identity: Identity {
                        issuer: row.get(0)?,
                        project_id: row.get(1)?,
                        namespace_id: row.get(2)?,
                        role: row.get(3)?,
                        project_path: row.get(4)?,
                        namespace_path: row.get(5)?,
                        owner: row.get(6)?,
                    },
                    token: IssuedToken {
                        jti: row.get(7)?,
                        kind: row.get(8)?,
                        audience: row.get(9)?,
                        scope: row.get(10)?,
                        issued_at_ms: row.get(11)?,
                        expires_at_ms: row.get(12)?,
                        subject_jti: row.get(13)?,
                        pipeline_id: row.get(14)?,
                        job_id: row.get(15)?,
                        git_ref: row.get(16)?,
                    },
                })
            })
            .map_err(|e| db_err("read issued tokens", e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| db_err("read issued tokens", e))
    }

    /// Every distinct (ids, paths) pair credentials were issued under.
    pub fn path_history(&self) -> Result<Vec<PathSighting>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT issuer, project_id, namespace_id, project_path, namespace_path,
                        MIN(issued_at_ms)
                 FROM issued_tokens
                 GROUP BY issuer, project_id, namespace_id, project_path, namespace_path
                 ORDER BY issuer, project_id, namespace_id, MIN(issued_at_ms)",
            )
            .map_err(|e| db_err("read path history", e))?;
        let rows = stmt
            .query_map([], |row| {
                Ok(PathSighting {
                    issuer: row.get(0)?,
                    project_id: row.get(1)?,
                    namespace_id: row.get(2)?,
                    project_path: row.get(3)?,
                    namespace_path: row.get(4)?,
                    first_seen_ms: row.get(5)?,
                })
            })
            .map_err(|e| db_err("read path history", e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| db_err("read path history", e))
    }

    /// Distinct (issuer, project, namespace, role, scope string) granted.
    pub fn granted_scopes(&self) -> Result<Vec<(Identity, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT DISTINCT issuer, project_id, namespace_id, role, scope FROM issued_tokens",
            )
            .map_err(|e| db_err("read granted scopes", e))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    Identity {
                        issuer: row.get(0)?,
                        project_id: row.get(1)?,
                        namespace_id: row.get(2)?,
                        role: row.get(3)?,
                        project_path: String::new(),
                        namespace_path: String::new(),
                        owner: String::new(),
                    },
                    row.get(4)?,
                ))
            })
            .map_err(|e| db_err("read granted scopes", e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| db_err("read granted scopes", e))
    }

    /// The policy file of the latest grant per (issuer, project id, role).
    pub fn latest_policy_files(&self) -> Result<Vec<(String, String, String, String)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT issuer, project_id, role, detail FROM audit
                 WHERE seq IN (SELECT MAX(seq) FROM audit WHERE kind = 'exchange_granted'
                               GROUP BY issuer, project_id, role)",
            )
            .map_err(|e| db_err("read grants", e))?;
        let rows = stmt
            .query_map([], |row| {
                Ok((
                    row.get::<_, Option<String>>(0)?,
                    row.get::<_, Option<String>>(1)?,
                    row.get::<_, Option<String>>(2)?,
                    row.get::<_, String>(3)?,
                ))
            })
            .map_err(|e| db_err("read grants", e))?;
        let mut out = Vec::new();
        for row in rows {
            let (issuer, project, role, detail) = row.map_err(|e| db_err("read grants", e))?;
            let (Some(issuer), Some(project), Some(role)) = (issuer, project, role) else {
                continue;
            };
            let file = serde_json::from_str::<serde_json::Value>(&detail)
                .ok()
                .and_then(|d| d.get("policy_file")?.as_str().map(str::to_owned));
            if let Some(file) = file {
                out.push((issuer, project, role, file));
            }
        }
        Ok(out)
    }

    fn has_revocations(&self) -> Result<bool, StoreError> {
        self.conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'revocations'",
                [],
                |row| row.get::<_, i64>(0),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(|e| db_err("read schema", e))
    }

    /// The revocation rules that can cover a credential unexpired at
    /// `now_ms`: `jti` rules naming one of them, and other rules whose
    /// `issued_before_ms` is later than the oldest of them. The revoked set
    /// may hold millions of `jti` rules for long-expired credentials; they
    /// are never loaded. None when the schema predates revocation (v3).
    pub fn revocations_covering(&self, now_ms: i64) -> Result<Vec<RevocationRule>, StoreError> {
        if !self.has_revocations()? {
            return Ok(Vec::new());
        }
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, grain, value, issuer, issued_before_ms, requested_at_ms,
                        effective_at_ms, actor, reason, source
                 FROM revocations
                 WHERE (grain = 'jti'
                        AND value IN (SELECT jti FROM issued_tokens WHERE expires_at_ms > ?1))
                    OR (grain != 'jti'
                        AND issued_before_ms > (SELECT COALESCE(MIN(issued_at_ms), 9223372036854775807)
                                                FROM issued_tokens WHERE expires_at_ms > ?1))
                 ORDER BY id",
            )
            .map_err(|e| db_err("read revocations", e))?;
        let rows = stmt
            .query_map([now_ms], rule_row)
            .map_err(|e| db_err("read revocations", e))?;
        rows.collect::<Result<_, _>>()
            .map_err(|e| db_err("read revocations", e))
    }

    /// Time-to-revoke of every rule, and the rules not yet effective
    /// (at most `pending_limit` listed, oldest first).
    pub fn revocation_times(&self, pending_limit: usize) -> Result<RevocationTimes, StoreError> {
        if !self.has_revocations()? {
            return Ok(RevocationTimes::default());
        }
        let mut stmt = self
            .conn
            .prepare(
                "SELECT effective_at_ms - requested_at_ms FROM revocations
                 WHERE effective_at_ms IS NOT NULL",
            )
            .map_err(|e| db_err("read revocations", e))?;
        let effective_ms = stmt
            .query_map([], |row| row.get::<_, i64>(0))
            .map_err(|e| db_err("read revocations", e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| db_err("read revocations", e))?;
        let pending_total: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM revocations WHERE effective_at_ms IS NULL",
                [],
                |row| row.get(0),
            )
            .map_err(|e| db_err("read revocations", e))?;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, grain, value, issuer, issued_before_ms, requested_at_ms,
                        effective_at_ms, actor, reason, source
                 FROM revocations WHERE effective_at_ms IS NULL ORDER BY id LIMIT ?1",
            )
            .map_err(|e| db_err("read revocations", e))?;
        let pending = stmt
            .query_map([i64::try_from(pending_limit).unwrap_or(i64::MAX)], rule_row)
            .map_err(|e| db_err("read revocations", e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| db_err("read revocations", e))?;
        Ok(RevocationTimes {
            pending_total: u64::try_from(pending_total).unwrap_or(0),
            effective_ms,
            pending,
        })
    }

    /// Calls `f` on every granted and denied exchange recorded at or after
    /// `since_ms`, oldest first, one row at a time (the window may hold
    /// millions). The detail is handed over as stored, unparsed.
    pub fn for_each_exchange_request(
        &self,
        since_ms: i64,
        mut f: impl FnMut(RecordedRequest),
    ) -> Result<(), StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT seq, at_ms, issuer, kind, detail FROM audit
                 WHERE kind IN ('exchange_granted', 'exchange_denied') AND at_ms >= ?1
                   AND issuer IS NOT NULL
                 ORDER BY seq",
            )
            .map_err(|e| db_err("read exchanges", e))?;
        let mut rows = stmt
            .query([since_ms])
            .map_err(|e| db_err("read exchanges", e))?;
        while let Some(row) = rows.next().map_err(|e| db_err("read exchanges", e))? {
            let get = |e| db_err("read exchanges", e);
            f(RecordedRequest {
                seq: row.get(0).map_err(get)?,
                at_ms: row.get(1).map_err(get)?,
                issuer: row.get(2).map_err(get)?,
                kind: row.get(3).map_err(get)?,
                detail: row.get(4).map_err(get)?,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            issuer: "gitlab".into(),
            project_id: "42".into(),
            namespace_id: "7".into(),
            role: "deploy".into(),
            project_path: "grp/proj".into(),
            namespace_path: "grp".into(),
            owner: "team".into(),
        }
    }

    fn token(jti: &str, issued_at_ms: i64) -> IssuedToken {
        IssuedToken {
            jti: jti.into(),
            kind: "access_token".into(),
            audience: "https://deploy.test".into(),
            scope: "deploy:read".into(),
            issued_at_ms,
            expires_at_ms: issued_at_ms + 600_000,
            subject_jti: "s".into(),
            pipeline_id: "1".into(),
            job_id: "2".into(),
            git_ref: "main".into(),
        }
    }

    fn rule(grain: &str, value: &str, issuer: &str, before: i64) -> RevocationRule {
        RevocationRule {
            id: 1,
            grain: grain.into(),
            value: value.into(),
            issuer: issuer.into(),
            issued_before_ms: before,
            requested_at_ms: before,
            effective_at_ms: None,
            actor: "a".into(),
            reason: "r".into(),
            source: "admin".into(),
        }
    }

    #[test]
    fn rules_cover_by_grain_issuer_and_issue_time() {
        let id = identity();
        let t = token("j1", 1_000);
        let url = "https://gitlab.example.com";
        assert!(rule("jti", "j1", "", 0).covers(&id, &t, url));
        assert!(!rule("jti", "j2", "", i64::MAX).covers(&id, &t, url));
        assert!(rule("project", "42", "", 2_000).covers(&id, &t, url));
        assert!(rule("project", "42", "gitlab", 2_000).covers(&id, &t, url));
        assert!(rule("project", "42", url, 2_000).covers(&id, &t, url));
        assert!(!rule("project", "42", "other", 2_000).covers(&id, &t, url));
        assert!(
            !rule("project", "42", "", 1_000).covers(&id, &t, url),
            "issued_before is strict"
        );
        assert!(!rule("project", "43", "", 2_000).covers(&id, &t, url));
        assert!(rule("namespace", "7", "", 2_000).covers(&id, &t, url));
        assert!(rule("role", "deploy", "", 2_000).covers(&id, &t, url));
        assert!(!rule("role", "build", "", 2_000).covers(&id, &t, url));
        assert!(rule("issuer", url, "", 2_000).covers(&id, &t, url));
        assert!(rule("issuer", "gitlab", "", 2_000).covers(&id, &t, url));
        assert!(rule("all", "", "", 2_000).covers(&id, &t, url));
        assert!(!rule("all", "", "", 500).covers(&id, &t, url));
        assert!(!rule("bogus", "42", "", 2_000).covers(&id, &t, url));
    }

    #[test]
    fn the_index_finds_the_rule_that_covers_a_credential() {
        let id = identity();
        let t = token("j1", 1_000);
        let url = "https://gitlab.example.com";
        let mut rules: Vec<RevocationRule> = (0..10_000)
            .map(|i| rule("jti", &format!("other-{i}"), "", i64::MAX))
            .collect();
        rules.push(rule("project", "43", "", i64::MAX));
        assert!(!RevocationIndex::new(&rules).revoked(&id, &t, url));
        for extra in [
            rule("jti", "j1", "", 0),
            rule("project", "42", "gitlab", 2_000),
            rule("issuer", url, "", 2_000),
            rule("all", "", "", 2_000),
        ] {
            let mut with = rules.clone();
            with.push(extra.clone());
            assert!(
                RevocationIndex::new(&with).revoked(&id, &t, url),
                "{extra:?}"
            );
        }
        rules.push(rule("role", "deploy", "", 1_000));
        assert!(
            !RevocationIndex::new(&rules).revoked(&id, &t, url),
            "issued after"
        );
    }

    #[test]
    fn only_rules_that_can_cover_an_unexpired_credential_are_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.db");
        drop(super::super::SqliteStore::open(&path, crate::config::Synchronous::Normal).unwrap());
        let conn = Connection::open(&path).unwrap();
        for (jti, issued, expires) in [("live", 5_000, 20_000), ("old", 1_000, 2_000)] {
            conn.execute(
                "INSERT INTO issued_tokens VALUES (?1, 'access_token', 'gitlab', '42', '7', 'deploy',
                     'grp/app', 'grp', 'team', 'aud', 'deploy:read', ?2, ?3, 's', '1', '2', 'main')",
                rusqlite::params![jti, issued, expires],
            )
            .unwrap();
        }
        for (grain, value, before, effective) in [
            ("jti", "live", 10_000, Some(10_007)),
            ("jti", "old", 10_000, Some(10_003)),
            ("project", "42", 4_000, Some(10_001)),
            ("project", "42", 6_000, None),
        ] {
            conn.execute(
                "INSERT INTO revocations (grain, value, issuer, issued_before_ms, requested_at_ms,
                     effective_at_ms, actor, reason, source)
                 VALUES (?1, ?2, '', ?3, 10000, ?4, 'a', 'r', 'admin')",
                rusqlite::params![grain, value, before, effective],
            )
            .unwrap();
        }
        let reader = InventoryReader::open(&path).unwrap();
        let covering: Vec<(String, String, i64)> = reader
            .revocations_covering(10_000)
            .unwrap()
            .into_iter()
            .map(|r| (r.grain, r.value, r.issued_before_ms))
            .collect();
        assert_eq!(
            covering,
            vec![
                ("jti".into(), "live".into(), 10_000),
                ("project".into(), "42".into(), 6_000),
            ]
        );
        let times = reader.revocation_times(10).unwrap();
        let mut ms = times.effective_ms.clone();
        ms.sort_unstable();
        assert_eq!(ms, [1, 3, 7]);
        assert_eq!(times.pending_total, 1);
        assert_eq!(reader.unexpired(10_000).unwrap().len(), 1);
        // Nothing is written: the reader refuses writes outright.
        assert!(reader.conn.execute("DELETE FROM revocations", []).is_err());
    }
}
