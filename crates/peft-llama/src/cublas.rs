//! Matrix products of the CUDA backend through cuBLAS.
//!
//! Burn 0.21's CUDA matmul (cubek-matmul) runs at about 90 TFLOP/s on an H100 where cuBLAS
//! reaches about 790, and it runs f32 products on TF32 tensor cores. The projections of the
//! model (`q/k/v/o`, the SwiGLU MLP, the LM head) are 70 % of a training step's kernel time,
//! so on the CUDA backend they go to `cublasGemmEx` instead: bf16/f16 with f32 accumulation,
//! f32 in true f32 (no TF32). Every other backend, and this one when cuBLAS cannot be loaded
//! or `PEFT_CUBLAS=0` is set, keeps Burn's own product.
//!
//! The model stays generic over `B: Backend`: [`linear`] checks at run time whether `B` is
//! `Cuda<f32>` or `Autodiff<Cuda<f32>>` (the two types the CLI builds) and takes this path only
//! then. Under autodiff the product is one graph node whose backward also runs on cuBLAS
//! (`dx = dy · wᵀ`, `dw = xᵀ · dy`, each only when needed); it keeps `x` only when the
//! weight is trainable and the weight only when `x` needs a gradient, so a frozen projection
//! does not keep its input alive.
//!
//! cuBLAS runs on its own stream, one per thread and device: CubeCL 0.10 does not expose its
//! stream, so events cannot order the two. They are ordered on the device through two counters
//! in device memory (see [`Ordering`]): the product starts after CubeCL's earlier kernels and
//! CubeCL's later kernels (which may read the result or reuse the inputs' memory) start after
//! the product, without the host waiting. `PEFT_CUBLAS_SYNC=host` orders them on the host
//! instead (synchronising both streams around each product).

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::OnceLock;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Cuda};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::{CubeCount, CubeDim};
use cudarc::cublas::{result as blas, sys};
use cudarc::driver::result as driver;

/// The CUDA backend of the CLI and benchmarks.
type Inner = Cuda<f32, i32>;
/// Its autodiff wrapper, used for training.
type Ad = Autodiff<Inner>;
/// A float tensor of [`Inner`].
type Prim = CubeTensor<CudaRuntime>;
/// A float tensor of [`Ad`].
type AdPrim = burn::tensor::ops::FloatTensor<Ad>;

/// Whether products go to cuBLAS: not when `PEFT_CUBLAS=0`, nor when the library cannot be
/// loaded (said once on stderr).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        if std::env::var("PEFT_CUBLAS").is_ok_and(|v| v == "0") {
            return false;
        }
        // SAFETY: only checks whether the dynamic library can be opened.
        let present = unsafe { sys::is_culib_present() };
        if !present {
            eprintln!(
                "peft: libcublas could not be loaded (add its folder to LD_LIBRARY_PATH); \
                 using Burn's CUDA matmul"
            );
        }
        present
    })
}

/// `a · b` (`[..., m, k] × [..., k, n]`, the same leading dimensions) through cuBLAS when `B`
/// is the CUDA backend (with or without autodiff) and [`enabled`]; otherwise both operands are
/// handed back for the caller's generic path.
#[allow(clippy::type_complexity)]
pub fn matmul<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if D < 2 || !enabled() || !supported(a.dtype(), b.dtype()) {
        return Err((a, b));
    }
    let a = match downcast::<Tensor<B, D>, Tensor<Ad, D>>(a) {
        Ok(a) => {
            let b = upcast::<Tensor<B, D>, Tensor<Ad, D>>(b);
            let out = matmul_autodiff(a.into_primitive().tensor(), b.into_primitive().tensor());
            return Ok(upcast(Tensor::<Ad, D>::from_primitive(
                TensorPrimitive::Float(out),
            )));
        }
        Err(a) => a,
    };
    match downcast::<Tensor<B, D>, Tensor<Inner, D>>(a) {
        Ok(a) => {
            let b = upcast::<Tensor<B, D>, Tensor<Inner, D>>(b);
            let out = product(a.into_primitive().tensor(), b.into_primitive().tensor());
            Ok(upcast(Tensor::<Inner, D>::from_primitive(
                TensorPrimitive::Float(out),
            )))
        }
        Err(a) => Err((a, b)),
    }
}

/// Both operands f32, or both the same half type.
fn supported(a: DType, b: DType) -> bool {
    a == b && matches!(a, DType::F32 | DType::BF16 | DType::F16)
}

