//! `cistern report`: the three questions, from the store (read-only).
//!
//! 1. Where does every outstanding pipeline credential exist (by kind,
//!    target audience and identity, with expiry)?
//! 2. Who owns each identity (identities with no known owner flagged)?
//! 3. How fast did revocation take effect (measured: `effective_at_ms -
//!    requested_at_ms` of every revocation rule)?
//!
//! Plus identities unused for N days (offboarding candidates) and the
//! longest-lived outstanding credentials.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;

use super::CliError;
use super::inventory::{DAY_MS, InventoryData, InventoryRow, build, clean, load_config, rfc3339};
use crate::clock::{Clock, SystemClock};

/// How many longest-lived credentials the report lists.
const LONGEST_LIVED: usize = 10;

/// `cistern report`
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Config file (the store is read from its `[store]`).
    #[arg(long, short, env = "CISTERN_CONFIG", default_value = "cistern.toml")]
    pub config: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
    pub format: ReportFormat,
    /// Identities unused for this many days are listed for offboarding
    /// (default: `[inventory] unused_after_days`).
    #[arg(long)]
    pub unused_days: Option<u32>,
}

/// How `report` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    /// Plain text.
    Text,
    /// Markdown, to paste into a ticket.
    Markdown,
    /// JSON.
    Json,
}

/// An identity, as the report names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct IdentityRef {
    /// Issuer name.
    pub issuer: String,
    /// Project id.
    pub project_id: String,
    /// Namespace id.
    pub namespace_id: String,
    /// Role.
    pub role: String,
    /// Project path (display only).
    pub project_path: String,
}

impl IdentityRef {
    fn of(i: &crate::store::Identity) -> Self {
        Self {
            issuer: i.issuer.clone(),
            project_id: i.project_id.clone(),
            namespace_id: i.namespace_id.clone(),
            role: i.role.clone(),
            project_path: i.project_path.clone(),
        }
    }

    fn of_row(r: &InventoryRow) -> Self {
        Self {
            issuer: r.issuer.clone(),
            project_id: r.project_id.clone(),
            namespace_id: r.namespace_id.clone(),
            role: r.role.clone(),
            project_path: r.project_path.clone(),
        }
    }

    /// `gitlab project 42 (grp/app) ns 7 role deploy`
    pub fn label(&self) -> String {
        format!(
            "{} project {} ({}) ns {} role {}",
            self.issuer, self.project_id, self.project_path, self.namespace_id, self.role
        )
    }
}

/// Outstanding credentials of one kind, audience and identity.
#[derive(Debug, Clone, Serialize)]
pub struct CredentialGroup {
    /// Credential kind.
    pub kind: String,
    /// Target (audience).
    pub audience: String,
    /// Identity.
    pub identity: IdentityRef,
    /// Owner (empty when unknown).
    pub owner: String,
    /// How many.
    pub count: u64,
    /// Soonest expiry (ms).
    pub next_expiry_ms: i64,
    /// Latest expiry (ms).
    pub last_expiry_ms: i64,
}

/// Identities per owner.
#[derive(Debug, Clone, Serialize)]
pub struct OwnerEntry {
    /// The owner.
    pub owner: String,
    /// Their identities.
    pub identities: Vec<IdentityRef>,
}

/// A revocation that has not taken effect.
#[derive(Debug, Clone, Serialize)]
pub struct PendingRevocation {
    /// Rule id.
    pub id: i64,
    /// Grain.
    pub grain: String,
    /// Value.
    pub value: String,
    /// Requested at (ms).
    pub requested_at_ms: i64,
}

/// Time-to-revoke, measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RevocationStats {
    /// Revocation rules recorded.
    pub total: u64,
    /// Of which effective (have `effective_at_ms`).
    pub effective: u64,
    /// Median time to revoke (ms).
    pub p50_ms: Option<i64>,
    /// 90th percentile (ms).
    pub p90_ms: Option<i64>,
    /// 99th percentile (ms).
    pub p99_ms: Option<i64>,
    /// Slowest (ms).
    pub max_ms: Option<i64>,
    /// How many rules are not yet effective.
    pub not_yet_effective_total: u64,
    /// The oldest of them (at most 100).
    pub not_yet_effective: Vec<PendingRevocation>,
}

