//! What the benchmark programs share: a GitLab-shaped issuer on loopback,
//! starting `cistern serve` pinned to a core, and `/proc` readings.

#![allow(dead_code)] // each benchmark uses a different part

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::routing::get;
use cistern::dev::{DevIssuer, DevMode};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A fresh development issuer key, served with GitLab's paths (discovery
/// and `/oauth/discovery/keys`) on 127.0.0.1; returns it and its URL.
pub async fn serve_issuer() -> anyhow::Result<(Arc<DevIssuer>, String)> {
    let dev = Arc::new(DevIssuer::generate(DevMode::i_am_in_dev_mode())?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (jwks, disc) = (
        dev.jwks_json(),
        dev.discovery_json(&url, &format!("{url}/oauth/discovery/keys")),
    );
    let app = Router::new()
        .route(
            "/.well-known/openid-configuration",
            get(move || async move { ([("content-type", "application/json")], disc) }),
        )
        .route(
            "/oauth/discovery/keys",
            get(move || async move { ([("content-type", "application/json")], jwks) }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((dev, url))
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Pins every thread of this process to `core` (`taskset -a -p`; threads
/// started later inherit it), so the generator never runs on the server's
/// core. Empty leaves it unpinned.
pub fn pin_self(core: &str) -> anyhow::Result<()> {
    if core.is_empty() {
        return Ok(());
    }
    let status = std::process::Command::new("taskset")
        .args(["-a", "-c", "-p", core, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .context("running taskset")?;
    anyhow::ensure!(
        status.success(),
        "taskset could not pin the generator to core {core}"
    );
    Ok(())
}

/// Starts `cistern serve --config CONFIG` (pinned to `core` with taskset
/// unless empty, with `envs` added) and waits for its "listening" line.
pub async fn start_cistern(
    cistern: &Path,
    config: &Path,
    core: &str,
    envs: &[(&str, &str)],
) -> anyhow::Result<(tokio::process::Child, u32)> {
    start(
        cistern,
        "serve",
        "cistern: listening on",
        config,
        core,
        envs,
    )
    .await
}

/// `cistern proxy --config <config>` (the routes alone, on `[proxy]
/// listen`), pinned like [`start_cistern`], once it says it is listening.
pub async fn start_cistern_proxy(
    cistern: &Path,
    config: &Path,
    core: &str,
) -> anyhow::Result<(tokio::process::Child, u32)> {
    start(
        cistern,
        "proxy",
        "cistern: proxy listening on",
        config,
        core,
        &[],
    )
    .await
}

async fn start(
    cistern: &Path,
    command: &str,
    listening: &str,
    config: &Path,
    core: &str,
    envs: &[(&str, &str)],
) -> anyhow::Result<(tokio::process::Child, u32)> {
    let mut cmd = if core.is_empty() {
        tokio::process::Command::new(cistern)
    } else {
        let mut c = tokio::process::Command::new("taskset");
        c.args(["-c", core]).arg(cistern);
        c
    };
    let mut child = cmd
        .args([command, "--config"])
        .arg(config)
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting cistern")?;
    let pid = child.id().context("cistern pid")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(l) = lines.next_line().await? {
            if l.starts_with(listening) {
                return Ok::<_, anyhow::Error>(());
            }
        }
        bail!("cistern exited before listening")
    })
    .await??;
    Ok((child, pid))
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS:`, `VmHWM:`), 0 if unreadable.
pub fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// One RFC 8693 exchange of `id_token` for `role` at cistern's `base`;
/// the status and the JSON answer.
pub async fn exchange(
    http: &reqwest::Client,
    base: &str,
    id_token: &str,
    role: &str,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let res = http
        .post(format!("{base}/oauth/token"))
        .form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", id_token),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:id_token",
            ),
            ("role", role),
        ])
        .send()
        .await?;
    let status = res.status().as_u16();
    Ok((status, res.json().await?))
}
