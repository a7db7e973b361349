//! Helpers shared by the `peft` command's integration tests.
#![allow(dead_code)] // each test binary uses some of the helpers

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The `peft` binary under test.
pub fn peft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_peft"))
}

/// A fresh, empty scratch folder for one test of this process.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("peft-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every file of `output/adapter` with its bytes, sorted by name.
pub fn adapter_bytes(output: &Path) -> Vec<(String, Vec<u8>)> {
    let dir = output.join("adapter");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// Fails the test, showing the command's stderr, unless it exited successfully.
#[track_caller]
pub fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
