//! `cistern policy diff --to NEW_DIR`: policy impact analysis.
//!
//! Replays every recorded exchange request (the verified claims the job
//! presented and what it asked for, both kept in the audit detail) against
//! the policy set in force and a proposed one, and reports per identity
//! which roles and scopes would be gained or lost. Nothing is issued and
//! nothing is written.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use super::inventory::{clean, load_config, open_reader, render_table, rfc3339};
use super::{CliError, TextOrJson, exit};
use crate::clock::{Clock, SystemClock};
use crate::oidc::{GitLabClaims, VerifiedIdToken};
use crate::policy::{PolicySet, RoleRequest};
use crate::store::sqlite::inventory::RecordedRequest;

/// `cistern policy diff`
#[derive(Debug, Args)]
pub struct PolicyDiffArgs {
    /// The proposed policy directory.
    #[arg(long)]
    pub to: PathBuf,
    /// Replay requests recorded within this window (`30d`, `12h`).
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    pub since: Duration,
    /// Config file (current policies from `policy.dir`, records from `[store]`).
    #[arg(long, short, env = "CISTERN_CONFIG", default_value = "cistern.toml")]
    pub config: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = TextOrJson::Text)]
    pub format: TextOrJson,
}

/// The result of one request under one policy set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Granted this role with these scopes.
    Granted {
        /// Role.
        role: String,
        /// Scopes, sorted.
        scopes: BTreeSet<String>,
    },
    /// Denied, with the reason code.
    Denied(&'static str),
}

/// What a job asked for, as recorded.
#[derive(Debug, Clone, Default, Deserialize)]
struct RecordedAsk {
    role: Option<String>,
    audience: Option<String>,
    scopes: Option<Vec<String>>,
}

/// The parts of an exchange's audit detail a replay needs; the rest is
/// skipped unparsed.
#[derive(Deserialize)]
struct RecordedDetail {
    claims: Option<GitLabClaims>,
    #[serde(default)]
    request: RecordedAsk,
}

/// A request ready to replay.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The claims presented then, as the decision takes them. They were
    /// verified when the exchange was recorded; this value only feeds
    /// [`PolicySet::decide`], and the `Grant` that may come back is
    /// inspected, never minted.
    token: VerifiedIdToken,
    /// What was asked for.
    request: RoleRequest,
}

impl Replay {
    /// Reads a recorded request; `None` when it carries no claims (recorded
    /// before they were kept) or they do not parse.
    pub fn from_record(r: &RecordedRequest) -> Option<Self> {
        // Typed straight from the text: no intermediate JSON tree.
        let RecordedDetail {
            claims,
            request: ask,
        } = serde_json::from_str(&r.detail).ok()?;
        let claims = claims?;
        Some(Self {
            token: VerifiedIdToken {
                issuer: Arc::from(r.issuer.as_str()),
                claims,
                kid: String::new(),
                token_sha256: [0; 32],
                _proof: (),
            },
            request: RoleRequest {
                role: ask.role,
                audience: ask.audience,
                scopes: ask.scopes,
            },
        })
    }

    /// The identity that made the request.
    pub fn identity(&self) -> DiffIdentity {
        let c = &self.token.claims;
        DiffIdentity {
            issuer: self.token.issuer.to_string(),
            project_id: c.effective_project_id().to_string(),
            namespace_id: c.job_namespace_id.unwrap_or(c.namespace_id).to_string(),
        }
    }

    /// Decides the request under `set`.
    pub fn decide(&self, set: &PolicySet) -> Outcome {
        match set.decide(&self.token, &self.request) {
            Ok(g) => Outcome::Granted {
                role: g.role.to_string(),
                scopes: g.scopes.into_iter().collect(),
            },
            Err(d) => Outcome::Denied(d.code()),
        }
    }
}

