// Kernels for the blocks of blocks.rs on the CUDA backend (see kernels.rs). Compiled at run time
// with NVRTC, once per device and element type: `-DT_F32`, `-DT_BF16` or `-DT_F16` picks `T`,
// the model's dtype. Every reduction and every product of two values runs in f32; results are
// rounded to `T` once, or where Hugging Face's PyTorch code rounds (noted at each kernel).
// Tensors are contiguous row-major unless a kernel takes strides. No headers: half types are
// 16-bit integers converted here.

#if defined(T_F32)
typedef float T;
__device__ __forceinline__ float to_f(T x) { return x; }
__device__ __forceinline__ T from_f(float f) { return f; }
#elif defined(T_BF16)
typedef unsigned short T;
__device__ __forceinline__ float to_f(T x) { return __uint_as_float(((unsigned int)x) << 16); }
// Round to nearest even; NaN stays NaN.
__device__ __forceinline__ T from_f(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (T)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (T)(u >> 16);
}
#elif defined(T_F16)
typedef unsigned short T;
__device__ __forceinline__ float to_f(T x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
    return f;
}
__device__ __forceinline__ T from_f(float f) {
    T h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#else
#error "define T_F32, T_BF16 or T_F16"
#endif

// `x` rounded to T and back, where the reference rounds an intermediate.
__device__ __forceinline__ float round_t(float x) { return to_f(from_f(x)); }

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The sum of `v` over the block, returned to every thread. blockDim.x is a multiple of 32.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    float total = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(total);
}

// Attention probabilities: p = softmax(scale · s + bias) over each row of n keys, one warp per
// row. `s` is [rows, n] with rows = batch · heads · queries; `bias` (or null) is f32
// [batch or 1, 1, queries, n], 0 or -inf, `bias_batch` elements apart per batch (0 when
// broadcast). A row with every key masked gives zeros.
extern "C" __global__ void softmax_fwd(const T* s, const float* bias, T* p, long long rows, int n,
                                       int heads, int queries, long long bias_batch, float scale) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* in = s + row * n;
    T* out = p + row * n;
    const float* b = 0;
    if (bias) {
        long long batch = row / ((long long)heads * queries);
        long long query = row % queries;
        b = bias + batch * bias_batch + query * n;
    }
    float m = neg_inf();
    for (int j = lane; j < n; j += 32) {
        float v = to_f(in[j]) * scale + (b ? b[j] : 0.0f);
        m = fmaxf(m, v);
    }
    m = warp_max(m);
    float sum = 0.0f;
    if (m != neg_inf()) {
        for (int j = lane; j < n; j += 32) {
            float v = to_f(in[j]) * scale + (b ? b[j] : 0.0f);
            sum += expf(v - m);
        }
    }
    sum = warp_sum(sum);
    for (int j = lane; j < n; j += 32) {
        float v = to_f(in[j]) * scale + (b ? b[j] : 0.0f);
        out[j] = from_f(m == neg_inf() ? 0.0f : expf(v - m) / sum);
    }
}

// ds = scale · p ⊙ (dp − Σ_keys dp ⊙ p), one warp per row of n.
extern "C" __global__ void softmax_bwd(const T* p, const T* dp, T* ds, long long rows, int n,
                                       float scale) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* pr = p + row * n;
    const T* dpr = dp + row * n;
    T* out = ds + row * n;
    float dot = 0.0f;
    for (int j = lane; j < n; j += 32) dot += to_f(dpr[j]) * to_f(pr[j]);
    dot = warp_sum(dot);
    for (int j = lane; j < n; j += 32) {
        float pj = to_f(pr[j]);
        out[j] = from_f(scale * pj * (to_f(dpr[j]) - dot));
    }
}

// RMSNorm, one block per row of n: inv = 1 / sqrt(mean(x²) + eps) in f32,
// y = w · round(x · inv) (Hugging Face rounds the normalised row to the weight's dtype, then
// multiplies).
extern "C" __global__ void rms_fwd(const T* x, const T* w, T* y, float* inv_rms, int n,
                                   float eps) {
    long long row = blockIdx.x;
    const T* xr = x + row * n;
    T* yr = y + row * n;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float v = to_f(xr[j]);
        ss += v * v;
    }
    ss = block_sum(ss);
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    if (threadIdx.x == 0) inv_rms[row] = inv;
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        yr[j] = from_f(to_f(w[j]) * round_t(to_f(xr[j]) * inv));
}