/// `a` as a `T` when that is its type, else `a` back.
fn downcast<A: 'static, T: 'static>(a: A) -> Result<T, A> {
    let boxed: Box<dyn Any> = Box::new(a);
    match boxed.downcast::<T>() {
        Ok(t) => Ok(*t),
        Err(boxed) => Err(*boxed
            .downcast::<A>()
            .unwrap_or_else(|_| unreachable!("a box holds the type it was made from"))),
    }
}

/// A tensor of a backend already known to be `T`'s (checked on its partner operand).
fn upcast<C: 'static, B: 'static>(t: C) -> B {
    downcast::<C, B>(t).unwrap_or_else(|_| unreachable!("B was checked to be this backend"))
}

/// The autodiff node of `a · b`.
#[derive(Debug)]
struct BlasMatmul;

/// `t` with its last two dimensions swapped (a view).
fn transpose(t: Prim) -> Prim {
    let rank = t.meta.shape.len();
    Inner::float_swap_dims(t, rank - 2, rank - 1)
}

impl Backward<Inner, 2> for BlasMatmul {
    /// `a` (kept when `b` needs a gradient) and `b` (kept when `a` needs one).
    type State = (Option<Prim>, Option<Prim>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_a, node_b] = ops.parents;
        let grad = grads.consume::<Inner>(&ops.node);
        let (a, b) = ops.state;
        if let Some(node) = node_a {
            let b = b.unwrap_or_else(|| unreachable!("kept when a is tracked"));
            grads.register::<Inner>(node.id, product(grad.clone(), transpose(b)));
        }
        if let Some(node) = node_b {
            let a = a.unwrap_or_else(|| unreachable!("kept when b is tracked"));
            grads.register::<Inner>(node.id, product(transpose(a), grad));
        }
    }
}

fn matmul_autodiff(a: AdPrim, b: AdPrim) -> AdPrim {
    let (a_tracked, b_tracked) = (a.is_tracked(), b.is_tracked());
    match BlasMatmul
        .prepare::<NoCheckpointing>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = (
                b_tracked.then(|| a.primitive.clone()),
                a_tracked.then(|| b.primitive.clone()),
            );
            prep.finish(state, product(a.primitive, b.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(product(a.primitive, b.primitive)),
    }
}

/// `a · b` for `a` `[..., m, k]` and `b` `[..., k, n]` with the same leading dimensions:
/// cuBLAS, or Burn's product for what it is not given (broadcast batches, empty dimensions,
/// mixed dtypes).
fn product(a: Prim, b: Prim) -> Prim {
    let rank = a.meta.shape.len();
    let (sa, sb) = (&a.meta.shape, &b.meta.shape);
    let usable = rank >= 2
        && sb.len() == rank
        && sa[..rank - 2] == sb[..rank - 2]
        && sa[rank - 1] == sb[rank - 2]
        && sa.iter().chain(sb.iter()).all(|&d| d > 0)
        && supported(a.dtype, b.dtype);
    if !usable {
        return Inner::float_matmul(a, b);
    }
    let (m, k, n) = (sa[rank - 2], sa[rank - 1], sb[rank - 1]);
    let mut shape: Vec<usize> = sa[..rank - 2].to_vec();
    shape.extend([m, n]);
    gemm(Operand::of(a), Operand::of(b), m, n, k, shape)
}

/// An operand as cuBLAS sees it: each matrix row-major or column-major (a transposed view of a
/// row-major buffer) with its leading dimension, the matrices one stride apart.
struct Operand {
    tensor: Prim,
    /// Stored column-major.
    col_major: bool,
    /// Elements between consecutive rows (row-major) or columns (column-major).
    ld: usize,
    /// Elements between consecutive matrices of the batch.
    batch_stride: usize,
    /// Matrices in the batch.
    batch: usize,
}

impl Operand {
    /// `tensor`'s layout, after a copy into a contiguous buffer when cuBLAS cannot read it.
    fn of(tensor: Prim) -> Self {
        let (tensor, layout) = match Self::layout(&tensor) {
            Some(layout) => (tensor, layout),
            None => {
                let tensor = into_contiguous(tensor);
                let layout = Self::layout(&tensor)
                    .unwrap_or_else(|| unreachable!("a contiguous tensor is row-major"));
                (tensor, layout)
            }
        };
        let (col_major, ld, batch_stride, batch) = layout;
        Self {
            tensor,
            col_major,
            ld,
            batch_stride,
            batch,
        }
    }

    fn layout(tensor: &Prim) -> Option<(bool, usize, usize, usize)> {
        let (shape, strides) = (&tensor.meta.shape, &tensor.meta.strides);
        let rank = shape.len();
        let [rows, cols] = [shape[rank - 2], shape[rank - 1]];
        let [s0, s1] = [strides[rank - 2], strides[rank - 1]];
        let (col_major, ld) = if (s1 == 1 || cols == 1) && s0 >= cols {
            (false, s0.max(1))
        } else if (s0 == 1 || rows == 1) && s1 >= rows {
            (true, s1.max(1))
        } else {
            return None;
        };
        // The batch dimensions must step through memory with one stride.
        let mut batch = 1;
        let mut batch_stride = 0;
        let mut expected: Option<usize> = None;
        for dim in (0..rank - 2).rev() {
            if shape[dim] == 1 {
                continue;
            }
            match expected {
                None => batch_stride = strides[dim],
                Some(stride) if stride == strides[dim] => {}
                Some(_) => return None,
            }
            batch *= shape[dim];
            expected = Some(strides[dim] * shape[dim]);
        }
        let matrix = if col_major { ld * cols } else { ld * rows };
        if batch > 1 && batch_stride < matrix {
            return None;
        }
        Some((col_major, ld, batch_stride, batch))
    }
}

/// How the cuBLAS stream is ordered with CubeCL's.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ordering {
    /// On the device: a one-thread CubeCL kernel stores a counter that a one-thread kernel on
    /// the cuBLAS stream waits for; after the product a one-thread kernel on the cuBLAS stream
    /// stores the counter in a second flag, which a one-thread CubeCL kernel waits for. The host
    /// never waits, so kernel launches keep running ahead of the GPU. (The driver's
    /// `cuStreamWaitValue32` refuses CubeCL's stream-ordered allocations with
    /// `CUDA_ERROR_INVALID_VALUE`, hence kernels on both sides.)
    Device,
    /// On the host: CubeCL's stream is synchronised before the product and the cuBLAS stream
    /// after it (`PEFT_CUBLAS_SYNC=host`, or where the cuBLAS-side kernels cannot be built).
    Host,
}

