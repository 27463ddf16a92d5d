//! The data directory's identity record: which cluster and node a directory belongs to, written
//! once, when a node first starts on it, by an explicit choice ([`NewDataDir`]).
//!
//! Without it, a node whose data directory was wiped would start again empty under its old id:
//! an initial member would bootstrap the cluster a second time, and any voter would have
//! forgotten its vote (it could vote twice in a term) while still counting toward quorums for
//! entries it no longer has. With it, [`Consensus::start`](crate::Consensus::start) refuses an
//! empty directory unless told to create the cluster ([`NewDataDir::Bootstrap`], once) or to
//! join one as a new member ([`NewDataDir::Join`]), and refuses a directory of another cluster
//! or node. The record is a small text file, `IDENTITY`:
//!
//! ```text
//! format=1
//! cluster_id=prod-metadata
//! node_id=3
//! incarnation=12413245114906573212
//! created_unix_ms=1764745200000
//! ```

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::{ConsensusError, NodeConfig, NodeId};

/// The identity record's file name, in the data directory.
pub const IDENTITY_FILE: &str = "IDENTITY";

/// What a node does with a data directory that has no identity record (a new or wiped one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NewDataDir {
    /// Refuse to start (the default, for every start after the first): a node whose directory
    /// is empty has lost it, and must be replaced under a new id rather than restarted empty.
    #[default]
    Refuse,
    /// Create the cluster: the first start of an initial member. Records the identity, then the
    /// engine bootstraps from [`NodeConfig::initial_members`], which must include this node.
    /// Use it once; on a directory that has an identity it changes nothing.
    Bootstrap,
    /// Join an existing cluster as a new member: records the identity and starts without any
    /// membership ([`NodeConfig::initial_members`] is not used to bootstrap); the node waits
    /// until the leader adds it as a learner.
    Join,
}

/// The marker a restore from a backup ([`crate::backup::restore_data_dir`]) keeps in a data
/// directory until it is complete: a node refuses to start on a directory that has it.
pub const RESTORING_FILE: &str = "RESTORING";

/// A data directory's identity record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDirIdentity {
    /// The cluster the directory belongs to.
    pub cluster_id: String,
    /// The node that owns it.
    pub node_id: NodeId,
    /// Random, chosen when the record was written: tells this directory apart from an earlier
    /// one of the same node.
    pub incarnation: u64,
    /// When the record was written (Unix milliseconds).
    pub created_unix_ms: u64,
}

impl DataDirIdentity {
    fn encode(&self) -> String {
        format!(
            "format=1\ncluster_id={}\nnode_id={}\nincarnation={}\ncreated_unix_ms={}\n",
            self.cluster_id, self.node_id, self.incarnation, self.created_unix_ms
        )
    }

    fn decode(text: &str, path: &Path) -> Result<Self, ConsensusError> {
        let bad = |what: &str| {
            ConsensusError::Storage(format!(
                "{}: {what}; the file records which cluster and node the directory belongs \
                 to: restore it, or remove the node and add it under a new id",
                path.display()
            ))
        };
        let mut fields = std::collections::BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| bad("a line is not key=value"))?;
            fields.insert(k.trim(), v.trim());
        }
        if fields.get("format") != Some(&"1") {
            return Err(bad("unknown format (expected format=1)"));
        }
        let num = |k: &str| -> Result<u64, ConsensusError> {
            fields
                .get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(&format!("{k} is missing or not a number")))
        };
        Ok(Self {
            cluster_id: fields
                .get("cluster_id")
                .filter(|c| !c.is_empty())
                .ok_or_else(|| bad("cluster_id is missing"))?
                .to_string(),
            node_id: num("node_id")?,
            incarnation: num("incarnation")?,
            created_unix_ms: num("created_unix_ms")?,
        })
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> ConsensusError {
    ConsensusError::Storage(format!("{what} {}: {e}", path.display()))
}

/// Reads the identity record of data directory `dir`; `None` when it has none.
pub fn read_identity(dir: &Path) -> Result<Option<DataDirIdentity>, ConsensusError> {
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => DataDirIdentity::decode(&text, &path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", &path, e)),
    }
}

