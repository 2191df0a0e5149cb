//! Load generator for BENCHMARKS.md: drives a real `cistern serve` over
//! loopback with unique, validly signed GitLab-shaped ID tokens.
//!
//! It serves its own issuer (discovery + JWKS) on 127.0.0.1, writes a config
//! and a policy for cistern, starts the release binary pinned to core 0
//! (`taskset`), and runs on one thread itself, pinned to core 1 once the
//! tokens are minted (`--generator-core`; `scripts/bench.sh`). Every request
//! uses a fresh token, so replay protection, the durable records and the
//! audit log are all on the measured path. In the same run it measures the crypto-only ceiling (RS256 verify +
//! ES256 sign, keys pre-parsed) on one core, so the ratio is comparable.
//!
//! All traffic is loopback; every phase is bounded in count and time.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair, ParsedPublicKey};
use bytes::Bytes;
use cistern::dev::DevIssuer;
use clap::Parser;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[derive(Parser, Debug)]
struct Args {
    /// The cistern binary to run.
    #[arg(long, default_value = "target/release/cistern")]
    cistern: PathBuf,
    /// Concurrent connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds of the peak (closed-loop) phase.
    #[arg(long, default_value_t = 5)]
    peak_secs: u64,
    /// Seconds of the half-rate (open-loop) phase.
    #[arg(long, default_value_t = 5)]
    half_secs: u64,
    /// Tokens to pre-mint (upper bound on requests).
    #[arg(long, default_value_t = 80_000)]
    tokens: usize,
    /// CPU core for the server (`taskset -c`); empty to not pin.
    #[arg(long, default_value = "0")]
    server_core: String,
    /// CPU core the generator pins itself to after pre-minting; empty to not pin.
    #[arg(long, default_value = "1")]
    generator_core: String,
    /// Signing algorithm of cistern's tokens.
    #[arg(long, default_value = "ES256")]
    algorithm: String,
    /// Directory for cistern's database (default: the run's temp dir on
    /// disk); e.g. /dev/shm to separate disk writeback from the server.
    #[arg(long)]
    store_dir: Option<PathBuf>,
    /// Keep the database directory after the run (its path is printed).
    #[arg(long)]
    keep_store: bool,
    /// Tokens revoked one by one in the time-to-revoke phase.
    #[arg(long, default_value_t = 200)]
    revocations: usize,
}

