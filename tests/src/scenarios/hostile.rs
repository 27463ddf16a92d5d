//! Hostile input from inside the cluster: a holder of a member's certificate (a compromised or
//! buggy node, a learner, a removed node) sends engine messages that would break the engine's
//! invariants. Each is refused before the engine sees it and counted; nothing changes, and the
//! cluster keeps serving.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use consensus_api::{channel, NodeConfig, Role, TlsConfig};
use tokio::time::Instant;

use super::{ELECTION, SETTLE};
use crate::kv::put;
use crate::{Cluster, Combo};

/// The hostile-input family, declared once: [`conformance_suite!`](crate::conformance_suite)
/// runs every scenario in it for each combination.
#[doc(hidden)]
#[macro_export]
macro_rules! __hostile_family {
    ($make:ident) => {
        $crate::__tests!($make, hostile;
            invariant_breaking_messages_from_a_member_are_refused
        );
    };
}

/// Undecodable engine frames every backend must refuse, whatever its wire format.
fn generic_frames(seed: u64) -> Vec<(&'static str, Bytes)> {
    let noise: Vec<u8> = (0..512u64)
        .map(|i| {
            (seed
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(i * 31)
                >> 7) as u8
        })
        .collect();
    vec![
        ("an empty engine frame", Bytes::new()),
        ("random bytes", Bytes::from(noise)),
        ("a frame of 0xff", Bytes::from(vec![0xff; 64])),
    ]
}

fn engine_frame(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 1);
    b.put_u8(channel::ENGINE);
    b.put_slice(payload);
    b.freeze()
}

/// Over the real transport, with the leader's own certificate, the leader's identity sends a
/// follower (and the follower's identity sends the leader) the backend's invariant-breaking
/// messages ([`Backend::hostile_frames`](consensus_api::Backend::hostile_frames): a commit
/// index beyond the log, entries out of order, another node named as leader or candidate) and
/// undecodable frames, as calls and as one-way frames. Each is refused and counted in
/// `refused_messages`; no node stops, the term and the leader stay, nothing is applied; then
/// the cluster commits new writes and every node holds the same state.
pub async fn invariant_breaking_messages_from_a_member_are_refused(combo: Combo) {
    let c = Cluster::start(
        &combo,
        "invariant_breaking_messages_from_a_member_are_refused",
        3,
    )
    .await;
    let leader = c.wait_leader(ELECTION).await;
    for i in 0..5 {
        c.on(leader, move |n| async move {
            n.propose(put(format!("k{i}"), "v")).await
        })
        .await
        .expect("write before");
    }
    let commit = c.statuses()[&leader].commit_index;
    c.wait_applied(&c.live(), commit, SETTLE).await;
    let follower = c.follower_of(leader);

    let mut sent = 0u64;
    for (from, to) in [(leader, follower), (follower, leader)] {
        let before = c.statuses();
        let st = &before[&to];
        // An impostor transport: a second process holding `from`'s certificate.
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = NodeConfig::new(from, c.cluster_id(), dir.path());
        cfg.transport.tls = TlsConfig::DevCerts {
            dir: c.root().join("certs"),
        };
        let impostor = combo.transport.bind(&cfg).await.expect("bind the impostor");
        impostor.set_peer(to, c.addr(to).to_string());
        let mut frames = if from == leader {
            combo.backend.hostile_frames(from, to, st)
        } else {
            Vec::new()
        };
        frames.extend(generic_frames(c.seed()));
        let refused_before = st.refused_messages;
        for (what, payload) in &frames {
            let frame = engine_frame(payload);
            // The answer is the engine's refusal (or a transport error); either way nothing may
            // have happened, which the checks below verify.
            let answer = impostor
                .call(to, frame.clone(), Duration::from_secs(5))
                .await;
            tracing::info!(from, to, what, "hostile call answered {answer:?}");
            let _ = impostor.send(to, frame);
        }
        // Every frame went twice (a call, a one-way frame); at least one of each pair counts.
        let want = refused_before + frames.len() as u64;
        let deadline = Instant::now() + SETTLE;
        loop {
            let now = c.statuses()[&to].refused_messages;
            if now >= want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {to} counted {} refusals of the {} hostile frames from {from}: {:?}",
                now - refused_before,
                frames.len(),
                frames.iter().map(|(w, _)| *w).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        impostor.shutdown().await;
        sent += frames.len() as u64;

        let after = c.statuses();
        for (id, s) in &after {
            let b = &before[id];
            assert!(s.stopped.is_none(), "node {id} stopped: {:?}", s.stopped);
            assert_ne!(s.role, Role::Shutdown, "node {id} shut down");
            assert_eq!(s.term, b.term, "node {id}: the term moved");
            assert_eq!(s.leader, Some(leader), "node {id}: the leader changed");
            assert_eq!(s.commit_index, b.commit_index, "node {id}: commit moved");
            assert_eq!(s.applied_index, b.applied_index, "node {id}: applied moved");
        }
    }
    assert!(sent > 0);

    // The cluster keeps serving, through the leader and through the follower.
    for (i, via) in [leader, follower, leader].into_iter().enumerate() {
        c.on(via, move |n| async move {
            n.propose(put(format!("after{i}"), "v")).await
        })
        .await
        .expect("write after");
    }
    let leader = c.wait_leader(ELECTION).await;
    let commit = c.statuses()[&leader].commit_index;
    c.wait_applied(&c.live(), commit, SETTLE).await;
    let reference = c.machine(leader);
    assert_eq!(reference.get("after2"), Some("v".into()));
    for id in c.live() {
        assert_eq!(c.machine(id), reference, "node {id} diverged");
    }
}
