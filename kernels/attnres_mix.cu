#line 2 "attnres_mix.cu"
// The AttnRes mix (README, "Attention Residuals"; CPU twin: runtime/src/cpu/fusions/attnres_mix.rs,
// whose module docs hold the formulas). Launched by runtime/src/cuda/attnres.rs.
//
// Per token row t and sources v_0 .. v_{n-1} (each contiguous, tokens x hidden, one dtype),
// u = query * key_norm (float32, hidden):
//   r_i = rsqrt(mean_j v_ij^2 + eps), dot_i = v_i . u, s_i = r_i dot_i, p = softmax(s),
//   w_i = scale p_i, out_j = sum_i w_i v_ij (sources added in order, float32).
// Backward from g = d out (tokens x hidden, the sources' dtype):
//   dp_i = scale (g . v_i), ds_i = p_i (dp_i - sum_k p_k dp_k),
//   dv_ij = w_i g_j + ds_i r_i u_j - ds_i dot_i r_i^3 v_ij / hidden,
//   du_partial[b, j] = sum over the rows of block b of sum_i ds_i r_i v_ij
//   (the caller adds the partials: a fixed grid, so the sum does not depend on timing).
// One block per row (grid-stride over rows). Each pass reads a row of every source twice:
// once for the statistics, once for the output; the second read hits L2 (a row of 9 sources
// at hidden 4096 in bf16 is 72 KiB), so HBM sees each source about once.

#define ATTNRES_MAX_SOURCES 32
#define ATTNRES_BLOCK 256

struct AttnresParams {
    const void* src[ATTNRES_MAX_SOURCES];
    void* dsrc[ATTNRES_MAX_SOURCES];   // backward only
    const float* u;
    const void* grad;                  // backward only
    void* out;                         // forward only
    float* du_partial;                 // backward only: (gridDim.x, hidden)
    i64 tokens;
    i64 hidden;
    float eps;
    float scale;
    int n;
    int pad_;
};

// warp_sum: fusion_common.cuh.

// Sums `k` per-thread values over the block; every thread gets the totals in `out`.
template <int K>
__device__ __forceinline__ void block_sums(float (&v)[K], float (&out)[K], float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    constexpr int WARPS = ATTNRES_BLOCK / 32;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const float s = warp_sum(v[k]);
        if (lane == 0) scratch[k * WARPS + warp] = s;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < K; ++k) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) s += scratch[k * WARPS + w];
        out[k] = s;
    }
    __syncthreads();
}

// p_i (into prob) from s_i (in prob), for n sources, computed by every thread.
__device__ __forceinline__ void softmax_n(float* prob, int n) {
    float m = prob[0];
    for (int i = 1; i < n; ++i) m = fmaxf(m, prob[i]);
    float z = 0.f;
    for (int i = 0; i < n; ++i) z += __expf(prob[i] - m);
    // Written by thread 0 only after everyone has read (caller syncs).
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 0; i < n; ++i) prob[i] = __expf(prob[i] - m) / z;
    }
    __syncthreads();
}

template <class D>
__device__ void mix_forward(const AttnresParams& p) {
    typedef typename D::T T;
    __shared__ float scratch[2 * (ATTNRES_BLOCK / 32)];
    __shared__ float prob[ATTNRES_MAX_SOURCES];
    const i64 h = p.hidden;
    for (i64 t = blockIdx.x; t < p.tokens; t += gridDim.x) {
        for (int i = 0; i < p.n; ++i) {
            const T* row = static_cast<const T*>(p.src[i]) + t * h;
            float part[2] = {0.f, 0.f}, tot[2];
            for (i64 j = threadIdx.x; j < h; j += ATTNRES_BLOCK) {
                const float v = D::load(row[j]);
                part[0] += v * v;
                part[1] += v * p.u[j];
            }
            block_sums<2>(part, tot, scratch);
            if (threadIdx.x == 0) {
                prob[i] = rsqrtf(tot[0] / (float)h + p.eps) * tot[1];
            }
        }
        __syncthreads();
        softmax_n(prob, p.n);
        T* out = static_cast<T*>(p.out) + t * h;
        for (i64 j = threadIdx.x; j < h; j += ATTNRES_BLOCK) {
            float acc = 0.f;
            for (int i = 0; i < p.n; ++i) {
                const T* row = static_cast<const T*>(p.src[i]) + t * h;
                acc += (p.scale * prob[i]) * D::load(row[j]);
            }
            out[j] = D::store(acc);
        }
        __syncthreads();
    }
}