const AUD: &str = "https://cistern.bench";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let ceiling = crypto_ceiling()?;
    eprintln!("crypto ceiling (RS256 verify + ES256 sign, one core): {ceiling:.0} exchanges/s");

    // The issuer: a dev-issuer key, served on loopback with GitLab's paths.
    let (dev, issuer_url) = common::serve_issuer().await?;

    let started = Instant::now();
    let tokens = Arc::new(premint(&dev, &issuer_url, args.tokens)?);
    eprintln!(
        "pre-minted {} ID tokens in {:.1}s",
        tokens.len(),
        started.elapsed().as_secs_f64()
    );

    // Minting used every core; from here on the generator stays off the
    // server's core.
    common::pin_self(&args.generator_core)?;

    // cistern, in a temp dir.
    let dir = tempfile::tempdir()?;
    let store_dir = match &args.store_dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir_in(dir.path())?,
    };
    let db_path = store_dir.path().join("cistern.db");
    let port = common::free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    std::fs::create_dir(dir.path().join("policies"))?;
    std::fs::write(
        dir.path().join("policies/bench.toml"),
        "role = \"bench\"\nowner = \"team-bench\"\ndescription = \"benchmark role\"\nissuer = \"gitlab\"\n\
         [bindings]\nproject_id = \"42\"\nref = \"main\"\nref_protected = true\n\
         [grant]\nkind = \"access_token\"\naudience = \"https://api.bench\"\nscopes = [\"deploy:read\"]\nttl = \"10m\"\n",
    )?;
    std::fs::write(
        dir.path().join("cistern.toml"),
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nissuer = \"{base}\"\n[store]\nkind = \"sqlite\"\npath = \"{db}\"\n\
             [signing]\nkey_dir = \"keys\"\nalgorithm = \"{alg}\"\n\
             [issuers.gitlab]\nissuer = \"{issuer_url}\"\naudiences = [\"{AUD}\"]\nallow_insecure_http = true\n\
             [policy]\ndir = \"policies\"\n[ceiling]\nissuers = [\"gitlab\"]\nmax_ttl = \"1h\"\nscopes = [\"deploy:*\"]\n\
             [log]\nlevel = \"warn\"\n\
             [admin]\nbootstrap_sha256 = \"{admin}\"\n\
             [server.clients.bench]\nsecret_sha256 = \"{client}\"\n",
            alg = args.algorithm,
            db = db_path.display(),
            admin = sha256_hex(ADMIN_CREDENTIAL),
            client = sha256_hex(CLIENT_SECRET),
        ),
    )?;
    let spawned = Instant::now();
    let (mut child, pid) = common::start_cistern(
        &args.cistern,
        &dir.path().join("cistern.toml"),
        &args.server_core,
        &[],
    )
    .await?;
    let listening = spawned.elapsed();
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let ready = loop {
        let res = client.get(format!("{base}/readyz").parse()?).await;
        if matches!(&res, Ok(r) if r.status() == 200) {
            break spawned.elapsed();
        }
        if spawned.elapsed() > Duration::from_secs(30) {
            bail!("cistern not ready after 30s");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    eprintln!("listening after {listening:?}, ready after {ready:?}");

    let next = Arc::new(AtomicUsize::new(0));
    let url: hyper::Uri = format!("{base}/oauth/token").parse()?;
    let load = Load {
        client: client.clone(),
        url,
        base: base.clone(),
        tokens: tokens.clone(),
        next,
        pid,
    };
    // Warm-up: also makes cistern fetch the issuer's keys once.
    load.run(4, Duration::from_millis(500), None).await?;
    let rss_idle = rss_kib(pid);

    let peak = load
        .run(args.connections, Duration::from_secs(args.peak_secs), None)
        .await?;
    eprintln!(
        "peak: {:.0}/s p50 {:.2} ms p99 {:.2} ms ({} errors); in the handler p50 / p99 ≤ {}; server CPU per exchange {}; switches per exchange {}; store {}",
        peak.rate,
        peak.p50_ms,
        peak.p99_ms,
        peak.errors,
        peak.server_side,
        cpu_summary(&peak),
        switch_summary(&peak),
        peak.store_side
    );
    let half_rate = peak.rate / 2.0;
    let half = load
        .run(
            args.connections,
            Duration::from_secs(args.half_secs),
            Some(half_rate),
        )
        .await?;
    eprintln!(
        "half: {:.0}/s p50 {:.2} ms p99 {:.2} ms ({} errors); in the handler p50 / p99 ≤ {}",
        half.rate, half.p50_ms, half.p99_ms, half.errors, half.server_side
    );
    let hwm = hwm_kib(pid);
    let revoke = time_to_revoke(&load, args.revocations).await?;
    eprintln!("{revoke}");
    let _ = child.kill().await;
    let recorded = recorded_time_to_revoke(&db_path)?;
    if args.keep_store {
        eprintln!("store kept in {}", store_dir.keep().display());
        // Without --store-dir the store lives inside the run's directory,
        // which would otherwise take it along when it is removed.
        if args.store_dir.is_none() {
            let _ = dir.keep();
        }
    }

    println!("| metric | value |");
    println!("|---|---|");
    println!(
        "| crypto ceiling (RS256 verify + ES256 sign, 1 core, same run) | {ceiling:.0} exchanges/s |"
    );
    println!(
        "| peak exchanges/s (1 server core, {} connections) | {:.0} ({:.0}% of ceiling) |",
        args.connections,
        peak.rate,
        100.0 * peak.rate / ceiling
    );
    println!(
        "| latency at peak p50 / p99 | {:.2} ms / {:.2} ms |",
        peak.p50_ms, peak.p99_ms
    );
    println!(
        "| open-loop at half peak ({half_rate:.0}/s) achieved | {:.0}/s |",
        half.rate
    );
    println!(
        "| latency at half peak p50 / p99 | {:.2} ms / {:.2} ms |",
        half.p50_ms, half.p99_ms
    );
    println!("| errors (non-200) | {} |", peak.errors + half.errors);
    println!(
        "| server CPU per exchange at peak (by thread) | {} |",
        cpu_summary(&peak)
    );
    println!(
        "| server context switches per exchange at peak (by thread, voluntary+involuntary) | {} |",
        switch_summary(&peak)
    );
    println!(
        "| inside the handler (cistern's histogram) at peak / at half peak, p50 / p99 ≤ | {} · {} |",
        peak.server_side, half.server_side
    );
    println!(
        "| the store's group commit at peak / at half peak | {} · {} |",
        peak.store_side, half.store_side
    );
    println!(
        "| RSS idle / max under load / high-water mark | {:.1} MB / {:.1} MB / {:.1} MB |",
        rss_idle as f64 / 1024.0,
        peak.rss_max_kib.max(half.rss_max_kib) as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "| start → listening / → ready (/readyz 200) | {:.1} ms / {:.1} ms |",
        listening.as_secs_f64() * 1e3,
        ready.as_secs_f64() * 1e3
    );
    println!("{}", revoke.table_rows());
    println!(
        "| time-to-revoke recorded by cistern (effective − requested), p50 / p99 / max | {recorded} |"
    );
    Ok(())
}

const ADMIN_CREDENTIAL: &str = "cst_bg_benchbenchbenchbenchbenchbenchbenchbenchben";
const CLIENT_SECRET: &str = "bench-introspection-secret";

fn sha256_hex(s: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        s.as_bytes(),
    ))
}