fn ordering() -> Ordering {
    static ORDERING: OnceLock<Ordering> = OnceLock::new();
    *ORDERING.get_or_init(|| {
        if std::env::var("PEFT_CUBLAS_SYNC").is_ok_and(|v| v == "host") {
            Ordering::Host
        } else {
            Ordering::Device
        }
    })
}

/// The kernels of [`Ordering::Device`]. Atomic loads compile to `atomicAdd(p, 0)` on CUDA, so
/// the wait loop reads memory on every iteration.
mod order {
    use cubecl::prelude::*;

    #[cube(launch)]
    pub fn signal(flag: &mut Tensor<Atomic<u32>>, value: u32) {
        flag[0].store(value);
    }

    #[cube(launch)]
    pub fn wait(flag: &Tensor<Atomic<u32>>, value: u32) {
        loop {
            if flag[0].load() >= value {
                break;
            }
        }
    }
}

/// A counter in device memory, a CubeCL buffer (so CubeCL kernels take it) whose address the
/// cuBLAS stream's memory operations use.
struct Flag {
    tensor: Prim,
    ptr: u64,
    /// Keeps the buffer's address valid.
    _resource: Box<dyn Any>,
}

impl Flag {
    fn new(like: &Prim) -> Self {
        let client = like.client.clone();
        let tensor = empty_device_contiguous_dtype(
            client.clone(),
            like.device.clone(),
            [1].into(),
            DType::U32,
        );
        let resource = client
            .get_resource(tensor.handle.clone())
            .unwrap_or_else(|e| panic!("CubeCL buffer for a cuBLAS flag: {e:?}"));
        let ptr = resource.resource().ptr;
        let flag = Self {
            tensor,
            ptr,
            _resource: Box::new(resource),
        };
        flag.signal(0);
        flag
    }

    /// Stores `value` on CubeCL's stream.
    fn signal(&self, value: u32) {
        let t = &self.tensor;
        order::signal::launch::<CudaRuntime>(
            &t.client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(1),
            t.clone().into_tensor_arg(),
            value,
        );
    }

    /// Holds CubeCL's stream until the flag reaches `value`.
    fn wait(&self, value: u32) {
        let t = &self.tensor;
        order::wait::launch::<CudaRuntime>(
            &t.client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(1),
            t.clone().into_tensor_arg(),
            value,
        );
    }
}