/// Writes `identity` into `dir` atomically and durably (temporary file, fsync, rename, fsync
/// of the directory).
pub(crate) fn write_identity(dir: &Path, identity: &DataDirIdentity) -> Result<(), ConsensusError> {
    std::fs::create_dir_all(dir).map_err(|e| io("create", dir, e))?;
    let path = dir.join(IDENTITY_FILE);
    let tmp: PathBuf = dir.join(format!("{IDENTITY_FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io("create", &tmp, e))?;
        f.write_all(identity.encode().as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| io("write", &tmp, e))?;
    }
    std::fs::rename(&tmp, &path).map_err(|e| io("rename", &path, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("fsync", dir, e))
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A new identity record for node `node_id` of `cluster_id`, with a random incarnation.
pub(crate) fn new_identity(cluster_id: &str, node_id: NodeId) -> DataDirIdentity {
    DataDirIdentity {
        cluster_id: cluster_id.to_string(),
        node_id,
        incarnation: RandomState::new().build_hasher().finish(),
        created_unix_ms: now_unix_ms(),
    }
}

/// Whether `dir` holds anything but an identity record (a directory used before identity
/// records existed).
pub(crate) fn has_other_entries(dir: &Path) -> Result<bool, ConsensusError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let e = e.map_err(|e| io("list", dir, e))?;
                if !e.file_name().to_string_lossy().starts_with(IDENTITY_FILE) {
                    return Ok(true);
                }
            }
            Ok(false)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io("list", dir, e)),
    }
}