/// Revocation timings: the admin call, and until introspection refuses.
struct RevokeTimes {
    call: Histogram<u64>,
    refused: Histogram<u64>,
}

impl RevokeTimes {
    fn q(h: &Histogram<u64>, q: f64) -> f64 {
        h.value_at_quantile(q) as f64 / 1000.0
    }

    fn table_rows(&self) -> String {
        format!(
            "| revoke one jti (admin API): request → 200, p50 / p99 ({n} tokens, sequential) | {:.2} ms / {:.2} ms |\n\
             | revoke request sent → introspection of that token says inactive, p50 / p99 | {:.2} ms / {:.2} ms |",
            Self::q(&self.call, 0.5),
            Self::q(&self.call, 0.99),
            Self::q(&self.refused, 0.5),
            Self::q(&self.refused, 0.99),
            n = self.call.len()
        )
    }
}

impl std::fmt::Display for RevokeTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "revoke: call p50 {:.2} ms p99 {:.2} ms; until refused p50 {:.2} ms p99 {:.2} ms",
            Self::q(&self.call, 0.5),
            Self::q(&self.call, 0.99),
            Self::q(&self.refused, 0.5),
            Self::q(&self.refused, 0.99)
        )
    }
}

/// For `n` fresh tokens, one at a time: check the token is active, revoke
/// it by jti through the admin API, then introspect it once: the first
/// introspection after the revoke call returns must already say inactive.
async fn time_to_revoke(load: &Load, n: usize) -> anyhow::Result<RevokeTimes> {
    use base64::Engine as _;
    let mut times = RevokeTimes {
        call: Histogram::new(3)?,
        refused: Histogram::new(3)?,
    };
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("bench:{CLIENT_SECRET}"));
    for _ in 0..n {
        let i = load.next.fetch_add(1, Ordering::Relaxed);
        let Some(id_token) = load.tokens.get(i) else {
            bail!("ran out of pre-minted tokens for the revocation phase");
        };
        let res = load
            .client
            .request(
                hyper::Request::post(load.url.clone())
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body_for(id_token))?,
            )
            .await?;
        let body: serde_json::Value =
            serde_json::from_slice(&res.into_body().collect().await?.to_bytes())?;
        let token = body["access_token"]
            .as_str()
            .context("no access_token")?
            .to_owned();
        let jti = jti_of(&token)?;
        let introspect = || async {
            let req = hyper::Request::post(format!("{}/oauth/introspect", load.base))
                .header("content-type", "application/x-www-form-urlencoded")
                .header("authorization", format!("Basic {basic}"))
                .body(Full::new(Bytes::from(format!("token={token}"))))?;
            let res = load.client.request(req).await?;
            let v: serde_json::Value =
                serde_json::from_slice(&res.into_body().collect().await?.to_bytes())?;
            anyhow::Ok(v["active"].as_bool().unwrap_or(false))
        };
        if !introspect().await? {
            bail!("a fresh token is not active");
        }
        let start = Instant::now();
        let req = hyper::Request::post(format!("{}/v1/admin/revoke", load.base))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {ADMIN_CREDENTIAL}"))
            .body(Full::new(Bytes::from(
                serde_json::json!({ "grain": "jti", "value": jti, "reason": "bench" }).to_string(),
            )))?;
        let res = load.client.request(req).await?;
        let status = res.status();
        let _ = res.into_body().collect().await?;
        if status != 200 {
            bail!("admin revoke answered {status}");
        }
        times.call.record(start.elapsed().as_micros() as u64)?;
        if introspect().await? {
            bail!("a revoked token was still active after the revoke call returned");
        }
        times.refused.record(start.elapsed().as_micros() as u64)?;
    }
    Ok(times)
}

