#line 2 "rms_norm.cu"
// RMSNorm forward and backward (README, "Fused decoder ops"; CPU twin:
// runtime/src/cpu/fusions/rms_norm.rs). Launched by runtime/src/cuda/fusions.rs.
//
// Per row of `hidden` elements, in float32:
//   r  = 1 / sqrt(sum(x^2) / hidden + eps)            (saved: rstd, one float per row)
//   xn = x * r
//   y  = (offset + w) * round_X(xn)   with cast_before (Llama: weight * x.to(input_dtype))
//   y  = xn * (offset + w)            without it       (Gemma: (x * (1 + w.float())).type_as(x))
// rounded once to the output type O. Backward, with g = dy * (offset + w):
//   dx = r * (g - xn * sum(g * xn) / hidden)
//   dw = sum over rows of dy * round_X(xn) (cast_before) or dy * xn, accumulated in float32:
//        per block into a float32 partial row (fixed order), then `rms_dw_finish` adds the
//        partial rows in order and rounds once to W. Deterministic for a given launch shape.
//
// With the decoder layer's residual add fused in front (`rms_fwd_add_*`, `residual` and
// `sum_out` set): s = round_X(x + residual) (torch's add of two X tensors: a float32 sum
// rounded once) is written to `sum_out` and normalised in place of x. Its backward is the
// norm's on s, with `dres` (the gradient reaching s from elsewhere, X, or null) added in
// float32 before dx's one rounding: dx = round_X(r * (g - xn * c) + dres).
//
// A "team" of threads owns a row: a power of two up to 32 (several rows per warp, for short
// rows such as Qwen3's per-head q/k norms) or the whole block (one row per block, at most
// 512 threads: the kernels are built for 128 registers per thread). The forward is bound by
// its instruction count more than by bandwidth (ncu, H200: 84% SM throughput at 52% of DRAM),
// so it computes no index by division, reduces with one barrier, and in Llama's order with a
// 16-bit weight and no offset rounds and multiplies packed pairs (`pack2` / `mul2`, exactly
// the float32 formula's result). The `_v`
// kernels keep the row in registers (NV vectors of 8 elements per thread: one read of x in
// the forward, one of x and dy in the backward; needs hidden % 8 == 0 and 16-byte aligned
// rows); the `_any` kernels take any shape and read the row twice.

struct RmsFwdParams {
    const void* x;     // (rows, hidden) X, row-major, contiguous
    const void* w;     // (hidden,) W
    void* y;           // (rows, hidden) O
    float* rstd;       // (rows,)
    i64 rows;
    int hidden;
    int team;          // threads per row
    float eps;
    float offset;      // added to the weight in float32
    int cast_before;   // 1: Llama order, 0: Gemma order
    int pad_;
    const void* residual; // (rows, hidden) X: the rms_fwd_add_ kernels only
    void* sum_out;        // (rows, hidden) X: x + residual, rounded to X
};

struct RmsBwdParams {
    const void* dy;    // (rows, hidden) O
    const void* x;     // (rows, hidden) X
    const void* w;     // (hidden,) W
    const float* rstd; // (rows,)
    void* dx;          // (rows, hidden) X
    float* dw_partial; // (gridDim.x, hidden) float32, or null: no weight gradient
    i64 rows;
    int hidden;
    int team;
    float offset;
    int cast_before;
    const void* dres;  // (rows, hidden) X added to dx, or null
};

template <class X>
__device__ __forceinline__ float rms_out(const RmsFwdParams& p, float x, float r, float w) {
    const float xn = x * r;
    const float we = p.offset + w;
    return p.cast_before ? we * round_to<X>(xn) : xn * we;
}

__device__ __forceinline__ float rms_rstd(float sum_sq, int hidden, float eps) {
    return 1.f / sqrtf(sum_sq / (float)hidden + eps);
}

// ---- forward -------------------------------------------------------------------------------

