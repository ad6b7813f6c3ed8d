#line 2 "rotary.cu"
// Rotary position embedding of q and k in one launch, out of place (README, "Fused decoder
// ops"; CPU twin: runtime/src/cpu/fusions/rotary.rs). Launched by runtime/src/cuda/fusions.rs.
//
// q and k are seen as (P0, P1, heads, head_dim) through element strides (any strides, unit
// stride along head_dim); cos and sin as (P0, P1, rot_dim) with stride 0 where they are
// broadcast. The first rot_dim entries of each head are rotated, the rest pass through.
// Each rotated entry a has a partner b: b = a + rot_dim / 2 for a in the first half
// (`rotate_half`, Llama), b = a + 1 for even a (`rotate_every_two`, GPT-J / GLM / Cohere).
// Forward, in float32 and rounded once to the output type, exactly as
// q * cos + rotate(q) * sin:
//   out_a = x_a cos_a - x_b sin_a          out_b = x_b cos_b + x_a sin_b
// Backward (`transpose`), the transposed map (the rotation by -theta when the halves of cos
// and sin agree, as every model builds them):
//   dx_a  = dy_a cos_a + dy_b sin_b        dx_b  = dy_b cos_b - dy_a sin_a
//
// One block per position (p0, p1); its threads walk (head, chunk) items, a chunk being RE
// rotated pairs' first members (or RE consecutive entries for the interleaved layout) or PE
// pass-through entries. The `_v8` kernels move 8 entries per 128-bit access and need
// aligned rows (the launcher checks); the `_s` kernels take any layout.

struct RopeParams {
    const void* q;        // input I
    const void* k;
    const void* cos;      // C
    const void* sin;
    void* q_out;          // output O
    void* k_out;
    i64 q_stride[3];      // elements, over (P0, P1, head)
    i64 k_stride[3];
    i64 qo_stride[3];
    i64 ko_stride[3];
    i64 cos_stride[2];    // elements, over (P0, P1); 0 where broadcast
    i64 sin_stride[2];
    int p0;
    int p1;
    int q_heads;
    int k_heads;
    int head_dim;
    int rot_dim;
    int transpose;        // 1: backward
    int pad_;
};

template <class I, class C, class O, int RE, int PE, bool PAIRS>
__device__ void rope(const RopeParams& p) {
    // 32-bit division (a grid has fewer than 2^31 blocks): a 64-bit one costs more
    // instructions than the rest of a short block's prologue.
    const int pos = blockIdx.x;
    const i64 a = pos / p.p1, b = pos % p.p1;
    const int half = p.rot_dim / 2;
    const int rot_chunks = PAIRS ? p.rot_dim / RE : half / RE;
    const int chunks = rot_chunks + (p.head_dim - p.rot_dim) / PE;
    const int heads = p.q_heads + p.k_heads;
    const typename C::T* cs = (const typename C::T*)p.cos + a * p.cos_stride[0] + b * p.cos_stride[1];
    const typename C::T* sn = (const typename C::T*)p.sin + a * p.sin_stride[0] + b * p.sin_stride[1];
    for (int item = threadIdx.x; item < chunks * heads; item += blockDim.x) {
        const int h = item / chunks;
        const int chunk = item - h * chunks;
        const bool is_q = h < p.q_heads;
        const int hh = is_q ? h : h - p.q_heads;
        const i64* is = is_q ? p.q_stride : p.k_stride;
        const i64* os = is_q ? p.qo_stride : p.ko_stride;
        const typename I::T* in = (const typename I::T*)(is_q ? p.q : p.k) + a * is[0] + b * is[1] + hh * is[2];
        typename O::T* out = (typename O::T*)(is_q ? p.q_out : p.k_out) + a * os[0] + b * os[1] + hh * os[2];
        if (chunk >= rot_chunks) {
            const int j = p.rot_dim + (chunk - rot_chunks) * PE;
            float v[PE];
            load_vec<I, PE>(in + j, v);
            store_vec<O, PE>(out + j, v);
            continue;
        }
        if (PAIRS) {
            const int j = chunk * RE;
            float x[RE], c[RE], s[RE], o[RE];
            load_vec<I, RE>(in + j, x);
            load_vec<C, RE>(cs + j, c);
            load_vec<C, RE>(sn + j, s);
#pragma unroll
            for (int i = 0; i < RE; i += 2) {
                if (p.transpose) {
                    o[i] = x[i] * c[i] + x[i + 1] * s[i + 1];
                    o[i + 1] = x[i + 1] * c[i + 1] - x[i] * s[i];
                } else {
                    o[i] = x[i] * c[i] - x[i + 1] * s[i];
                    o[i + 1] = x[i + 1] * c[i + 1] + x[i] * s[i + 1];
                }
            }
            store_vec<O, RE>(out + j, o);
        } else {
            const int j = chunk * RE;
            float xa[RE], xb[RE], ca[RE], cb[RE], sa[RE], sb[RE], oa[RE], ob[RE];
            load_vec<I, RE>(in + j, xa);
            load_vec<I, RE>(in + j + half, xb);
            load_vec<C, RE>(cs + j, ca);
            load_vec<C, RE>(cs + j + half, cb);
            load_vec<C, RE>(sn + j, sa);
            load_vec<C, RE>(sn + j + half, sb);
#pragma unroll
            for (int i = 0; i < RE; ++i) {
                if (p.transpose) {
                    oa[i] = xa[i] * ca[i] + xb[i] * sb[i];
                    ob[i] = xb[i] * cb[i] - xa[i] * sa[i];
                } else {
                    oa[i] = xa[i] * ca[i] - xb[i] * sa[i];
                    ob[i] = xb[i] * cb[i] + xa[i] * sb[i];
                }
            }
            store_vec<O, RE>(out + j, oa);
            store_vec<O, RE>(out + j + half, ob);
        }
    }
}

