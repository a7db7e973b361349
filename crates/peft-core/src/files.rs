//! Reading and writing files safely: JSON with errors naming the file, atomic replacement.

use std::io::Write;
use std::path::Path;

use serde_json::Value;

use crate::error::{PeftError, Result};

/// Reads and parses a JSON file.
///
/// # Errors
/// I/O errors and malformed JSON, naming the file (and line and column).
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read(path).map_err(|e| PeftError::Io { path: path.into(), source: e })?;
    serde_json::from_slice(&text)
        .map_err(|e| PeftError::Format { path: path.into(), message: format!("malformed JSON: {e}") })
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced and then
/// renamed, so a crash leaves either the old file or the new one, never a half-written one.
///
/// # Errors
/// I/O errors.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |e| PeftError::Io { path: path.into(), source: e };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let mut file = std::fs::File::create(&temporary).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(io)?;
    if let Some(parent) = path.parent() {
        // Make the rename itself durable.
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}
