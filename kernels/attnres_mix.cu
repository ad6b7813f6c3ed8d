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
//   du_partial[b, j] = sum over the rows t = b, b + parts, b + 2 parts, ... of sum_i ds_i r_i v_ij
//   (parts: the grid, except for the staged kernels, whose fewer blocks each own whole
//   groups b; the caller adds the partials: a fixed count, so the sum does not depend on
//   timing or on the grid).
// One block per row (grid-stride over rows). The general kernels (any dtype and shape) read a
// row of every source twice: once for the statistics, once for the output, the second read
// meant for L2 (a row of 9 sources at hidden 4096 in bf16 is 72 KiB, and a few blocks per SM
// make that more than L2 holds). The register-cached kernels below (16-bit, hidden % 8 == 0
// and <= 4096, up to 16 / 12 sources by width) read it once. On sm_90 the staged kernels
// (16-bit, hidden % 8 == 0 and 1024 to 8192, up to 16 sources) take over where their ring
// fits in shared memory: persistent blocks that bulk-copy the rows of their next tokens into
// shared memory while they work on the current one: HBM's latency hides behind the work,
// not behind other blocks.

#define ATTNRES_MAX_SOURCES 32
#define ATTNRES_BLOCK 256

struct AttnresParams {
    const void* src[ATTNRES_MAX_SOURCES];
    void* dsrc[ATTNRES_MAX_SOURCES];   // backward only
    const float* u;
    const void* grad;                  // backward only
    void* out;                         // forward only
    float* du_partial;                 // backward only: (parts, hidden)
    i64 tokens;
    i64 hidden;
    float eps;
    float scale;
    int n;
    int stages;                        // staged kernels: stages of the shared-memory ring
    i64 parts;                         // staged kernels: token groups (see there)
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

// ---- register-cached path (16-bit sources, hidden % 8 == 0, 16-byte aligned rows) ----------
//
// Thread tid owns the 8-element vectors k * ATTNRES_BLOCK + tid, k < VPT, of every row, so a
// row of all n <= NMAX sources is read from HBM once and kept in registers (raw 128-bit
// words) between the statistics and the output: HBM sees each source once, not once plus an
// L2 miss (the L2 cannot hold a row of every resident block at n = 9, hidden 4096). The n
// per-source sums go through one block reduction per row (one barrier pair, not n); u and,
// in the backward, the du partial stay in registers for the whole grid-stride loop.

template <class D, int VPT>
__device__ __forceinline__ void vec_cols(bool (&valid)[VPT], i64 (&col)[VPT], i64 h) {
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        col[k] = ((i64)k * ATTNRES_BLOCK + threadIdx.x) * 8;
        valid[k] = col[k] < h;
    }
}

template <class D>
__device__ __forceinline__ void unpack8(const uint4& w, float (&v)[8]) {
    union {
        uint4 u;
        typename D::T e[8];
    } pack;
    pack.u = w;
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = D::load(pack.e[i]);
}

// Row t of every source into registers, all loads issued before any is used: NMAX of them
// unconditionally, sources past n re-reading source n - 1 (an L1 hit), because loads behind
// an `i < n` branch are issued one source at a time and the kernel waits out HBM's latency
// n times per row (measured: 5.2x the bytes floor at n = 9, hidden 4096).
template <class T, int VPT, int NMAX>
__device__ __forceinline__ void load_row_sources(const AttnresParams& p, i64 t, const bool (&valid)[VPT],
                                                 const i64 (&col)[VPT], uint4 (&cache)[NMAX][VPT]) {
#pragma unroll
    for (int i = 0; i < NMAX; ++i) {
        const T* row = static_cast<const T*>(p.src[i < p.n ? i : p.n - 1]) + t * p.hidden;
#pragma unroll
        for (int k = 0; k < VPT; ++k)
            if (valid[k]) cache[i][k] = __ldg(reinterpret_cast<const uint4*>(row + col[k]));
    }
}

// Starts moving `bytes` (a multiple of 16) at `row` from HBM into L2, for a row this block
// handles next: while it reduces and writes the current row (one block per SM at these
// register counts, so nothing else on the SM overlaps those phases), the next row's loads
// then wait for L2, not HBM. sm_90: one bulk prefetch by thread `who`; earlier GPUs: one
// prefetch per thread per 128-byte line.
__device__ __forceinline__ void prefetch_l2(const void* row, i64 bytes, int who) {
#if __CUDA_ARCH__ >= 900
    if (threadIdx.x == who)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(row), "r"((unsigned)bytes) : "memory");
#else
    for (i64 o = (i64)threadIdx.x * 128; o < bytes; o += (i64)blockDim.x * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(static_cast<const char*>(row) + o));
#endif
}

// prefetch_l2 of row t of every source, source i by thread i (sm_90).
template <class T>
__device__ __forceinline__ void prefetch_row_sources(const AttnresParams& p, i64 t) {
    for (int i = 0; i < p.n; ++i)
        prefetch_l2(static_cast<const T*>(p.src[i]) + t * p.hidden, p.hidden * (i64)sizeof(T), i);
}

// Per-source partial sums (K of them per source, n sources) reduced over the block; the
// totals land in `red` (K * NMAX x WARPS floats), read by every thread after the barrier.
template <int K, int NMAX>
__device__ __forceinline__ void reduce_sources(float (&part)[K][NMAX], int n, float (*red)[ATTNRES_BLOCK / 32]) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < NMAX; ++i) {
        if (i < n) {
#pragma unroll
            for (int q = 0; q < K; ++q) {
                const float s = warp_sum(part[q][i]);
                if (lane == 0) red[q * NMAX + i][warp] = s;
            }
        }
    }
    __syncthreads();
}

