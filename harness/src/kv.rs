//! The state machine the scenarios replicate: a key-value map plus a hash of the applied
//! history, so two nodes with equal snapshots applied the same commands in the same order.

use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::Arc;

use consensus_api::{codec, SnapshotView, StateMachine};
use serde::{Deserialize, Serialize};

/// A command of the test state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Sets `key` to `value`; answers the previous value.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: String,
    },
    /// Appends `suffix` to `key`'s value; answers the new value.
    Append {
        /// The key.
        key: String,
        /// What to append.
        suffix: String,
    },
    /// Sets `key` to `new` only if its current value equals `expected` (`None`: the key is
    /// absent); answers [`KvResponse::Swapped`].
    Cas {
        /// The key.
        key: String,
        /// The value `key` must hold for the swap to happen.
        expected: Option<String>,
        /// The value to set.
        new: String,
    },
}

/// What a [`KvCommand`] answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResponse {
    /// The value before a `Put`.
    Previous(Option<String>),
    /// The value after an `Append`.
    Current(String),
    /// What a `Cas` did.
    Swapped {
        /// Whether the key held the expected value, so it now holds the new one.
        swapped: bool,
        /// The value after the command: the new value if swapped, else the unchanged one.
        current: Option<String>,
    },
}

/// A replicated key-value map.
///
/// The map sits behind an [`Arc`] and applies copy on write ([`Arc::make_mut`]), so a
/// [`snapshot_view`](StateMachine::snapshot_view) is one reference count: the node writes the
/// view's snapshot on another thread while applies go on (the first apply after a view is taken
/// copies the map once, and only while the view is still held).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvMachine {
    /// The data.
    pub data: Arc<BTreeMap<String, String>>,
    /// Count of applied commands.
    pub applied: u64,
    /// FNV-1a over `(index, command)` of every applied command, in order.
    pub history: u64,
    /// Log index of the last applied command.
    pub last_index: u64,
}

impl KvMachine {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<String> {
        self.data.get(key).cloned()
    }