// x's 8 elements of a raw vector as float32. bf16: a word's high half is already the top of a
// float32 (one AND), its low half one shift: 8 instructions, against 12 through `unpack`'s
// per-element extraction (the forward is bound by instruction issue).
template <class D>
__device__ __forceinline__ void unpack8(const RawVec<D, 8>& r, float (&v)[8]) {
    if constexpr (same_type<D, Bf16>::value) {
        const unsigned u[4] = {r.w[0].x, r.w[0].y, r.w[0].z, r.w[0].w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            v[2 * i] = __uint_as_float(u[i] << 16);
            v[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
        }
    } else {
        unpack<D, 8>(r, v);
    }
}

// a := round_X(a + b) on the raw bytes of 8 elements (what torch's add of two X tensors
// gives: the float32 sum rounded to X). 16-bit types: one packed instruction per pair, which
// rounds the exact sum once to X; the same value, since float32's 24 bits are at least
// 2p + 2 for p-bit inputs (p = 8, 11), where rounding twice is innocuous for a sum. bf16 as
// fma(a, 1, b): sm_80 has no bf16x2 add.
template <class X>
__device__ __forceinline__ void add_raw8(RawVec<X, 8>& a, const RawVec<X, 8>& b) {
    if constexpr (same_type<X, F32>::value) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            a.w[c] = make_uint4(__float_as_uint(__uint_as_float(a.w[c].x) + __uint_as_float(b.w[c].x)),
                                __float_as_uint(__uint_as_float(a.w[c].y) + __uint_as_float(b.w[c].y)),
                                __float_as_uint(__uint_as_float(a.w[c].z) + __uint_as_float(b.w[c].z)),
                                __float_as_uint(__uint_as_float(a.w[c].w) + __uint_as_float(b.w[c].w)));
        }
    } else {
        unsigned* u = &a.w[0].x;
        const unsigned* v = &b.w[0].x;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if constexpr (same_type<X, Bf16>::value)
                asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(u[i]) : "r"(u[i]), "r"(0x3f803f80u), "r"(v[i]));
            else
                asm("add.rn.f16x2 %0, %1, %2;" : "=r"(u[i]) : "r"(u[i]), "r"(v[i]));
        }
    }
}

// ADD: the residual add in front (rms_fwd_add_*): the residual's raw vectors load with x's,
// their rounded sums are stored to sum_out as they are and normalised in place of x.
template <class X, class W, class O, int NV, bool ADD>
__device__ void rms_fwd_vec(const RmsFwdParams& p) {
    __shared__ float scratch[32];
    // A team is the whole block or a power of two up to 32 (rms_layout): no integer division
    // before the loads, which start each short-lived block.
    const int team = p.team;
    const bool whole = team == (int)blockDim.x;
    const int lane = whole ? threadIdx.x : threadIdx.x & (team - 1);
    const i64 row = whole ? (i64)blockIdx.x
                          : ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> (__ffs(team) - 1);
    const bool active = row < p.rows;
    const i64 base = (active ? row : 0) * p.hidden;
    const typename X::T* xr = (const typename X::T*)p.x + base;
    // Every load (x as raw bytes, and w, whose latency then hides behind the reduction) is
    // issued before any value is used: one memory round trip per row, not NV (the compiler
    // does not move a vector's load above the use of the previous one, each behind its own
    // bounds test). ADD: the residual's loads go with x's, and w's wait for the reduction
    // (below): x, residual and w in registers at once spill in _v1 (32 registers, float32)
    // and _v2 (40, 16-bit weight).
    RawVec<X, 8> xraw[NV];
    RawVec<X, 8> rraw[ADD ? NV : 1];
    RawVec<W, 8> wv[NV];
#pragma unroll
    for (int v = 0; v < NV; ++v) {
        const int col = (v * team + lane) * 8;
        if (active && col < p.hidden) {
            load_raw<X, 8>(xr + col, xraw[v]);
            if constexpr (ADD)
                load_raw<X, 8>((const typename X::T*)p.residual + base + col, rraw[v]);
            else
                load_raw<W, 8>((const typename W::T*)p.w + col, wv[v]);
        } else {
            xraw[v] = RawVec<X, 8>{};  // zero bits: 0.0 in every storage type
            if constexpr (ADD) rraw[v] = RawVec<X, 8>{};
        }
    }
    float xv[NV][8];
    float ss = 0.f;
#pragma unroll
    for (int v = 0; v < NV; ++v) {
        if constexpr (ADD) {
            const int col = (v * team + lane) * 8;
            add_raw8<X>(xraw[v], rraw[v]);  // x := s = round_X(x + residual)
            if (active && col < p.hidden) {
                uint4* sv = reinterpret_cast<uint4*>((typename X::T*)p.sum_out + base + col);
#pragma unroll
                for (int c = 0; c < (int)(8 * sizeof(typename X::T) / 16); ++c) sv[c] = xraw[v].w[c];
            }
        }
        unpack8<X>(xraw[v], xv[v]);
#pragma unroll
        for (int i = 0; i < 8; ++i) ss += xv[v][i] * xv[v][i];
    }
    ss = team_sum<true>(ss, team, scratch);
    if (!active) return;  // no reduction follows
    if constexpr (ADD) {
        // s crossed the reduction as raw bytes (16-bit: half the registers of its float32
        // values; the empty asm keeps the compiler from holding the first unpack's instead)
        // and is unpacked again. w loads now, through plain loads, which the assembler leaves
        // below the reduction (read-only ones it hoisted back above it, and spilled).
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            const int col = (v * team + lane) * 8;
            if constexpr (sizeof(typename X::T) == 2) {
                asm("" : "+r"(xraw[v].w[0].x), "+r"(xraw[v].w[0].y), "+r"(xraw[v].w[0].z), "+r"(xraw[v].w[0].w));
                unpack8<X>(xraw[v], xv[v]);
            }
            if (col < p.hidden) {
                const uint4* wp = reinterpret_cast<const uint4*>((const typename W::T*)p.w + col);
#pragma unroll
                for (int c = 0; c < (int)(8 * sizeof(typename W::T) / 16); ++c) wv[v].w[c] = wp[c];
            }
        }
    }
    const float r = rms_rstd(ss, p.hidden, p.eps);
    if (lane == 0) p.rstd[row] = r;
    typename O::T* yr = (typename O::T*)p.y + row * p.hidden;
    if constexpr (sizeof(typename X::T) == 2 && same_type<X, W>::value && same_type<X, O>::value) {
        // Llama's order, no offset: y = w * round_X(xn), one packed multiply per pair (mul2).
        if (p.cast_before && p.offset == 0.f) {
#pragma unroll
            for (int v = 0; v < NV; ++v) {
                const int col = (v * team + lane) * 8;
                if (col < p.hidden) {
                    const uint4 w = wv[v].w[0];
                    unsigned xn[4];
#pragma unroll
                    for (int i = 0; i < 4; ++i) xn[i] = X::pack2(xv[v][2 * i] * r, xv[v][2 * i + 1] * r);
                    reinterpret_cast<uint4*>(yr + col)[0] =
                        make_uint4(X::mul2(xn[0], w.x), X::mul2(xn[1], w.y), X::mul2(xn[2], w.z), X::mul2(xn[3], w.w));
                }
            }
            return;
        }
    }