__device__ __forceinline__ float reduced(const float (*red)[ATTNRES_BLOCK / 32], int row) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < ATTNRES_BLOCK / 32; ++w) s += red[row][w];
    return s;
}

// p_i = softmax(s)_i in place over the first n entries, every thread alike.
template <int NMAX>
__device__ __forceinline__ void softmax_regs(float (&s)[NMAX], int n) {
    float m = s[0];
#pragma unroll
    for (int i = 1; i < NMAX; ++i)
        if (i < n) m = fmaxf(m, s[i]);
    float z = 0.f;
#pragma unroll
    for (int i = 0; i < NMAX; ++i)
        if (i < n) z += __expf(s[i] - m);
#pragma unroll
    for (int i = 0; i < NMAX; ++i)
        if (i < n) s[i] = __expf(s[i] - m) / z;
}

template <class D, int VPT, int NMAX>
__device__ void mix_forward_reg(const AttnresParams& p) {
    typedef typename D::T T;
    __shared__ float red[2 * NMAX][ATTNRES_BLOCK / 32];
    const i64 h = p.hidden;
    const int n = p.n;
    bool valid[VPT];
    i64 col[VPT];
    vec_cols<D, VPT>(valid, col, h);
    float u[VPT][8];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        if (valid[k]) {
            load_vec<F32, 8>(p.u + col[k], u[k]);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) u[k][e] = 0.f;
        }
    }
    for (i64 t = blockIdx.x; t < p.tokens; t += gridDim.x) {
        uint4 cache[NMAX][VPT];
        load_row_sources<T, VPT, NMAX>(p, t, valid, col, cache);
        if (t + gridDim.x < p.tokens) prefetch_row_sources<T>(p, t + gridDim.x);
        float part[2][NMAX];
#pragma unroll
        for (int i = 0; i < NMAX; ++i) {
            part[0][i] = part[1][i] = 0.f;
            if (i < n) {
#pragma unroll
                for (int k = 0; k < VPT; ++k) {
                    if (valid[k]) {
                        float v[8];
                        unpack8<D>(cache[i][k], v);
#pragma unroll
                        for (int e = 0; e < 8; ++e) {
                            part[0][i] += v[e] * v[e];
                            part[1][i] += v[e] * u[k][e];
                        }
                    }
                }
            }
        }
        reduce_sources<2, NMAX>(part, n, red);
        float w[NMAX];
#pragma unroll
        for (int i = 0; i < NMAX; ++i)
            if (i < n) w[i] = rsqrtf(reduced(red, i) / (float)h + p.eps) * reduced(red, NMAX + i);
        __syncthreads();  // `red` is written again by the next row
        softmax_regs<NMAX>(w, n);
        T* out = static_cast<T*>(p.out) + t * h;
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            if (!valid[k]) continue;
            float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int i = 0; i < NMAX; ++i) {
                if (i < n) {
                    float v[8];
                    unpack8<D>(cache[i][k], v);
                    const float wi = p.scale * w[i];
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[e] += wi * v[e];
                }
            }
            store_vec<D, 8>(out + col[k], acc);
        }
    }
}

template <class D, int VPT, int NMAX>
__device__ void mix_backward_reg(const AttnresParams& p) {
    typedef typename D::T T;
    __shared__ float red[3 * NMAX][ATTNRES_BLOCK / 32];
    const i64 h = p.hidden;
    const int n = p.n;
    bool valid[VPT];
    i64 col[VPT];
    vec_cols<D, VPT>(valid, col, h);
    float u[VPT][8], du[VPT][8];
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
#pragma unroll
        for (int e = 0; e < 8; ++e) u[k][e] = du[k][e] = 0.f;
        if (valid[k]) load_vec<F32, 8>(p.u + col[k], u[k]);
    }
    const float inv_h = 1.f / (float)h;
    for (i64 t = blockIdx.x; t < p.tokens; t += gridDim.x) {
        const T* grow = static_cast<const T*>(p.grad) + t * h;
        uint4 cache[NMAX][VPT], gcache[VPT];
#pragma unroll
        for (int k = 0; k < VPT; ++k)
            if (valid[k]) gcache[k] = __ldg(reinterpret_cast<const uint4*>(grow + col[k]));
        load_row_sources<T, VPT, NMAX>(p, t, valid, col, cache);
        if (t + gridDim.x < p.tokens) {
            prefetch_row_sources<T>(p, t + gridDim.x);
            prefetch_l2(grow + gridDim.x * h, h * (i64)sizeof(T), n);
        }
        float part[3][NMAX];
#pragma unroll
        for (int i = 0; i < NMAX; ++i) {
            part[0][i] = part[1][i] = part[2][i] = 0.f;
            if (i < n) {
#pragma unroll
                for (int k = 0; k < VPT; ++k) {
                    if (valid[k]) {
                        float v[8], g[8];
                        unpack8<D>(cache[i][k], v);
                        unpack8<D>(gcache[k], g);
#pragma unroll
                        for (int e = 0; e < 8; ++e) {
                            part[0][i] += v[e] * v[e];
                            part[1][i] += v[e] * u[k][e];
                            part[2][i] += v[e] * g[e];
                        }
                    }
                }
            }
        }
        reduce_sources<3, NMAX>(part, n, red);
        float prob[NMAX], rs[NMAX], dots[NMAX], dps[NMAX];
#pragma unroll
        for (int i = 0; i < NMAX; ++i) {
            if (i < n) {
                rs[i] = rsqrtf(reduced(red, i) / (float)h + p.eps);
                dots[i] = reduced(red, NMAX + i);
                prob[i] = rs[i] * dots[i];
                dps[i] = p.scale * reduced(red, 2 * NMAX + i);
            }
        }
        __syncthreads();  // `red` is written again by the next row
        softmax_regs<NMAX>(prob, n);
        float pdp = 0.f;
#pragma unroll
        for (int i = 0; i < NMAX; ++i)
            if (i < n) pdp += prob[i] * dps[i];
#pragma unroll
        for (int i = 0; i < NMAX; ++i) {
            if (i >= n) continue;
            T* drow = static_cast<T*>(p.dsrc[i]) + t * h;
            const float w = p.scale * prob[i];
            const float ds = prob[i] * (dps[i] - pdp);
            const float c1 = ds * rs[i];
            const float c2 = ds * dots[i] * rs[i] * rs[i] * rs[i] * inv_h;
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                if (!valid[k]) continue;
                float v[8], g[8], dv[8];
                unpack8<D>(cache[i][k], v);
                unpack8<D>(gcache[k], g);
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    dv[e] = w * g[e] + c1 * u[k][e] - c2 * v[e];
                    du[k][e] += c1 * v[e];
                }
                store_vec<D, 8>(drow + col[k], dv);
            }
        }
    }
    float* dup = p.du_partial + (i64)blockIdx.x * h;
