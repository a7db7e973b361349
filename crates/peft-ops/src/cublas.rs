//! Matrix products of the CUDA backend through cuBLAS.
//!
//! Burn 0.21's CUDA matmul (cubek-matmul) runs at about 90 TFLOP/s on an H100 where cuBLAS
//! reaches about 790, and it runs f32 products on TF32 tensor cores. The projections of the
//! model (`q/k/v/o`, the SwiGLU MLP, the LM head) are 70 % of a training step's kernel time,
//! so on the CUDA backend they go to `cublasGemmStridedBatchedEx` instead: bf16/f16 with f32
//! accumulation, f32 in true f32 (no TF32). Every other backend, and this one when cuBLAS
//! cannot be loaded or `PEFT_CUBLAS=0` is set, keeps Burn's own product.
//!
//! The model stays generic over `B: Backend`: [`matmul`] checks at run time whether `B` is
//! Burn's CUDA backend, bare (`CubeBackend<CudaRuntime>`) or under Burn's kernel fusion
//! (`Fusion<CubeBackend<CudaRuntime>>`, what `burn::backend::Cuda` is with the `cuda` feature
//! of this crate), with or without `Autodiff`, and takes this path only then. Under fusion the
//! product is a custom operation of the fusion stream: the element-wise work around it is still
//! fused, and the product runs when the stream reaches it. Under autodiff the product is one
//! graph node whose backward also runs on cuBLAS (`da = dc · bᵀ`, `db = aᵀ · dc`, each only
//! when needed); it keeps `a` only when `b` needs a gradient and `b` only when `a` does, so a
//! projection with a frozen weight does not keep its input alive.
//!
//! Each product is a task on CubeCL's device thread, queued behind CubeCL's own kernel
//! launches ([`on_device_thread`]), and cuBLAS launches it on CubeCL's CUDA stream, so stream
//! order alone puts it after the kernels that write its inputs and before those that read its
//! result or reuse its inputs' memory. CubeCL 0.10 keeps its streams private, so the stream is
//! found once per thread and device by launching one small kernel while CUPTI (NVIDIA's
//! profiling interface, loaded at run time like cuBLAS) reports the stream of each kernel
//! launch. With `PEFT_CUBLAS_STREAM=own` cuBLAS runs on a stream of its own, ordered with two
//! events per product (CubeCL's stream waits for the product, after the cuBLAS stream waited
//! for CubeCL's work). Without CUPTI, or with `PEFT_CUBLAS_SYNC=1`, both streams are
//! synchronised on the host around each product instead (about 20 µs each on an H100, and the
//! GPU idles while the host prepares the next kernels). Two other device-side orderings were
//! tried and dropped: the driver's `cuStreamWaitValue32` refuses CubeCL's stream-ordered
//! allocations (`CUDA_ERROR_INVALID_VALUE`), and one-thread spin-waiting kernels on the two
//! streams hung the GPU (likely cause, not confirmed: CUDA's lazy module loading waits for
//! running kernels).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::OnceLock;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorPrimitive};
use burn_cubecl::cubecl::cuda::{CudaDevice, CudaRuntime};
use burn_cubecl::cubecl::device::Device;
use burn_cubecl::cubecl::device_handle::DeviceHandle;
use burn_cubecl::cubecl::server::ComputeServer;
use burn_cubecl::cubecl::stream_id::StreamId;
use burn_cubecl::cubecl::Runtime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use cudarc::cublas::{result as blas, sys};

use crate::dispatch::{cast, downcast};
use cudarc::cupti::sys as cupti;
use cudarc::driver::result as driver;

/// Burn's CUDA backend without kernel fusion (`burn::backend::Cuda` is this under
/// `burn_fusion::Fusion`); its products also run on cuBLAS.
pub type CudaBare = CubeBackend<CudaRuntime, f32, i32, u8>;
/// The tensors cuBLAS reads and writes are [`CudaBare`]'s.
pub(crate) type Cube = CudaBare;
/// Burn's CUDA backend with kernel fusion (`burn::backend::Cuda` under this crate's `cuda`
/// feature).
pub(crate) type Fused = Fusion<Cube>;
/// A float tensor of [`Cube`].
pub(crate) type Prim = CubeTensor<CudaRuntime>;
/// The fusion runtime of [`Fused`].
pub(crate) type FusedRuntime = <Cube as FusionBackend>::FusionRuntime;

