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
}

/// What a [`KvCommand`] answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResponse {
    /// The value before a `Put`.
    Previous(Option<String>),
    /// The value after an `Append`.
    Current(String),
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
        match command {
            KvCommand::Put { key, value } => KvResponse::Previous(self.data.insert(key, value)),
            KvCommand::Append { key, suffix } => {
                let v = self.data.entry(key).or_default();
                v.push_str(&suffix);
                KvResponse::Current(v.clone())
            }
        }
    }

    fn snapshot(&self) -> Result<Vec<u8>, String> {
        codec::encode(self).map_err(|e| e.to_string())
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        *self = codec::decode(snapshot).map_err(|e| e.to_string())?;
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