/// An identity unused for the window.
#[derive(Debug, Clone, Serialize)]
pub struct UnusedIdentity {
    /// Identity.
    pub identity: IdentityRef,
    /// Owner.
    pub owner: String,
    /// Last exchange (ms).
    pub last_used_ms: i64,
    /// Whole days since.
    pub idle_days: i64,
    /// Credentials still outstanding.
    pub outstanding: u64,
}

/// One long-lived outstanding credential.
#[derive(Debug, Clone, Serialize)]
pub struct LongLived {
    /// Its `jti`.
    pub jti: String,
    /// Kind.
    pub kind: String,
    /// Audience.
    pub audience: String,
    /// Identity.
    pub identity: IdentityRef,
    /// Issued (ms).
    pub issued_at_ms: i64,
    /// Expires (ms).
    pub expires_at_ms: i64,
    /// `expires - issued` (ms).
    pub lifetime_ms: i64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it was made (ms).
    pub generated_at_ms: i64,
    /// The unused window in days.
    pub unused_days: u32,
    /// Outstanding credentials in total.
    pub outstanding_total: u64,
    /// Q1: outstanding credentials by kind, audience and identity.
    pub credentials: Vec<CredentialGroup>,
    /// Q2: identities by owner.
    pub owners: Vec<OwnerEntry>,
    /// Q2: identities with no known owner (should be none).
    pub identities_without_owner: Vec<IdentityRef>,
    /// Q3: time to revoke.
    pub revocation: RevocationStats,
    /// Identities unused for `unused_days`: candidates for offboarding.
    pub unused: Vec<UnusedIdentity>,
    /// The longest-lived outstanding credentials (at most 10).
    pub longest_lived: Vec<LongLived>,
    /// cistern's own provider credentials (the long-lived secrets left).
    pub provider_credentials: Vec<crate::store::sqlite::inventory::ProviderCredentialHealth>,
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[i64], p: u32) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (u64::from(p) * sorted.len() as u64).div_ceil(100).max(1);
    sorted
        .get(usize::try_from(rank - 1).unwrap_or(usize::MAX))
        .or(sorted.last())
        .copied()
}

