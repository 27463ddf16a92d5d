//! openraft's own storage conformance suite, run against our durable log and state machine.

use std::sync::Arc;

use backend_openraft::{LogStore, StateMachineStore, TypeConfig};
use consensus_api::{ByteStateMachine, ConsensusError};
use consensus_storage::Log;
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::StorageError;

/// A state machine that echoes commands and snapshots their concatenation.
#[derive(Default)]
struct Echo(parking_lot::Mutex<Vec<u8>>);

impl ByteStateMachine for Echo {
    fn apply(&self, _index: u64, command: &[u8]) -> Vec<u8> {
        self.0.lock().extend_from_slice(command);
        command.to_vec()
    }
    fn snapshot(&self) -> Result<Vec<u8>, ConsensusError> {
        Ok(self.0.lock().clone())
    }
    fn restore(&self, snapshot: &[u8]) -> Result<(), ConsensusError> {
        *self.0.lock() = snapshot.to_vec();
        Ok(())
    }
}

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = Log::open(dir.path()).expect("open log");
        let snaps = log.snapshot_store().expect("open snapshots");
        let sm = StateMachineStore::open(Arc::new(Echo::default()), snaps).expect("open sm");
        // A budget of a few entries, so the suite's bounded reads are bounded indeed.
        Ok((dir, LogStore::new(log, 64), sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_store_passes_the_openraft_storage_suite() {
    Suite::test_all(Builder)
        .await
        .expect("openraft storage suite");
}
