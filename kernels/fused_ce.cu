// Kernels of the fused linear + cross-entropy (ARCHITECTURE.md, contract 4), compiled at
// run time by NVRTC (runtime/src/cuda/). They need no header: bf16/fp16 conversions are
// written in PTX, so neither cuda_bf16.h nor a CUDA toolkit is needed where they compile.
//
// Storage types: `bf16_t` and `f16_t` are 16-bit words; every kernel is instantiated for
// bf16, fp16 and fp32 by the `INSTANTIATE_*` macros at the end (names end in _bf16, _f16,
// _f32). Row-major matrices throughout; `ld` is a row stride in elements.
//
// The chunk of logits is a float32 matrix (rows x ld_logits) written by cuBLAS. The loss
// kernels read a row, and when gradients are wanted they overwrite the row's first half
// with the row's gradient in the input dtype (leading dimension 2 * ld_logits elements for
// 16-bit types, ld_logits for fp32), so cuBLAS can read dlogits in place. The gradient of
// the target column is written as 0 and returned separately, exactly in fp32 (`target_grad`):
// it is the largest entry of each row, and adding it once at the end (dh_finish,
// target_scatter) instead of accumulating it in 16 bits chunk after chunk keeps dW's error
// at the rounding floor of its dtype.

typedef unsigned short bf16_t;
typedef unsigned short f16_t;
typedef long long i64;

#define INFINITY __int_as_float(0x7f800000)
#define QUIET_NAN __int_as_float(0x7fc00000)

// ---- conversions -------------------------------------------------------------------

__device__ __forceinline__ unsigned pack2(unsigned short lo, unsigned short hi) {
    return (unsigned)lo | ((unsigned)hi << 16);
}

struct Bf16 {
    typedef bf16_t T;
    static __device__ __forceinline__ float load(T x) { return __uint_as_float(((unsigned)x) << 16); }
    static __device__ __forceinline__ T store(float x) {
        T r;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
        return r;
    }
    // Four consecutive elements in one 8-byte store (dst 8-byte aligned).
    static __device__ __forceinline__ void store4(T* dst, float a, float b, float c, float d) {
        *(uint2*)dst = make_uint2(pack2(store(a), store(b)), pack2(store(c), store(d)));
    }
};

struct F16 {
    typedef f16_t T;
    static __device__ __forceinline__ float load(T x) {
        float r;
        asm("cvt.f32.f16 %0, %1;" : "=f"(r) : "h"(x));
        return r;
    }
    static __device__ __forceinline__ T store(float x) {
        T r;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
        return r;
    }
    static __device__ __forceinline__ void store4(T* dst, float a, float b, float c, float d) {
        *(uint2*)dst = make_uint2(pack2(store(a), store(b)), pack2(store(c), store(d)));
    }
};

struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(T x) { return x; }
    static __device__ __forceinline__ T store(float x) { return x; }
    static __device__ __forceinline__ void store4(T* dst, float a, float b, float c, float d) {
        *(float4*)dst = make_float4(a, b, c, d);
    }
};

// ---- parameters of the loss kernels (mirrored by `CeParams` in runtime/src/cuda/launch.rs) --

struct CeParams {
    float* logits;            // chunk of float32 logits, row r at logits + r * ld_logits
    const void* bias;         // (V,) in the input dtype, or null
    const i64* targets;       // targets[p] for p = row0 + r
    const float* grad_scale;  // grad_scale[p * gs_stride]
    float* row_loss;          // row_loss[row_map ? row_map[p] : p]
    const i64* row_map;       // compacted position -> original row, or null
    float* target_grad;       // target_grad[p]: exact gradient at the target column
    i64 ld_logits;            // floats
    i64 ld_dlogits;           // elements of the input dtype
    i64 ignore_index;
    i64 row0;                 // position of the chunk's first row
    int vocab;
    int slice;                // vocab entries per CTA of a cluster (cluster kernel only)
    int gs_stride;            // 0: one grad_scale for all rows, 1: one per row
    int compute_grads;
    float scale;              // logits are (h W^T + b) * scale ...
    float softcap;            // ... then softcap * tanh(z / softcap) when softcap > 0
    float smoothing;          // label smoothing
    int pad_;
};

