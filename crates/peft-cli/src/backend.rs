//! The Burn backend the binary is built for: CPU (`ndarray`) by default, CUDA with `--features cuda`.

#[cfg(not(feature = "cuda"))]
/// The inference backend.
pub type Inference = burn::backend::NdArray<f32>;
#[cfg(feature = "cuda")]
/// The inference backend.
pub type Inference = burn::backend::Cuda<f32>;

/// The training backend.
#[allow(dead_code)]
pub type Training = burn::backend::Autodiff<Inference>;

/// The device to run on.
pub fn device() -> burn::tensor::Device<Inference> {
    Default::default()
}

/// A device named on the command line: `cuda:N` (or `N`) on the CUDA build; `cpu` on the CPU
/// build, where every replica shares the one CPU device (useful to check data-parallel
/// training without GPUs).
///
/// # Errors
/// A name this build has no device for.
pub fn parse_device(name: &str) -> Result<burn::tensor::Device<Inference>, String> {
    let name = name.trim();
    #[cfg(feature = "cuda")]
    {
        let index = name.strip_prefix("cuda:").unwrap_or(name);
        let index = index.parse::<usize>().map_err(|_| {
            format!(
                "device `{name}`: this build runs on CUDA; name devices `cuda:0`, `cuda:1`, ..."
            )
        })?;
        let count = <Inference as burn::tensor::backend::Backend>::device_count(0);
        if index >= count {
            return Err(format!(
                "device `{name}`: this machine has {count} CUDA device(s) (cuda:0 to cuda:{})",
                count.saturating_sub(1)
            ));
        }
        Ok(burn::backend::cuda::CudaDevice { index })
    }
    #[cfg(not(feature = "cuda"))]
    {
        if name == "cpu" || name == "cpu:0" {
            Ok(device())
        } else {
            Err(format!(
                "device `{name}`: this build runs on the CPU (name it `cpu`); build with \
                 `--features cuda` for `cuda:N`"
            ))
        }
    }
}

/// The devices of `--devices`, each parsed once ([`parse_device`]). A device named twice is
/// refused where devices are distinct (CUDA): two replicas on one GPU would only compete for it.
/// The CPU build has one device, which every replica shares.
pub fn parse_devices(names: &[String]) -> Result<Vec<burn::tensor::Device<Inference>>, String> {
    let mut devices = Vec::with_capacity(names.len());
    for name in names {
        let device = parse_device(name)?;
        if cfg!(feature = "cuda") && devices.contains(&device) {
            return Err(format!("--devices: `{name}` is named twice"));
        }
        devices.push(device);
    }
    Ok(devices)
}
