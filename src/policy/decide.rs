//! The request, the refusal and the trace of a decision.

use std::fmt::Write as _;

/// What the job asked for, beyond its ID token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoleRequest {
    /// The role named by the job, if any.
    pub role: Option<String>,
    /// The audience the job wants the credential for, if any.
    pub audience: Option<String>,
    /// The scopes the job wants; `None` (or an empty list) means all of the role's.
    pub scopes: Option<Vec<String>>,
}

/// Why no grant was made. `Display` is for logs and audit;
/// [`Denial::public_description`] is what the job is told.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Denial {
    /// The named role does not exist.
    #[error("unknown role {role:?}")]
    UnknownRole {
        /// The role the job named.
        role: String,
    },
    /// Neither a role nor an audience was requested.
    #[error("no role or audience requested")]
    NoRoleRequested,
    /// Several roles grant the requested audience to this job.
    #[error("ambiguous: roles {} all match", roles.join(", "))]
    Ambiguous {
        /// The matching roles, sorted.
        roles: Vec<String>,
    },
    /// The role's checks did not all pass. `role` is empty when the job
    /// named only an audience that no role grants.
    #[error("role {role:?} does not permit this token")]
    NotPermitted {
        /// The role refused (may be empty, see above).
        role: String,
        /// Every check, with expected and actual values (for audit only).
        trace: RoleTrace,
    },
    /// A requested scope is not among the role's scopes.
    #[error("role {role:?} does not grant scope {scope:?}")]
    ScopeNotAllowed {
        /// The role.
        role: String,
        /// The first scope requested beyond the role's.
        scope: String,
    },
    /// The requested audience differs from the role's grant audience.
    #[error("role {role:?} grants a different audience")]
    AudienceMismatch {
        /// The role.
        role: String,
    },
    /// The token comes from an issuer the role does not trust.
    #[error("role {role:?} does not trust this token's issuer")]
    WrongIssuer {
        /// The role.
        role: String,
    },
}

impl Denial {
    /// A stable short code for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Denial::UnknownRole { .. } => "unknown_role",
            Denial::NoRoleRequested => "no_role_requested",
            Denial::Ambiguous { .. } => "ambiguous_role",
            Denial::NotPermitted { .. } => "not_permitted",
            Denial::ScopeNotAllowed { .. } => "scope_not_allowed",
            Denial::AudienceMismatch { .. } => "audience_mismatch",
            Denial::WrongIssuer { .. } => "wrong_issuer",
        }
    }

    /// What the job is told: names the role, never the expected values or
    /// which binding failed (that is in the audit record only).
    pub fn public_description(&self) -> String {
        match self {
            Denial::UnknownRole { role } => format!("role {role:?} does not exist"),
            Denial::NoRoleRequested => {
                "name a role (or an audience that exactly one role grants)".to_owned()
            }
            Denial::Ambiguous { roles } => format!(
                "several roles grant this audience to this job ({}); name one",
                roles.join(", ")
            ),
            Denial::NotPermitted { role, .. } if role.is_empty() => {
                "no role granting the requested audience permits this job".to_owned()
            }
            Denial::NotPermitted { role, .. } => {
                format!("role {role:?} does not permit this job")
            }
            Denial::ScopeNotAllowed { role, scope } => {
                format!("role {role:?} does not grant scope {scope:?}")
            }
            Denial::AudienceMismatch { role } => {
                format!("role {role:?} does not grant the requested audience")
            }
            Denial::WrongIssuer { role } => {
                format!("role {role:?} does not accept tokens from this issuer")
            }
        }
    }

    /// The role concerned, when there is one.
    pub fn role(&self) -> Option<&str> {
        match self {
            Denial::UnknownRole { role }
            | Denial::ScopeNotAllowed { role, .. }
            | Denial::AudienceMismatch { role }
            | Denial::WrongIssuer { role } => Some(role),
            Denial::NotPermitted { role, .. } if !role.is_empty() => Some(role),
            Denial::NotPermitted { .. } | Denial::NoRoleRequested | Denial::Ambiguous { .. } => {
                None
            }
        }
    }
}

/// Every check of one role against one token: the audit record of a denial
/// and the output of `policy test`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoleTrace {
    /// The role.
    pub role: String,
    /// Its owner.
    pub owner: String,
    /// The policy file it came from.
    pub policy_file: String,
    /// Whether every check passed (request narrowing aside).
    pub granted: bool,
    /// The checks, in evaluation order.
    pub checks: Vec<Check>,
}

/// One check of a trace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Check {
    /// `issuer`, `fork guard`, `binding ref`, `condition`, …
    pub what: String,
    /// Whether it passed.
    pub ok: bool,
    /// What the policy wants.
    pub expected: String,
    /// What the token has.
    pub actual: String,
    /// Extra explanation (absent claim, CEL error, fork details); may be empty.
    pub reason: String,
}

/// Human text for the CLI: granted roles first, then each refused role with
/// each failed check (`binding ref: expected one of [main, release/*], got "feature/x"`).
pub fn render_traces(traces: &[RoleTrace]) -> String {
    let mut out = String::new();
    if traces.is_empty() {
        out.push_str("no roles\n");
        return out;
    }
    for t in traces.iter().filter(|t| t.granted) {
        let _ = writeln!(
            out,
            "granted: {} (owner {}, {})",
            t.role, t.owner, t.policy_file
        );
    }
    for t in traces.iter().filter(|t| !t.granted) {
        let _ = writeln!(
            out,
            "refused: {} (owner {}, {})",
            t.role, t.owner, t.policy_file
        );
        for c in t.checks.iter().filter(|c| !c.ok) {
            let _ = write!(
                out,
                "  {}: expected {}, got {}",
                c.what, c.expected, c.actual
            );
            if !c.reason.is_empty() {
                let _ = write!(out, " ({})", c.reason);
            }
            out.push('\n');
        }
    }
    out
}
