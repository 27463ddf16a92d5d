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
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn broker serve");
        self.child = Some(child);
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
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, TOKEN).expect("write the admin token");
    let raft: Vec<SocketAddr> = (0..3).map(|_| free_udp()).collect();
    let peers = raft
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes: Vec<Node> = (0..3)
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
                "--data-dir".into(),
                dir.join(format!("node-{id}")).display().to_string(),
                "--dev-certs".into(),
                dir.join("certs").display().to_string(),
                "--admin-token-file".into(),
                token_file.display().to_string(),
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
    for n in &mut nodes {
        n.spawn();
    }
    nodes
}

/// A request with the cluster's admin token.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, Value)> {
    call_as(Some(TOKEN), addr, method, path, body).await
}

async fn call_as(
    token: Option<&str>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, Value)> {
    let (status, text) = http::Request::new(&addr.to_string(), method, path)
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
        ("POST", "/brokers/77/heartbeat", Some(r#"{"epoch":1}"#), 404),
        (
            "POST",
            "/brokers/1/heartbeat",
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
        ("POST", "/brokers/1/shutdown", Some(r#"{"epoch":1}"#)),
        (
            "POST",
            "/brokers",
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
    let read = call_as(None, nodes[1].admin, "GET", "/brokers", None).await;
    assert_eq!(read.map(|(s, _)| s), Some(200), "reads need no token");
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
    let (status, metrics) = http::request(
        &nodes[victim].admin.to_string(),
        "GET",
        "/metrics",
        None,
        Duration::from_secs(5),
    )
    .await
    .expect("metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("broker_topics"), "{metrics}");
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
    // A node that does start is killed at the deadline and fails the test.
    let run = |args: Vec<String>| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_broker"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run broker serve");
        let deadline = Instant::now() + DEADLINE;
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().expect("collect the output")
    };
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
    // With TLS but no admin credential, it refuses too.
    let transport = compiled.iter().find(|(_, on)| *on).map(|(t, _)| *t);
    let mut no_token = base(transport.unwrap_or("quic"));
    no_token.extend([
        "--dev-certs".into(),
        dir.path().join("certs").display().to_string(),
    ]);
    let out = run(no_token);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started without an admin credential");
    assert!(err.contains("--admin-token-file"), "{err}");
    assert!(!data.exists(), "created the data dir");
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
