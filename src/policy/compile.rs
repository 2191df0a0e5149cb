//! Policy files: the strict `PolicySpec` a file parses into, and the
//! `CompiledPolicy` it becomes once checked against the operator's ceiling.
//!
//! Compilation reports every problem of a file at once, each naming the
//! file, line and field. A compiled policy only holds parsed values (ids as
//! [`GitLabId`], globs pre-classified, CEL compiled), so evaluation never
//! re-parses anything.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::condition::Condition;
use super::decide::{Check, RoleTrace};
use super::glob;
use super::{CredentialKind, MatchedBinding};
use crate::config::{CeilingConfig, IssuerConfig};
use crate::oidc::claims::{ClaimName, ClaimType, ClaimValue, GitLabClaims, GitLabId};
use crate::proxy::rules::ProxyRule;
use crate::source::{Source, SourceError};

/// A policy file as written (one role).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicySpec {
    role: String,
    owner: String,
    #[serde(default)]
    description: String,
    issuer: String,
    #[serde(default)]
    condition: Option<String>,
    #[serde(default)]
    allow_fork_merge_requests: bool,
    bindings: BTreeMap<String, toml::Value>,
    grant: GrantSpec,
}

/// `grant.target` as written: exactly one immutable id.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSpec {
    #[serde(default)]
    project: Option<toml::Value>,
    #[serde(default)]
    group: Option<toml::Value>,
}

/// `grant.target` → `"42"` (project) or `"group:7"`, ids given as integers or digit strings.
fn compile_target(t: &TargetSpec) -> Result<String, String> {
    let id = |v: &toml::Value| -> Result<String, String> {
        let text = match v {
            toml::Value::Integer(i) if *i > 0 => i.to_string(),
            toml::Value::String(s) => s.clone(),
            _ => return Err("ids are positive integers".to_owned()),
        };
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) || text.starts_with('0') {
            return Err(format!(
                "{text:?} is not an id (paths can be reused: name ids)"
            ));
        }
        Ok(text)
    };
    match (&t.project, &t.group) {
        (Some(p), None) => id(p),
        (None, Some(g)) => id(g).map(|g| format!("group:{g}")),
        _ => Err("name exactly one of project and group".to_owned()),
    }
}

/// `[grant]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantSpec {
    kind: CredentialKind,
    /// Required for `access_token`; not used by downstream kinds.
    #[serde(default)]
    audience: String,
    /// The provider of a downstream kind (`[providers.<name>]`).
    #[serde(default)]
    provider: Option<String>,
    /// GitLab access level of a `gitlab_project_token` (default 20, Reporter).
    #[serde(default)]
    access_level: Option<u8>,
    /// Where a GitLab token is minted, by immutable id: `{ project = 42 }`
    /// or `{ group = 7 }`. Default: the project the job runs in.
    #[serde(default)]
    target: Option<TargetSpec>,
    scopes: Vec<String>,
    /// Required, except for `oauth2_access_token` (the IdP's lifetime).
    #[serde(default, with = "humantime_serde::option")]
    ttl: Option<Duration>,
    /// What the token may do through the proxy route its audience names:
    /// `METHODS /path` rules (`crate::proxy::rules`). `access_token` only.
    #[serde(default)]
    proxy: Vec<String>,
}

/// One compiled binding: a claim and what it must be.
#[derive(Debug)]
struct Binding {
    claim: ClaimName,
    matcher: Matcher,
    /// `main` or `one of [main, release/*]`, computed once for traces.
    expected: String,
}

/// Any-of alternatives, typed by the claim.
#[derive(Debug)]
enum Matcher {
    Id(Vec<GitLabId>),
    Bool(bool),
    Int(Vec<i64>),
    /// For `Str` claims, and `StrList` claims (any element matching any pattern).
    Str(Vec<String>),
}

/// How a binding fared against a token; borrows, never allocates.
enum Outcome<'c> {
    /// The claim matched alternative `pattern`; `element` is the matching
    /// list element for list claims.
    Match {
        pattern: usize,
        element: Option<&'c str>,
    },
    Mismatch,
    Absent,
}

/// A policy ready to evaluate. Built only by `PolicySet::load_dir`.
#[derive(Debug)]
pub struct CompiledPolicy {
    role: Arc<str>,
    owner: Arc<str>,
    description: String,
    issuer: String,
    policy_file: Arc<str>,
    allow_fork: bool,
    bindings: Vec<Binding>,
    condition: Option<Condition>,
    kind: CredentialKind,
    audience: Arc<str>,
    scopes: Vec<String>,
    ttl: Duration,
    provider: Option<Arc<str>>,
    access_level: u8,
    downstream_target: Option<Arc<str>>,
    proxy_rules: Arc<[ProxyRule]>,
}

impl CompiledPolicy {
    /// The role name (unique across the directory).
    pub fn role(&self) -> &str {
        &self.role
    }
    /// The owning team or person.
    pub fn owner(&self) -> &str {
        &self.owner
    }
    /// Free-text description (may be empty).
    pub fn description(&self) -> &str {
        &self.description
    }
    /// The configured issuer name whose tokens this role accepts.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }
    /// The file the role came from (file name within the policy directory).
    pub fn policy_file(&self) -> &str {
        &self.policy_file
    }
    /// The proxy rules of the grant (empty: the token cannot use the proxy).
    pub fn proxy_rules(&self) -> &Arc<[ProxyRule]> {
        &self.proxy_rules
    }
    /// The CEL condition as written, if any.
    pub fn condition(&self) -> Option<&str> {
        self.condition.as_ref().map(Condition::source)
    }
    /// Whether the role opted out of the fork merge-request guard.
    pub fn allows_fork_merge_requests(&self) -> bool {
        self.allow_fork
    }
    /// The bindings as `(claim, expected)` pairs, for the inventory.
    pub fn bindings(&self) -> impl Iterator<Item = (&'static str, &str)> {
        self.bindings
            .iter()
            .map(|b| (b.claim.as_str(), b.expected.as_str()))
    }
    /// Credential kind the grant issues.
    pub fn grant_kind(&self) -> CredentialKind {
        self.kind
    }
    /// Audience of granted credentials.
    pub fn grant_audience(&self) -> &str {
        &self.audience
    }
    /// Scopes the role may grant, in file order.
    pub fn grant_scopes(&self) -> &[String] {
        &self.scopes
    }
    /// Lifetime of granted credentials.
    pub fn grant_ttl(&self) -> Duration {
        self.ttl
    }