/// Whether products go to cuBLAS: not when [`crate::options::OpsOptions::cublas`] is off
/// (`PEFT_CUBLAS=0`), nor when the library cannot be loaded (said once on stderr).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        if !crate::options::get().cublas {
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
/// is Burn's CUDA backend (bare or fused, with or without autodiff) and [`enabled`]; otherwise
/// both operands are handed back for the caller's generic path.
#[allow(clippy::type_complexity)]
pub fn matmul<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if D < 2 || !enabled() || !supported(a.dtype(), b.dtype()) {
        return Err((a, b));
    }
    let (a, b) = match on_autodiff::<B, Fused, D>(a, b) {
        Ok(c) => return Ok(c),
        Err(ab) => ab,
    };
    let (a, b) = match on_backend::<B, Fused, D>(a, b) {
        Ok(c) => return Ok(c),
        Err(ab) => ab,
    };
    let (a, b) = match on_autodiff::<B, Cube, D>(a, b) {
        Ok(c) => return Ok(c),
        Err(ab) => ab,
    };
    on_backend::<B, Cube, D>(a, b)
}

/// [`matmul`] when `B` is `X`.
#[allow(clippy::type_complexity)]
fn on_backend<B: Backend, X: BlasBackend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    match downcast::<Tensor<B, D>, Tensor<X, D>>(a) {
        Ok(a) => {
            let b = cast::<Tensor<B, D>, Tensor<X, D>>(b);
            let out = product::<X>(a.into_primitive().tensor(), b.into_primitive().tensor());
            Ok(cast(Tensor::<X, D>::from_primitive(
                TensorPrimitive::Float(out),
            )))
        }
        Err(a) => Err((a, b)),
    }
}