template <class D>
__device__ __forceinline__ float transform(const CeParams& p, float raw, int j) {
    float u = raw;
    if (p.bias) u += D::load(((const typename D::T*)p.bias)[j]);
    u *= p.scale;
    if (p.softcap > 0.f) u = p.softcap * tanhf(u / p.softcap);
    return u;
}

// Gradient factor of a non-target column: d loss / d raw logit, before grad_scale.
__device__ __forceinline__ float dense_grad(const CeParams& p, float z, float lse) {
    float d = __expf(z - lse) - p.smoothing / (float)p.vocab;
    if (p.softcap > 0.f) {
        float t = z / p.softcap;
        d *= 1.f - t * t;
    }
    return d;
}

// Exact gradient at the target column (before grad_scale, after the transforms' chain rule).
__device__ __forceinline__ float target_grad_value(const CeParams& p, float zt, float lse) {
    float d = expf(zt - lse) - (1.f - p.smoothing) - p.smoothing / (float)p.vocab;
    if (p.softcap > 0.f) {
        float t = zt / p.softcap;
        d *= 1.f - t * t;
    }
    return d;
}

// The gradients (times g) of the 4 transformed logits z at columns j .. j + 3, 0 at the target
// column (its exact gradient goes to target_grad), as one 4-element store to dst.
template <class D>
__device__ __forceinline__ void store_dense_grad4(const CeParams& p, typename D::T* dst, float4 z, int j, i64 tgt,
                                                  float lse, float g) {
    float d0 = g * dense_grad(p, z.x, lse), d1 = g * dense_grad(p, z.y, lse);
    float d2 = g * dense_grad(p, z.z, lse), d3 = g * dense_grad(p, z.w, lse);
    if (tgt == j) d0 = 0.f;
    if (tgt == j + 1) d1 = 0.f;
    if (tgt == j + 2) d2 = 0.f;
    if (tgt == j + 3) d3 = 0.f;
    D::store4(dst, d0, d1, d2, d3);
}

__device__ __forceinline__ float row_loss_value(const CeParams& p, float lse, float zt, float sum_z) {
    return (1.f - p.smoothing) * (lse - zt) + p.smoothing * (lse - sum_z / (float)p.vocab);
}

// ---- block reductions ----------------------------------------------------------------

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Reduces v over the block (max or sum); every thread gets the result. `scratch` holds 32 floats.
template <bool IS_MAX>
__device__ float block_reduce(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = IS_MAX ? warp_max(v) : warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < nwarps ? scratch[lane] : (IS_MAX ? -INFINITY : 0.f);
    return IS_MAX ? warp_max(r) : warp_sum(r);
}

// Merges online-softmax pairs (max m, sum s of exp(x - m)).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    if (mm == -INFINITY) return;
    s = s * __expf(m - mm) + s2 * __expf(m2 - mm);
    m = mm;
}

