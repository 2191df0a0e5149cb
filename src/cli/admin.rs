//! `cistern admin bootstrap`, `cistern revoke`, `cistern offboard`,
//! `cistern reenable`: through the server's admin API by default, or on the
//! store directly (`--config FILE --direct`, on the server's own host; the
//! running server picks the change up at its next poll).

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::{AdminConnection, BlockArgs, CliError, RevokeArgs, exit, send_json};
use crate::clock::SystemClock;
use crate::config::{Config, StoreConfig};
use crate::http::admin::{BOOTSTRAP_PREFIX, parse_instant};
use crate::revoke::{Block, BlockGrain, Grain, Lifecycle, LifecycleError, Requester, issuer_names};
use crate::store::sqlite::SqliteStore;

/// `cistern admin bootstrap`: a fresh break-glass credential, shown once,
/// and the config line holding only its SHA-256.
pub fn bootstrap() -> Result<(), CliError> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| CliError::new(exit::UNAVAILABLE, "the system random generator failed"))?;
    let credential = format!("{BOOTSTRAP_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        credential.as_bytes(),
    ));
    println!("bootstrap credential (shown once; store it in a vault):\n  {credential}");
    println!("\nadd to cistern.toml and restart:\n  [admin]\n  bootstrap_sha256 = \"{hash}\"");
    Ok(())
}

fn revoke_target(a: &RevokeArgs) -> (Grain, String, String) {
    let scope = a.issuer.clone().unwrap_or_default();
    if let Some(j) = &a.jti {
        (Grain::Jti, j.clone(), String::new())
    } else if let Some(p) = &a.project {
        (Grain::Project, p.clone(), scope)
    } else if let Some(n) = &a.namespace {
        (Grain::Namespace, n.clone(), scope)
    } else if let Some(r) = &a.role {
        (Grain::Role, r.clone(), String::new())
    } else if a.all {
        (Grain::All, String::new(), String::new())
    } else {
        (Grain::Issuer, scope, String::new())
    }
}

fn block_of(a: &BlockArgs) -> Block {
    let issuer = a.issuer.clone().unwrap_or_default();
    if let Some(p) = &a.project {
        Block {
            grain: BlockGrain::Project,
            issuer,
            value: p.clone(),
        }
    } else if let Some(n) = &a.namespace {
        Block {
            grain: BlockGrain::Namespace,
            issuer,
            value: n.clone(),
        }
    } else {
        Block {
            grain: BlockGrain::Role,
            issuer,
            value: a.role.clone().unwrap_or_default(),
        }
    }
}

async fn direct(conn: &AdminConnection) -> Result<(Lifecycle, SqliteStore), CliError> {
    let path = conn
        .config
        .as_deref()
        .ok_or_else(|| CliError::new(exit::USAGE, "--direct needs --config FILE"))?;
    let config = Config::load(path).map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
    let StoreConfig::Sqlite { path, synchronous } = &config.store;
    let store = SqliteStore::open(path, *synchronous).map_err(|e| {
        CliError::new(
            exit::UNAVAILABLE,
            format!("opening store {}: {e}", path.display()),
        )
    })?;
    let lifecycle = Lifecycle {
        store: Arc::new(store.clone()),
        set: None,
        clock: Arc::new(SystemClock),
        issuer_names: Arc::new(issuer_names(&config.issuers)),
    };
    Ok((lifecycle, store))
}

fn lifecycle_err(e: LifecycleError) -> CliError {
    match e {
        LifecycleError::Invalid(m) => CliError::new(exit::USAGE, m),
        LifecycleError::Store(e) => CliError::new(exit::UNAVAILABLE, format!("store: {e}")),
    }
}

fn admin_token(conn: &AdminConnection) -> Result<String, CliError> {
    let token = match &conn.token_file {
        Some(f) => std::fs::read_to_string(f).map_err(|e| {
            CliError::new(exit::USAGE, format!("reading {}: {e}", f.display()))
        })?,
        None => std::env::var("CISTERN_ADMIN_TOKEN").map_err(|_| {
            CliError::new(
                exit::USAGE,
                "no admin credential: use --token-file, CISTERN_ADMIN_TOKEN, or --config FILE --direct",
            )
        })?,
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(CliError::new(exit::USAGE, "the admin credential is empty"));
    }
    Ok(token)
}

/// POSTs or GETs an admin endpoint and returns the JSON answer, or a
/// one-line error naming the server's reason.
async fn call(conn: &AdminConnection, path: &str, body: Option<Value>) -> Result<Value, CliError> {
    let base = conn
        .server
        .as_deref()
        .ok_or_else(|| CliError::new(exit::USAGE, "give --server URL (or --config FILE --direct)"))?
        .trim_end_matches('/')
        .to_owned();
    let token = admin_token(conn)?;
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| CliError::new(exit::UNAVAILABLE, format!("http client: {e}")))?;
    let url = format!("{base}{path}");
    let req = match body {
        Some(b) => http.post(&url).json(&b),
        None => http.get(&url),
    }
    .bearer_auth(token);
    let (status, value) = send_json(&base, req).await?;
    if status.is_success() {
        return Ok(value);
    }
    let why = value
        .get("error_description")
        .or_else(|| value.get("error"))
        .and_then(Value::as_str)
        .unwrap_or("no reason given");
    let code = if status.is_server_error() {
        exit::UNAVAILABLE
    } else if status == reqwest::StatusCode::BAD_REQUEST {
        exit::USAGE
    } else {
        exit::DENIED
    };
    Err(CliError::new(
        code,
        format!("cistern refused ({status}): {why}"),
    ))
}