/// [`matmul`] when `B` is `Autodiff<X>`.
#[allow(clippy::type_complexity)]
fn on_autodiff<B: Backend, X: BlasBackend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    match downcast::<Tensor<B, D>, Tensor<Autodiff<X>, D>>(a) {
        Ok(a) => {
            let b = cast::<Tensor<B, D>, Tensor<Autodiff<X>, D>>(b);
            let out =
                matmul_autodiff::<X>(a.into_primitive().tensor(), b.into_primitive().tensor());
            Ok(cast(Tensor::<Autodiff<X>, D>::from_primitive(
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

/// A CUDA backend whose products this module runs on cuBLAS.
pub(crate) trait BlasBackend: Backend {
    /// The shape and dtype of a float tensor.
    fn meta(t: &FloatTensor<Self>) -> (Vec<usize>, DType);
    /// `a · b` on cuBLAS, for operands [`product`] accepted; the result `shape`.
    fn blas(a: FloatTensor<Self>, b: FloatTensor<Self>, shape: Vec<usize>) -> FloatTensor<Self>;
}

impl BlasBackend for Cube {
    fn meta(t: &Prim) -> (Vec<usize>, DType) {
        (t.meta.shape.to_vec(), t.dtype)
    }

    fn blas(a: Prim, b: Prim, shape: Vec<usize>) -> Prim {
        let rank = shape.len();
        let (m, n) = (shape[rank - 2], shape[rank - 1]);
        let k = a.meta.shape[rank - 1];
        gemm(Operand::of(a), Operand::of(b), m, n, k, shape)
    }
}

/// The product as an operation of Burn's fusion stream: run on the bare backend's tensors when
/// the stream gets to it.
#[derive(Debug)]
struct FusedGemm(CustomOpIr);

impl Operation<FusedRuntime> for FusedGemm {
    fn execute(
        &self,
        handles: &mut HandleContainer<<FusedRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([a, b], [out]) = self.0.as_fixed();
        let shape = out.shape.to_vec();
        let a = handles.get_float_tensor::<Cube>(a);
        let b = handles.get_float_tensor::<Cube>(b);
        handles.register_float_tensor::<Cube>(&out.id, Cube::blas(a, b, shape));
    }
}

impl BlasBackend for Fused {
    fn meta(t: &FloatTensor<Self>) -> (Vec<usize>, DType) {
        (t.shape.to_vec(), t.dtype)
    }

    fn blas(a: FloatTensor<Self>, b: FloatTensor<Self>, shape: Vec<usize>) -> FloatTensor<Self> {
        let client = a.client.clone();
        let streams = OperationStreams::with_inputs([&a, &b]);
        let out = TensorIr::uninit(client.create_empty_handle(), Shape::from(shape), a.dtype);
        let desc = CustomOpIr::new("cublas_gemm", &[a.into_ir(), b.into_ir()], &[out]);
        client
            .register(streams, OperationIr::Custom(desc.clone()), FusedGemm(desc))
            .output()
    }
}

/// The autodiff node of `a · b`.
#[derive(Debug)]
struct BlasMatmul<X>(PhantomData<X>);

/// `t` with its last two dimensions swapped (a view).
fn transpose<X: BlasBackend>(t: FloatTensor<X>) -> FloatTensor<X> {
    let rank = X::meta(&t).0.len();
    X::float_swap_dims(t, rank - 2, rank - 1)
}

impl<X: BlasBackend> Backward<X, 2> for BlasMatmul<X> {
    /// `a` (kept when `b` needs a gradient) and `b` (kept when `a` needs one).
    type State = (Option<FloatTensor<X>>, Option<FloatTensor<X>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_a, node_b] = ops.parents;
        let grad = grads.consume::<X>(&ops.node);
        let (a, b) = ops.state;
        if let Some(node) = node_a {
            let b = b.unwrap_or_else(|| unreachable!("kept when a is tracked"));
            grads.register::<X>(node.id, product::<X>(grad.clone(), transpose::<X>(b)));
        }
        if let Some(node) = node_b {
            let a = a.unwrap_or_else(|| unreachable!("kept when b is tracked"));
            grads.register::<X>(node.id, product::<X>(transpose::<X>(a), grad));
        }
    }
}

fn matmul_autodiff<X: BlasBackend>(
    a: FloatTensor<Autodiff<X>>,
    b: FloatTensor<Autodiff<X>>,
) -> FloatTensor<Autodiff<X>> {
    let (a_tracked, b_tracked) = (a.is_tracked(), b.is_tracked());
    match BlasMatmul::<X>(PhantomData)
        .prepare::<NoCheckpointing>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let state = (
                b_tracked.then(|| a.primitive.clone()),
                a_tracked.then(|| b.primitive.clone()),
            );
            prep.finish(state, product::<X>(a.primitive, b.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(product::<X>(a.primitive, b.primitive)),
    }
}

/// `a · b` for `a` `[..., m, k]` and `b` `[..., k, n]` with the same leading dimensions:
/// cuBLAS, or Burn's product for what it is not given (broadcast batches, empty dimensions,
/// mixed dtypes).
fn product<X: BlasBackend>(a: FloatTensor<X>, b: FloatTensor<X>) -> FloatTensor<X> {
    let ((sa, da), (sb, db)) = (X::meta(&a), X::meta(&b));
    let rank = sa.len();
    let usable = rank >= 2
        && sb.len() == rank
        && sa[..rank - 2] == sb[..rank - 2]
        && sa[rank - 1] == sb[rank - 2]
        && sa.iter().chain(sb.iter()).all(|&d| d > 0)
        && supported(da, db);
    if !usable {
        return X::float_matmul(a, b);
    }
    let mut shape: Vec<usize> = sa[..rank - 2].to_vec();
    shape.extend([sa[rank - 2], sb[rank - 1]]);
    X::blas(a, b, shape)
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

/// One cuBLAS handle and stream per thread and device, with the device's primary context (the
/// one CubeCL uses), retained once, two events, and CubeCL's stream for this thread when it
/// was found (see [`cubecl_stream`]).
struct Blas {
    context: cudarc::driver::sys::CUcontext,
    handle: sys::cublasHandle_t,
    stream: cudarc::driver::sys::CUstream,
    /// Recorded on CubeCL's stream before a product; the cuBLAS stream waits for it.
    inputs_ready: cudarc::driver::sys::CUevent,
    /// Recorded on the cuBLAS stream after a product; CubeCL's stream waits for it.
    product_done: cudarc::driver::sys::CUevent,
    /// CubeCL's stream for this thread, or `None`: then both streams are synchronised on the
    /// host around each product.
    cubecl: Option<cudarc::driver::sys::CUstream>,
    /// Whether the handle launches on CubeCL's stream itself (the default when that stream is
    /// known): products are then in stream order with CubeCL's kernels, with no events.
    /// `PEFT_CUBLAS_STREAM=own` keeps cuBLAS on its own stream, ordered by the two events.
    shared: bool,
}

thread_local! {
    /// Per device and CubeCL stream id (the calling thread's, which CubeCL's device thread
    /// runs our tasks under).
    static BLAS: RefCell<HashMap<(usize, u64), Blas>> = RefCell::new(HashMap::new());
}

/// Runs `f` with the [`Blas`] of `device` and the current CubeCL stream id (created on first
/// use), its context current.
fn with_blas<T>(device: &CudaDevice, f: impl FnOnce(&Blas) -> T) -> T {
    let index = device.index;
    let stream_id = StreamId::current().value;
    BLAS.with(|cell| {
        let mut map = cell.borrow_mut();
        let blas = map.entry((index, stream_id)).or_insert_with(|| {
            // SAFETY: the primary context of an existing device (CubeCL already created it);
            // retaining it once more keeps it alive for this thread's handle, stream and
            // events, which are created in it.
            unsafe {
                let ordinal =
                    driver::device::get(index as i32).expect("CUDA device of a tensor exists");
                let context =
                    driver::primary_ctx::retain(ordinal).expect("primary context of the device");
                driver::ctx::set_current(context).expect("set the CUDA context current");
                let handle = blas::create_handle().expect("cuBLAS handle (cublasCreate)");
                let stream = driver::stream::create(driver::stream::StreamKind::NonBlocking)
                    .expect("CUDA stream for cuBLAS");
                blas::set_stream(handle, stream as sys::cudaStream_t).expect("cublasSetStream");
                let event = || {
                    driver::event::create(
                        cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING,
                    )
                    .expect("CUDA event")
                };
                let (inputs_ready, product_done) = (event(), event());
                let cubecl = cubecl_stream(device, context);
                let shared = cubecl.is_some()
                    && crate::options::get().cublas_stream == crate::options::CublasStream::Shared;
                if let (Some(cubecl), true) = (cubecl, shared) {
                    blas::set_stream(handle, cubecl as sys::cudaStream_t).expect("cublasSetStream");
                }
                Blas {
                    context,
                    handle,
                    stream,
                    inputs_ready,
                    product_done,
                    cubecl,
                    shared,
                }
            }
        });
        // SAFETY: a context retained above.
        unsafe { driver::ctx::set_current(blas.context) }.expect("set the CUDA context current");
        f(blas)
    })
}

/// How work that needs CubeCL's buffers reaches CubeCL's device thread (`PEFT_LAUNCH`):
/// queued (the default) or a blocking round trip (`exclusive`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dispatch {
    /// Queued like CubeCL's own kernel launches; the calling thread goes on at once.
    Queued,
    /// Queued, then the device thread's queue is flushed so it runs without waiting for more.
    QueuedFlush,
    /// `ComputeClient::exclusive`: the calling thread waits until the device thread has run
    /// everything queued before, then the task.
    Exclusive,
}

fn dispatch() -> Dispatch {
    static DISPATCH: OnceLock<Dispatch> = OnceLock::new();
    *DISPATCH.get_or_init(|| match crate::options::get().launch {
        crate::options::Launch::Exclusive => Dispatch::Exclusive,
        crate::options::Launch::QueuedFlush => Dispatch::QueuedFlush,
        crate::options::Launch::Queued => Dispatch::Queued,
    })
}

/// The first failure of a queued task, raised on the next call of [`on_device_thread`].
static QUEUED_FAILURE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

type Server = <CudaRuntime as Runtime>::Server;

thread_local! {
    /// A handle to each device's CubeCL device thread (the one its `ComputeClient` uses), and
    /// whether tasks for it may be queued, by device and CubeCL stream id: known after the
    /// first task, which sets up the device thread's [`Blas`] in a round trip.
    static DEVICE_THREADS: RefCell<HashMap<(usize, u64), DeviceThread>> =
        RefCell::new(HashMap::new());
}

/// A handle to a CubeCL device thread, and whether tasks may be queued there.
type DeviceThread = (DeviceHandle<Server>, bool);

/// The device address of a CubeCL buffer, the buffer held until the task has run.
pub(crate) type Address<'a> = &'a mut dyn FnMut(&Prim) -> u64;

/// Runs `task` on CubeCL's device thread for `client`, after every task the calling thread
/// queued there before (CubeCL's kernel launches among them), under the calling thread's
/// CubeCL stream id, so it may launch on CubeCL's stream; `task` gets the device address of
/// each CubeCL buffer it asks for.
///
/// By default the task is queued and the caller goes on: a blocking round trip per product
/// or kernel kept the calling thread (Burn's autodiff and fusion) in step with the device
/// thread, about a thousand times per training step. The first task of a thread, and every
/// task when CubeCL's stream is unknown (kernels are then ordered on the host, which needs
/// the client), take the round trip. A queued task that panics is reported when the calling
/// thread next gets here (CubeCL's device thread itself only logs panics).
pub(crate) fn on_device_thread(
    client: &burn_cubecl::cubecl::client::ComputeClient<CudaRuntime>,
    device: &CudaDevice,
    what: &'static str,
    task: impl FnOnce(Address) + Send + 'static,
) {
    if let Some(failure) = QUEUED_FAILURE.lock().ok().and_then(|mut f| f.take()) {
        panic!("an earlier CUDA task failed on CubeCL's device thread: {failure}");
    }
    let key = (device.index, StreamId::current().value);
    let (handle, queue) = DEVICE_THREADS.with(|cell| {
        if let Some(known) = cell.borrow().get(&key) {
            return known.clone();
        }
        // Sets up this stream's `Blas` on the device thread (finding CubeCL's stream needs the
        // client, which a queued task cannot use).
        let device_for_setup = device.clone();
        let ordered_on_device = client
            .exclusive(move || with_blas(&device_for_setup, |blas| blas.cubecl.is_some()))
            .unwrap_or_else(|e| panic!("CubeCL device thread for {what}: {e:?}"));
        let known = (
            DeviceHandle::new(device.to_id()),
            ordered_on_device && dispatch() != Dispatch::Exclusive,
        );
        cell.borrow_mut().insert(key, known.clone());
        known
    });
    if !queue {
        let owner = client.clone();
        client
            .exclusive(move || {
                let mut held = Vec::new();
                task(&mut |t: &Prim| {
                    let resource = owner
                        .get_resource(t.handle.clone())
                        .unwrap_or_else(|e| panic!("CubeCL buffer for {what}: {e:?}"));
                    let address = resource.resource().ptr;
                    held.push(resource);
                    address
                });
            })
            .unwrap_or_else(|e| panic!("CubeCL device thread for {what}: {e:?}"));
        return;
    }
    handle.submit(move |server: &mut Server| {
        let stream = StreamId::current();
        let mut held = Vec::new();
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            task(&mut |t: &Prim| {
                let resource = server
                    .get_resource(t.handle.clone().binding(), stream)
                    .unwrap_or_else(|e| panic!("CubeCL buffer for {what}: {e:?}"));
                let address = resource.resource().ptr;
                held.push(resource);
                address
            })
        }));
        drop(held);
        if let Err(panic) = ran {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "a panic without a message".to_string());
            if let Ok(mut failure) = QUEUED_FAILURE.lock() {
                failure.get_or_insert(format!("{what}: {message}"));
            }
        }
    });
    if dispatch() == Dispatch::QueuedFlush {
        handle.flush_queue();
    }
}

/// Runs `launch` with the context of `device` current and the stream to launch on, ordered
/// like a cuBLAS product: CubeCL's own stream when it was found (nothing else to do), else this
/// thread's cuBLAS stream, with both streams synchronised on the host before and after. Runs on
/// CubeCL's device thread (in a task of [`on_device_thread`]), after everything the calling
/// thread submitted before.
pub(crate) fn on_stream(device: &CudaDevice, launch: impl FnOnce(cudarc::driver::sys::CUstream)) {
    with_blas(device, |blas| match blas.cubecl {
        Some(cubecl) => launch(cubecl),
        None => {
            <Cube as Backend>::sync(device).expect("CUDA stream sync before a kernel");
            launch(blas.stream);
            // SAFETY: a stream created by `with_blas`.
            unsafe { driver::stream::synchronize(blas.stream) }.expect("kernel stream sync");
        }
    })
}

/// Kernel launches seen while [`cubecl_stream`] listens: `(context, stream)`.
static LAUNCHES: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

/// CUPTI callback: records the context and stream of each `cuLaunchKernel`.
unsafe extern "C" fn on_launch(
    _: *mut c_void,
    domain: cupti::CUpti_CallbackDomain,
    id: cupti::CUpti_CallbackId,
    data: *const c_void,
) {
    if domain != cupti::CUpti_CallbackDomain::CUPTI_CB_DOMAIN_DRIVER_API
        || id
            != cupti::CUpti_driver_api_trace_cbid_enum::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel
                as u32
        || data.is_null()
    {
        return;
    }
    // SAFETY: CUPTI passes a `CUpti_CallbackData` for driver API callbacks, whose parameters
    // are `cuLaunchKernel`'s for this callback id.
    let (context, stream) = unsafe {
        let data = &*(data as *const cupti::CUpti_CallbackData);
        if data.callbackSite != cupti::CUpti_ApiCallbackSite::CUPTI_API_ENTER
            || data.functionParams.is_null()
        {
            return;
        }
        let params = &*(data.functionParams as *const cupti::cuLaunchKernel_params);
        (data.context as usize, params.hStream as usize)
    };
    if let Ok(mut launches) = LAUNCHES.lock() {
        launches.push((context, stream));
    }
}

/// The CUDA stream CubeCL launches this thread's kernels on, found by launching one small
/// kernel while CUPTI reports launches; `None` (host synchronisation instead) when
/// `PEFT_CUBLAS_SYNC=1`, when CUPTI cannot be loaded or subscribed to (another profiler holds
/// it), or when the kernel's stream is not one unambiguous stream of this device.
///
/// CubeCL 0.10 keeps its streams private, and one is needed to order cuBLAS after CubeCL's
/// kernels (and CubeCL's after cuBLAS) with events on the device instead of two host
/// synchronisations per product.
fn cubecl_stream(
    device: &CudaDevice,
    context: cudarc::driver::sys::CUcontext,
) -> Option<cudarc::driver::sys::CUstream> {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if crate::options::get().host_ordering {
        return None;
    }
    // SAFETY: only checks whether the dynamic library can be opened.
    if !unsafe { cupti::is_culib_present() } {
        eprintln!("peft: libcupti not found; cuBLAS products are ordered on the host");
        return None;
    }
    let _one = ONE_AT_A_TIME.lock().ok()?;
    <Cube as Backend>::sync(device).ok()?;
    LAUNCHES.lock().ok()?.clear();
    let mut subscriber: cupti::CUpti_SubscriberHandle = std::ptr::null_mut();
    // SAFETY: `on_launch` only reads the callback data CUPTI documents for this callback id.
    let subscribed =
        unsafe { cupti::cuptiSubscribe(&mut subscriber, Some(on_launch), std::ptr::null_mut()) };
    if subscribed != cupti::CUptiResult::CUPTI_SUCCESS {
        eprintln!("peft: CUPTI subscription refused ({subscribed:?}); cuBLAS products are ordered on the host");
        return None;
    }
    // SAFETY: a subscriber created above.
    let enabled = unsafe {
        cupti::cuptiEnableCallback(
            1,
            subscriber,
            cupti::CUpti_CallbackDomain::CUPTI_CB_DOMAIN_DRIVER_API,
            cupti::CUpti_driver_api_trace_cbid_enum::CUPTI_DRIVER_TRACE_CBID_cuLaunchKernel as u32,
        )
    };
    if enabled == cupti::CUptiResult::CUPTI_SUCCESS {
        let probe = Tensor::<Cube, 1>::zeros([8], device) + 1.0;
        let _ = <Cube as Backend>::sync(device);
        drop(probe);
    }
    // SAFETY: the subscriber created above, released once.
    unsafe { cupti::cuptiUnsubscribe(subscriber) };
    let launches = std::mem::take(&mut *LAUNCHES.lock().ok()?);
    let streams: std::collections::BTreeSet<usize> = launches
        .iter()
        .filter(|(c, _)| *c == context as usize)
        .map(|&(_, s)| s)
        .collect();
    match streams.len() {
        1 => streams.first().map(|&s| s as cudarc::driver::sys::CUstream),
        found => {
            eprintln!(
                "peft: CubeCL's stream not identified ({found} streams seen); cuBLAS products \
                 are ordered on the host"
            );
            None
        }
    }
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
    let out = empty_device_contiguous_dtype(client.clone(), device.clone(), shape.into(), dtype);
    // On CubeCL's device thread, after everything this thread submitted before: the buffers,
    // the ordering and the launch.
    let written = out.clone();
    on_device_thread(&client, &device, "cuBLAS", move |address| {
        enqueue(&a, &b, &written, m, n, k, address)
    });
    out
}

/// Launches `out = a · b` on the cuBLAS stream, ordered after CubeCL's work on this stream and
/// before CubeCL's next kernels. Runs on CubeCL's device thread (see [`gemm`]).
fn enqueue(a: &Operand, b: &Operand, out: &Prim, m: usize, n: usize, k: usize, address: Address) {
    let dtype = a.tensor.dtype;
    let device = &a.tensor.device;
    let batch = a.batch;
    let (pa, pb, pc) = (address(&a.tensor), address(&b.tensor), address(out));

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
    // The inputs are written on CubeCL's stream. This runs on CubeCL's device thread after every
    // task the calling thread submitted before, so all kernels that write the inputs are already
    // launched on that stream. When the handle launches on that stream too, stream order does
    // the rest. Otherwise the cuBLAS stream waits for CubeCL's, and CubeCL's stream then waits
    // for the product, so its later kernels (which may read the result, or reuse the inputs'
    // memory once their tensors are dropped) run after it.
    with_blas(device, |blas| {
        // SAFETY: the pointers are CubeCL buffers (held until the task ends) of the shapes,
        // strides and leading dimensions given, ordered with CubeCL's work on them as said
        // above.
        unsafe {
            match blas.cubecl {
                Some(_) if blas.shared => {}
                Some(cubecl) => {
                    driver::event::record(blas.inputs_ready, cubecl).expect("cuEventRecord");
                    driver::stream::wait_event(
                        blas.stream,
                        blas.inputs_ready,
                        cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                    .expect("cuStreamWaitEvent");
                }
                None => <Cube as Backend>::sync(device).expect("CUDA stream sync before cuBLAS"),
            }
            blas::gemm_strided_batched_ex(
                blas.handle,
                op(b),
                op(a),
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
            match blas.cubecl {
                Some(_) if blas.shared => {}
                Some(cubecl) => {
                    driver::event::record(blas.product_done, blas.stream).expect("cuEventRecord");
                    driver::stream::wait_event(
                        cubecl,
                        blas.product_done,
                        cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                    .expect("cuStreamWaitEvent");
                }
                None => driver::stream::synchronize(blas.stream).expect("cuBLAS stream sync"),
            }
        }
    });
}