__device__ void block_reduce_lse(float& m, float& s, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    __syncthreads();
    if (lane == 0) { scratch[warp] = m; scratch[32 + warp] = s; }
    __syncthreads();
    m = lane < nwarps ? scratch[lane] : -INFINITY;
    s = lane < nwarps ? scratch[32 + lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
}

template <class D>
__device__ __forceinline__ void write_ignored_row(const CeParams& p, i64 pos, i64 out_row, int r,
                                                  int begin, int end, bool leader) {
    if (leader) {
        p.row_loss[out_row] = 0.f;
        if (p.compute_grads) p.target_grad[pos] = 0.f;
    }
    if (p.compute_grads) {
        typename D::T* drow = (typename D::T*)(p.logits + (i64)r * p.ld_logits);
        for (int j = begin + threadIdx.x; j < end; j += blockDim.x) drow[j] = D::store(0.f);
    }
}

// ---- loss kernel, one CTA per row (any architecture) ------------------------------------
//
// Pass 1 reads the row once (online max and sum of exp); pass 2 (gradients) reads it again
// tile by tile, and each tile is read into registers before a barrier, then written: the 16-bit
// gradient of element j lands on bytes [2j, 2j+2), which only tiles already read (or the
// current one) occupy.

template <class D>
__device__ void ce_rows(const CeParams& p) {
    __shared__ float scratch[64];
    const int r = blockIdx.x;
    const i64 pos = p.row0 + r;
    const i64 tgt = p.targets[pos];
    const i64 out_row = p.row_map ? p.row_map[pos] : pos;
    const int V = p.vocab;
    if (tgt == p.ignore_index) {
        write_ignored_row<D>(p, pos, out_row, r, 0, V, threadIdx.x == 0);
        return;
    }
    const bool tgt_ok = tgt >= 0 && tgt < V;
    const float* row = p.logits + (i64)r * p.ld_logits;

    float m = -INFINITY, s = 0.f, sum_z = 0.f, zt = 0.f;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float z = transform<D>(p, row[j], j);
        // A -inf logit (a -inf bias entry) adds exp(-inf) = 0, also while m is still -inf,
        // where z - m would be NaN; a NaN logit still propagates.
        if (z > m) { s = s * __expf(m - z) + 1.f; m = z; } else if (z != -INFINITY) { s += __expf(z - m); }
        sum_z += z;
        if (j == tgt) zt = z;
    }
    block_reduce_lse(m, s, scratch);
    sum_z = block_reduce<false>(sum_z, scratch);
    zt = block_reduce<false>(zt, scratch);
    const float lse = m + logf(s);
    if (threadIdx.x == 0) {
        p.row_loss[out_row] = tgt_ok ? row_loss_value(p, lse, zt, sum_z) : QUIET_NAN;
    }
    if (!p.compute_grads) return;

    const float g = p.grad_scale[pos * p.gs_stride] * p.scale;
    if (threadIdx.x == 0) p.target_grad[pos] = tgt_ok ? g * target_grad_value(p, zt, lse) : QUIET_NAN;
    typename D::T* drow = (typename D::T*)(p.logits + (i64)r * p.ld_logits);
    const int per_tile = 4 * blockDim.x;
    for (int j0 = 0; j0 < V; j0 += per_tile) {
        float z[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            int j = j0 + u * blockDim.x + threadIdx.x;
            z[u] = j < V ? transform<D>(p, row[j], j) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            int j = j0 + u * blockDim.x + threadIdx.x;
            if (j < V) drow[j] = D::store(j == tgt ? 0.f : g * dense_grad(p, z[u], lse));
        }
        // No barrier here: the next tile reads elements at or past j0 + per_tile, and this
        // tile wrote bytes below 2 * (j0 + per_tile), i.e. floats below j0 + per_tile.
    }
}

// ---- loss kernel, one cluster per row (sm_90) -------------------------------------------
//
// The cluster's CTAs split the row; each keeps its slice in shared memory (the row is read
// from device memory once), the slices' statistics are merged through distributed shared
// memory, and the gradient is written from shared memory. The first cluster barrier also
// orders every CTA's reads of the row before any CTA's in-place writes.

#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned cluster_size() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_arrive() { asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }
__device__ __forceinline__ unsigned smem_addr(const void* ptr) {
    unsigned r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(ptr));
    return r;
}
__device__ __forceinline__ float ld_peer(const float* local, unsigned rank) {
    unsigned remote;
    float v;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem_addr(local)), "r"(rank));
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
    return v;
}
#endif