#pragma unroll
    for (int v = 0; v < NV; ++v) {
        const int col = (v * team + lane) * 8;
        if (col < p.hidden) {
            float w[8], out[8];
            unpack8<W>(wv[v], w);
#pragma unroll
            for (int i = 0; i < 8; ++i) out[i] = rms_out<X>(p, xv[v][i], r, w[i]);
            store_vec<O, 8>(yr + col, out);
        }
    }
}

// One row per block (team = blockDim.x), any hidden size and alignment. ADD: the first pass
// writes s to sum_out and the second reads it back (each thread its own columns).
template <class X, class W, class O, bool ADD>
__device__ void rms_fwd_any(const RmsFwdParams& p) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const typename X::T* xr = (const typename X::T*)p.x + row * p.hidden;
    const typename W::T* w = (const typename W::T*)p.w;
    const typename X::T* rr = (const typename X::T*)p.residual + row * p.hidden;  // ADD
    typename X::T* sr = (typename X::T*)p.sum_out + row * p.hidden;                // ADD
    float ss = 0.f;
    for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) {
        float x = X::load(xr[c]);
        if constexpr (ADD) {
            sr[c] = X::store(x + X::load(rr[c]));
            x = X::load(sr[c]);
        }
        ss += x * x;
    }
    if constexpr (ADD) xr = sr;
    ss = team_sum(ss, blockDim.x, scratch);
    const float r = rms_rstd(ss, p.hidden, p.eps);
    if (threadIdx.x == 0) p.rstd[row] = r;
    typename O::T* yr = (typename O::T*)p.y + row * p.hidden;
    for (int c = threadIdx.x; c < p.hidden; c += blockDim.x)
        yr[c] = O::store(rms_out<X>(p, X::load(xr[c]), r, W::load(w[c])));
}

// ---- backward ------------------------------------------------------------------------------
//
// Persistent: gridDim.x blocks, each team walks rows team_id, team_id + teams, ...; a thread
// owns the same columns in every row, so it keeps its share of dw in registers. Every team of
// a warp runs the same number of iterations (shuffles need all 32 lanes).