    pub(crate) fn audience_arc(&self) -> &Arc<str> {
        &self.audience
    }
    pub(crate) fn provider_arc(&self) -> Option<&Arc<str>> {
        self.provider.as_ref()
    }
    pub(crate) fn downstream_target_arc(&self) -> Option<&Arc<str>> {
        self.downstream_target.as_ref()
    }
    /// The access level of a GitLab grant (0 for other kinds).
    pub fn access_level(&self) -> u8 {
        self.access_level
    }
    pub(crate) fn role_arc(&self) -> &Arc<str> {
        &self.role
    }
    pub(crate) fn owner_arc(&self) -> &Arc<str> {
        &self.owner
    }
    pub(crate) fn policy_file_arc(&self) -> &Arc<str> {
        &self.policy_file
    }
    pub(crate) fn has_condition(&self) -> bool {
        self.condition.is_some()
    }

    /// The fast path of a decision: no allocation except the CEL context.
    pub(crate) fn permits(&self, issuer: &str, claims: &GitLabClaims) -> bool {
        self.issuer == issuer
            && self.fork_guard_ok(claims)
            && self
                .bindings
                .iter()
                .all(|b| matches!(b.check(claims), Outcome::Match { .. }))
            && self
                .condition
                .as_ref()
                .is_none_or(|c| c.evaluate(claims) == Ok(true))
    }

    fn fork_guard_ok(&self, claims: &GitLabClaims) -> bool {
        self.allow_fork || !claims.is_possible_fork_pipeline()
    }

    /// The bindings that matched, for the grant's audit record. Call only
    /// after [`permits`](Self::permits) returned true.
    pub(crate) fn matched(&self, claims: &GitLabClaims) -> Vec<MatchedBinding> {
        self.bindings
            .iter()
            .filter_map(|b| match b.check(claims) {
                Outcome::Match { pattern, element } => Some(MatchedBinding {
                    claim: b.claim.as_str(),
                    value: match element {
                        Some(e) => e.to_owned(),
                        None => value_text(claims.claim(b.claim)),
                    },
                    pattern: b.matcher.alternative(pattern),
                }),
                Outcome::Mismatch | Outcome::Absent => None,
            })
            .collect()
    }

    /// Every check with expected and actual values, for audits of denials
    /// and for `policy test`. Agrees with [`permits`](Self::permits).
    pub(crate) fn trace(&self, issuer: &str, claims: &GitLabClaims) -> RoleTrace {
        let mut checks = Vec::with_capacity(self.bindings.len() + 3);
        checks.push(Check {
            what: "issuer".to_owned(),
            ok: self.issuer == issuer,
            expected: self.issuer.clone(),
            actual: issuer.to_owned(),
            reason: String::new(),
        });
        let fork = claims.is_possible_fork_pipeline();
        checks.push(Check {
            what: "fork guard".to_owned(),
            ok: self.fork_guard_ok(claims),
            expected: "job_project_id equal to project_id".to_owned(),
            actual: match claims.job_project_id {
                Some(j) => format!("project_id {}, job_project_id {j}", claims.project_id),
                None => format!(
                    "project_id {}, no job_project_id, pipeline_source {:?}",
                    claims.project_id, claims.pipeline_source
                ),
            },
            reason: match (fork, self.allow_fork) {
                (false, _) => String::new(),
                (true, true) => "possible fork merge-request pipeline, allowed by \
                                 allow_fork_merge_requests"
                    .to_owned(),
                (true, false) => "possible fork merge-request pipeline; the role does not \
                                  set allow_fork_merge_requests"
                    .to_owned(),
            },
        });
        for b in &self.bindings {
            let value = claims.claim(b.claim);
            let (ok, reason) = match b.check(claims) {
                Outcome::Match { .. } => (true, ""),
                Outcome::Mismatch => (false, ""),
                Outcome::Absent => (false, "claim absent from the token"),
            };
            checks.push(Check {
                what: format!("binding {}", b.claim),
                ok,
                expected: b.expected.clone(),
                actual: actual_text(value),
                reason: reason.to_owned(),
            });
        }
        // Like `permits`, the condition runs only once everything else passed.
        if let Some(c) = &self.condition
            && checks.iter().all(|c| c.ok)
        {
            let (ok, actual, reason) = match c.evaluate(claims) {
                Ok(b) => (b, b.to_string(), String::new()),
                Err(e) => (false, "error".to_owned(), e),
            };
            checks.push(Check {
                what: "condition".to_owned(),
                ok,
                expected: "true".to_owned(),
                actual,
                reason,
            });
        }
        RoleTrace {
            role: self.role.to_string(),
            owner: self.owner.to_string(),
            policy_file: self.policy_file.to_string(),
            granted: checks.iter().all(|c| c.ok),
            checks,
        }
    }
}

impl Binding {
    fn check<'c>(&self, claims: &'c GitLabClaims) -> Outcome<'c> {
        let value = claims.claim(self.claim);
        let found = |pattern: Option<usize>| match pattern {
            Some(pattern) => Outcome::Match {
                pattern,
                element: None,
            },
            None => Outcome::Mismatch,
        };
        match (&self.matcher, value) {
            (_, ClaimValue::Absent) => Outcome::Absent,
            (Matcher::Id(ids), ClaimValue::Id(id)) => found(ids.iter().position(|x| *x == id)),
            (Matcher::Bool(want), ClaimValue::Bool(b)) => found((*want == b).then_some(0)),
            (Matcher::Int(ints), ClaimValue::Int(i)) => found(ints.iter().position(|x| *x == i)),
            (Matcher::Str(pats), ClaimValue::Str(s)) => found(
                pats.iter()
                    .position(|p| glob::matches(p, s, glob::CLAIM_SEPARATORS)),
            ),
            (Matcher::Str(pats), ClaimValue::StrList(items)) => {
                for item in items {
                    if let Some(pattern) = pats
                        .iter()
                        .position(|p| glob::matches(p, item, glob::CLAIM_SEPARATORS))
                    {
                        return Outcome::Match {
                            pattern,
                            element: Some(item),
                        };
                    }
                }
                Outcome::Mismatch
            }
            // Compilation pairs matchers with claim types, so this is
            // unreachable; a mismatch denies rather than panics.
            _ => Outcome::Mismatch,
        }
    }
}

