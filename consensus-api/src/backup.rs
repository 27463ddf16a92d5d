//! Backups of a state machine's image, and new clusters restored from them (like
//! `etcdctl snapshot save` / `snapshot restore`).
//!
//! - **Take**: [`Consensus::backup`](crate::Consensus::backup) confirms leadership with a quorum
//!   (a read barrier), captures a point-in-time view of the state machine between applies, and
//!   [`write()`] streams it into a backup file with a header saying what it holds (cluster, node,
//!   the last log index it reflects) and a trailer with its length and checksum.
//! - **Restore**: [`Backup::open`] checks a backup file whole (format, length, checksum) and
//!   [`restore_data_dir`] writes a new node's data dir from it: the engine's own durable state
//!   as if the new cluster had committed the image as a snapshot at the backup's index
//!   ([`Backend::seed`]), with the identity record of the new cluster. Run it for each initial
//!   member of the new cluster, with the same backup and members, then start them normally (no
//!   bootstrap: the directories have their identity). Nodes added later receive the image as a
//!   snapshot. The new cluster's log continues after the backup's index, so indexes a state
//!   machine recorded (offsets, epochs) keep growing.
//!
//! File layout (integers big-endian):
//!
//! ```text
//! "CNSBAK01"  u32 header length  header (codec-encoded BackupHeader)
//! image bytes (what the state machine's snapshot_to writes)
//! u64 image length  u32 CRC-32 of the image  "CNSBKEND"
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{codec, Backend, ConsensusError, NodeId, SnapshotView};

const MAGIC: &[u8; 8] = b"CNSBAK01";
const END: &[u8; 8] = b"CNSBKEND";
const TRAILER_BYTES: u64 = 8 + 4 + 8;
/// Largest header a backup may have (it holds a few names and numbers).
const MAX_HEADER_BYTES: u32 = 64 << 10;

/// What a backup file says about its image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupHeader {
    /// The cluster it was taken from.
    pub cluster_id: String,
    /// The node that wrote it.
    pub node_id: NodeId,
    /// The last log index the image reflects: every entry up to it is in the image, none after.
    pub index: u64,
    /// When it was taken (Unix milliseconds).
    pub created_unix_ms: u64,
}

/// A backup as [`write()`] reports it and [`Backup::open`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupInfo {
    /// The header.
    #[serde(flatten)]
    pub header: BackupHeader,
    /// Size of the image, in bytes.
    pub image_bytes: u64,
    /// CRC-32 (IEEE) of the image.
    pub crc32: u32,
}

fn bad(path: &Path, what: impl std::fmt::Display) -> ConsensusError {
    ConsensusError::InvalidRequest(format!("{} is not a usable backup: {what}", path.display()))
}