template <class X, class W, class O, int NV>
__device__ void rms_bwd_vec(const RmsBwdParams& p) {
    __shared__ float scratch[32];
    extern __shared__ float team_dw[];  // (teams, hidden) when several teams share a block
    const int team = p.team;
    const int lane = threadIdx.x % team;
    const int teams = blockDim.x / team;
    const int tib = threadIdx.x / team;
    const i64 nteams = (i64)gridDim.x * teams;
    const i64 first = (i64)blockIdx.x * teams + tib;
    const i64 iters = (p.rows + nteams - 1) / nteams;
    const bool want_dw = p.dw_partial != nullptr;
    // x (as xn), dy and the dw sums stay in registers; the weight is re-read per row from
    // L1 (hidden elements, shared by every row), which keeps the kernel within 128
    // registers per thread at NV = 4. So is dres, read only where it is added.
    const typename W::T* w = (const typename W::T*)p.w;
    const typename X::T* dres = (const typename X::T*)p.dres;
    float dw[NV][8];
#pragma unroll
    for (int v = 0; v < NV; ++v) {
#pragma unroll
        for (int i = 0; i < 8; ++i) dw[v][i] = 0.f;
    }
    for (i64 it = 0; it < iters; ++it) {
        const i64 row = first + it * nteams;
        const bool active = row < p.rows;
        const i64 base = (active ? row : 0) * p.hidden;
        const float r = active ? p.rstd[row] : 0.f;
        float xn[NV][8], dy[NV][8];
        float dot = 0.f;
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            const int col = (v * team + lane) * 8;
            float we[8];
            if (active && col < p.hidden) {
                load_vec<X, 8>((const typename X::T*)p.x + base + col, xn[v]);
                load_vec<O, 8>((const typename O::T*)p.dy + base + col, dy[v]);
                load_vec<W, 8>(w + col, we);
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) xn[v][i] = dy[v][i] = we[i] = 0.f;
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                xn[v][i] *= r;
                dot += dy[v][i] * (p.offset + we[i]) * xn[v][i];
            }
        }
        dot = team_sum(dot, team, scratch);
        if (!active) continue;
        const float c = dot / (float)p.hidden;
        typename X::T* dxr = (typename X::T*)p.dx + base;
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            const int col = (v * team + lane) * 8;
            if (col < p.hidden) {
                float out[8], we[8];
                load_vec<W, 8>(w + col, we);
#pragma unroll
                for (int i = 0; i < 8; ++i) {
                    out[i] = r * (dy[v][i] * (p.offset + we[i]) - xn[v][i] * c);
                    if (want_dw) dw[v][i] += dy[v][i] * (p.cast_before ? round_to<X>(xn[v][i]) : xn[v][i]);
                }
                if (dres) {
                    float d[8];
                    load_vec<X, 8>(dres + base + col, d);
#pragma unroll
                    for (int i = 0; i < 8; ++i) out[i] += d[i];
                }
                store_vec<X, 8>(dxr + col, out);
            }
        }
    }
    if (!want_dw) return;
    float* part = p.dw_partial + (i64)blockIdx.x * p.hidden;
    if (teams == 1) {
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            const int col = (v * team + lane) * 8;
            if (col < p.hidden) store_vec<F32, 8>(part + col, dw[v]);
        }
        return;
    }
    // Several teams: their rows of dw meet in shared memory and are added in team order.
#pragma unroll
    for (int v = 0; v < NV; ++v) {
        const int col = (v * team + lane) * 8;
        if (col < p.hidden) {
#pragma unroll
            for (int i = 0; i < 8; ++i) team_dw[tib * p.hidden + col + i] = dw[v][i];
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) {
        float s = 0.f;
        for (int t = 0; t < teams; ++t) s += team_dw[t * p.hidden + c];
        part[c] = s;
    }
}

// One team = the block, any hidden size and alignment; the block's partial row of dw is
// accumulated in place (each column owned by one thread). gridDim.x <= rows.
template <class X, class W, class O>
__device__ void rms_bwd_any(const RmsBwdParams& p) {
    __shared__ float scratch[32];
    const typename W::T* w = (const typename W::T*)p.w;
    float* part = p.dw_partial ? p.dw_partial + (i64)blockIdx.x * p.hidden : nullptr;
    const typename X::T* dres = (const typename X::T*)p.dres;
    for (i64 row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const i64 base = row * p.hidden;
        const typename X::T* xr = (const typename X::T*)p.x + base;
        const typename O::T* dyr = (const typename O::T*)p.dy + base;
        const float r = p.rstd[row];
        float dot = 0.f;
        for (int c = threadIdx.x; c < p.hidden; c += blockDim.x)
            dot += (O::load(dyr[c]) * (p.offset + W::load(w[c]))) * (X::load(xr[c]) * r);
        dot = team_sum(dot, blockDim.x, scratch);
        const float k = dot / (float)p.hidden;
        typename X::T* dxr = (typename X::T*)p.dx + base;
        for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) {
            const float dy = O::load(dyr[c]);
            const float xn = X::load(xr[c]) * r;
            float dx = r * (dy * (p.offset + W::load(w[c])) - xn * k);
            if (dres) dx += X::load(dres[base + c]);
            dxr[c] = X::store(dx);
            if (part) {
                const float contrib = dy * (p.cast_before ? round_to<X>(xn) : xn);
                part[c] = row == (i64)blockIdx.x ? contrib : part[c] + contrib;
            }
        }
    }
}

// dw[c] = round_W(sum over b of partial[b][c]), b in order. Blocks of 256 threads: 32
// columns x 8 interleaved slices of the partial rows, the 8 slice sums added in order.
template <class W>
__device__ void rms_dw_finish(const float* __restrict__ partial, int parts, int hidden, void* dw) {
    __shared__ float acc[8][33];
    const int cx = threadIdx.x & 31, s = threadIdx.x >> 5;
    const int col = blockIdx.x * 32 + cx;
    float sum = 0.f;
    if (col < hidden)
        for (int b = s; b < parts; b += 8) sum += partial[(i64)b * hidden + col];
    acc[s][cx] = sum;
    __syncthreads();
    if (s == 0 && col < hidden) {
        float t = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) t += acc[k][cx];
        ((typename W::T*)dw)[col] = W::store(t);
    }
}

// The _v2 forward (hidden 2056 to 8192: blocks of 160 to 512 threads) fits 40 registers with
// a 16-bit weight: 6 blocks of 256 per SM (hidden 4096), 5 at its natural 44. A float32
// weight (8 registers a vector) would spill there.
#define RMS_FWD_V2_BLOCKS(W) (sizeof(W::T) == 2 ? 3 : 1)