fn jti_of(token: &str) -> anyhow::Result<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).context("not a JWT")?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)?;
    Ok(v["jti"].as_str().context("no jti")?.to_owned())
}

/// The distribution cistern itself recorded: `effective_at_ms −
/// requested_at_ms` over every rule.
fn recorded_time_to_revoke(db: &std::path::Path) -> anyhow::Result<String> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut stmt = conn.prepare(
        "SELECT effective_at_ms - requested_at_ms FROM revocations
         WHERE effective_at_ms IS NOT NULL ORDER BY 1",
    )?;
    let v: Vec<i64> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if v.is_empty() {
        return Ok("none recorded".into());
    }
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    Ok(format!(
        "{} ms / {} ms / {} ms ({} rules)",
        q(0.5),
        q(0.99),
        v[v.len() - 1],
        v.len()
    ))
}

struct Phase {
    rate: f64,
    /// p50 / p99 inside cistern's handler, from its own histogram.
    server_side: String,
    /// The store's group commit, from its `/metrics` counters.
    store_side: String,
    /// Server CPU time per answered request, by thread name, in µs.
    cpu_us: Vec<(String, f64)>,
    /// Context switches per answered request, by thread name (voluntary,
    /// involuntary).
    switches: Vec<(String, f64, f64)>,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    rss_max_kib: u64,
}

fn body_for(token: &str) -> Full<Bytes> {
    Full::new(Bytes::from(format!(
        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt&role=bench&subject_token={token}"
    )))
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn one(client: &HttpClient, url: &hyper::Uri, token: &str) -> bool {
    let req = hyper::Request::post(url.clone())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body_for(token));
    let Ok(req) = req else { return false };
    match client.request(req).await {
        Ok(res) => {
            let ok = res.status() == 200;
            let _ = res.into_body().collect().await;
            ok
        }
        Err(_) => false,
    }
}

