//! Scratch directories and files for tests, examples and tools: under the system temporary
//! directory, unique to the process and the call, removed (with everything in them) on drop.
//!
//! ```
//! let dir = peft_io::scratch::ScratchDir::new("example");
//! let file = dir.write("data.json", "[]");
//! assert_eq!(std::fs::read_to_string(&file).unwrap(), "[]");
//! let kept = dir.path().to_path_buf();
//! drop(dir);
//! assert!(!kept.exists());
//! ```

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A fresh, empty directory, removed on drop.
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `peft-{name}-{process}-{n}` under the system temporary directory.
    ///
    /// # Panics
    /// If the directory cannot be created (a scratch directory is for tests and tools).
    pub fn new(name: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("peft-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("scratch directory {}: {e}", path.display()));
        Self { path }
    }

    /// A scratch directory holding a copy of the files (not subdirectories) of `source`.
    ///
    /// # Panics
    /// If `source` cannot be read or a file cannot be copied.
    pub fn copy_of(source: &Path, name: &str) -> Self {
        let dir = Self::new(name);
        for entry in
            std::fs::read_dir(source).unwrap_or_else(|e| panic!("{}: {e}", source.display()))
        {
            let path = entry.expect("directory entry").path();
            if path.is_file() {
                let target = dir.join(path.file_name().expect("a file has a name"));
                std::fs::copy(&path, &target)
                    .unwrap_or_else(|e| panic!("copying {}: {e}", path.display()));
            }
        }
        dir
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to the file `name` in the directory and returns its path.
    ///
    /// # Panics
    /// If the file cannot be written.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("scratch file {}: {e}", path.display()));
        path
    }
}

impl Deref for ScratchDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for ScratchDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// One file in a scratch directory of its own, removed with it on drop.
#[derive(Debug)]
pub struct ScratchFile {
    path: PathBuf,
    _dir: ScratchDir,
}

impl ScratchFile {
    /// Writes `contents` to a file called `name` in a fresh scratch directory.
    ///
    /// # Panics
    /// If the directory or the file cannot be written.
    pub fn new(name: &str, contents: impl AsRef<[u8]>) -> Self {
        let dir = ScratchDir::new("file");
        let path = dir.write(name, contents);
        Self { path, _dir: dir }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Deref for ScratchFile {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for ScratchFile {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}