// The four forward kernels of a dtype combination: rms_fwd_NAME_* (KIND fwd, ADD false) or
// rms_fwd_add_NAME_* (KIND fwd_add, ADD true: the residual add in front), same bounds.
#define RMS_FWD(KIND, NAME, X, W, O, ADD)                                                                 \
    extern "C" __global__ void __launch_bounds__(512, 4) rms_##KIND##_##NAME##_v1(const RmsFwdParams p) { \
        rms_fwd_vec<X, W, O, 1, ADD>(p);                                                                  \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(512, RMS_FWD_V2_BLOCKS(W))                               \
        rms_##KIND##_##NAME##_v2(const RmsFwdParams p) {                                                  \
        rms_fwd_vec<X, W, O, 2, ADD>(p);                                                                  \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(512, 1) rms_##KIND##_##NAME##_v4(const RmsFwdParams p) { \
        rms_fwd_vec<X, W, O, 4, ADD>(p);                                                                  \
    }                                                                                                     \
    extern "C" __global__ void __launch_bounds__(512) rms_##KIND##_##NAME##_any(const RmsFwdParams p) {   \
        rms_fwd_any<X, W, O, ADD>(p);                                                                     \
    }

#define RMS_INSTANTIATE(NAME, X, W, O)                                                             \
    RMS_FWD(fwd, NAME, X, W, O, false)                                                             \
    RMS_FWD(fwd_add, NAME, X, W, O, true)                                                          \
    extern "C" __global__ void __launch_bounds__(512) rms_bwd_##NAME##_v1(const RmsBwdParams p) {  \
        rms_bwd_vec<X, W, O, 1>(p);                                                                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(512) rms_bwd_##NAME##_v2(const RmsBwdParams p) {  \
        rms_bwd_vec<X, W, O, 2>(p);                                                                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(512) rms_bwd_##NAME##_v4(const RmsBwdParams p) {  \
        rms_bwd_vec<X, W, O, 4>(p);                                                                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(512) rms_bwd_##NAME##_any(const RmsBwdParams p) { \
        rms_bwd_any<X, W, O>(p);                                                                   \
    }

// (x, weight, output) dtypes: the weight is the input's dtype or float32 (the Python side
// upcasts any other weight exactly); the output is the input's dtype or float32.
RMS_INSTANTIATE(bf16_bf16_bf16, Bf16, Bf16, Bf16)
RMS_INSTANTIATE(f16_f16_f16, F16, F16, F16)
RMS_INSTANTIATE(f32_f32_f32, F32, F32, F32)
RMS_INSTANTIATE(bf16_f32_f32, Bf16, F32, F32)
RMS_INSTANTIATE(bf16_f32_bf16, Bf16, F32, Bf16)
RMS_INSTANTIATE(f16_f32_f32, F16, F32, F32)
RMS_INSTANTIATE(f16_f32_f16, F16, F32, F16)

#define RMS_FINISH(NAME, W)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                              \
        rms_dw_finish_##NAME(const float* partial, int parts, int hidden, void* dw) {              \
        rms_dw_finish<W>(partial, parts, hidden, dw);                                              \
    }

RMS_FINISH(bf16, Bf16)
RMS_FINISH(f16, F16)
RMS_FINISH(f32, F32)

// ---- gated RMSNorm -------------------------------------------------------------------------
//
// The `*RMSNormGated` of Qwen3-Next / Qwen3.5 / OLMo-Hybrid (cast_before) and of Kimi-Linear /
// Bailing / GLM-5-Next (strict float32), the gate applied after the norm, and Mamba-2's (Bamba,
// Granite 4, Nemotron-H, Zamba2: gate_first, in groups); CPU twin:
// runtime/src/cpu/fusions/gated_norm.rs. Per row, in float32, with a = act(gate) (act 0: SiLU,
// 2: sigmoid), u = x (gate after) or x * a (gate first), r = rsqrt(mean(u^2) + eps), un = u * r:
//   v = round_W(w * round_X(un))    cast_before (weight * x.to(input_dtype): W is X or float32)
//   v = w * un                      strict (weight.to(float32) * x)
//   y = round_X(v * a)              gate after (the forms end in .to(input_dtype))
//   y = round_X(v)                  gate first
// Backward from the saved x, gate and rstd, with dr = dy * a (gate after) or dy (gate first):
//   du    = r * (dr * w - un * sum(dr * w * un) / hidden)
//   gate after: dx = round_X(du), dgate = round_X(dy * v * act'(g))
//   gate first: dx = round_X(du * a), dgate = round_X(du * x * act'(g))
//   dw    = sum over rows of dr * round_X(un) (cast_before) or dr * un: per-team float32 rows
//           in shared memory, added in team order into the block's partial row, which
//           rms_dw_finish adds in order and rounds once to W.
// A team (rms_layout's) owns a row and each thread walks its columns in vectors of E = 8
// (16-byte aligned rows, hidden % 8 == 0) or single elements, reading the row again after the
// reduction (from L1): the rows are a head's (128 or 256 elements) or a Mamba group's.
// Groups: a row of the kernel is one group of hidden elements, `groups` of them per row of x;
// the weight has groups * hidden elements and row i reads its segment i % groups. The
// backward's grid makes the team count a multiple of groups (fusions.rs), so that every row
// a team walks is of the team's one group: its dw row stays `hidden` floats.