/// The identity a request belongs to: issuer + the ids the job runs under.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DiffIdentity {
    /// Issuer name.
    pub issuer: String,
    /// Project id (`job_project_id`, else `project_id`).
    pub project_id: String,
    /// Namespace id.
    pub namespace_id: String,
}

/// A kind of change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A role granted now would be refused.
    RoleLost,
    /// A role refused now would be granted.
    RoleGained,
    /// Scopes granted now would no longer be.
    ScopeLost,
    /// Scopes not granted now would be.
    ScopeGained,
    /// The identity's latest claims would satisfy a role they do not now,
    /// though no recorded request asked for it (a widening to review).
    NowPermitted,
    /// The identity's latest claims would no longer satisfy a role they do
    /// now, though no recorded request asked for it.
    NoLongerPermitted,
}

impl ChangeKind {
    /// Printed spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::RoleLost => "role lost",
            ChangeKind::RoleGained => "role gained",
            ChangeKind::ScopeLost => "scope lost",
            ChangeKind::ScopeGained => "scope gained",
            ChangeKind::NowPermitted => "now permitted",
            ChangeKind::NoLongerPermitted => "no longer permitted",
        }
    }
}

/// One change for one identity, aggregated over its requests.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// Who.
    pub identity: DiffIdentity,
    /// Project path last seen (display only).
    pub project_path: String,
    /// What changes.
    pub change: ChangeKind,
    /// The role concerned.
    pub role: String,
    /// The scopes gained or lost (for a role: the scopes it carried).
    pub scopes: Vec<String>,
    /// Recorded requests that would change this way (0 for the
    /// `now_permitted` / `no_longer_permitted` changes, found from the
    /// identity's latest claims rather than from a request).
    pub requests: u64,
    /// Why the proposed set refuses (role lost only).
    pub denial: Option<String>,
}

/// The whole diff.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyDiff {
    /// Start of the replay window (ms).
    pub since_ms: i64,
    /// Requests replayed.
    pub replayed: u64,
    /// Recorded requests without readable claims (recorded before claims
    /// were kept), not replayed.
    pub skipped: u64,
    /// Changes, by identity.
    pub changes: Vec<Change>,
}

type ChangeKey = (DiffIdentity, ChangeKind, String);

/// Accumulates the changes of replayed requests, one request at a time, so
/// memory grows with the number of changes, not of records.
pub struct Differ<'a> {
    current: &'a PolicySet,
    proposed: &'a PolicySet,
    replayed: u64,
    skipped: u64,
    acc: BTreeMap<ChangeKey, (BTreeSet<String>, u64, Option<String>, String)>,
    /// The latest replay of each identity: its claims decide which roles
    /// the identity is permitted under each set.
    latest: BTreeMap<DiffIdentity, Replay>,
}

impl<'a> Differ<'a> {
    /// Compares `current` with `proposed`.
    pub fn new(current: &'a PolicySet, proposed: &'a PolicySet) -> Self {
        Self {
            current,
            proposed,
            replayed: 0,
            skipped: 0,
            acc: BTreeMap::new(),
            latest: BTreeMap::new(),
        }
    }

    /// Replays one recorded request (counted as skipped if unreadable).
    pub fn record(&mut self, r: &RecordedRequest) {
        match Replay::from_record(r) {
            Some(replay) => self.replay(replay),
            None => self.skipped += 1,
        }
    }

    /// Replays one request under both sets.
    pub fn replay(&mut self, r: Replay) {
        self.replayed += 1;
        let id = r.identity();
        self.compare(&id, &r);
        self.latest.insert(id, r);
    }