// PLAIN (the kernel `ce_rows_cluster_plain`, which the launcher picks for it): no bias, scale 1,
// no soft-capping, no label smoothing, the common case; its own kernel, so that the general
// case's registers do not lower its occupancy. Then the transformed logit is the raw
// one, the exp pass keeps e = exp(z - m_b) in shared memory so the gradient pass multiplies
// instead of exponentiating again, sum_z is not needed, and the target column is read from
// shared memory and zeroed after the gradient loop instead of tested at every element.
template <class D, bool PLAIN>
__device__ void ce_rows_cluster_impl(const CeParams& p) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ float4 smem4[];
    float* zs = (float*)smem4;                // slice of transformed logits
    __shared__ float scratch[64];
    __shared__ float stats[4];                // this CTA's max, sum exp, sum z, target z
    __shared__ float merged[4];
    const unsigned rank = cluster_rank(), cs = cluster_size();
    const int r = blockIdx.x / cs;
    const i64 pos = p.row0 + r;
    const i64 tgt = p.targets[pos];
    const i64 out_row = p.row_map ? p.row_map[pos] : pos;
    const int V = p.vocab;
    const int begin = min(V, (int)rank * p.slice), end = min(V, begin + p.slice), n = end - begin;
    if (tgt == p.ignore_index) {  // the same branch for the whole cluster: no barrier skipped
        write_ignored_row<D>(p, pos, out_row, r, begin, end, rank == 0 && threadIdx.x == 0);
        return;
    }
    const bool tgt_ok = tgt >= 0 && tgt < V;
    // PLAIN: the one thread that loads the target column's element (its float4, or the tail)
    // publishes it before overwriting it with its exp, and zeroes its gradient at the end.
    const int kt = (int)(tgt - begin);
    const int n4t = (n >> 2) << 2;
    const bool tgt_owner = tgt >= begin && tgt < end &&
                           (kt < n4t ? (kt >> 2) : kt - n4t) % (int)blockDim.x == (int)threadIdx.x;
    const float* row = p.logits + (i64)r * p.ld_logits + begin;

    // Load: 16-byte loads (begin and ld_logits are multiples of 4), LOADS of them in flight
    // per thread before any is used (the compiler cannot hoist a global load above a store
    // to shared memory by itself), transform, keep in smem.
    constexpr int LOADS = 4;
    float m = -INFINITY, sum_z = 0.f, zt = 0.f;
    const int n4 = n >> 2;
    const float4* row4 = (const float4*)row;
    for (int i0 = threadIdx.x; i0 < n4; i0 += LOADS * blockDim.x) {
        float4 v[LOADS];
#pragma unroll
        for (int u = 0; u < LOADS; ++u) {
            const int i = i0 + u * blockDim.x;
            if (i < n4) v[u] = row4[i];
        }
#pragma unroll
        for (int u = 0; u < LOADS; ++u) {
            const int i = i0 + u * blockDim.x;
            if (i >= n4) break;
            const int j = begin + 4 * i;
            float4 z = v[u];
            if (!PLAIN) {
                z.x = transform<D>(p, z.x, j);
                z.y = transform<D>(p, z.y, j + 1);
                z.z = transform<D>(p, z.z, j + 2);
                z.w = transform<D>(p, z.w, j + 3);
                sum_z += (z.x + z.y) + (z.z + z.w);
                if (tgt >= j && tgt < j + 4) zt = tgt == j ? z.x : tgt == j + 1 ? z.y : tgt == j + 2 ? z.z : z.w;
            }
            smem4[i] = z;
            m = fmaxf(m, fmaxf(fmaxf(z.x, z.y), fmaxf(z.z, z.w)));
        }
    }
    for (int i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x) {
        float z = PLAIN ? row[i] : transform<D>(p, row[i], begin + i);
        zs[i] = z;
        m = fmaxf(m, z);
        if (!PLAIN) {
            sum_z += z;
            if (begin + i == tgt) zt = z;
        }
    }
    const float m_b = block_reduce<true>(m, scratch);  // its barriers order the smem stores
    if (PLAIN && tgt_owner) stats[3] = zs[kt];  // before this thread overwrites it below
    float s = 0.f;
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        float4 z = smem4[i];
        z.x = __expf(z.x - m_b), z.y = __expf(z.y - m_b), z.z = __expf(z.z - m_b), z.w = __expf(z.w - m_b);
        if (PLAIN) smem4[i] = z;  // read back by this thread only
        s += (z.x + z.y) + (z.z + z.w);
    }
    for (int i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x) {
        const float e = __expf(zs[i] - m_b);
        if (PLAIN) zs[i] = e;
        s += e;
    }
    s = block_reduce<false>(s, scratch);
    if (!PLAIN) {
        sum_z = block_reduce<false>(sum_z, scratch);
        zt = block_reduce<false>(zt, scratch);
    }
    if (threadIdx.x == 0) {
        stats[0] = m_b;
        stats[1] = s;
        stats[2] = sum_z;
        if (!PLAIN || !(tgt >= begin && tgt < end)) stats[3] = zt;  // PLAIN: 0 unless the owner's
    }
    cluster_arrive();  // (A) every CTA has read its slice of the row and published stats
    cluster_wait();
    if (threadIdx.x < 32) {
        float pm = -INFINITY, ps = 0.f, psz = 0.f, pzt = 0.f;
        if (threadIdx.x < cs) {
            pm = ld_peer(&stats[0], threadIdx.x);
            ps = ld_peer(&stats[1], threadIdx.x);
            if (!PLAIN) psz = ld_peer(&stats[2], threadIdx.x);
            pzt = ld_peer(&stats[3], threadIdx.x);
        }
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, pm, o), s2 = __shfl_xor_sync(0xffffffffu, ps, o);
            lse_merge(pm, ps, m2, s2);
        }
        if (!PLAIN) psz = warp_sum(psz);
        pzt = warp_sum(pzt);
        if (threadIdx.x == 0) { merged[0] = pm + logf(ps); merged[1] = psz; merged[2] = pzt; }
    }
    cluster_arrive();  // (B) done reading the peers' stats; waited for before exiting
    __syncthreads();
    const float lse = merged[0];
    zt = merged[2];
    if (rank == 0 && threadIdx.x == 0) {
        p.row_loss[out_row] = tgt_ok ? row_loss_value(p, lse, zt, merged[1]) : QUIET_NAN;
    }
    if (p.compute_grads) {
        const float g = p.grad_scale[pos * p.gs_stride] * p.scale;
        if (rank == 0 && threadIdx.x == 0) {
            p.target_grad[pos] = tgt_ok ? g * target_grad_value(p, zt, lse) : QUIET_NAN;
        }
        typename D::T* drow = (typename D::T*)(p.logits + (i64)r * p.ld_logits) + begin;
        // PLAIN: d = g exp(z - lse) = e * (g exp(m_b - lse)).
        const float c = PLAIN ? g * expf(m_b - lse) : 0.f;
        for (int i = threadIdx.x; i < n4; i += blockDim.x) {  // 4 elements, one store
            const float4 z = smem4[i];
            if (PLAIN) {
                D::store4(drow + 4 * i, c * z.x, c * z.y, c * z.z, c * z.w);
            } else {
                store_dense_grad4<D>(p, drow + 4 * i, z, begin + 4 * i, tgt, lse, g);
            }
        }
        for (int i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x) {
            drow[i] = D::store(begin + i == tgt ? 0.f : PLAIN ? c * zs[i] : g * dense_grad(p, zs[i], lse));
        }
        // The target column's entry, zeroed by the thread that wrote it (program order).
        if (PLAIN && tgt_owner) drow[kt] = D::store(0.f);
    }
    cluster_wait();
