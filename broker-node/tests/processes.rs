//! Three `broker serve` processes: topics created over HTTP survive SIGKILL of the consensus
//! leader (on the survivors and on the restarted node), and bad admin requests get clear 4xx
//! answers that change nothing.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker_node::http;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);
/// The admin token the test cluster's nodes are started with.
const TOKEN: &str = "process-test-admin-token-0123456789";
/// The broker RPCs' separate token.
const BROKER_TOKEN: &str = "process-test-broker-token-9876543210";

/// The development certificates every test cluster of this process uses (one CA; made on
/// first use, concurrently safe), and how an admin client checks the nodes' HTTPS with it.
fn certs() -> &'static Path {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("certs dir"))
        .path()
}

/// Checks the nodes' admin certificates with the test CA; presents no client certificate.
fn tls() -> http::ClientTls {
    http::ClientTls {
        ca: Some(certs().join("ca.pem")),
        identity: None,
    }
}

/// The development operator's client certificate (from the test CA) as the credential.
fn operator_tls() -> http::ClientTls {
    let paths = consensus_tls::dev::ensure_operator(certs()).expect("operator certificate");
    http::ClientTls {
        ca: Some(paths.ca_cert),
        identity: Some((paths.node_cert, paths.node_key)),
    }
}

/// A free port for both UDP (QUIC) and TCP on 127.0.0.1, picked by the OS and released for the
/// child to bind (the child retries nothing, so a collision would show as a startup failure).
fn free_udp() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").expect("udp");
    s.local_addr().expect("addr")
}

fn free_tcp() -> SocketAddr {
    let s = TcpListener::bind("127.0.0.1:0").expect("tcp");
    s.local_addr().expect("addr")
}

struct Node {
    id: u64,
    admin: SocketAddr,
    args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn broker serve");
        self.child = Some(child);
    }

    /// Sends SIGTERM and waits (at most [`DEADLINE`]) for the process to exit; its status.
    fn sigterm_and_wait(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let sent = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = c.try_wait().expect("wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sigkill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.sigkill();
    }
}

fn start(dir: &Path) -> Vec<Node> {
    let mut nodes = configure(dir);
    for n in &mut nodes {
        n.spawn();
    }
    nodes
}

/// Writes `flags` (as `serve` takes them, without `serve`) to a TOML config file at `path`:
/// numbers bare, `--peers` as a table, a flag without value as `true`.
fn write_config(path: &Path, flags: &[String]) {
    let mut top = String::new();
    let mut peers = String::new();
    let mut it = flags.iter().peekable();
    while let Some(flag) = it.next() {
        let key = flag.trim_start_matches("--");
        let value = match it.peek() {
            Some(v) if !v.starts_with("--") => it.next().cloned(),
            _ => None,
        };
        match (key, value) {
            ("peers", Some(v)) => {
                peers.push_str("[peers]\n");
                for pair in v.split(',') {
                    let (id, addr) = pair.split_once('=').expect("ID=ADDR");
                    peers.push_str(&format!("{id} = \"{addr}\"\n"));
                }
            }
            (k, Some(v)) if v.parse::<u64>().is_ok() => top.push_str(&format!("{k} = {v}\n")),
            (k, Some(v)) => top.push_str(&format!("{k} = {v:?}\n")),
            (k, None) => top.push_str(&format!("{k} = true\n")),
        }
    }
    std::fs::write(path, top + &peers).expect("write the config file");
}

/// Moves `node`'s settings into `dir/node-N.toml` with a wrong admin address in it: it is
/// started as `serve --config FILE --admin ADDR`, so it only answers where the test looks if
/// the command line overrides the file.
fn from_config_file(node: &mut Node, dir: &Path) {
    let decoy = free_tcp().to_string();
    let mut flags: Vec<String> = node.args.iter().skip(1).cloned().collect();
    if let Some(i) = flags.iter().position(|f| f == "--admin") {
        flags[i + 1] = decoy;
    }
    let path = dir.join(format!("node-{}.toml", node.id));
    write_config(&path, &flags);
    node.args = vec![
        "serve".into(),
        "--config".into(),
        path.display().to_string(),
        "--admin".into(),
        node.admin.to_string(),
    ];
}

/// Three nodes' settings, not started.
fn configure(dir: &Path) -> Vec<Node> {
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, TOKEN).expect("write the admin token");
    let broker_token_file = dir.join("broker-token");
    std::fs::write(&broker_token_file, BROKER_TOKEN).expect("write the broker token");
    let raft: Vec<SocketAddr> = (0..3).map(|_| free_udp()).collect();
    let peers = raft
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let nodes: Vec<Node> = (0..3)
        .map(|i| {
            let id = i as u64 + 1;
            let admin = free_tcp();
            let args = vec![
                "serve".into(),
                "--id".into(),
                id.to_string(),
                "--listen".into(),
                raft[i].to_string(),
                "--admin".into(),
                admin.to_string(),
                "--peers".into(),
                peers.clone(),
                "--bootstrap".into(),
                "--data-dir".into(),
                dir.join(format!("node-{id}")).display().to_string(),
                "--dev-certs".into(),
                certs().display().to_string(),
                "--admin-token-file".into(),
                token_file.display().to_string(),
                "--broker-token-file".into(),
                broker_token_file.display().to_string(),
                "--session-timeout-ms".into(),
                "3000".into(),
                "--heartbeat-ms".into(),
                "500".into(),
            ];
            Node {
                id,
                admin,
                args,
                child: None,
            }
        })
        .collect();
    nodes
}

/// A request with the cluster's admin token (the broker token for a broker RPC).
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, Value)> {
    let token = if path.starts_with("/broker-rpc/") {
        BROKER_TOKEN
    } else {
        TOKEN
    };
    call_as(Some(token), addr, method, path, body).await
}

async fn call_as(
    token: Option<&str>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, Value)> {
    call_with(
        &tls(),
        token,
        &format!("https://{addr}"),
        method,
        path,
        body,
    )
    .await
}