struct GatedRmsParams {
    const void* x;       // (rows, hidden) X
    const void* gate;    // (rows, hidden) X
    const void* w;       // (groups * hidden,) W
    const void* dy;      // (rows, hidden) X: backward
    void* y;             // forward: y (rows, hidden) X; backward: dx
    void* dgate;         // backward: (rows, hidden) X
    float* rstd;         // (rows,): written by the forward, read by the backward
    float* dw_partial;   // backward: (gridDim.x, groups * hidden) float32, or null: no dw
    i64 rows;
    int hidden;
    int team;
    float eps;
    int cast_before;
    int act;             // 0: SiLU, 2: sigmoid
    int groups;          // the gate's place is in the kernel's name (_first: before the norm)
};

template <bool FAST>
__device__ __forceinline__ float gate_act(int act, float g) {
    return act == 0 ? silu<FAST>(g) : sigmoid<FAST>(g);
}

template <bool FAST>
__device__ __forceinline__ float gate_act_grad(int act, float g) {
    const float s = sigmoid<FAST>(g);
    return act == 0 ? s * (1.f + g * (1.f - s)) : s * (1.f - s);
}

// v of the formulas above, before the gate.
template <class X, class W>
__device__ __forceinline__ float gated_norm_value(int cast_before, float xn, float w) {
    return cast_before ? round_to<W>(w * round_to<X>(xn)) : w * xn;
}

// The row's weight segment.
template <class W>
__device__ __forceinline__ const typename W::T* gated_weight(const GatedRmsParams& p, i64 row) {
    return (const typename W::T*)p.w + (p.groups > 1 ? row % p.groups : 0) * (i64)p.hidden;
}

template <class X, class W, int E, bool GATE_FIRST>
__device__ void gated_rms_fwd(const GatedRmsParams& p) {
    __shared__ float scratch[32];
    constexpr bool FAST = sizeof(typename X::T) == 2;
    const int team = p.team;
    const bool whole = team == (int)blockDim.x;
    const int lane = whole ? threadIdx.x : threadIdx.x & (team - 1);
    const i64 row = whole ? (i64)blockIdx.x
                          : ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> (__ffs(team) - 1);
    const bool active = row < p.rows;
    const i64 base = (active ? row : 0) * p.hidden;
    const typename X::T* xr = (const typename X::T*)p.x + base;
    const typename X::T* gr = (const typename X::T*)p.gate + base;
    float ss = 0.f;
    if (active) {
        for (int col = lane * E; col < p.hidden; col += team * E) {
            float v[E];
            load_vec<X, E>(xr + col, v);
            if constexpr (GATE_FIRST) {
                float g[E];
                load_vec<X, E>(gr + col, g);
#pragma unroll
                for (int i = 0; i < E; ++i) v[i] *= gate_act<FAST>(p.act, g[i]);
            }
#pragma unroll
            for (int i = 0; i < E; ++i) ss += v[i] * v[i];
        }
    }
    ss = team_sum<true>(ss, team, scratch);  // every thread of a team takes part
    if (!active) return;
    const float r = rms_rstd(ss, p.hidden, p.eps);
    if (lane == 0) p.rstd[row] = r;
    const typename W::T* wr = gated_weight<W>(p, row);
    typename X::T* yr = (typename X::T*)p.y + base;
    for (int col = lane * E; col < p.hidden; col += team * E) {
        float x[E], g[E], w[E], out[E];
        load_vec<X, E>(xr + col, x);
        load_vec<X, E>(gr + col, g);
        load_vec<W, E>(wr + col, w);
#pragma unroll
        for (int i = 0; i < E; ++i) {
            const float a = gate_act<FAST>(p.act, g[i]);
            out[i] = GATE_FIRST ? gated_norm_value<X, W>(p.cast_before, x[i] * a * r, w[i])
                                  : gated_norm_value<X, W>(p.cast_before, x[i] * r, w[i]) * a;
        }
        store_vec<X, E>(yr + col, out);
    }
}