/// One cuBLAS handle and stream per thread and device, with the flags ordering it with
/// CubeCL's stream of this thread.
struct Blas {
    handle: sys::cublasHandle_t,
    stream: cudarc::driver::sys::CUstream,
    /// Set by CubeCL's stream, awaited by cuBLAS's.
    to_blas: Flag,
    /// Set by cuBLAS's stream, awaited by CubeCL's.
    to_cube: Flag,
    /// Products ordered so far (the flags' latest value).
    count: u32,
    /// The cuBLAS-side kernels of [`Ordering::Device`], when they could be built.
    kernels: Option<StreamKernels>,
}

/// Source of the cuBLAS-side ordering kernels (compiled once per process with NVRTC, loaded
/// once per thread and device). `atomicAdd(p, 0)` reads memory on every iteration.
const STREAM_KERNELS: &str = r#"
extern "C" __global__ void peft_wait_geq(unsigned int* flag, unsigned int value) {
    while (atomicAdd(flag, 0u) < value) {}
}
extern "C" __global__ void peft_store(unsigned int* flag, unsigned int value) {
    __threadfence_system();
    atomicExch(flag, value);
}
"#;

/// The loaded kernels of [`STREAM_KERNELS`].
struct StreamKernels {
    wait_geq: cudarc::driver::sys::CUfunction,
    store: cudarc::driver::sys::CUfunction,
}

impl StreamKernels {
    /// Compiles (once) and loads the kernels into the current context.
    fn load() -> Result<Self, String> {
        static PTX: OnceLock<Result<std::ffi::CString, String>> = OnceLock::new();
        let ptx = PTX.get_or_init(|| {
            let ptx = cudarc::nvrtc::compile_ptx(STREAM_KERNELS).map_err(|e| format!("{e:?}"))?;
            std::ffi::CString::new(ptx.to_src()).map_err(|e| e.to_string())
        });
        let ptx = ptx.as_ref().map_err(Clone::clone)?;
        // SAFETY: a NUL-terminated PTX image; the context is current (`with_blas`).
        unsafe {
            let module =
                driver::module::load_data(ptx.as_ptr().cast()).map_err(|e| e.to_string())?;
            let function = |name: &str| {
                driver::module::get_function(module, std::ffi::CString::new(name).expect("name"))
                    .map_err(|e| e.to_string())
            };
            Ok(Self {
                wait_geq: function("peft_wait_geq")?,
                store: function("peft_store")?,
            })
        }
    }

    /// Launches `function(flag, value)` with one thread on `stream`.
    fn launch(
        function: cudarc::driver::sys::CUfunction,
        stream: cudarc::driver::sys::CUstream,
        flag: u64,
        value: u32,
    ) {
        let (mut flag, mut value) = (flag, value);
        let mut params = [
            (&mut flag as *mut u64).cast::<c_void>(),
            (&mut value as *mut u32).cast::<c_void>(),
        ];
        // SAFETY: the kernel's parameters are a device pointer and an unsigned int, as given.
        unsafe { driver::launch_kernel(function, (1, 1, 1), (1, 1, 1), 0, stream, &mut params) }
            .expect("launch of a cuBLAS ordering kernel");
    }
}

thread_local! {
    static BLAS: RefCell<HashMap<usize, Blas>> = RefCell::new(HashMap::new());
}

/// Makes device `index`'s primary context (the one CubeCL uses) current on this thread.
fn set_context(index: usize) {
    // SAFETY: the primary context of an existing device (CubeCL already created it); retaining
    // it again only increments its reference count.
    unsafe {
        let device = driver::device::get(index as i32).expect("CUDA device of a tensor exists");
        let context = driver::primary_ctx::retain(device).expect("primary context of the device");
        driver::ctx::set_current(context).expect("set the CUDA context current");
    }
}

fn with_blas<T>(like: &Prim, f: impl FnOnce(&mut Blas) -> T) -> T {
    set_context(like.device.index);
    BLAS.with(|cell| {
        let mut map = cell.borrow_mut();
        let blas = map.entry(like.device.index).or_insert_with(|| {
            let handle = blas::create_handle().expect("cuBLAS handle (cublasCreate)");
            let stream = driver::stream::create(driver::stream::StreamKind::NonBlocking)
                .expect("CUDA stream for cuBLAS");
            // SAFETY: both were just created in the current context.
            unsafe { blas::set_stream(handle, stream as sys::cudaStream_t) }
                .expect("cublasSetStream");
            let kernels = match ordering() {
                Ordering::Device => StreamKernels::load()
                    .map_err(|e| {
                        eprintln!(
                            "peft: cuBLAS ordering kernels unavailable ({e}); cuBLAS is ordered \
                             on the host"
                        )
                    })
                    .ok(),
                Ordering::Host => None,
            };
            Blas {
                handle,
                stream,
                to_blas: Flag::new(like),
                to_cube: Flag::new(like),
                count: 0,
                kernels,
            }
        });
        f(blas)
    })
}

