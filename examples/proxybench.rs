//! Proxy benchmark for BENCHMARKS.md: cistern's identity-aware proxy against
//! nginx doing a plain `proxy_pass`, in one run, to the same tiny upstream,
//! driven by the same load generator (wrk) at the same concurrency.
//!
//! Layout on a 2-core machine: the proxy under test (cistern, or nginx with
//! one worker) pinned to core 0; the upstream (nginx `return 200`) and wrk
//! pinned to core 1. cistern runs with everything on: the token is checked
//! on every request (cached verification, revocation lookup), the role's
//! rule is matched, the credential injected, and every request is audited
//! to its SQLite store. nginx writes its access log (its default).
//!
//! Needs `nginx`, `wrk` and `taskset` on PATH (scripts/proxybench.sh
//! installs the Debian packages). Loopback only; every phase is bounded.

mod common;

use common::{free_port, status_kib};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// The cistern binary to run.
    #[arg(long, default_value = "target/release/cistern")]
    cistern: PathBuf,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 8)]
    secs: u32,
    /// Connections for the throughput measurement.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// Connections for the memory measurement.
    #[arg(long, default_value_t = 1000)]
    memory_connections: u32,
    /// Only the memory measurement (skips the throughput and latency table).
    #[arg(long)]
    memory_only: bool,
    /// Core of the upstream: 1 (default, beside wrk: throughput, the proxy
    /// alone on core 0) or 0 (beside the proxy: the added latency, where
    /// the direct call crosses cores exactly as the proxied one does).
    #[arg(long, default_value = "1")]
    upstream_core: String,
}

const AUD: &str = "https://cistern.bench";
const ROUTE_AUD: &str = "https://upstream.bench";
const PATH: &str = "/projects/42/repository/files";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

/// A child process stopped on drop (SIGTERM: nginx's master then stops its
/// workers, which a SIGKILL would orphan).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn pinned(core: &str, program: &str) -> Command {
    let mut c = Command::new("taskset");
    c.args(["-c", core, program]);
    c
}

/// An nginx instance from `conf` (a full `nginx.conf`) in `dir`.
fn nginx(dir: &Path, name: &str, core: &str, conf: &str) -> anyhow::Result<Guard> {
    let prefix = dir.join(name);
    std::fs::create_dir_all(prefix.join("logs"))?;
    let path = prefix.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = pinned(core, "nginx")
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&path)
        .args(["-g", "daemon off;"])
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx (is it installed?)")?;
    Ok(Guard(child))
}

fn nginx_conf(server: &str) -> String {
    format!(
        "worker_processes 1;\npid nginx.pid;\nerror_log logs/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log logs/access.log;\n  client_body_temp_path tmp;\n  proxy_temp_path tmp;\n\
         {server}\n}}\n"
    )
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("nothing listens on {port}")
}

/// wrk's figures for one run.
#[derive(Debug, Default)]
struct Wrk {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    non_2xx: u64,
    errors: String,
}

fn micros(v: &str) -> f64 {
    let v = v.trim();
    let (num, mul) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().unwrap_or(f64::NAN) * mul
}

fn wrk(url: &str, token: Option<&str>, connections: u32, secs: u32) -> anyhow::Result<Wrk> {
    let mut cmd = pinned("1", "wrk");
    cmd.args([
        "-t1",
        &format!("-c{connections}"),
        &format!("-d{secs}s"),
        "--latency",
        "--timeout",
        "5s",
    ]);
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd
        .arg(url)
        .output()
        .context("running wrk (is it installed?)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut w = Wrk::default();
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = l.strip_prefix("50%") {
            w.p50_us = micros(v);
        } else if let Some(v) = l.strip_prefix("99%") {
            w.p99_us = micros(v);
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            w.non_2xx = v.trim().parse().unwrap_or(0);
        } else if l.starts_with("Socket errors:") {
            w.errors = l.to_owned();
        }
    }
    if w.rps == 0.0 {
        bail!("wrk printed no rate:\n{text}");
    }
    Ok(w)
}