// RMSNorm's input gradient: with x̂ = x · inv and g = dy ⊙ w,
// dx = (g − x̂ · mean(g ⊙ x̂)) · inv. One block per row.
extern "C" __global__ void rms_bwd(const T* x, const T* w, const T* dy, const float* inv_rms,
                                   T* dx, int n) {
    long long row = blockIdx.x;
    const T* xr = x + row * n;
    const T* dyr = dy + row * n;
    T* out = dx + row * n;
    float inv = inv_rms[row];
    float dot = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        dot += to_f(dyr[j]) * to_f(w[j]) * to_f(xr[j]) * inv;
    dot = block_sum(dot) / (float)n;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        float g = to_f(dyr[j]) * to_f(w[j]);
        out[j] = from_f((g - to_f(xr[j]) * inv * dot) * inv);
    }
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// y = round(silu(g)) ⊙ u (PyTorch rounds the activation, then the product).
extern "C" __global__ void swiglu_fwd(const T* g, const T* u, T* y, long long count) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        float gv = to_f(g[i]);
        y[i] = from_f(round_t(gv * sigmoid(gv)) * to_f(u[i]));
    }
}

// With s = σ(g): du = dy ⊙ round(g · s), dg = dy ⊙ u ⊙ s ⊙ (1 + g ⊙ (1 − s)).
extern "C" __global__ void swiglu_bwd(const T* g, const T* u, const T* dy, T* dg, T* du,
                                      long long count) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        float gv = to_f(g[i]), uv = to_f(u[i]), d = to_f(dy[i]);
        float s = sigmoid(gv);
        du[i] = from_f(d * round_t(gv * s));
        dg[i] = from_f(d * uv * s * (1.0f + gv * (1.0f - s)));
    }
}

// Rotary embedding in the rotate-half layout: y = round(x · cos) + round(rotate_half(x) · sin)
// (each product rounded, as PyTorch does in T). `x` is [batch, heads, seq, dim] with strides
// (sb, sh, ss, 1); `cos`/`sin` are [batch or 1, 1, seq, dim], `table_batch` apart; `y` is
// contiguous.
extern "C" __global__ void rope_fwd(const T* x, const T* cos, const T* sin, T* y, int heads,
                                    int seq, int dim, long long sb, long long sh, long long ss,
                                    long long table_batch, long long count) {
    int half = dim >> 1;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        int d = (int)(i % dim);
        long long t = i / dim;
        int s = (int)(t % seq);
        t /= seq;
        int h = (int)(t % heads);
        long long b = t / heads;
        const T* xr = x + b * sb + h * sh + s * ss;
        float rotated = d < half ? -to_f(xr[d + half]) : to_f(xr[d - half]);
        long long c = b * table_batch + (long long)s * dim + d;
        y[i] = from_f(round_t(to_f(xr[d]) * to_f(cos[c])) + round_t(rotated * to_f(sin[c])));
    }
}

// The rotary embedding's input gradient: dx = dy · cos + rotate_halfᵀ(dy · sin), `dy` and `dx`
// contiguous [batch, heads, seq, dim].
extern "C" __global__ void rope_bwd(const T* dy, const T* cos, const T* sin, T* dx, int heads,
                                    int seq, int dim, long long table_batch, long long count) {
    int half = dim >> 1;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (long long)gridDim.x * blockDim.x) {
        int d = (int)(i % dim);
        long long t = i / dim;
        int s = (int)(t % seq);
        long long b = t / ((long long)seq * heads);
        const T* row = dy + (i - d);
        const long long c = b * table_batch + (long long)s * dim;
        float g = to_f(row[d]) * to_f(cos[c + d]);
        if (d < half)
            g += to_f(row[d + half]) * to_f(sin[c + d + half]);
        else
            g -= to_f(row[d - half]) * to_f(sin[c + d - half]);
        dx[i] = from_f(g);
    }
}
