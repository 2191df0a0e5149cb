//! `cistern inventory`: every pipeline identity cistern has seen and issued
//! to, read straight from the store (read-only).
//!
//! An identity is issuer + project id + namespace id + role: the immutable
//! ids, never the paths (GitLab reuses paths; they are shown, not trusted).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::{CliError, exit};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, StoreConfig};
use crate::store::StoredIdentity;
use crate::store::sqlite::inventory::{
    Credential, InventoryReader, PathSighting, RevocationIndex, RevocationRule, RevocationTimes,
};

/// Revocations not yet effective that the report lists by name.
const PENDING_LISTED: usize = 100;

/// Milliseconds in a day.
pub(crate) const DAY_MS: i64 = 86_400_000;

/// `cistern inventory`
#[derive(Debug, Args)]
pub struct InventoryArgs {
    /// Config file (the store is read from its `[store]`).
    #[arg(long, short, env = "CISTERN_CONFIG", default_value = "cistern.toml")]
    pub config: PathBuf,
    /// Only identities with this owner.
    #[arg(long)]
    pub owner: Option<String>,
    /// Only this project id.
    #[arg(long = "project")]
    pub project: Option<String>,
    /// Only this role.
    #[arg(long)]
    pub role: Option<String>,
    /// Only identities not used for at least this many days.
    #[arg(long)]
    pub unused_days: Option<u32>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = InventoryFormat::Table)]
    pub format: InventoryFormat,
}

/// How `inventory` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InventoryFormat {
    /// Aligned columns, for people.
    Table,
    /// A JSON array.
    Json,
    /// RFC 4180 CSV with a header row.
    Csv,
}

/// A flag raised on an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Flag {
    /// The same project or namespace id was seen under different paths.
    PathChanged,
    /// Not used for longer than `[inventory] unused_after_days`.
    Unused,
    /// No known owner.
    NoOwner,
}

impl Flag {
    /// The printed spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::PathChanged => "path-changed",
            Flag::Unused => "unused",
            Flag::NoOwner => "no-owner",
        }
    }
}

/// One row of the inventory.
#[derive(Debug, Clone, Serialize)]
pub struct InventoryRow {
    /// Configured issuer name.
    pub issuer: String,
    /// Project id.
    pub project_id: String,
    /// Namespace id.
    pub namespace_id: String,
    /// Role.
    pub role: String,
    /// Project path as last seen (display only).
    pub project_path: String,
    /// Namespace path as last seen (display only).
    pub namespace_path: String,
    /// Every project path seen with this project id, oldest first.
    pub project_paths_seen: Vec<String>,
    /// Owner of the role's policy (empty when unknown).
    pub owner: String,
    /// Every scope ever granted to this identity, sorted.
    pub scopes: Vec<String>,
    /// First exchange (ms).
    pub first_seen_ms: i64,
    /// Last exchange (ms).
    pub last_used_ms: i64,
    /// Exchanges granted.
    pub exchanges: i64,
    /// Credentials unexpired and not revoked.
    pub outstanding: u64,
    /// Soonest expiry among them (ms).
    pub next_expiry_ms: Option<i64>,
    /// Latest expiry among them (ms).
    pub last_expiry_ms: Option<i64>,
    /// The policy file of the latest grant.
    pub policy_file: Option<String>,
    /// Flags raised.
    pub flags: Vec<Flag>,
}

impl InventoryRow {
    /// Whether `owner` is unknown.
    pub fn has_no_owner(&self) -> bool {
        self.owner.trim().is_empty()
    }
}

/// Everything the inventory is built from, as read from the store.
#[derive(Debug, Clone, Default)]
pub struct InventoryData {
    /// The `identities` table.
    pub identities: Vec<StoredIdentity>,
    /// Unexpired credentials.
    pub unexpired: Vec<Credential>,
    /// Paths seen per id.
    pub paths: Vec<PathSighting>,
    /// Distinct scope strings granted per identity.
    pub granted_scopes: Vec<(crate::store::Identity, String)>,
    /// Latest grant's policy file per (issuer, project id, role).
    pub policy_files: Vec<(String, String, String, String)>,
    /// Revocation rules that may cover an unexpired credential.
    pub revocations: Vec<RevocationRule>,
    /// Time-to-revoke of every rule.
    pub revocation_times: RevocationTimes,
    /// Configured issuer name → URL.
    pub issuer_urls: BTreeMap<String, String>,
}

