//! A directory of policy files, compiled as one unit, and the decision.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Grant;
use super::compile::{CompileEnv, CompiledPolicy, compile};
use super::decide::{Check, Denial, RoleRequest, RoleTrace};
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
    // `Denial::NotPermitted` carries the whole trace for the audit record by
    // contract; denials are not hot enough for its size to matter.
    #[allow(clippy::result_large_err)]
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
                if req
                    .audience
                    .as_deref()
                    .is_some_and(|a| a != p.grant_audience())
                {
                    return Err(Denial::AudienceMismatch { role: role.clone() });
                }
                p
            }
            (None, Some(audience)) => self.select_by_audience(issuer, claims, audience)?,
            (None, None) => return Err(Denial::NoRoleRequested),
        };
        grant(policy, claims, req.scopes.as_deref())
    }

    #[allow(clippy::result_large_err)]
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
                    (None, _) => Err(no_role_trace(vec![Check {
                        what: "audience".to_owned(),
                        ok: false,
                        expected: "a role granting this audience".to_owned(),
                        actual: format!("{audience:?}"),
                        reason: "no role for this issuer grants this audience".to_owned(),
                    }])),
                    // Several candidates, none permitted: one summary check each.
                    (Some(first), Some(second)) => Err(no_role_trace(
                        [first, second]
                            .into_iter()
                            .chain(all)
                            .map(|p| summary_check(p.trace(issuer, claims)))
                            .collect(),
                    )),
                }
            }
        }
    }

    /// Dry run / `policy test`: traces every role (or only `role`) for these
    /// claims; never issues anything. An unknown `role` gives no traces.
    pub fn explain(
        &self,
        issuer: &str,
        claims: &GitLabClaims,
        role: Option<&str>,
    ) -> Vec<RoleTrace> {
        match role {
            Some(r) => self
                .roles
                .get(r)
                .map(|p| p.trace(issuer, claims))
                .into_iter()
                .collect(),
            None => self
                .roles
                .values()
                .map(|p| p.trace(issuer, claims))
                .collect(),
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

/// A denial for an audience request that no single role answers.
fn no_role_trace(checks: Vec<Check>) -> Denial {
    Denial::NotPermitted {
        role: String::new(),
        trace: RoleTrace {
            role: String::new(),
            owner: String::new(),
            policy_file: String::new(),
            granted: false,
            checks,
        },
    }
}

/// Narrows the role's grant to the request. `Some(empty)` counts as no request.
#[allow(clippy::result_large_err)]
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
        provider: p.provider_arc().cloned(),
        access_level: p.access_level(),
        downstream_target: p.downstream_target_arc().cloned(),
        matched: p.matched(claims),
        condition_checked: p.has_condition(),
        _proof: (),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]
mod tests {
    use super::super::compile::tests::{BASE, ceiling, issuers};
    use super::super::render_traces;
    use super::*;
    use std::time::Duration;

    fn claims_with(edit: impl FnOnce(&mut serde_json::Value)) -> GitLabClaims {
        let mut v: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/gitlab_payload.json")).unwrap();
        edit(&mut v);
        serde_json::from_value(v).unwrap()
    }

    fn token_with(edit: impl FnOnce(&mut serde_json::Value)) -> VerifiedIdToken {
        VerifiedIdToken {
            issuer: "gitlab".into(),
            claims: claims_with(edit),
            kid: "k1".to_owned(),
            token_sha256: [0; 32],
            _proof: (),
        }
    }

    fn token() -> VerifiedIdToken {
        token_with(|_| {})
    }

    /// A policy directory from (file name, text) pairs.
    fn dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(d.path().join(name), text).unwrap();
        }
        d
    }

    fn load(files: &[(&str, &str)]) -> Result<PolicySet, PolicyErrors> {
        let d = dir(files);
        PolicySet::load_dir(d.path(), &ceiling(), &issuers())
    }

    fn set(files: &[(&str, &str)]) -> PolicySet {
        load(files).unwrap()
    }

    fn named(role: &str) -> RoleRequest {
        RoleRequest {
            role: Some(role.to_owned()),
            ..RoleRequest::default()
        }
    }

    fn for_audience(aud: &str) -> RoleRequest {
        RoleRequest {
            audience: Some(aud.to_owned()),
            ..RoleRequest::default()
        }
    }

    /// BASE renamed to `role`, with `from` replaced by `to`.
    fn policy(role: &str, from: &str, to: &str) -> String {
        assert!(BASE.contains(from), "{from}");
        BASE.replace("role = \"deploy\"", &format!("role = \"{role}\""))
            .replacen(from, to, 1)
    }

    fn not_permitted(r: Result<Grant, Denial>) -> RoleTrace {
        match r {
            Err(Denial::NotPermitted { trace, .. }) => trace,
            other => panic!("expected NotPermitted, got {other:?}"),
        }
    }

    fn failed(trace: &RoleTrace) -> Vec<&str> {
        trace
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.what.as_str())
            .collect()
    }

    #[test]
    fn a_matching_token_is_granted_with_the_bindings_that_decided() {
        let s = set(&[("deploy.toml", BASE)]);
        let g = s.decide(&token(), &named("deploy")).unwrap();
        assert_eq!(&*g.role, "deploy");
        assert_eq!(&*g.owner, "team-payments");
        assert_eq!(&*g.policy_file, "deploy.toml");
        assert_eq!(&*g.audience, "https://deploy.example.com");
        assert_eq!(g.scopes, ["deploy:read", "deploy:write"]);
        assert_eq!(g.ttl, Duration::from_secs(600));
        assert!(!g.condition_checked);
        let ref_binding = g.matched.iter().find(|m| m.claim == "ref").unwrap();
        assert_eq!(
            (ref_binding.value.as_str(), ref_binding.pattern.as_str()),
            ("main", "main")
        );
        assert_eq!(g.matched.len(), 3);
    }

    #[test]
    fn a_failed_binding_denies_with_a_trace_of_expected_and_actual() {
        let s = set(&[("deploy.toml", BASE)]);
        let t = token_with(|v| v["ref"] = "feature/x".into());
        let trace = not_permitted(s.decide(&t, &named("deploy")));
        assert_eq!(failed(&trace), ["binding ref"]);
        let c = trace.checks.iter().find(|c| !c.ok).unwrap();
        assert_eq!(c.expected, "one of [main, release/*]");
        assert_eq!(c.actual, "\"feature/x\"");
        let text = render_traces(&[trace]);
        assert!(
            text.contains(r#"binding ref: expected one of [main, release/*], got "feature/x""#),
            "{text}"
        );
    }

    #[test]
    fn the_public_description_names_the_role_but_not_the_failed_binding() {
        let s = set(&[("deploy.toml", BASE)]);
        let t = token_with(|v| v["ref"] = "feature/x".into());
        let d = s.decide(&t, &named("deploy")).unwrap_err();
        assert_eq!(d.code(), "not_permitted");
        assert_eq!(d.role(), Some("deploy"));
        let public = d.public_description();
        assert!(public.contains("deploy"), "{public}");
        assert!(
            !public.contains("main") && !public.contains("ref"),
            "{public}"
        );
    }

    #[test]
    fn glob_bindings_stay_within_one_segment_and_are_anchored() {
        let s = set(&[("deploy.toml", BASE)]);
        let with_ref = |r: &str| {
            let r = r.to_owned();
            s.decide(&token_with(move |v| v["ref"] = r.into()), &named("deploy"))
        };
        assert!(with_ref("release/1").is_ok());
        assert!(with_ref("release/1/x").is_err());
        assert!(with_ref("xmain").is_err());
        assert!(with_ref("main2").is_err());

        let grp = policy(
            "grp",
            "ref = [\"main\", \"release/*\"]",
            "project_path = \"grp/*\"",
        );
        let s = set(&[("grp.toml", &grp)]);
        let with_path = |p: &str| {
            let p = p.to_owned();
            s.decide(
                &token_with(move |v| v["project_path"] = p.into()),
                &named("grp"),
            )
        };
        assert!(with_path("grp/proj").is_ok());
        assert!(with_path("grp/sub/proj").is_err());
    }

    #[test]
    fn an_absent_claim_fails_its_binding() {
        let p = policy(
            "env",
            "ref_protected = true",
            "environment = \"production\"",
        );
        let s = set(&[("env.toml", &p)]);
        let t = token_with(|v| {
            v.as_object_mut().unwrap().remove("environment");
        });
        let trace = not_permitted(s.decide(&t, &named("env")));
        let c = trace.checks.iter().find(|c| !c.ok).unwrap();
        assert_eq!(
            (c.what.as_str(), c.actual.as_str()),
            ("binding environment", "(claim absent)")
        );
    }

    #[test]
    fn bool_and_id_bindings_compare_typed_values() {
        let s = set(&[("deploy.toml", BASE)]);
        let t = token_with(|v| v["ref_protected"] = "false".into());
        assert_eq!(
            failed(&not_permitted(s.decide(&t, &named("deploy")))),
            ["binding ref_protected"]
        );
        let t = token_with(|v| v["project_id"] = "200".into());
        // Also a possible fork now (project_id ≠ job_project_id).
        let trace = not_permitted(s.decide(&t, &named("deploy")));
        assert!(failed(&trace).contains(&"binding project_id"), "{trace:?}");
    }

    #[test]
    fn the_fork_guard_denies_possible_fork_pipelines_by_default() {
        let s = set(&[("deploy.toml", BASE)]);
        let fork = token_with(|v| v["job_project_id"] = "99".into());
        let trace = not_permitted(s.decide(&fork, &named("deploy")));
        assert_eq!(failed(&trace), ["fork guard"]);
        assert!(render_traces(&[trace]).contains("allow_fork_merge_requests"));
        // Older GitLab (no job_project_id): a merge-request pipeline counts as a possible fork.
        let old_mr = token_with(|v| {
            v.as_object_mut().unwrap().remove("job_project_id");
            v["pipeline_source"] = "merge_request_event".into();
        });
        assert_eq!(
            failed(&not_permitted(s.decide(&old_mr, &named("deploy")))),
            ["fork guard"]
        );
    }

    #[test]
    fn a_role_may_opt_out_of_the_fork_guard_when_the_ceiling_allows() {
        let text = BASE.replace(
            "issuer = \"gitlab\"\n",
            "issuer = \"gitlab\"\nallow_fork_merge_requests = true\n",
        );
        let d = dir(&[("deploy.toml", &text)]);
        assert!(PolicySet::load_dir(d.path(), &ceiling(), &issuers()).is_err());
        let mut c = ceiling();
        c.allow_fork_opt_in = true;
        let s = PolicySet::load_dir(d.path(), &c, &issuers()).unwrap();
        let fork = token_with(|v| v["job_project_id"] = "99".into());
        assert!(s.decide(&fork, &named("deploy")).is_ok());
    }

    #[test]
    fn a_role_refuses_tokens_of_another_issuer() {
        let s = set(&[("deploy.toml", BASE)]);
        let mut t = token();
        t.issuer = "staging".into();
        let d = s.decide(&t, &named("deploy")).unwrap_err();
        assert!(matches!(d, Denial::WrongIssuer { .. }), "{d:?}");
        assert_eq!(d.code(), "wrong_issuer");
        assert_eq!(
            failed(&s.explain("staging", &t.claims, None)[0]),
            ["issuer"]
        );
    }

    #[test]
    fn an_unknown_role_and_no_role_are_distinct_denials() {
        let s = set(&[("deploy.toml", BASE)]);
        let d = s.decide(&token(), &named("nope")).unwrap_err();
        assert_eq!((d.code(), d.role()), ("unknown_role", Some("nope")));
        let d = s.decide(&token(), &RoleRequest::default()).unwrap_err();
        assert!(matches!(d, Denial::NoRoleRequested), "{d:?}");
    }

    #[test]
    fn requested_scopes_narrow_the_grant_in_the_roles_order() {
        let s = set(&[("deploy.toml", BASE)]);
        let mut req = named("deploy");
        req.scopes = Some(vec!["deploy:write".to_owned(), "deploy:read".to_owned()]);
        assert_eq!(
            s.decide(&token(), &req).unwrap().scopes,
            ["deploy:read", "deploy:write"]
        );
        req.scopes = Some(vec!["deploy:read".to_owned()]);
        assert_eq!(s.decide(&token(), &req).unwrap().scopes, ["deploy:read"]);
        req.scopes = Some(vec![]);
        assert_eq!(s.decide(&token(), &req).unwrap().scopes.len(), 2);
    }

    #[test]
    fn requesting_a_scope_beyond_the_role_is_refused() {
        let s = set(&[("deploy.toml", BASE)]);
        let mut req = named("deploy");
        req.scopes = Some(vec!["deploy:read".to_owned(), "deploy:admin".to_owned()]);
        match s.decide(&token(), &req).unwrap_err() {
            Denial::ScopeNotAllowed { role, scope } => {
                assert_eq!((role.as_str(), scope.as_str()), ("deploy", "deploy:admin"));
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn a_scope_request_on_a_refused_role_reveals_nothing_about_scopes() {
        let s = set(&[("deploy.toml", BASE)]);
        let mut req = named("deploy");
        req.scopes = Some(vec!["deploy:admin".to_owned()]);
        let t = token_with(|v| v["ref"] = "feature/x".into());
        assert_eq!(s.decide(&t, &req).unwrap_err().code(), "not_permitted");
    }

    #[test]
    fn a_named_role_with_another_audience_is_refused() {
        let s = set(&[("deploy.toml", BASE)]);
        let mut req = named("deploy");
        req.audience = Some("https://other.example.com".to_owned());
        assert_eq!(
            s.decide(&token(), &req).unwrap_err().code(),
            "audience_mismatch"
        );
        req.audience = Some("https://deploy.example.com".to_owned());
        assert!(s.decide(&token(), &req).is_ok());
    }

    #[test]
    fn an_audience_alone_selects_the_one_matching_role() {
        let other = policy("deploy-tags", "ref_protected = true", "ref_type = \"tag\"");
        let s = set(&[("deploy.toml", BASE), ("tags.toml", &other)]);
        let g = s
            .decide(&token(), &for_audience("https://deploy.example.com"))
            .unwrap();
        assert_eq!(&*g.role, "deploy");
    }

    #[test]
    fn an_audience_matching_several_roles_is_ambiguous() {
        let other = policy(
            "deploy-too",
            "ref_protected = true",
            "ref_type = \"branch\"",
        );
        let s = set(&[("deploy.toml", BASE), ("too.toml", &other)]);
        match s
            .decide(&token(), &for_audience("https://deploy.example.com"))
            .unwrap_err()
        {
            Denial::Ambiguous { roles } => assert_eq!(roles, ["deploy", "deploy-too"]),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn an_audience_no_role_permits_is_not_permitted() {
        let other = policy("deploy-tags", "ref_protected = true", "ref_type = \"tag\"");
        let s = set(&[("deploy.toml", BASE), ("tags.toml", &other)]);
        let t = token_with(|v| v["ref"] = "feature/x".into());
        let d = s
            .decide(&t, &for_audience("https://deploy.example.com"))
            .unwrap_err();
        assert_eq!((d.code(), d.role()), ("not_permitted", None));
        let Denial::NotPermitted { trace, .. } = &d else {
            panic!()
        };
        assert_eq!(failed(trace), ["role deploy", "role deploy-tags"]);
        let d = s
            .decide(&token(), &for_audience("https://nobody.example.com"))
            .unwrap_err();
        let Denial::NotPermitted { trace, .. } = &d else {
            panic!("{d:?}")
        };
        assert_eq!(failed(trace), ["audience"]);
        assert!(!d.public_description().contains("nobody"));
    }

    #[test]
    fn a_condition_is_evaluated_only_after_the_bindings_and_must_be_true() {
        let with = |cond: &str| {
            BASE.replace(
                "issuer = \"gitlab\"\n",
                &format!("issuer = \"gitlab\"\ncondition = '{cond}'\n"),
            )
        };
        let s = set(&[
            (
                "t.toml",
                &with(r#"claims.user_access_level in ["maintainer", "owner"]"#)
                    .replace("\"deploy\"", "\"t\""),
            ),
            (
                "f.toml",
                &with(r#"claims.user_access_level == "owner""#).replace("\"deploy\"", "\"f\""),
            ),
            (
                "e.toml",
                &with("claims.project_id > 3").replace("\"deploy\"", "\"e\""),
            ),
            (
                "n.toml",
                &with("claims.runner_id").replace("\"deploy\"", "\"n\""),
            ),
        ]);
        let g = s.decide(&token(), &named("t")).unwrap();
        assert!(g.condition_checked);
        for (role, actual) in [("f", "false"), ("e", "error"), ("n", "error")] {
            let trace = not_permitted(s.decide(&token(), &named(role)));
            let c = trace.checks.last().unwrap();
            assert_eq!(
                (c.what.as_str(), c.ok, c.actual.as_str()),
                ("condition", false, actual),
                "{role}"
            );
        }
        // A failed binding: the condition is not evaluated at all.
        let t = token_with(|v| v["ref"] = "feature/x".into());
        let trace = not_permitted(s.decide(&t, &named("t")));
        assert!(trace.checks.iter().all(|c| c.what != "condition"));
    }

    #[test]
    fn explain_traces_every_role_and_agrees_with_decide() {
        let other = policy("deploy-tags", "ref_protected = true", "ref_type = \"tag\"");
        let s = set(&[("deploy.toml", BASE), ("tags.toml", &other)]);
        let c = claims_with(|_| {});
        let traces = s.explain("gitlab", &c, None);
        assert_eq!(traces.len(), 2);
        assert_eq!(
            traces
                .iter()
                .map(|t| (t.role.as_str(), t.granted))
                .collect::<Vec<_>>(),
            [("deploy", true), ("deploy-tags", false)]
        );
        let text = render_traces(&traces);
        assert!(
            text.starts_with("granted: deploy (owner team-payments, deploy.toml)\n"),
            "{text}"
        );
        assert!(text.contains("refused: deploy-tags"), "{text}");
        assert!(
            text.contains(r#"binding ref_type: expected tag, got "branch""#),
            "{text}"
        );
        assert_eq!(s.explain("gitlab", &c, Some("deploy-tags")).len(), 1);
        assert!(s.explain("gitlab", &c, Some("nope")).is_empty());
        let json = serde_json::to_value(&traces[1]).unwrap();
        assert_eq!(json["checks"][0]["what"], "issuer");
    }

    #[test]
    fn duplicate_roles_are_refused_naming_both_files() {
        let e = load(&[("a.toml", BASE), ("b.toml", BASE)]).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert!(e.0[0].file.ends_with("b.toml"), "{e}");
        assert_eq!(e.0[0].line, Some(1));
        assert!(e.0[0].message.contains("also defined in a.toml"), "{e}");
    }

    #[test]
    fn errors_of_every_file_are_reported_together() {
        let bad1 = policy("one", "ttl = \"10m\"", "ttl = \"9h\"");
        let bad2 = policy("two", "project_id = \"20\"", "project_path = \"a/b\"");
        let e = load(&[("one.toml", &bad1), ("two.toml", &bad2), ("ok.toml", BASE)]).unwrap_err();
        assert_eq!(e.0.len(), 2, "{e}");
        let text = e.to_string();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("one.toml:14: grant.ttl"), "{text}");
        assert!(text.contains("two.toml:5: bindings"), "{text}");
    }

    #[test]
    fn only_toml_files_count_and_an_empty_directory_is_an_error() {
        let e = load(&[
            ("README.md", "# notes"),
            ("deploy.toml~", "junk"),
            (".x.toml", "junk"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("no policy files"), "{e}");
        let s = set(&[("deploy.toml", BASE), ("README.md", "# notes")]);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn the_fingerprint_covers_names_and_contents_and_matches_fingerprint_dir() {
        let d = dir(&[("deploy.toml", BASE)]);
        let s = PolicySet::load_dir(d.path(), &ceiling(), &issuers()).unwrap();
        assert_eq!(s.fingerprint(), fingerprint_dir(d.path()).unwrap());
        assert_eq!(s.fingerprint().len(), 64);
        std::fs::write(d.path().join("notes.txt"), "ignored").unwrap();
        assert_eq!(s.fingerprint(), fingerprint_dir(d.path()).unwrap());
        std::fs::rename(d.path().join("deploy.toml"), d.path().join("d.toml")).unwrap();
        assert_ne!(s.fingerprint(), fingerprint_dir(d.path()).unwrap());
    }

    #[test]
    fn the_example_policies_load_against_a_documented_ceiling() {
        let mut c = ceiling();
        c.audiences = vec!["https://*.example.com".to_owned()];
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies");
        let s = PolicySet::load_dir(&dir, &c, &issuers()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            s.roles().map(CompiledPolicy::role).collect::<Vec<_>>(),
            ["artifacts-read", "deploy-production", "release-publish"]
        );
        // The sample token (protected main of project 20 in group 72, production env).
        let g = s.decide(&token(), &named("deploy-production")).unwrap();
        assert_eq!(g.scopes, ["deploy:read", "deploy:write"]);
        assert!(s.decide(&token(), &named("artifacts-read")).is_ok());
        let tag = token_with(|v| {
            v["ref"] = "v1.2.0".into();
            v["ref_type"] = "tag".into();
        });
        assert!(
            s.decide(&tag, &named("release-publish"))
                .unwrap()
                .condition_checked
        );
    }
}
