//! The optional CEL `condition` of a policy.
//!
//! Compiled once at load (never per request) with the `cel` crate, and
//! checked there: the only free variable is `claims`, and every
//! `claims.NAME` must be a bindable claim, so a typo fails the load instead
//! of silently denying. Per request, `claims` is a CEL map built straight
//! from the typed [`GitLabClaims`] (strings are borrowed, not copied; no
//! serde_json round trip). Types follow GitLab: ids are strings, booleans are
//! bools, `runner_id` is an int, `groups_direct` a list of strings; claims
//! absent from the token are absent from the map, so `has(claims.x)` works
//! and reading one is an evaluation error — which denies.

use std::collections::HashMap;
use std::sync::Arc;

use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use cel::common::types::{CelBool, CelInt, CelList, CelMap, CelMapKey, CelString};
use cel::common::value::Val;
use cel::{Context, Env, Program, Value};

use crate::oidc::claims::{ClaimName, ClaimValue, GitLabClaims};

/// The name of the one variable a condition sees.
const CLAIMS_VAR: &str = "claims";

/// Identifiers that name CEL types (`type(x) == string`), not variables.
const TYPE_NAMES: &[&str] = &[
    "bool",
    "int",
    "uint",
    "double",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
];

/// A compiled condition.
pub(crate) struct Condition {
    source: String,
    program: Program,
    env: Arc<Env>,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Condition")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Condition {
    /// Parses and checks `source`; the error is one line for a [`SourceError`](crate::source::SourceError).
    pub(crate) fn compile(source: &str, env: &Arc<Env>) -> Result<Self, String> {
        if source.trim().is_empty() {
            return Err("must not be empty (omit `condition` instead)".to_owned());
        }
        let program = env.compile(source).map_err(|e| {
            let msgs: Vec<String> = e
                .errors
                .iter()
                .map(|p| format!("{}:{}: {}", p.pos.0, p.pos.1, p.msg))
                .collect();
            format!("does not compile: {}", msgs.join("; "))
        })?;
        let mut problems = Vec::new();
        check_references(program.expression(), &mut Vec::new(), &mut problems);
        if !problems.is_empty() {
            problems.sort();
            problems.dedup();
            return Err(problems.join("; "));
        }
        Ok(Self {
            source: source.to_owned(),
            program,
            env: Arc::clone(env),
        })
    }

    /// The expression as written.
    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates against the claims. `Err` carries the reason for the trace;
    /// callers deny on `Err` and on `Ok(false)`.
    pub(crate) fn evaluate(&self, claims: &GitLabClaims) -> Result<bool, String> {
        let mut ctx = Context::with_env(Arc::clone(&self.env));
        ctx.add_variable_as_val(CLAIMS_VAR, Box::new(claims_map(claims)));
        match self.program.execute(&ctx) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("returned a {} instead of a bool", other.type_of())),
            Err(e) => Err(format!("evaluation error: {e}")),
        }
    }
}

/// The `claims` map, borrowing from `claims` wherever the claim is a string.
fn claims_map(claims: &GitLabClaims) -> CelMap<'_> {
    let mut map: HashMap<CelMapKey<'_>, Box<dyn Val + '_>> =
        HashMap::with_capacity(ClaimName::ALL.len());
    for &name in ClaimName::ALL {
        let value: Box<dyn Val + '_> = match claims.claim(name) {
            ClaimValue::Str(s) => Box::new(CelString::from(s)),
            ClaimValue::Id(id) => Box::new(CelString::from(id.to_string())),
            ClaimValue::Bool(b) => Box::new(CelBool::from(b)),
            ClaimValue::Int(i) => Box::new(CelInt::from(i)),
            ClaimValue::StrList(items) => Box::new(CelList::from(
                items
                    .iter()
                    .map(|s| Box::new(CelString::from(s.as_str())) as Box<dyn Val + '_>)
                    .collect::<Vec<_>>(),
            )),
            ClaimValue::Absent => continue,
        };
        map.insert(CelMapKey::from(name.as_str()), value);
    }
    CelMap::from(map)
}