// Persistent, as rms_bwd_vec: gridDim.x blocks, each team walks rows team_id, team_id + teams,
// ...; every team of a block runs the same number of iterations (the reductions need every
// thread). A thread owns the same columns in every row, so it updates its team's dw row in
// shared memory without a barrier until the end.
template <class X, class W, int E, bool GATE_FIRST>
__device__ void gated_rms_bwd(const GatedRmsParams& p) {
    __shared__ float scratch[32];
    extern __shared__ float team_dw[];  // (teams, hidden) when dw is wanted
    constexpr bool FAST = sizeof(typename X::T) == 2;
    const int team = p.team;
    const int lane = threadIdx.x % team;
    const int teams = blockDim.x / team;
    const int tib = threadIdx.x / team;
    const i64 nteams = (i64)gridDim.x * teams;
    const i64 first = (i64)blockIdx.x * teams + tib;
    const i64 iters = (p.rows + nteams - 1) / nteams;
    const bool want_dw = p.dw_partial != nullptr;
    float* my_dw = team_dw + (i64)tib * p.hidden;
    // nteams % groups == 0: every row of this team is of its first row's group.
    const typename W::T* wp = gated_weight<W>(p, first);
    if (want_dw) {
        for (int col = lane * E; col < p.hidden; col += team * E) {
#pragma unroll
            for (int i = 0; i < E; ++i) my_dw[col + i] = 0.f;
        }
    }
    for (i64 it = 0; it < iters; ++it) {
        const i64 row = first + it * nteams;
        const bool active = row < p.rows;
        const i64 base = (active ? row : 0) * p.hidden;
        const typename X::T* xr = (const typename X::T*)p.x + base;
        const typename X::T* gr = (const typename X::T*)p.gate + base;
        const typename X::T* dyr = (const typename X::T*)p.dy + base;
        const float r = active ? p.rstd[row] : 0.f;
        float dot = 0.f;
        if (active) {
            for (int col = lane * E; col < p.hidden; col += team * E) {
                float x[E], g[E], dy[E], w[E];
                load_vec<X, E>(xr + col, x);
                load_vec<X, E>(gr + col, g);
                load_vec<X, E>(dyr + col, dy);
                load_vec<W, E>(wp + col, w);
#pragma unroll
                for (int i = 0; i < E; ++i) {
                    const float a = gate_act<FAST>(p.act, g[i]);
                    dot += GATE_FIRST ? dy[i] * w[i] * (x[i] * a * r) : dy[i] * a * w[i] * (x[i] * r);
                }
            }
        }
        dot = team_sum(dot, team, scratch);
        if (!active) continue;
        const float c = dot / (float)p.hidden;
        typename X::T* dxr = (typename X::T*)p.y + base;
        typename X::T* dgr = (typename X::T*)p.dgate + base;
        for (int col = lane * E; col < p.hidden; col += team * E) {
            float x[E], g[E], dy[E], w[E], dx[E], dg[E];
            load_vec<X, E>(xr + col, x);
            load_vec<X, E>(gr + col, g);
            load_vec<X, E>(dyr + col, dy);
            load_vec<W, E>(wp + col, w);
#pragma unroll
            for (int i = 0; i < E; ++i) {
                const float a = gate_act<FAST>(p.act, g[i]);
                if constexpr (GATE_FIRST) {
                    const float un = x[i] * a * r;
                    const float du = r * (dy[i] * w[i] - un * c);
                    dx[i] = du * a;
                    dg[i] = du * x[i] * gate_act_grad<FAST>(p.act, g[i]);
                    if (want_dw) my_dw[col + i] += dy[i] * (p.cast_before ? round_to<X>(un) : un);
                } else {
                    const float xn = x[i] * r;
                    const float dr = dy[i] * a;
                    dx[i] = r * (dr * w[i] - xn * c);
                    dg[i] = dy[i] * gated_norm_value<X, W>(p.cast_before, xn, w[i]) * gate_act_grad<FAST>(p.act, g[i]);
                    if (want_dw) my_dw[col + i] += dr * (p.cast_before ? round_to<X>(xn) : xn);
                }
            }
            store_vec<X, E>(dxr + col, dx);
            store_vec<X, E>(dgr + col, dg);
        }
    }
    if (!want_dw) return;
    __syncthreads();
    // The block's partial row spans every group: column c of group c / hidden sums the dw
    // rows of the teams of that group (none: 0).
    const int width = p.groups * p.hidden;
    float* part = p.dw_partial + (i64)blockIdx.x * width;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        const int g = c / p.hidden, col = c - g * p.hidden;
        float s = 0.f;
        for (int t = 0; t < teams; ++t)
            if (((int)blockIdx.x * teams + t) % p.groups == g) s += team_dw[(i64)t * p.hidden + col];
        part[c] = s;
    }
}

// The gate's place is a template parameter: the backward's inner loop holds every register
// it has (a run-time test there cost the gate-after backward 9% on the H200).
#define GATED_RMS_KERNELS(NAME, X, W, GF, TAG)                                                        \
    extern "C" __global__ void __launch_bounds__(512) gated_rms_fwd##TAG##_##NAME##_v8(const GatedRmsParams p) { \
        gated_rms_fwd<X, W, 8, GF>(p);                                                                \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(512) gated_rms_fwd##TAG##_##NAME##_any(const GatedRmsParams p) {\
        gated_rms_fwd<X, W, 1, GF>(p);                                                                \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(512) gated_rms_bwd##TAG##_##NAME##_v8(const GatedRmsParams p) { \
        gated_rms_bwd<X, W, 8, GF>(p);                                                                \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(512) gated_rms_bwd##TAG##_##NAME##_any(const GatedRmsParams p) {\
        gated_rms_bwd<X, W, 1, GF>(p);                                                                \
    }