#pragma unroll
    for (int k = 0; k < VPT; ++k)
        if (valid[k]) store_vec<F32, 8>(dup + col[k], du[k]);
}

// ---- staged path (sm_90: 16-bit sources, hidden % 8 == 0, 1024..8192, up to 16 sources) ----
//
// The register kernels load a row, reduce it (barriers), then compute and store: the load
// latency is exposed once per row, and their registers keep one block per SM, so nothing
// else hides it. Here a persistent block (one per SM: the ring below takes most of the
// shared memory) loops over its tokens and keeps the rows of the next `stages - 1` tokens
// in flight while it works on the current one: thread 0 bulk-copies (1D TMA) every row of a
// token (forward: the n sources; backward: the n sources and g) into one stage of a ring in
// shared memory, and the stage's mbarrier completes when all those bytes have landed. The
// block reads the stage twice from shared memory (statistics, then output), so HBM sees each
// row once. A stage is refilled only after the barrier that ends its token (every thread has
// read it); stage s serves this block's tokens k = s, s + stages, ..., so the k-th token
// waits for phase parity (k / stages) & 1 of the stage's mbarrier.
//
// Thread tid owns the 8-element vectors k * BLOCK + tid, k < VPT, of every row. The 2n (3n)
// per-source sums, padded to K = 32 (64), go through one warp reduce-scatter (31 (62)
// shuffles per warp, not 5 per sum) and one barrier per token; lane i of every warp then
// finishes source i (softmax across the lanes) and the coefficients reach the other lanes by
// shuffles.
//
// Which tokens a block takes: token groups ("parts") g = block, block + gridDim.x, ...,
// g < p.parts, and within group g the tokens g, g + parts, g + 2 parts, ... The forward has
// parts = gridDim.x (a grid stride). The backward keeps the caller's parts (its du partial
// rows: du_partial[g] sums group g's tokens in token order), with fewer resident blocks than
// parts: each block owns whole groups, so the partials do not depend on the grid.

#define ATTNRES_STAGED_NMAX 16

// One step: lanes with bit `OFF` set keep the upper HALF of x[0 .. 2 HALF), the others the
// lower, each adding its partner's copy (template steps: x stays in registers only if every
// index is a compile-time constant).
template <int OFF, int HALF, int K>
__device__ __forceinline__ void reduce_scatter_step(float (&x)[K]) {
    const bool upper = (threadIdx.x & OFF) != 0;
#pragma unroll
    for (int j = 0; j < HALF; ++j) {
        const float send = upper ? x[j] : x[j + HALF];
        const float keep = upper ? x[j + HALF] : x[j];
        x[j] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
    }
}

// Lane values x[0..K) (K a multiple of 32) summed over the warp, scattered: afterwards lane
// L holds the totals of entries L * (K / 32) .. + K / 32 in x[0 .. K / 32). Each step halves
// the values a lane keeps: K - K / 32 shuffles in all.
template <int K>
__device__ __forceinline__ void warp_reduce_scatter(float (&x)[K]) {
    static_assert(K % 32 == 0, "K: a multiple of 32");
    reduce_scatter_step<16, K / 2>(x);
    reduce_scatter_step<8, K / 4>(x);
    reduce_scatter_step<4, K / 8>(x);
    reduce_scatter_step<2, K / 16>(x);
    reduce_scatter_step<1, K / 32>(x);
}

__device__ __forceinline__ unsigned attnres_smem_addr(const void* ptr) {
    unsigned r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(ptr));
    return r;
}

#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

// One arrival (the barrier's only expected one) that also announces `bytes` to come.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile(
            "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}

// `bytes` (a multiple of 16; both addresses 16-byte aligned) from global `src` to shared
// `dst`, counted against the mbarrier `bar` when they land.
__device__ __forceinline__ void bulk_copy_g2s(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
                 "l"(src), "r"(bytes), "r"(bar)
                 : "memory");
}
#endif

// The next token of this block after (group, t): the next token of the group, else the
// first of the block's next group; g >= parts when there is none.
__device__ __forceinline__ void next_token(i64& g, i64& t, i64 tokens, i64 parts) {
    t += parts;
    if (t >= tokens) {
        g += gridDim.x;
        t = g;
    }
}