impl Matcher {
    fn alternative(&self, i: usize) -> String {
        match self {
            Matcher::Id(v) => v.get(i).map(ToString::to_string).unwrap_or_default(),
            Matcher::Bool(b) => b.to_string(),
            Matcher::Int(v) => v.get(i).map(ToString::to_string).unwrap_or_default(),
            Matcher::Str(v) => v.get(i).cloned().unwrap_or_default(),
        }
    }

    fn expected(&self) -> String {
        let list: Vec<String> = match self {
            Matcher::Id(v) => v.iter().map(ToString::to_string).collect(),
            Matcher::Bool(b) => vec![b.to_string()],
            Matcher::Int(v) => v.iter().map(ToString::to_string).collect(),
            Matcher::Str(v) => v.clone(),
        };
        match list.as_slice() {
            [one] => one.clone(),
            many => format!("one of [{}]", many.join(", ")),
        }
    }
}

/// A claim value as plain text (for `MatchedBinding::value`).
fn value_text(v: ClaimValue<'_>) -> String {
    match v {
        ClaimValue::Str(s) => s.to_owned(),
        ClaimValue::Id(id) => id.to_string(),
        ClaimValue::Bool(b) => b.to_string(),
        ClaimValue::Int(i) => i.to_string(),
        ClaimValue::StrList(items) => items.join(","),
        ClaimValue::Absent => String::new(),
    }
}

/// A claim value for traces: strings quoted, absence spelled out.
fn actual_text(v: ClaimValue<'_>) -> String {
    match v {
        ClaimValue::Str(s) => format!("{s:?}"),
        ClaimValue::StrList(items) => format!("{items:?}"),
        ClaimValue::Absent => "(claim absent)".to_owned(),
        other => value_text(other),
    }
}

/// What compilation needs besides the file.
pub(crate) struct CompileEnv<'a> {
    pub(crate) ceiling: &'a CeilingConfig,
    pub(crate) issuers: &'a BTreeMap<String, IssuerConfig>,
    pub(crate) cel: &'a Arc<cel::Env>,
}