async fn sample_rss(pid: u32, until: Instant) -> u64 {
    let mut max = 0;
    while Instant::now() < until {
        max = max.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    max
}

/// What every load phase shares.
struct Load {
    client: HttpClient,
    url: hyper::Uri,
    /// cistern's base URL, for its `/metrics`.
    base: String,
    tokens: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
    pid: u32,
}

/// Where each worker takes the scheduled send time of its next request.
type Schedule = Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Instant>>>;

impl Load {
    /// Runs `conns` workers for `dur`. Without a `rate` it is a closed loop:
    /// each worker sends as soon as its previous answer arrives. With one it
    /// is an open loop at that total rate: a pacer thread schedules every
    /// request (an OS sleep, not the runtime's millisecond timer, so the
    /// generator adds no lateness of its own), idle workers take them in
    /// order, and latency counts from each request's scheduled time, so a
    /// stalled server cannot hide its queueing (no coordinated omission).
    async fn run(&self, conns: usize, dur: Duration, rate: Option<f64>) -> anyhow::Result<Phase> {
        let before = server_snapshot(&self.client, &self.base).await?;
        let start = Instant::now();
        let end = start + dur;
        let schedule: Option<Schedule> = rate.map(|r| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let interval = Duration::from_secs_f64(1.0 / r.max(1.0));
            std::thread::spawn(move || {
                let mut due = start;
                while due < end {
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if tx.send(due).is_err() {
                        break;
                    }
                    due += interval;
                }
            });
            Arc::new(tokio::sync::Mutex::new(rx))
        });
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..conns {
            let (client, url, tokens, next, schedule) = (
                self.client.clone(),
                self.url.clone(),
                self.tokens.clone(),
                self.next.clone(),
                schedule.clone(),
            );
            tasks.spawn(async move {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut errors = 0u64;
                loop {
                    let due = match &schedule {
                        Some(s) => match s.lock().await.recv().await {
                            Some(due) => due,
                            None => break,
                        },
                        None if Instant::now() < end => Instant::now(),
                        None => break,
                    };
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(tok) = tokens.get(i) else { break };
                    if !one(&client, &url, tok).await {
                        errors += 1;
                    }
                    let _ = h.record(due.elapsed().as_micros() as u64);
                }
                Ok::<_, anyhow::Error>((h, errors, Instant::now()))
            });
        }
        let mut phase = finish(tasks, start, end, self.pid).await?;
        let after = server_snapshot(&self.client, &self.base).await?;
        phase.server_side = server_quantiles(&before.buckets, &after.buckets);
        phase.store_side = store_summary(&before, &after);
        Ok(phase)
    }
}

async fn finish(
    mut tasks: tokio::task::JoinSet<anyhow::Result<(Histogram<u64>, u64, Instant)>>,
    start: Instant,
    end: Instant,
    pid: u32,
) -> anyhow::Result<Phase> {
    let cpu_before = cpu_ticks(pid);
    let switches_before = switches(pid);
    let rss = sample_rss(pid, end).await;
    let mut all = Histogram::<u64>::new(3)?;
    let mut errors = 0;
    let mut last = start;
    while let Some(r) = tasks.join_next().await {
        let (h, e, done) = r??;
        all.add(&h)?;
        errors += e;
        last = last.max(done);
    }
    // Workers stop early when the pre-minted tokens run out.
    let secs = last.duration_since(start).as_secs_f64().max(1e-3);
    let cpu_after = cpu_ticks(pid);
    let switches_after = switches(pid);
    let requests = all.len().max(1) as f64;
    let switches = switches_after
        .iter()
        .map(|(name, (v, n))| {
            let (v0, n0) = switches_before.get(name).copied().unwrap_or((0, 0));
            (
                name.clone(),
                v.saturating_sub(v0) as f64 / requests,
                n.saturating_sub(n0) as f64 / requests,
            )
        })
        .collect();
    let cpu_us = cpu_after
        .iter()
        .map(|(name, t)| {
            let used = t.saturating_sub(cpu_before.get(name).copied().unwrap_or(0));
            (name.clone(), used as f64 * 1e6 / TICKS_PER_SEC / requests)
        })
        .collect();
    Ok(Phase {
        server_side: String::new(),
        store_side: String::new(),
        cpu_us,
        switches,
        rate: all.len() as f64 / secs,
        p50_ms: all.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: all.value_at_quantile(0.99) as f64 / 1000.0,
        errors,
        rss_max_kib: rss,
    })
}