// By thread 0: the rows of token t into stage `s` (rows 0..n-1: the sources; row n: g when
// `grad` is set), completing mbarrier `bar` when they have all landed. Sources by constant
// index (a kernel parameter array indexed at run time is copied to local memory).
#if __CUDA_ARCH__ >= 900
template <class T>
__device__ __forceinline__ void stage_token(const AttnresParams& p, i64 t, unsigned dst, unsigned bar, bool grad) {
    const unsigned row_bytes = (unsigned)(p.hidden * (i64)sizeof(T));
    // The stage was last read through the generic proxy (ordered before this by the block
    // barrier); the copy writes it through the async proxy.
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    mbar_arrive_expect_tx(bar, row_bytes * (unsigned)(p.n + (grad ? 1 : 0)));
#pragma unroll
    for (int i = 0; i < ATTNRES_STAGED_NMAX; ++i)
        if (i < p.n)
            bulk_copy_g2s(dst + i * row_bytes, static_cast<const T*>(p.src[i]) + t * p.hidden, row_bytes, bar);
    if (grad)
        bulk_copy_g2s(dst + p.n * row_bytes, static_cast<const T*>(p.grad) + t * p.hidden, row_bytes, bar);
}
#endif

// Opens a block's ring: thread 0 initialises one mbarrier per stage and starts copying the
// block's first `stages` tokens; (pg, pt), the producer's position, end up `stages` tokens
// ahead of the block. Every thread returns after the barrier that publishes the mbarriers.
#if __CUDA_ARCH__ >= 900
template <class T>
__device__ __forceinline__ void ring_open(const AttnresParams& p, i64 stage_vecs, unsigned smem0, unsigned bar0,
                                          bool grad, i64& pg, i64& pt) {
    if (threadIdx.x == 0) {
        for (int s = 0; s < p.stages; ++s) mbar_init(bar0 + 8 * s, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
    __syncthreads();
    pg = blockIdx.x;
    pt = blockIdx.x;
    if (threadIdx.x == 0) {
        for (int s = 0; s < p.stages && pg < p.parts; ++s) {
            stage_token<T>(p, pt, smem0 + (unsigned)(s * stage_vecs * 16), bar0 + 8 * s, grad);
            next_token(pg, pt, p.tokens, p.parts);
        }
    }
}
#endif

// Shared memory of a staged kernel (dynamic; the launcher computes the same size): `stages`
// stages of (n + grad) rows, then the reduction (K x WARPS floats), then one mbarrier per
// stage.
extern __shared__ uint4 attnres_staged_smem[];

// The reduction holds, per warp, that warp's K sums (warp w's entry e at red[w * K + e]): lane
// L adds up entry `e` = L (+ 32 c) of every warp: consecutive lanes, consecutive words, no
// bank conflicts; the warps in a fixed order.
template <int WARPS, int K>
__device__ __forceinline__ float staged_total(const float* red, int e) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) s += red[w * K + e];
    return s;
}

// Lane i < n holds source i's sum of squares in `total` and lane NMAX + i its dot with u:
// every lane i < n gets its source's r = rsqrt(mean square + eps), dot and softmax probability
// across the lanes (0 on the other lanes).
template <int NMAX>
__device__ __forceinline__ float staged_softmax(float total, int n, float inv_h, float eps, float& r, float& dot) {
    const int lane = threadIdx.x & 31;
    dot = __shfl_sync(0xffffffffu, total, (lane + NMAX) & 31);
    const bool mine = lane < n;
    r = rsqrtf(total * inv_h + eps);
    const float logit = mine ? r * dot : __int_as_float(0xff800000);  // -inf
    float mx = logit;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    const float ex = mine ? __expf(logit - mx) : 0.f;
    return ex / warp_sum(ex);
}

// After the block barrier that ends every thread's use of stage s: thread 0 refills it with
// the producer's next token, `stages` ahead of the block.
#if __CUDA_ARCH__ >= 900
template <class T>
__device__ __forceinline__ void ring_refill(const AttnresParams& p, int s, i64 stage_vecs, unsigned smem0,
                                            unsigned bar0, bool grad, i64& pg, i64& pt) {
    if (threadIdx.x == 0 && pg < p.parts) {
        stage_token<T>(p, pt, smem0 + (unsigned)(s * stage_vecs * 16), bar0 + 8 * s, grad);
        next_token(pg, pt, p.tokens, p.parts);
    }
}
#endif

// Thread `tid`'s columns among THREADS threads (the 8-element vectors k * THREADS + tid,
// k < VPT, valid below hv) and its part of u (zero past the row). (Tid: threadIdx.x's
// unsigned or a team's int index, each widened as the kernels always did.)
template <int THREADS, int VPT, class Tid>
__device__ __forceinline__ void staged_columns(const AttnresParams& p, Tid tid, i64 hv, i64 (&col)[VPT],
                                               bool (&valid)[VPT], float (&u)[VPT][8]) {
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
        col[k] = (i64)k * THREADS + tid;
        valid[k] = col[k] < hv;
#pragma unroll
        for (int e = 0; e < 8; ++e) u[k][e] = 0.f;
        if (valid[k]) load_vec<F32, 8>(p.u + col[k] * 8, u[k]);
    }
}

// A thread's per-source sums over its vectors of the n source rows of stage `st`, into x
// (zeroed first): x[i] = v_i . v_i, x[NMAX + i] = v_i . u and, in the backward (G), also
// x[2 NMAX + i] = v_i . g.
template <class D, int NMAX, int K, int VPT, bool G>
__device__ __forceinline__ void staged_sums(const uint4* st, i64 hv, int n, const i64 (&col)[VPT],
                                            const bool (&valid)[VPT], const float (&u)[VPT][8],
                                            const float (&gr)[VPT][8], float (&x)[K]) {
#pragma unroll
    for (int j = 0; j < K; ++j) x[j] = 0.f;
#pragma unroll
    for (int i = 0; i < NMAX; ++i) {
        if (i < n) {
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                if (valid[k]) {
                    float v[8];
                    unpack8<D>(st[i * hv + col[k]], v);
#pragma unroll
                    for (int e = 0; e < 8; ++e) {
                        x[i] += v[e] * v[e];
                        x[NMAX + i] += v[e] * u[k][e];
                        if (G) x[2 * NMAX + i] += v[e] * gr[k][e];
                    }
                }
            }
        }
    }
}

