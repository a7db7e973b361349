//! Hand-written CUDA kernels for the blocks of [`crate::blocks`]: the attention softmax (with
//! its scale and mask), RMSNorm, SwiGLU and the rotary embedding, forward and backward.
//!
//! Written as Burn operations, each of these blocks is a chain of 5 to 15 kernels (casts,
//! reductions, element-wise steps), and on CUDA each operation also costs the host 20–40 µs
//! of bookkeeping: a training step of LLaMA-7B ran about 6,000 of them, and its host time
//! alone was longer than PyTorch's whole step. Here each block is one kernel forward and one
//! backward (`kernels.cu`), compiled at run time with NVRTC (loaded dynamically through
//! cudarc, like CubeCL's own kernels) once per device and dtype, and launched on CubeCL's
//! stream, ordered the way cuBLAS products are (`cublas.rs`). Under Burn's kernel fusion each
//! launch is a custom operation of the fusion stream.
//!
//! The kernels compute in f32 and round to the model's dtype where Hugging Face's PyTorch code
//! does; `tests/blocks.rs` compares them with the chains of Burn operations they replace.
//! Every function here returns `None` (the caller then runs Burn's operations) when the
//! backend is not Burn's CUDA backend, when the dtypes or shapes are not ones the kernels take,
//! when cuBLAS is off (the ordering needs its stream), or when `PEFT_KERNELS=0`.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Mutex, OnceLock};

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl::cuda::CudaDevice;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::FusionRuntime;
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cudarc::driver::result as driver;
use cudarc::driver::sys::{CUdevice_attribute, CUfunction};
use cudarc::nvrtc::result as nvrtc;

use crate::cublas::{self, BlasBackend, Cube, Fused, FusedRuntime, Prim};
use crate::dispatch::{cast, is, Kernel};

/// The kernels' source.
const SOURCE: &str = include_str!("kernels.cu");

/// Whether the kernels run: cuBLAS's stream ordering is available and
/// [`crate::options::OpsOptions::kernels`] is on (`PEFT_KERNELS` is not `0`).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| crate::options::get().kernels && cublas::enabled())
}

/// Shapes and dtypes of a kernel's tensors.
type Meta = (Vec<usize>, DType);

