//! The client API over the network ([`kvstore::service`]): puts and linearizable gets through
//! every node of a real 3-node cluster (mutual TLS, 127.0.0.1, port 0), and what it refuses.

use std::net::SocketAddr;
use std::time::Duration;

use consensus_api::TlsConfig;
use consensus_harness::Runtimes;
use kvstore::service::pb::{kv_client::KvClient, GetRequest};
use kvstore::service::{Client, Server, MAX_MESSAGE_BYTES};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_and_gets_through_every_node_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wiring = kvstore::wiring();
    let backend = wiring.backend(None).expect("a backend");
    let transport = wiring.transport(None).expect("a transport");
    let cluster = kvstore::start_local_cluster(
        backend,
        transport,
        "client-api",
        3,
        dir.path(),
        Runtimes::Caller,
    )
    .await
    .expect("cluster");
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let tls = TlsConfig::DevCerts {
        dir: dir.path().join("certs"),
    };
    let mut servers = Vec::new();
    for id in cluster.live() {
        let s = Server::start(cluster.node(id), id, any, &tls)
            .await
            .expect("client API");
        servers.push((id, s));
    }
    cluster
        .node(1)
        .wait_for_leader(TIMEOUT)
        .await
        .expect("leader");
    // Every node takes puts (a follower forwards them) and serves what the others wrote.
    for (i, (id, s)) in servers.iter().enumerate() {
        let mut c = Client::connect(s.addr(), *id, &tls, TIMEOUT)
            .await
            .expect("connect");
        let prev = c
            .put("k".into(), format!("v{i}"))
            .await
            .unwrap_or_else(|e| panic!("put via node {id}: {e}"));
        assert_eq!(prev, (i > 0).then(|| format!("v{}", i - 1)));
        assert_eq!(c.get("k".into()).await.expect("get"), Some(format!("v{i}")));
        assert_eq!(c.get("absent".into()).await.expect("get"), None);
    }
    // A put stream through a follower: each put answered in order, with the previous value.
    let (id, s) = &servers[servers.len() - 1];
    let mut c = Client::connect(s.addr(), *id, &tls, TIMEOUT)
        .await
        .expect("connect");
    let mut stream = c.put_stream().await.expect("put stream");
    for i in 0..5 {
        let prev = stream
            .put("s".into(), format!("{i}"), true)
            .await
            .unwrap_or_else(|e| panic!("streamed put {i}: {e}"));
        assert_eq!(prev, (i > 0).then(|| format!("{}", i - 1)));
    }
    assert_eq!(c.get("s".into()).await.expect("get"), Some("4".into()));
    // Without the previous value: nothing is answered, the value is set.
    c.set("s".into(), "5".into()).await.expect("set");
    assert_eq!(
        stream
            .put("s".into(), "6".into(), false)
            .await
            .expect("put"),
        None
    );
    assert_eq!(c.get("s".into()).await.expect("get"), Some("6".into()));

    // A request over the size limit is refused and changes nothing.
    let (id, s) = &servers[0];
    let mut c = Client::connect(s.addr(), *id, &tls, TIMEOUT)
        .await
        .expect("connect");
    let e = c
        .put("k".into(), "x".repeat(MAX_MESSAGE_BYTES + 1))
        .await
        .expect_err("an oversized put");
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e}");
    assert_eq!(c.get("k".into()).await.expect("get"), Some("v2".into()));

    // A client that trusts the cluster's CA but presents a certificate of another CA is
    // refused (the server asks for a client certificate of its own CA).
    let other = tempfile::tempdir().expect("tempdir");
    let ours = consensus_tls::dev::ensure_operator(&dir.path().join("certs")).expect("certs");
    let theirs = consensus_tls::dev::ensure_operator(&other.path().join("certs")).expect("certs");
    let read = |p: &std::path::Path| std::fs::read(p).expect("pem");
    let endpoint = Endpoint::from_shared(format!("https://{}", s.addr()))
        .expect("endpoint")
        .tls_config(
            ClientTlsConfig::new()
                .domain_name(consensus_tls::node_name(*id))
                .ca_certificate(Certificate::from_pem(read(&ours.ca_cert)))
                .identity(Identity::from_pem(
                    read(&theirs.node_cert),
                    read(&theirs.node_key),
                )),
        )
        .expect("tls");
    let served = match endpoint.connect().await {
        Err(_) => false,
        Ok(channel) => KvClient::new(channel)
            .get(GetRequest { key: "k".into() })
            .await
            .is_ok(),
    };
    assert!(!served, "a client with another CA's certificate was served");

    // The client checks the server as strictly: a server whose certificate names another node
    // (a stale address), or a client that trusts another CA, gets no answer.
    let wrong = servers
        .iter()
        .map(|(i, _)| *i)
        .find(|i| i != id)
        .expect("another node");
    let answered = |c: Result<Client, String>| async move {
        match c {
            Err(_) => false,
            Ok(mut c) => c.get("k".into()).await.is_ok(),
        }
    };
    assert!(
        !answered(Client::connect(s.addr(), wrong, &tls, TIMEOUT).await).await,
        "a client dialing node {wrong} was answered by node {id}"
    );
    let foreign = TlsConfig::DevCerts {
        dir: other.path().join("certs"),
    };
    assert!(
        !answered(Client::connect(s.addr(), *id, &foreign, TIMEOUT).await).await,
        "a client of another CA was answered"
    );
    // The honest client still works on the same server.
    let mut c = Client::connect(s.addr(), *id, &tls, TIMEOUT)
        .await
        .expect("connect");
    assert_eq!(c.get("k".into()).await.expect("get"), Some("v2".into()));
}
