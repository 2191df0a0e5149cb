//! `cistern dev id-token`: ask a running `serve --dev` for a GitLab-shaped ID token.

use serde_json::{Map, Value, json};

use super::{CliError, exit};

fn split(kv: &str) -> Result<(&str, &str), CliError> {
    kv.split_once('=')
        .ok_or_else(|| CliError::new(exit::USAGE, format!("--claim {kv}: expected NAME=VALUE")))
}

/// Prints a fresh development ID token.
pub async fn id_token(
    url: &str,
    claims: &[String],
    claims_json: &[String],
    audience: Option<&str>,
) -> Result<(), CliError> {
    let mut overrides = Map::new();
    for kv in claims {
        let (k, v) = split(kv)?;
        overrides.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    for kv in claims_json {
        let (k, v) = split(kv)?;
        let value = serde_json::from_str(v)
            .map_err(|e| CliError::new(exit::USAGE, format!("--claim-json {k}: {e}")))?;
        overrides.insert(k.to_owned(), value);
    }
    let base = url.trim_end_matches('/');
    let request = reqwest::Client::new()
        .post(format!("{base}/dev/oidc/mint"))
        .json(&json!({ "claims": overrides, "audience": audience }));
    let (status, body) = super::send_json(base, request).await?;
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(CliError::new(
            exit::USAGE,
            format!("{base} is not running in dev mode (`cistern serve --dev`)"),
        ));
    }
    match body["id_token"].as_str() {
        Some(t) if status.is_success() => {
            println!("{t}");
            Ok(())
        }
        _ => Err(CliError::new(
            exit::DENIED,
            format!(
                "mint refused ({status}): {}",
                body["error_description"].as_str().unwrap_or("")
            ),
        )),
    }
}