impl Kernel {
    /// The kernel's function in `kernels.cu`.
    fn name(self) -> &'static str {
        match self {
            Self::SoftmaxForward { .. } => "softmax_fwd",
            Self::SoftmaxBackward { .. } => "softmax_bwd",
            Self::RmsNormForward { .. } => "rms_fwd",
            Self::RmsNormBackward => "rms_bwd",
            Self::SwigluForward => "swiglu_fwd",
            Self::SwigluBackward => "swiglu_bwd",
            Self::RopeForward => "rope_fwd",
            Self::RopeBackward => "rope_bwd",
        }
    }

    /// The outputs for inputs `inputs`, or `None` when the kernel does not take them.
    fn outputs(self, inputs: &[Meta]) -> Option<Vec<Meta>> {
        let (shape, dtype) = inputs.first()?.clone();
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
            || shape.is_empty()
            || shape.contains(&0)
            || shape.iter().product::<usize>() > 1 << 40
        {
            return None;
        }
        let rank = shape.len();
        let last = shape[rank - 1];
        let same = |i: usize| inputs.get(i).is_some_and(|m| *m == (shape.clone(), dtype));
        let f32_rows = {
            let mut rows = shape.clone();
            rows[rank - 1] = 1;
            (rows, DType::F32)
        };
        let ok = match self {
            Self::SoftmaxForward { .. } => {
                rank == 4
                    && match inputs.get(1) {
                        None => inputs.len() == 1,
                        Some((bias, bias_dtype)) => {
                            inputs.len() == 2
                                && *bias_dtype == DType::F32
                                && bias.len() == 4
                                && (bias[0] == 1 || bias[0] == shape[0])
                                && bias[1] == 1
                                && bias[2..] == shape[2..]
                        }
                    }
            }
            Self::SoftmaxBackward { .. } => rank == 4 && inputs.len() == 2 && same(1),
            Self::RmsNormForward { .. } => inputs.len() == 2 && inputs[1] == (vec![last], dtype),
            Self::RmsNormBackward => {
                inputs.len() == 4
                    && inputs[1] == (vec![last], dtype)
                    && same(2)
                    && inputs[3] == f32_rows
            }
            Self::SwigluForward => inputs.len() == 2 && same(1),
            Self::SwigluBackward => inputs.len() == 3 && same(1) && same(2),
            Self::RopeForward | Self::RopeBackward => {
                let table = |m: &Meta| {
                    m.1 == dtype
                        && m.0.len() == 4
                        && (m.0[0] == 1 || m.0[0] == shape[0])
                        && m.0[1] == 1
                        && m.0[2..] == shape[2..]
                };
                rank == 4
                    && last % 2 == 0
                    && inputs.len() == 3
                    && table(&inputs[1])
                    && table(&inputs[2])
                    && inputs[1] == inputs[2]
            }
        };
        if !ok {
            return None;
        }
        Some(match self {
            Self::RmsNormForward { .. } => vec![(shape, dtype), f32_rows],
            Self::SwigluBackward => vec![(shape.clone(), dtype), (shape, dtype)],
            _ => vec![(shape, dtype)],
        })
    }

    /// Runs the kernel on CubeCL tensors (accepted by [`Kernel::outputs`]).
    fn launch(self, inputs: Vec<Prim>) -> Vec<Prim> {
        let first = &inputs[0];
        let (client, device, dtype) = (first.client.clone(), first.device.clone(), first.dtype);
        let shape = first.meta.shape.to_vec();
        let metas: Vec<Meta> = inputs.iter().map(Cube::meta).collect();
        let outputs: Vec<Prim> = self
            .outputs(&metas)
            .unwrap_or_else(|| unreachable!("checked by `run`"))
            .into_iter()
            .map(|(shape, dtype)| {
                empty_device_contiguous_dtype(
                    client.clone(),
                    device.clone(),
                    Shape::from(shape),
                    dtype,
                )
            })
            .collect();
        // Only the rotary forward reads a strided input (the heads view of the projection).
        let inputs: Vec<Prim> = inputs
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let strided = self == Self::RopeForward && i == 0 && t.meta.strides[3] == 1;
                if strided {
                    t
                } else {
                    into_contiguous(t)
                }
            })
            .collect();
        let rank = shape.len();
        let count = shape.iter().product::<usize>();
        let last = shape[rank - 1];
        let rows = count / last;
        let table_batch = |t: &Prim| {
            if t.meta.shape[0] == 1 {
                0
            } else {
                t.meta.strides[0] as i64
            }
        };
        use Arg::{F32, I32, I64};
        let elementwise = (count.div_ceil(256).min(1 << 20) as u32, 256);
        let (grid, scalars): ((u32, u32), Vec<Arg>) = match self {
            Self::SoftmaxForward { scale } => {
                let bias_batch = inputs.get(1).map_or(0, table_batch);
                (
                    (rows.div_ceil(8) as u32, 256),
                    vec![
                        I64(rows as i64),
                        I32(last as i32),
                        I32(shape[1] as i32),
                        I32(shape[2] as i32),
                        I64(bias_batch),
                        F32(scale),
                    ],
                )
            }
            Self::SoftmaxBackward { scale } => (
                (rows.div_ceil(8) as u32, 256),
                vec![I64(rows as i64), I32(last as i32), F32(scale)],
            ),
            Self::RmsNormForward { eps } => ((rows as u32, 256), vec![I32(last as i32), F32(eps)]),
            Self::RmsNormBackward => ((rows as u32, 256), vec![I32(last as i32)]),
            Self::SwigluForward | Self::SwigluBackward => (elementwise, vec![I64(count as i64)]),
            Self::RopeForward => {
                let s = &inputs[0].meta.strides;
                (
                    elementwise,
                    vec![
                        I32(shape[1] as i32),
                        I32(shape[2] as i32),
                        I32(last as i32),
                        I64(s[0] as i64),
                        I64(s[1] as i64),
                        I64(s[2] as i64),
                        I64(table_batch(&inputs[1])),
                        I64(count as i64),
                    ],
                )
            }
            Self::RopeBackward => (
                elementwise,
                vec![
                    I32(shape[1] as i32),
                    I32(shape[2] as i32),
                    I32(last as i32),
                    I64(table_batch(&inputs[1])),
                    I64(count as i64),
                ],
            ),
        };
        let launched = outputs.clone();
        let name = self.name();
        let bias_absent = matches!(self, Self::SoftmaxForward { .. }) && inputs.len() == 1;
        let thread_device = device.clone();
        cublas::on_device_thread(&client, &thread_device, name, move |address| {
            let mut args: Vec<u64> = inputs.iter().chain(&launched).map(address).collect();
            if bias_absent {
                // `softmax_fwd` takes a null bias.
                args.insert(1, 0);
            }
            args.extend(scalars.iter().map(|a| a.bits()));
            cublas::on_stream(&device, |stream| {
                let function = function(&device, dtype, name);
                let mut params: Vec<*mut c_void> = args
                    .iter_mut()
                    .map(|a| (a as *mut u64).cast::<c_void>())
                    .collect();
                // SAFETY: the parameters match `kernels.cu`'s signature of `name`
                // (pointers to buffers held until the task ends, of the shapes `outputs` checked,
                // then the scalars, each in an 8-byte slot read little-endian); the
                // stream is ordered after the inputs' writers (see `cublas::on_stream`).
                unsafe {
                    driver::launch_kernel(
                        function,
                        (grid.0, 1, 1),
                        (grid.1, 1, 1),
                        0,
                        stream,
                        &mut params,
                    )
                }
                .unwrap_or_else(|e| panic!("launching {name} ({dtype:?}): {e:?}"));
            });
        });
        outputs
    }
}