/// Parses and checks one policy file, reporting every problem in it.
pub(crate) fn compile(
    src: &Source,
    file_name: &str,
    env: &CompileEnv<'_>,
) -> Result<CompiledPolicy, Vec<SourceError>> {
    let spec: PolicySpec = src.parse().map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    let mut err = |path: &str, msg: String| errors.push(src.error(path, msg));

    if spec.role.is_empty()
        || spec.role.len() > 128
        || !spec
            .role
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
    {
        err(
            "role",
            "must be 1 to 128 characters of a-z, 0-9, `-`, `_` and `.`".to_owned(),
        );
    }
    if spec.owner.trim().is_empty() || spec.owner.chars().any(char::is_control) {
        err(
            "owner",
            "must name the owning team or person (non-empty, one line)".to_owned(),
        );
    }
    if spec
        .description
        .chars()
        .any(|c| c.is_control() && c != '\n')
    {
        err(
            "description",
            "must not contain control characters".to_owned(),
        );
    }

    if !env.issuers.contains_key(&spec.issuer) {
        let known: Vec<&str> = env.issuers.keys().map(String::as_str).collect();
        err(
            "issuer",
            format!(
                "{:?} is not a configured issuer (configured: {})",
                spec.issuer,
                known.join(", ")
            ),
        );
    } else if !env.ceiling.issuers.contains(&spec.issuer) {
        err(
            "issuer",
            format!("{:?} is not allowed by ceiling.issuers", spec.issuer),
        );
    }

    if spec.allow_fork_merge_requests && !env.ceiling.allow_fork_opt_in {
        err(
            "allow_fork_merge_requests",
            "refused: the ceiling does not allow fork merge-request opt-ins \
             (ceiling.allow_fork_opt_in)"
                .to_owned(),
        );
    }

    let mut bindings = Vec::with_capacity(spec.bindings.len());
    let mut unknown = Vec::new();
    for (name, value) in &spec.bindings {
        let path = format!("bindings.{name}");
        let Some(claim) = ClaimName::parse(name) else {
            unknown.push(name.as_str());
            continue;
        };
        match parse_matcher(claim, value) {
            Ok(matcher) => bindings.push(Binding {
                claim,
                expected: matcher.expected(),
                matcher,
            }),
            Err(m) => err(&path, m),
        }
    }
    if !unknown.is_empty() {
        let known: Vec<&str> = ClaimName::ALL.iter().map(|c| c.as_str()).collect();
        let path = format!("bindings.{}", unknown[0]);
        err(
            &path,
            format!(
                "unknown claim(s) {}; bindable claims: {}",
                unknown.join(", "),
                known.join(", ")
            ),
        );
    }
    let binds_id = spec
        .bindings
        .keys()
        .filter_map(|k| ClaimName::parse(k))
        .any(ClaimName::is_immutable_id);
    if !binds_id {
        err(
            "bindings",
            "must bind at least one immutable id (project_id, namespace_id or \
             job_project_id): paths and names can be reused by someone else"
                .to_owned(),
        );
    }
    // Evaluate cheap exact id checks first so most mismatches stop early.
    bindings.sort_by_key(|b| !matches!(b.matcher, Matcher::Id(_)));

    let condition = match &spec.condition {
        None => None,
        Some(text) => match Condition::compile(text, env.cel) {
            Ok(c) => Some(c),
            Err(m) => {
                err("condition", m);
                None
            }
        },
    };

    let g = &spec.grant;
    let mut audience = g.audience.clone();
    let mut access_level = 0u8;
    match g.kind {
        CredentialKind::AccessToken => {
            check_access_token_grant(g, env, &mut err);
        }
        CredentialKind::GitlabProjectToken => match check_gitlab_grant(g, env, &mut err) {
            Some((name, level)) => {
                audience = format!("gitlab:{name}");
                access_level = level;
            }
            None => audience = "gitlab".to_owned(),
        },
        CredentialKind::Oauth2AccessToken => {
            if let Some(name) = check_oauth2_grant(g, env, &mut err)
                && g.audience.is_empty()
            {
                audience = format!("{OAUTH2_NO_RESOURCE}{name}");
            }
        }
    }
    let downstream_target = match (&g.target, g.kind) {
        (None, _) => None,
        (Some(t), CredentialKind::GitlabProjectToken) => match compile_target(t) {
            Ok(t) => Some(Arc::<str>::from(t)),
            Err(m) => {
                err("grant.target", m);
                None
            }
        },
        (Some(_), _) => {
            err(
                "grant.target",
                "only gitlab_project_token has a target".to_owned(),
            );
            None
        }
    };
    let ttl = match (g.kind, g.ttl) {
        (CredentialKind::Oauth2AccessToken, Some(_)) => {
            err(
                "grant.ttl",
                "not used by oauth2_access_token: the lifetime is the IdP's".to_owned(),
            );
            Duration::ZERO
        }
        (CredentialKind::Oauth2AccessToken, None) => Duration::ZERO,
        (_, None) => {
            err("grant.ttl", "required".to_owned());
            Duration::ZERO
        }
        (_, Some(ttl)) => ttl,
    };
    if g.kind == CredentialKind::Oauth2AccessToken || g.ttl.is_none() {
        // Checked above.
    } else if ttl.is_zero() {
        err("grant.ttl", "must be positive".to_owned());
    } else if ttl > env.ceiling.max_ttl {
        err(
            "grant.ttl",
            format!(
                "{} exceeds ceiling.max_ttl ({})",
                humantime::format_duration(ttl),
                humantime::format_duration(env.ceiling.max_ttl)
            ),
        );
    }

    let mut proxy_rules = Vec::with_capacity(g.proxy.len());
    if !g.proxy.is_empty() && g.kind != CredentialKind::AccessToken {
        err(
            "grant.proxy",
            "proxy rules need kind = \"access_token\" (the proxy takes cistern tokens)".to_owned(),
        );
    }
    for rule in &g.proxy {
        match ProxyRule::parse(rule) {
            Ok(r) => proxy_rules.push(r),
            Err(m) => err("grant.proxy", m),
        }
    }

    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(CompiledPolicy {
        proxy_rules: proxy_rules.into(),
        role: spec.role.into(),
        owner: spec.owner.into(),
        description: spec.description,
        issuer: spec.issuer,
        policy_file: file_name.into(),
        allow_fork: spec.allow_fork_merge_requests,
        bindings,
        condition,
        kind: spec.grant.kind,
        provider: spec.grant.provider.as_deref().map(Arc::from),
        access_level,
        downstream_target,
        audience: audience.into(),
        scopes: spec.grant.scopes,
        ttl,
    })
}