#else
    __trap();
#endif
}

// ---- loss kernel, persistent clusters with a prefetched row (sm_90) ----------------------
//
// The same split of a row over a cluster, but each cluster loops over rows (row r, r + G,
// ... for G resident clusters) with two shared-memory buffers: while it reduces and writes
// one row, the next row is already on its way into the other buffer (cp.async), so loads,
// arithmetic and stores of different rows overlap. Every row passes one cluster barrier
// (ignored rows too, so that the barrier count stays uniform): it orders all blocks' reads
// of the row before any in-place write, and it orders a block's reading of its peers'
// statistics (double-buffered) before their reuse two rows later.

#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// Starts copying this block's slice of row r (if r is a row of the chunk) into buf.
__device__ __forceinline__ void prefetch_slice(const CeParams& p, float* buf, int r, int rows, int begin, int n) {
    if (r < rows) {
        const float* src = p.logits + (i64)r * p.ld_logits + begin;
        const int n4 = n >> 2;
        for (int i = threadIdx.x; i < n4; i += blockDim.x) cp_async16(buf + 4 * i, src + 4 * i);
        for (int i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x) cp_async4(buf + i, src + i);
    }
    cp_async_commit();  // an empty group past the last row keeps wait_group's count uniform
}
#endif

template <class D>
__device__ void ce_rows_pipelined(const CeParams& p, int rows) {
#if __CUDA_ARCH__ >= 900
    extern __shared__ float4 smem4[];
    __shared__ float scratch[64];
    __shared__ float stats[2][4];  // per buffer: this block's max, sum exp, sum z, target z
    __shared__ float merged[3];
    const unsigned rank = cluster_rank(), cs = cluster_size();
    const int V = p.vocab;
    const int begin = min(V, (int)rank * p.slice), end = min(V, begin + p.slice), n = end - begin;
    const int n4 = n >> 2;
    float* const buf0 = (float*)smem4;  // buffer b starts at buf0 + b * slice
    const int first = blockIdx.x / cs, stride = gridDim.x / cs;

    prefetch_slice(p, buf0, first, rows, begin, n);
    int k = 0;
    for (int r = first; r < rows; r += stride, ++k) {
        const int b = k & 1;
        float* zs = buf0 + b * p.slice;
        float4* z4 = (float4*)zs;
        prefetch_slice(p, buf0 + (b ^ 1) * p.slice, r + stride, rows, begin, n);
        cp_async_wait_one();  // this row's slice has landed (the next one may still fly)
        __syncthreads();

        const i64 pos = p.row0 + r;
        const i64 tgt = p.targets[pos];
        const i64 out_row = p.row_map ? p.row_map[pos] : pos;
        const bool ignored = tgt == p.ignore_index;
        const bool tgt_ok = tgt >= 0 && tgt < V;
        if (!ignored) {
            float m = -INFINITY, sum_z = 0.f, zt = 0.f;
            for (int i = threadIdx.x; i < n4; i += blockDim.x) {
                const int j = begin + 4 * i;
                float4 z = z4[i];
                z.x = transform<D>(p, z.x, j);
                z.y = transform<D>(p, z.y, j + 1);
                z.z = transform<D>(p, z.z, j + 2);
                z.w = transform<D>(p, z.w, j + 3);
                z4[i] = z;
                m = fmaxf(m, fmaxf(fmaxf(z.x, z.y), fmaxf(z.z, z.w)));
                sum_z += (z.x + z.y) + (z.z + z.w);
                if (tgt >= j && tgt < j + 4) zt = tgt == j ? z.x : tgt == j + 1 ? z.y : tgt == j + 2 ? z.z : z.w;
            }
            for (int i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x) {
                const float z = transform<D>(p, zs[i], begin + i);
                zs[i] = z;
                m = fmaxf(m, z);
                sum_z += z;
                if (begin + i == tgt) zt = z;
            }
            const float m_b = block_reduce<true>(m, scratch);  // its barriers publish zs
            float s = 0.f;
            for (int i = threadIdx.x; i < n4; i += blockDim.x) {
                const float4 z = z4[i];
                s += (__expf(z.x - m_b) + __expf(z.y - m_b)) + (__expf(z.z - m_b) + __expf(z.w - m_b));
            }
            for (int i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x) s += __expf(zs[i] - m_b);
            s = block_reduce<false>(s, scratch);
            sum_z = block_reduce<false>(sum_z, scratch);
            zt = block_reduce<false>(zt, scratch);
            if (threadIdx.x == 0) {
                stats[b][0] = m_b;
                stats[b][1] = s;
                stats[b][2] = sum_z;
                stats[b][3] = zt;
            }
        }
        cluster_arrive();  // every block has its slice of row r in smem and its stats out
        cluster_wait();
        if (ignored) {
            write_ignored_row<D>(p, pos, out_row, r, begin, end, rank == 0 && threadIdx.x == 0);
        } else {
            if (threadIdx.x < 32) {
                float pm = -INFINITY, ps = 0.f, psz = 0.f, pzt = 0.f;
                if (threadIdx.x < cs) {
                    pm = ld_peer(&stats[b][0], threadIdx.x);
                    ps = ld_peer(&stats[b][1], threadIdx.x);
                    psz = ld_peer(&stats[b][2], threadIdx.x);
                    pzt = ld_peer(&stats[b][3], threadIdx.x);
                }
                for (int o = 16; o > 0; o >>= 1) {
                    float m2 = __shfl_xor_sync(0xffffffffu, pm, o), s2 = __shfl_xor_sync(0xffffffffu, ps, o);
                    lse_merge(pm, ps, m2, s2);
                }
                psz = warp_sum(psz);
                pzt = warp_sum(pzt);
                if (threadIdx.x == 0) {
                    merged[0] = pm + logf(ps);
                    merged[1] = psz;
                    merged[2] = pzt;
                }
            }
            __syncthreads();
            const float lse = merged[0], zt = merged[2];
            if (rank == 0 && threadIdx.x == 0) {
                p.row_loss[out_row] = tgt_ok ? row_loss_value(p, lse, zt, merged[1]) : QUIET_NAN;
            }
            if (p.compute_grads) {
                const float g = p.grad_scale[pos * p.gs_stride] * p.scale;
                if (rank == 0 && threadIdx.x == 0) {
                    p.target_grad[pos] = tgt_ok ? g * target_grad_value(p, zt, lse) : QUIET_NAN;
                }
                typename D::T* drow = (typename D::T*)(p.logits + (i64)r * p.ld_logits) + begin;
                for (int i = threadIdx.x; i < n4; i += blockDim.x) {
                    store_dense_grad4<D>(p, drow + 4 * i, z4[i], begin + 4 * i, tgt, lse, g);
                }
                for (int i = 4 * n4 + threadIdx.x; i < n; i += blockDim.x) {
                    drow[i] = D::store(begin + i == tgt ? 0.f : g * dense_grad(p, zs[i], lse));
                }
            }
        }
        __syncthreads();  // done with this buffer and with merged[]: the next prefetch reuses it
    }
    cluster_arrive();  // peers may still read this block's stats: leave together
    cluster_wait();
#else
    __trap();
#endif
}