/// A scalar kernel parameter.
#[derive(Debug, Clone, Copy)]
enum Arg {
    I32(i32),
    I64(i64),
    F32(f32),
}

impl Arg {
    /// The parameter in an 8-byte slot; the kernel reads its first bytes (little-endian).
    fn bits(self) -> u64 {
        match self {
            Self::I32(v) => u64::from(v as u32),
            Self::I64(v) => v as u64,
            Self::F32(v) => u64::from(v.to_bits()),
        }
    }
}

/// A loaded module's functions by name, as addresses.
type Functions = HashMap<String, usize>;

/// The compiled module of `dtype` on `device`, loaded once: its functions by name (as
/// addresses, to be shared between threads; functions of a module in the primary context are
/// valid in every thread).
fn function(device: &CudaDevice, dtype: DType, name: &str) -> CUfunction {
    static MODULES: Mutex<Option<HashMap<(usize, u8), Functions>>> = Mutex::new(None);
    let tag = match dtype {
        DType::F32 => 0,
        DType::BF16 => 1,
        _ => 2,
    };
    let mut modules = MODULES.lock().unwrap_or_else(|e| e.into_inner());
    let functions = modules
        .get_or_insert_with(HashMap::new)
        .entry((device.index, tag))
        .or_insert_with(|| load(device, dtype));
    functions
        .get(name)
        .map(|&f| f as CUfunction)
        .unwrap_or_else(|| unreachable!("{name} is in kernels.cu"))
}

/// Compiles `kernels.cu` for `dtype` and the device's architecture and loads it into the
/// current context.
fn load(device: &CudaDevice, dtype: DType) -> Functions {
    let define = match dtype {
        DType::F32 => "-DT_F32",
        DType::BF16 => "-DT_BF16",
        _ => "-DT_F16",
    };
    // SAFETY: an existing device; attribute queries only.
    let (major, minor) = unsafe {
        let ordinal = driver::device::get(device.index as i32).expect("CUDA device exists");
        let attribute = |a| driver::device::get_attribute(ordinal, a).expect("device attribute");
        (
            attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        )
    };
    let source = CString::new(SOURCE).expect("kernels.cu has no NUL");
    let program = nvrtc::create_program(&source, Some(c"kernels.cu"))
        .unwrap_or_else(|e| panic!("NVRTC (libnvrtc) for kernels.cu: {e:?}"));
    let options = [
        format!("--gpu-architecture=compute_{major}{minor}"),
        define.to_string(),
    ];
    // SAFETY: a program created above, destroyed once below.
    let ptx = unsafe {
        let compiled = nvrtc::compile_program(program, &options);
        if let Err(e) = compiled {
            let log = nvrtc::get_program_log(program).unwrap_or_default();
            let log: Vec<u8> = log.iter().map(|&c| c as u8).collect();
            panic!(
                "compiling kernels.cu ({define}): {e:?}\n{}",
                String::from_utf8_lossy(&log)
            );
        }
        let ptx = nvrtc::get_ptx(program).expect("PTX of kernels.cu");
        let _ = nvrtc::destroy_program(program);
        ptx
    };
    // SAFETY: NUL-terminated PTX from NVRTC, loaded in the current (primary) context.
    let module = unsafe { driver::module::load_data(ptx.as_ptr().cast::<c_void>()) }
        .unwrap_or_else(|e| panic!("loading kernels.cu's PTX: {e:?}"));
    [
        "softmax_fwd",
        "softmax_bwd",
        "rms_fwd",
        "rms_bwd",
        "swiglu_fwd",
        "swiglu_bwd",
        "rope_fwd",
        "rope_bwd",
    ]
    .into_iter()
    .map(|name| {
        // SAFETY: a module loaded above.
        let f = unsafe { driver::module::get_function(module, CString::new(name).expect("name")) }
            .unwrap_or_else(|e| panic!("kernel {name} in kernels.cu: {e:?}"));
        (name.to_string(), f as usize)
    })
    .collect()
}

