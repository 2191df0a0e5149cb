//! `cistern exchange`: the job side of the exchange.

use serde_json::Value;

use super::{CliError, ExchangeArgs, OutputFormat, exit};
use crate::http::token::{GRANT_TOKEN_EXCHANGE, TOKEN_TYPE_JWT};

fn read_id_token(args: &ExchangeArgs) -> Result<String, CliError> {
    let token = match &args.token_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| CliError::new(exit::USAGE, format!("cannot read ID token file {}: {e}", path.display())))?,
        None => std::env::var(&args.token_env).map_err(|_| {
            CliError::new(
                exit::USAGE,
                format!(
                    "${} is not set: add `id_tokens: {{ {}: {{ aud: <cistern URL> }} }}` to the job, or pass --token-file",
                    args.token_env, args.token_env
                ),
            )
        })?,
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(CliError::new(exit::USAGE, "the ID token is empty"));
    }
    Ok(token)
}

/// Trades the job's ID token for a cistern token and prints it.
pub async fn exchange(args: &ExchangeArgs) -> Result<(), CliError> {
    let id_token = read_id_token(args)?;
    let base = args.url.trim_end_matches('/');
    let path = if args.dry_run {
        "/v1/exchange/dry-run"
    } else {
        "/oauth/token"
    };
    let scope = args.scopes.join(" ");
    let mut form: Vec<(&str, &str)> = vec![
        ("grant_type", GRANT_TOKEN_EXCHANGE),
        ("subject_token", &id_token),
        ("subject_token_type", TOKEN_TYPE_JWT),
    ];
    if let Some(r) = &args.role {
        form.push(("role", r));
    }
    if let Some(a) = &args.audience {
        form.push(("audience", a));
    }
    if !scope.is_empty() {
        form.push(("scope", &scope));
    }
    let client = reqwest::Client::builder()
        .timeout(args.timeout)
        .build()
        .map_err(|e| CliError::new(exit::UNAVAILABLE, format!("HTTP client: {e}")))?;
    let (status, body) =
        super::send_json(base, client.post(format!("{base}{path}")).form(&form)).await?;
    if !status.is_success() {
        let code = body["error"].as_str().unwrap_or("error");
        let desc = body["error_description"].as_str().unwrap_or("");
        let exit_code = if status.is_server_error() {
            exit::UNAVAILABLE
        } else {
            exit::DENIED
        };
        return Err(CliError::new(
            exit_code,
            format!("exchange refused ({status}): {code}: {desc}"),
        ));
    }
    let mut out = std::io::stdout().lock();
    let printed = if args.dry_run {
        print_dry_run(&mut out, &body, args.format)
    } else {
        print_token(&mut out, &body, args)
    };
    printed.map_err(|e| CliError::new(exit::USAGE, format!("writing output: {e}")))?;
    if args.dry_run && !body["would_grant"].as_bool().unwrap_or(false) {
        return Err(CliError::new(
            exit::DENIED,
            "dry run: the request would be denied",
        ));
    }
    Ok(())
}

fn print_token(
    out: &mut impl std::io::Write,
    body: &Value,
    args: &ExchangeArgs,
) -> std::io::Result<()> {
    let token = body["access_token"].as_str().unwrap_or_default();
    // The conventional name for what was issued, unless `--var` says otherwise:
    // existing job scripts read GITLAB_TOKEN for a GitLab token.
    let var = args
        .var
        .as_deref()
        .unwrap_or(match body["cistern_credential_kind"].as_str() {
            Some("gitlab_project_token") => "GITLAB_TOKEN",
            _ => "CISTERN_TOKEN",
        });
    match args.format {
        OutputFormat::Token => writeln!(out, "{token}"),
        OutputFormat::Env => writeln!(out, "export {var}='{}'", token.replace('\'', "'\\''")),
        OutputFormat::Dotenv => writeln!(out, "{var}={token}"),
        OutputFormat::Json => writeln!(out, "{body}"),
    }
}

fn print_dry_run(
    out: &mut impl std::io::Write,
    body: &Value,
    format: OutputFormat,
) -> std::io::Result<()> {
    if format == OutputFormat::Json {
        return writeln!(out, "{body}");
    }
    let verdict = if body["would_grant"].as_bool().unwrap_or(false) {
        "WOULD GRANT"
    } else {
        "WOULD DENY"
    };
    writeln!(
        out,
        "dry run: {verdict} role {}",
        body["role"].as_str().unwrap_or("(none)")
    )?;
    if let Some(d) = body["denial"].as_object() {
        writeln!(
            out,
            "  reason: {}",
            d.get("description").and_then(Value::as_str).unwrap_or("")
        )?;
    }
    if let Ok(traces) =
        serde_json::from_value::<Vec<crate::policy::RoleTrace>>(body["traces"].clone())
    {
        write!(out, "{}", crate::policy::render_traces(&traces))?;
    }
    Ok(())
}