/// Builds the report.
pub fn build_report(data: &InventoryData, now_ms: i64, unused_days: u32) -> Report {
    let rows = build(data, now_ms, unused_days);
    let outstanding = data.outstanding();

    let mut groups: BTreeMap<(String, String, IdentityRef), CredentialGroup> = BTreeMap::new();
    for c in &outstanding {
        let id = IdentityRef::of(&c.identity);
        let g = groups
            .entry((c.token.kind.clone(), c.token.audience.clone(), id.clone()))
            .or_insert_with(|| CredentialGroup {
                kind: c.token.kind.clone(),
                audience: c.token.audience.clone(),
                identity: id,
                owner: c.identity.owner.clone(),
                count: 0,
                next_expiry_ms: i64::MAX,
                last_expiry_ms: i64::MIN,
            });
        g.count += 1;
        g.next_expiry_ms = g.next_expiry_ms.min(c.token.expires_at_ms);
        g.last_expiry_ms = g.last_expiry_ms.max(c.token.expires_at_ms);
    }

    let mut owners: BTreeMap<String, Vec<IdentityRef>> = BTreeMap::new();
    let mut without_owner = Vec::new();
    for r in &rows {
        if r.has_no_owner() {
            without_owner.push(IdentityRef::of_row(r));
        } else {
            owners
                .entry(r.owner.clone())
                .or_default()
                .push(IdentityRef::of_row(r));
        }
    }

    let t = &data.revocation_times;
    let mut times = t.effective_ms.clone();
    times.sort_unstable();
    let revocation = RevocationStats {
        total: times.len() as u64 + t.pending_total,
        effective: times.len() as u64,
        p50_ms: percentile(&times, 50),
        p90_ms: percentile(&times, 90),
        p99_ms: percentile(&times, 99),
        max_ms: times.last().copied(),
        not_yet_effective_total: t.pending_total,
        not_yet_effective: t
            .pending
            .iter()
            .map(|r| PendingRevocation {
                id: r.id,
                grain: r.grain.clone(),
                value: r.value.clone(),
                requested_at_ms: r.requested_at_ms,
            })
            .collect(),
    };

    let cutoff = now_ms.saturating_sub(i64::from(unused_days).saturating_mul(DAY_MS));
    let mut unused: Vec<UnusedIdentity> = rows
        .iter()
        .filter(|r| r.last_used_ms < cutoff)
        .map(|r| UnusedIdentity {
            identity: IdentityRef::of_row(r),
            owner: r.owner.clone(),
            last_used_ms: r.last_used_ms,
            idle_days: now_ms.saturating_sub(r.last_used_ms) / DAY_MS,
            outstanding: r.outstanding,
        })
        .collect();
    unused.sort_by_key(|u| u.last_used_ms);

    let mut longest: Vec<LongLived> = outstanding
        .iter()
        .map(|c| LongLived {
            jti: c.token.jti.clone(),
            kind: c.token.kind.clone(),
            audience: c.token.audience.clone(),
            identity: IdentityRef::of(&c.identity),
            issued_at_ms: c.token.issued_at_ms,
            expires_at_ms: c.token.expires_at_ms,
            lifetime_ms: c.token.expires_at_ms.saturating_sub(c.token.issued_at_ms),
        })
        .collect();
    longest.sort_by(|a, b| {
        b.lifetime_ms
            .cmp(&a.lifetime_ms)
            .then(a.expires_at_ms.cmp(&b.expires_at_ms))
            .then(a.jti.cmp(&b.jti))
    });
    longest.truncate(LONGEST_LIVED);

    Report {
        generated_at_ms: now_ms,
        unused_days,
        outstanding_total: outstanding.len() as u64,
        credentials: groups.into_values().collect(),
        owners: owners
            .into_iter()
            .map(|(owner, identities)| OwnerEntry { owner, identities })
            .collect(),
        identities_without_owner: without_owner,
        revocation,
        unused,
        longest_lived: longest,
        provider_credentials: Vec::new(),
    }
}

/// `1.234s`, `87ms`: durations people read.
pub fn human_ms(ms: i64) -> String {
    if ms.abs() < 1_000 {
        format!("{ms}ms")
    } else if ms.abs() < 120_000 {
        format!("{:.3}s", ms as f64 / 1000.0)
    } else if ms.abs() < 2 * 3_600_000 {
        format!("{:.1}min", ms as f64 / 60_000.0)
    } else if ms.abs() < 2 * DAY_MS {
        format!("{:.1}h", ms as f64 / 3_600_000.0)
    } else {
        format!("{:.1}d", ms as f64 / DAY_MS as f64)
    }
}

fn opt_ms(v: Option<i64>) -> String {
    v.map_or_else(|| "-".to_owned(), human_ms)
}

/// Markdown-safe cell text: no pipes, no newlines, no control characters.
fn md(s: &str) -> String {
    clean(s).replace('|', "\\|")
}

