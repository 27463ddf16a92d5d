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
use openraft::type_config::alias::{SnapshotMetaOf, VoteOf};
use openraft::RPCTypes;
use serde::{Deserialize, Serialize};

use crate::types::C;

/// First value of every stream frame: tells a replication frame from anything else that might
/// arrive one-way on the engine channel (and versions the stream protocol).
pub(crate) const STREAM_FRAME_TAG: u8 = 0x5A;

/// One engine RPC on the wire (the call path).
#[derive(Serialize, Deserialize)]
pub(crate) enum Rpc {
    Append(AppendEntriesRequest<C>),
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
        req: AppendEntriesRequest<C>,
    },
    /// Leader to follower: request `seq` (1, 2, ...) of stream `session`.
    Append {
        session: u64,
        seq: u64,
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
}
