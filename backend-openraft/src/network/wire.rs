//! What goes on the wire: the call path's [`Rpc`] and [`RpcReply`], the stream path's
//! [`StreamFrame`] with its tag, and [`CallError`], how a failed exchange is classified before it
//! becomes one openraft RPC's error.

use std::time::Duration;

use bytes::Bytes;
use consensus_api::{codec, NodeId, TransportError};
use openraft::errors::{NetworkError, RPCError, Timeout, Unreachable};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotMetaOf, VoteOf};
use openraft::RPCTypes;
use serde::de::{SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use crate::types::C;

/// First value of every stream frame: tells a replication frame from anything else that might
/// arrive one-way on the engine channel (and versions the stream protocol).
pub(crate) const STREAM_FRAME_TAG: u8 = 0x5A;

/// Most entries one inbound AppendEntries may carry. bincode decodes a blank entry from about 4
/// bytes of wire into an `Entry` of about 100 bytes, so without a cap a frame of them would
/// decode to ~25 times its size; with it, the entries add at most 2^17 x `size_of::<Entry>()`
/// (about 13 MiB) to what the frame's bytes decode to. The leader sends at most
/// `max_entries_per_message` (256 by default; start-up refuses more than this cap).
pub(crate) const MAX_ENTRIES_PER_MESSAGE: usize = 1 << 17;

/// An inbound AppendEntries, decoded with its entries capped at [`MAX_ENTRIES_PER_MESSAGE`]
/// (the fields of openraft's `AppendEntriesRequest` in its serde order).
#[derive(Deserialize)]
#[serde(bound = "")]
struct CappedAppend {
    vote: VoteOf<C>,
    prev_log_id: Option<LogIdOf<C>>,
    #[serde(deserialize_with = "capped_entries")]
    entries: Vec<EntryOf<C>>,
    leader_commit: Option<LogIdOf<C>>,
}

fn capped_entries<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<EntryOf<C>>, D::Error> {
    struct Capped;
    impl<'de> Visitor<'de> for Capped {
        type Value = Vec<EntryOf<C>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "at most {MAX_ENTRIES_PER_MESSAGE} log entries")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let claimed = seq.size_hint().unwrap_or(0);
            if claimed > MAX_ENTRIES_PER_MESSAGE {
                return Err(serde::de::Error::custom(format!(
                    "{claimed} entries in one message, more than {MAX_ENTRIES_PER_MESSAGE}"
                )));
            }
            let mut entries = Vec::with_capacity(claimed.min(1024));
            while let Some(e) = seq.next_element()? {
                if entries.len() == MAX_ENTRIES_PER_MESSAGE {
                    return Err(serde::de::Error::custom(format!(
                        "more than {MAX_ENTRIES_PER_MESSAGE} entries in one message"
                    )));
                }
                entries.push(e);
            }
            Ok(entries)
        }
    }
    d.deserialize_seq(Capped)
}

/// Decodes an AppendEntries through [`CappedAppend`]; encoding stays openraft's own.
fn capped_append<'de, D: Deserializer<'de>>(d: D) -> Result<AppendEntriesRequest<C>, D::Error> {
    let a = CappedAppend::deserialize(d)?;
    Ok(AppendEntriesRequest {
        vote: a.vote,
        prev_log_id: a.prev_log_id,
        entries: a.entries,
        leader_commit: a.leader_commit,
    })
}