/// Renders the report as text (`markdown = false`) or Markdown.
pub fn render_text(r: &Report, markdown: bool) -> String {
    let mut o = String::new();
    let h = |o: &mut String, level: usize, title: &str| {
        if markdown {
            let _ = writeln!(o, "\n{} {title}\n", "#".repeat(level));
        } else {
            let _ = writeln!(o, "\n{}\n{}", title.to_uppercase(), "=".repeat(title.len()));
        }
    };
    let table = |o: &mut String, header: &[&str], rows: Vec<Vec<String>>| {
        if markdown {
            let _ = writeln!(o, "| {} |", header.join(" | "));
            let _ = writeln!(o, "|{}", "---|".repeat(header.len()));
            for row in rows {
                let cells: Vec<String> = row.iter().map(|c| md(c)).collect();
                let _ = writeln!(o, "| {} |", cells.join(" | "));
            }
        } else {
            let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
            let rows: Vec<Vec<String>> = rows
                .into_iter()
                .map(|r| r.iter().map(|c| clean(c)).collect())
                .collect();
            for row in &rows {
                for (w, c) in widths.iter_mut().zip(row) {
                    *w = (*w).max(c.chars().count());
                }
            }
            let line = |o: &mut String, cells: Vec<&str>| {
                let mut t = String::from("  ");
                for (i, c) in cells.iter().enumerate() {
                    let _ = write!(t, "{c:<w$}  ", w = widths[i]);
                }
                let _ = writeln!(o, "{}", t.trim_end());
            };
            line(o, header.to_vec());
            for row in &rows {
                line(o, row.iter().map(String::as_str).collect());
            }
        }
    };
    let none = |o: &mut String, what: &str| {
        let _ = if markdown {
            writeln!(o, "_{what}_")
        } else {
            writeln!(o, "  {what}")
        };
    };

    if markdown {
        let _ = writeln!(o, "# cistern report — {}", rfc3339(r.generated_at_ms));
    } else {
        let _ = writeln!(o, "cistern report — {}", rfc3339(r.generated_at_ms));
    }

    h(&mut o, 2, "1. Where every outstanding credential exists");
    let _ = writeln!(
        o,
        "{} outstanding credential(s) (unexpired, not revoked).\n",
        r.outstanding_total
    );
    if r.credentials.is_empty() {
        none(&mut o, "none");
    } else {
        table(
            &mut o,
            &[
                "kind",
                "target",
                "identity",
                "owner",
                "count",
                "next expiry",
                "last expiry",
            ],
            r.credentials
                .iter()
                .map(|g| {
                    vec![
                        g.kind.clone(),
                        g.audience.clone(),
                        g.identity.label(),
                        owner_text(&g.owner),
                        g.count.to_string(),
                        rfc3339(g.next_expiry_ms),
                        rfc3339(g.last_expiry_ms),
                    ]
                })
                .collect(),
        );
    }

    h(&mut o, 2, "2. Who owns each identity");
    if r.owners.is_empty() {
        none(&mut o, "no identities");
    } else {
        table(
            &mut o,
            &["owner", "identities"],
            r.owners
                .iter()
                .map(|e| {
                    vec![
                        e.owner.clone(),
                        e.identities
                            .iter()
                            .map(IdentityRef::label)
                            .collect::<Vec<_>>()
                            .join("; "),
                    ]
                })
                .collect(),
        );
    }
    o.push('\n');
    if r.identities_without_owner.is_empty() {
        let _ = writeln!(o, "Identities with no known owner: none.");
    } else {
        let _ = writeln!(
            o,
            "{}WARNING: {} identit(ies) with no known owner:{}",
            if markdown { "**" } else { "" },
            r.identities_without_owner.len(),
            if markdown { "**" } else { "" },
        );
        for i in &r.identities_without_owner {
            let _ = writeln!(
                o,
                "{} {}",
                if markdown { "-" } else { "  -" },
                md_or_clean(&i.label(), markdown)
            );
        }
    }

    h(&mut o, 2, "3. How fast revocation took effect");
    let s = &r.revocation;
    let _ = writeln!(
        o,
        "{} revocation(s) recorded, {} effective.\n",
        s.total, s.effective
    );
    table(
        &mut o,
        &["count", "p50", "p90", "p99", "max"],
        vec![vec![
            s.effective.to_string(),
            opt_ms(s.p50_ms),
            opt_ms(s.p90_ms),
            opt_ms(s.p99_ms),
            opt_ms(s.max_ms),
        ]],
    );
    if s.not_yet_effective_total > 0 {
        let _ = writeln!(o, "\nNot yet effective: {}", s.not_yet_effective_total);
        for p in &s.not_yet_effective {
            let _ = writeln!(
                o,
                "{} #{} {} {} (requested {})",
                if markdown { "-" } else { "  -" },
                p.id,
                md_or_clean(&p.grain, markdown),
                md_or_clean(&p.value, markdown),
                rfc3339(p.requested_at_ms)
            );
        }
    }

    h(
        &mut o,
        2,
        &format!(
            "Identities unused for {} days (offboarding candidates)",
            r.unused_days
        ),
    );
    if r.unused.is_empty() {
        none(&mut o, "none");
    } else {
        table(
            &mut o,
            &["identity", "owner", "last used", "idle days", "outstanding"],
            r.unused
                .iter()
                .map(|u| {
                    vec![
                        u.identity.label(),
                        owner_text(&u.owner),
                        rfc3339(u.last_used_ms),
                        u.idle_days.to_string(),
                        u.outstanding.to_string(),
                    ]
                })
                .collect(),
        );
    }

    if !r.provider_credentials.is_empty() {
        h(&mut o, 2, "cistern's own provider credentials");
        table(
            &mut o,
            &[
                "provider",
                "expires",
                "last loaded or rotated",
                "last error since",
            ],
            r.provider_credentials
                .iter()
                .map(|p| {
                    vec![
                        md_or_clean(&p.provider, markdown),
                        p.expires_on.clone().unwrap_or_else(|| "never".to_owned()),
                        rfc3339(p.saved_at_ms),
                        md_or_clean(p.last_error.as_deref().unwrap_or("none"), markdown),
                    ]
                })
                .collect(),
        );
    }

    h(&mut o, 2, "Longest-lived outstanding credentials");
    if r.longest_lived.is_empty() {
        none(&mut o, "none");
    } else {
        table(
            &mut o,
            &["jti", "kind", "target", "identity", "lifetime", "expires"],
            r.longest_lived
                .iter()
                .map(|l| {
                    vec![
                        l.jti.clone(),
                        l.kind.clone(),
                        l.audience.clone(),
                        l.identity.label(),
                        human_ms(l.lifetime_ms),
                        rfc3339(l.expires_at_ms),
                    ]
                })
                .collect(),
        );
    }
    o
}