    /// Bytes of keys and values held (what a snapshot carries, less framing).
    pub fn data_bytes(&self) -> usize {
        self.data.iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// How `other` differs from this state, in a few lines (`None`: equal). For assertion
    /// messages: a large state is not printed whole.
    pub fn difference(&self, other: &KvMachine) -> Option<String> {
        if self == other {
            return None;
        }
        let mut out = format!(
            "applied {} vs {}, last_index {} vs {}, history {:#x} vs {:#x}, {} vs {} keys ({} vs {} bytes)",
            self.applied,
            other.applied,
            self.last_index,
            other.last_index,
            self.history,
            other.history,
            self.data.len(),
            other.data.len(),
            self.data_bytes(),
            other.data_bytes(),
        );
        let differing = self
            .data
            .keys()
            .chain(other.data.keys())
            .find(|k| self.data.get(*k) != other.data.get(*k));
        if let Some(k) = differing {
            let show = |v: Option<&String>| match v {
                None => "absent".to_string(),
                Some(v) => format!(
                    "{} bytes starting {:?}",
                    v.len(),
                    v.chars().take(16).collect::<String>()
                ),
            };
            out.push_str(&format!(
                "; first differing key {k:?}: {} vs {}",
                show(self.data.get(k)),
                show(other.data.get(k))
            ));
        }
        Some(out)
    }

    fn header(&self) -> Header {
        Header {
            entries: self.data.len() as u64,
            applied: self.applied,
            history: self.history,
            last_index: self.last_index,
        }
    }
}

/// What a snapshot stream starts with, after [`MAGIC`].
#[derive(Serialize, Deserialize)]
struct Header {
    entries: u64,
    applied: u64,
    history: u64,
    last_index: u64,
}

/// The first bytes of a [`KvMachine`] snapshot: refuses a stream of anything else early.
const MAGIC: &[u8; 8] = b"kvsnap1\n";

/// Largest record a snapshot stream may announce; a longer length prefix means corruption.
const MAX_RECORD_BYTES: usize = codec::MAX_DECODE_BYTES;

/// Writes a snapshot: [`MAGIC`], then length-prefixed records (a `u32` little-endian length,
/// then the codec's bytes): one [`Header`], then one `(key, value)` per entry in key order.
/// Every record goes through [`codec`], so the stream follows the codec wherever it moves.
fn write_snapshot(
    header: &Header,
    data: &BTreeMap<String, String>,
    sink: &mut dyn Write,
) -> Result<(), String> {
    let mut out = BufWriter::new(sink);
    let io = |e: std::io::Error| format!("writing the kv snapshot: {e}");
    out.write_all(MAGIC).map_err(io)?;
    write_record(&mut out, header)?;
    for entry in data.iter() {
        write_record(&mut out, &entry)?;
    }
    out.flush().map_err(io)
}

fn write_record<T: Serialize>(out: &mut impl Write, value: &T) -> Result<(), String> {
    let bytes = codec::encode(value).map_err(|e| e.to_string())?;
    let len = u32::try_from(bytes.len()).map_err(|_| "a kv snapshot record over 4 GiB")?;
    out.write_all(&len.to_le_bytes())
        .and_then(|()| out.write_all(&bytes))
        .map_err(|e| format!("writing the kv snapshot: {e}"))
}

/// Reads what [`write_snapshot`] wrote, to the end of `source`.
fn read_snapshot(source: &mut dyn Read) -> Result<KvMachine, String> {
    let mut input = BufReader::new(source);
    let mut magic = [0u8; 8];
    input
        .read_exact(&mut magic)
        .map_err(|e| format!("reading the kv snapshot's magic: {e}"))?;
    if &magic != MAGIC {
        return Err(format!("not a kv snapshot (starts with {magic:?})"));
    }
    let header: Header =
        read_record(&mut input)?.ok_or("the kv snapshot ends before its header")?;
    let mut data = BTreeMap::new();
    for i in 0..header.entries {
        let (k, v): (String, String) = read_record(&mut input)?.ok_or_else(|| {
            format!(
                "the kv snapshot ends after {i} of its {} entries",
                header.entries
            )
        })?;
        data.insert(k, v);
    }
    if read_record::<(String, String)>(&mut input)?.is_some() {
        return Err(format!(
            "the kv snapshot has more than the {} entries its header announces",
            header.entries
        ));
    }
    Ok(KvMachine {
        data: Arc::new(data),
        applied: header.applied,
        history: header.history,
        last_index: header.last_index,
    })
}

/// The next record, or `None` at a clean end of the stream.
fn read_record<T: serde::de::DeserializeOwned>(input: &mut impl Read) -> Result<Option<T>, String> {
    let io = |e: std::io::Error| format!("reading the kv snapshot: {e}");
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < len.len() {
        match input.read(&mut len[got..]).map_err(io)? {
            0 if got == 0 => return Ok(None),
            0 => return Err("the kv snapshot ends inside a record length".into()),
            n => got += n,
        }
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_RECORD_BYTES {
        return Err(format!("a kv snapshot record claims {len} bytes"));
    }
    let mut bytes = vec![0u8; len];
    input.read_exact(&mut bytes).map_err(io)?;
    codec::decode(&bytes)
        .map(Some)
        .map_err(|e| format!("a kv snapshot record: {e}"))
}

/// A [`KvMachine`] as it was when [`snapshot_view`](StateMachine::snapshot_view) was called.
struct KvView {
    header: Header,
    data: Arc<BTreeMap<String, String>>,
}

impl SnapshotView for KvView {
    fn write_to(self: Box<Self>, sink: &mut dyn Write) -> Result<(), String> {
        crate::snapshot_hold::pause_if_held(self.data.get(crate::snapshot_hold::HOLD_KEY));
        write_snapshot(&self.header, &self.data, sink)
    }
}

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    if h == 0 {
        h = 0xcbf2_9ce4_8422_2325;
    }
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl StateMachine for KvMachine {
    type Command = KvCommand;
    type Response = KvResponse;

    fn apply(&mut self, index: u64, command: KvCommand) -> KvResponse {
        self.applied += 1;
        self.last_index = index;
        let mut bytes = index.to_le_bytes().to_vec();
        bytes.extend(codec::encode(&command).unwrap_or_default());
        self.history = fnv(self.history, &bytes);
        tracing::trace!(target: "kv_apply", "{:?} apply {index} {command:?}", std::thread::current().name());
        match command {
            KvCommand::Put { key, value } => {
                KvResponse::Previous(Arc::make_mut(&mut self.data).insert(key, value))
            }
            KvCommand::Append { key, suffix } => {
                let v = Arc::make_mut(&mut self.data).entry(key).or_default();
                v.push_str(&suffix);
                KvResponse::Current(v.clone())
            }
            KvCommand::Cas { key, expected, new } => {
                let swapped = self.data.get(&key) == expected.as_ref();
                if swapped {
                    Arc::make_mut(&mut self.data).insert(key, new.clone());
                    KvResponse::Swapped {
                        swapped,
                        current: Some(new),
                    }
                } else {
                    let current = self.data.get(&key).cloned();
                    KvResponse::Swapped { swapped, current }
                }
            }
        }
    }

    fn snapshot(&self) -> Result<Vec<u8>, String> {
        let mut bytes = Vec::new();
        self.snapshot_to(&mut bytes)?;
        Ok(bytes)
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.restore_from(&mut &snapshot[..])
    }

    fn snapshot_to(&self, sink: &mut dyn Write) -> Result<(), String> {
        write_snapshot(&self.header(), &self.data, sink)
    }

    fn restore_from(&mut self, source: &mut dyn Read) -> Result<(), String> {
        *self = read_snapshot(source)?;
        tracing::trace!(target: "kv_apply", "{:?} restore at {}", std::thread::current().name(), self.last_index);
        Ok(())
    }

    /// Built while the snapshot arrives (so the conformance runs install states built aside).
    fn restore_aside(source: &mut dyn Read) -> Result<Option<Self>, String> {
        read_snapshot(source).map(Some)
    }

    fn snapshot_view(&self) -> Option<Box<dyn SnapshotView>> {
        Some(Box::new(KvView {
            header: self.header(),
            data: self.data.clone(),
        }))
    }
}

/// A `Put` command.
pub fn put(key: impl Into<String>, value: impl Into<String>) -> KvCommand {
    KvCommand::Put {
        key: key.into(),
        value: value.into(),
    }
}

/// A `Cas` command: sets `key` to `new` if it holds `expected` (`None`: absent).
pub fn cas(key: impl Into<String>, expected: Option<&str>, new: impl Into<String>) -> KvCommand {
    KvCommand::Cas {
        key: key.into(),
        expected: expected.map(str::to_owned),
        new: new.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(m: &mut KvMachine, c: KvCommand) -> KvResponse {
        let index = m.last_index + 1;
        m.apply(index, c)
    }

    #[test]
    fn cas_swaps_only_when_the_expected_value_holds() {
        let mut m = KvMachine::default();
        let absent = apply(&mut m, cas("k", Some("a"), "b"));
        assert_eq!(
            absent,
            KvResponse::Swapped {
                swapped: false,
                current: None
            }
        );
        assert_eq!(m.get("k"), None);
        let created = apply(&mut m, cas("k", None, "a"));
        assert_eq!(
            created,
            KvResponse::Swapped {
                swapped: true,
                current: Some("a".into())
            }
        );
        let stale = apply(&mut m, cas("k", None, "x"));
        assert_eq!(
            stale,
            KvResponse::Swapped {
                swapped: false,
                current: Some("a".into())
            }
        );
        let swapped = apply(&mut m, cas("k", Some("a"), "b"));
        assert_eq!(
            swapped,
            KvResponse::Swapped {
                swapped: true,
                current: Some("b".into())
            }
        );
        assert_eq!(m.get("k").as_deref(), Some("b"));
        assert_eq!(m.applied, 4, "a failed CAS is still an applied command");
    }

    #[test]
    fn put_and_append_answer_as_before() {
        let mut m = KvMachine::default();
        assert_eq!(apply(&mut m, put("k", "a")), KvResponse::Previous(None));
        assert_eq!(
            apply(
                &mut m,
                KvCommand::Append {
                    key: "k".into(),
                    suffix: "b".into()
                }
            ),
            KvResponse::Current("ab".into())
        );
    }

    fn sample() -> KvMachine {
        let mut m = KvMachine::default();
        for i in 0..300 {
            apply(&mut m, put(format!("k{i:03}"), "v".repeat(i)));
        }
        apply(
            &mut m,
            KvCommand::Append {
                key: "k007".into(),
                suffix: "tail".into(),
            },
        );
        m
    }

    #[test]
    fn streamed_snapshot_restores_the_same_state() {
        let m = sample();
        let mut stream = Vec::new();
        m.snapshot_to(&mut stream).unwrap();
        let mut back = KvMachine::default();
        back.restore_from(&mut &stream[..]).unwrap();
        assert_eq!(back.difference(&m), None);
        assert_eq!(back, m);
        assert_eq!(
            m.snapshot().unwrap(),
            stream,
            "the one-buffer form is the stream"
        );
        let mut again = KvMachine::default();
        again.restore(&stream).unwrap();
        assert_eq!(again, m);
    }

    #[test]
    fn a_view_keeps_the_state_it_was_taken_at() {
        let mut m = sample();
        let at_view = m.clone();
        let view = m.snapshot_view().expect("the kv machine has a view");
        apply(&mut m, put("k000", "changed"));
        apply(&mut m, put("new", "key"));
        let mut stream = Vec::new();
        view.write_to(&mut stream).unwrap();
        let mut back = KvMachine::default();
        back.restore_from(&mut &stream[..]).unwrap();
        assert_eq!(
            back.difference(&at_view),
            None,
            "the view moved with applies"
        );
        assert_ne!(back, m);
        assert_eq!(m.get("k000").as_deref(), Some("changed"));
    }

    #[test]
    fn a_damaged_snapshot_is_refused_and_leaves_the_state() {
        let m = sample();
        let stream = m.snapshot().unwrap();
        let mut target = KvMachine::default();
        apply(&mut target, put("mine", "1"));
        let before = target.clone();
        for cut in [0, 4, 8, 12, stream.len() / 2, stream.len() - 1] {
            let err = target
                .restore(&stream[..cut])
                .expect_err("a truncated stream");
            assert!(!err.is_empty());
            assert_eq!(
                target, before,
                "a failed restore (cut at {cut}) changed the state"
            );
        }
        let mut longer = stream.clone();
        longer.extend_from_slice(&stream[8..]);
        assert!(target.restore(&longer).is_err(), "trailing records");
        assert!(target.restore(b"garbage!garbage!").is_err());
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(target.restore(&huge).is_err(), "an absurd record length");
    }

    #[test]
    fn difference_names_the_first_differing_key() {
        let a = sample();
        let mut b = a.clone();
        Arc::make_mut(&mut b.data).insert("k100".into(), "other".into());
        let d = a.difference(&b).expect("they differ");
        assert!(d.contains("\"k100\""), "{d}");
        assert_eq!(a.difference(&a.clone()), None);
    }
}

/// [`KvMachine`] with [`StateMachine::BATCHES`]: concurrent proposals on a node share log
/// entries (the commands of one entry are applied in order with the same index). For the
/// scenarios of the batching path; everything else is the plain machine's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchedKv(pub KvMachine);

impl StateMachine for BatchedKv {
    type Command = KvCommand;
    type Response = KvResponse;
    const BATCHES: bool = true;

    fn apply(&mut self, index: u64, command: KvCommand) -> KvResponse {
        self.0.apply(index, command)
    }
    fn snapshot(&self) -> Result<Vec<u8>, String> {
        self.0.snapshot()
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.0.restore(snapshot)
    }
    fn snapshot_to(&self, sink: &mut dyn Write) -> Result<(), String> {
        self.0.snapshot_to(sink)
    }
    fn restore_from(&mut self, source: &mut dyn Read) -> Result<(), String> {
        self.0.restore_from(source)
    }
    fn restore_aside(source: &mut dyn Read) -> Result<Option<Self>, String> {
        KvMachine::restore_aside(source).map(|built| built.map(BatchedKv))
    }
    fn snapshot_view(&self) -> Option<Box<dyn SnapshotView>> {
        self.0.snapshot_view()
    }
}