// One token of the staged forward, from its rows in stage `st` to row t of the output: the
// per-source sums, one warp reduce-scatter into `red` (WARPS warps x K floats), `sync()` (the
// barrier of the threads that share `red`: the block's, or a team's), the softmax, and the
// weighted sum. Each thread owns the 8-element vectors col[k] of every row; `warp` is its
// warp among the WARPS.
template <class D, int WARPS, int VPT, class Sync>
__device__ __forceinline__ void staged_forward_token(const AttnresParams& p, const uint4* st, i64 hv, i64 t,
                                                     const i64 (&col)[VPT], const bool (&valid)[VPT],
                                                     const float (&u)[VPT][8], float* red, int warp,
                                                     float inv_h, Sync sync) {
    typedef typename D::T T;
    constexpr int NMAX = ATTNRES_STAGED_NMAX, K = 2 * NMAX, M = K / 32;
    static_assert(NMAX == 16, "lane i < 16 finishes source i from entries i and 16 + i");
    const int n = p.n;
    const int lane = threadIdx.x & 31;
    float x[K];
    staged_sums<D, NMAX, K, VPT, false>(st, hv, n, col, valid, u, u, x);
    warp_reduce_scatter<K>(x);
#pragma unroll
    for (int j = 0; j < M; ++j) red[warp * K + lane * M + j] = x[j];
    sync();
    // Lane i < n: source i's logit (its sum of squares is entry i, its dot entry NMAX + i,
    // added up by lane NMAX + i over the WARPS warps), then its weight (softmax across the lanes).
    float r, dot;
    const float w = p.scale * staged_softmax<NMAX>(staged_total<WARPS, K>(red, lane), n, inv_h, p.eps, r, dot);
    float acc[VPT][8];
#pragma unroll
    for (int k = 0; k < VPT; ++k)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[k][e] = 0.f;
#pragma unroll
    for (int i = 0; i < NMAX; ++i) {
        if (i < n) {
            const float wi = __shfl_sync(0xffffffffu, w, i);
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                if (valid[k]) {
                    float v[8];
                    unpack8<D>(st[i * hv + col[k]], v);
#pragma unroll
                    for (int e = 0; e < 8; ++e) acc[k][e] += wi * v[e];
                }
            }
        }
    }
    T* out = static_cast<T*>(p.out) + t * p.hidden;
#pragma unroll
    for (int k = 0; k < VPT; ++k)
        if (valid[k]) store_vec<D, 8>(out + col[k] * 8, acc[k]);
}

template <class D, int BLOCK, int VPT>
__device__ void mix_forward_staged(const AttnresParams& p) {
#if __CUDA_ARCH__ >= 900
    typedef typename D::T T;
    constexpr int WARPS = BLOCK / 32, K = 2 * ATTNRES_STAGED_NMAX;  // K: staged_forward_token's
    const int n = p.n, stages = p.stages;
    const int warp = threadIdx.x >> 5;
    const i64 h = p.hidden, hv = h / 8;
    const i64 stage_vecs = (i64)n * hv;
    float* red = reinterpret_cast<float*>(attnres_staged_smem + stages * stage_vecs);
    unsigned long long* bar = reinterpret_cast<unsigned long long*>(red + K * WARPS);
    const unsigned smem0 = attnres_smem_addr(attnres_staged_smem);
    const unsigned bar0 = attnres_smem_addr(bar);
    i64 pg, pt;  // the producer's position (thread 0 only uses it)
    ring_open<T>(p, stage_vecs, smem0, bar0, false, pg, pt);
    i64 col[VPT];
    bool valid[VPT];
    float u[VPT][8];
    staged_columns<BLOCK, VPT>(p, threadIdx.x, hv, col, valid, u);
    const float inv_h = 1.f / (float)h;
    i64 g = blockIdx.x, t = blockIdx.x;
    for (unsigned it = 0; g < p.parts; ++it) {
        const int s = (int)(it % (unsigned)stages);
        mbar_wait(bar0 + 8 * s, (it / (unsigned)stages) & 1u);
        staged_forward_token<D, WARPS, VPT>(p, attnres_staged_smem + s * stage_vecs, hv, t, col, valid, u, red,
                                            warp, inv_h, [] { __syncthreads(); });
        // Every thread is done with stage s and with `red`: refill s with the token
        // `stages` ahead.
        __syncthreads();
        ring_refill<T>(p, s, stage_vecs, smem0, bar0, false, pg, pt);
        next_token(g, t, p.tokens, p.parts);
    }
#else
    __trap();
#endif
}

