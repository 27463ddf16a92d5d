//! A test hook that holds snapshot builds in the middle: while a [`SnapshotHold`] is in force,
//! every snapshot written from a view of a [`KvMachine`](crate::kv::KvMachine) whose state
//! names it ([`HOLD_KEY`]) waits at the start of its write until the hold is released. A
//! scenario uses it to act while a build is known to be under way (applies go on, other
//! requests arrive), which no timing can arrange reliably.
//!
//! Holds live in this process and are found by name, so scenarios running side by side in one
//! test binary never hold each other's builds; a name no hold is registered under holds
//! nothing (a node restored from such a state later, for one).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::kv::{put, KvCommand};

/// The key whose value names the hold a machine's snapshot views wait on.
pub const HOLD_KEY: &str = "__snapshot_hold__";

/// The longest a held write waits: a scenario that panics before releasing its hold cannot
/// wedge a node's snapshot thread for good.
const MAX_HOLD: Duration = Duration::from_secs(60);

/// How often [`SnapshotHold::wait_held`] looks.
const POLL: Duration = Duration::from_millis(5);

#[derive(Default)]
struct State {
    released: bool,
    /// Writes that reached the hold so far.
    reached: usize,
}

#[derive(Default)]
struct Hold {
    state: Mutex<State>,
    changed: Condvar,
}

impl Hold {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

static HOLDS: LazyLock<Mutex<HashMap<String, Arc<Hold>>>> = LazyLock::new(Default::default);

fn holds() -> MutexGuard<'static, HashMap<String, Arc<Hold>>> {
    HOLDS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A hold on snapshot writes, in force from [`new`](Self::new) until [`release`](Self::release)
/// or drop. Put [`command`](Self::command) in a cluster's state to make its snapshot views
/// wait on it.
pub struct SnapshotHold {
    name: String,
    hold: Arc<Hold>,
}

impl SnapshotHold {
    /// Registers a hold under `name`, which must be unique in the process (a test's data
    /// directory, for one); an earlier hold of the same name is released and replaced.
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        let hold = Arc::new(Hold::default());
        if let Some(old) = holds().insert(name.clone(), hold.clone()) {
            release(&old);
        }
        SnapshotHold { name, hold }
    }

    /// The command that puts this hold in a machine's state ([`HOLD_KEY`] = the name).
    pub fn command(&self) -> KvCommand {
        put(HOLD_KEY, self.name.clone())
    }

    /// The hold's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many snapshot writes reached the hold so far (held now or released since).
    pub fn reached(&self) -> usize {
        self.hold.lock().reached
    }

    /// Waits until at least `n` writes reached the hold, for at most `within`.
    pub async fn wait_held(&self, n: usize, within: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let reached = self.reached();
            if reached >= n {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "{reached} of {n} snapshot writes reached hold {} within {within:?}",
                    self.name
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Lets every held write go on, and every later one pass.
    pub fn release(&self) {
        release(&self.hold);
    }
}

impl Drop for SnapshotHold {
    fn drop(&mut self) {
        self.release();
        let mut all = holds();
        if all
            .get(&self.name)
            .is_some_and(|h| Arc::ptr_eq(h, &self.hold))
        {
            all.remove(&self.name);
        }
    }
}

fn release(hold: &Hold) {
    hold.lock().released = true;
    hold.changed.notify_all();
}

/// Called by a snapshot view's write with its state's [`HOLD_KEY`] value: waits while the hold
/// of that name is in force (at most [`MAX_HOLD`]).
pub(crate) fn pause_if_held(name: Option<&String>) {
    let Some(hold) = name.and_then(|n| holds().get(n).cloned()) else {
        return;
    };
    let mut state = hold.lock();
    state.reached += 1;
    let deadline = Instant::now() + MAX_HOLD;
    while !state.released {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tracing::warn!("a snapshot write held for {MAX_HOLD:?} goes on unreleased");
            break;
        }
        state = match hold.changed.wait_timeout(state, left) {
            Ok((s, _)) => s,
            Err(e) => e.into_inner().0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_write_waits_for_the_release_and_unknown_names_pass() {
        pause_if_held(None);
        pause_if_held(Some(&"no such hold".to_string()));
        let hold = SnapshotHold::new("snapshot_hold::tests::held");
        let name = hold.name().to_string();
        let writer = std::thread::spawn(move || pause_if_held(Some(&name)));
        hold.wait_held(1, Duration::from_secs(10)).await.unwrap();
        assert!(!writer.is_finished(), "the write went on while held");
        hold.release();
        writer.join().unwrap();
        assert!(hold.wait_held(2, Duration::from_millis(20)).await.is_err());
    }
}
