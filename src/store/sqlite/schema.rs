//! The database file, its connections and its schema.
//!
//! Files are created owner-only before SQLite ever touches them, and the
//! modes are set explicitly afterwards so the process umask cannot loosen
//! them. Migrations are numbered, run once each inside one `BEGIN IMMEDIATE`
//! transaction, and only ever move forward: a database written by a newer
//! cistern is refused rather than guessed at.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::db_err;
use crate::config::Synchronous;
use crate::store::StoreError;

/// How long a connection waits on a lock before failing with `SQLITE_BUSY`.
/// Only the writer takes write locks, so this covers checkpoints and a
/// second process (e.g. an operator's CLI) briefly holding the database.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Forward-only migrations, applied in order. Never edit a released entry;
/// append a new one instead.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, MIGRATION_1),
    (2, MIGRATION_2),
    (3, MIGRATION_3),
    (4, MIGRATION_4),
    (5, MIGRATION_5),
    (6, MIGRATION_6),
    (7, MIGRATION_7),
];

/// The initial schema. Times are integer milliseconds since the epoch, ids
/// are text, and `detail` is JSON text, so the same shape maps onto any SQL
/// store. Tables keyed by a composite text key are `WITHOUT ROWID`: one
/// B-tree per insert instead of a rowid table plus a unique index.
const MIGRATION_1: &str = "
CREATE TABLE replay (
    issuer        TEXT    NOT NULL,
    jti           TEXT    NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (issuer, jti)
) WITHOUT ROWID;
CREATE INDEX replay_expires ON replay (expires_at_ms);

CREATE TABLE issued_tokens (
    jti            TEXT    NOT NULL PRIMARY KEY,
    kind           TEXT    NOT NULL,
    issuer         TEXT    NOT NULL,
    project_id     TEXT    NOT NULL,
    namespace_id   TEXT    NOT NULL,
    role           TEXT    NOT NULL,
    project_path   TEXT    NOT NULL,
    namespace_path TEXT    NOT NULL,
    owner          TEXT    NOT NULL,
    audience       TEXT    NOT NULL,
    scope          TEXT    NOT NULL,
    issued_at_ms   INTEGER NOT NULL,
    expires_at_ms  INTEGER NOT NULL,
    subject_jti    TEXT    NOT NULL,
    pipeline_id    TEXT    NOT NULL,
    job_id         TEXT    NOT NULL,
    git_ref        TEXT    NOT NULL
);
CREATE INDEX issued_tokens_project ON issued_tokens (issuer, project_id);
CREATE INDEX issued_tokens_role ON issued_tokens (role);
CREATE INDEX issued_tokens_expires ON issued_tokens (expires_at_ms);

CREATE TABLE identities (
    issuer         TEXT    NOT NULL,
    project_id     TEXT    NOT NULL,
    namespace_id   TEXT    NOT NULL,
    role           TEXT    NOT NULL,
    project_path   TEXT    NOT NULL,
    namespace_path TEXT    NOT NULL,
    owner          TEXT    NOT NULL,
    first_seen_ms  INTEGER NOT NULL,
    last_used_ms   INTEGER NOT NULL,
    exchanges      INTEGER NOT NULL,
    PRIMARY KEY (issuer, project_id, namespace_id, role)
) WITHOUT ROWID;

-- AUTOINCREMENT so a sequence number is never reused, even if a retention
-- job ever trims the tail. prev_hash/hash are reserved for the hash chain.
CREATE TABLE audit (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms      INTEGER NOT NULL,
    kind       TEXT    NOT NULL,
    issuer     TEXT,
    role       TEXT,
    project_id TEXT,
    reason     TEXT,
    detail     TEXT    NOT NULL,
    prev_hash  BLOB,
    hash       BLOB
);
";

/// Write locality, measured under load (BENCHMARKS.md): each insert into a
/// B-tree with a random key dirties its own page, and every dirty page is a
/// 4 KiB WAL frame copied and checksummed at commit. So every key now grows
/// at one edge:
/// - `replay` is keyed by the ID token's expiry first. A replay is the same
///   token again, so it has the same `exp` as well as the same `jti`; expired
///   rows are pruned by a range on the key, and no second index is kept.
/// - `issued_tokens` is keyed by cistern's own `jti`, a UUID v7 with
///   millisecond time, without a second rowid tree. Revocation checks run in
///   memory and by rule, so only the expiry index is kept (outstanding
///   credentials are the unexpired ones).
/// - `audit` gives up `AUTOINCREMENT` (one `sqlite_sequence` write per
///   record): the log is append-only, so its newest `seq` is never deleted
///   and never reused.
const MIGRATION_2: &str = "
CREATE TABLE replay_v2 (
    expires_at_ms INTEGER NOT NULL,
    issuer        TEXT    NOT NULL,
    jti           TEXT    NOT NULL,
    PRIMARY KEY (expires_at_ms, issuer, jti)
) WITHOUT ROWID;
INSERT INTO replay_v2 (expires_at_ms, issuer, jti) SELECT expires_at_ms, issuer, jti FROM replay;
DROP TABLE replay;
ALTER TABLE replay_v2 RENAME TO replay;

