#line 2 "gated_act.cu"
// The activation product of a gated MLP, act(gate) * up (README, "Fused decoder ops"; CPU
// twin: runtime/src/cpu/fusions/gated.rs). Launched by runtime/src/cuda/fusions.rs.
//
// Forward, with the stock module's rounding points (act_fn(gate) is a tensor of the input
// dtype T, then multiplied by up):  out = round_T(round_T(act(g)) * u).
// Backward from the saved inputs (nothing else is saved), in float32, one rounding each:
//   dup   = round_T(dout * round_T(act(g)))     (the factor the forward multiplied by)
//   dgate = round_T(dout * u * act'(g))
// act: 0 = SiLU, x / (1 + exp(-x)); 1 = GELU with the tanh approximation, as
// F.gelu(approximate="tanh") computes it; 3 = GPT-OSS's and MiniMax-M3's SwiGLU, whose stock
// statements round at each step: glu = round(g * round(sigmoid(round(g * alpha)))), and up
// enters as round(u + 1) (its backward: glu' = s + g * alpha * s * (1 - s), s = sigmoid(alpha
// * g) in float32). (2 is the gated norm's sigmoid, rms_norm.cu.) gate and up are (rows, cols) with their own row
// strides (unit stride along cols: Phi-3's chunks of one gate_up projection); out and dout
// are contiguous (rows, cols); dgate and dup have the row stride ld_grad (cols: two
// tensors; 2 * cols with dup = dgate + cols: one packed (rows, 2 * cols) gradient of a
// gate_up tensor, with no concatenation). `interleaved` (GPT-OSS's experts: gate =
// gate_up[..., ::2], up = gate_up[..., 1::2]): gate points at a row of pairs (row stride
// ld_gate), up is not read, and the backward writes [dgate, dup] pairs at dgate (row stride
// ld_grad). The `_v8` kernels move 8 entries (8 pairs) per 128-bit access (two) and need cols
// and every row stride % 8 == 0 and 16-byte aligned rows (the launcher checks); `_s` any
// layout.
//
// Clamped SwiGLU (`clamp`, with the limit L rounded to T as torch compares a T tensor with a
// scalar): 1 = DeepSeek-V4's `act(gate.clamp(max=L)) * up.clamp(-L, L)`, 2 = Step-3.7's
// `act(gate).clamp(max=L) * up.clamp(-L, L)` (the clamp on the rounded activation). Clamps
// keep NaN, and the backward passes a gradient inside the bounds as the running torch's clamp
// backward does: lo <= x <= hi with `at_bound` (torch 2.11), lo < x < hi without (2.15); none
// for NaN. 0: no clamp, the code of the plain product.

struct GatedParams {
    const void* gate;
    const void* up;
    const void* dout;   // backward only
    void* out;          // forward: out; backward: dgate
    void* dup;          // backward only
    i64 rows;
    i64 cols;
    i64 ld_gate;        // elements
    i64 ld_up;
    i64 ld_grad;        // row stride of dgate and dup (backward)
    int act;
    int clamp;          // 0: none; 1: gate before the activation; 2: the activation's output
    float limit;        // L (clamp != 0)
    int at_bound;       // whether a value at a bound gets its gradient (clamp != 0)
    float alpha;        // act 3's
    int interleaved;    // gate and up as pairs (see above)
};

#define GELU_BETA 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_KAPPA 0.044715f

// silu / sigmoid: fusion_common.cuh (FAST for 16-bit outputs: the reason is written there).
template <bool FAST>
__device__ __forceinline__ float act_value(int act, float x) {
    if (act == 0) return silu<FAST>(x);
    const float inner = GELU_BETA * (x + GELU_KAPPA * (x * x * x));
    return 0.5f * x * (1.f + tanhf(inner));
}

