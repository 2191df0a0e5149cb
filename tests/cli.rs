//! The binary's commands: dev-mode quickstart, policy check/test, config errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cistern");

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cistern serve ARGS` in `cwd` and waits for its "listening" line.
fn serve(args: &[&str], cwd: Option<&std::path::Path>) -> Server {
    let mut cmd = Command::new(std::fs::canonicalize(BIN).unwrap());
    cmd.arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(line.starts_with("cistern: listening on"), "{line:?}");
    server
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_dev_mode_quickstart_completes_an_exchange_and_explains_a_refusal() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    let started = Instant::now();
    let server = serve(&["--dev", "--listen", &listen], None);
    assert!(started.elapsed() < Duration::from_secs(30));

    let (code, token, err) = run(&["dev", "id-token", "--url", &url], &[]);
    assert_eq!(code, Some(0), "{err}");
    let token = token.trim();
    assert_eq!(token.split('.').count(), 3);

    let (code, out, err) = run(
        &[
            "exchange", "--url", &url, "--role", "deploy", "--format", "json",
        ],
        &[("CISTERN_ID_TOKEN", token)],
    );
    assert_eq!(code, Some(0), "{err}");
    let body: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(body["scope"], "deploy:read deploy:write");

    // The same token again: replay refused, exit 1, one line.
    let (code, _, err) = run(
        &["exchange", "--url", &url, "--role", "deploy"],
        &[("CISTERN_ID_TOKEN", token)],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("already been exchanged"), "{err}");

    // A feature branch: the dry run says which binding failed.
    let (_, feature, _) = run(
        &[
            "dev",
            "id-token",
            "--url",
            &url,
            "--claim",
            "ref=feature/x",
            "--claim",
            "ref_protected=false",
        ],
        &[],
    );
    let (code, out, err) = run(
        &["exchange", "--url", &url, "--role", "deploy", "--dry-run"],
        &[("CISTERN_ID_TOKEN", feature.trim())],
    );
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("WOULD DENY"), "{out}");
    assert!(out.contains("ref") && out.contains("feature/x"), "{out}");
    drop(server);
}

#[test]
fn dev_mode_refuses_a_non_loopback_address() {
    let (code, _, err) = run(&["serve", "--dev", "--listen", "0.0.0.0:0"], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("loopback"), "{err}");
}

#[test]
fn policy_check_accepts_the_shipped_examples() {
    let (code, out, err) = run(
        &["policy", "check", "--config", "examples/cistern.toml"],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("3 role(s) valid"), "{out}");
}

#[test]
fn policy_check_names_file_line_and_field_of_every_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.toml"),
        "role = \"x\"\nowner = \"me\"\nissuer = \"gitlab\"\n\n[bindings]\nref = \"main\"\n\n[grant]\nkind = \"access_token\"\naudience = \"https://a\"\nscopes = [\"deploy:read\"]\nttl = \"5h\"\n",
    )
    .unwrap();
    let (code, _, err) = run(
        &[
            "policy",
            "check",
            "--config",
            "examples/cistern.toml",
            dir.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{err}");
    let file = dir.path().join("bad.toml").display().to_string();
    assert!(err.contains(&format!("{file}:12: grant.ttl")), "{err}");
    assert!(err.contains("immutable"), "{err}");
}

#[test]
fn policy_test_explains_roles_for_a_claims_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut claims: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/gitlab_payload.json")).unwrap();
    claims["iss"] = "https://gitlab.com".into();
    let f = dir.path().join("claims.json");
    std::fs::write(&f, claims.to_string()).unwrap();
    let (code, out, err) = run(
        &[
            "policy",
            "test",
            "--config",
            "examples/cistern.toml",
            "--claims",
            f.to_str().unwrap(),
            "--format",
            "json",
        ],
        &[],
    );
    let traces: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let granted: Vec<&str> = traces
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|t| t["granted"] == true)
                .filter_map(|t| t["role"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        granted.contains(&"deploy-production"),
        "{out}{err} {code:?}"
    );
    let (code, out, _) = run(
        &[
            "policy",
            "test",
            "--config",
            "examples/cistern.toml",
            "--claims",
            f.to_str().unwrap(),
            "--role",
            "release-publish",
        ],
        &[],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("ref_type"), "{out}");
}

#[test]
fn a_broken_config_stops_serve_with_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string("examples/cistern.toml")
        .unwrap()
        .replace("max_ttl = \"1h\"", "max_ttl = \"2days\"");
    let path = dir.path().join("cistern.toml");
    std::fs::write(&path, text).unwrap();
    let (code, _, err) = run(&["serve", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("cistern.toml:") && err.contains("ceiling.max_ttl"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[tokio::test]
async fn serve_speaks_tls_with_rustls_when_a_certificate_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    common::test_ca(d);

    let port = free_port();
    let policies = std::fs::canonicalize("examples/policies").unwrap();
    let text = std::fs::read_to_string("examples/cistern.toml")
        .unwrap()
        .replace("listen = \"127.0.0.1:8080\"", &format!("listen = \"127.0.0.1:{port}\""))
        .replace("issuer = \"http://127.0.0.1:8080\"", &format!("issuer = \"https://127.0.0.1:{port}\"\ntls_cert = \"tls.pem\"\ntls_key = \"tls.key\""))
        .replace("dir = \"policies\"", &format!("dir = \"{}\"", policies.display()));
    std::fs::write(d.join("cistern.toml"), text).unwrap();
    let _server = serve(
        &["--config", d.join("cistern.toml").to_str().unwrap()],
        None,
    );

    let ca = reqwest::Certificate::from_pem(&std::fs::read(d.join("ca.pem")).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    let base = format!("https://127.0.0.1:{port}");
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.text().await.unwrap(), "ok");
    let meta: serde_json::Value = client
        .get(format!("{base}/.well-known/oauth-authorization-server"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["token_endpoint"], format!("{base}/oauth/token"));
    // HTTP/2 when the client offers it in ALPN (reqwest above offered
    // only HTTP/1.1).
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(d.join("ca.pem")).unwrap())
        .unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .build();
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build::<_, http_body_util::Empty<bytes::Bytes>>(https);
    let res = h2
        .get(format!("{base}/healthz").parse().unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), http::Version::HTTP_2);
    // Plain http on the TLS port gets no answer.
    assert!(
        reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
            .await
            .map_or(true, |r| !r.status().is_success())
    );
}

#[test]
fn serve_works_with_a_config_file_named_without_a_directory() {
    // `cistern serve` defaults to `--config cistern.toml`: relative paths in it
    // resolve against the current directory.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let text = std::fs::read_to_string("examples/cistern.toml")
        .unwrap()
        .replace(
            "listen = \"127.0.0.1:8080\"",
            &format!("listen = \"127.0.0.1:{port}\""),
        )
        .replace(
            "issuer = \"http://127.0.0.1:8080\"",
            &format!("issuer = \"http://127.0.0.1:{port}\""),
        );
    std::fs::write(dir.path().join("cistern.toml"), text).unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    for entry in std::fs::read_dir("examples/policies").unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(
            entry.path(),
            dir.path().join("policies").join(entry.file_name()),
        )
        .unwrap();
    }
    let _server = serve(&["--config", "cistern.toml"], Some(dir.path()));
    assert!(dir.path().join("cistern-data/cistern.db").exists());
    assert!(dir.path().join("cistern-data/keys/keys.json").exists());
}