/// Walks the AST: every free identifier must be `claims` (or a type name),
/// and every `claims.x` / `claims["x"]` must name a bindable claim.
/// Comprehension variables (`g` in `claims.groups_direct.exists(g, …)`) are
/// bound in their own subtrees.
fn check_references(e: &IdedExpr, bound: &mut Vec<String>, problems: &mut Vec<String>) {
    let claims_free = |bound: &Vec<String>| !bound.iter().any(|b| b == CLAIMS_VAR);
    let is_claims = |x: &IdedExpr, bound: &Vec<String>| {
        matches!(&x.expr, Expr::Ident(n) if n == CLAIMS_VAR) && claims_free(bound)
    };
    match &e.expr {
        Expr::Unspecified | Expr::Literal(_) => {}
        Expr::Ident(name) => {
            let known = name.starts_with('@')
                || name == CLAIMS_VAR
                || TYPE_NAMES.contains(&name.as_str())
                || bound.iter().any(|b| b == name);
            if !known {
                problems.push(format!(
                    "unknown variable `{name}` (only `{CLAIMS_VAR}` is defined)"
                ));
            }
        }
        Expr::Select(s) => {
            if is_claims(&s.operand, bound) && ClaimName::parse(&s.field).is_none() {
                problems.push(format!("unknown claim `{CLAIMS_VAR}.{}`", s.field));
            }
            check_references(&s.operand, bound, problems);
        }
        Expr::Call(c) => {
            if c.func_name == "_[_]"
                && let [target, key] = c.args.as_slice()
                && is_claims(target, bound)
                && let Expr::Literal(cel::common::ast::LiteralValue::String(k)) = &key.expr
                && ClaimName::parse(k.inner()).is_none()
            {
                problems.push(format!("unknown claim `{CLAIMS_VAR}[{:?}]`", k.inner()));
            }
            if let Some(t) = &c.target {
                check_references(t, bound, problems);
            }
            for a in &c.args {
                check_references(a, bound, problems);
            }
        }
        Expr::Comprehension(c) => {
            check_references(&c.iter_range, bound, problems);
            let depth = bound.len();
            bound.push(c.iter_var.clone());
            if let Some(v) = &c.iter_var2 {
                bound.push(v.clone());
            }
            bound.push(c.accu_var.clone());
            for sub in [&c.accu_init, &c.loop_cond, &c.loop_step, &c.result] {
                check_references(sub, bound, problems);
            }
            bound.truncate(depth);
        }
        Expr::List(l) => {
            for x in &l.elements {
                check_references(x, bound, problems);
            }
        }
        Expr::Map(m) => {
            for entry in &m.entries {
                check_entry(&entry.expr, bound, problems);
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                check_entry(&entry.expr, bound, problems);
            }
        }
    }
}

fn check_entry(entry: &EntryExpr, bound: &mut Vec<String>, problems: &mut Vec<String>) {
    match entry {
        EntryExpr::StructField(f) => check_references(&f.value, bound, problems),
        EntryExpr::MapEntry(m) => {
            check_references(&m.key, bound, problems);
            check_references(&m.value, bound, problems);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn claims() -> GitLabClaims {
        serde_json::from_str(include_str!("../../tests/fixtures/gitlab_payload.json")).unwrap()
    }

    fn cond(src: &str) -> Result<Condition, String> {
        Condition::compile(src, &Arc::new(Env::stdlib()))
    }

    #[test]
    fn a_true_condition_evaluates_to_true() {
        let c = cond(r#"claims.user_access_level in ["maintainer", "owner"]"#).unwrap();
        assert_eq!(c.evaluate(&claims()), Ok(true));
    }

    #[test]
    fn a_false_condition_evaluates_to_false() {
        let c = cond(r#"claims.user_access_level == "owner""#).unwrap();
        assert_eq!(c.evaluate(&claims()), Ok(false));
    }

    #[test]
    fn claims_have_gitlab_types() {
        let c = cond(
            r#"claims.project_id == "20" && claims.ref_protected == true
               && claims.runner_id == 1 && claims.project_path.startsWith("my-group/")"#,
        )
        .unwrap();
        assert_eq!(c.evaluate(&claims()), Ok(true));
    }

    #[test]
    fn reading_an_absent_claim_is_an_error_and_has_sees_it_absent() {
        let c = cond(r#"claims.groups_direct.exists(g, g == "x")"#).unwrap();
        assert!(c.evaluate(&claims()).is_err());
        let c = cond("!has(claims.groups_direct)").unwrap();
        assert_eq!(c.evaluate(&claims()), Ok(true));
    }

    #[test]
    fn a_non_bool_result_is_an_error() {
        let c = cond("claims.runner_id + 1").unwrap();
        let e = c.evaluate(&claims()).unwrap_err();
        assert!(e.contains("instead of a bool"), "{e}");
    }

    #[test]
    fn a_type_mismatch_is_an_evaluation_error() {
        let c = cond("claims.project_id == 20").unwrap();
        // CEL has no heterogeneous equality error here: string vs int is false.
        assert_eq!(c.evaluate(&claims()), Ok(false));
        let c = cond("claims.project_id > 20").unwrap();
        assert!(c.evaluate(&claims()).is_err());
    }

    #[test]
    fn a_syntax_error_is_refused_at_compile() {
        let e = cond("claims.ref ==").err().unwrap();
        assert!(e.starts_with("does not compile"), "{e}");
    }

    #[test]
    fn unknown_variables_and_claims_are_refused_at_compile() {
        let e = cond(r#"request.ref == "main""#).err().unwrap();
        assert!(e.contains("unknown variable `request`"), "{e}");
        let e = cond(r#"claims.reff == "main""#).err().unwrap();
        assert!(e.contains("unknown claim `claims.reff`"), "{e}");
        let e = cond(r#"claims["reff"] == "main""#).err().unwrap();
        assert!(e.contains("unknown claim"), "{e}");
    }

    #[test]
    fn comprehension_variables_and_type_names_are_allowed() {
        cond(r#"claims.groups_direct.exists(g, g.startsWith("a/"))"#).unwrap();
        cond("type(claims.runner_id) == int").unwrap();
        let e = cond(r#"[1].exists(g, g == 1) && g == 1"#).err().unwrap();
        assert!(e.contains("unknown variable `g`"), "{e}");
    }
}
