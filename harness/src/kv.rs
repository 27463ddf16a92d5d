//! The state machine the scenarios replicate: a key-value map plus a hash of the applied
//! history, so two nodes with equal snapshots applied the same commands in the same order.

use std::collections::BTreeMap;

use consensus_api::{codec, StateMachine};
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvMachine {
    /// The data.
    pub data: BTreeMap<String, String>,
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
            KvCommand::Put { key, value } => KvResponse::Previous(self.data.insert(key, value)),
            KvCommand::Append { key, suffix } => {
                let v = self.data.entry(key).or_default();
                v.push_str(&suffix);
                KvResponse::Current(v.clone())
            }
            KvCommand::Cas { key, expected, new } => {
                let swapped = self.data.get(&key) == expected.as_ref();
                if swapped {
                    self.data.insert(key, new.clone());
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
        codec::encode(self).map_err(|e| e.to_string())
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        *self = codec::decode(snapshot).map_err(|e| e.to_string())?;
        tracing::trace!(target: "kv_apply", "{:?} restore at {}", std::thread::current().name(), self.last_index);
        Ok(())
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
}