#define ROPE_INSTANTIATE(NAME, I, C, O)                                                               \
    extern "C" __global__ void __launch_bounds__(256) rope_##NAME##_v8_half(const RopeParams p) {   \
        rope<I, C, O, 8, 8, false>(p);                                                               \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) rope_##NAME##_v8_pairs(const RopeParams p) {  \
        rope<I, C, O, 8, 8, true>(p);                                                                \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) rope_##NAME##_s_half(const RopeParams p) {    \
        rope<I, C, O, 1, 1, false>(p);                                                               \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) rope_##NAME##_s_pairs(const RopeParams p) {   \
        rope<I, C, O, 2, 1, true>(p);                                                                \
    }

// (input, cos/sin, output) dtypes. Forward: input = q's dtype, output = q's or float32;
// backward: input = the forward's output dtype, output = q's. cos/sin are q's dtype or
// float32 (the Python side upcasts any other exactly).
ROPE_INSTANTIATE(f32_f32_f32, F32, F32, F32)
ROPE_INSTANTIATE(bf16_bf16_bf16, Bf16, Bf16, Bf16)
ROPE_INSTANTIATE(bf16_bf16_f32, Bf16, Bf16, F32)
ROPE_INSTANTIATE(bf16_f32_bf16, Bf16, F32, Bf16)
ROPE_INSTANTIATE(bf16_f32_f32, Bf16, F32, F32)
ROPE_INSTANTIATE(f32_bf16_bf16, F32, Bf16, Bf16)
ROPE_INSTANTIATE(f32_bf16_f32, F32, Bf16, F32)
ROPE_INSTANTIATE(f32_f32_bf16, F32, F32, Bf16)
ROPE_INSTANTIATE(f16_f16_f16, F16, F16, F16)
ROPE_INSTANTIATE(f16_f16_f32, F16, F16, F32)
ROPE_INSTANTIATE(f16_f32_f16, F16, F32, F16)
ROPE_INSTANTIATE(f16_f32_f32, F16, F32, F32)
ROPE_INSTANTIATE(f32_f16_f16, F32, F16, F16)
ROPE_INSTANTIATE(f32_f16_f32, F32, F16, F32)
ROPE_INSTANTIATE(f32_f32_f16, F32, F32, F16)
