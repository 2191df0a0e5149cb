//! A directory of policy files, compiled as one unit, and the decision.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::compile::{CompileEnv, CompiledPolicy, compile};
use super::decide::{Check, Denial, RoleRequest, RoleTrace};
use super::Grant;
use crate::config::{CeilingConfig, IssuerConfig};
use crate::oidc::{GitLabClaims, VerifiedIdToken};
use crate::source::{Source, SourceError};

/// Every error of a policy directory, each naming file, line and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<SourceError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// The compiled policies of one directory, immutable once built.
#[derive(Debug)]
pub struct PolicySet {
    roles: BTreeMap<String, CompiledPolicy>,
    fingerprint: String,
}

/// A policy file as read: name within the directory, full path, bytes.
struct PolicyFile {
    name: String,
    path: PathBuf,
    bytes: Vec<u8>,
}

/// Lists and reads the policy files: regular files (symlinks followed, as
/// Kubernetes ConfigMap mounts use them) whose name ends in `.toml` and does
/// not start with `.`; subdirectories are not descended into. Sorted by name.
fn read_policy_files(dir: &Path) -> std::io::Result<Vec<PolicyFile>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.starts_with('.') || !name.ends_with(".toml") {
            continue;
        }
        let path = entry.path();
        if !std::fs::metadata(&path)?.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path)?;
        files.push(PolicyFile { name, path, bytes });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Hex SHA-256 over each (name, contents), length-prefixed so that no two
/// different directories hash alike.
fn fingerprint_of(files: &[PolicyFile]) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for f in files {
        ctx.update(&(f.name.len() as u64).to_be_bytes());
        ctx.update(f.name.as_bytes());
        ctx.update(&(f.bytes.len() as u64).to_be_bytes());
        ctx.update(&f.bytes);
    }
    hex::encode(ctx.finish().as_ref())
}

/// The fingerprint [`PolicySet::fingerprint`] would have, without compiling;
/// the reload poller compares it to skip unchanged directories.
pub fn fingerprint_dir(dir: &Path) -> std::io::Result<String> {
    read_policy_files(dir).map(|f| fingerprint_of(&f))
}

fn dir_error(dir: &Path, message: String) -> SourceError {
    SourceError {
        file: dir.to_path_buf(),
        line: None,
        field: None,
        message,
    }
}

impl PolicySet {
    /// Reads and compiles every policy file of `dir`. Fails with every error
    /// found (all files are checked), or if the directory holds no policy.
    pub fn load_dir(
        dir: &Path,
        ceiling: &CeilingConfig,
        issuers: &BTreeMap<String, IssuerConfig>,
    ) -> Result<PolicySet, PolicyErrors> {
        let files = read_policy_files(dir)
            .map_err(|e| PolicyErrors(vec![dir_error(dir, format!("cannot read: {e}"))]))?;
        if files.is_empty() {
            return Err(PolicyErrors(vec![dir_error(
                dir,
                "holds no policy files (*.toml); refusing to run with no roles".to_owned(),
            )]));
        }
        // Fingerprint the very bytes that are compiled: no read-twice race.
        let fingerprint = fingerprint_of(&files);
        let cel = Arc::new(cel::Env::stdlib());
        let env = CompileEnv {
            ceiling,
            issuers,
            cel: &cel,
        };
        let mut errors = Vec::new();
        let mut roles: BTreeMap<String, CompiledPolicy> = BTreeMap::new();
        for f in files {
            let text = match String::from_utf8(f.bytes) {
                Ok(t) => t,
                Err(_) => {
                    errors.push(dir_error(&f.path, "is not valid UTF-8".to_owned()));
                    continue;
                }
            };
            let src = Source::from_text(&f.path, text);
            match compile(&src, &f.name, &env) {
                Ok(p) => match roles.get(p.role()) {
                    Some(first) => errors.push(src.error(
                        "role",
                        format!(
                            "role {:?} is also defined in {}",
                            p.role(),
                            first.policy_file()
                        ),
                    )),
                    None => {
                        roles.insert(p.role().to_owned(), p);
                    }
                },
                Err(mut e) => errors.append(&mut e),
            }
        }
        if !errors.is_empty() {
            return Err(PolicyErrors(errors));
        }
        Ok(PolicySet { roles, fingerprint })
    }

    /// Number of roles.
    pub fn len(&self) -> usize {
        self.roles.len()
    }

    /// True when there are no roles (never for a loaded set).
    pub fn is_empty(&self) -> bool {
        self.roles.is_empty()
    }

    /// The roles, sorted by name.
    pub fn roles(&self) -> impl Iterator<Item = &CompiledPolicy> {
        self.roles.values()
    }

    /// One role by name.
    pub fn role(&self, name: &str) -> Option<&CompiledPolicy> {
        self.roles.get(name)
    }