/// Runs `product` (enqueued on `blas.stream`) after everything enqueued so far on CubeCL's
/// stream, and everything CubeCL enqueues afterwards after it.
fn ordered(blas: &mut Blas, device: &burn::backend::cuda::CudaDevice, product: impl FnOnce(&Blas)) {
    let Some(kernels) = &blas.kernels else {
        <Inner as Backend>::sync(device).expect("CUDA stream sync before cuBLAS");
        product(blas);
        // SAFETY: a stream of this context.
        unsafe { driver::stream::synchronize(blas.stream) }.expect("cuBLAS stream sync");
        return;
    };
    let value = blas.count.wrapping_add(1);
    if value == 0 {
        // After 2³² products the counter wraps: both flags start again from zero.
        <Inner as Backend>::sync(device).expect("CUDA stream sync");
        blas.to_blas.signal(0);
        blas.to_cube.signal(0);
        <Inner as Backend>::sync(device).expect("CUDA stream sync");
        blas.count = 0;
        return ordered(blas, device, product);
    }
    blas.to_blas.signal(value);
    StreamKernels::launch(kernels.wait_geq, blas.stream, blas.to_blas.ptr, value);
    product(blas);
    StreamKernels::launch(kernels.store, blas.stream, blas.to_cube.ptr, value);
    blas.to_cube.wait(value);
    blas.count = value;
}

fn data_type(dtype: DType) -> sys::cudaDataType {
    match dtype {
        DType::F32 => sys::cudaDataType::CUDA_R_32F,
        DType::BF16 => sys::cudaDataType::CUDA_R_16BF,
        DType::F16 => sys::cudaDataType::CUDA_R_16F,
        other => unreachable!("checked by `supported`: {other:?}"),
    }
}

/// `C[m, n] = A[m, k] · B[k, n]` for each matrix of the batch, `C` row-major contiguous. As
/// column-major, cuBLAS computes `Cᵀ = Bᵀ · Aᵀ`: a row-major operand is already its transpose
/// there (`CUBLAS_OP_N`), a column-major one takes `CUBLAS_OP_T`.
fn gemm(a: Operand, b: Operand, m: usize, n: usize, k: usize, shape: Vec<usize>) -> Prim {
    let dtype = a.tensor.dtype;
    let client = a.tensor.client.clone();
    let device = a.tensor.device.clone();
    let batch = a.batch;
    let out = empty_device_contiguous_dtype(client.clone(), device.clone(), shape.into(), dtype);
    let resource = |t: &Prim| {
        client
            .get_resource(t.handle.clone())
            .unwrap_or_else(|e| panic!("CubeCL buffer for cuBLAS: {e:?}"))
    };
    let (ra, rb, rc) = (resource(&a.tensor), resource(&b.tensor), resource(&out));
    let (pa, pb, pc) = (ra.resource().ptr, rb.resource().ptr, rc.resource().ptr);

    let op = |t: &Operand| {
        if t.col_major {
            sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    let int = |v: usize| i32::try_from(v).expect("matrix dimension fits cuBLAS's int");
    let long = |v: usize| i64::try_from(v).expect("stride fits cuBLAS's long");
    let ty = data_type(dtype);
    with_blas(&out, |blas| {
        ordered(blas, &device, |blas| {
            // SAFETY: the pointers are CubeCL buffers of the shapes, strides and leading
            // dimensions given; `ordered` keeps CubeCL's later kernels (which may reuse the
            // inputs' memory once their tensors are dropped) behind the product.
            unsafe {
                blas::gemm_strided_batched_ex(
                    blas.handle,
                    op(&b),
                    op(&a),
                    int(n),
                    int(m),
                    int(k),
                    (&alpha as *const f32).cast::<c_void>(),
                    pb as *const c_void,
                    ty,
                    int(b.ld),
                    long(b.batch_stride),
                    pa as *const c_void,
                    ty,
                    int(a.ld),
                    long(a.batch_stride),
                    (&beta as *const f32).cast::<c_void>(),
                    pc as *mut c_void,
                    ty,
                    int(n),
                    long(m * n),
                    int(batch),
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
                .unwrap_or_else(|e| {
                    panic!(
                        "cublasGemmStridedBatchedEx {batch} x [{m}, {k}] x [{k}, {n}] {dtype:?}: {e:?}"
                    )
                });
            }
        })
    });
    drop((ra, rb, rc));
    out
}