fn print_revocation(v: &Value, json_out: bool) {
    if json_out {
        println!("{v}");
        return;
    }
    let grain = v["grain"].as_str().unwrap_or("?");
    let value = v["value"].as_str().unwrap_or("");
    let issuer = v["issuer"].as_str().filter(|s| !s.is_empty());
    println!(
        "revocation rule {}: {grain} {value}{}, issued before {}",
        v["rule_id"],
        issuer.map(|i| format!(" (issuer {i})")).unwrap_or_default(),
        v["issued_before_ms"]
    );
    println!("  outstanding credentials covered: {}", v["outstanding"]);
    match (v["requested_at_ms"].as_i64(), v["effective_at_ms"].as_i64()) {
        (Some(r), Some(e)) => println!("  in effect on the server after {} ms", e - r),
        _ => println!("  recorded in the store; the running server applies it at its next poll"),
    }
}

/// `cistern revoke`
pub async fn revoke(a: &RevokeArgs) -> Result<(), CliError> {
    let (grain, value, issuer) = revoke_target(a);
    let before = a
        .before
        .as_deref()
        .map(parse_instant)
        .transpose()
        .map_err(|m| CliError::new(exit::USAGE, m))?;
    let out = if a.conn.direct {
        let (lc, store) = direct(&a.conn).await?;
        let r = lc
            .revoke(
                grain,
                &value,
                &issuer,
                before,
                &Requester {
                    actor: "cli",
                    reason: &a.reason,
                    source: "cli_direct",
                },
            )
            .await;
        store.close().await;
        serde_json::to_value(r.map_err(lifecycle_err)?).unwrap_or_default()
    } else {
        let mut body =
            json!({ "grain": grain, "value": value, "issuer": issuer, "reason": a.reason });
        if let Some(b) = &a.before {
            body["before"] = json!(b);
        }
        call(&a.conn, "/v1/admin/revoke", Some(body)).await?
    };
    print_revocation(&out, a.json);
    Ok(())
}

/// `cistern offboard`
pub async fn offboard(a: &BlockArgs) -> Result<(), CliError> {
    let block = block_of(a);
    let out = if a.conn.direct {
        let (lc, store) = direct(&a.conn).await?;
        let r = lc.offboard(block, "cli", &a.reason, "cli_direct").await;
        store.close().await;
        serde_json::to_value(r.map_err(lifecycle_err)?).unwrap_or_default()
    } else {
        let body = json!({ "grain": block.grain, "value": block.value, "issuer": block.issuer, "reason": a.reason });
        call(&a.conn, "/v1/admin/offboard", Some(body)).await?
    };
    if a.json {
        println!("{out}");
    } else {
        let b = &out["block"];
        println!(
            "offboarded {} {}: new exchanges are refused until `cistern reenable`",
            b["grain"].as_str().unwrap_or("?"),
            b["value"].as_str().unwrap_or("?")
        );
        print_revocation(&out["revocation"], false);
    }
    Ok(())
}

/// `cistern reenable`
pub async fn reenable(a: &BlockArgs) -> Result<(), CliError> {
    let block = block_of(a);
    let out = if a.conn.direct {
        let (lc, store) = direct(&a.conn).await?;
        let r = lc.reenable(block, "cli", &a.reason).await;
        store.close().await;
        let r = r.map_err(lifecycle_err)?;
        json!({ "reenabled": r.block, "was_blocked": r.was_blocked })
    } else {
        let body = json!({ "grain": block.grain, "value": block.value, "issuer": block.issuer, "reason": a.reason });
        call(&a.conn, "/v1/admin/reenable", Some(body)).await?
    };
    if a.json {
        println!("{out}");
    } else if out["was_blocked"].as_bool() == Some(true) {
        println!(
            "re-enabled {} {}",
            out["reenabled"]["grain"].as_str().unwrap_or("?"),
            out["reenabled"]["value"].as_str().unwrap_or("?")
        );
    } else {
        println!("no block was in force; nothing changed");
    }
    Ok(())
}

/// `cistern admin offboarded`
pub async fn list_offboarded(conn: &AdminConnection) -> Result<(), CliError> {
    let out = if conn.direct {
        let (lc, store) = direct(conn).await?;
        let r = lc.store.offboarded().await;
        store.close().await;
        json!({ "offboarded": r.map_err(|e| CliError::new(exit::UNAVAILABLE, format!("store: {e}")))? })
    } else {
        call(conn, "/v1/admin/offboarded", None).await?
    };
    println!("{out}");
    Ok(())
}