    fn compare(&mut self, id: &DiffIdentity, r: &Replay) {
        let before = r.decide(self.current);
        let after = r.decide(self.proposed);
        if before == after {
            return;
        }
        let c = &r.token.claims;
        let path = c.job_project_path.as_deref().unwrap_or(&c.project_path);
        let acc = &mut self.acc;
        let mut add = |kind, role: &str, scopes: &BTreeSet<String>, denial: Option<&str>| {
            let e = acc
                .entry((id.clone(), kind, role.to_owned()))
                .or_insert_with(|| (BTreeSet::new(), 0, None, String::new()));
            e.0.extend(scopes.iter().cloned());
            e.1 += 1;
            if let Some(d) = denial {
                e.2 = Some(d.to_owned());
            }
            // Requests come oldest first: keep the latest path.
            path.clone_into(&mut e.3);
        };
        match (&before, &after) {
            (
                Outcome::Granted {
                    role: r0,
                    scopes: s0,
                },
                Outcome::Granted {
                    role: r1,
                    scopes: s1,
                },
            ) if r0 == r1 => {
                let lost: BTreeSet<String> = s0.difference(s1).cloned().collect();
                let gained: BTreeSet<String> = s1.difference(s0).cloned().collect();
                if !lost.is_empty() {
                    add(ChangeKind::ScopeLost, r0, &lost, None);
                }
                if !gained.is_empty() {
                    add(ChangeKind::ScopeGained, r0, &gained, None);
                }
            }
            (before, after) => {
                if let Outcome::Granted { role, scopes } = before {
                    let why = match after {
                        Outcome::Denied(code) => Some(*code),
                        Outcome::Granted { .. } => None,
                    };
                    add(ChangeKind::RoleLost, role, scopes, why);
                }
                if let Outcome::Granted { role, scopes } = after {
                    add(ChangeKind::RoleGained, role, scopes, None);
                }
            }
        }
    }

    /// Roles whose permission changes for an identity's latest claims and
    /// that no request-level change already reports.
    fn compare_permitted(&mut self) {
        let permitted = |set: &PolicySet, r: &Replay| -> BTreeMap<String, BTreeSet<String>> {
            set.roles()
                .filter(|p| p.permits(&r.token.issuer, &r.token.claims))
                .map(|p| {
                    (
                        p.role().to_owned(),
                        p.grant_scopes().iter().cloned().collect(),
                    )
                })
                .collect()
        };
        for (id, r) in &self.latest {
            let before = permitted(self.current, r);
            let after = permitted(self.proposed, r);
            let c = &r.token.claims;
            let path = c.job_project_path.as_deref().unwrap_or(&c.project_path);
            let changes = after
                .iter()
                .filter(|(role, _)| !before.contains_key(*role))
                .map(|(role, scopes)| {
                    (
                        ChangeKind::NowPermitted,
                        ChangeKind::RoleGained,
                        role,
                        scopes,
                    )
                })
                .chain(
                    before
                        .iter()
                        .filter(|(role, _)| !after.contains_key(*role))
                        .map(|(role, scopes)| {
                            (
                                ChangeKind::NoLongerPermitted,
                                ChangeKind::RoleLost,
                                role,
                                scopes,
                            )
                        }),
                );
            for (kind, requested_kind, role, scopes) in changes {
                if self
                    .acc
                    .contains_key(&(id.clone(), requested_kind, role.clone()))
                {
                    continue;
                }
                self.acc.insert(
                    (id.clone(), kind, role.clone()),
                    (scopes.clone(), 0, None, path.to_owned()),
                );
            }
        }
    }

    /// The diff, by identity.
    pub fn finish(mut self, since_ms: i64) -> PolicyDiff {
        self.compare_permitted();
        PolicyDiff {
            since_ms,
            replayed: self.replayed,
            skipped: self.skipped,
            changes: self
                .acc
                .into_iter()
                .map(
                    |((identity, change, role), (scopes, requests, denial, project_path))| Change {
                        identity,
                        project_path,
                        change,
                        role,
                        scopes: scopes.into_iter().collect(),
                        requests,
                        denial,
                    },
                )
                .collect(),
        }
    }
}

