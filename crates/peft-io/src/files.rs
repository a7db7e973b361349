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

/// Writes the files `files` (name, bytes) into the directory `dir` so that a crash at any
/// instant leaves either the directory as it was or with every new file, never a mix of an old
/// configuration and new weights. Files of `dir` not named in `files` are kept.
///
/// The new set is assembled in a sibling staging directory (the kept files hard-linked, or
/// copied where links are not possible), each file synced, then swapped in: on Linux with one
/// atomic exchange of the two directories (`renameat2(RENAME_EXCHANGE)`); elsewhere, or where
/// the file system refuses the exchange, by renaming the old directory aside and the new one
/// in (a crash between the two renames leaves the old set complete under
/// `.{name}.old-{pid}-{n}`). A directory holding subdirectories is not swapped (they could be
/// large or in use); its files are replaced one by one with [`write_atomic`].
///
/// Set `PEFT_WRITE_DELAY_MS` to pause that long before each step (crash tests).
///
/// # Errors
/// I/O errors, naming the path; the staging directory is removed on failure.
pub fn write_dir_atomic(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    write_dir_atomic_dropping(dir, files, &[])
}

/// [`write_dir_atomic`], leaving out of the new set the existing files named in `drop` (an
/// adapter of another format being replaced), so that they go in the same atomic step.
///
/// # Errors
/// See [`write_dir_atomic`].
pub fn write_dir_atomic_dropping(dir: &Path, files: &[(&str, &[u8])], drop: &[&str]) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io { path, source }
    };
    let pause = write_delay();
    if dir.is_dir() {
        let entries: Vec<std::fs::DirEntry> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .collect::<std::io::Result<_>>()
            .map_err(io(dir))?;
        if entries.iter().any(|e| e.path().is_dir()) {
            for (name, bytes) in files {
                pause();
                write_atomic(&dir.join(name), bytes)?;
            }
            for name in drop {
                match std::fs::remove_file(dir.join(name)) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io(&dir.join(name))(e))
                    }
                    _ => {}
                }
            }
            return Ok(());
        }
    }
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let call = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let tag = format!("{}-{call}", std::process::id());
    let staging = parent.join(format!(".{name}.tmp-{tag}"));
    let assembled = assemble(&staging, dir, files, drop, &pause);
    if let Err(e) = assembled {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(io(&staging)(e));
    }
    pause();
    let swapped = if dir.exists() {
        swap_in(
            &staging,
            dir,
            &parent.join(format!(".{name}.old-{tag}")),
            &pause,
        )
    } else {
        std::fs::rename(&staging, dir)
    };
    if let Err(e) = swapped {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(io(dir)(e));
    }
    if let Ok(handle) = std::fs::File::open(&parent) {
        let _ = handle.sync_all();
    }
    Ok(())
}

fn write_delay() -> impl Fn() {
    let millis = std::env::var("PEFT_WRITE_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    move || {
        if millis > 0 {
            std::thread::sleep(std::time::Duration::from_millis(millis));
        }
    }
}

/// The new directory in `staging`: `dir`'s files not in `files` or `drop`, then `files`, each
/// synced.
fn assemble(
    staging: &Path,
    dir: &Path,
    files: &[(&str, &[u8])],
    drop: &[&str],
    pause: &dyn Fn(),
) -> std::io::Result<()> {
    if staging.exists() {
        std::fs::remove_dir_all(staging)?;
    }
    std::fs::create_dir(staging)?;
    if dir.is_dir() {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let file_name = entry.file_name();
            let named = |n: &&str| std::ffi::OsStr::new(n) == file_name;
            if files.iter().map(|(n, _)| n).any(named) || drop.iter().any(named) {
                continue;
            }
            let target = staging.join(&file_name);
            if std::fs::hard_link(entry.path(), &target).is_err() {
                std::fs::copy(entry.path(), &target)?;
            }
        }
    }
    for (file_name, bytes) in files {
        pause();
        let mut file = std::fs::File::create(staging.join(file_name))?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    if let Ok(handle) = std::fs::File::open(staging) {
        let _ = handle.sync_all();
    }
    Ok(())
}

/// Puts `staging` at `dir` and removes the old directory.
fn swap_in(staging: &Path, dir: &Path, aside: &Path, pause: &dyn Fn()) -> std::io::Result<()> {
    if exchange(staging, dir).is_ok() {
        // `staging` now holds the old files.
        let _ = std::fs::remove_dir_all(staging);
        return Ok(());
    }
    std::fs::rename(dir, aside)?;
    pause();
    if let Err(e) = std::fs::rename(staging, dir) {
        // Put the old directory back.
        let _ = std::fs::rename(aside, dir);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(aside);
    Ok(())
}

/// Atomically exchanges two directories (Linux `renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths relative to the current directory; the call only
    // renames.
    let result = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "no atomic directory exchange on this platform",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_directory_is_replaced_whole_keeping_unrelated_files_and_leaving_no_staging() {
        let root = std::env::temp_dir().join(format!("peft-io-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("adapter");
        write_dir_atomic(&dir, &[("config.json", b"1"), ("weights", b"one")]).unwrap();
        std::fs::write(dir.join("README.md"), b"mine").unwrap();
        std::fs::write(dir.join("other_format.json"), b"old").unwrap();
        write_dir_atomic_dropping(
            &dir,
            &[("config.json", b"2"), ("weights", b"two")],
            &["other_format.json"],
        )
        .unwrap();
        assert_eq!(
            listing(&dir),
            [
                ("README.md".to_string(), b"mine".to_vec()),
                ("config.json".to_string(), b"2".to_vec()),
                ("weights".to_string(), b"two".to_vec()),
            ]
        );
        // Nothing but the directory itself is left beside it.
        let siblings: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(siblings, ["adapter"]);
        // A directory with a subdirectory keeps it: its files are replaced one by one.
        std::fs::create_dir(dir.join("extra")).unwrap();
        write_dir_atomic(&dir, &[("weights", b"three")]).unwrap();
        assert_eq!(std::fs::read(dir.join("weights")).unwrap(), b"three");
        assert!(dir.join("extra").is_dir());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
