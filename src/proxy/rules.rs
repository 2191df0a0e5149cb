//! A role's proxy rules (`[grant] proxy = ["GET,POST /projects/{job_project_id}/**"]`),
//! compiled once at policy load and matched against a [`NormalPath`].
//!
//! A rule is `METHODS PATH`. `METHODS` is `*` or a comma list (`GET` also
//! allows `HEAD`). `PATH` is matched segment by segment, anchored at both
//! ends: a literal matches itself (in canonical encoding), `*` exactly one
//! non-empty segment, `**` (last segment only) zero or more segments, and
//! `{claim}` exactly one segment equal to that identity value of the
//! token, encoded as one segment (`{project_path}` of `g/p` is `g%2Fp`).

use super::path::{NormalPath, encode_segment};
use crate::mint::verify::PipelineClaims;

/// Identity values a template may name.
pub const TEMPLATE_CLAIMS: &[&str] = &[
    "project_id",
    "job_project_id",
    "namespace_id",
    "project_path",
    "namespace_path",
    "ref",
    "pipeline_id",
    "job_id",
    "environment",
];

/// One compiled rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyRule {
    /// `None` = any method.
    methods: Option<Vec<String>>,
    segments: Vec<Seg>,
    /// Ends in `**`.
    open_ended: bool,
    /// The rule as written, for audit records.
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Literal(String),
    Any,
    Claim(&'static str),
}

impl ProxyRule {
    /// Parses `METHODS PATH`.
    pub fn parse(text: &str) -> Result<ProxyRule, String> {
        let text = text.trim();
        let (methods, path) = text.split_once(char::is_whitespace).ok_or_else(|| {
            format!("{text:?}: write `METHODS /path`, e.g. `GET /projects/{{job_project_id}}/**`")
        })?;
        let path = path.trim();
        let methods = if methods == "*" {
            None
        } else {
            let list: Vec<String> = methods.split(',').map(|m| m.trim().to_owned()).collect();
            if let Some(bad) = list
                .iter()
                .find(|m| m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()))
            {
                return Err(format!(
                    "{text:?}: method {bad:?} is not an upper-case HTTP method (or use *)"
                ));
            }
            Some(list)
        };
        let rest = path
            .strip_prefix('/')
            .ok_or_else(|| format!("{text:?}: the path must start with /"))?;
        let mut segments = Vec::new();
        let mut open_ended = false;
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let last = parts.len().saturating_sub(1);
        for (i, part) in parts.into_iter().enumerate() {
            let seg = match part {
                "" => return Err(format!("{text:?}: empty path segment (//)")),
                "." | ".." => return Err(format!("{text:?}: dot segments are not allowed")),
                "**" if i == last => {
                    open_ended = true;
                    continue;
                }
                "**" => return Err(format!("{text:?}: `**` is allowed only at the end")),
                "*" => Seg::Any,
                p if p.starts_with('{') && p.ends_with('}') => {
                    let name = &p[1..p.len() - 1];
                    let claim = TEMPLATE_CLAIMS
                        .iter()
                        .find(|c| **c == name)
                        .ok_or_else(|| {
                            format!(
                                "{text:?}: {{{name}}} is not a template value (one of {})",
                                TEMPLATE_CLAIMS.join(", ")
                            )
                        })?;
                    Seg::Claim(claim)
                }
                p if p.contains(['*', '{', '}']) => {
                    return Err(format!(
                        "{text:?}: `*`, `**` and `{{claim}}` must be whole segments"
                    ));
                }
                p => {
                    // Written the way requests are normalized, so `%2f` and `%2F` agree.
                    let n = NormalPath::parse(&format!("/{p}"))
                        .map_err(|e| format!("{text:?}: {e}"))?;
                    match n.segments() {
                        [one] => Seg::Literal(one.clone()),
                        _ => return Err(format!("{text:?}: bad segment {p:?}")),
                    }
                }
            };
            segments.push(seg);
        }
        Ok(ProxyRule {
            methods,
            segments,
            open_ended,
            text: text.to_owned(),
        })
    }

    /// The rule as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether the rule names `claim` in a template.
    pub fn uses_claim(&self, claim: &str) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Seg::Claim(c) if *c == claim))
    }

    fn allows_method(&self, method: &str) -> bool {
        match &self.methods {
            None => true,
            Some(list) => list
                .iter()
                .any(|m| m == method || (method == "HEAD" && m == "GET")),
        }
    }

    fn matches_path(&self, path: &NormalPath, id: &PipelineClaims) -> bool {
        let segs = path.segments();
        if segs.len() < self.segments.len()
            || (!self.open_ended && segs.len() != self.segments.len())
        {
            return false;
        }
        self.segments
            .iter()
            .zip(segs)
            .all(|(rule, seg)| match rule {
                Seg::Literal(l) => l == seg,
                Seg::Any => !seg.is_empty(),
                Seg::Claim(c) => claim_value(id, c).is_some_and(|v| encode_segment(v) == *seg),
            })
    }
}

