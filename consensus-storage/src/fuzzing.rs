//! Entry points for fuzzing the decoders of bytes read from disk (`fuzz/` at the workspace root
//! holds the cargo-fuzz targets, and the conformance crate replays their corpus as ordinary
//! tests). Each takes arbitrary bytes and must return without panicking, whatever they are.

use std::path::Path;

use crate::fs::{FileSystem, OpenMode, SimFs};

/// `data` as a damaged log file: replaying it finds the valid prefix or refuses it with a clear
/// error.
pub fn log_replay(data: &[u8]) {
    let fs = SimFs::new(0);
    let path = Path::new("/fuzz/log.bin");
    if write(&fs, path, data).is_ok() {
        let _ = crate::log::replay(&fs, path);
    }
}

/// `data` as a stored snapshot file: loading it returns the snapshot or a clear error.
pub fn snapshot_file(data: &[u8]) {
    let fs = SimFs::new(0);
    let path = Path::new("/fuzz/snapshot.bin");
    if write(&fs, path, data).is_ok() {
        let _ = crate::snapshot::load(&fs, path);
    }
}

fn write(fs: &SimFs, path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs.create_dir_all(dir)?;
    }
    let f = fs.open(path, OpenMode::Create)?;
    f.write_all_at(data, 0)?;
    f.sync_all()
}