// ---- two teams sharing the ring (the _s2 forward: 512 threads, hidden 2049..4096) ----------
//
// Why: ncu of mix_forward_staged at n = 9, 16384 tokens x 4096 (bf16, H200): 0.459 ms, 1.45x
// the HBM bytes floor, and not memory-bound: DRAM at 46%, 0.62 instructions issued per
// scheduler (4 warps each: one 512-thread block per SM), stalls mostly "wait", "short
// scoreboard", "barrier" and "selected"/"not selected", almost no "long scoreboard". The
// ring hides HBM; what is exposed is each token's serial chain (sums, reduce-scatter,
// barrier, softmax, weighted sum, barrier), with no other token's work on the SM to overlap
// it. Here the block's 512 threads form two teams of 256 (team = threadIdx.x / 256, 8 warps
// each) that work on two tokens at once: team j takes the block's iterations it = j, j + 2,
// j + 4, ... (token blockIdx.x + it * gridDim.x; the forward's launch has parts = gridDim.x)
// from the same ring (iteration it uses stage it % stages, its use it / stages of that stage,
// as in mix_forward_staged), so one team's barriers and softmax overlap the other team's
// loads and arithmetic. Each thread owns the 8-element vectors k * 256 + (threadIdx.x % 256),
// k < VPT (VPT = 2: hidden up to 4096) of every row. Per token everything is as in
// mix_forward_staged, except that the barriers are the team's own named barrier (1 + team,
// 256 threads; barrier 0 stays __syncthreads), each team reduces into its own half of the
// reduction area (8 warps x K floats each: the launcher's area is 16 warps x K), and the
// team's leader (thread team * 256) refills the stage its team has just finished.
//
// THE HAZARD. Stage s serves uses k = 0, 1, 2, ... (iterations s + k * stages), and use k
// waits for parity k & 1 of the stage's mbarrier; mbarrier.try_wait.parity(P) succeeds as
// soon as the barrier's current phase has the other parity, so a wait for use k is right only
// if phase k - 1 has completed (use k - 1's bytes landed) when it starts: then the current
// phase is k, and it cannot complete before use k's refill arrives (the phase's one expected
// arrival is that refill's arrive.expect_tx); nor can it be k + 2 (that needs use k + 1's
// refill, issued only after use k has been read). With an even number of stages, uses k - 1
// and k of a stage belong to the same team (iterations stages apart), which waited for
// use k - 1 earlier in its own program order: fine. With an odd number (3 at n = 9, hidden
// 4096) they belong to different teams, and nothing else orders them: team B, at use k, may
// run ahead of team A still waiting for use k - 1's copy; its wait for parity k & 1 would then
// succeed at once (phase k - 1 in progress) and B would read stale rows.
//
// The fix (odd stages only): a named-barrier handshake per stage. After its mbar_wait for
// use k - 1 returns, warp 0 of the consuming team does bar.arrive on the handshake barrier of
// (stage s, use k), with 32 + 256 threads, and all 256 threads of use k's team do bar.sync
// on it before their mbar_wait for use k. A barrier.arrive synchronizes with the
// barrier.sync that completes the same barrier (PTX memory model: release / acquire at CTA
// scope), so the arriving warp's successful try_wait (it observed phase k - 1 complete) happens
// before the waiting team's try_wait, which (coherence of the one mbarrier object) then sees a
// phase >= k. Handshakes are used only where both sides exist: the arrive only if use k
// exists (its token < tokens), the sync only for k >= 1; both sides compute the same
// condition, so every arrive meets its sync, none is left pending at exit, and a team that
// runs out of tokens just leaves (its team barrier is its own; nothing waits on it).
// Barrier ids: the hardware counts arrivals, not whose they are, so two handshakes must
// never be open on one id at once. With one id per stage they could be: team Y, the consumer
// of use k - 2, arrives on (s, k - 1) and, as the consumer of use k, syncs on (s, k); nothing
// orders that sync after the other team's sync on (s, k - 1), and Y's 32 + 256 arrivals would
// complete the barrier without it. Hence two ids per stage, by the parity of k: handshake
// (s, k) on id 3 + 2 s + (k & 1). On one id, handshakes (s, k), (s, k + 2), ... each pair an
// arrive by team P (consumer of uses k - 1, k + 1) with a sync by team Q (consumer of uses k,
// k + 2); P's arrive on (s, k + 2) comes after its wait for use k + 1, after its sync on
// (s, k + 1), which completes only after Q's arrive on (s, k + 1), after Q's wait for use k,
// after Q's sync on (s, k) completed; Q's sync on (s, k + 2) follows its sync on (s, k) in
// program order: one handshake at a time per id, made of exactly P's warp 0 and Q's 8 warps.
// Ids up to 3 + 2 stages - 1 <= 15: odd stages <= 6 (the launcher takes at most 4, so 3).
// No deadlock: a sync at iteration i waits for an arrive at iteration i - stages; a wait at
// iteration i for the refill issued after iteration i - stages; a team barrier for the
// team's own threads at the same iteration: every dependency points to an earlier iteration.
// (No flags in shared memory: the launcher raises the kernel's dynamic shared memory limit to
// the device's opt-in maximum, which fails if the kernel has static shared memory, and the
// dynamic layout has no spare bytes.)
//
// The refill: after the team barrier that ends the token (every thread of the team, the only
// readers of this use of the stage, has read it; bar.sync orders those generic-proxy reads
// before the leader's next instructions), the leader issues stage_token, whose
// fence.proxy.async orders them before the bulk copies' async-proxy writes. The stage's
// mbarrier is then in phase k + 1 (the leader's own wait for use k returned), so the refill's
// arrive.expect_tx is the phase's one arrival.
#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ void named_sync(unsigned id, unsigned threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

__device__ __forceinline__ void named_arrive(unsigned id, unsigned threads) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
#endif