impl InventoryData {
    /// Reads everything from the store named by `config`.
    pub fn load(config: &Config, now_ms: i64) -> Result<Self, CliError> {
        let reader = open_reader(config)?;
        let err = |e: crate::store::StoreError| CliError::new(exit::UNAVAILABLE, e.to_string());
        Ok(Self {
            identities: reader.identities().map_err(err)?,
            unexpired: reader.unexpired(now_ms).map_err(err)?,
            paths: reader.path_history().map_err(err)?,
            granted_scopes: reader.granted_scopes().map_err(err)?,
            policy_files: reader.latest_policy_files().map_err(err)?,
            revocations: reader.revocations_covering(now_ms).map_err(err)?,
            revocation_times: reader.revocation_times(PENDING_LISTED).map_err(err)?,
            issuer_urls: config
                .issuers
                .iter()
                .map(|(n, c)| (n.clone(), c.issuer.clone()))
                .collect(),
        })
    }

    /// Unexpired credentials that no revocation rule covers.
    pub fn outstanding(&self) -> Vec<&Credential> {
        let index = RevocationIndex::new(&self.revocations);
        self.unexpired
            .iter()
            .filter(|c| {
                let url = self
                    .issuer_urls
                    .get(&c.identity.issuer)
                    .map_or("", String::as_str);
                !index.revoked(&c.identity, &c.token, url)
            })
            .collect()
    }
}

/// Loads the config; a bad one is a usage error.
pub(crate) fn load_config(path: &Path) -> Result<Config, CliError> {
    Config::load(path).map_err(|e| CliError::new(exit::USAGE, e.to_string()))
}

/// Opens the configured store read-only.
pub(crate) fn open_reader(config: &Config) -> Result<InventoryReader, CliError> {
    match &config.store {
        // A missing file is a wrong config or path (local input), not a
        // failing store; it is never created here.
        StoreConfig::Sqlite { path, .. } if !path.is_file() => Err(CliError::new(
            exit::USAGE,
            format!("no store at {} (see [store] path)", path.display()),
        )),
        StoreConfig::Sqlite { path, .. } => {
            InventoryReader::open(path).map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))
        }
    }
}

type Key = (String, String, String, String);

fn key(i: &crate::store::Identity) -> Key {
    (
        i.issuer.clone(),
        i.project_id.clone(),
        i.namespace_id.clone(),
        i.role.clone(),
    )
}

/// Builds one row per identity, flags included. `unused_after_days` is the
/// configured threshold for the `unused` flag.
pub fn build(data: &InventoryData, now_ms: i64, unused_after_days: u32) -> Vec<InventoryRow> {
    let mut project_paths: BTreeMap<(&str, &str), Vec<&str>> = BTreeMap::new();
    let mut namespace_paths: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    for p in &data.paths {
        let seen = project_paths.entry((&p.issuer, &p.project_id)).or_default();
        if !seen.contains(&p.project_path.as_str()) {
            seen.push(&p.project_path);
        }
        namespace_paths
            .entry((&p.issuer, &p.namespace_id))
            .or_default()
            .insert(&p.namespace_path);
    }
    let mut scopes: BTreeMap<Key, BTreeSet<String>> = BTreeMap::new();
    for (identity, scope) in &data.granted_scopes {
        scopes
            .entry(key(identity))
            .or_default()
            .extend(scope.split_whitespace().map(str::to_owned));
    }
    let mut outstanding: BTreeMap<Key, (u64, i64, i64)> = BTreeMap::new();
    for c in data.outstanding() {
        let e = outstanding
            .entry(key(&c.identity))
            .or_insert((0, i64::MAX, i64::MIN));
        e.0 += 1;
        e.1 = e.1.min(c.token.expires_at_ms);
        e.2 = e.2.max(c.token.expires_at_ms);
    }
    let policy_files: BTreeMap<(&str, &str, &str), &str> = data
        .policy_files
        .iter()
        .map(|(i, p, r, f)| ((i.as_str(), p.as_str(), r.as_str()), f.as_str()))
        .collect();
    let unused_cutoff = now_ms.saturating_sub(i64::from(unused_after_days).saturating_mul(DAY_MS));

    data.identities
        .iter()
        .map(|s| {
            let i = &s.identity;
            let k = key(i);
            let paths_seen: Vec<String> = project_paths
                .get(&(i.issuer.as_str(), i.project_id.as_str()))
                .map(|v| v.iter().map(|p| (*p).to_owned()).collect())
                .unwrap_or_default();
            let ns_changed = namespace_paths
                .get(&(i.issuer.as_str(), i.namespace_id.as_str()))
                .is_some_and(|s| s.len() > 1);
            let (count, next, last) = outstanding.get(&k).copied().unwrap_or((0, 0, 0));
            let mut row = InventoryRow {
                issuer: i.issuer.clone(),
                project_id: i.project_id.clone(),
                namespace_id: i.namespace_id.clone(),
                role: i.role.clone(),
                project_path: i.project_path.clone(),
                namespace_path: i.namespace_path.clone(),
                owner: i.owner.clone(),
                scopes: scopes.remove(&k).unwrap_or_default().into_iter().collect(),
                first_seen_ms: s.first_seen_ms,
                last_used_ms: s.last_used_ms,
                exchanges: s.exchanges,
                outstanding: count,
                next_expiry_ms: (count > 0).then_some(next),
                last_expiry_ms: (count > 0).then_some(last),
                policy_file: policy_files
                    .get(&(i.issuer.as_str(), i.project_id.as_str(), i.role.as_str()))
                    .map(|f| (*f).to_owned()),
                flags: Vec::new(),
                project_paths_seen: Vec::new(),
            };
            if paths_seen.len() > 1 || ns_changed {
                row.flags.push(Flag::PathChanged);
            }
            if s.last_used_ms < unused_cutoff {
                row.flags.push(Flag::Unused);
            }
            if row.has_no_owner() {
                row.flags.push(Flag::NoOwner);
            }
            row.project_paths_seen = paths_seen;
            row
        })
        .collect()
}