/// One engine RPC on the wire (the call path).
#[derive(Serialize, Deserialize)]
pub(crate) enum Rpc {
    Append(#[serde(deserialize_with = "capped_append")] AppendEntriesRequest<C>),
    Vote(VoteRequest<C>),
    PreVote(VoteRequest<C>),
    /// Install the snapshot `meta`, whose file was streamed beforehand over the snapshot
    /// channel; `ticket` is its encoded [`consensus_storage::transfer::Ticket`].
    Snapshot {
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
        ticket: Vec<u8>,
    },
    TransferLeader(TransferLeaderRequest<C>),
}

/// The answer to an [`Rpc`]; on the wire it is a `Result<RpcReply, String>` whose `Err` carries
/// the receiver's failure as text.
#[derive(Serialize, Deserialize)]
pub(crate) enum RpcReply {
    Append(AppendEntriesResponse<C>),
    Vote(VoteResponse<C>),
    Snapshot(SnapshotResponse<C>),
    TransferLeader(TransferLeaderResponse<C>),
}

/// An openraft response type that one [`RpcReply`] variant carries, so that one generic call
/// helper can answer every RPC with its own type.
pub(crate) trait FromReply: Sized {
    /// The response, or `None` if `reply` is another RPC's answer.
    fn from_reply(reply: RpcReply) -> Option<Self>;
}

impl FromReply for AppendEntriesResponse<C> {
    fn from_reply(reply: RpcReply) -> Option<Self> {
        match reply {
            RpcReply::Append(r) => Some(r),
            _ => None,
        }
    }
}

impl FromReply for VoteResponse<C> {
    fn from_reply(reply: RpcReply) -> Option<Self> {
        match reply {
            RpcReply::Vote(r) => Some(r),
            _ => None,
        }
    }
}

impl FromReply for SnapshotResponse<C> {
    fn from_reply(reply: RpcReply) -> Option<Self> {
        match reply {
            RpcReply::Snapshot(r) => Some(r),
            _ => None,
        }
    }
}

impl FromReply for TransferLeaderResponse<C> {
    fn from_reply(reply: RpcReply) -> Option<Self> {
        match reply {
            RpcReply::TransferLeader(r) => Some(r),
            _ => None,
        }
    }
}

/// One frame of a replication stream, sent one-way (the stream path).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum StreamFrame {
    /// Leader to follower: opens stream `session` with its request 0, replacing the stream this
    /// leader had open on the follower. `reply_to` is the leader's address, for a follower whose
    /// transport does not know it yet.
    Open {
        session: u64,
        reply_to: Option<String>,
        #[serde(deserialize_with = "capped_append")]
        req: AppendEntriesRequest<C>,
    },
    /// Leader to follower: request `seq` (1, 2, ...) of stream `session`.
    Append {
        session: u64,
        seq: u64,
        #[serde(deserialize_with = "capped_append")]
        req: AppendEntriesRequest<C>,
    },
    /// Leader to follower: the leader dropped stream `session`.
    Close { session: u64 },
    /// Follower to leader: openraft's answer to request `seq` of `session`, or the text of the
    /// fatal error that stopped the follower's openraft.
    Reply {
        session: u64,
        seq: u64,
        result: Result<StreamAppendResult<C>, String>,
    },
    /// Follower to leader: the follower dropped stream `session` (a gap, a full queue, a stream it
    /// does not have).
    Reset { session: u64, reason: String },
}

/// A stream frame as it goes on the one-way path: the bincode `(STREAM_FRAME_TAG, frame)` pair.
pub(crate) fn encode_frame(frame: &StreamFrame) -> Result<Bytes, codec::CodecError> {
    codec::encode(&(STREAM_FRAME_TAG, frame)).map(Bytes::from)
}

/// The stream frame in `bytes`; an error if they are not one, or carry another tag.
pub(crate) fn decode_frame(bytes: &[u8]) -> Result<StreamFrame, String> {
    let (tag, frame): (u8, StreamFrame) = codec::decode(bytes).map_err(|e| e.to_string())?;
    if tag != STREAM_FRAME_TAG {
        return Err(format!("unknown one-way frame tag {tag:#04x}"));
    }
    Ok(frame)
}

/// A failed exchange with a peer, before it is typed for one openraft RPC.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CallError {
    Timeout(Duration),
    Unreachable(String),
    Network(String),
}

impl CallError {
    /// Classifies a transport failure: `Unreachable` (openraft backs off) when the peer cannot be
    /// reached at all, `Network` (openraft retries at once) otherwise.
    pub(crate) fn from_transport(e: TransportError) -> Self {
        match e {
            TransportError::Timeout(d) => CallError::Timeout(d),
            e @ (TransportError::Unreachable { .. }
            | TransportError::UnknownPeer(_)
            | TransportError::Closed
            | TransportError::Refused(_)) => CallError::Unreachable(e.to_string()),
            e => CallError::Network(e.to_string()),
        }
    }

    /// The error openraft expects from RPC `action` of node `me` to `target`.
    pub(crate) fn into_rpc(self, me: NodeId, target: NodeId, action: RPCTypes) -> RPCError<C> {
        match self {
            CallError::Timeout(timeout) => RPCError::Timeout(Timeout {
                action,
                id: me,
                target,
                timeout,
            }),
            CallError::Unreachable(m) => RPCError::Unreachable(Unreachable::from_string(m)),
            CallError::Network(m) => RPCError::Network(NetworkError::from_string(m)),
        }
    }
}

#[cfg(test)]
mod tests {
    use consensus_api::NodeConfig;
    use openraft::entry::RaftEntry;
    use openraft::type_config::alias::EntryOf;
    use openraft::{LogId, RaftLogReader, Vote};

    use super::*;
    use crate::types::Request;
    use crate::LogStore;