/// Reads a binding value with the type its claim demands.
fn parse_matcher(claim: ClaimName, value: &toml::Value) -> Result<Matcher, String> {
    use toml::Value as V;
    let items: &[V] = match value {
        V::Array(a) if a.is_empty() => return Err("an empty list matches nothing".to_owned()),
        V::Array(a) => a,
        one => std::slice::from_ref(one),
    };
    match claim.claim_type() {
        ClaimType::Id => items
            .iter()
            .map(|v| match v {
                V::String(s) if s.contains('*') => {
                    Err("ids take exact values; globs are not allowed".to_owned())
                }
                V::String(s) => GitLabId::parse(s)
                    .ok_or_else(|| format!("{s:?} is not a GitLab id (decimal digits)")),
                V::Integer(i) => u64::try_from(*i)
                    .map(GitLabId)
                    .map_err(|_| format!("{i} is not a GitLab id (non-negative)")),
                other => Err(format!(
                    "must be an id (a string of digits or an integer), not {}",
                    other.type_str()
                )),
            })
            .collect::<Result<_, _>>()
            .map(Matcher::Id),
        ClaimType::Bool => match value {
            V::Boolean(b) => Ok(Matcher::Bool(*b)),
            V::String(s) if s == "true" || s == "false" => {
                Err(format!("must be a TOML boolean: write {s} without quotes"))
            }
            other => Err(format!(
                "must be a TOML boolean (true or false), not {}",
                other.type_str()
            )),
        },
        ClaimType::Int => items
            .iter()
            .map(|v| match v {
                V::Integer(i) => Ok(*i),
                other => Err(format!("must be an integer, not {}", other.type_str())),
            })
            .collect::<Result<_, _>>()
            .map(Matcher::Int),
        ClaimType::Str | ClaimType::StrList => {
            let pats = items
                .iter()
                .map(|v| match v {
                    V::String(s) if s.is_empty() => {
                        Err("an empty string is not a pattern".to_owned())
                    }
                    V::String(s) if s.contains("**") => Err(format!(
                        "{s:?}: `**` is not supported; `*` matches within one `/` segment"
                    )),
                    V::String(s) => Ok(s.clone()),
                    other => Err(format!(
                        "must be a string or a list of strings, not {}",
                        other.type_str()
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            if claim == ClaimName::RefType
                && let Some(bad) = pats.iter().find(|p| *p != "branch" && *p != "tag")
            {
                return Err(format!("{bad:?}: ref_type is \"branch\" or \"tag\""));
            }
            Ok(Matcher::Str(pats))
        }
    }
}

/// `[grant]` of an `access_token`: audience and scopes within the ceiling.
fn check_access_token_grant(
    g: &GrantSpec,
    env: &CompileEnv<'_>,
    err: &mut impl FnMut(&str, String),
) {
    if g.provider.is_some() {
        err(
            "grant.provider",
            "only downstream kinds name a provider".to_owned(),
        );
    }
    if g.access_level.is_some() {
        err(
            "grant.access_level",
            "only gitlab_project_token has an access level".to_owned(),
        );
    }
    if g.audience.is_empty() || g.audience.contains(char::is_whitespace) {
        err(
            "grant.audience",
            "must be non-empty and contain no whitespace".to_owned(),
        );
    } else if !env.ceiling.audiences.is_empty()
        && !env
            .ceiling
            .audiences
            .iter()
            .any(|p| glob::matches(p, &g.audience, glob::AUDIENCE_SEPARATORS))
    {
        err(
            "grant.audience",
            format!("{:?} is not allowed by ceiling.audiences", g.audience),
        );
    }
    check_scope_list(g, err, |s| {
        env.ceiling
            .scopes
            .iter()
            .any(|p| glob::matches(p, s, glob::SCOPE_SEPARATORS))
            .then_some(())
            .ok_or_else(|| "is not allowed by ceiling.scopes".to_owned())
    });
}

/// The configured provider of kind `kind` a downstream grant names, with
/// its limits; a missing or mismatched one is an error on `grant.provider`.
fn grant_provider<'e>(
    g: &GrantSpec,
    env: &CompileEnv<'e>,
    kinds: &[&str],
    err: &mut impl FnMut(&str, String),
) -> Option<(String, &'e crate::config::ProviderLimits)> {
    let kind = kinds.join(" or ");
    let Some(name) = &g.provider else {
        err(
            "grant.provider",
            format!("name a [providers.<name>] of kind {kind}"),
        );
        return None;
    };
    match env
        .ceiling
        .providers
        .get(name)
        .filter(|l| kinds.contains(&l.kind))
    {
        Some(limits) => Some((name.clone(), limits)),
        None => {
            err(
                "grant.provider",
                format!("{name:?} is not a configured {kind} provider"),
            );
            None
        }
    }
}

/// `[grant]` of a `gitlab_project_token`: a configured gitlab provider,
/// scopes and access level within its limits. Returns the provider name
/// and the access level.
fn check_gitlab_grant(
    g: &GrantSpec,
    env: &CompileEnv<'_>,
    err: &mut impl FnMut(&str, String),
) -> Option<(String, u8)> {
    if !g.audience.is_empty() {
        err(
            "grant.audience",
            "not used by gitlab_project_token (the token is for the GitLab API)".to_owned(),
        );
    }
    let (name, limits) = grant_provider(g, env, &["gitlab"], err)?;
    let level = g.access_level.unwrap_or(20);
    if ![10, 15, 20, 25, 30, 40, 50].contains(&level) {
        err(
            "grant.access_level",
            "must be a GitLab access level: 10, 15, 20, 25, 30, 40 or 50".to_owned(),
        );
    } else if level > limits.max_access_level {
        err(
            "grant.access_level",
            format!(
                "{level} exceeds providers.{name}.max_access_level ({})",
                limits.max_access_level
            ),
        );
    }
    check_scope_list(g, err, |s| {
        limits
            .scopes
            .iter()
            .any(|p| p == s)
            .then_some(())
            .ok_or_else(|| format!("is not allowed by providers.{name}.scopes"))
    });
    Some((name.clone(), level))
}

/// The audience of an `oauth2_access_token` grant that names no resource
/// indicator: `oauth2:<provider>` (never sent to the IdP).
pub const OAUTH2_NO_RESOURCE: &str = "oauth2:";

/// `[grant]` of an `oauth2_access_token`: a configured client-credentials
/// or refresh-token provider, scopes (possibly none) and an optional resource indicator
/// (`audience`) within its lists. Returns the provider name.
fn check_oauth2_grant(
    g: &GrantSpec,
    env: &CompileEnv<'_>,
    err: &mut impl FnMut(&str, String),
) -> Option<String> {
    if g.access_level.is_some() {
        err(
            "grant.access_level",
            "only gitlab_project_token has an access level".to_owned(),
        );
    }
    let (name, limits) = grant_provider(
        g,
        env,
        &["oauth2_client_credentials", "oauth2_refresh_token"],
        err,
    )?;
    if !g.audience.is_empty() && !limits.audiences.contains(&g.audience) {
        err(
            "grant.audience",
            format!("{:?} is not in providers.{name}.audiences", g.audience),
        );
    }
    check_scope_list(g, err, |s| {
        limits
            .scopes
            .contains(&s.to_owned())
            .then_some(())
            .ok_or_else(|| format!("is not allowed by providers.{name}.scopes"))
    });
    Some(name.clone())
}

/// Non-empty, no whitespace, no duplicates, each admitted by `allowed`.
fn check_scope_list(
    g: &GrantSpec,
    err: &mut impl FnMut(&str, String),
    allowed: impl Fn(&str) -> Result<(), String>,
) {
    if g.scopes.is_empty() && g.kind != CredentialKind::Oauth2AccessToken {
        err("grant.scopes", "list at least one scope".to_owned());
    }
    for (i, s) in g.scopes.iter().enumerate() {
        if s.is_empty() || s.contains(char::is_whitespace) {
            err(
                "grant.scopes",
                format!("entry {i} {s:?}: scopes are non-empty and contain no whitespace"),
            );
        } else if g.scopes[..i].contains(s) {
            err("grant.scopes", format!("entry {i} {s:?} is listed twice"));
        } else if let Err(why) = allowed(s) {
            err("grant.scopes", format!("entry {i} {s:?} {why}"));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    /// Line numbers below refer to this text.
    pub(crate) const BASE: &str = r#"role = "deploy"
owner = "team-payments"
issuer = "gitlab"

[bindings]
project_id = "20"
ref = ["main", "release/*"]
ref_protected = true

[grant]
kind = "access_token"
audience = "https://deploy.example.com"
scopes = ["deploy:read", "deploy:write"]
ttl = "10m"
"#;

    pub(crate) fn issuers() -> BTreeMap<String, IssuerConfig> {
        toml::from_str(
            r#"
[gitlab]
issuer = "https://gitlab.example.com"
audiences = ["https://cistern.example.com"]
[staging]
issuer = "https://gitlab-staging.example.com"
audiences = ["https://cistern.example.com"]
"#,
        )
        .unwrap()
    }

    pub(crate) fn ceiling() -> CeilingConfig {
        toml::from_str(
            r#"
issuers = ["gitlab"]
max_ttl = "1h"
scopes = ["deploy:*", "artifacts:read", "artifacts:write"]
"#,
        )
        .unwrap()
    }

    fn compile_with(
        text: &str,
        ceiling: &CeilingConfig,
    ) -> Result<CompiledPolicy, Vec<SourceError>> {
        let cel = Arc::new(cel::Env::stdlib());
        let issuers = issuers();
        let env = CompileEnv {
            ceiling,
            issuers: &issuers,
            cel: &cel,
        };
        compile(
            &Source::from_text(Path::new("p.toml"), text.to_owned()),
            "p.toml",
            &env,
        )
    }

    /// Compiles `BASE` with `from` replaced by `to`, expecting exactly one error.
    fn one_error(from: &str, to: &str) -> SourceError {
        assert!(BASE.contains(from), "{from}");
        let errs = compile_with(&BASE.replacen(from, to, 1), &ceiling()).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        let e = errs.into_iter().next().unwrap();
        assert_eq!(e.file, Path::new("p.toml"));
        e
    }

    fn assert_at(e: &SourceError, field: &str, line: usize, needle: &str) {
        assert_eq!(e.field.as_deref(), Some(field), "{e}");
        assert_eq!(e.line, Some(line), "{e}");
        assert!(e.message.contains(needle), "{e}");
    }

    #[test]
    fn the_base_policy_compiles() {
        let p = compile_with(BASE, &ceiling()).unwrap();
        assert_eq!(p.role(), "deploy");
        assert_eq!(p.grant_scopes(), ["deploy:read", "deploy:write"]);
        assert_eq!(p.grant_ttl(), Duration::from_secs(600));
        assert_eq!(
            p.bindings().collect::<Vec<_>>(),
            [
                ("project_id", "20"),
                ("ref", "one of [main, release/*]"),
                ("ref_protected", "true")
            ]
        );
    }

    #[test]
    fn an_unknown_claim_is_refused_and_named() {
        let e = one_error("ref_protected = true", "reff = \"main\"");
        assert_at(&e, "bindings.reff", 8, "unknown claim(s) reff");
        assert!(e.message.contains("bindable claims: project_id"), "{e}");
    }

    #[test]
    fn an_id_binding_refuses_globs_and_non_ids() {
        let e = one_error("project_id = \"20\"", "project_id = \"2*\"");
        assert_at(&e, "bindings.project_id", 6, "globs are not allowed");
        let e = one_error("project_id = \"20\"", "project_id = \"020\"");
        assert_at(&e, "bindings.project_id", 6, "not a GitLab id");
        let e = one_error("project_id = \"20\"", "project_id = -1");
        assert_at(&e, "bindings.project_id", 6, "non-negative");
        let e = one_error("project_id = \"20\"", "project_id = true");
        assert_at(&e, "bindings.project_id", 6, "must be an id");
    }

    #[test]
    fn an_id_binding_accepts_integers_and_lists() {
        let text = BASE.replace("project_id = \"20\"", "project_id = [20, \"21\"]");
        let p = compile_with(&text, &ceiling()).unwrap();
        assert!(p.bindings().any(|b| b == ("project_id", "one of [20, 21]")));
    }

    #[test]
    fn a_bool_binding_must_be_a_toml_boolean() {
        let e = one_error("ref_protected = true", "ref_protected = \"true\"");
        assert_at(&e, "bindings.ref_protected", 8, "without quotes");
        let e = one_error("ref_protected = true", "ref_protected = [true]");
        assert_at(&e, "bindings.ref_protected", 8, "TOML boolean");
    }

    #[test]
    fn an_int_binding_must_be_an_integer() {
        let e = one_error("ref_protected = true", "runner_id = \"1\"");
        assert_at(&e, "bindings.runner_id", 8, "must be an integer");
    }

    #[test]
    fn string_bindings_refuse_empty_strings_double_stars_and_empty_lists() {
        let e = one_error("ref = [\"main\", \"release/*\"]", "ref = \"\"");
        assert_at(&e, "bindings.ref", 7, "empty string");
        let e = one_error("ref = [\"main\", \"release/*\"]", "ref = \"release/**\"");
        assert_at(&e, "bindings.ref", 7, "`**` is not supported");
        let e = one_error("ref = [\"main\", \"release/*\"]", "ref = []");
        assert_at(&e, "bindings.ref", 7, "empty list");
        let e = one_error("ref = [\"main\", \"release/*\"]", "ref = 1");
        assert_at(&e, "bindings.ref", 7, "must be a string");
        let e = one_error("ref = [\"main\", \"release/*\"]", "ref_type = \"branches\"");
        assert_at(&e, "bindings.ref_type", 7, "\"branch\" or \"tag\"");
    }

    #[test]
    fn a_policy_without_an_immutable_id_is_refused() {
        let e = one_error(
            "project_id = \"20\"",
            "project_path = \"my-group/my-project\"",
        );
        assert_at(&e, "bindings", 5, "immutable id");
        let e = one_error("project_id = \"20\"", "job_namespace_id = \"72\"");
        assert_at(&e, "bindings", 5, "immutable id");
    }

    #[test]
    fn the_issuer_must_be_configured_and_within_the_ceiling() {
        let e = one_error("issuer = \"gitlab\"", "issuer = \"github\"");
        assert_at(&e, "issuer", 3, "not a configured issuer");
        let e = one_error("issuer = \"gitlab\"", "issuer = \"staging\"");
        assert_at(&e, "issuer", 3, "ceiling.issuers");
    }

    #[test]
    fn the_ttl_must_be_positive_and_within_the_ceiling() {
        let e = one_error("ttl = \"10m\"", "ttl = \"2h\"");
        assert_at(&e, "grant.ttl", 14, "exceeds ceiling.max_ttl (1h)");
        let e = one_error("ttl = \"10m\"", "ttl = \"0s\"");
        assert_at(&e, "grant.ttl", 14, "positive");
    }

    #[test]
    fn scopes_must_be_well_formed_and_within_the_ceiling() {
        let scopes = "scopes = [\"deploy:read\", \"deploy:write\"]";
        let e = one_error(scopes, "scopes = [\"admin:all\"]");
        assert_at(
            &e,
            "grant.scopes",
            13,
            "\"admin:all\" is not allowed by ceiling.scopes",
        );
        let e = one_error(scopes, "scopes = [\"deploy:write:all\"]");
        assert_at(&e, "grant.scopes", 13, "ceiling.scopes");
        let e = one_error(scopes, "scopes = [\"deploy: read\"]");
        assert_at(&e, "grant.scopes", 13, "whitespace");
        let e = one_error(scopes, "scopes = []");
        assert_at(&e, "grant.scopes", 13, "at least one scope");
        let e = one_error(scopes, "scopes = [\"deploy:read\", \"deploy:read\"]");
        assert_at(&e, "grant.scopes", 13, "listed twice");
    }

    #[test]
    fn the_audience_must_match_the_ceiling_when_it_lists_audiences() {
        let mut c = ceiling();
        c.audiences = vec!["https://*.internal.example.com".to_owned()];
        let errs = compile_with(BASE, &c).unwrap_err();
        assert_at(&errs[0], "grant.audience", 12, "ceiling.audiences");
        let ok = BASE.replace("deploy.example.com", "deploy.internal.example.com");
        compile_with(&ok, &c).unwrap();
    }

    #[test]
    fn proxy_rules_compile_at_load_and_bad_ones_name_the_field() {
        let ok = BASE.replace(
            "ttl = \"10m\"",
            "ttl = \"10m\"\nproxy = [\"GET /projects/{job_project_id}/**\"]",
        );
        let p = compile_with(&ok, &ceiling()).unwrap();
        assert_eq!(p.proxy_rules().len(), 1);
        assert!(p.proxy_rules()[0].uses_claim("job_project_id"));
        let e = one_error(
            "ttl = \"10m\"",
            "ttl = \"10m\"\nproxy = [\"GET /projects/{user_email}\"]",
        );
        assert_eq!(e.field.as_deref(), Some("grant.proxy"), "{e}");
        assert!(e.message.contains("user_email"), "{e}");
        assert!(
            compile_with(BASE, &ceiling())
                .unwrap()
                .proxy_rules()
                .is_empty()
        );
    }

    #[test]
    fn a_condition_that_does_not_compile_is_refused_at_load() {
        let e = one_error(
            "issuer = \"gitlab\"\n",
            "issuer = \"gitlab\"\ncondition = \"claims.ref ==\"\n",
        );
        assert_at(&e, "condition", 4, "does not compile");
        let e = one_error(
            "issuer = \"gitlab\"\n",
            "issuer = \"gitlab\"\ncondition = 'env.ref == \"main\"'\n",
        );
        assert_at(&e, "condition", 4, "unknown variable `env`");
    }

    #[test]
    fn the_fork_opt_in_is_refused_unless_the_ceiling_allows_it() {
        let text = BASE.replace(
            "issuer = \"gitlab\"\n",
            "issuer = \"gitlab\"\nallow_fork_merge_requests = true\n",
        );
        let errs = compile_with(&text, &ceiling()).unwrap_err();
        assert_at(
            &errs[0],
            "allow_fork_merge_requests",
            4,
            "ceiling.allow_fork_opt_in",
        );
        let mut c = ceiling();
        c.allow_fork_opt_in = true;
        assert!(
            compile_with(&text, &c)
                .unwrap()
                .allows_fork_merge_requests()
        );
    }

    #[test]
    fn unknown_fields_and_missing_owner_are_parse_errors_with_field_and_line() {
        let e = one_error(
            "owner = \"team-payments\"",
            "owner = \"team-payments\"\nrole_name = \"x\"",
        );
        assert_eq!(e.field.as_deref(), Some("role_name"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
        let e = one_error("ttl = \"10m\"", "ttl = \"10m\"\nrefresh = true");
        assert_eq!(e.field.as_deref(), Some("refresh"), "{e}");
        let e = one_error("owner = \"team-payments\"\n", "");
        assert_eq!(e.field.as_deref(), Some("owner"), "{e}");
        let e = one_error("kind = \"access_token\"", "kind = \"aws_session\"");
        assert_eq!(e.line, Some(11), "{e}");
    }

    #[test]
    fn role_and_owner_are_checked() {
        let e = one_error("role = \"deploy\"", "role = \"Deploy Prod\"");
        assert_at(&e, "role", 1, "a-z");
        let e = one_error("owner = \"team-payments\"", "owner = \" \"");
        assert_at(&e, "owner", 2, "owning team");
    }

    #[test]
    fn every_error_of_a_file_is_reported() {
        let text = BASE
            .replace("issuer = \"gitlab\"", "issuer = \"github\"")
            .replace("ttl = \"10m\"", "ttl = \"5h\"")
            .replace("ref_protected = true", "ref_protected = \"yes\"");
        let errs = compile_with(&text, &ceiling()).unwrap_err();
        let fields: Vec<_> = errs.iter().filter_map(|e| e.field.as_deref()).collect();
        assert_eq!(
            fields,
            ["issuer", "bindings.ref_protected", "grant.ttl"],
            "{errs:?}"
        );
    }

    fn gitlab_ceiling() -> CeilingConfig {
        let mut c = ceiling();
        c.providers.insert(
            "gl".into(),
            crate::config::ProviderLimits {
                kind: "gitlab",
                max_access_level: 30,
                scopes: vec!["read_api".into(), "read_repository".into()],
                audiences: Vec::new(),
            },
        );
        c
    }

    const GITLAB: &str = r#"role = "ci"
owner = "team-payments"
issuer = "gitlab"

[bindings]
project_id = "20"

[grant]
kind = "gitlab_project_token"
provider = "gl"
scopes = ["read_api"]
access_level = 30
ttl = "10m"
"#;

    #[test]
    fn a_gitlab_grant_compiles_within_its_providers_limits() {
        let p = compile_with(GITLAB, &gitlab_ceiling()).unwrap();
        assert_eq!(p.grant_kind(), CredentialKind::GitlabProjectToken);
        assert_eq!(p.access_level(), 30);
        assert_eq!(p.provider_arc().map(|a| &**a), Some("gl"));
        assert_eq!(p.grant_audience(), "gitlab:gl");
        // Default access level: Reporter.
        let p = compile_with(
            &GITLAB.replace("access_level = 30\n", ""),
            &gitlab_ceiling(),
        )
        .unwrap();
        assert_eq!(p.access_level(), 20);
    }

    #[test]
    fn a_gitlab_grant_beyond_its_provider_is_refused_naming_the_field() {
        let cases = [
            (
                "access_level = 30",
                "access_level = 40",
                "grant.access_level",
                "max_access_level",
            ),
            (
                "access_level = 30",
                "access_level = 35",
                "grant.access_level",
                "GitLab access level",
            ),
            (
                "scopes = [\"read_api\"]",
                "scopes = [\"api\"]",
                "grant.scopes",
                "providers.gl.scopes",
            ),
            (
                "provider = \"gl\"",
                "provider = \"other\"",
                "grant.provider",
                "not a configured gitlab provider",
            ),
            (
                "provider = \"gl\"\n",
                "",
                "grant.provider",
                "name a [providers",
            ),
            (
                "kind = \"gitlab_project_token\"",
                "kind = \"gitlab_project_token\"\naudience = \"x\"",
                "grant.audience",
                "not used",
            ),
        ];
        for (from, to, field, message) in cases {
            assert!(GITLAB.contains(from), "{from}");
            let errs = compile_with(&GITLAB.replacen(from, to, 1), &gitlab_ceiling()).unwrap_err();
            assert!(
                errs.iter()
                    .any(|e| e.field.as_deref() == Some(field) && e.to_string().contains(message)),
                "{from} -> {to}: {errs:?}"
            );
        }
        // An access token names no provider.
        let errs = compile_with(
            &BASE.replace("ttl = \"10m\"", "ttl = \"10m\"\nprovider = \"gl\""),
            &gitlab_ceiling(),
        )
        .unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.field.as_deref() == Some("grant.provider")),
            "{errs:?}"
        );
    }

    #[test]
    fn an_oauth2_grant_names_a_client_credentials_provider_and_no_ttl() {
        let mut c = ceiling();
        c.providers.insert(
            "idp".into(),
            crate::config::ProviderLimits {
                kind: "oauth2_client_credentials",
                max_access_level: 0,
                scopes: vec!["api.read".into()],
                audiences: vec!["https://api.internal".into()],
            },
        );
        let ok = r#"role = "api"
owner = "team-payments"
issuer = "gitlab"
[bindings]
project_id = "20"
[grant]
kind = "oauth2_access_token"
provider = "idp"
audience = "https://api.internal"
scopes = ["api.read"]
"#;
        let p = compile_with(ok, &c).unwrap();
        assert_eq!(p.grant_audience(), "https://api.internal");
        let p = compile_with(&ok.replace("audience = \"https://api.internal\"\n", ""), &c).unwrap();
        assert_eq!(p.grant_audience(), "oauth2:idp");
        for (from, to, field) in [
            (
                "scopes = [\"api.read\"]",
                "scopes = [\"api.read\"]\nttl = \"5m\"",
                "grant.ttl",
            ),
            (
                "https://api.internal\"",
                "https://elsewhere\"",
                "grant.audience",
            ),
            ("[\"api.read\"]", "[\"api.write\"]", "grant.scopes"),
            ("provider = \"idp\"", "provider = \"gl\"", "grant.provider"),
        ] {
            let errs = compile_with(&ok.replace(from, to), &c).unwrap_err();
            assert!(
                errs.iter().any(|e| e.field.as_deref() == Some(field)),
                "{from}: {errs:?}"
            );
        }
        // Other kinds still need a ttl.
        let errs = compile_with(&BASE.replace("ttl = \"10m\"\n", ""), &c).unwrap_err();
        assert!(
            errs.iter().any(|e| e.field.as_deref() == Some("grant.ttl")),
            "{errs:?}"
        );
    }

    #[test]
    fn a_gitlab_grant_may_name_a_project_or_group_by_id() {
        let with =
            |t: &str| GITLAB.replace("ttl = \"10m\"", &format!("ttl = \"10m\"\ntarget = {t}"));
        let p = compile_with(&with("{ group = 7 }"), &gitlab_ceiling()).unwrap();
        assert_eq!(p.downstream_target_arc().map(|a| &**a), Some("group:7"));
        let p = compile_with(&with("{ project = \"99\" }"), &gitlab_ceiling()).unwrap();
        assert_eq!(p.downstream_target_arc().map(|a| &**a), Some("99"));
        assert!(
            compile_with(GITLAB, &gitlab_ceiling())
                .unwrap()
                .downstream_target_arc()
                .is_none()
        );
        for bad in [
            "{ group = \"acme/platform\" }",
            "{ project = 1, group = 2 }",
            "{}",
            "{ group = -3 }",
        ] {
            let errs = compile_with(&with(bad), &gitlab_ceiling()).unwrap_err();
            assert!(
                errs.iter()
                    .any(|e| e.field.as_deref() == Some("grant.target")),
                "{bad}: {errs:?}"
            );
        }
    }
}
