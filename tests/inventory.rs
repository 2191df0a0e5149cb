//! `cistern inventory`, `cistern report` and `cistern policy diff` on a
//! realistic data set: the real binary (`serve --dev`, its built-in issuer
//! and example policies) exchanges ID tokens for several projects, roles and
//! paths, including a refusal and a project renamed between two exchanges.
//! A snapshot of the store is then taken, and rows no policy can produce are
//! added to it (an owner-less identity idle for 40 days, revocation rules
//! with known request and effect times).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_cistern");
const DAY_MS: i64 = 86_400_000;

const ARTIFACTS_SCOPES: &str = r#"scopes = ["artifacts:read"]"#;

/// `cistern serve --dev`, killed on drop (its temp state goes with it).
struct DevServer {
    child: Child,
    url: String,
    state: PathBuf,
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_dev() -> DevServer {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut child = Command::new(BIN)
        .args(["serve", "--dev", "--listen", &listen])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // The banner names the state dir; keep draining stderr afterwards.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(dir) = line.trim().strip_prefix("state:") {
                let _ = tx.send(PathBuf::from(dir.trim()));
            }
        }
    });
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert!(line.starts_with("cistern: listening on"), "{line:?}");
    let state = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the dev banner names its state dir");
    DevServer {
        child,
        url: format!("http://{listen}"),
        state,
    }
}

/// Mints a dev ID token with `claims` overridden and exchanges it for `role`.
fn exchange(server: &DevServer, claims: &[(&str, &str)], role: &str) -> (i32, String) {
    let mut args = vec![
        "dev".to_owned(),
        "id-token".into(),
        "--url".into(),
        server.url.clone(),
    ];
    for (k, v) in claims {
        args.push("--claim".into());
        args.push(format!("{k}={v}"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let token = run_ok(&args);
    let out = Command::new(BIN)
        .args([
            "exchange",
            "--url",
            &server.url,
            "--role",
            role,
            "--format",
            "json",
        ])
        .env("CISTERN_ID_TOKEN", token.trim())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn run_ok(args: &[&str]) -> String {
    let (code, out, err) = run(args);
    assert_eq!(code, 0, "cistern {args:?} failed: {err}");
    out
}

fn run_json(args: &[&str]) -> Value {
    let out = run_ok(args);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}):\n{out}"))
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Snapshots the running dev server's store, config and policies into
/// `dir` (the dev state is deleted when the server stops); returns the
/// snapshot's config path.
fn snapshot(server: &DevServer, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("store")).unwrap();
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    let live = rusqlite::Connection::open_with_flags(
        server.state.join("store/cistern.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    live.execute(
        "VACUUM INTO ?1",
        [dir.join("store/cistern.db").to_str().unwrap()],
    )
    .unwrap();
    for entry in std::fs::read_dir(server.state.join("policies")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join("policies").join(entry.file_name())).unwrap();
    }
    let config = dir.join("cistern.toml");
    std::fs::copy(server.state.join("cistern.toml"), &config).unwrap();
    config
}

/// A revocation row: grain, value, issuer, issued before, requested, effective.
type Rule<'a> = (&'a str, &'a str, &'a str, i64, i64, Option<i64>);

fn seed(config: &Path) -> String {
    let db = config.parent().unwrap().join("store/cistern.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let now = now_ms();
    // An identity with no owner, last used 40 days ago, still holding a
    // (misconfigured, long-lived) credential.
    conn.execute(
        "INSERT INTO identities (issuer, project_id, namespace_id, role, project_path,
             namespace_path, owner, first_seen_ms, last_used_ms, exchanges)
         VALUES ('dev', '55', '9', 'legacy', 'old/tool', 'old', '', ?1, ?2, 4)",
        [now - 90 * DAY_MS, now - 40 * DAY_MS],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO issued_tokens (jti, kind, issuer, project_id, namespace_id, role,
             project_path, namespace_path, owner, audience, scope, issued_at_ms,
             expires_at_ms, subject_jti, pipeline_id, job_id, git_ref)
         VALUES ('legacy-jti', 'access_token', 'dev', '55', '9', 'legacy', 'old/tool',
             'old', '', 'https://legacy.test', 'legacy:run', ?1, ?2, 's', '1', '2', 'main')",
        [now - 40 * DAY_MS, now + 60 * DAY_MS],
    )
    .unwrap();
    // Revoke one deploy credential by jti and everything of project 43;
    // a third rule is not effective yet.
    let deploy_jti: String = conn
        .query_row(
            "SELECT jti FROM issued_tokens WHERE role = 'deploy' ORDER BY jti LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    // (grain, value, issuer, issued_before, requested_at, effective_at)
    let rules: [Rule<'_>; 3] = [
        (
            "jti",
            deploy_jti.as_str(),
            "",
            now,
            now - 1_000,
            Some(now - 996),
        ),
        ("project", "43", "dev", now, now - 900, Some(now - 888)),
        ("role", "nothing", "", now, now - 800, None),
    ];
    for (grain, value, issuer, before, requested, effective) in rules {
        conn.execute(
            "INSERT INTO revocations (grain, value, issuer, issued_before_ms, requested_at_ms,
                 effective_at_ms, actor, reason, source)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'test', 'test', 'admin')",
            rusqlite::params![grain, value, issuer, before, requested, effective],
        )
        .unwrap();
    }
    deploy_jti
}