template <bool FAST>
__device__ __forceinline__ float act_grad(int act, float x) {
    if (act == 0) {
        const float s = sigmoid<FAST>(x);
        return s * (1.f + x * (1.f - s));
    }
    const float x_sq = x * x;
    const float inner = GELU_BETA * (x + GELU_KAPPA * x_sq * x);
    const float t = tanhf(inner);
    const float left = 0.5f * x;
    const float right = 1.f + t;
    const float left_derivative = 0.5f * right;
    const float right_derivative = left * (1.f - t * t);
    const float inner_derivative = GELU_BETA * (1.f + 3.f * GELU_KAPPA * x_sq);
    return left_derivative + right_derivative * inner_derivative;
}

// GPT-OSS's glu, rounded where its statements round (act 3), and its derivative.
template <class D, bool FAST>
__device__ __forceinline__ float oai_value(float x, float alpha) {
    const float s = round_to<D>(sigmoid<FAST>(round_to<D>(x * alpha)));
    return round_to<D>(x * s);
}

template <bool FAST>
__device__ __forceinline__ float oai_grad(float x, float alpha) {
    const float s = sigmoid<FAST>(alpha * x);
    return s + x * alpha * s * (1.f - s);
}

// min(x, hi) as torch.clamp(max=hi) computes it (NaN stays NaN).
__device__ __forceinline__ float clamp_max(float x, float hi) { return x > hi ? hi : x; }
__device__ __forceinline__ float clamp_sym(float x, float hi) {
    const float lo = x < -hi ? -hi : x;
    return lo > hi ? hi : lo;
}
// The bound a gradient passes at or below: hi itself when torch passes it at the bound, else
// the float just below hi (x < hi is x <= that bound for every x of a 16-bit or float32
// tensor, inf included): one comparison per element either way.
__device__ __forceinline__ float pass_bound(float hi, bool at_bound) {
    return at_bound ? hi : nextafterf(hi, __int_as_float(0xff800000));
}
__device__ __forceinline__ bool within(float x, float bound) { return x <= bound && -x <= bound; }

// E gate and up values from E (gate, up) pairs at p, and back.
template <class D, int E>
__device__ __forceinline__ void load_pairs(const typename D::T* p, float (&g)[E], float (&u)[E]) {
    float v[2 * E];
    load_vec<D, 2 * E>(p, v);
#pragma unroll
    for (int i = 0; i < E; ++i) {
        g[i] = v[2 * i];
        u[i] = v[2 * i + 1];
    }
}

template <class D, int E>
__device__ __forceinline__ void store_pairs(typename D::T* p, const float (&g)[E], const float (&u)[E]) {
    float v[2 * E];
#pragma unroll
    for (int i = 0; i < E; ++i) {
        v[2 * i] = g[i];
        v[2 * i + 1] = u[i];
    }
    store_vec<D, 2 * E>(p, v);
}