/// A CUDA backend the kernels run on: bare, or under kernel fusion.
trait KernelBackend: BlasBackend {
    /// Runs `kernel` on `inputs`, whose outputs are `outputs`.
    fn custom(
        kernel: Kernel,
        inputs: Vec<FloatTensor<Self>>,
        outputs: Vec<Meta>,
    ) -> Vec<FloatTensor<Self>>;
}

impl KernelBackend for Cube {
    fn custom(kernel: Kernel, inputs: Vec<Prim>, _: Vec<Meta>) -> Vec<Prim> {
        kernel.launch(inputs)
    }
}

/// A kernel as an operation of Burn's fusion stream.
#[derive(Debug)]
struct FusedKernel(Kernel, CustomOpIr);

impl Operation<FusedRuntime> for FusedKernel {
    fn execute(
        &self,
        handles: &mut HandleContainer<<FusedRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let inputs = self
            .1
            .inputs
            .iter()
            .map(|t| handles.get_float_tensor::<Cube>(t))
            .collect();
        for (ir, tensor) in self.1.outputs.iter().zip(self.0.launch(inputs)) {
            handles.register_float_tensor::<Cube>(&ir.id, tensor);
        }
    }
}

impl KernelBackend for Fused {
    fn custom(
        kernel: Kernel,
        inputs: Vec<FloatTensor<Self>>,
        outputs: Vec<Meta>,
    ) -> Vec<FloatTensor<Self>> {
        let client = inputs[0].client.clone();
        let streams = OperationStreams::with_inputs(inputs.iter());
        let outputs: Vec<TensorIr> = outputs
            .into_iter()
            .map(|(shape, dtype)| {
                TensorIr::uninit(client.create_empty_handle(), Shape::from(shape), dtype)
            })
            .collect();
        let inputs: Vec<TensorIr> = inputs.into_iter().map(|t| t.into_ir()).collect();
        let desc = CustomOpIr::new(kernel.name(), &inputs, &outputs);
        client.register(
            streams,
            OperationIr::Custom(desc.clone()),
            FusedKernel(kernel, desc),
        )
    }
}

/// [`run`] on backend `K`.
fn run_on<K: KernelBackend>(
    kernel: Kernel,
    inputs: Vec<FloatTensor<K>>,
) -> Option<Vec<FloatTensor<K>>> {
    let metas: Vec<Meta> = inputs.iter().map(K::meta).collect();
    let outputs = kernel.outputs(&metas)?;
    Some(K::custom(kernel, inputs, outputs))
}

/// Runs `kernel` when `X` is Burn's CUDA backend (bare or fused) and the kernel takes the
/// inputs; `None` otherwise.
pub(crate) fn run<X: Backend>(
    kernel: Kernel,
    inputs: &[FloatTensor<X>],
) -> Option<Vec<FloatTensor<X>>> {
    if !enabled() {
        return None;
    }
    if is::<X, Cube>() {
        let inputs = inputs.iter().cloned().map(cast::<_, Prim>).collect();
        return run_on::<Cube>(kernel, inputs).map(|v| v.into_iter().map(cast).collect());
    }
    if is::<X, Fused>() {
        let inputs = inputs
            .iter()
            .cloned()
            .map(cast::<_, FloatTensor<Fused>>)
            .collect();
        return run_on::<Fused>(kernel, inputs).map(|v| v.into_iter().map(cast).collect());
    }
    None
}