// gated_rms_{fwd,bwd}_NAME_* (the gate after the norm) and gated_rms_{fwd,bwd}_first_NAME_*.
#define GATED_RMS_INSTANTIATE(NAME, X, W)      \
    GATED_RMS_KERNELS(NAME, X, W, false, )     \
    GATED_RMS_KERNELS(NAME, X, W, true, _first)

// (x and gate, weight) dtypes: the weight is x's dtype or float32.
GATED_RMS_INSTANTIATE(bf16_bf16, Bf16, Bf16)
GATED_RMS_INSTANTIATE(f16_f16, F16, F16)
GATED_RMS_INSTANTIATE(f32_f32, F32, F32)
GATED_RMS_INSTANTIATE(bf16_f32, Bf16, F32)
GATED_RMS_INSTANTIATE(f16_f32, F16, F32)

// ---- unweighted RMSNorm, scale rounded first -------------------------------------------------
//
// DeepSeek-V4's, GLM-5-Next's and Inkling-2's `UnweightedRMSNorm`:
// `x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)`
// (CPU twin: runtime/src/cpu/fusions/scale_first.rs). Per row, in float32:
//   r  = 1 / sqrt(sum(x^2) / hidden + eps)    (saved: rstd)
//   s  = round_X(r)                           (stock's `.to(x.dtype)` of the scale)
//   y  = round_X(x * s)                       (stock's multiply of two X tensors)
//   dx = round_X(s * dy - x * r^3 * sum(dy * x) / hidden)
// No weight: no cross-row sum, so one row per block (blockDim.x: hidden rounded up to 32, at
// most 512; any hidden size and alignment, the row read twice as by `rms_fwd_any`). These
// norms are the narrow ones of DeepSeek-V4's attention (q/kv, a few hundred columns): the
// launch, not the arithmetic, is their cost, so no vector path.

struct RmsScaleFirstParams {
    const void* x;     // (rows, hidden) X, row-major, contiguous
    const void* dy;    // (rows, hidden) X: the backward only
    void* out;         // (rows, hidden) X: y (forward) or dx (backward)
    float* rstd;       // (rows,): written by the forward, read by the backward
    i64 rows;
    int hidden;
    float eps;
};

template <class X>
__device__ void rms_scale_first_fwd(const RmsScaleFirstParams& p) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const typename X::T* xr = (const typename X::T*)p.x + row * p.hidden;
    float ss = 0.f;
    for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) {
        const float x = X::load(xr[c]);
        ss += x * x;
    }
    ss = team_sum<true>(ss, blockDim.x, scratch);
    const float r = rms_rstd(ss, p.hidden, p.eps);
    if (threadIdx.x == 0) p.rstd[row] = r;
    const float s = round_to<X>(r);
    typename X::T* yr = (typename X::T*)p.out + row * p.hidden;
    for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) yr[c] = X::store(X::load(xr[c]) * s);
}

template <class X>
__device__ void rms_scale_first_bwd(const RmsScaleFirstParams& p) {
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const i64 base = row * p.hidden;
    const typename X::T* xr = (const typename X::T*)p.x + base;
    const typename X::T* dyr = (const typename X::T*)p.dy + base;
    float dot = 0.f;
    for (int c = threadIdx.x; c < p.hidden; c += blockDim.x) dot += X::load(dyr[c]) * X::load(xr[c]);
    dot = team_sum<true>(dot, blockDim.x, scratch);
    const float r = p.rstd[row];
    const float s = round_to<X>(r);
    const float k = r * r * r * dot / (float)p.hidden;  // the twin's order
    typename X::T* dxr = (typename X::T*)p.out + base;
    for (int c = threadIdx.x; c < p.hidden; c += blockDim.x)
        dxr[c] = X::store(s * X::load(dyr[c]) - X::load(xr[c]) * k);
}

#define RMS_SCALE_FIRST_INSTANTIATE(NAME, X)                                                          \
    extern "C" __global__ void __launch_bounds__(512) rms_scale_first_fwd_##NAME(const RmsScaleFirstParams p) { \
        rms_scale_first_fwd<X>(p);                                                                    \
    }                                                                                                 \
    extern "C" __global__ void __launch_bounds__(512) rms_scale_first_bwd_##NAME(const RmsScaleFirstParams p) { \
        rms_scale_first_bwd<X>(p);                                                                    \
    }

RMS_SCALE_FIRST_INSTANTIATE(bf16, Bf16)
RMS_SCALE_FIRST_INSTANTIATE(f16, F16)
RMS_SCALE_FIRST_INSTANTIATE(f32, F32)