CREATE TABLE issued_tokens_v2 (
    jti            TEXT    NOT NULL PRIMARY KEY,
    kind           TEXT    NOT NULL,
    issuer         TEXT    NOT NULL,
    project_id     TEXT    NOT NULL,
    namespace_id   TEXT    NOT NULL,
    role           TEXT    NOT NULL,
    project_path   TEXT    NOT NULL,
    namespace_path TEXT    NOT NULL,
    owner          TEXT    NOT NULL,
    audience       TEXT    NOT NULL,
    scope          TEXT    NOT NULL,
    issued_at_ms   INTEGER NOT NULL,
    expires_at_ms  INTEGER NOT NULL,
    subject_jti    TEXT    NOT NULL,
    pipeline_id    TEXT    NOT NULL,
    job_id         TEXT    NOT NULL,
    git_ref        TEXT    NOT NULL
) WITHOUT ROWID;
INSERT INTO issued_tokens_v2 SELECT jti, kind, issuer, project_id, namespace_id, role,
    project_path, namespace_path, owner, audience, scope, issued_at_ms, expires_at_ms,
    subject_jti, pipeline_id, job_id, git_ref FROM issued_tokens;
DROP TABLE issued_tokens;
ALTER TABLE issued_tokens_v2 RENAME TO issued_tokens;
CREATE INDEX issued_tokens_expires ON issued_tokens (expires_at_ms);

CREATE TABLE audit_v2 (
    seq        INTEGER PRIMARY KEY,
    at_ms      INTEGER NOT NULL,
    kind       TEXT    NOT NULL,
    issuer     TEXT,
    role       TEXT,
    project_id TEXT,
    reason     TEXT,
    detail     TEXT    NOT NULL,
    prev_hash  BLOB,
    hash       BLOB
);
INSERT INTO audit_v2 SELECT seq, at_ms, kind, issuer, role, project_id, reason, detail,
    prev_hash, hash FROM audit;
DROP TABLE audit;
ALTER TABLE audit_v2 RENAME TO audit;
";

/// Credential lifecycle: revocation rules, offboarding blocks and signed
/// audit checkpoints.
/// - `revocations`: one row per revocation rule. `grain` is `jti`,
///   `project`, `namespace`, `role`, `issuer` or `all`; `value` the jti, id,
///   role or issuer URL (`''` for `all`); `issuer` scopes project and
///   namespace ids, which are only unique per issuer (`''` when the grain
///   needs none). A credential matching the rule and issued before
///   `issued_before_ms` is revoked. `requested_at_ms` is when the request
///   arrived, `effective_at_ms` when the running server's check started
///   refusing (NULL until then): time-to-revoke is measured, not claimed.
/// - `offboarded`: persisted blocks on new exchanges, until re-enabled.
/// - `audit_checkpoints`: the chain head at `seq`, signed (a compact JWS).
const MIGRATION_3: &str = "
CREATE TABLE revocations (
    id               INTEGER PRIMARY KEY,
    grain            TEXT    NOT NULL,
    value            TEXT    NOT NULL,
    issuer           TEXT    NOT NULL DEFAULT '',
    issued_before_ms INTEGER NOT NULL,
    requested_at_ms  INTEGER NOT NULL,
    effective_at_ms  INTEGER,
    actor            TEXT    NOT NULL,
    reason           TEXT    NOT NULL,
    source           TEXT    NOT NULL
);

CREATE TABLE offboarded (
    grain   TEXT    NOT NULL,
    issuer  TEXT    NOT NULL,
    value   TEXT    NOT NULL,
    actor   TEXT    NOT NULL,
    reason  TEXT    NOT NULL,
    at_ms   INTEGER NOT NULL,
    PRIMARY KEY (grain, issuer, value)
) WITHOUT ROWID;

CREATE TABLE audit_checkpoints (
    seq    INTEGER PRIMARY KEY,
    at_ms  INTEGER NOT NULL,
    hash   BLOB    NOT NULL,
    kid    TEXT    NOT NULL,
    jws    TEXT    NOT NULL
);
";

/// The expiry sweep's watermark: every issued credential at or below
/// `(expires_at_ms, jti)` has its `credential_expired` audit record.
const MIGRATION_4: &str = "
CREATE TABLE expiry_sweep (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    expires_at_ms INTEGER NOT NULL,
    jti           TEXT    NOT NULL
);
";