    /// Hex SHA-256 over the (file name, contents) pairs that were compiled.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Decides a request. Order: the role (named, or selected by audience),
    /// its issuer, its checks (fork guard, bindings, condition), then the
    /// request's audience and scopes — so a job learns nothing about a
    /// role's grant unless the role permits it.
    pub fn decide(&self, token: &VerifiedIdToken, req: &RoleRequest) -> Result<Grant, Denial> {
        let issuer: &str = &token.issuer;
        let claims = &token.claims;
        let policy = match (&req.role, &req.audience) {
            (Some(role), _) => {
                let p = self
                    .roles
                    .get(role.as_str())
                    .ok_or_else(|| Denial::UnknownRole { role: role.clone() })?;
                if p.issuer() != issuer {
                    return Err(Denial::WrongIssuer { role: role.clone() });
                }
                if !p.permits(issuer, claims) {
                    return Err(Denial::NotPermitted {
                        role: role.clone(),
                        trace: p.trace(issuer, claims),
                    });
                }
                if req.audience.as_deref().is_some_and(|a| a != p.grant_audience()) {
                    return Err(Denial::AudienceMismatch { role: role.clone() });
                }
                p
            }
            (None, Some(audience)) => self.select_by_audience(issuer, claims, audience)?,
            (None, None) => return Err(Denial::NoRoleRequested),
        };
        grant(policy, claims, req.scopes.as_deref())
    }

    fn select_by_audience(
        &self,
        issuer: &str,
        claims: &GitLabClaims,
        audience: &str,
    ) -> Result<&CompiledPolicy, Denial> {
        let candidates = || {
            self.roles
                .values()
                .filter(|p| p.grant_audience() == audience && p.issuer() == issuer)
        };
        let mut permitted = candidates().filter(|p| p.permits(issuer, claims));
        match (permitted.next(), permitted.next()) {
            (Some(p), None) => Ok(p),
            (Some(a), Some(b)) => {
                let mut roles = vec![a.role().to_owned(), b.role().to_owned()];
                roles.extend(permitted.map(|p| p.role().to_owned()));
                Err(Denial::Ambiguous { roles })
            }
            (None, _) => {
                let mut all = candidates();
                match (all.next(), all.next()) {
                    (Some(only), None) => Err(Denial::NotPermitted {
                        role: only.role().to_owned(),
                        trace: only.trace(issuer, claims),
                    }),
                    (first, second) => {
                        // Zero or several candidates: one summary check each.
                        let checks = first
                            .into_iter()
                            .chain(second)
                            .chain(all)
                            .map(|p| summary_check(p.trace(issuer, claims)))
                            .collect();
                        Err(Denial::NotPermitted {
                            role: String::new(),
                            trace: RoleTrace {
                                role: String::new(),
                                owner: String::new(),
                                policy_file: String::new(),
                                granted: false,
                                checks: if_empty_no_role(checks, audience),
                            },
                        })
                    }
                }
            }
        }
    }

    /// Dry run / `policy test`: traces every role (or only `role`) for these
    /// claims; never issues anything. An unknown `role` gives no traces.
    pub fn explain(&self, issuer: &str, claims: &GitLabClaims, role: Option<&str>) -> Vec<RoleTrace> {
        match role {
            Some(r) => self
                .roles
                .get(r)
                .map(|p| p.trace(issuer, claims))
                .into_iter()
                .collect(),
            None => self.roles.values().map(|p| p.trace(issuer, claims)).collect(),
        }
    }
}

/// One role's trace condensed to a check: its first failure.
fn summary_check(t: RoleTrace) -> Check {
    let failed = t.checks.into_iter().find(|c| !c.ok);
    Check {
        what: format!("role {}", t.role),
        ok: false,
        expected: "granted".to_owned(),
        actual: "refused".to_owned(),
        reason: failed.map_or_else(String::new, |c| {
            format!("{}: expected {}, got {}", c.what, c.expected, c.actual)
        }),
    }
}

fn if_empty_no_role(checks: Vec<Check>, audience: &str) -> Vec<Check> {
    if !checks.is_empty() {
        return checks;
    }
    vec![Check {
        what: "audience".to_owned(),
        ok: false,
        expected: "a role granting this audience".to_owned(),
        actual: format!("{audience:?}"),
        reason: "no role for this issuer grants this audience".to_owned(),
    }]
}

/// Narrows the role's grant to the request. `Some(empty)` counts as no request.
fn grant(
    p: &CompiledPolicy,
    claims: &GitLabClaims,
    requested: Option<&[String]>,
) -> Result<Grant, Denial> {
    let scopes = match requested {
        Some(req) if !req.is_empty() => {
            if let Some(extra) = req.iter().find(|s| !p.grant_scopes().contains(s)) {
                return Err(Denial::ScopeNotAllowed {
                    role: p.role().to_owned(),
                    scope: extra.clone(),
                });
            }
            p.grant_scopes()
                .iter()
                .filter(|s| req.contains(s))
                .cloned()
                .collect()
        }
        _ => p.grant_scopes().to_vec(),
    };
    Ok(Grant {
        role: Arc::clone(p.role_arc()),
        owner: Arc::clone(p.owner_arc()),
        policy_file: Arc::clone(p.policy_file_arc()),
        kind: p.grant_kind(),
        audience: Arc::clone(p.audience_arc()),
        scopes,
        ttl: p.grant_ttl(),
        matched: p.matched(claims),
        condition_checked: p.has_condition(),
        _proof: (),
    })
}