// ---- dh: sum the split-K partials, add the target column's term, cast, scatter ---------

struct DhParams {
    const float* partials;    // splits x rows x hidden, float32
    const void* weight;       // (V, H) input dtype
    const i64* targets;       // targets[row0 + r]
    const float* target_grad; // target_grad[row0 + r]
    const i64* row_map;       // or null
    void* dh;                 // (N, H) input dtype, row out_row
    i64 row0;
    i64 ignore_index;
    int rows;
    int hidden;
    int splits;
    int vocab;
};

template <class D>
__device__ void dh_finish(const DhParams& p) {
    const int r = blockIdx.y;
    const i64 pos = p.row0 + r;
    const i64 tgt = p.targets[pos];
    const bool tgt_ok = tgt >= 0 && tgt < p.vocab;
    const float a = tgt_ok ? p.target_grad[pos] : (tgt == p.ignore_index ? 0.f : QUIET_NAN);
    const i64 out_row = p.row_map ? p.row_map[pos] : pos;
    const typename D::T* wrow = (const typename D::T*)p.weight + (tgt_ok ? tgt : 0) * (i64)p.hidden;
    typename D::T* out = (typename D::T*)p.dh + out_row * (i64)p.hidden;
    const i64 split_stride = (i64)p.rows * p.hidden;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < p.hidden; c += gridDim.x * blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < p.splits; ++s) acc += p.partials[s * split_stride + (i64)r * p.hidden + c];
        if (tgt_ok) acc += a * D::load(wrow[c]);
        else acc += a;  // 0 for an ignored row, NaN for a target out of range
        out[c] = D::store(acc);
    }
}

