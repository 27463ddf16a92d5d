//! Entry points for fuzzing this backend's decoding of peer bytes (`fuzz/` at the workspace root
//! holds the cargo-fuzz targets, and the conformance crate replays their corpus as ordinary
//! tests). Each takes arbitrary bytes and must return without panicking.

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Message, MessageType};
use raft::storage::MemStorage;
use raft::{Config, RawNode};

/// `data` as a raft-rs message from a peer, the way the driver receives it: decoded (the whole
/// engine frame, tag included, as the driver decodes it), checked by the guard, and
/// when the guard passes it, stepped into a raft-rs follower (node 1 of voters 1-3, term 2,
/// entries 1-5, commit 3, following node 2). raft-rs must not panic on anything the guard lets
/// through.
pub fn raft_message(data: &[u8]) {
    let Ok(mut m) = Message::parse_from_carllerche_bytes(&Bytes::copy_from_slice(data)) else {
        return;
    };
    let Some(mut raw) = follower() else { return };
    // The transport authenticated the sender as a peer, and the driver checks the ids.
    (m.from, m.to) = (2 + m.from % 2, 1);
    if crate::node::guard::check(&raw.raft, &m).is_ok() {
        let _ = raw.step(m);
        if raw.has_ready() {
            let _ = raw.ready();
        }
    }
}

/// Node 1 following node 2 in term 2 over a consistent in-memory log.
fn follower() -> Option<RawNode<MemStorage>> {
    let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
    let entries: Vec<Entry> = (1..=5)
        .map(|index| Entry {
            index,
            term: if index < 3 { 1 } else { 2 },
            ..Default::default()
        })
        .collect();
    {
        let mut w = storage.wl();
        w.append(&entries).ok()?;
        w.set_hardstate(HardState {
            term: 2,
            vote: 2,
            commit: 3,
            ..Default::default()
        });
    }
    let cfg = Config {
        id: 1,
        pre_vote: true,
        check_quorum: true,
        ..Default::default()
    };
    let logger = slog::Logger::root(slog::Discard, slog::o!());
    let mut raw = RawNode::new(&cfg, storage, &logger).ok()?;
    let mut hb = Message::default();
    hb.set_msg_type(MessageType::MsgHeartbeat);
    (hb.from, hb.to, hb.term, hb.commit) = (2, 1, 2, 3);
    raw.step(hb).ok()?;
    Some(raw)
}