/// Counts and checksums what passes through to the inner writer.
struct Summing<W> {
    inner: W,
    bytes: u64,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for Summing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a backup of `view` to `sink` in the layout above. Blocking (the view writes the whole
/// state): run it off the async runtime. Returns what it wrote.
pub fn write(
    sink: &mut dyn Write,
    header: BackupHeader,
    view: Box<dyn SnapshotView>,
) -> Result<BackupInfo, ConsensusError> {
    let io_err = |e: io::Error| ConsensusError::Storage(format!("writing the backup: {e}"));
    let encoded = codec::encode(&header)?;
    let len = u32::try_from(encoded.len())
        .ok()
        .filter(|l| *l <= MAX_HEADER_BYTES)
        .ok_or_else(|| ConsensusError::InvalidRequest("backup header too large".into()))?;
    sink.write_all(MAGIC).map_err(io_err)?;
    sink.write_all(&len.to_be_bytes()).map_err(io_err)?;
    sink.write_all(&encoded).map_err(io_err)?;
    let mut summing = Summing {
        inner: &mut *sink,
        bytes: 0,
        crc: crc32fast::Hasher::new(),
    };
    view.write_to(&mut summing)
        .map_err(|e| ConsensusError::Internal(format!("state machine snapshot failed: {e}")))?;
    let (image_bytes, crc32) = (summing.bytes, summing.crc.finalize());
    sink.write_all(&image_bytes.to_be_bytes()).map_err(io_err)?;
    sink.write_all(&crc32.to_be_bytes()).map_err(io_err)?;
    sink.write_all(END).map_err(io_err)?;
    sink.flush().map_err(io_err)?;
    Ok(BackupInfo {
        header,
        image_bytes,
        crc32,
    })
}

/// Writes a backup of `view` into the file `path` durably: a temporary file beside it, fsync,
/// rename, fsync of the directory; an existing `path` is refused. Blocking.
pub fn write_file(
    path: &Path,
    header: BackupHeader,
    view: Box<dyn SnapshotView>,
) -> Result<BackupInfo, ConsensusError> {
    let io_err = |what: &str, p: &Path, e: io::Error| {
        ConsensusError::Storage(format!("{what} {}: {e}", p.display()))
    };
    if path.exists() {
        return Err(ConsensusError::InvalidRequest(format!(
            "{} exists: a backup never overwrites a file",
            path.display()
        )));
    }
    let tmp = sibling(path, ".partial");
    let file = File::create(&tmp).map_err(|e| io_err("create", &tmp, e))?;
    let mut out = BufWriter::new(file);
    let written = write(&mut out, header, view);
    let done = written.and_then(|info| {
        let file = out
            .into_inner()
            .map_err(|e| io_err("write", &tmp, e.into_error()))?;
        file.sync_all().map_err(|e| io_err("fsync", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err("rename", path, e))?;
        sync_parent(path)?;
        Ok(info)
    });
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

fn sync_parent(path: &Path) -> Result<(), ConsensusError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| ConsensusError::Storage(format!("fsync {}: {e}", parent.display())))
}

/// A backup file, checked whole: its format, the image's length and checksum.
#[derive(Debug)]
pub struct Backup {
    path: PathBuf,
    info: BackupInfo,
    image_offset: u64,
}

impl Backup {
    /// Opens and checks the backup at `path` (reads it once to the end). A file that is not a
    /// backup, is truncated, or whose image does not match its checksum: `InvalidRequest`
    /// naming what is wrong.
    pub fn open(path: &Path) -> Result<Self, ConsensusError> {
        let read_err = |e: io::Error| bad(path, format!("reading it: {e}"));
        let mut file = File::open(path).map_err(read_err)?;
        let size = file.metadata().map_err(read_err)?.len();
        let mut magic = [0u8; 8];
        file.read_exact(&mut magic)
            .map_err(|_| bad(path, "too short"))?;
        if &magic != MAGIC {
            return Err(bad(
                path,
                "it does not start with the backup magic (CNSBAK01)",
            ));
        }
        let mut len = [0u8; 4];
        file.read_exact(&mut len)
            .map_err(|_| bad(path, "too short"))?;
        let len = u32::from_be_bytes(len);
        if len > MAX_HEADER_BYTES {
            return Err(bad(path, format!("a header of {len} bytes is implausible")));
        }
        let mut encoded = vec![0u8; len as usize];
        file.read_exact(&mut encoded)
            .map_err(|_| bad(path, "truncated in its header"))?;
        let header: BackupHeader =
            codec::decode(&encoded).map_err(|e| bad(path, format!("its header: {e}")))?;
        let image_offset = 12 + u64::from(len);
        let image_bytes = size
            .checked_sub(image_offset + TRAILER_BYTES)
            .ok_or_else(|| bad(path, "truncated (no trailer)"))?;
        file.seek(SeekFrom::Start(image_offset + image_bytes))
            .map_err(read_err)?;
        let mut trailer = [0u8; TRAILER_BYTES as usize];
        file.read_exact(&mut trailer).map_err(read_err)?;
        let mut stated = [0u8; 8];
        stated.copy_from_slice(&trailer[..8]);
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&trailer[8..12]);
        if &trailer[12..] != END || u64::from_be_bytes(stated) != image_bytes {
            return Err(bad(
                path,
                "truncated or extended (the trailer does not match the file's length)",
            ));
        }
        let crc32 = u32::from_be_bytes(crc);
        file.seek(SeekFrom::Start(image_offset)).map_err(read_err)?;
        let mut hasher = crc32fast::Hasher::new();
        let mut reader = BufReader::new(file).take(image_bytes);
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = reader.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        if hasher.finalize() != crc32 {
            return Err(bad(path, "its image does not match its checksum (damaged)"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            info: BackupInfo {
                header,
                image_bytes,
                crc32,
            },
            image_offset,
        })
    }

    /// What the file holds.
    pub fn info(&self) -> &BackupInfo {
        &self.info
    }

    /// A reader over the image, from its start to its end.
    pub fn image(&self) -> Result<impl Read, ConsensusError> {
        let read_err = |e: io::Error| bad(&self.path, format!("reading it: {e}"));
        let mut file = File::open(&self.path).map_err(read_err)?;
        file.seek(SeekFrom::Start(self.image_offset))
            .map_err(read_err)?;
        Ok(BufReader::new(file).take(self.info.image_bytes))
    }
}

/// Writes the data dir `dir` of node `me` of a new cluster `cluster_id` whose voters are
/// `members` (id to transport address, `me` among them) from `backup`: the engine's durable
/// state ([`Backend::seed`], at the backup's index) and the identity record, so a plain start
/// (no bootstrap) serves the image. `dir` must not exist or be empty. A marker file
/// ([`RESTORING_FILE`](crate::data_dir::RESTORING_FILE)) is written first and removed last: a
/// node refuses to start on a directory whose restore was interrupted. Blocking. Returns the
/// backend's description of what it wrote.
pub fn restore_data_dir(
    backend: &dyn Backend,
    backup: &Backup,
    dir: &Path,
    cluster_id: &str,
    me: NodeId,
    members: &BTreeMap<NodeId, String>,
) -> Result<String, ConsensusError> {
    use crate::data_dir;
    if !members.contains_key(&me) {
        return Err(ConsensusError::InvalidRequest(format!(
            "node {me} must be one of the new cluster's members {:?}",
            members.keys().collect::<Vec<_>>()
        )));
    }
    if cluster_id.is_empty() || cluster_id.contains(['\n', '\r']) {
        return Err(ConsensusError::InvalidRequest(
            "the cluster id must be one non-empty line".into(),
        ));
    }
    if data_dir::read_identity(dir)?.is_some() || data_dir::has_other_entries(dir)? {
        return Err(ConsensusError::InvalidRequest(format!(
            "{} is not empty: a restore writes a new data dir and never touches an existing one",
            dir.display()
        )));
    }
    let marker = dir.join(data_dir::RESTORING_FILE);
    let io_err = |what: &str, p: &Path, e: io::Error| {
        ConsensusError::Storage(format!("{what} {}: {e}", p.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
    File::create(&marker)
        .and_then(|f| f.sync_all())
        .map_err(|e| io_err("create", &marker, e))?;
    let index = backup.info().header.index.max(1);
    let described = match backend.seed(dir, me, members, index, &mut backup.image()?) {
        Ok(d) => d,
        Err(e) => {
            if e.kind() == crate::ErrorKind::InvalidRequest {
                // Refused before writing anything.
                let _ = std::fs::remove_file(&marker);
            }
            return Err(e);
        }
    };
    data_dir::write_identity(dir, &data_dir::new_identity(cluster_id, me))?;
    std::fs::remove_file(&marker).map_err(|e| io_err("remove", &marker, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync", dir, e))?;
    Ok(described)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> BackupHeader {
        BackupHeader {
            cluster_id: "blue".into(),
            node_id: 2,
            index: 41,
            created_unix_ms: 7,
        }
    }

    #[test]
    fn a_backup_reads_back_and_damage_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("b.backup");
        let image: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let info =
            write_file(&path, header(), crate::serialized_view(image.clone())).expect("write");
        assert_eq!(info.image_bytes, image.len() as u64);
        let b = Backup::open(&path).expect("open");
        assert_eq!(b.info(), &info);
        let mut back = Vec::new();
        b.image()
            .expect("image")
            .read_to_end(&mut back)
            .expect("read");
        assert_eq!(back, image);
        assert!(write_file(&path, header(), crate::serialized_view(Vec::new())).is_err());

        let bytes = std::fs::read(&path).expect("read file");
        let damaged = dir.path().join("damaged");
        for (what, content) in [
            ("flipped", {
                let mut b = bytes.clone();
                b[100] ^= 1;
                b
            }),
            ("truncated", bytes[..bytes.len() - 1].to_vec()),
            ("short", bytes[..10].to_vec()),
            ("not a backup", b"hello world, this is not it".to_vec()),
        ] {
            std::fs::write(&damaged, content).expect("write");
            let err = Backup::open(&damaged).expect_err(what);
            assert_eq!(
                err.kind(),
                crate::ErrorKind::InvalidRequest,
                "{what}: {err}"
            );
        }
    }
}