fn premint(dev: &Arc<DevIssuer>, issuer: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs() as i64;
    let chunks: Vec<_> = (0..threads)
        .map(|t| {
            let (dev, issuer) = (dev.clone(), issuer.to_owned());
            let count = n / threads + usize::from(t < n % threads);
            std::thread::spawn(move || {
                let none = serde_json::Map::new();
                (0..count)
                    .map(|_| dev.mint_id_token(&issuer, AUD, &none, now, 3600))
                    .collect::<Result<Vec<_>, _>>()
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for c in chunks {
        out.extend(
            c.join()
                .map_err(|_| anyhow::anyhow!("mint thread panicked"))??,
        );
    }
    Ok(out)
}

/// RS256 verify (pre-parsed 2048-bit key) + ES256 sign (cached key), on this thread.
fn crypto_ceiling() -> anyhow::Result<f64> {
    let rng = SystemRandom::new();
    let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)?;
    let msg = vec![b'x'; 1400];
    let mut sig = vec![0; rsa.public_modulus_len()];
    rsa.sign(&signature::RSA_PKCS1_SHA256, &rng, &msg, &mut sig)?;
    let public = ParsedPublicKey::new(
        &signature::RSA_PKCS1_2048_8192_SHA256,
        rsa.public_key().as_ref(),
    )?;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)?;
    let ec = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())?;
    let claims = vec![b'y'; 700];
    let run = |iters: u32| -> anyhow::Result<Duration> {
        let t = Instant::now();
        for _ in 0..iters {
            public.verify_sig(&msg, &sig)?;
            ec.sign(&rng, &claims)?;
        }
        Ok(t.elapsed())
    };
    run(500)?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        best = best.min(run(4000)?.as_secs_f64() / 4000.0);
    }
    Ok(1.0 / best)
}

/// What one scrape of cistern's `/metrics` tells the load generator.
struct ServerSnapshot {
    /// Cumulative `(le, count)` buckets of cistern's own
    /// `exchange_duration_seconds` histogram: time inside the handler,
    /// excluding queueing in the kernel and the runtime before it runs.
    buckets: Vec<(f64, f64)>,
    /// `cistern_store_write_requests_total`.
    store_requests: f64,
    /// `cistern_store_commits_total`.
    store_commits: f64,
    /// `cistern_store_batch_seconds_total`.
    store_batch_secs: f64,
}

async fn server_snapshot(client: &HttpClient, base: &str) -> anyhow::Result<ServerSnapshot> {
    let res = client.get(format!("{base}/metrics").parse()?).await?;
    let text = String::from_utf8(res.into_body().collect().await?.to_bytes().to_vec())?;
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text
        .lines()
        .filter(|l| l.starts_with("cistern_exchange_duration_seconds_bucket"))
    {
        let le = line
            .split("le=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("");
        let count: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0.0);
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::INFINITY)
        };
        buckets.push((le, count));
    }
    let counter = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(f64::NAN)
    };
    Ok(ServerSnapshot {
        buckets,
        store_requests: counter("cistern_store_write_requests_total"),
        store_commits: counter("cistern_store_commits_total"),
        store_batch_secs: counter("cistern_store_batch_seconds_total"),
    })
}

/// The store's mean group-commit batch and the time a batch took, between
/// two snapshots.
fn store_summary(before: &ServerSnapshot, after: &ServerSnapshot) -> String {
    let commits = after.store_commits - before.store_commits;
    if commits.is_nan() || commits <= 0.0 {
        return "no commits".into();
    }
    let requests = after.store_requests - before.store_requests;
    let secs = after.store_batch_secs - before.store_batch_secs;
    format!(
        "{:.1} requests per commit, {:.0} µs per batch",
        requests / commits,
        secs / commits * 1e6
    )
}