template <class D, int VPT>
__device__ void mix_forward_teams(const AttnresParams& p) {
#if __CUDA_ARCH__ >= 900
    typedef typename D::T T;
    constexpr int TEAM = 256, TEAM_WARPS = TEAM / 32, BLOCK_WARPS = 2 * TEAM_WARPS;
    constexpr int K = 2 * ATTNRES_STAGED_NMAX;  // staged_forward_token's reduction entries
    const int n = p.n, stages = p.stages;
    const int team = threadIdx.x / TEAM, tt = threadIdx.x % TEAM;
    const int warp = tt >> 5;  // within the team
    const i64 h = p.hidden, hv = h / 8;
    const i64 stage_vecs = (i64)n * hv;
    const i64 stride = gridDim.x;
    // The layout of mix_forward_staged with BLOCK = 512: the ring, K x 16 warps floats, the
    // mbarriers. Team j's reduction: warps 8 j .. 8 j + 7 of it.
    float* red_all = reinterpret_cast<float*>(attnres_staged_smem + stages * stage_vecs);
    unsigned long long* bar = reinterpret_cast<unsigned long long*>(red_all + K * BLOCK_WARPS);
    float* red = red_all + team * (K * TEAM_WARPS);
    const unsigned smem0 = attnres_smem_addr(attnres_staged_smem);
    const unsigned bar0 = attnres_smem_addr(bar);
    const bool cross = (stages & 1) != 0;  // uses k - 1 and k of a stage: different teams
    if (cross && stages > 6) __trap();     // handshake ids 3 + 2 s + (k & 1) must stay <= 15
    // The ring opens as in ring_open: thread 0 initialises the mbarriers, the block barrier
    // publishes them, then thread 0 starts the first `stages` iterations' copies (use 0 of
    // every stage).
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) mbar_init(bar0 + 8 * s, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int s = 0; s < stages; ++s) {
            const i64 t0 = blockIdx.x + (i64)s * stride;
            if (t0 >= p.tokens) break;
            stage_token<T>(p, t0, smem0 + (unsigned)(s * stage_vecs * 16), bar0 + 8 * s, false);
        }
    }
    i64 col[VPT];
    bool valid[VPT];
    float u[VPT][8];
    staged_columns<TEAM, VPT>(p, tt, hv, col, valid, u);
    const float inv_h = 1.f / (float)h;
    const unsigned team_bar = 1 + team;
    for (unsigned it = team;; it += 2) {
        const i64 t = blockIdx.x + (i64)it * stride;
        if (t >= p.tokens) break;
        const int s = (int)(it % (unsigned)stages);
        const unsigned use = it / (unsigned)stages;
        const unsigned sbar = bar0 + 8 * s;
        // This stage's next use (iteration it + stages) exists: refill it, and (odd stages)
        // hand use + 1's team the news that use `use` has landed.
        const bool next_use = t + (i64)stages * stride < p.tokens;
        // (bar.sync / bar.arrive are .aligned: the __syncwarp()s reconverge each warp after
        // the leader's refill branch and the try_wait loop before it reaches them.)
        if (cross && use > 0) {
            __syncwarp();
            named_sync(3 + 2 * s + (use & 1u), TEAM + 32);
        }
        mbar_wait(sbar, use & 1u);
        if (cross && next_use && warp == 0) {
            __syncwarp();
            named_arrive(3 + 2 * s + ((use + 1) & 1u), TEAM + 32);
        }
        staged_forward_token<D, TEAM_WARPS, VPT>(p, attnres_staged_smem + s * stage_vecs, hv, t, col, valid, u,
                                                 red, warp, inv_h, [team_bar] { named_sync(team_bar, TEAM); });
        // Every thread of the team is done with stage s (no other team reads this use of it)
        // and with the team's `red`: the leader refills s with iteration it + stages.
        named_sync(team_bar, TEAM);
        if (tt == 0 && next_use)
            stage_token<T>(p, t + (i64)stages * stride, smem0 + (unsigned)(s * stage_vecs * 16), sbar, false);
    }
#else
    __trap();
#endif
}

template <class D, int BLOCK, int VPT>
__device__ void mix_backward_staged(const AttnresParams& p) {
#if __CUDA_ARCH__ >= 900
    typedef typename D::T T;
    // K: ss, dot and g.v per source, padded to a multiple of 32.
    constexpr int NMAX = ATTNRES_STAGED_NMAX, WARPS = BLOCK / 32, K = 4 * NMAX, M = K / 32;
    static_assert(NMAX == 16, "lane i < 16 finishes source i from entries i, 16 + i and 32 + i");
    const int n = p.n, stages = p.stages;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 h = p.hidden, hv = h / 8;
    const i64 stage_vecs = (i64)(n + 1) * hv;
    float* red = reinterpret_cast<float*>(attnres_staged_smem + stages * stage_vecs);
    unsigned long long* bar = reinterpret_cast<unsigned long long*>(red + K * WARPS);
    const unsigned smem0 = attnres_smem_addr(attnres_staged_smem);
    const unsigned bar0 = attnres_smem_addr(bar);
    i64 pg, pt;  // the producer's position (thread 0 only uses it)
    ring_open<T>(p, stage_vecs, smem0, bar0, true, pg, pt);
    i64 col[VPT];
    bool valid[VPT];
    float u[VPT][8], du[VPT][8];
    staged_columns<BLOCK, VPT>(p, threadIdx.x, hv, col, valid, u);
#pragma unroll
    for (int k = 0; k < VPT; ++k)
#pragma unroll
        for (int e = 0; e < 8; ++e) du[k][e] = 0.f;
    const float inv_h = 1.f / (float)h;
    i64 g = blockIdx.x, t = blockIdx.x;
    for (unsigned it = 0; g < p.parts; ++it) {
        const int s = (int)(it % (unsigned)stages);
        mbar_wait(bar0 + 8 * s, (it / (unsigned)stages) & 1u);
        const uint4* st = attnres_staged_smem + s * stage_vecs;
        float gr[VPT][8];
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
#pragma unroll
            for (int e = 0; e < 8; ++e) gr[k][e] = 0.f;
            if (valid[k]) unpack8<D>(st[n * hv + col[k]], gr[k]);
        }
        float x[K];
        staged_sums<D, NMAX, K, VPT, true>(st, hv, n, col, valid, u, gr, x);
        warp_reduce_scatter<K>(x);
#pragma unroll
        for (int j = 0; j < M; ++j) red[warp * K + lane * M + j] = x[j];
        __syncthreads();
        // Lane i < n: source i's statistics (entries i, NMAX + i and 2 NMAX + i; lane L adds up
        // entries L and 32 + L) and coefficients (softmax across the lanes).
        const float dp = p.scale * staged_total<WARPS, K>(red, 32 + lane);
        float r, dot;
        const float prob = staged_softmax<NMAX>(staged_total<WARPS, K>(red, lane), n, inv_h, p.eps, r, dot);
        const float pdp = warp_sum(lane < n ? prob * dp : 0.f);
        const float ds = prob * (dp - pdp);
        const float w = p.scale * prob;
        const float c1 = ds * r;
        const float c2 = ds * dot * r * r * r * inv_h;
#pragma unroll
        for (int i = 0; i < NMAX; ++i) {
            if (i < n) {
                const float wi = __shfl_sync(0xffffffffu, w, i);
                const float c1i = __shfl_sync(0xffffffffu, c1, i);
                const float c2i = __shfl_sync(0xffffffffu, c2, i);
                T* drow = static_cast<T*>(p.dsrc[i]) + t * h;
#pragma unroll
                for (int k = 0; k < VPT; ++k) {
                    if (valid[k]) {
                        float v[8], dv[8];
                        unpack8<D>(st[i * hv + col[k]], v);
#pragma unroll
                        for (int e = 0; e < 8; ++e) {
                            dv[e] = wi * gr[k][e] + c1i * u[k][e] - c2i * v[e];
                            du[k][e] += c1i * v[e];
                        }
                        store_vec<D, 8>(drow + col[k] * 8, dv);
                    }
                }
            }
        }
        __syncthreads();
        ring_refill<T>(p, s, stage_vecs, smem0, bar0, true, pg, pt);
        const i64 done = g;
        next_token(g, t, p.tokens, p.parts);
        if (g != done) {
            // Group `done` is complete: its du partial row, then a fresh sum for the next.
            float* dup = p.du_partial + done * h;
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                if (valid[k]) store_vec<F32, 8>(dup + col[k] * 8, du[k]);
#pragma unroll
                for (int e = 0; e < 8; ++e) du[k][e] = 0.f;
            }
        }
    }