fn md_or_clean(s: &str, markdown: bool) -> String {
    if markdown { md(s) } else { clean(s) }
}

fn owner_text(owner: &str) -> String {
    if owner.trim().is_empty() {
        "(none)".to_owned()
    } else {
        owner.to_owned()
    }
}

/// Runs `cistern report`.
pub fn run(args: &ReportArgs) -> Result<(), CliError> {
    let config = load_config(&args.config)?;
    let now_ms = SystemClock.now_millis();
    let data = InventoryData::load(&config, now_ms)?;
    let days = args
        .unused_days
        .unwrap_or(config.inventory.unused_after_days);
    let mut report = build_report(&data, now_ms, days);
    report.provider_credentials = super::inventory::open_reader(&config)?
        .provider_credentials()
        .map_err(|e| CliError::new(super::exit::UNAVAILABLE, e.to_string()))?;
    match args.format {
        ReportFormat::Text => print!("{}", render_text(&report, false)),
        ReportFormat::Markdown => print!("{}", render_text(&report, true)),
        ReportFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        ),
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::sqlite::inventory::{Credential, RevocationRule, RevocationTimes};
    use crate::store::{Identity, IssuedToken, StoredIdentity};

    const NOW: i64 = 1_800_000_000_000;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), Some(50));
        assert_eq!(percentile(&v, 90), Some(90));
        assert_eq!(percentile(&v, 99), Some(99));
        assert_eq!(percentile(&[7], 99), Some(7));
        assert_eq!(percentile(&[1, 2, 3, 4], 50), Some(2));
        assert_eq!(percentile(&[], 50), None);
    }

    #[test]
    fn durations_read_in_sensible_units() {
        assert_eq!(human_ms(4), "4ms");
        assert_eq!(human_ms(1_500), "1.500s");
        assert_eq!(human_ms(15 * 60_000), "15.0min");
        assert_eq!(human_ms(3 * 3_600_000), "3.0h");
        assert_eq!(human_ms(60 * DAY_MS), "60.0d");
    }

    fn rule(id: i64, requested: i64, effective: Option<i64>) -> RevocationRule {
        RevocationRule {
            id,
            grain: "project".into(),
            value: "99".into(),
            issuer: String::new(),
            issued_before_ms: 0,
            requested_at_ms: requested,
            effective_at_ms: effective,
            actor: "a".into(),
            reason: "r".into(),
            source: "admin".into(),
        }
    }

    fn data() -> InventoryData {
        let a = Identity {
            issuer: "gitlab".into(),
            project_id: "42".into(),
            namespace_id: "7".into(),
            role: "deploy".into(),
            project_path: "grp|app".into(),
            namespace_path: "grp".into(),
            owner: String::new(),
        };
        let mut d = InventoryData {
            identities: vec![StoredIdentity {
                identity: a.clone(),
                first_seen_ms: NOW - 50 * DAY_MS,
                last_used_ms: NOW - 45 * DAY_MS,
                exchanges: 2,
            }],
            ..InventoryData::default()
        };
        for (jti, life) in [("short", 60_000), ("long", 3_600_000)] {
            d.unexpired.push(Credential {
                identity: a.clone(),
                token: IssuedToken {
                    jti: jti.into(),
                    kind: "access_token".into(),
                    audience: "https://deploy.test".into(),
                    scope: "deploy:read".into(),
                    issued_at_ms: NOW - 1_000,
                    expires_at_ms: NOW - 1_000 + life,
                    subject_jti: jti.into(),
                    pipeline_id: "1".into(),
                    job_id: "1".into(),
                    git_ref: "main".into(),
                },
            });
        }
        d.revocations = vec![
            rule(1, 1_000, Some(1_004)),
            rule(2, 2_000, Some(2_010)),
            rule(3, 3_000, Some(3_250)),
            rule(4, 4_000, None),
        ];
        d.revocation_times = RevocationTimes::from_rules(&d.revocations);
        d
    }

    #[test]
    fn the_report_answers_the_three_questions() {
        let r = build_report(&data(), NOW, 30);
        assert_eq!(r.outstanding_total, 2);
        assert_eq!(r.credentials.len(), 1);
        assert_eq!(r.credentials[0].count, 2);
        assert_eq!(r.identities_without_owner.len(), 1);
        assert!(r.owners.is_empty());
        assert_eq!(r.revocation.total, 4);
        assert_eq!(r.revocation.effective, 3);
        assert_eq!(r.revocation.p50_ms, Some(10));
        assert_eq!(r.revocation.max_ms, Some(250));
        assert_eq!(r.revocation.not_yet_effective.len(), 1);
        assert_eq!(r.unused.len(), 1);
        assert_eq!(r.unused[0].idle_days, 45);
        assert_eq!(r.longest_lived[0].jti, "long");
        assert!(build_report(&data(), NOW, 60).unused.is_empty());
    }

    #[test]
    fn markdown_escapes_pipes_and_text_names_the_sections() {
        let r = build_report(&data(), NOW, 30);
        let md = render_text(&r, true);
        assert!(md.starts_with("# cistern report"));
        assert!(md.contains("## 3. How fast revocation took effect"));
        assert!(md.contains("| 3 | 10ms | 250ms | 250ms | 250ms |"), "{md}");
        assert!(md.contains("grp\\|app"));
        assert!(md.contains("**WARNING: 1 identit(ies) with no known owner:**"));
        let text = render_text(&r, false);
        assert!(text.contains("3. HOW FAST REVOCATION TOOK EFFECT"));
        assert!(text.contains("#4 project 99"));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["revocation"]["p90_ms"], 250);
    }

    #[test]
    fn an_empty_store_reports_none_in_every_section() {
        let r = build_report(&InventoryData::default(), NOW, 30);
        let md = render_text(&r, true);
        assert!(md.contains("0 outstanding credential(s)"));
        assert!(md.contains("_none_"));
        assert!(md.contains("Identities with no known owner: none."));
        assert!(md.contains("| 0 | - | - | - | - |"), "{md}");
        let text = render_text(&r, false);
        assert!(text.contains("  no identities"), "{text}");
    }
}