/// p50/p99 upper bounds (bucket edges, ms) of the requests counted between
/// two snapshots of the server's histogram.
fn server_quantiles(before: &[(f64, f64)], after: &[(f64, f64)]) -> String {
    let diff: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| {
            let earlier = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, c - earlier)
        })
        .collect();
    let total = diff.last().map_or(0.0, |b| b.1);
    let q = |p: f64| {
        diff.iter()
            .find(|(_, c)| *c >= p * total)
            .map_or(f64::NAN, |b| b.0 * 1000.0)
    };
    format!("{:.2} ms / {:.2} ms", q(0.5), q(0.99))
}

/// `USER_HZ`, the unit of `/proc/<pid>/task/*/stat` times (100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// `read(file text)` for the `file` of each of `pid`'s threads
/// (`/proc/<pid>/task/*/<file>`), summed by the thread name it returns.
fn by_thread<T: Default + std::ops::AddAssign>(
    pid: u32,
    file: &str,
    read: impl Fn(&str) -> Option<(String, T)>,
) -> std::collections::BTreeMap<String, T> {
    let mut by_name = std::collections::BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join(file)) else {
            continue;
        };
        if let Some((name, value)) = read(&text) {
            *by_name.entry(name).or_default() += value;
        }
    }
    by_name
}

/// User + system CPU ticks of each of `pid`'s threads, summed by thread name.
fn cpu_ticks(pid: u32) -> std::collections::BTreeMap<String, u64> {
    by_thread(pid, "stat", |stat| {
        // "tid (comm) state ..." — comm may hold spaces, so split at the last ')'.
        let (open, close) = (stat.find('(')?, stat.rfind(')')?);
        let fields: Vec<&str> = stat.get(close + 2..)?.split(' ').collect();
        // utime and stime are fields 14 and 15 of the whole line.
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        Some((stat[open + 1..close].to_string(), field(11) + field(12)))
    })
}

/// Voluntary and involuntary context switches of each of `pid`'s threads,
/// summed by thread name.
fn switches(pid: u32) -> std::collections::BTreeMap<String, (u64, u64)> {
    let count = |key: &'static str| {
        by_thread(pid, "status", move |status| {
            let line = |prefix: &str| status.lines().find_map(|l| l.strip_prefix(prefix));
            let n = line(key)?.trim().parse::<u64>().ok()?;
            Some((line("Name:")?.trim().to_string(), n))
        })
    };
    let involuntary = count("nonvoluntary_ctxt_switches:");
    count("voluntary_ctxt_switches:")
        .into_iter()
        .map(|(name, v)| {
            let n = involuntary.get(&name).copied().unwrap_or(0);
            (name, (v, n))
        })
        .collect()
}

/// Context switches per exchange, by thread: voluntary + involuntary.
fn switch_summary(p: &Phase) -> String {
    let parts: Vec<String> = p
        .switches
        .iter()
        .filter(|(_, v, n)| v + n >= 0.01)
        .map(|(name, v, n)| format!("{name} {v:.2}+{n:.2}"))
        .collect();
    parts.join(", ")
}

fn cpu_summary(p: &Phase) -> String {
    let total: f64 = p.cpu_us.iter().map(|(_, us)| us).sum();
    let parts: Vec<String> = p
        .cpu_us
        .iter()
        .filter(|(_, us)| *us >= 0.5)
        .map(|(name, us)| format!("{name} {us:.0}"))
        .collect();
    format!("{total:.0} µs ({})", parts.join(", "))
}

fn rss_kib(pid: u32) -> u64 {
    common::status_kib(pid, "VmRSS:")
}

fn hwm_kib(pid: u32) -> u64 {
    common::status_kib(pid, "VmHWM:")
}