/// The diff as text: one line per change, or "no change".
pub fn render(d: &PolicyDiff) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "replayed {} recorded request(s) since {}{}",
        d.replayed,
        rfc3339(d.since_ms),
        if d.skipped > 0 {
            format!(" ({} unreadable, skipped)", d.skipped)
        } else {
            String::new()
        }
    );
    if d.changes.is_empty() {
        out.push_str("no change\n");
        return out;
    }
    let rows: Vec<[String; 7]> = d
        .changes
        .iter()
        .map(|c| {
            [
                format!(
                    "{} project {} ns {}",
                    c.identity.issuer, c.identity.project_id, c.identity.namespace_id
                ),
                clean(&c.project_path),
                c.change.as_str().to_owned(),
                c.role.clone(),
                c.scopes.join(" "),
                c.requests.to_string(),
                c.denial.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    out.push_str(&render_table(
        [
            "IDENTITY",
            "PATH",
            "CHANGE",
            "ROLE",
            "SCOPES",
            "REQUESTS",
            "NEW_DENIAL",
        ],
        &rows,
    ));
    out
}

/// Runs `cistern policy diff`.
pub fn run(args: &PolicyDiffArgs) -> Result<(), CliError> {
    let config = load_config(&args.config)?;
    let load = |dir: &std::path::Path, what: &str| {
        PolicySet::load_dir(dir, &config.ceiling, &config.issuers).map_err(|e| {
            CliError::new(
                exit::USAGE,
                format!("{what} policies in {} are invalid:\n{e}", dir.display()),
            )
        })
    };
    let current = load(&config.policy.dir, "current")?;
    let proposed = load(&args.to, "proposed")?;
    let now_ms = SystemClock.now_millis();
    let since_ms = now_ms.saturating_sub(i64::try_from(args.since.as_millis()).unwrap_or(i64::MAX));
    let mut differ = Differ::new(&current, &proposed);
    open_reader(&config)?
        .for_each_exchange_request(since_ms, |r| differ.record(&r))
        .map_err(|e| CliError::new(exit::UNAVAILABLE, e.to_string()))?;
    let d = differ.finish(since_ms);
    match args.format {
        TextOrJson::Text => print!("{}", render(&d)),
        TextOrJson::Json => println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default()),
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::{CeilingConfig, IssuerConfig};

    const DEPLOY: &str = r#"
role = "deploy"
owner = "team-a"
issuer = "gitlab"
[bindings]
project_id = "20"
[grant]
kind = "access_token"
audience = "https://deploy.test"
scopes = ["deploy:read", "deploy:write"]
ttl = "10m"
"#;

    const BUILD: &str = r#"
role = "build"
owner = "team-b"
issuer = "gitlab"
[bindings]
namespace_id = "7"
[grant]
kind = "access_token"
audience = "https://build.test"
scopes = ["artifacts:read"]
ttl = "10m"
"#;

    fn issuers() -> BTreeMap<String, IssuerConfig> {
        let cfg: crate::config::Config =
            toml::from_str(include_str!("../../examples/cistern.toml")).unwrap();
        cfg.issuers
    }

    fn ceiling() -> CeilingConfig {
        CeilingConfig {
            issuers: vec!["gitlab".into()],
            max_ttl: Duration::from_secs(3600),
            scopes: vec!["*:*".into()],
            audiences: vec![],
            allow_fork_opt_in: false,
            providers: Default::default(),
        }
    }

    fn set(files: &[(&str, &str)]) -> PolicySet {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        PolicySet::load_dir(dir.path(), &ceiling(), &issuers()).unwrap()
    }

    fn replay(role: &str, project: &str, namespace: &str) -> Replay {
        let mut v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/gitlab_payload.json")).unwrap();
        v["project_id"] = project.into();
        v["namespace_id"] = namespace.into();
        if v.get("job_project_id").is_some() {
            v["job_project_id"] = project.into();
        }
        if v.get("job_namespace_id").is_some() {
            v["job_namespace_id"] = namespace.into();
        }
        let detail = serde_json::json!({ "claims": v, "request": { "role": role } }).to_string();
        Replay::from_record(&RecordedRequest {
            seq: 1,
            at_ms: 0,
            issuer: "gitlab".into(),
            kind: "exchange_granted".into(),
            detail,
        })
        .unwrap()
    }

    #[test]
    fn a_dropped_role_and_an_added_scope_show_as_lost_and_gained() {
        let current = set(&[("deploy.toml", DEPLOY), ("build.toml", BUILD)]);
        let proposed = set(&[(
            "build.toml",
            &BUILD.replace(
                r#"["artifacts:read"]"#,
                r#"["artifacts:read", "artifacts:write"]"#,
            ),
        )]);
        let replays = [
            replay("deploy", "20", "7"),
            replay("deploy", "20", "7"),
            replay("build", "20", "7"),
            replay("build", "21", "8"),
        ];
        let mut differ = Differ::new(&current, &proposed);
        replays.iter().for_each(|r| differ.replay(r.clone()));
        let d = differ.finish(0);
        let lines: Vec<(String, ChangeKind, String, Vec<String>, u64)> = d
            .changes
            .iter()
            .map(|c| {
                (
                    c.identity.project_id.clone(),
                    c.change,
                    c.role.clone(),
                    c.scopes.clone(),
                    c.requests,
                )
            })
            .collect();
        assert_eq!(
            lines,
            vec![
                (
                    "20".into(),
                    ChangeKind::RoleLost,
                    "deploy".into(),
                    vec!["deploy:read".into(), "deploy:write".into()],
                    2
                ),
                (
                    "20".into(),
                    ChangeKind::ScopeGained,
                    "build".into(),
                    vec!["artifacts:write".into()],
                    1
                ),
            ]
        );
        assert_eq!(d.changes[0].denial.as_deref(), Some("unknown_role"));
        let text = render(&d);
        assert!(text.contains("role lost"), "{text}");
        assert!(text.contains("scope gained"));
        // Identical sets: no change.
        let mut differ = Differ::new(&current, &current);
        replays.iter().for_each(|r| differ.replay(r.clone()));
        let same = differ.finish(0);
        assert!(same.changes.is_empty());
        assert!(render(&same).ends_with("no change\n"));
    }

    #[test]
    fn a_widened_role_shows_for_identities_that_never_asked_for_it() {
        let current = set(&[("deploy.toml", DEPLOY), ("build.toml", BUILD)]);
        let widened = DEPLOY.replace(r#"project_id = "20""#, r#"namespace_id = "8""#);
        let proposed = set(&[("deploy.toml", &widened), ("build.toml", BUILD)]);
        let mut differ = Differ::new(&current, &proposed);
        differ.replay(replay("deploy", "20", "7"));
        differ.replay(replay("build", "21", "8"));
        // A record from before claims were kept is counted, not replayed.
        differ.record(&RecordedRequest {
            seq: 9,
            at_ms: 0,
            issuer: "gitlab".into(),
            kind: "exchange_granted".into(),
            detail: r#"{"jti": "x", "policy_file": "deploy.toml"}"#.into(),
        });
        let d = differ.finish(0);
        assert_eq!((d.replayed, d.skipped), (2, 1));
        let lines: Vec<(String, ChangeKind, String, u64)> = d
            .changes
            .iter()
            .map(|c| {
                (
                    c.identity.project_id.clone(),
                    c.change,
                    c.role.clone(),
                    c.requests,
                )
            })
            .collect();
        assert_eq!(
            lines,
            vec![
                // Asked for and now refused; not repeated as "no longer permitted".
                ("20".into(), ChangeKind::RoleLost, "deploy".into(), 1),
                // Never asked for deploy, but would now be permitted it.
                ("21".into(), ChangeKind::NowPermitted, "deploy".into(), 0),
            ]
        );
        assert!(render(&d).contains("now permitted"));
    }
}
