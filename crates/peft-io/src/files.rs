//! Reading and writing files safely: JSON with errors naming the file, atomic replacement.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use crate::error::{CheckpointError, Result};

/// Reads and parses a JSON file.
///
/// # Errors
/// I/O errors and malformed JSON, naming the file (and line and column).
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read(path).map_err(|e| CheckpointError::Io {
        path: path.into(),
        source: e,
    })?;
    serde_json::from_slice(&text).map_err(|e| CheckpointError::Json {
        path: path.into(),
        message: e.to_string(),
    })
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced and then
/// renamed, so a crash leaves either the old file or the new one, never a half-written one. The
/// temporary file is removed when writing or renaming fails, and its name is unique to the call
/// (process id and a process-wide counter), so concurrent saves of one path never share it.
///
/// # Errors
/// I/O errors, naming `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let call = COUNTER.fetch_add(1, Ordering::Relaxed);
    let temporary = path.with_file_name(format!(".{name}.tmp-{}-{call}", std::process::id()));
    let written = write_and_rename(&temporary, path, bytes);
    if written.is_err() {
        // A failed save leaves nothing behind (removing a file never created fails harmlessly).
        let _ = std::fs::remove_file(&temporary);
    }
    written.map_err(|e| CheckpointError::Io {
        path: path.into(),
        source: e,
    })?;
    if let Some(parent) = path.parent() {
        // Make the rename itself durable.
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

fn write_and_rename(temporary: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(temporary, path)
}