// ---- dW (and db): add the target columns' terms, one CTA per distinct target -----------
//
// `order` sorts the positions by target (stable), so each run of equal targets is summed in
// float32 by one CTA and added to dW's row with a single rounding; no atomics, deterministic.

struct ScatterParams {
    const i64* order;         // positions sorted by target
    const i64* targets;
    const float* target_grad;
    const void* hidden;       // (N, H) with row stride ld_hidden
    const i64* row_map;       // or null
    void* dw;                 // (V, H) input dtype, or null (a frozen weight: no dW)
    float* db;                // (V,) float32 accumulator, or null
    i64 ld_hidden;
    i64 n;
    int hidden_size;
    int vocab;
    int dw_is_f32;            // dw is a float32 accumulator (cast to the dtype afterwards)
    int pad_;
};

template <class D>
__device__ void target_scatter(const ScatterParams& p) {
    const i64 k = blockIdx.x;
    const i64 v = p.targets[p.order[k]];
    if (v < 0 || v >= p.vocab) return;
    if (k > 0 && p.targets[p.order[k - 1]] == v) return;
    i64 end = k + 1;
    while (end < p.n && p.targets[p.order[end]] == v) ++end;
    if (p.dw) {  // null for a frozen weight: db only
        typename D::T* out = (typename D::T*)p.dw + v * (i64)p.hidden_size;
        float* out32 = (float*)p.dw + v * (i64)p.hidden_size;
        const typename D::T* h = (const typename D::T*)p.hidden;
        for (int c = threadIdx.x; c < p.hidden_size; c += blockDim.x) {
            float acc = p.dw_is_f32 ? out32[c] : D::load(out[c]);
            for (i64 q = k; q < end; ++q) {
                const i64 pos = p.order[q];
                const i64 row = p.row_map ? p.row_map[pos] : pos;
                acc += p.target_grad[pos] * D::load(h[row * p.ld_hidden + c]);
            }
            if (p.dw_is_f32) out32[c] = acc;
            else out[c] = D::store(acc);
        }
    }
    if (p.db && threadIdx.x == 0) {
        float acc = p.db[v];
        for (i64 q = k; q < end; ++q) acc += p.target_grad[p.order[q]];
        p.db[v] = acc;
    }
}