fn row<'a>(rows: &'a Value, project: &str, role: &str) -> &'a Value {
    rows.as_array()
        .unwrap()
        .iter()
        .find(|r| r["project_id"] == project && r["role"] == role)
        .unwrap_or_else(|| panic!("no row for {project}/{role} in {rows:#}"))
}

#[test]
fn inventory_report_and_policy_diff_answer_from_recorded_exchanges() {
    let server = start_dev();
    // Project 42 (namespace 7): deploy twice, read-artifacts once.
    for _ in 0..2 {
        let (code, out) = exchange(&server, &[], "deploy");
        assert_eq!(code, 0, "{out}");
    }
    let (code, out) = exchange(&server, &[], "read-artifacts");
    assert_eq!(code, 0, "{out}");
    // Project 43 in the same namespace, renamed between two exchanges.
    for path in ["acme/lib", "acme/lib-renamed"] {
        let claims = [
            ("project_id", "43"),
            ("job_project_id", "43"),
            ("project_path", path),
            ("job_project_path", path),
        ];
        let (code, out) = exchange(&server, &claims, "read-artifacts");
        assert_eq!(code, 0, "{out}");
    }
    // Project 77 of namespace 8 asks for deploy: refused, but recorded.
    let other = [
        ("project_id", "77"),
        ("job_project_id", "77"),
        ("namespace_id", "8"),
        ("job_namespace_id", "8"),
        ("project_path", "other/proj"),
        ("job_project_path", "other/proj"),
    ];
    let (code, out) = exchange(&server, &other, "deploy");
    assert_eq!(code, 1, "{out}");

    let dir = tempfile::tempdir().unwrap();
    let config = snapshot(&server, dir.path());
    drop(server);

    // The audit records keep the presented claims and the request; no token.
    {
        let conn = rusqlite::Connection::open_with_flags(
            dir.path().join("store/cistern.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap();
        let details: Vec<(String, String)> = conn
            .prepare(
                "SELECT kind, detail FROM audit
                 WHERE kind IN ('exchange_granted', 'exchange_denied') ORDER BY seq",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(details.len(), 6);
        for (kind, text) in &details {
            let d: Value = serde_json::from_str(text).unwrap();
            assert!(d["claims"]["project_id"].is_string(), "{kind}: {text}");
            assert!(d["claims"]["ref_protected"].is_string(), "{kind}: {text}");
            assert!(d["request"]["role"].is_string(), "{kind}: {text}");
            assert!(!text.contains("eyJ"), "a JWS in the record: {text}");
        }
    }

    let revoked_jti = seed(&config);
    let cfg = config.to_str().unwrap();

    // ---- inventory, JSON
    let rows = run_json(&["inventory", "--config", cfg, "--format", "json"]);
    assert_eq!(rows.as_array().unwrap().len(), 4, "{rows:#}");
    let deploy = row(&rows, "42", "deploy");
    assert_eq!(deploy["owner"], "team-payments");
    assert_eq!(deploy["exchanges"], 2);
    assert_eq!(deploy["outstanding"], 1, "one of two revoked by jti");
    assert_eq!(deploy["scopes"], json!(["deploy:read", "deploy:write"]));
    assert_eq!(deploy["policy_file"], "deploy.toml");
    assert_eq!(deploy["flags"], json!([]));
    assert!(deploy["next_expiry_ms"].as_i64().unwrap() > now_ms());
    let artifacts = row(&rows, "42", "read-artifacts");
    assert_eq!(artifacts["outstanding"], 1);
    assert_eq!(artifacts["policy_file"], "read-artifacts.toml");
    let lib = row(&rows, "43", "read-artifacts");
    assert_eq!(lib["flags"], json!(["path-changed"]));
    assert_eq!(lib["project_path"], "acme/lib-renamed");
    assert_eq!(
        lib["project_paths_seen"],
        json!(["acme/lib", "acme/lib-renamed"])
    );
    assert_eq!(lib["exchanges"], 2);
    assert_eq!(lib["outstanding"], 0, "revoked by the project rule");
    let legacy = row(&rows, "55", "legacy");
    assert_eq!(legacy["flags"], json!(["unused", "no-owner"]));
    assert_eq!(legacy["outstanding"], 1);
    assert_eq!(legacy["policy_file"], Value::Null);

    // ---- filters
    let count = |extra: &[&str]| {
        let mut args = vec!["inventory", "--config", cfg, "--format", "json"];
        args.extend_from_slice(extra);
        run_json(&args).as_array().unwrap().len()
    };
    assert_eq!(count(&["--role", "read-artifacts"]), 2);
    assert_eq!(count(&["--project", "42"]), 2);
    assert_eq!(count(&["--owner", "team-platform"]), 2);
    assert_eq!(count(&["--owner", "nobody"]), 0);
    assert_eq!(count(&["--unused-days", "30"]), 1);
    assert_eq!(count(&["--unused-days", "50"]), 0);

    // ---- inventory, table and CSV
    let table = run_ok(&["inventory", "--config", cfg]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 5, "{table}");
    let flags_at = lines[0].find("FLAGS").unwrap();
    let legacy_line = lines.iter().find(|l| l.contains("legacy")).unwrap();
    assert_eq!(&legacy_line[flags_at..], "unused,no-owner", "{table}");
    assert!(table.contains("acme/lib-renamed (was acme/lib)"), "{table}");
    let csv = run_ok(&[
        "inventory",
        "--config",
        cfg,
        "--format",
        "csv",
        "--role",
        "deploy",
    ]);
    let lines: Vec<&str> = csv.split("\r\n").filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 2, "{csv}");
    assert!(lines[0].starts_with("issuer,project_id,namespace_id,role,"));
    assert!(
        lines[1].starts_with("dev,42,7,deploy,acme/payments,acme,"),
        "{csv}"
    );

    // ---- report, JSON
    let report = run_json(&["report", "--config", cfg, "--format", "json"]);
    assert_eq!(report["outstanding_total"], 3, "{report:#}");
    let groups = report["credentials"].as_array().unwrap();
    assert_eq!(groups.len(), 3, "{report:#}");
    assert!(
        groups
            .iter()
            .any(|g| g["audience"] == "https://deploy.dev.example"
                && g["identity"]["project_id"] == "42"
                && g["count"] == 1)
    );
    assert!(!groups.iter().any(|g| g["identity"]["project_id"] == "43"));
    assert_eq!(report["identities_without_owner"][0]["project_id"], "55");
    let rev = &report["revocation"];
    assert_eq!(rev["total"], 3);
    assert_eq!(rev["effective"], 2);
    assert_eq!(rev["p50_ms"], 4);
    assert_eq!(rev["p90_ms"], 12);
    assert_eq!(rev["max_ms"], 12);
    assert_eq!(rev["not_yet_effective"][0]["value"], "nothing");
    assert_eq!(report["unused"].as_array().unwrap().len(), 1);
    assert_eq!(report["unused"][0]["idle_days"], 40);
    assert_eq!(report["longest_lived"][0]["jti"], "legacy-jti");
    assert_eq!(report["longest_lived"].as_array().unwrap().len(), 3);
    assert!(
        report["longest_lived"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["jti"] != revoked_jti.as_str())
    );
    let wider = run_json(&[
        "report",
        "--config",
        cfg,
        "--format",
        "json",
        "--unused-days",
        "45",
    ]);
    assert!(wider["unused"].as_array().unwrap().is_empty());

    // ---- report, Markdown and text
    let md = run_ok(&["report", "--config", cfg, "--format", "markdown"]);
    assert!(md.starts_with("# cistern report"), "{md}");
    for heading in [
        "## 1. Where every outstanding credential exists",
        "## 2. Who owns each identity",
        "## 3. How fast revocation took effect",
        "## Identities unused for 30 days (offboarding candidates)",
        "## Longest-lived outstanding credentials",
    ] {
        assert!(md.contains(heading), "missing {heading}:\n{md}");
    }
    assert!(md.contains("| 2 | 4ms | 12ms | 12ms | 12ms |"), "{md}");
    assert!(md.contains("**WARNING: 1 identit(ies) with no known owner:**"));
    let text = run_ok(&["report", "--config", cfg]);
    assert!(
        text.contains("3. HOW FAST REVOCATION TOOK EFFECT"),
        "{text}"
    );
    assert!(text.contains("3 outstanding credential(s)"), "{text}");

    // ---- policy diff: drop deploy, add a scope to read-artifacts.
    let proposed = dir.path().join("proposed");
    std::fs::create_dir_all(&proposed).unwrap();
    let artifacts_policy =
        std::fs::read_to_string(dir.path().join("policies/read-artifacts.toml")).unwrap();
    assert!(artifacts_policy.contains(ARTIFACTS_SCOPES));
    std::fs::write(
        proposed.join("read-artifacts.toml"),
        artifacts_policy.replace(
            ARTIFACTS_SCOPES,
            r#"scopes = ["artifacts:read", "artifacts:write"]"#,
        ),
    )
    .unwrap();
    // A new role admitting namespace 8, which has only ever asked for deploy.
    std::fs::write(
        proposed.join("ns8.toml"),
        "role = \"ns8-read\"\nowner = \"team-other\"\nissuer = \"dev\"\n\n[bindings]\nnamespace_id = \"8\"\n\n[grant]\nkind = \"access_token\"\naudience = \"https://artifacts.dev.example\"\nscopes = [\"artifacts:read\"]\nttl = \"5m\"\n",
    )
    .unwrap();
    let to = proposed.to_str().unwrap();
    let d = run_json(&[
        "policy", "diff", "--config", cfg, "--to", to, "--format", "json",
    ]);
    assert_eq!(d["replayed"], 6, "{d:#}");
    let changes: Vec<(String, String, String, Value, i64)> = d["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["identity"]["project_id"].as_str().unwrap().to_owned(),
                c["change"].as_str().unwrap().to_owned(),
                c["role"].as_str().unwrap().to_owned(),
                c["scopes"].clone(),
                c["requests"].as_i64().unwrap(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String, Value, i64)> = vec![
        (
            "42".into(),
            "role_lost".into(),
            "deploy".into(),
            json!(["deploy:read", "deploy:write"]),
            2,
        ),
        (
            "42".into(),
            "scope_gained".into(),
            "read-artifacts".into(),
            json!(["artifacts:write"]),
            1,
        ),
        (
            "43".into(),
            "scope_gained".into(),
            "read-artifacts".into(),
            json!(["artifacts:write"]),
            2,
        ),
        (
            "77".into(),
            "now_permitted".into(),
            "ns8-read".into(),
            json!(["artifacts:read"]),
            0,
        ),
    ];
    assert_eq!(changes, expected, "{d:#}");
    let text = run_ok(&["policy", "diff", "--config", cfg, "--to", to]);
    assert!(text.contains("role lost"), "{text}");
    assert!(text.contains("scope gained"));
    assert!(text.contains("artifacts:write"));
    assert!(text.contains("now permitted"));

    // The current directory against itself: no change.
    let current = dir.path().join("policies");
    let same = run_ok(&[
        "policy",
        "diff",
        "--config",
        cfg,
        "--to",
        current.to_str().unwrap(),
    ]);
    assert!(same.trim_end().ends_with("no change"), "{same}");

    // A broken proposal: exit 2, naming the file and line.
    std::fs::write(proposed.join("broken.toml"), "role = \"x\"\nowner = 5\n").unwrap();
    let (code, _, err) = run(&["policy", "diff", "--config", cfg, "--to", to]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("broken.toml"), "{err}");
    assert!(err.contains(":2"), "{err}");
}

#[test]
fn a_missing_store_is_a_usage_error_and_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/cistern.toml"),
    )
    .unwrap();
    let config = dir.path().join("cistern.toml");
    std::fs::write(&config, text).unwrap();
    let cfg = config.to_str().unwrap();
    for args in [
        vec!["inventory", "--config", cfg],
        vec!["report", "--config", cfg],
        vec!["policy", "diff", "--config", cfg, "--to", "policies"],
    ] {
        let (code, out, err) = run(&args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(
            err.contains("no store at") || err.contains("policies"),
            "{err}"
        );
    }
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names.len(),
        2,
        "nothing created next to the config: {names:?}"
    );
}