#else
    __trap();
#endif
}

#define ATTNRES_INSTANCES(NAME, D)                                                            \
    extern "C" __global__ void __launch_bounds__(ATTNRES_BLOCK)                               \
        attnres_fwd_##NAME(const AttnresParams p) { mix_forward<D>(p); }                      \
    extern "C" __global__ void __launch_bounds__(ATTNRES_BLOCK)                               \
        attnres_bwd_##NAME(const AttnresParams p) { mix_backward<D>(p); }

ATTNRES_INSTANCES(bf16, Bf16)
ATTNRES_INSTANCES(f16, F16)
ATTNRES_INSTANCES(f32, F32)

// Register-cached instances: _r{VPT}: VPT vectors of 8 per thread (hidden <= VPT * 2048),
// up to NMAX sources (sized so that the backward fits 255 registers without spilling).
#define ATTNRES_REG_INSTANCES(NAME, D, VPT, NMAX)                                               \
    extern "C" __global__ void __launch_bounds__(ATTNRES_BLOCK)                               \
        attnres_fwd_##NAME##_r##VPT(const AttnresParams p) { mix_forward_reg<D, VPT, NMAX>(p); } \
    extern "C" __global__ void __launch_bounds__(ATTNRES_BLOCK)                               \
        attnres_bwd_##NAME##_r##VPT(const AttnresParams p) { mix_backward_reg<D, VPT, NMAX>(p); }

ATTNRES_REG_INSTANCES(bf16, Bf16, 1, 16)
ATTNRES_REG_INSTANCES(bf16, Bf16, 2, 12)
ATTNRES_REG_INSTANCES(f16, F16, 1, 16)
ATTNRES_REG_INSTANCES(f16, F16, 2, 12)

// Staged instances (sm_90; elsewhere they trap, and the launcher never picks them):
// _s1: 256 threads, hidden <= 2048; _s2: 512 threads, hidden <= 4096 (its forward: two teams
// of 256, mix_forward_teams); _s4: 512 threads, two vectors per thread, hidden <= 8192. Up to
// ATTNRES_STAGED_NMAX sources.
#define ATTNRES_STAGED_INSTANCES(NAME, D, SUFFIX, BLOCK, VPT)                                      \
    extern "C" __global__ void __launch_bounds__(BLOCK, 1)                                         \
        attnres_fwd_##NAME##SUFFIX(const AttnresParams p) { mix_forward_staged<D, BLOCK, VPT>(p); } \
    extern "C" __global__ void __launch_bounds__(BLOCK, 1)                                         \
        attnres_bwd_##NAME##SUFFIX(const AttnresParams p) { mix_backward_staged<D, BLOCK, VPT>(p); }

// _s2's forward: mix_forward_teams (two teams of 256 threads sharing the ring; same launch,
// same shared-memory layout); its backward: mix_backward_staged.
#define ATTNRES_TEAMS_INSTANCES(NAME, D)                                                           \
    extern "C" __global__ void __launch_bounds__(512, 1)                                           \
        attnres_fwd_##NAME##_s2(const AttnresParams p) { mix_forward_teams<D, 2>(p); }             \
    extern "C" __global__ void __launch_bounds__(512, 1)                                           \
        attnres_bwd_##NAME##_s2(const AttnresParams p) { mix_backward_staged<D, 512, 1>(p); }

ATTNRES_STAGED_INSTANCES(bf16, Bf16, _s1, 256, 1)
ATTNRES_TEAMS_INSTANCES(bf16, Bf16)
ATTNRES_STAGED_INSTANCES(bf16, Bf16, _s4, 512, 2)
ATTNRES_STAGED_INSTANCES(f16, F16, _s1, 256, 1)
ATTNRES_TEAMS_INSTANCES(f16, F16)
ATTNRES_STAGED_INSTANCES(f16, F16, _s4, 512, 2)