    /// What one replication read gives for a log of `sizes`-byte commands, as the frames that
    /// carry it: the stream's first frame (with the leader's address) and the heartbeat path's
    /// call. Sizes of the encoded frames, plus the channel tag the mux adds.
    async fn frames_for(config: &NodeConfig, sizes: &[usize]) -> (usize, Vec<usize>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = consensus_storage::Log::open(dir.path()).expect("open log");
        let mut store = LogStore::new(log.clone(), config.max_command_bytes() as u64);
        let last = sizes.len() as u64;
        let entries = sizes.iter().enumerate().map(|(i, n)| {
            let log_id = LogId::new_term_index(u64::MAX, i as u64 + 1);
            EntryOf::<C>::new_normal(log_id, Request(vec![0xff; *n]))
        });
        let entries: Vec<_> = entries
            .map(|e| consensus_storage::Entry {
                index: e.log_id.index,
                term: e.log_id.leader_id.term,
                data: Bytes::from(codec::encode(&e).expect("encode")),
            })
            .collect();
        log.append(entries, None).expect("append");
        let batch = store
            .limited_get_log_entries(1, last + 1)
            .await
            .expect("read");
        let req = AppendEntriesRequest {
            vote: Vote::new_committed(u64::MAX, u64::MAX),
            prev_log_id: Some(LogId::new_term_index(u64::MAX, 0)),
            leader_commit: Some(LogId::new_term_index(u64::MAX, last)),
            entries: batch,
        };
        let n = req.entries.len();
        let open = StreamFrame::Open {
            session: u64::MAX,
            reply_to: Some("[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".into()),
            req: req.clone(),
        };
        let call = codec::encode(&Rpc::Append(req)).expect("encode");
        let sizes = vec![
            encode_frame(&open).expect("encode").len() + 1,
            call.len() + 1,
        ];
        (n, sizes)
    }

    /// However many commands just under the size limit are due, one replication message carries
    /// a prefix that fits the frame limit, and always at least one entry.
    #[tokio::test]
    async fn a_replication_message_stays_within_the_frame_limit() {
        for frame in [1024, 5000, 64 << 10] {
            let mut config = NodeConfig::new(1, "c", "/unused");
            config.transport.max_frame_bytes = frame;
            let max = config.max_command_bytes();
            for sizes in [vec![max; 5], vec![max / 3; 10], vec![1; 3], vec![max, 1, 1]] {
                let (n, frames) = frames_for(&config, &sizes).await;
                assert!(n >= 1, "at least one entry");
                assert!(
                    frames.iter().all(|f| *f <= frame),
                    "limit {frame}, commands {:?}: frames of {frames:?} bytes",
                    &sizes[..n]
                );
            }
            let (n, _) = frames_for(&config, &[1; 3]).await;
            assert_eq!(n, 3, "small entries go together");
        }
    }

    #[test]
    fn stream_frames_round_trip_and_other_tags_are_refused() {
        let frame = StreamFrame::Reset {
            session: 7,
            reason: "r".into(),
        };
        let bytes = encode_frame(&frame).expect("encode");
        assert!(matches!(
            decode_frame(&bytes),
            Ok(StreamFrame::Reset { session: 7, .. })
        ));
        let foreign = codec::encode(&(STREAM_FRAME_TAG.wrapping_add(1), &frame)).expect("encode");
        assert!(decode_frame(&foreign).is_err());
        assert!(decode_frame(&[0xff; 16]).is_err());
    }

    #[test]
    fn a_peer_that_cannot_be_reached_is_unreachable_and_a_timeout_keeps_its_duration() {
        let d = Duration::from_millis(5);
        assert_eq!(
            CallError::from_transport(TransportError::Timeout(d)),
            CallError::Timeout(d)
        );
        assert!(matches!(
            CallError::from_transport(TransportError::UnknownPeer(3)),
            CallError::Unreachable(_)
        ));
        assert!(matches!(
            CallError::from_transport(TransportError::Closed),
            CallError::Unreachable(_)
        ));
        assert!(matches!(
            CallError::from_transport(TransportError::QueueFull(3)),
            CallError::Network(_)
        ));
        assert!(matches!(
            CallError::Timeout(d).into_rpc(1, 2, RPCTypes::Vote),
            RPCError::Timeout(Timeout { id: 1, target: 2, timeout, .. }) if timeout == d
        ));
    }

    fn blank_append(n: usize) -> AppendEntriesRequest<C> {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            leader_commit: None,
            entries: (1..=n as u64)
                .map(|i| EntryOf::<C>::new_blank(LogId::new_term_index(1, i)))
                .collect(),
        }
    }

    /// An AppendEntries with one entry more than the cap is refused on both paths, before it is
    /// whole in memory; one at the cap round-trips. Fails without `capped_append`.
    #[test]
    fn an_append_with_more_entries_than_the_cap_is_refused() {
        let at_cap = blank_append(MAX_ENTRIES_PER_MESSAGE);
        let over = blank_append(MAX_ENTRIES_PER_MESSAGE + 1);
        let bytes = codec::encode(&Rpc::Append(over.clone())).expect("encode");
        assert!(bytes.len() < 2 << 20, "{} bytes of wire", bytes.len());
        let err = codec::decode::<Rpc>(&bytes).err().expect("refused");
        assert!(err.to_string().contains("entries in one message"), "{err}");
        let frame = StreamFrame::Append {
            session: 1,
            seq: 1,
            req: over,
        };
        let err = decode_frame(&encode_frame(&frame).expect("encode")).expect_err("refused");
        assert!(err.contains("entries in one message"), "{err}");
        let bytes = codec::encode(&Rpc::Append(at_cap)).expect("encode");
        match codec::decode::<Rpc>(&bytes) {
            Ok(Rpc::Append(req)) => assert_eq!(req.entries.len(), MAX_ENTRIES_PER_MESSAGE),
            _ => panic!("an append at the cap does not round-trip"),
        }
    }
}