/// Checks `config`'s data directory before the engine opens it, recording its identity on a
/// first start as `config.new_data_dir` allows; returns the configuration to start the engine
/// with (without initial members when joining).
pub(crate) fn prepare(config: &NodeConfig) -> Result<NodeConfig, ConsensusError> {
    let dir = &config.data_dir;
    if config.cluster_id.contains(['\n', '\r']) {
        return Err(ConsensusError::InvalidRequest(
            "config: cluster_id must be one line".into(),
        ));
    }
    if dir.join(RESTORING_FILE).exists() {
        return Err(ConsensusError::InvalidRequest(format!(
            "data dir {} holds an interrupted restore from a backup ({RESTORING_FILE} is \
             there): remove the directory and run the restore again",
            dir.display()
        )));
    }
    if let Some(found) = read_identity(dir)? {
        if found.cluster_id != config.cluster_id {
            return Err(ConsensusError::InvalidRequest(format!(
                "data dir {} belongs to cluster {:?}, not {:?}: point this node at its own data \
                 dir, or fix --cluster-id",
                dir.display(),
                found.cluster_id,
                config.cluster_id
            )));
        }
        if found.node_id != config.id {
            return Err(ConsensusError::InvalidRequest(format!(
                "data dir {} belongs to node {}, not node {}",
                dir.display(),
                found.node_id,
                config.id
            )));
        }
        return Ok(config.clone());
    }
    let identity = new_identity(&config.cluster_id, config.id);
    if has_other_entries(dir)? {
        // Written before identity records existed: adopt it as it is.
        tracing::warn!(
            id = config.id,
            dir = %dir.display(),
            "data dir has no identity record; recording one (cluster {:?})",
            config.cluster_id
        );
        write_identity(dir, &identity)?;
        return Ok(config.clone());
    }
    match config.new_data_dir {
        NewDataDir::Refuse => Err(ConsensusError::InvalidRequest(format!(
            "data dir {} is empty, and this node was not told to create or join a cluster. \
             First start of an initial member: create the cluster (NewDataDir::Bootstrap, \
             `broker serve --bootstrap`, once); a new node: join (NewDataDir::Join, `--join`). \
             If node {} lost its data dir, do not restart it empty under its id (it would \
             forget its vote and count toward quorums for entries it no longer has): replace \
             it under a new id (`broker cluster replace`)",
            dir.display(),
            config.id
        ))),
        NewDataDir::Bootstrap => {
            if !config.initial_members.contains_key(&config.id) {
                return Err(ConsensusError::InvalidRequest(format!(
                    "config: creating the cluster needs initial_members that include node {}",
                    config.id
                )));
            }
            write_identity(dir, &identity)?;
            tracing::info!(id = config.id, dir = %dir.display(), incarnation = identity.incarnation, "data dir recorded: creating the cluster");
            Ok(config.clone())
        }
        NewDataDir::Join => {
            write_identity(dir, &identity)?;
            tracing::info!(id = config.id, dir = %dir.display(), incarnation = identity.incarnation, "data dir recorded: joining as a new member");
            let mut joining = config.clone();
            joining.initial_members.clear();
            Ok(joining)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, mode: NewDataDir) -> NodeConfig {
        let mut c = NodeConfig::new(2, "blue", dir);
        c.initial_members = [(1, "a:1".to_string()), (2, "b:1".to_string())].into();
        c.new_data_dir = mode;
        c
    }

    #[test]
    fn an_empty_dir_is_refused_unless_told_to_bootstrap_or_join() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().join("node");
        let err = prepare(&config(&d, NewDataDir::Refuse)).expect_err("empty");
        assert!(err.to_string().contains("replace"), "{err}");
        assert!(!d.join(IDENTITY_FILE).exists(), "a refusal writes nothing");
        let started = prepare(&config(&d, NewDataDir::Bootstrap)).expect("bootstrap");
        assert_eq!(started.initial_members.len(), 2);
        let id = read_identity(&d).expect("read").expect("recorded");
        assert_eq!((id.cluster_id.as_str(), id.node_id), ("blue", 2));
        // Later starts need no choice, and keep the identity.
        prepare(&config(&d, NewDataDir::Refuse)).expect("restart");
        assert_eq!(read_identity(&d).expect("read"), Some(id));
    }

    #[test]
    fn joining_starts_without_initial_members_and_bootstrap_needs_this_node_in_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let joined = prepare(&config(&dir.path().join("j"), NewDataDir::Join)).expect("join");
        assert!(joined.initial_members.is_empty());
        let mut c = config(&dir.path().join("b"), NewDataDir::Bootstrap);
        c.initial_members.remove(&2);
        assert_eq!(
            prepare(&c).expect_err("not an initial member").kind(),
            crate::ErrorKind::InvalidRequest
        );
    }

    #[test]
    fn another_clusters_or_nodes_dir_and_a_damaged_record_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        prepare(&config(d, NewDataDir::Bootstrap)).expect("bootstrap");
        let mut other = config(d, NewDataDir::Bootstrap);
        other.cluster_id = "green".into();
        assert!(prepare(&other)
            .expect_err("cluster")
            .to_string()
            .contains("blue"));
        let mut node = config(d, NewDataDir::Bootstrap);
        node.id = 1;
        assert!(prepare(&node)
            .expect_err("node")
            .to_string()
            .contains("node 2"));
        std::fs::write(d.join(IDENTITY_FILE), "format=1\nnode_id=x\n").expect("damage");
        assert_eq!(
            prepare(&config(d, NewDataDir::Refuse))
                .expect_err("damaged")
                .kind(),
            crate::ErrorKind::Storage
        );
    }

    #[test]
    fn a_dir_with_an_interrupted_restore_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(RESTORING_FILE), b"").expect("marker");
        for mode in [NewDataDir::Refuse, NewDataDir::Bootstrap, NewDataDir::Join] {
            let e = prepare(&config(dir.path(), mode)).expect_err("interrupted restore");
            assert!(e.to_string().contains("interrupted restore"), "{e}");
        }
        assert!(read_identity(dir.path()).expect("read").is_none());
    }

    #[test]
    fn a_dir_used_before_identity_records_is_adopted() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("log"), b"records").expect("old data");
        prepare(&config(dir.path(), NewDataDir::Refuse)).expect("adopted");
        assert!(read_identity(dir.path()).expect("read").is_some());
    }
}
