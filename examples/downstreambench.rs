//! Downstream-credential benchmark for BENCHMARKS.md (issue 4):
//!
//! 1. cistern's own overhead per minted GitLab token beyond the upstream
//!    call: sequential exchanges granting a GitLab project access token,
//!    against the same exchange granting a cistern token and against a
//!    direct call to the GitLab mock (the upstream call alone);
//! 2. the reaper's throughput: thousands of short-lived GitLab tokens
//!    minted at once, then revoked by cistern as they expire; the rate of
//!    revocations the mock receives and how late each was (from the audit
//!    records' `late_ms`).
//!
//! The GitLab side is an in-process mock of GitLab's access-token API
//! (create, revoke, list) on loopback, answering at once, so the figures
//! are cistern's. cistern runs pinned to core 0, this process to core 1.
//! Loopback only; every phase is bounded in count and time.

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use clap::Parser;
use hdrhistogram::Histogram;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
struct Args {
    /// The cistern binary to run.
    #[arg(long, default_value = "target/release/cistern")]
    cistern: std::path::PathBuf,
    /// Sequential exchanges per kind in the overhead phase.
    #[arg(long, default_value_t = 500)]
    sequential: usize,
    /// Tokens minted for the reaper phase.
    #[arg(long, default_value_t = 12_000)]
    reap: usize,
    /// Concurrent exchanges while minting them.
    #[arg(long, default_value_t = 32)]
    connections: usize,
}

const AUD: &str = "https://cistern.bench";

#[derive(Default)]
struct Mock {
    next_id: AtomicU64,
    created: AtomicU64,
    revoked: Mutex<Vec<Instant>>,
}

async fn create(
    State(m): State<Arc<Mock>>,
    body: axum::Json<Value>,
) -> (StatusCode, axum::Json<Value>) {
    let id = m.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    m.created.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::CREATED,
        axum::Json(json!({
            "id": id,
            "name": body["name"],
            "description": body["description"],
            "scopes": body["scopes"],
            "access_level": body["access_level"],
            "expires_at": body["expires_at"],
            "created_at": "2026-11-30T00:00:00.000Z",
            "active": true,
            "revoked": false,
            "user_id": 1000 + id,
            "token": format!("glpat-bench{id:020}"),
        })),
    )
}

async fn revoke(State(m): State<Arc<Mock>>, Path((_p, _id)): Path<(String, String)>) -> StatusCode {
    m.revoked
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(Instant::now());
    StatusCode::NO_CONTENT
}