/// One wrk run while sampling `pid`'s RSS every 100 ms; returns wrk's
/// figures and the peak RSS (KiB).
async fn wrk_with_rss(
    pid: u32,
    url: String,
    token: Option<String>,
    connections: u32,
    secs: u32,
) -> anyhow::Result<(Wrk, u64)> {
    let sampler = tokio::spawn(async move {
        let mut peak = 0;
        for _ in 0..(secs * 10) {
            peak = peak.max(status_kib(pid, "VmRSS:"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak
    });
    let w = tokio::task::spawn_blocking(move || wrk(&url, token.as_deref(), connections, secs))
        .await??;
    Ok((w, sampler.await?))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("up/tmp"))?;
    std::fs::create_dir_all(dir.path().join("nginx-proxy/tmp"))?;

    // The upstream: nginx answering a small body, on core 1.
    let up_port = free_port()?;
    let _upstream = nginx(
        dir.path(),
        "up",
        &args.upstream_core,
        &nginx_conf(&format!(
            "  server {{ listen 127.0.0.1:{up_port}; access_log off; keepalive_requests 1000000;\n\
             location / {{ default_type application/json; return 200 '{{\"ok\":true}}'; }} }}"
        )),
    )?;
    // nginx as the proxy: a plain proxy_pass, on core 0.
    let ng_port = free_port()?;
    let _nginx_proxy = nginx(
        dir.path(),
        "nginx-proxy",
        "0",
        &nginx_conf(&format!(
            "  server {{ listen 127.0.0.1:{ng_port}; keepalive_requests 1000000;\n\
             location / {{ proxy_pass http://127.0.0.1:{up_port}; }} }}"
        )),
    )?;
    // nginx as the proxy, tuned: upstream keep-alive.
    let ngk_port = free_port()?;
    std::fs::create_dir_all(dir.path().join("nginx-keepalive/tmp"))?;
    let _nginx_keepalive = nginx(
        dir.path(),
        "nginx-keepalive",
        "0",
        &nginx_conf(&format!(
            "  upstream up {{ server 127.0.0.1:{up_port}; keepalive 256; }}\n\
             server {{ listen 127.0.0.1:{ngk_port}; keepalive_requests 1000000;\n\
             location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        )),
    )?;

    // An issuer for one ID token (the dev issuer's key, served on loopback).
    let (dev, issuer_url) = common::serve_issuer().await?;

    // cistern with one route to the upstream, on core 0.
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    // `cistern proxy` (the routes alone), measured last.
    let proxy_port = free_port()?;
    std::fs::create_dir(dir.path().join("policies"))?;
    std::fs::write(dir.path().join("secret"), "bench-upstream-credential\n")?;
    std::fs::write(
        dir.path().join("policies/bench.toml"),
        format!(
            "role = \"bench\"\nowner = \"team-bench\"\ndescription = \"benchmark role\"\nissuer = \"gitlab\"\n\
             [bindings]\nproject_id = \"42\"\n\
             [grant]\nkind = \"access_token\"\naudience = \"{ROUTE_AUD}\"\nscopes = [\"api\"]\nttl = \"1h\"\n\
             proxy = [\"GET /projects/{{job_project_id}}/**\"]\n"
        ),
    )?;
    std::fs::write(
        dir.path().join("cistern.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nissuer = \"{base}\"\n[store]\nkind = \"sqlite\"\npath = \"data/cistern.db\"\n\
             [signing]\nkey_dir = \"keys\"\n\
             [issuers.gitlab]\nissuer = \"{issuer_url}\"\naudiences = [\"{AUD}\"]\nallow_insecure_http = true\n\
             [policy]\ndir = \"policies\"\n[ceiling]\nissuers = [\"gitlab\"]\nmax_ttl = \"1h\"\nscopes = [\"api\"]\n\
             [log]\nlevel = \"warn\"\n\
             [proxy]\nlisten = \"127.0.0.1:{proxy_port}\"\n\
             [proxy.routes.bench]\nupstream = \"http://127.0.0.1:{up_port}\"\naudience = \"{ROUTE_AUD}\"\n\
             secret_file = \"secret\"\npresent = \"private_token\"\nallow_insecure_http = true\n"
        ),
    )?;
    let (mut serve_child, pid) =
        common::start_cistern(&args.cistern, &dir.path().join("cistern.toml"), "0", &[]).await?;
    for p in [up_port, ng_port, ngk_port] {
        wait_port(p).await?;
    }

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let id_token = dev.mint_id_token(&issuer_url, AUD, &serde_json::Map::new(), now, 3600)?;
    let (_, answer) = common::exchange(&reqwest::Client::new(), &base, &id_token, "bench").await?;
    let token = answer["access_token"]
        .as_str()
        .with_context(|| format!("exchange failed: {answer}"))?
        .to_owned();

    let direct = format!("http://127.0.0.1:{up_port}{PATH}");
    let via_nginx = format!("http://127.0.0.1:{ng_port}{PATH}");
    let via_nginx_ka = format!("http://127.0.0.1:{ngk_port}{PATH}");
    let via_cistern = format!("{base}/proxy/bench{PATH}");
    // Warm-up (the token's verification is cached after the first request).
    for u in [&direct, &via_nginx, &via_nginx_ka, &via_cistern] {
        wrk(u, Some(&token), 8, 1)?;
    }

    let (c, s) = (args.connections, args.secs);
    let only_memory = args.memory_only;
    let runs = tokio::task::spawn_blocking({
        let token = token.clone();
        move || -> anyhow::Result<Vec<(String, Wrk, Wrk)>> {
            let mut out = Vec::new();
            if only_memory {
                return Ok(out);
            }
            for (name, url) in [
                ("upstream directly", direct),
                ("nginx proxy_pass", via_nginx),
                ("nginx proxy_pass + upstream keepalive", via_nginx_ka),
                ("cistern proxy", via_cistern),
            ] {
                let load = wrk(&url, Some(&token), c, s)?;
                let one = wrk(&url, Some(&token), 1, s.min(5))?;
                out.push((name.to_owned(), load, one));
            }
            Ok(out)
        }
    })
    .await??;

    let rss_before = status_kib(pid, "VmRSS:");
    let mem = wrk_with_rss(
        pid,
        format!("{base}/proxy/bench{PATH}"),
        Some(token.clone()),
        args.memory_connections,
        s,
    )
    .await?;
    let hwm = status_kib(pid, "VmHWM:");
    // Then the same connection count on an endpoint that proxies nothing,
    // to tell the server side's memory from the proxy's (after the proxy
    // run: freed memory the allocator kept is counted here too).
    let healthz = wrk_with_rss(
        pid,
        format!("{base}/healthz"),
        None,
        args.memory_connections,
        s,
    )
    .await?;
    let healthz = (healthz.0.rps, healthz.1);
    let audited: i64 = rusqlite::Connection::open_with_flags(
        dir.path().join("data/cistern.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?
    .query_row(
        "SELECT COUNT(*) FROM audit WHERE kind = 'proxy_request'",
        [],
        |r| r.get(0),
    )?;

    let direct_p50 = runs.first().map_or(0.0, |r| r.2.p50_us);
    if !runs.is_empty() {
        println!(
            "| target | req/s at {c} conns | p50 / p99 at {c} conns | p50 at 1 conn | added p50 at 1 conn vs direct | non-2xx |"
        );
        println!("|---|---|---|---|---|---|");
        for (name, load, one) in &runs {
            println!(
                "| {name} | {:.0} | {:.0} µs / {:.0} µs | {:.0} µs | {} | {} {}|",
                load.rps,
                load.p50_us,
                load.p99_us,
                one.p50_us,
                if name.starts_with("upstream") {
                    "—".to_owned()
                } else {
                    format!("{:+.0} µs", one.p50_us - direct_p50)
                },
                load.non_2xx + one.non_2xx,
                if load.errors.is_empty() {
                    String::new()
                } else {
                    format!("({}) ", load.errors)
                }
            );
        }
    }
    let (mw, peak) = mem;
    println!(
        "\ncistern /healthz (no proxying, after the proxy run) at {} connections: {:.0} req/s, RSS peak {} kB",
        args.memory_connections, healthz.0, healthz.1
    );
    println!(
        "cistern proxy at {} connections: {:.0} req/s, RSS before {} kB, peak {} kB, high-water {} kB; {} proxied requests audited",
        args.memory_connections, mw.rps, rss_before, peak, hwm, audited
    );

    // The same memory run on `cistern proxy` alone (same config, keys and
    // store; `cistern serve` stopped first, so the proxy has core 0).
    serve_child.kill().await?;
    let (_proxy_child, proxy_pid) =
        common::start_cistern_proxy(&args.cistern, &dir.path().join("cistern.toml"), "0").await?;
    let alone_before = status_kib(proxy_pid, "VmRSS:");
    let (alone, alone_peak) = wrk_with_rss(
        proxy_pid,
        format!("http://127.0.0.1:{proxy_port}/proxy/bench{PATH}"),
        Some(token),
        args.memory_connections,
        s,
    )
    .await?;
    println!(
        "cistern proxy alone (`cistern proxy`) at {} connections: {:.0} req/s, RSS before {} kB, peak {} kB, high-water {} kB{}",
        args.memory_connections,
        alone.rps,
        alone_before,
        alone_peak,
        status_kib(proxy_pid, "VmHWM:"),
        if alone.non_2xx > 0 {
            format!(" ({} non-2xx)", alone.non_2xx)
        } else {
            String::new()
        }
    );
    Ok(())
}