/// The filters of `cistern inventory`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Exact owner.
    pub owner: Option<String>,
    /// Exact project id.
    pub project: Option<String>,
    /// Exact role.
    pub role: Option<String>,
    /// Not used for at least this many days.
    pub unused_days: Option<u32>,
}

impl Filter {
    /// Whether `row` passes.
    pub fn keeps(&self, row: &InventoryRow, now_ms: i64) -> bool {
        self.owner.as_ref().is_none_or(|o| *o == row.owner)
            && self.project.as_ref().is_none_or(|p| *p == row.project_id)
            && self.role.as_ref().is_none_or(|r| *r == row.role)
            && self.unused_days.is_none_or(|d| {
                row.last_used_ms <= now_ms.saturating_sub(i64::from(d).saturating_mul(DAY_MS))
            })
    }
}

/// RFC 3339 (UTC, seconds) for a millisecond timestamp.
pub fn rfc3339(ms: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Replaces control characters so a recorded value cannot drive the
/// terminal (paths come from tokens).
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn opt_time(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".to_owned(), rfc3339)
}

fn flags_text(flags: &[Flag]) -> String {
    if flags.is_empty() {
        "-".to_owned()
    } else {
        flags
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

const COLUMNS: [&str; 15] = [
    "ISSUER",
    "PROJECT_ID",
    "NAMESPACE_ID",
    "ROLE",
    "PROJECT_PATH",
    "OWNER",
    "SCOPES",
    "FIRST_SEEN",
    "LAST_USED",
    "EXCHANGES",
    "OUTSTANDING",
    "NEXT_EXPIRY",
    "LAST_EXPIRY",
    "POLICY_FILE",
    "FLAGS",
];

fn cells(r: &InventoryRow) -> [String; 15] {
    [
        r.issuer.clone(),
        r.project_id.clone(),
        r.namespace_id.clone(),
        r.role.clone(),
        r.project_paths_seen
            .iter()
            .filter(|p| **p != r.project_path)
            .fold(r.project_path.clone(), |acc, p| format!("{acc} (was {p})")),
        if r.has_no_owner() {
            "-".to_owned()
        } else {
            r.owner.clone()
        },
        r.scopes.join(" "),
        rfc3339(r.first_seen_ms),
        rfc3339(r.last_used_ms),
        r.exchanges.to_string(),
        r.outstanding.to_string(),
        opt_time(r.next_expiry_ms),
        opt_time(r.last_expiry_ms),
        r.policy_file.clone().unwrap_or_else(|| "-".to_owned()),
        flags_text(&r.flags),
    ]
}

/// Aligned columns, one row per line, header first.
pub fn render_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let rows: Vec<[String; N]> = rows.iter().map(|r| r.clone().map(|c| clean(&c))).collect();
    let mut widths = header.map(|h| h.chars().count());
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let _ = write!(text, "{c:<w$}", w = widths[i]);
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut out, &mut header.iter().copied());
    for r in &rows {
        line(&mut out, &mut r.iter().map(String::as_str));
    }
    out
}

/// One CSV field (RFC 4180), with spreadsheet formula prefixes neutralized.
pub fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// Renders the rows in `format`.
pub fn render(rows: &[InventoryRow], format: InventoryFormat) -> String {
    match format {
        InventoryFormat::Table => {
            let cells: Vec<[String; 15]> = rows.iter().map(cells).collect();
            render_table(COLUMNS, &cells)
        }
        InventoryFormat::Json => {
            let mut s = serde_json::to_string_pretty(rows).unwrap_or_default();
            s.push('\n');
            s
        }
        InventoryFormat::Csv => {
            let mut out = String::new();
            let header = [
                "issuer",
                "project_id",
                "namespace_id",
                "role",
                "project_path",
                "namespace_path",
                "project_paths_seen",
                "owner",
                "scopes",
                "first_seen",
                "last_used",
                "exchanges",
                "outstanding",
                "next_expiry",
                "last_expiry",
                "policy_file",
                "flags",
            ];
            out.push_str(&header.join(","));
            out.push_str("\r\n");
            for r in rows {
                let fields = [
                    r.issuer.clone(),
                    r.project_id.clone(),
                    r.namespace_id.clone(),
                    r.role.clone(),
                    r.project_path.clone(),
                    r.namespace_path.clone(),
                    r.project_paths_seen.join(" "),
                    r.owner.clone(),
                    r.scopes.join(" "),
                    rfc3339(r.first_seen_ms),
                    rfc3339(r.last_used_ms),
                    r.exchanges.to_string(),
                    r.outstanding.to_string(),
                    r.next_expiry_ms.map(rfc3339).unwrap_or_default(),
                    r.last_expiry_ms.map(rfc3339).unwrap_or_default(),
                    r.policy_file.clone().unwrap_or_default(),
                    r.flags
                        .iter()
                        .map(|f| f.as_str())
                        .collect::<Vec<_>>()
                        .join(" "),
                ];
                out.push_str(
                    &fields
                        .iter()
                        .map(|f| csv_field(f))
                        .collect::<Vec<_>>()
                        .join(","),
                );
                out.push_str("\r\n");
            }
            out
        }
    }
}

/// Runs `cistern inventory`.
pub fn run(args: &InventoryArgs) -> Result<(), CliError> {
    let config = load_config(&args.config)?;
    let now_ms = SystemClock.now_millis();
    let data = InventoryData::load(&config, now_ms)?;
    let filter = Filter {
        owner: args.owner.clone(),
        project: args.project.clone(),
        role: args.role.clone(),
        unused_days: args.unused_days,
    };
    let rows: Vec<InventoryRow> = build(&data, now_ms, config.inventory.unused_after_days)
        .into_iter()
        .filter(|r| filter.keeps(r, now_ms))
        .collect();
    print!("{}", render(&rows, args.format));
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::{Identity, IssuedToken};

    const NOW: i64 = 1_800_000_000_000;

    fn ident(project: &str, path: &str, role: &str, owner: &str) -> Identity {
        Identity {
            issuer: "gitlab".into(),
            project_id: project.into(),
            namespace_id: "7".into(),
            role: role.into(),
            project_path: path.into(),
            namespace_path: "grp".into(),
            owner: owner.into(),
        }
    }

    fn cred(i: &Identity, jti: &str, issued: i64, expires: i64, scope: &str) -> Credential {
        Credential {
            identity: i.clone(),
            token: IssuedToken {
                jti: jti.into(),
                kind: "access_token".into(),
                audience: "https://deploy.test".into(),
                scope: scope.into(),
                issued_at_ms: issued,
                expires_at_ms: expires,
                subject_jti: format!("s-{jti}"),
                pipeline_id: "1".into(),
                job_id: "2".into(),
                git_ref: "main".into(),
            },
        }
    }

    fn data() -> InventoryData {
        let a = ident("42", "grp/app", "deploy", "team-a");
        let b = ident("43", "grp/lib", "build", "");
        let mut d = InventoryData {
            identities: vec![
                StoredIdentity {
                    identity: a.clone(),
                    first_seen_ms: NOW - 10 * DAY_MS,
                    last_used_ms: NOW - 1_000,
                    exchanges: 3,
                },
                StoredIdentity {
                    identity: b.clone(),
                    first_seen_ms: NOW - 90 * DAY_MS,
                    last_used_ms: NOW - 40 * DAY_MS,
                    exchanges: 1,
                },
            ],
            ..InventoryData::default()
        };
        d.unexpired = vec![
            cred(&a, "j1", NOW - 5_000, NOW + 60_000, "deploy:read"),
            cred(
                &a,
                "j2",
                NOW - 4_000,
                NOW + 120_000,
                "deploy:read deploy:write",
            ),
            cred(&a, "j3", NOW - 3_000, NOW + 30_000, "deploy:read"),
        ];
        d.granted_scopes = vec![
            (a.clone(), "deploy:read".into()),
            (a.clone(), "deploy:read deploy:write".into()),
            (b.clone(), "build:run".into()),
        ];
        for (p, path, at) in [
            ("42", "old/app", 1),
            ("42", "grp/app", 2),
            ("43", "grp/lib", 3),
        ] {
            d.paths.push(PathSighting {
                issuer: "gitlab".into(),
                project_id: p.into(),
                namespace_id: "7".into(),
                project_path: path.into(),
                namespace_path: "grp".into(),
                first_seen_ms: at,
            });
        }
        d.policy_files = vec![(
            "gitlab".into(),
            "42".into(),
            "deploy".into(),
            "deploy.toml".into(),
        )];
        d.revocations = vec![RevocationRule {
            id: 1,
            grain: "jti".into(),
            value: "j3".into(),
            issuer: String::new(),
            issued_before_ms: NOW,
            requested_at_ms: NOW - 100,
            effective_at_ms: Some(NOW - 90),
            actor: "admin".into(),
            reason: "test".into(),
            source: "admin".into(),
        }];
        d
    }

    #[test]
    fn rows_aggregate_outstanding_scopes_and_flags() {
        let rows = build(&data(), NOW, 30);
        assert_eq!(rows.len(), 2);
        let a = &rows[0];
        assert_eq!(a.outstanding, 2, "j3 is revoked");
        assert_eq!(a.next_expiry_ms, Some(NOW + 60_000));
        assert_eq!(a.last_expiry_ms, Some(NOW + 120_000));
        assert_eq!(a.scopes, ["deploy:read", "deploy:write"]);
        assert_eq!(a.policy_file.as_deref(), Some("deploy.toml"));
        assert_eq!(a.flags, [Flag::PathChanged]);
        assert_eq!(a.project_paths_seen, ["old/app", "grp/app"]);
        let b = &rows[1];
        assert_eq!(b.outstanding, 0);
        assert_eq!(b.next_expiry_ms, None);
        assert_eq!(b.flags, [Flag::Unused, Flag::NoOwner]);
        // A longer threshold clears `unused`.
        assert_eq!(build(&data(), NOW, 60)[1].flags, [Flag::NoOwner]);
    }

    #[test]
    fn filters_select_by_owner_project_role_and_idleness() {
        let rows = build(&data(), NOW, 30);
        let count = |f: Filter| rows.iter().filter(|r| f.keeps(r, NOW)).count();
        assert_eq!(count(Filter::default()), 2);
        assert_eq!(
            count(Filter {
                owner: Some("team-a".into()),
                ..Filter::default()
            }),
            1
        );
        assert_eq!(
            count(Filter {
                project: Some("43".into()),
                ..Filter::default()
            }),
            1
        );
        assert_eq!(
            count(Filter {
                role: Some("nope".into()),
                ..Filter::default()
            }),
            0
        );
        assert_eq!(
            count(Filter {
                unused_days: Some(39),
                ..Filter::default()
            }),
            1
        );
        assert_eq!(
            count(Filter {
                unused_days: Some(41),
                ..Filter::default()
            }),
            0
        );
    }

    #[test]
    fn formats_render_every_row() {
        let rows = build(&data(), NOW, 30);
        let table = render(&rows, InventoryFormat::Table);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ISSUER  PROJECT_ID"));
        // Columns are aligned: FLAGS starts at the same offset on every line.
        let col = lines[0].find("FLAGS").unwrap();
        assert!(lines[1][col..].starts_with("path-changed"));
        assert!(lines[2][col..].starts_with("unused,no-owner"));
        assert!(lines[1].contains("grp/app (was old/app)"));

        let json: serde_json::Value =
            serde_json::from_str(&render(&rows, InventoryFormat::Json)).unwrap();
        assert_eq!(json[1]["flags"], serde_json::json!(["unused", "no-owner"]));
        assert_eq!(json[0]["outstanding"], 2);

        let csv = render(&rows, InventoryFormat::Csv);
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines.len(), 4, "header, two rows, trailing empty");
        assert!(lines[0].starts_with("issuer,project_id,namespace_id,role"));
        assert!(lines[2].ends_with(",unused no-owner"));
    }

    #[test]
    fn csv_quotes_and_neutralizes_formulas_and_table_strips_controls() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
        assert_eq!(clean("a\x1b[31mb"), "a?[31mb");
    }
}