/// A request to `url` checked and authenticated with `tls` (and `token`, if any).
async fn call_with(
    tls: &http::ClientTls,
    token: Option<&str>,
    url: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, Value)> {
    let (status, text) = http::Request::new(url, method, path)
        .tls(Some(tls))
        .json(body)
        .token(token)
        .send(Duration::from_secs(10))
        .await
        .ok()?;
    Some((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// The leader every listed node agrees on.
async fn leader(nodes: &[&Node]) -> u64 {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut views = BTreeSet::new();
        for n in nodes {
            let l = call(n.admin, "GET", "/cluster/status", None)
                .await
                .and_then(|(_, v)| v["leader"].as_u64());
            views.insert(l);
        }
        if let [Some(l)] = views.iter().copied().collect::<Vec<_>>()[..] {
            if nodes.iter().any(|n| n.id == l) {
                return l;
            }
        }
        assert!(Instant::now() < deadline, "no agreed leader: {views:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn topics(admin: SocketAddr) -> Option<BTreeSet<String>> {
    let (status, v) = call(admin, "GET", "/topics", None).await?;
    (status == 200).then(|| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t["name"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_survive_sigkill_of_the_consensus_leader() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = start(dir.path());
    let all: Vec<&Node> = nodes.iter().collect();
    leader(&all).await;

    // Create topics over HTTP through node 1, retrying while the brokers register.
    let mut acked = BTreeSet::new();
    for t in 0..5 {
        let name = format!("topic-{t}");
        let body = format!(r#"{{"name":"{name}","partitions":3,"replication_factor":2}}"#);
        let deadline = Instant::now() + DEADLINE;
        loop {
            match call(nodes[0].admin, "POST", "/topics", Some(&body)).await {
                Some((201, _)) => break,
                other => {
                    assert!(Instant::now() < deadline, "create {name}: {other:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        acked.insert(name);
    }

    // Bad input: clear 4xx, nothing applied.
    let bad = [
        (
            "POST",
            "/topics",
            Some(r#"{"name":"topic-0","partitions":1,"replication_factor":1}"#),
            409,
        ),
        (
            "POST",
            "/topics",
            Some(r#"{"name":"x","partitions":0,"replication_factor":1}"#),
            400,
        ),
        (
            "POST",
            "/topics",
            Some(r#"{"name":"x","partitions":1,"replication_factor":9}"#),
            400,
        ),
        ("POST", "/topics", Some(r#"{"name":"x","partitions":"#), 400),
        (
            "POST",
            "/topics",
            Some(r#"{"name":"x","partitions":1,"replication_factor":1,"bogus":1}"#),
            400,
        ),
        ("GET", "/topics/nope", None, 404),
        ("DELETE", "/topics/nope", None, 404),
        (
            "POST",
            "/broker-rpc/77/heartbeat",
            Some(r#"{"epoch":1}"#),
            404,
        ),
        (
            "POST",
            "/broker-rpc/1/heartbeat",
            Some(r#"{"epoch":999999}"#),
            409,
        ),
    ];
    let long_name = format!(
        r#"{{"name":"{}","partitions":1,"replication_factor":1}}"#,
        "n".repeat(300)
    );
    let huge = format!(
        r#"{{"name":"x","partitions":1,"replication_factor":1,"configs":{{"k":"{}"}}}}"#,
        "v".repeat(2 << 20)
    );
    let many_configs = format!(
        r#"{{"name":"x","partitions":1,"replication_factor":1,"configs":{{{}}}}}"#,
        (0..100)
            .map(|i| format!(r#""k{i}":"v""#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let limits = [
        ("POST", "/topics", Some(long_name.as_str()), 400),
        ("POST", "/topics", Some(huge.as_str()), 413),
        ("POST", "/topics", Some(many_configs.as_str()), 400),
        (
            "DELETE",
            &*format!("/topics/{}", "n".repeat(300)),
            None,
            400,
        ),
    ];
    for (method, path, body, want) in bad.into_iter().chain(limits) {
        let got = call(nodes[1].admin, method, path, body).await;
        let (status, v) = got.unwrap_or_else(|| panic!("{method} {path}: no answer"));
        assert_eq!(status, want, "{method} {path}: {v}");
        assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
    }
    // Credentials: writes without the token get 401, with a wrong one 403; reads are open.
    let create = r#"{"name":"intruder","partitions":1,"replication_factor":1}"#;
    let writes = [
        ("POST", "/topics", Some(create)),
        ("DELETE", "/topics/topic-0", None),
        ("POST", "/broker-rpc/1/shutdown", Some(r#"{"epoch":1}"#)),
        (
            "POST",
            "/broker-rpc/register",
            Some(r#"{"broker_id":99,"incarnation":1}"#),
        ),
    ];
    for (token, want) in [(None, 401), (Some("wrong-token-wrong-token"), 403)] {
        for (method, path, body) in writes {
            let got = call_as(token, nodes[1].admin, method, path, body).await;
            let (status, v) = got.unwrap_or_else(|| panic!("{method} {path}: no answer"));
            assert_eq!(status, want, "{method} {path} with {token:?}: {v}");
            assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
        }
    }
    // The broker RPCs and the admin routes do not take each other's token.
    let as_broker = call_as(
        Some(BROKER_TOKEN),
        nodes[1].admin,
        "POST",
        "/topics",
        Some(create),
    )
    .await;
    assert_eq!(
        as_broker.map(|(s, _)| s),
        Some(403),
        "a broker token changed topics"
    );
    let as_admin = call_as(
        Some(TOKEN),
        nodes[1].admin,
        "POST",
        "/broker-rpc/register",
        Some(r#"{"broker_id":98,"incarnation":1}"#),
    )
    .await;
    assert_eq!(
        as_admin.map(|(s, _)| s),
        Some(403),
        "an admin token posed as a broker"
    );
    let read = call_as(None, nodes[1].admin, "GET", "/brokers", None).await;
    assert_eq!(read.map(|(s, _)| s), Some(200), "reads need no token");
    // The admin API is HTTPS: plain HTTP, a client certificate from another CA, or a client
    // trusting another CA get no answer at all; the operator's certificate from the cluster
    // CA is a credential instead of the token.
    let https = format!("https://{}", nodes[1].admin);
    let plain = format!("http://{}", nodes[1].admin);
    let other = tempfile::tempdir().expect("another CA");
    let stranger = consensus_tls::dev::ensure_operator(other.path()).expect("stranger");
    let foreign_cert = http::ClientTls {
        identity: Some((stranger.node_cert.clone(), stranger.node_key.clone())),
        ..tls()
    };
    let foreign_ca = http::ClientTls {
        ca: Some(stranger.ca_cert.clone()),
        identity: None,
    };
    for (what, client, url) in [
        ("plain HTTP", tls(), &plain),
        ("a certificate of another CA", foreign_cert, &https),
        ("a client trusting another CA", foreign_ca, &https),
    ] {
        let got = call_with(&client, Some(TOKEN), url, "POST", "/topics", Some(create)).await;
        assert_eq!(got, None, "{what}: answered");
    }
    let by_cert = r#"{"name":"by-certificate","partitions":1,"replication_factor":1}"#;
    let got = call_with(
        &operator_tls(),
        None,
        &https,
        "POST",
        "/topics",
        Some(by_cert),
    )
    .await;
    assert_eq!(
        got.as_ref().map(|(s, _)| *s),
        Some(201),
        "the operator certificate: {got:?}"
    );
    acked.insert("by-certificate".to_string());
    assert_eq!(
        topics(nodes[2].admin).await,
        Some(acked.clone()),
        "a refused request changed topics"
    );

    // SIGKILL the consensus leader.
    let old = leader(&all).await;
    let victim = nodes.iter().position(|n| n.id == old).expect("leader node");
    nodes[victim].sigkill();
    let survivors: Vec<&Node> = nodes.iter().filter(|n| n.id != old).collect();
    leader(&survivors).await;
    for n in &survivors {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if topics(n.admin).await.as_ref() == Some(&acked) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} lost acknowledged topics",
                n.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Restart it on the same data dir: it catches up. `/topics` reads the node's own state
    // machine after a read barrier, so this is its local copy.
    nodes[victim].spawn();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let image = topics(nodes[victim].admin).await;
        if image.as_ref() == Some(&acked) {
            break;
        }
        assert!(Instant::now() < deadline, "restarted node: {image:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = metrics_of(nodes[victim].admin).await;
    assert!(metrics.contains("broker_topics"), "{metrics}");
    for gauge in [
        "broker_offline_partitions",
        "broker_under_replicated_partitions",
        "broker_under_min_isr_partitions",
        "broker_fenced_brokers",
    ] {
        assert!(
            metrics.contains(&format!("# HELP {gauge} ")),
            "{gauge}: {metrics}"
        );
        assert!(
            metrics.contains(&format!("\n{gauge}{{")),
            "{gauge}: {metrics}"
        );
    }
}

/// Runs the binary with `args` until it exits; one that does start (and so never exits) is
/// killed at the deadline, which fails the caller's check that it refused.
fn run_to_exit(args: Vec<String>) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run broker");
    let deadline = Instant::now() + DEADLINE;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect the output")
}

/// `serve` without TLS material refuses to start, says what to pass, and creates nothing; on a
/// transport that has no plaintext mode, `--insecure-plaintext` is refused too.
#[test]
fn serve_without_tls_material_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node-1");
    let base = |transport: &str| {
        vec![
            "serve".to_string(),
            "--id".into(),
            "1".into(),
            "--listen".into(),
            free_udp().to_string(),
            "--admin".into(),
            free_tcp().to_string(),
            "--peers".into(),
            "1=127.0.0.1:1".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--transport".into(),
            transport.into(),
        ]
    };
    let run = run_to_exit;
    let compiled = [
        ("grpc", cfg!(feature = "grpc")),
        ("quic", cfg!(feature = "quic")),
    ];
    for (transport, _) in compiled.iter().filter(|(_, on)| *on) {
        let out = run(base(transport));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{transport}: started without TLS");
        assert!(err.contains("TLS is required"), "{transport}: {err}");
        assert!(err.contains("--dev-certs"), "{transport}: {err}");
        assert!(!data.exists(), "{transport}: created the data dir");
    }
    // A plain-HTTP admin API without a credential is refused (over HTTPS, client
    // certificates are one); so is a plaintext transport without saying the admin API is
    // plaintext too.
    let transport = compiled.iter().find(|(_, on)| *on).map(|(t, _)| *t);
    let mut no_token = base(transport.unwrap_or("quic"));
    no_token.extend([
        "--dev-certs".into(),
        certs().display().to_string(),
        "--admin-insecure-plaintext".into(),
    ]);
    let out = run(no_token);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without an admin credential");
    assert!(err.contains("--admin-token-file"), "{err}");
    assert!(!data.exists(), "created the data dir");
    if cfg!(feature = "grpc") {
        let mut plain = base("grpc");
        plain.extend([
            "--insecure-plaintext".into(),
            "--admin-insecure-no-auth".into(),
        ]);
        let out = run(plain);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "a plaintext node served HTTPS with nothing"
        );
        assert!(err.contains("--admin-insecure-plaintext"), "{err}");
        assert!(!data.exists(), "created the data dir");
    }
    if !cfg!(feature = "quic") {
        return;
    }
    let mut quic = base("quic");
    quic.push("--insecure-plaintext".into());
    let out = run(quic);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "quic started in plaintext");
    assert!(err.contains("always uses mutual TLS"), "{err}");
    assert!(!data.exists(), "created the data dir");
}

/// Runs the CLI against `admin` with the cluster's token; returns the exit code, stdout and
/// stderr.
fn cli(admin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(args)
        .args(["--admin", admin])
        .env("BROKER_ADMIN_TOKEN", TOKEN)
        .env("BROKER_ADMIN_CA", certs().join("ca.pem"))
        .stdin(Stdio::null())
        .output()
        .expect("run the CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `broker topics create NAME --partitions 1 --replication-factor RF` plus `extra`.
fn create_topic(admin: &str, name: &str, rf: &str, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "topics",
        "create",
        name,
        "--partitions",
        "1",
        "--replication-factor",
        rf,
    ];
    args.extend_from_slice(extra);
    cli(admin, &args)
}

/// The feed's entries after `since` that record a refused topic request.
async fn refused_topic_records(admin: SocketAddr, since: u64) -> Vec<Value> {
    let path = format!("/metadata/changes?since={since}&max=10000");
    let (status, v) = call(admin, "GET", &path, None).await.expect("feed");
    assert_eq!(status, 200, "{v}");
    v.as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| {
            let cmd = c["command"]
                .as_object()
                .map(|o| o.keys().cloned().collect::<Vec<_>>());
            let topic_cmd = cmd.is_some_and(|k| {
                k.iter().any(|k| {
                    [
                        "CreateTopic",
                        "DeleteTopic",
                        "AlterTopicConfig",
                        "CreatePartitions",
                    ]
                    .contains(&k.as_str())
                })
            });
            topic_cmd && c["response"].get("Error").is_some()
        })
        .collect()
}

/// The admin CLI and API as an operator meets them, on three `broker serve` processes: names
/// that try to smuggle a query, a fragment or a second request act on nothing; a listing over
/// 16 MiB arrives whole; requests the image already refuses leave the log and the feed
/// unchanged; unknown configs are refused; alter-configs, add-partitions and unregister work;
/// a fake broker cannot unfence itself with an offset beyond the log end; exit codes tell
/// failures apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_acts_on_exactly_what_it_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = start(dir.path());
    let all: Vec<&Node> = nodes.iter().collect();
    leader(&all).await;
    let url = format!("https://{}", nodes[0].admin);
    let admin = url.as_str();
    // Brokers register in the background: retry the first create until there are two.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (code, out, err) = create_topic(admin, "victim", "2", &[]);
        if code == 0 {
            assert!(out.starts_with("created topic victim"), "{out}");
            break;
        }
        assert!(Instant::now() < deadline, "create victim: {code} {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for t in ["victim2", "other"] {
        let (code, _, err) = create_topic(admin, t, "2", &[]);
        assert_eq!(code, 0, "{err}");
    }
    let (code, _, err) = create_topic(admin, "victim", "2", &[]);
    assert_eq!(code, 4, "a duplicate is a conflict: {err}");
    let (code, _, _) = create_topic(admin, "victim", "2", &["--if-not-exists"]);
    assert_eq!(code, 0, "--if-not-exists");

    let (_, feed_start, _) = cli(admin, &["cluster", "status", "-o", "json"]);
    let since: Value = serde_json::from_str(&feed_start).expect("status JSON");
    let since = since["applied_index"].as_u64().expect("applied index");

    // Names that would smuggle a query, a fragment or a second request are refused before
    // anything is sent, and the server refuses them too when they arrive encoded.
    for evil in [
        "victim?dry-run=true",
        "victim2#x",
        "other\r\nDELETE /topics/victim HTTP/1.1",
        "../topics",
    ] {
        for verb in ["delete", "describe"] {
            let (code, _, err) = cli(admin, &["topics", verb, evil]);
            assert_eq!(code, 5, "topics {verb} {evil:?}: {err}");
            assert!(err.contains("[a-zA-Z0-9._-]"), "{err}");
        }
        let (status, v) = call(
            nodes[1].admin,
            "DELETE",
            &http::path(&["topics", evil]).expect("a path"),
            None,
        )
        .await
        .expect("an answer");
        assert_eq!(status, 400, "DELETE {evil:?}: {v}");
    }
    let (code, names, _) = cli(admin, &["topics", "list"]);
    assert_eq!(code, 0);
    assert_eq!(
        names.lines().collect::<Vec<_>>(),
        ["other", "victim", "victim2"],
        "{names}"
    );

    // Requests the image refuses cost no log entry: nothing about them in the feed.
    let long = "n".repeat(10_000);
    for args in [
        vec!["topics", "delete", "missing"],
        vec![
            "topics",
            "create",
            "victim",
            "--partitions",
            "1",
            "--replication-factor",
            "1",
        ],
        vec![
            "topics",
            "create",
            "wide",
            "--partitions",
            "1",
            "--replication-factor",
            "9",
        ],
        vec!["topics", "add-partitions", "victim", "--total", "1"],
        vec![
            "topics",
            "alter-configs",
            "missing",
            "--set",
            "retention.ms=1",
        ],
    ] {
        let (code, _, err) = cli(admin, &args);
        assert_ne!(code, 0, "{args:?} succeeded");
        assert!(!err.is_empty(), "{args:?}: no reason");
    }
    let (status, _) = call(
        nodes[2].admin,
        "DELETE",
        &http::path(&["topics", &long]).expect("a path"),
        None,
    )
    .await
    .expect("an answer");
    assert_eq!(status, 400);
    let (code, _, err) = cli(admin, &["topics", "delete", "missing"]);
    assert_eq!(code, 3, "not found: {err}");
    let (code, _, _) = cli(admin, &["topics", "delete", "missing", "--if-exists"]);
    assert_eq!(code, 0);
    // Unknown configs and bad values, from the CLI and straight over HTTP.
    let (code, _, err) = create_topic(
        admin,
        "typo",
        "1",
        &["--config", "unclean.leader.election.enabled=true"],
    );
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("unknown topic config"), "{err}");
    let bad_config = r#"{"name":"typo","partitions":1,"replication_factor":1,"configs":{"retention.ms":"soon"}}"#;
    let (status, v) = call(nodes[1].admin, "POST", "/topics", Some(bad_config))
        .await
        .expect("answer");
    assert_eq!(status, 400, "{v}");
    let refused = refused_topic_records(nodes[0].admin, since).await;
    assert!(
        refused.is_empty(),
        "refused requests reached the log: {refused:?}"
    );

    // alter-configs and add-partitions.
    let (code, _, err) = cli(
        admin,
        &[
            "topics",
            "alter-configs",
            "victim",
            "--set",
            "retention.ms=86400000",
            "--set",
            "unclean.leader.election.enable=true",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(
        admin,
        &["topics", "add-partitions", "victim", "--total", "3"],
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli(admin, &["topics", "describe", "victim", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let topic: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        topic["partitions"].as_array().map(Vec::len),
        Some(3),
        "{topic}"
    );
    assert_eq!(topic["configs"]["retention.ms"], "86400000", "{topic}");
    let (code, table, _) = cli(admin, &["topics", "describe", "victim"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("PARTITION") && table.lines().count() >= 5,
        "{table}"
    );

    // A fake broker cannot unfence itself by claiming an offset beyond the log's end.
    let (status, v) = call(
        nodes[1].admin,
        "POST",
        "/broker-rpc/register",
        Some(r#"{"broker_id":50,"incarnation":1}"#),
    )
    .await
    .expect("answer");
    assert_eq!(status, 200, "{v}");
    let epoch = v["epoch"].as_u64().expect("epoch");
    let beat = format!(r#"{{"epoch":{epoch},"metadata_offset":{}}}"#, 1u64 << 50);
    let (status, v) = call(
        nodes[1].admin,
        "POST",
        "/broker-rpc/50/heartbeat",
        Some(&beat),
    )
    .await
    .expect("answer");
    assert_eq!(status, 400, "{v}");
    let (code, out, _) = cli(admin, &["brokers", "describe", "50"]);
    assert_eq!(code, 0);
    assert!(out.contains("fenced"), "{out}");
    // A live broker is not unregistered; the fenced fake one is. On a loaded machine broker 1
    // can miss its 3 s session and be fenced for a moment (it is then rightly unregistered,
    // and registers again): ask only while it shows as active, until it is refused.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, out, _) = cli(admin, &["brokers", "describe", "1"]);
        if out.contains("active") {
            let (code, _, err) = cli(admin, &["brokers", "unregister", "1"]);
            if code == 4 {
                assert!(err.contains("alive"), "{err}");
                break;
            }
            eprintln!("unregister 1 while it showed as active answered {code}: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "a live broker 1 was never refused an unregister: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, _, err) = cli(admin, &["brokers", "unregister", "50"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = cli(admin, &["brokers", "describe", "50"]);
    assert_eq!(code, 3);

    // Several endpoints are tried in turn; a dead one first does not matter.
    let dead = format!("https://{}", free_tcp());
    let list = format!("{dead},{url}");
    let (code, out, err) = cli(&list, &["brokers", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("BROKER"), "{out}");
    let (code, _, err) = cli(&dead, &["brokers", "list"]);
    assert_eq!(code, 6, "unavailable: {err}");

    // Unknown routes and methods answer JSON errors.
    for (method, path, want) in [
        ("GET", "/nope", 404),
        ("PUT", "/topics", 405),
        ("GET", "/brokers/x", 400),
    ] {
        let (status, v) = call(nodes[0].admin, method, path, None)
            .await
            .expect("answer");
        assert_eq!(status, want, "{method} {path}: {v}");
        assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
    }

    // A listing over 16 MiB arrives whole (22 topics of 10,000 partitions), and a closed pipe
    // ends the CLI quietly.
    for t in 0..22 {
        let body = format!(r#"{{"name":"wide-{t}","partitions":10000,"replication_factor":2}}"#);
        let (status, v) = call(nodes[0].admin, "POST", "/topics", Some(&body))
            .await
            .expect("answer");
        assert_eq!(status, 201, "wide-{t}: {}", v["reason"]);
    }
    let (status, bytes) = http::Request::new(&nodes[2].admin.to_string(), "GET", "/topics")
        .tls(Some(&tls()))
        .send_bytes(Duration::from_secs(60))
        .await
        .expect("the listing");
    assert_eq!(status, 200);
    assert!(bytes.len() > 16 << 20, "only {} bytes", bytes.len());
    let listing: Vec<Value> = serde_json::from_slice(&bytes).expect("whole JSON");
    let partitions: usize = listing
        .iter()
        .filter_map(|t| t["partitions"].as_array().map(Vec::len))
        .sum();
    assert_eq!(partitions, 22 * 10_000 + 3 + 1 + 1);
    let piped = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; '{}' topics describe wide-0 --admin {url} | head -1",
            env!("CARGO_BIN_EXE_broker")
        ))
        .env("BROKER_ADMIN_CA", certs().join("ca.pem"))
        .output()
        .expect("run through a pipe");
    let err = String::from_utf8_lossy(&piped.stderr);
    assert!(
        piped.status.success(),
        "exit {:?}: {err}",
        piped.status.code()
    );
    assert!(!err.contains("panicked"), "{err}");

    // Preferred-leader election, for named topics and for all.
    let (code, out, err) = cli(admin, &["topics", "elect-leaders", "victim", "other"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("moved the leadership of"), "{out}");
    let (code, _, err) = cli(admin, &["topics", "elect-leaders", "missing"]);
    assert_eq!(code, 3, "{err}");
    let (code, out, err) = cli(admin, &["topics", "elect-leaders", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("JSON");
    assert!(v["moved"].as_u64().is_some(), "{v}");

    // SIGTERM runs a controlled shutdown: the broker is marked shutting down (its leaderships
    // moved away) before the process exits, with success.
    let status = nodes[2].sigterm_and_wait().expect("exited after SIGTERM");
    assert!(status.success(), "SIGTERM exit: {status:?}");
    let (status, b) = call(nodes[0].admin, "GET", "/brokers/3", None)
        .await
        .expect("answer");
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["shutting_down"], true, "{b}");
    // An operator can cancel a controlled shutdown (once).
    let (code, _, err) = cli(admin, &["brokers", "cancel-shutdown", "3"]);
    assert_eq!(code, 0, "{err}");
    let (_, b) = call(nodes[0].admin, "GET", "/brokers/3", None)
        .await
        .expect("answer");
    assert_eq!(b["shutting_down"], false, "{b}");
    let (code, _, err) = cli(admin, &["brokers", "cancel-shutdown", "3"]);
    assert_eq!(code, 4, "not shutting down any more: {err}");
}

/// `serve` refuses settings that cannot work, says what to change, and creates nothing.
#[test]
fn bad_serve_settings_are_refused_before_the_data_dir_is_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).expect("token");
    let serve = |id: &str, peers: &str| -> Vec<String> {
        [
            "serve",
            "--id",
            id,
            "--listen",
            &free_udp().to_string(),
            "--admin",
            &free_tcp().to_string(),
            "--peers",
            peers,
            "--data-dir",
            &data.display().to_string(),
            "--admin-token-file",
            &token.display().to_string(),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let run = |id: &str, peers: &str, extra: &[&str]| {
        let mut args = serve(id, peers);
        args.push("--dev-certs".into());
        args.push(certs().display().to_string());
        args.extend(extra.iter().map(|a| a.to_string()));
        let out = run_to_exit(args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cases: [(&str, &str, &[&str], &str); 5] = [
        (
            "1",
            "1=127.0.0.1:1",
            &["--heartbeat-ms", "5000", "--session-timeout-ms", "3000"],
            "at most half",
        ),
        ("0", "0=127.0.0.1:1", &[], "reserved"),
        ("1", "1=127.0.0.1:1,1=127.0.0.1:2", &[], "listed twice"),
        (
            "1",
            "1=127.0.0.1:1,2=127.0.0.1:1",
            &[],
            "more than one node",
        ),
        ("3", "1=127.0.0.1:1", &[], "must include this node"),
    ];
    for (id, peers, extra, why) in cases {
        let (ok, err) = run(id, peers, extra);
        assert!(!ok, "--id {id} --peers {peers} {extra:?} started");
        assert!(err.contains(why), "{err}");
        assert!(!data.exists(), "created the data dir for {extra:?}");
    }
    // Good settings on an empty data dir, but neither --bootstrap nor --join: a node that lost
    // its disk must not come back empty under its id, so this is refused and says what to pass.
    let (ok, err) = run("1", "1=127.0.0.1:1", &[]);
    assert!(
        !ok,
        "started on an empty data dir without --bootstrap or --join"
    );
    assert!(
        err.contains("--bootstrap") && err.contains("--join") && err.contains("replace"),
        "{err}"
    );
    assert!(!data.exists(), "created the data dir without --bootstrap");
    // Another node's certificate (node 2's, for node 1).
    let certs = dir.path().join("files");
    let paths = consensus_tls::dev::generate_dev_certs(&certs, &[1, 2]).expect("dev certs");
    let other = &paths[1];
    let mut args = serve("1", "1=127.0.0.1:1");
    for (flag, path) in [
        ("--tls-ca", &other.ca_cert),
        ("--tls-cert", &other.node_cert),
        ("--tls-key", &other.node_key),
    ] {
        args.push(flag.into());
        args.push(path.display().to_string());
    }
    let out = run_to_exit(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with node 2's certificate");
    assert!(err.contains("is not node 1's certificate"), "{err}");
    assert!(
        !data.exists(),
        "created the data dir with a wrong certificate"
    );
}

/// A base port whose consensus (UDP and TCP) and admin (TCP) ports for three nodes are free
/// now: `broker dev --base-port` puts node N on BASE+N and BASE+100+N.
fn free_base_port() -> u16 {
    for _ in 0..200 {
        let base: u16 = rand::random::<u16>() % 30_000 + 20_000;
        let free = (1..=3u16).all(|n| {
            let raft = SocketAddr::from(([127, 0, 0, 1], base + n));
            let admin = SocketAddr::from(([127, 0, 0, 1], base + 100 + n));
            UdpSocket::bind(raft).is_ok()
                && TcpListener::bind(raft).is_ok()
                && TcpListener::bind(admin).is_ok()
        });
        if free {
            return base;
        }
    }
    panic!("no free base port found");
}

/// Starts `broker dev` with `args`; returns the child and its stdout lines up to the one
/// naming the data dir (the cluster is up then).
fn dev(args: &[String]) -> (Child, Vec<String>) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
        .arg("dev")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn broker dev");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    while !lines.iter().any(|l: &String| l.starts_with("data in ")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => {
                let _ = child.kill();
                panic!("broker dev did not come up: {lines:?}");
            }
        }
    }
    (child, lines)
}

/// `broker dev --data-dir --base-port` keeps its cluster: stopped with Ctrl-C and started
/// again, it comes back on the same addresses with its topics and admin token.
#[test]
fn dev_keeps_its_cluster_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("dev");
    let base = free_base_port();
    let args = vec![
        "--data-dir".to_string(),
        data.display().to_string(),
        "--base-port".into(),
        base.to_string(),
    ];
    let admin = format!("https://127.0.0.1:{}", base + 101);
    let run_cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(args)
            .args(["--admin", &admin])
            .args([
                "--admin-token-file",
                &data.join("admin-token").display().to_string(),
            ])
            .env("BROKER_ADMIN_CA", data.join("certs").join("ca.pem"))
            .output()
            .expect("run the CLI");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let stop = |mut child: Child| {
        let sent = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(sent.success());
        let deadline = Instant::now() + DEADLINE;
        while child.try_wait().expect("wait").is_none() {
            assert!(
                Instant::now() < deadline,
                "broker dev did not stop on SIGINT"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let (child, lines) = dev(&args);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("started a new cluster of 3 nodes")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l == &format!("node 1: admin {admin}")),
        "{lines:?}"
    );
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (code, _, err) = run_cli(&[
            "topics",
            "create",
            "kept",
            "--partitions",
            "2",
            "--replication-factor",
            "3",
        ]);
        if code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "create: {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
    stop(child);

    // The stopped node's data dir, read offline: its identity, membership and log.
    let node1 = data.join("node-1");
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args([
            "debug",
            "dump",
            "--data-dir",
            &node1.display().to_string(),
            "-o",
            "json",
        ])
        .output()
        .expect("run debug dump");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(dump["identity"]["node_id"].as_u64(), Some(1), "{dump}");
    assert_eq!(
        ids(&dump["report"]["voters"]),
        BTreeSet::from([1, 2, 3]),
        "{dump}"
    );
    assert!(dump["report"]["term"].as_u64() > Some(0), "{dump}");
    assert!(
        dump["report"]["entries"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x["kind"] == "command")),
        "{dump}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_broker"))
        .args(["debug", "dump", "--data-dir", &node1.display().to_string()])
        .output()
        .expect("run debug dump");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("membership   voters 1,2,3"), "{text}");

    let (child, lines) = dev(&args);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("restarted the kept cluster of 3 nodes")),
        "{lines:?}"
    );
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (code, out, err) = run_cli(&["topics", "list"]);
        if code == 0 && out.lines().any(|l| l == "kept") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the restart: {code} {out} {err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    stop(child);
}

/// Waits until `pred` holds for node `admin`'s consensus status; returns it.
async fn wait_status(admin: SocketAddr, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some((200, st)) = call(admin, "GET", "/cluster/status", None).await {
            if pred(&st) {
                return st;
            }
            assert!(Instant::now() < deadline, "{what}: {st}");
        } else {
            assert!(Instant::now() < deadline, "{what}: no status");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ids(v: &Value) -> BTreeSet<u64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// A node started like `template` but with its own id, addresses and data dir, and `--join`
/// instead of `--peers`: it creates no cluster and waits to be added. With its consensus
/// address.
fn joining(template: &[String], id: u64, dir: &Path) -> (Node, SocketAddr) {
    let raft = free_udp();
    let admin = free_tcp();
    let mut args = Vec::new();
    let mut it = template.iter();
    while let Some(flag) = it.next() {
        let replacement = match flag.as_str() {
            "--id" => Some(id.to_string()),
            "--listen" => Some(raft.to_string()),
            "--admin" => Some(admin.to_string()),
            "--data-dir" => Some(dir.join(format!("node-{id}")).display().to_string()),
            "--peers" => {
                it.next();
                args.push("--join".to_string());
                continue;
            }
            "--bootstrap" => continue,
            _ => None,
        };
        args.push(flag.clone());
        if let Some(value) = replacement {
            it.next();
            args.push(value);
        }
    }
    let n = Node {
        id,
        admin,
        args,
        child: None,
    };
    (n, raft)
}

/// `broker quorum describe --replication -o json` through `admin`: the rows by node id.
fn replication(admin: &str) -> Vec<(u64, String)> {
    let (code, out, err) = cli(
        admin,
        &["quorum", "describe", "--replication", "-o", "json"],
    );
    assert_eq!(code, 0, "quorum describe: {err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    v["replication"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["id"].as_u64().unwrap_or(0),
                r["role"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

/// Waits until the quorum (as the leader describes it through `admin`) has these roles.
async fn wait_roles(admin: &str, what: &str, roles: &[(u64, &str)]) {
    let mut want: Vec<(u64, String)> = roles.iter().map(|(i, r)| (*i, r.to_string())).collect();
    want.sort();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let mut got = replication(admin);
        got.sort();
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Membership from the CLI on real processes started from config files (`serve --config`,
/// the admin address overridden on the command line), each step checked with `quorum
/// describe`: a fourth node started with `--join` is added as a learner (an observer), is promoted, a fifth
/// replaces node 1 (`cluster replace`: added, caught up, promoted, node 1 removed), the
/// leadership moves to node 4, node 2 is removed; the topic created before is on the new
/// nodes, writes still commit, and unsafe requests are refused with a reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = configure(dir.path());
    let template = nodes[0].args.clone();
    for n in &mut nodes {
        from_config_file(n, dir.path());
        n.spawn();
    }
    let all: Vec<&Node> = nodes.iter().collect();
    leader(&all).await;
    let url = format!("https://{},https://{}", nodes[1].admin, nodes[2].admin);
    let admin = url.as_str();
    let deadline = Instant::now() + DEADLINE;
    while create_topic(admin, "before", "2", &[]).0 != 0 {
        assert!(Instant::now() < deadline, "no topic could be created");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One leader and two followers, as the leader describes them.
    let leader_id = loop {
        let rows = replication(admin);
        let leaders: Vec<u64> = rows
            .iter()
            .filter(|(_, r)| r == "leader")
            .map(|(i, _)| *i)
            .collect();
        let followers = rows.iter().filter(|(_, r)| r == "follower").count();
        if leaders.len() == 1 && followers == 2 {
            break leaders[0];
        }
        assert!(Instant::now() < deadline, "three voters: {rows:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (code, status, err) = cli(admin, &["quorum", "describe", "--status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        status.contains("CurrentVoters") && status.contains("MaxFollowerLag"),
        "{status}"
    );
    let (code, out, err) = cli(admin, &["quorum", "describe", "--status", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let q: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(q["leader"].as_u64(), Some(leader_id), "{q}");
    let voters: BTreeSet<u64> = q["voters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_u64())
        .collect();
    assert_eq!(voters, BTreeSet::from([1, 2, 3]), "{q}");
    assert!(
        q["cluster_id"].as_str().is_some_and(|c| !c.is_empty()),
        "{q}"
    );

    let (mut n4, raft4) = joining(&template, 4, dir.path());
    from_config_file(&mut n4, dir.path());
    let admin4 = n4.admin;
    n4.spawn();
    wait_status(admin4, "node 4 up, outside the cluster", |st| {
        st["voters"].as_array().is_some()
    })
    .await;

    // Unsafe requests first: each refused with a reason.
    let (code, _, err) = cli(admin, &["cluster", "promote", "4"]);
    assert_eq!(code, 3, "promoting a non-member: {err}");
    let (code, _, err) = cli(admin, &["cluster", "transfer-leader", "4"]);
    assert_eq!(code, 5, "leadership to a non-voter: {err}");
    let (code, _, err) = cli(
        admin,
        &["cluster", "add-learner", "2", "--address", "127.0.0.1:1"],
    );
    assert_eq!(code, 4, "adding a member again: {err}");

    let (code, _, err) = cli(
        admin,
        &[
            "cluster",
            "add-learner",
            "4",
            "--address",
            &raft4.to_string(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let mut roles = vec![
        (1, "follower"),
        (2, "follower"),
        (3, "follower"),
        (4, "observer"),
    ];
    roles.retain(|(i, _)| *i != leader_id);
    roles.push((leader_id, "leader"));
    wait_roles(admin, "node 4 an observer", &roles).await;
    let (code, _, err) = cli(admin, &["cluster", "promote", "4"]);
    assert_eq!(code, 0, "{err}");
    wait_status(nodes[1].admin, "node 4 a voter", |st| {
        ids(&st["voters"]) == BTreeSet::from([1, 2, 3, 4])
    })
    .await;

    // Node 5 replaces node 1: added, caught up, promoted, node 1 removed, in one command.
    let (mut n5, raft5) = joining(&template, 5, dir.path());
    from_config_file(&mut n5, dir.path());
    let admin5 = n5.admin;
    n5.spawn();
    let (code, out, err) = cli(
        admin,
        &[
            "cluster",
            "replace",
            "1",
            "5",
            "--address",
            &raft5.to_string(),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    wait_status(admin5, "node 5 a voter, node 1 gone", |st| {
        ids(&st["voters"]) == BTreeSet::from([2, 3, 4, 5]) && !ids(&st["learners"]).contains(&1)
    })
    .await;
    nodes[0].sigkill();

    let (code, _, err) = cli(admin, &["cluster", "transfer-leader", "4"]);
    assert_eq!(code, 0, "{err}");
    wait_roles(
        admin,
        "node 4 leads",
        &[
            (2, "follower"),
            (3, "follower"),
            (4, "leader"),
            (5, "follower"),
        ],
    )
    .await;
    let (code, _, err) = cli(admin, &["cluster", "remove", "2"]);
    assert_eq!(code, 0, "{err}");
    let admin45 = format!("https://{admin4},https://{admin5}");
    wait_roles(
        &admin45,
        "node 2 removed",
        &[(3, "follower"), (4, "leader"), (5, "follower")],
    )
    .await;
    nodes[1].sigkill();
    // The new nodes hold the metadata written before they joined, and the cluster commits.
    for a in [admin4, admin5] {
        let (code, names, err) = cli(&format!("https://{a}"), &["topics", "list"]);
        assert_eq!(code, 0, "{err}");
        assert!(names.lines().any(|l| l == "before"), "{names}");
    }
    let (code, _, err) = create_topic(&admin45, "after", "2", &[]);
    assert_eq!(code, 0, "{err}");
    leader_metrics_are_listed(admin4).await;
    drop((n4, n5));
}

/// `GET /metrics` of node `admin`: the Prometheus text.
async fn metrics_of(admin: SocketAddr) -> String {
    let (status, text) = http::request(
        &admin.to_string(),
        Some(&tls()),
        "GET",
        "/metrics",
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("metrics");
    assert_eq!(status, 200, "{text}");
    text
}

/// The series named `name` in Prometheus text `text`: each one's labels and value.
fn series(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match key.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (key, ""),
            };
            if metric != name {
                return None;
            }
            Some((labels.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// `/metrics` of node 4, the consensus leader of three voters (3, 4, 5): the consensus series
/// of the node, its log, its transport and its replication, with the same names on both engines.
async fn leader_metrics_are_listed(admin4: SocketAddr) {
    let deadline = Instant::now() + DEADLINE;
    let text = loop {
        let text = metrics_of(admin4).await;
        // The status gauges refresh every 100 ms: wait for the leadership to show.
        let leads = series(&text, "consensus_role")
            .iter()
            .any(|(l, v)| l.contains("role=\"leader\"") && l.contains("node=\"4\"") && *v == 1.0);
        if leads {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 never shows as leader: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let of_node4 = |name: &str| -> Vec<(String, f64)> {
        series(&text, name)
            .into_iter()
            .filter(|(l, _)| l.contains("node=\"4\""))
            .collect()
    };
    for name in [
        "consensus_proposals_total",
        "consensus_proposals_forwarded_total",
        "consensus_proposal_duration_seconds_bucket",
        "consensus_read_index_duration_seconds_bucket",
        "consensus_term",
        "consensus_commit_index",
        "consensus_applied_index",
        "consensus_leader_changes_total",
        "consensus_refused_messages_total",
        "consensus_log_fsyncs_total",
        "consensus_log_fsync_duration_seconds_bucket",
        "consensus_log_write_bytes_total",
        "consensus_log_batch_writes_bucket",
        "consensus_snapshots_installed_total",
        "consensus_transport_frames_sent_total",
        "consensus_transport_bytes_received_total",
    ] {
        assert!(!of_node4(name).is_empty(), "{name} missing: {text}");
    }
    let positive = |name: &str| of_node4(name).iter().map(|(_, v)| *v).sum::<f64>() > 0.0;
    for name in [
        "consensus_term",
        "consensus_log_fsyncs_total",
        "consensus_log_write_bytes_total",
        "consensus_transport_frames_sent_total",
        "consensus_read_index_duration_seconds_count",
    ] {
        assert!(positive(name), "{name} is zero: {text}");
    }
    let peers: BTreeSet<String> = of_node4("consensus_replication_lag_entries")
        .into_iter()
        .map(|(l, _)| l)
        .filter(|l| l.contains("peer=\"3\"") || l.contains("peer=\"5\""))
        .collect();
    assert_eq!(peers.len(), 2, "replication lag of both followers: {text}");
}

/// The value of `--flag` in a node's serve arguments.
fn flag<'a>(node: &'a Node, flag: &str) -> &'a str {
    let i = node
        .args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("no {flag} in {:?}", node.args));
    &node.args[i + 1]
}

/// Disaster recovery from a backup, as an operator runs it: `cluster backup` through a
/// follower (refused without the admin credential, never over an existing file), then a new
/// three-node cluster under another cluster id, each data dir written by `broker restore`
/// (refused over a data dir it wrote), started with plain `serve`: it has the topics the
/// backup had and not the one created after it, takes new topics, and its log continues after
/// the backup's index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_restored_from_a_cli_backup_has_its_topics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = start(dir.path());
    let all: Vec<&Node> = nodes.iter().collect();
    let leader_id = leader(&all).await;
    let follower = nodes
        .iter()
        .find(|n| n.id != leader_id)
        .expect("a follower");
    let admin = format!("https://{}", follower.admin);
    let deadline = Instant::now() + DEADLINE;
    while create_topic(&admin, "alpha", "2", &[]).0 != 0 {
        assert!(Instant::now() < deadline, "no topic could be created");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(create_topic(&admin, "beta", "2", &[]).0, 0);

    let (status, v) = call_as(None, follower.admin, "GET", "/cluster/backup", None)
        .await
        .expect("the node answers");
    assert_eq!(status, 401, "a backup without the admin credential: {v}");
    let file = dir.path().join("metadata.backup");
    let path = file.display().to_string();
    let (code, out, err) = cli(&admin, &["cluster", "backup", &path, "-o", "json"]);
    assert_eq!(code, 0, "{out}{err}");
    let info: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let index = info["index"].as_u64().expect("the backup's index");
    assert!(
        info["image_bytes"].as_u64().is_some_and(|b| b > 0),
        "{info}"
    );
    let saved = std::fs::read(&file).expect("the backup file");
    let (code, _, err) = cli(&admin, &["cluster", "backup", &path]);
    assert_eq!(code, 2, "a backup over an existing file: {err}");
    assert_eq!(
        std::fs::read(&file).expect("read"),
        saved,
        "the file changed"
    );
    assert_eq!(create_topic(&admin, "after-backup", "2", &[]).0, 0);
    for n in &mut nodes {
        n.sigterm_and_wait();
    }

    let dir2 = tempfile::tempdir().expect("tempdir");
    let mut restored = configure(dir2.path());
    for n in &mut restored {
        n.args.retain(|a| a != "--bootstrap");
        n.args
            .extend(["--cluster-id".to_string(), "restored".to_string()]);
        let args = [
            "restore",
            "--backup",
            &path,
            "--data-dir",
            flag(n, "--data-dir"),
            "--id",
            &n.id.to_string(),
            "--peers",
            flag(n, "--peers"),
            "--cluster-id",
            "restored",
        ];
        let out = Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(args)
            .output()
            .expect("run restore");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "restore: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("checksum ok"), "{text}");
        let again = Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(args)
            .output()
            .expect("run restore");
        assert_eq!(
            again.status.code(),
            Some(5),
            "a restore over a restored data dir"
        );
        n.spawn();
    }
    let all: Vec<&Node> = restored.iter().collect();
    leader(&all).await;
    let admin = restored
        .iter()
        .map(|n| format!("https://{}", n.admin))
        .collect::<Vec<_>>()
        .join(",");
    let (code, out, err) = cli(&admin, &["topics", "list"]);
    assert_eq!(code, 0, "{err}");
    let names: BTreeSet<&str> = out.lines().collect();
    assert_eq!(names, BTreeSet::from(["alpha", "beta"]), "{out}");
    let deadline = Instant::now() + DEADLINE;
    while create_topic(&admin, "gamma", "2", &[]).0 != 0 {
        assert!(
            Instant::now() < deadline,
            "the restored cluster takes no topic"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, out, err) = cli(&admin, &["cluster", "status", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let st: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let (code, out, err) = cli(&admin, &["quorum", "describe", "--status", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let q: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(q["cluster_id"].as_str(), Some("restored"), "{q}");
    assert!(
        st["commit_index"].as_u64().is_some_and(|c| c > index),
        "the log continues after the backup's index {index}: {st}"
    );
}
