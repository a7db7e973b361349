//! Switches of the CUDA fast paths, as one typed value.
//!
//! The defaults are the fast paths. A program sets its own with [`set`] before the first CUDA
//! operation; without that, the `PEFT_*` environment variables (read once by [`get`]) override
//! the defaults, so a benchmark can be switched without recompiling:
//!
//! | field | variable | values |
//! | --- | --- | --- |
//! | [`OpsOptions::cublas`] | `PEFT_CUBLAS` | `0`: Burn's CUDA matmul instead of cuBLAS |
//! | [`OpsOptions::kernels`] | `PEFT_KERNELS` | `0`: the composed Burn chains instead of the NVRTC kernels |
//! | [`OpsOptions::cublas_stream`] | `PEFT_CUBLAS_STREAM` | `own`: cuBLAS on a stream of its own, ordered by events |
//! | [`OpsOptions::host_ordering`] | `PEFT_CUBLAS_SYNC` | `1`: order cuBLAS and CubeCL by synchronising the host |
//! | [`OpsOptions::launch`] | `PEFT_LAUNCH` | `queued` (default), `queued-flush`, `exclusive` |

use std::sync::OnceLock;

/// Which stream cuBLAS runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CublasStream {
    /// CubeCL's own stream, when it can be found: no cross-stream ordering at all.
    #[default]
    Shared,
    /// A stream of its own, ordered against CubeCL's with events.
    Own,
}

/// How work needing CubeCL's buffers reaches CubeCL's device thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Launch {
    /// Queued like CubeCL's own kernel launches; the calling thread goes on at once.
    #[default]
    Queued,
    /// Queued, then the device thread's queue is flushed.
    QueuedFlush,
    /// The calling thread waits until the device thread has run everything before, then the
    /// task.
    Exclusive,
}

/// The switches; [`Default`] is every fast path on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpsOptions {
    /// Products on cuBLAS (when the library loads).
    pub cublas: bool,
    /// The hand-written NVRTC kernels (they need cuBLAS's stream ordering).
    pub kernels: bool,
    /// Which stream cuBLAS runs on.
    pub cublas_stream: CublasStream,
    /// Order cuBLAS and CubeCL by host synchronisation instead of device events.
    pub host_ordering: bool,
    /// How work reaches CubeCL's device thread.
    pub launch: Launch,
}

impl Default for OpsOptions {
    fn default() -> Self {
        Self {
            cublas: true,
            kernels: true,
            cublas_stream: CublasStream::Shared,
            host_ordering: false,
            launch: Launch::Queued,
        }
    }
}

impl OpsOptions {
    /// The defaults with the overrides `var` gives (a lookup such as `std::env::var(..).ok()`);
    /// unknown values leave the default.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let mut options = Self::default();
        let is = |name: &str, value: &str| var(name).is_some_and(|v| v == value);
        if is("PEFT_CUBLAS", "0") {
            options.cublas = false;
        }
        if is("PEFT_KERNELS", "0") {
            options.kernels = false;
        }
        if is("PEFT_CUBLAS_STREAM", "own") {
            options.cublas_stream = CublasStream::Own;
        }
        if is("PEFT_CUBLAS_SYNC", "1") {
            options.host_ordering = true;
        }
        options.launch = match var("PEFT_LAUNCH").as_deref() {
            Some("exclusive") => Launch::Exclusive,
            Some("queued-flush") => Launch::QueuedFlush,
            _ => Launch::Queued,
        };
        options
    }

    /// The defaults with the process environment's `PEFT_*` overrides.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }
}

static OPTIONS: OnceLock<OpsOptions> = OnceLock::new();

/// Sets the switches for the whole process. Only the first setting counts, and only before the
/// first CUDA operation reads them.
///
/// # Errors
/// The switches already in force (set earlier, or read from the environment by a first use).
pub fn set(options: OpsOptions) -> Result<(), OpsOptions> {
    OPTIONS.set(options).map_err(|_| get())
}

/// The switches in force: those [`set`], else [`OpsOptions::from_env`] (read once).
pub fn get() -> OpsOptions {
    *OPTIONS.get_or_init(OpsOptions::from_env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_overrides_only_what_it_names() {
        let vars = [("PEFT_CUBLAS", "0"), ("PEFT_LAUNCH", "exclusive")];
        let options = OpsOptions::from_lookup(|name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        });
        assert_eq!(
            options,
            OpsOptions {
                cublas: false,
                launch: Launch::Exclusive,
                ..OpsOptions::default()
            }
        );
        assert_eq!(OpsOptions::from_lookup(|_| None), OpsOptions::default());
        // An unknown value leaves the default rather than guessing.
        let odd = OpsOptions::from_lookup(|name| (name == "PEFT_LAUNCH").then(|| "fast".into()));
        assert_eq!(odd.launch, Launch::Queued);
    }
}