template <class D>
__device__ void mix_backward(const AttnresParams& p) {
    typedef typename D::T T;
    __shared__ float scratch[3 * (ATTNRES_BLOCK / 32)];
    __shared__ float prob[ATTNRES_MAX_SOURCES];
    __shared__ float rs[ATTNRES_MAX_SOURCES];
    __shared__ float dots[ATTNRES_MAX_SOURCES];
    __shared__ float dps[ATTNRES_MAX_SOURCES];
    const i64 h = p.hidden;
    float* dup = p.du_partial + (i64)blockIdx.x * h;
    for (i64 j = threadIdx.x; j < h; j += ATTNRES_BLOCK) dup[j] = 0.f;
    for (i64 t = blockIdx.x; t < p.tokens; t += gridDim.x) {
        const T* g = static_cast<const T*>(p.grad) + t * h;
        for (int i = 0; i < p.n; ++i) {
            const T* row = static_cast<const T*>(p.src[i]) + t * h;
            float part[3] = {0.f, 0.f, 0.f}, tot[3];
            for (i64 j = threadIdx.x; j < h; j += ATTNRES_BLOCK) {
                const float v = D::load(row[j]);
                part[0] += v * v;
                part[1] += v * p.u[j];
                part[2] += v * D::load(g[j]);
            }
            block_sums<3>(part, tot, scratch);
            if (threadIdx.x == 0) {
                const float r = rsqrtf(tot[0] / (float)h + p.eps);
                rs[i] = r;
                dots[i] = tot[1];
                prob[i] = r * tot[1];
                dps[i] = p.scale * tot[2];
            }
        }
        __syncthreads();
        softmax_n(prob, p.n);
        float pdp = 0.f;
        for (int i = 0; i < p.n; ++i) pdp += prob[i] * dps[i];
        const float inv_h = 1.f / (float)h;
        for (int i = 0; i < p.n; ++i) {
            const T* row = static_cast<const T*>(p.src[i]) + t * h;
            T* drow = static_cast<T*>(p.dsrc[i]) + t * h;
            const float w = p.scale * prob[i];
            const float ds = prob[i] * (dps[i] - pdp);
            const float c1 = ds * rs[i];
            const float c2 = ds * dots[i] * rs[i] * rs[i] * rs[i] * inv_h;
            for (i64 j = threadIdx.x; j < h; j += ATTNRES_BLOCK) {
                const float v = D::load(row[j]);
                drow[j] = D::store(w * D::load(g[j]) + c1 * p.u[j] - c2 * v);
                dup[j] += c1 * v;
            }
        }
        __syncthreads();
    }
}

#define ATTNRES_INSTANCES(NAME, D)                                                            \
    extern "C" __global__ void __launch_bounds__(ATTNRES_BLOCK)                               \
        attnres_fwd_##NAME(const AttnresParams p) { mix_forward<D>(p); }                      \
    extern "C" __global__ void __launch_bounds__(ATTNRES_BLOCK)                               \
        attnres_bwd_##NAME(const AttnresParams p) { mix_backward<D>(p); }

ATTNRES_INSTANCES(bf16, Bf16)
ATTNRES_INSTANCES(f16, F16)
ATTNRES_INSTANCES(f32, F32)