async fn list() -> axum::Json<Value> {
    axum::Json(json!([]))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

fn quantiles(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.0} µs, p99 {:.0} µs",
        h.value_at_quantile(0.5) as f64,
        h.value_at_quantile(0.99) as f64
    )
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Pin this process (mock, issuer, client) to core 1.
    let _ = std::process::Command::new("taskset")
        .args(["-pc", "1", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();

    let mock = Arc::new(Mock::default());
    let gitlab_app = Router::new()
        .route(
            "/api/v4/projects/{id}/access_tokens",
            get(list).post(create),
        )
        .route(
            "/api/v4/projects/{id}/access_tokens/{token_id}",
            delete(revoke),
        )
        .with_state(mock.clone());
    let gitlab_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let gitlab_url = format!("http://{}", gitlab_listener.local_addr()?);
    tokio::spawn(async move { axum::serve(gitlab_listener, gitlab_app).await });

    let (dev, issuer_url) = common::serve_issuer().await?;

    let dir = tempfile::tempdir()?;
    let port = common::free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    std::fs::create_dir(dir.path().join("policies"))?;
    let role = |name: &str, kind: &str, ttl: &str| {
        let grant = if kind == "access_token" {
            format!(
                "kind = \"access_token\"\naudience = \"https://api.bench\"\nscopes = [\"read_api\"]\nttl = \"{ttl}\"\n"
            )
        } else {
            format!(
                "kind = \"gitlab_project_token\"\nprovider = \"gitlab\"\nscopes = [\"read_api\"]\naccess_level = 20\nttl = \"{ttl}\"\n"
            )
        };
        format!(
            "role = \"{name}\"\nowner = \"team-bench\"\ndescription = \"benchmark\"\nissuer = \"gitlab\"\n\
             [bindings]\nproject_id = \"42\"\n[grant]\n{grant}"
        )
    };
    for (name, kind, ttl) in [
        ("cistern-token", "access_token", "10m"),
        ("gitlab-token", "gitlab_project_token", "10m"),
        ("gitlab-short", "gitlab_project_token", "10s"),
    ] {
        std::fs::write(
            dir.path().join(format!("policies/{name}.toml")),
            role(name, kind, ttl),
        )?;
    }
    std::fs::write(
        dir.path().join("cistern.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nissuer = \"{base}\"\n[store]\nkind = \"sqlite\"\npath = \"data/cistern.db\"\n\
             [signing]\nkey_dir = \"keys\"\n\
             [issuers.gitlab]\nissuer = \"{issuer_url}\"\naudiences = [\"{AUD}\"]\nallow_insecure_http = true\nreplay_protection = true\n\
             [policy]\ndir = \"policies\"\n[ceiling]\nissuers = [\"gitlab\"]\nmax_ttl = \"1h\"\nscopes = [\"read_api\"]\n\
             [log]\nlevel = \"warn\"\n\
             [providers.gitlab]\nkind = \"gitlab\"\nurl = \"{gitlab_url}\"\nallow_insecure_http = true\n\
             token_env = \"BENCH_GITLAB_TOKEN\"\nreconcile_interval = \"1h\"\n"
        ),
    )?;
    let (_child, _pid) = common::start_cistern(
        &args.cistern,
        &dir.path().join("cistern.toml"),
        "0",
        &[("BENCH_GITLAB_TOKEN", "glpat-bench-own-credential")],
    )
    .await?;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()?;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    };
    let exchange = {
        let (http, dev, issuer_url, base) =
            (http.clone(), dev.clone(), issuer_url.clone(), base.clone());
        move |role: &'static str| {
            let (http, dev, issuer_url, base) =
                (http.clone(), dev.clone(), issuer_url.clone(), base.clone());
            async move {
                let id =
                    dev.mint_id_token(&issuer_url, AUD, &serde_json::Map::new(), now(), 3600)?;
                let started = Instant::now();
                let (status, body) = common::exchange(&http, &base, &id, role).await?;
                let took = started.elapsed();
                if status != 200 {
                    bail!("exchange for {role}: {status} {body}");
                }
                Ok::<_, anyhow::Error>(took)
            }
        }
    };

    // Warm-up: JWKS fetch, connections, page cache.
    for _ in 0..50 {
        exchange("cistern-token").await?;
        exchange("gitlab-token").await?;
    }

    // 1. Overhead per minted GitLab token.
    let mut direct = Histogram::<u64>::new(3)?;
    let body = json!({"name": "bench", "scopes": ["read_api"], "access_level": 20, "expires_at": "2030-01-01"});
    for _ in 0..args.sequential {
        let started = Instant::now();
        let res = http
            .post(format!("{gitlab_url}/api/v4/projects/42/access_tokens"))
            .header("PRIVATE-TOKEN", "glpat-bench")
            .json(&body)
            .send()
            .await?;
        let _ = res.bytes().await?;
        direct.record(started.elapsed().as_micros() as u64)?;
    }
    let mut plain = Histogram::<u64>::new(3)?;
    let mut gitlab = Histogram::<u64>::new(3)?;
    for _ in 0..args.sequential {
        plain.record(exchange("cistern-token").await?.as_micros() as u64)?;
        gitlab.record(exchange("gitlab-token").await?.as_micros() as u64)?;
    }
    let overhead_p50 = gitlab.value_at_quantile(0.5) as f64 - direct.value_at_quantile(0.5) as f64;
    let overhead_p99 =
        gitlab.value_at_quantile(0.99) as f64 - direct.value_at_quantile(0.99) as f64;
    println!("| sequential, {} each | latency |", args.sequential);
    println!("|---|---|");
    println!(
        "| the GitLab create call alone (client → mock) | {} |",
        quantiles(&direct)
    );
    println!(
        "| exchange granting a cistern token | {} |",
        quantiles(&plain)
    );
    println!(
        "| exchange granting a GitLab project access token | {} |",
        quantiles(&gitlab)
    );
    println!(
        "| cistern's overhead per GitLab token beyond the upstream call | p50 {overhead_p50:.0} µs, p99 {overhead_p99:.0} µs |"
    );

    // 2. Reaper throughput: mint `reap` tokens that live 10 s, as fast as
    // cistern takes them, then watch the revocations arrive.
    let revoked_before = mock.revoked.lock().map_or(0, |v| v.len());
    let minted_at = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(args.connections));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.reap {
        let permit = sem.clone().acquire_owned().await?;
        let ex = exchange.clone();
        tasks.spawn(async move {
            let r = ex("gitlab-short").await;
            drop(permit);
            r
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let mint_secs = minted_at.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let n = mock.revoked.lock().map_or(0, |v| v.len()) - revoked_before;
        if n >= args.reap {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {n} of {} tokens revoked after 180 s", args.reap);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let times: Vec<Instant> = mock
        .revoked
        .lock()
        .map_or(Vec::new(), |v| v[revoked_before..].to_vec());
    let span = times
        .iter()
        .max()
        .zip(times.iter().min())
        .map_or(0.0, |(a, b)| a.duration_since(*b).as_secs_f64());
    // Lateness from cistern's own records (revoked − expires_at).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let db = rusqlite::Connection::open_with_flags(
        dir.path().join("data/cistern.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let mut late: Vec<i64> = db
        .prepare(
            "SELECT json_extract(detail, '$.late_ms') FROM audit
             WHERE kind = 'token_revoked' AND reason = 'downstream_expired'",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    late.sort_unstable();
    let q = |p: f64| {
        late.get(((late.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "\nreaper: {} tokens minted in {:.1} s ({:.0}/s, each expiring 10 s after its mint); all revoked over {:.1} s: {:.0} revocations/s = {:.0}/min; revoked after expiry p50 {} ms, p99 {} ms, max {} ms ({} records)",
        args.reap,
        mint_secs,
        args.reap as f64 / mint_secs,
        span,
        args.reap as f64 / span.max(0.001),
        args.reap as f64 / span.max(0.001) * 60.0,
        q(0.5),
        q(0.99),
        late.last().copied().unwrap_or(0),
        late.len(),
    );
    Ok(())
}