// The kernels are bound by instruction issue as much as by bandwidth (their step-time share
// grows when the clock drops under a training step's load), so the element offsets are found
// without a 64-bit division: none when every tensor is contiguous (the common case), else a
// 32-bit one when the sizes allow. The per-element choices are compile-time in the instances
// the models use (MODE 0: the plain product, which so keeps its instruction count; 1 and 2:
// the clamp before / after the activation; 3: act 3 clamped before, the pair layout read per
// vector), and read from the parameters in MODE 4 (any other combination).
template <class D, int E, bool BACKWARD, int MODE>
__device__ void gated_body(const GatedParams& p) {
    typedef typename D::T T;
    constexpr bool FAST = sizeof(T) == 2;
    const int clamp = MODE == 4 ? p.clamp : MODE == 3 ? 1 : MODE;
    const bool pairs = MODE >= 3 && p.interleaved;
    const bool oai = MODE == 3 || (MODE == 4 && p.act == 3);
    const float lim = clamp ? round_to<D>(p.limit) : 0.f;
    const float bound = clamp ? pass_bound(lim, p.at_bound) : 0.f;
    const i64 width = pairs ? 2 : 1;  // elements per column in gate (and the gradients)
    const i64 per_row = p.cols / E;
    const i64 total = p.rows * per_row;
    const bool dense = p.ld_gate == width * p.cols && (pairs || p.ld_up == p.cols) &&
                       (!BACKWARD || p.ld_grad == width * p.cols);
    const bool narrow = total <= 0xffffffffll;
    for (i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x; v < total; v += (i64)gridDim.x * blockDim.x) {
        i64 og, ou, oo, og2;  // offsets of gate, up, out / dout, and the gradients
        if (dense) {
            oo = v * E;
            og = ou = og2 = oo * width;
        } else {
            const i64 r = p.rows == 1 ? 0 : narrow ? (i64)((unsigned)v / (unsigned)per_row) : v / per_row;
            const i64 c = (v - r * per_row) * E;
            og = r * p.ld_gate + c * width;
            ou = r * p.ld_up + c;
            oo = r * p.cols + c;
            og2 = r * p.ld_grad + c * width;
        }
        float g[E], u[E], o[E];
        if (pairs) {
            load_pairs<D, E>((const T*)p.gate + og, g, u);
        } else {
            load_vec<D, E>((const T*)p.gate + og, g);
            load_vec<D, E>((const T*)p.up + ou, u);
        }
        float d[E], du[E];
        if (BACKWARD) load_vec<D, E>((const T*)p.dout + oo, d);
#pragma unroll
        for (int i = 0; i < E; ++i) {
            const float x = clamp == 1 ? clamp_max(g[i], lim) : g[i];
            const float raw = oai ? oai_value<D, FAST>(x, p.alpha) : round_to<D>(act_value<FAST>(p.act, x));
            const float a = clamp == 2 ? clamp_max(raw, lim) : raw;
            float up = clamp ? clamp_sym(u[i], lim) : u[i];
            if (oai) up = round_to<D>(up + 1.f);
            if (!BACKWARD) {
                o[i] = a * up;
            } else {
                // the gate's gradient passes its clamp (on the gate before the activation, on
                // the activation after it), up's its own
                const bool gate_passes = !clamp || (clamp == 1 ? g[i] : raw) <= bound;
                const bool up_passes = !clamp || within(u[i], bound);
                const float slope = oai ? oai_grad<FAST>(x, p.alpha) : act_grad<FAST>(p.act, x);
                du[i] = up_passes ? d[i] * a : 0.f;
                o[i] = gate_passes ? d[i] * up * slope : 0.f;
            }
        }
        if (!BACKWARD) {
            store_vec<D, E>((T*)p.out + oo, o);
        } else if (pairs) {
            store_pairs<D, E>((T*)p.out + og2, o, du);
        } else {
            store_vec<D, E>((T*)p.out + og2, o);
            store_vec<D, E>((T*)p.dup + og2, du);
        }
    }
}

template <class D, int E, bool BACKWARD>
__device__ void gated(const GatedParams& p) {
    const bool oai = p.act == 3;
    if (!oai && !p.interleaved && p.clamp == 0) {
        gated_body<D, E, BACKWARD, 0>(p);
    } else if (!oai && !p.interleaved && p.clamp == 1) {
        gated_body<D, E, BACKWARD, 1>(p);
    } else if (!oai && !p.interleaved && p.clamp == 2) {
        gated_body<D, E, BACKWARD, 2>(p);
    } else if (oai && p.clamp == 1) {  // GPT-OSS (pairs), MiniMax-M3 (halves)
        gated_body<D, E, BACKWARD, 3>(p);
    } else {
        gated_body<D, E, BACKWARD, 4>(p);
    }
}

#define GATED_INSTANTIATE(NAME, D)                                                                    \
    extern "C" __global__ void __launch_bounds__(256) gated_fwd_##NAME##_v8(const GatedParams p) {  \
        gated<D, 8, false>(p);                                                                       \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) gated_fwd_##NAME##_s(const GatedParams p) {   \
        gated<D, 1, false>(p);                                                                       \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) gated_bwd_##NAME##_v8(const GatedParams p) {  \
        gated<D, 8, true>(p);                                                                        \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) gated_bwd_##NAME##_s(const GatedParams p) {   \
        gated<D, 1, true>(p);                                                                        \
    }

GATED_INSTANTIATE(bf16, Bf16)
GATED_INSTANTIATE(f16, F16)
GATED_INSTANTIATE(f32, F32)