// ---- small helpers ------------------------------------------------------------------------

template <class D>
__device__ void gather_rows(const void* src, i64 ld_src, const i64* row_map, i64 row0, void* dst, int hidden) {
    const int r = blockIdx.y;
    const i64 row = row_map[row0 + r];
    const typename D::T* s = (const typename D::T*)src + row * ld_src;
    typename D::T* d = (typename D::T*)dst + (i64)r * hidden;
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < hidden; c += gridDim.x * blockDim.x) d[c] = s[c];
}

template <class D>
__device__ void cast_from_f32(const float* src, void* dst, i64 n) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        ((typename D::T*)dst)[i] = D::store(src[i]);
}

template <class D>
__device__ void fill(void* dst, i64 n, float value) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        ((typename D::T*)dst)[i] = D::store(value);
}

// dst *= *factor in place (n elements; factor a float32 on the device, read here: no host
// sync): the float32 product rounded once (torch's `mul_` by a 0-dim float32 tensor would
// round the factor to a 16-bit dst's dtype first). Nothing to do when the factor is exactly 1, the usual incoming gradient of a mean loss: the product
// is then exact, and the pass would read and write all of dW (0.5 GB at V = 128k, H = 2048)
// for no change. 16-byte accesses when dst is 16-byte aligned.
template <class D>
__device__ void scale_by(void* dst, i64 n, const float* factor) {
    typedef typename D::T T;
    const float f = *factor;
    if (f == 1.f) return;
    constexpr int E = 16 / sizeof(T);
    union Vec {
        uint4 raw;
        T e[E];
    };
    T* d = (T*)dst;
    const i64 first = blockIdx.x * (i64)blockDim.x + threadIdx.x, stride = (i64)gridDim.x * blockDim.x;
    const i64 nv = ((unsigned long long)dst & 15) == 0 ? n / E : 0;
    for (i64 v = first; v < nv; v += stride) {
        Vec w;
        w.raw = ((const uint4*)d)[v];
#pragma unroll
        for (int i = 0; i < E; ++i) w.e[i] = D::store(D::load(w.e[i]) * f);
        ((uint4*)d)[v] = w.raw;
    }
    for (i64 i = nv * E + first; i < n; i += stride) d[i] = D::store(D::load(d[i]) * f);
}

#define INSTANTIATE(SUFFIX, D)                                                                          \
    extern "C" __global__ void __launch_bounds__(1024) ce_rows_##SUFFIX(const CeParams p) { ce_rows<D>(p); } \
    extern "C" __global__ void __launch_bounds__(1024) ce_rows_cluster_##SUFFIX(const CeParams p) {    \
        ce_rows_cluster_impl<D, false>(p);                                                              \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(1024) ce_rows_cluster_plain_##SUFFIX(const CeParams p) { \
        ce_rows_cluster_impl<D, true>(p);                                                               \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(1024, 1) ce_rows_pipelined_##SUFFIX(const CeParams p,  \
                                                                                   int rows) {          \
        ce_rows_pipelined<D>(p, rows);                                                                  \
    }                                                                                                   \
    extern "C" __global__ void dh_finish_##SUFFIX(const DhParams p) { dh_finish<D>(p); }               \
    extern "C" __global__ void target_scatter_##SUFFIX(const ScatterParams p) { target_scatter<D>(p); } \
    extern "C" __global__ void gather_rows_##SUFFIX(const void* src, i64 ld_src, const i64* row_map,   \
                                                    i64 row0, void* dst, int hidden) {                  \
        gather_rows<D>(src, ld_src, row_map, row0, dst, hidden);                                        \
    }                                                                                                   \
    extern "C" __global__ void cast_from_f32_##SUFFIX(const float* src, void* dst, i64 n) {            \
        cast_from_f32<D>(src, dst, n);                                                                  \
    }                                                                                                   \
    extern "C" __global__ void fill_##SUFFIX(void* dst, i64 n, float value) { fill<D>(dst, n, value); } \
    extern "C" __global__ void scale_by_##SUFFIX(void* dst, i64 n, const float* factor) {              \
        scale_by<D>(dst, n, factor);                                                                    \
    }

INSTANTIATE(bf16, Bf16)
INSTANTIATE(f16, F16)
INSTANTIATE(f32, F32)