/// Downstream credentials (GitLab access tokens, …): where each lives and
/// whether the provider has revoked it. Outstanding ones (no
/// `revoked_at_ms`) are what the reaper walks, soonest expiry first.
/// `downstream_targets` is written *before* a provider is asked to mint
/// on a target, so reconciliation lists every place a credential could be,
/// even one minted just before a crash.
const MIGRATION_5: &str = "
CREATE TABLE downstream_credentials (
    jti                    TEXT    NOT NULL PRIMARY KEY,
    provider               TEXT    NOT NULL,
    target                 TEXT    NOT NULL,
    external_id            TEXT    NOT NULL,
    provider_expires_at_ms INTEGER NOT NULL,
    expires_at_ms          INTEGER NOT NULL,
    revoked_at_ms          INTEGER,
    revoke_cause           TEXT
) WITHOUT ROWID;
CREATE INDEX downstream_outstanding ON downstream_credentials (expires_at_ms)
    WHERE revoked_at_ms IS NULL;
CREATE TABLE downstream_targets (
    provider    TEXT    NOT NULL,
    target      TEXT    NOT NULL,
    first_at_ms INTEGER NOT NULL,
    PRIMARY KEY (provider, target)
) WITHOUT ROWID;
";

/// cistern's own provider credentials, sealed (AES-256-GCM under a KEK
/// that is never stored): one row per provider, replaced whole on rotation.
const MIGRATION_6: &str = "
CREATE TABLE provider_credentials (
    provider   TEXT    NOT NULL PRIMARY KEY,
    nonce      BLOB    NOT NULL,
    ciphertext BLOB    NOT NULL,
    expires_on TEXT,
    saved_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
";

/// `replay` becomes append-only: rows in the order tokens were consumed
/// (`seq`, the rowid), looked up in memory by the writer (`replay.rs`).
/// Keyed by `(exp, issuer, jti)`, every insert had landed at a random place
/// among the tokens expiring in the same second: one dirty page, WAL frame
/// and checkpoint copy per exchange under load. The expiry index serves
/// pruning and the dry run's lookup; both of its keys grow with time.
const MIGRATION_7: &str = "
CREATE TABLE replay_v3 (
    seq           INTEGER PRIMARY KEY,
    expires_at_ms INTEGER NOT NULL,
    issuer        TEXT    NOT NULL,
    jti           TEXT    NOT NULL
);
INSERT INTO replay_v3 (expires_at_ms, issuer, jti)
    SELECT expires_at_ms, issuer, jti FROM replay ORDER BY expires_at_ms;
DROP TABLE replay;
ALTER TABLE replay_v3 RENAME TO replay;
CREATE INDEX replay_expires ON replay (expires_at_ms);
";

/// Creates the missing parent directories (0700) and the database file
/// (0600), then tightens the file to 0600 even if it already existed.
pub(super) fn prepare_files(path: &Path) -> Result<(), StoreError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dirs(parent)?;
    }
    create_private_file(path)?;
    restrict(path, 0o600)
}

/// Sets 0600 on the `-wal` and `-shm` companions that exist.
pub(super) fn restrict_companions(path: &Path) -> Result<(), StoreError> {
    for suffix in ["-wal", "-shm"] {
        let companion = companion_path(path, suffix);
        if companion.exists() {
            restrict(&companion, 0o600)?;
        }
    }
    Ok(())
}

/// `path` with `suffix` appended to its file name (`cistern.db-wal`).
pub(super) fn companion_path(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Creates each missing ancestor in turn so that exactly the directories we
/// create, and no pre-existing one, get mode 0700.
fn create_private_dirs(dir: &Path) -> Result<(), StoreError> {
    // A relative path ends in the empty path, which is the current directory.
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => restrict(d, 0o700)?,
            // Lost a race with another creator: it is theirs, leave its mode.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create directory", d, &e)),
        }
    }
    Ok(())
}

fn create_private_file(path: &Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
        .open(path)
        .map(drop)
        .map_err(|e| io_err("create database file", path, &e))
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_err("set permissions on", path, &e))
}

#[cfg(not(unix))]
fn restrict(_path: &Path, _mode: u32) -> Result<(), StoreError> {
    Ok(())
}

fn io_err(action: &str, path: &Path, e: &std::io::Error) -> StoreError {
    StoreError::Database(format!("cannot {action} {}: {e}", path.display()))
}

