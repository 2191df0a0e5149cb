//! `cistern policy check`, `cistern policy test` and `cistern policy diff`
//! (whose logic lives in `policy_diff.rs`).

use std::path::Path;

use super::{CliError, PolicyTestArgs, TextOrJson, exit};
use crate::config::Config;
use crate::oidc::{GitLabClaims, claims_without_verification};
use crate::policy::{PolicySet, render_traces};

fn load_config(path: &Path) -> Result<Config, CliError> {
    Config::load(path).map_err(|e| CliError::new(exit::USAGE, e.to_string()))
}

/// Validates a policy directory; prints every error, one per line.
pub fn check(config: &Path, dir: Option<&Path>) -> Result<(), CliError> {
    let config = load_config(config)?;
    let dir = dir.unwrap_or(&config.policy.dir);
    match PolicySet::load_dir(dir, &config.ceiling, &config.issuers) {
        Ok(set) => {
            println!("{}: {} role(s) valid", dir.display(), set.len());
            for p in set.roles() {
                println!("  {}  owner={}  issuer={}", p.role(), p.owner(), p.issuer());
            }
            Ok(())
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            Err(CliError::new(
                exit::DENIED,
                format!("{} error(s) in {}", errors.0.len(), dir.display()),
            ))
        }
    }
}

/// Explains which roles the given claims would get.
pub fn test(args: &PolicyTestArgs) -> Result<(), CliError> {
    let config = load_config(&args.config)?;
    let claims: GitLabClaims = match (&args.claims, &args.token) {
        (Some(file), _) => {
            let text = std::fs::read(file).map_err(|e| {
                CliError::new(exit::USAGE, format!("cannot read {}: {e}", file.display()))
            })?;
            serde_json::from_slice(&text).map_err(|e| {
                CliError::new(
                    exit::USAGE,
                    format!("{}: not GitLab ID token claims: {e}", file.display()),
                )
            })?
        }
        (None, Some(token)) => claims_without_verification(token.trim())
            .map_err(|e| CliError::new(exit::USAGE, format!("--token: {e}")))?,
        (None, None) => {
            return Err(CliError::new(
                exit::USAGE,
                "give --claims FILE or --token JWT",
            ));
        }
    };
    let issuer = match &args.issuer {
        Some(i) if config.issuers.contains_key(i) => i.clone(),
        Some(i) => {
            return Err(CliError::new(
                exit::USAGE,
                format!("--issuer {i}: not a configured issuer"),
            ));
        }
        None => config
            .issuers
            .iter()
            .find(|(_, c)| c.issuer == claims.iss)
            .map(|(n, _)| n.clone())
            .ok_or_else(|| {
                CliError::new(
                    exit::USAGE,
                    format!(
                        "no configured issuer has URL {:?}; pass --issuer",
                        claims.iss
                    ),
                )
            })?,
    };
    let dir = args.dir.as_deref().unwrap_or(&config.policy.dir);
    let set = PolicySet::load_dir(dir, &config.ceiling, &config.issuers).map_err(|e| {
        CliError::new(
            exit::DENIED,
            format!("policies in {} are invalid:\n{e}", dir.display()),
        )
    })?;
    let traces = set.explain(&issuer, &claims, args.role.as_deref());
    if let Some(role) = &args.role
        && traces.is_empty()
    {
        return Err(CliError::new(
            exit::USAGE,
            format!("no role {role:?} in {}", dir.display()),
        ));
    }

    match args.format {
        TextOrJson::Text => {
            if args.token.is_some() {
                println!(
                    "note: the token's signature and lifetime were not checked; this explains policy only\n"
                );
            }
            print!("{}", render_traces(&traces));
        }
        TextOrJson::Json => println!(
            "{}",
            serde_json::to_string_pretty(&traces).unwrap_or_default()
        ),
    }
    if traces.iter().any(|t| t.granted) {
        Ok(())
    } else {
        Err(CliError::new(exit::DENIED, "no role would be granted"))
    }
}

/// Replays recorded exchanges against a proposed policy directory.
pub fn diff(args: &super::policy_diff::PolicyDiffArgs) -> Result<(), CliError> {
    super::policy_diff::run(args)
}