fn claim_value<'a>(id: &'a PipelineClaims, claim: &str) -> Option<&'a str> {
    let v = match claim {
        "project_id" => &id.project_id,
        "job_project_id" => &id.job_project_id,
        "namespace_id" => &id.namespace_id,
        "project_path" => &id.project_path,
        "namespace_path" => &id.namespace_path,
        "ref" => &id.git_ref,
        "pipeline_id" => &id.pipeline_id,
        "job_id" => &id.job_id,
        "environment" => return id.environment.as_deref().filter(|e| !e.is_empty()),
        _ => return None,
    };
    (!v.is_empty()).then_some(v.as_str())
}

/// Why no rule allowed a request (the family goes to the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleMiss {
    /// The role has no proxy rules at all.
    NoRules,
    /// Some rule matches the path, none the method.
    Method,
    /// No rule matches the path.
    Path,
}

/// The first rule allowing `method` on `path` for identity `id`.
pub fn first_match<'r>(
    rules: &'r [ProxyRule],
    method: &str,
    path: &NormalPath,
    id: &PipelineClaims,
) -> Result<&'r ProxyRule, RuleMiss> {
    if rules.is_empty() {
        return Err(RuleMiss::NoRules);
    }
    let mut path_matched = false;
    for rule in rules {
        if rule.matches_path(path, id) {
            if rule.allows_method(method) {
                return Ok(rule);
            }
            path_matched = true;
        }
    }
    Err(if path_matched {
        RuleMiss::Method
    } else {
        RuleMiss::Path
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> PipelineClaims {
        PipelineClaims {
            issuer: "gitlab".into(),
            issuer_url: "https://gitlab.example.com".into(),
            project_id: "42".into(),
            project_path: "group/app".into(),
            namespace_id: "7".into(),
            namespace_path: "group".into(),
            job_project_id: "42".into(),
            job_namespace_id: None,
            git_ref: "main".into(),
            ref_type: "branch".into(),
            ref_protected: true,
            environment: None,
            pipeline_id: "1000".into(),
            job_id: "2000".into(),
            sha: "abc".into(),
            id_token_jti: "j".into(),
        }
    }

    fn allowed(rule: &str, method: &str, path: &str) -> bool {
        let r = ProxyRule::parse(rule).unwrap();
        first_match(
            std::slice::from_ref(&r),
            method,
            &NormalPath::parse(path).unwrap(),
            &id(),
        )
        .is_ok()
    }

    #[test]
    fn templates_bind_the_tokens_own_identity() {
        let r = "GET,POST /projects/{job_project_id}/**";
        assert!(allowed(r, "GET", "/projects/42"));
        assert!(allowed(r, "GET", "/projects/42/issues"));
        assert!(allowed(r, "POST", "/projects/42/issues/1/notes"));
        assert!(allowed(r, "HEAD", "/projects/42/issues"));
        assert!(!allowed(r, "DELETE", "/projects/42/issues/1"));
        assert!(!allowed(r, "GET", "/projects/43/issues"));
        assert!(!allowed(r, "GET", "/projects/420"));
        assert!(!allowed(r, "GET", "/projects"));
        // A normalized escape cannot reach another project.
        assert!(!allowed(
            r,
            "GET",
            &NormalPath::parse("/projects/42/%2e%2e/43")
                .unwrap()
                .as_text()
        ));
    }

    #[test]
    fn path_templates_are_one_encoded_segment() {
        let r = "GET /projects/{project_path}/repository/tree";
        assert!(allowed(r, "GET", "/projects/group%2Fapp/repository/tree"));
        assert!(allowed(r, "GET", "/projects/group%2fapp/repository/tree"));
        assert!(!allowed(r, "GET", "/projects/group/app/repository/tree"));
    }

    #[test]
    fn anchored_and_segment_wise() {
        assert!(allowed("GET /version", "GET", "/version"));
        assert!(!allowed("GET /version", "GET", "/version/x"));
        assert!(!allowed("GET /version", "GET", "/versions"));
        assert!(allowed("* /projects/*/jobs", "PUT", "/projects/9/jobs"));
        assert!(!allowed("* /projects/*/jobs", "PUT", "/projects/9/8/jobs"));
        assert!(allowed("GET /**", "GET", "/"));
    }

    #[test]
    fn an_absent_environment_matches_nothing() {
        assert!(!allowed(
            "GET /environments/{environment}",
            "GET",
            "/environments/"
        ));
    }

    #[test]
    fn bad_rules_are_refused_at_load() {
        for bad in [
            "/projects",
            "get /projects",
            "GET projects",
            "GET /projects/**/jobs",
            "GET /projects/a*",
            "GET /projects/{user_email}",
            "GET /a//b",
            "GET /a/../b",
            "GET /a;b",
        ] {
            assert!(ProxyRule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_miss_names_its_family() {
        let rules = [ProxyRule::parse("GET /projects/{job_project_id}/**").unwrap()];
        let p = NormalPath::parse("/projects/42/issues").unwrap();
        assert_eq!(
            first_match(&rules, "DELETE", &p, &id()).unwrap_err(),
            RuleMiss::Method
        );
        let p = NormalPath::parse("/users").unwrap();
        assert_eq!(
            first_match(&rules, "GET", &p, &id()).unwrap_err(),
            RuleMiss::Path
        );
        assert_eq!(
            first_match(&[], "GET", &p, &id()).unwrap_err(),
            RuleMiss::NoRules
        );
    }
}