/// Opens the writer's connection: WAL, the configured `synchronous`, and
/// the shared per-connection settings.
pub(super) fn open_writer(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
    let conn = open_configured(path)?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| db_err("set journal_mode", e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Database(format!(
            "database refused WAL journal mode (got {mode})"
        )));
    }
    let sync = match synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)
        .map_err(|e| db_err("set synchronous", e))?;
    // Checkpoints run on their own connection and thread (`checkpoint.rs`),
    // never inside a commit that requests are waiting for.
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(|e| db_err("set wal_autocheckpoint", e))?;
    // Statement sub-journals would otherwise be temp files on disk: keep
    // them in memory (measured: +20% throughput when requests still ran in
    // savepoints).
    conn.pragma_update(None, "temp_store", "MEMORY")
        .map_err(|e| db_err("set temp_store", e))?;
    Ok(conn)
}

/// Opens the checkpointer's connection.
pub(super) fn open_checkpointer(path: &Path) -> Result<Connection, StoreError> {
    open_configured(path)
}

/// Opens a connection with the settings every connection shares.
fn open_configured(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| db_err("open database", e))?;
    configure(&conn)?;
    Ok(conn)
}

/// Opens a read connection. `query_only` makes a stray write on it an
/// error instead of a second writer competing for the lock.
pub(super) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = open_configured(path)?;
    conn.pragma_update(None, "query_only", "ON")
        .map_err(|e| db_err("set query_only", e))?;
    Ok(conn)
}

fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| db_err("set busy_timeout", e))?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(|e| db_err("set foreign_keys", e))?;
    // The schema is ours alone; never run functions a crafted schema names.
    conn.pragma_update(None, "trusted_schema", "OFF")
        .map_err(|e| db_err("set trusted_schema", e))?;
    Ok(())
}

/// Brings the schema up to the newest version this build knows.
/// Idempotent: a database already at that version is left untouched.
pub(super) fn migrate(conn: &mut Connection) -> Result<i64, StoreError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| db_err("begin migration", e))?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY)")
        .map_err(|e| db_err("create schema_version", e))?;
    let current: i64 = tx
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_version",
            [],
            |row| row.get(0),
        )
        .map_err(|e| db_err("read schema_version", e))?;
    let newest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if current > newest {
        return Err(StoreError::Database(format!(
            "database schema version {current} is newer than this build supports ({newest})"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.execute_batch(sql)
            .map_err(|e| db_err(&format!("apply migration {version}"), e))?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [version],
        )
        .map_err(|e| db_err("record schema_version", e))?;
    }
    tx.commit().map_err(|e| db_err("commit migration", e))?;
    Ok(newest)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (i, (version, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version, i as i64 + 1);
        }
    }

    #[test]
    fn migration_2_keeps_what_a_version_1_database_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        prepare_files(&path).unwrap();
        let mut conn = open_writer(&path, Synchronous::Normal).unwrap();
        conn.execute_batch(&format!(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY);
             INSERT INTO schema_version VALUES (1);
             {MIGRATION_1}
             INSERT INTO replay VALUES ('https://gl', 'id-1', 5000);
             INSERT INTO issued_tokens VALUES ('at-1', 'k', 'https://gl', '42', '7', 'r',
                 'g/p', 'g', 'team', 'aud', 's', 1000, 5000, 'id-1', '9', '10', 'main');
             INSERT INTO audit (at_ms, kind, detail) VALUES (1000, 'exchange_granted', '{{}}');"
        ))
        .unwrap();
        assert_eq!(migrate(&mut conn).unwrap(), MIGRATIONS.len() as i64);
        let replay: (i64, String, String) = conn
            .query_row("SELECT expires_at_ms, issuer, jti FROM replay", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(replay, (5000, "https://gl".into(), "id-1".into()));
        let token: (String, String) = conn
            .query_row("SELECT jti, git_ref FROM issued_tokens", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(token, ("at-1".into(), "main".into()));
        let seq: i64 = conn
            .query_row("SELECT seq FROM audit", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seq, 1);
    }

    #[test]
    fn a_database_from_a_newer_build_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        prepare_files(&path).unwrap();
        let mut conn = open_writer(&path, Synchronous::Normal).unwrap();
        migrate(&mut conn).unwrap();
        conn.execute("INSERT INTO schema_version (version) VALUES (999)", [])
            .unwrap();
        let err = migrate(&mut conn).unwrap_err();
        assert!(err.to_string().contains("999"), "{err}");
    }

    #[test]
    fn migrating_twice_applies_each_migration_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        prepare_files(&path).unwrap();
        let mut conn = open_writer(&path, Synchronous::Full).unwrap();
        let newest = MIGRATIONS.len() as i64;
        assert_eq!(migrate(&mut conn).unwrap(), newest);
        assert_eq!(migrate(&mut conn).unwrap(), newest);
        let rows: i64 = conn
            .query_row("SELECT COUNT(*) FROM schema_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, MIGRATIONS.len() as i64);
        let sync: i64 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "FULL is 2");
    }
}
