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
    /// The claims the expression reads, when it only reads literal fields;
    /// `None` when it uses `claims` as a whole. Only these go in the map.
    fields: Option<Vec<ClaimName>>,
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
        let mut refs = Refs::default();
        walk(program.expression(), &mut Vec::new(), &mut refs);
        if !refs.problems.is_empty() {
            refs.problems.sort();
            refs.problems.dedup();
            return Err(refs.problems.join("; "));
        }
        refs.fields.sort_by_key(|c| c.as_str());
        refs.fields.dedup();
        Ok(Self {
            source: source.to_owned(),
            program,
            env: Arc::clone(env),
            fields: if refs.whole { None } else { Some(refs.fields) },
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
        let names = self.fields.as_deref().unwrap_or(ClaimName::ALL);
        ctx.add_variable_as_val(CLAIMS_VAR, Box::new(claims_map(claims, names)));
        match self.program.execute(&ctx) {
            Ok(Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("returned a {} instead of a bool", other.type_of())),
            Err(e) => Err(format!("evaluation error: {e}")),
        }
    }
}

/// The `claims` map restricted to `names`, borrowing from `claims`
/// wherever the claim is a string.
fn claims_map<'c>(claims: &'c GitLabClaims, names: &[ClaimName]) -> CelMap<'c> {
    let mut map: HashMap<CelMapKey<'c>, Box<dyn Val + 'c>> = HashMap::with_capacity(names.len());
    for &name in names {
        let value: Box<dyn Val + 'c> = match claims.claim(name) {
            ClaimValue::Str(s) => Box::new(CelString::from(s)),
            ClaimValue::Id(id) => Box::new(CelString::from(id.to_string())),
            ClaimValue::Bool(b) => Box::new(CelBool::from(b)),
            ClaimValue::Int(i) => Box::new(CelInt::from(i)),
            ClaimValue::StrList(items) => Box::new(CelList::from(
                items
                    .iter()
                    .map(|s| Box::new(CelString::from(s.as_str())) as Box<dyn Val + 'c>)
                    .collect::<Vec<_>>(),
            )),
            ClaimValue::Absent => continue,
        };
        map.insert(CelMapKey::from(name.as_str()), value);
    }
    CelMap::from(map)
}

/// What a walk over a condition's AST found.
#[derive(Default)]
struct Refs {
    problems: Vec<String>,
    /// Claims read as `claims.x` or `claims["x"]`.
    fields: Vec<ClaimName>,
    /// `claims` used other than by a literal field (`size(claims)`, `k in claims`).
    whole: bool,
}

/// Walks the AST: every free identifier must be `claims` (or a type name),
/// and every `claims.x` / `claims["x"]` must name a bindable claim.
/// Comprehension variables (`g` in `claims.groups_direct.exists(g, …)`) are
/// bound in their own subtrees.
fn walk(e: &IdedExpr, bound: &mut Vec<String>, refs: &mut Refs) {
    let is_claims = |x: &IdedExpr, bound: &Vec<String>| {
        matches!(&x.expr, Expr::Ident(n) if n == CLAIMS_VAR)
            && !bound.iter().any(|b| b == CLAIMS_VAR)
    };
    let field = |name: &str, refs: &mut Refs, shown: String| match ClaimName::parse(name) {
        Some(c) => refs.fields.push(c),
        None => refs.problems.push(format!("unknown claim `{shown}`")),
    };
    match &e.expr {
        Expr::Unspecified | Expr::Literal(_) => {}
        Expr::Ident(name) => {
            if name == CLAIMS_VAR && !bound.iter().any(|b| b == name) {
                refs.whole = true;
            } else if !(name.starts_with('@')
                || TYPE_NAMES.contains(&name.as_str())
                || bound.iter().any(|b| b == name))
            {
                refs.problems.push(format!(
                    "unknown variable `{name}` (only `{CLAIMS_VAR}` is defined)"
                ));
            }
        }
        Expr::Select(s) if is_claims(&s.operand, bound) => {
            field(&s.field, refs, format!("{CLAIMS_VAR}.{}", s.field));
        }
        Expr::Select(s) => walk(&s.operand, bound, refs),
        Expr::Call(c) => {
            if c.func_name == "_[_]"
                && c.target.is_none()
                && let [target, key] = c.args.as_slice()
                && is_claims(target, bound)
                && let Expr::Literal(cel::common::ast::LiteralValue::String(k)) = &key.expr
            {
                field(k.inner(), refs, format!("{CLAIMS_VAR}[{:?}]", k.inner()));
                return;
            }
            if let Some(t) = &c.target {
                walk(t, bound, refs);
            }
            for a in &c.args {
                walk(a, bound, refs);
            }
        }
        Expr::Comprehension(c) => {
            walk(&c.iter_range, bound, refs);
            let depth = bound.len();
            bound.push(c.iter_var.clone());
            if let Some(v) = &c.iter_var2 {
                bound.push(v.clone());
            }
            bound.push(c.accu_var.clone());
            for sub in [&c.accu_init, &c.loop_cond, &c.loop_step, &c.result] {
                walk(sub, bound, refs);
            }
            bound.truncate(depth);
        }
        Expr::List(l) => {
            for x in &l.elements {
                walk(x, bound, refs);
            }
        }
        Expr::Map(m) => {
            for entry in &m.entries {
                walk_entry(&entry.expr, bound, refs);
            }
        }
        Expr::Struct(s) => {
            for entry in &s.entries {
                walk_entry(&entry.expr, bound, refs);
            }
        }
    }
}

fn walk_entry(entry: &EntryExpr, bound: &mut Vec<String>, refs: &mut Refs) {
    match entry {
        EntryExpr::StructField(f) => walk(&f.value, bound, refs),
        EntryExpr::MapEntry(m) => {
            walk(&m.key, bound, refs);
            walk(&m.value, bound, refs);
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
    fn only_the_claims_read_are_built_unless_claims_is_used_whole() {
        let c = cond(r#"claims.ref == "main" && has(claims.environment)"#).unwrap();
        assert_eq!(
            c.fields.as_deref(),
            Some(&[ClaimName::Environment, ClaimName::Ref][..])
        );
        assert_eq!(c.evaluate(&claims()), Ok(true));
        let c = cond(r#""environment" in claims && size(claims) > 20"#).unwrap();
        assert!(c.fields.is_none());
        assert_eq!(c.evaluate(&claims()), Ok(true));
        let c = cond(r#"claims["ref"] == "main""#).unwrap();
        assert_eq!(c.fields.as_deref(), Some(&[ClaimName::Ref][..]));
        assert_eq!(c.evaluate(&claims()), Ok(true));
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
