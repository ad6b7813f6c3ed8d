// Shared by the decoder-fusion kernels (rms_norm.cu, rotary.cu, gated_act.cu). The Rust side
// (runtime/src/cuda/compile.rs) puts this text in front of each of those files and compiles
// the result with NVRTC; each file starts with a #line directive so NVRTC's messages name
// the file and line you edit. No CUDA header is needed: bf16/fp16 conversions are PTX.
//
// Storage types: `Bf16`, `F16` and `F32` describe how an element is stored and converted to
// and from float32, the type every kernel computes in. Kernel entry points are `extern "C"`
// instances named after the storage types they read and write (`_bf16`, `_f16`, `_f32`).

typedef unsigned short u16_t;
typedef long long i64;

// 16-bit types also convert two values at once (`pack2`: `lo` into the low half, as they lie
// in memory, rounded as `store` rounds each) and multiply packed pairs (`mul2`: the product
// rounded once, which for two 16-bit inputs, exact in float32, equals rounding their float32
// product).
struct Bf16 {
    typedef u16_t T;
    static __device__ __forceinline__ float load(T x) { return __uint_as_float(((unsigned)x) << 16); }
    static __device__ __forceinline__ T store(float x) {
        T r;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
        return r;
    }
    static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
        unsigned r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
    static __device__ __forceinline__ unsigned mul2(unsigned a, unsigned b) {
        unsigned r;  // a * b + (-0): fma is sm_80's packed bf16 product
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(0x80008000u));
        return r;
    }
};

struct F16 {
    typedef u16_t T;
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
    static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
        unsigned r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
    static __device__ __forceinline__ unsigned mul2(unsigned a, unsigned b) {
        unsigned r;
        asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
        return r;
    }
};

struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(T x) { return x; }
    static __device__ __forceinline__ T store(float x) { return x; }
};

template <class A, class B>
struct same_type {
    static constexpr bool value = false;
};
template <class A>
struct same_type<A, A> {
    static constexpr bool value = true;
};

// Rounds a float32 to the storage type D and back: what `tensor.to(dtype)` does to a value.
template <class D>
__device__ __forceinline__ float round_to(float x) {
    return D::load(D::store(x));
}

// ---- vector loads and stores ---------------------------------------------------------------
//
// E consecutive elements at p, converted to or from float32. When E elements fill whole
// 16-byte words (E = 8: one word for 16-bit types, two for float32) they move as 128-bit
// accesses, so p must then be 16-byte aligned (the launchers check it and otherwise pick the
// E = 1 instance). Loads of inputs go through the read-only path.

// The raw bytes of E elements, loaded now and converted later (`unpack`): a load can be
// issued long before its value is needed while holding half the registers of the float32
// values (16-bit types). 16-byte words when E elements fill them, else E scalars.
template <class D, int E, bool WIDE = (E * sizeof(typename D::T)) % 16 == 0>
struct RawVec {
    typename D::T e[E];
};

template <class D, int E>
struct RawVec<D, E, true> {
    uint4 w[E * sizeof(typename D::T) / 16];
};

template <class D, int E>
__device__ __forceinline__ void load_raw(const typename D::T* __restrict__ p, RawVec<D, E>& r) {
    if constexpr ((E * sizeof(typename D::T)) % 16 == 0) {
#pragma unroll
        for (int c = 0; c < (int)(E * sizeof(typename D::T) / 16); ++c)
            r.w[c] = __ldg(reinterpret_cast<const uint4*>(p) + c);
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i) r.e[i] = __ldg(p + i);
    }
}

template <class D, int E>
__device__ __forceinline__ void unpack(const RawVec<D, E>& r, float (&v)[E]) {
    typedef typename D::T T;
    if constexpr ((E * sizeof(T)) % 16 == 0) {
        constexpr int PER = 16 / (int)sizeof(T);
#pragma unroll
        for (int c = 0; c < E / PER; ++c) {
            union {
                uint4 u;
                T e[PER];
            } pack;
            pack.u = r.w[c];
#pragma unroll
            for (int i = 0; i < PER; ++i) v[c * PER + i] = D::load(pack.e[i]);
        }
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i) v[i] = D::load(r.e[i]);
    }
}

template <class D, int E>
__device__ __forceinline__ void load_vec(const typename D::T* __restrict__ p, float (&v)[E]) {
    RawVec<D, E> r;
    load_raw<D, E>(p, r);
    unpack<D, E>(r, v);
}

template <class D, int E>
__device__ __forceinline__ void store_vec(typename D::T* __restrict__ p, const float (&v)[E]) {
    typedef typename D::T T;
    constexpr int BYTES = E * (int)sizeof(T);
    if constexpr (BYTES % 16 == 0 && sizeof(T) == 2) {
#pragma unroll
        for (int c = 0; c < BYTES / 16; ++c) {
            const float* f = v + 8 * c;
            reinterpret_cast<uint4*>(p)[c] = make_uint4(D::pack2(f[0], f[1]), D::pack2(f[2], f[3]),
                                                        D::pack2(f[4], f[5]), D::pack2(f[6], f[7]));
        }
    } else if constexpr (BYTES % 16 == 0) {
        constexpr int PER = 16 / (int)sizeof(T);
#pragma unroll
        for (int c = 0; c < BYTES / 16; ++c) {
            union {
                uint4 u;
                T e[PER];
            } pack;
#pragma unroll
            for (int i = 0; i < PER; ++i) pack.e[i] = D::store(v[c * PER + i]);
            reinterpret_cast<uint4*>(p)[c] = pack.u;
        }
    } else {
#pragma unroll
        for (int i = 0; i < E; ++i) p[i] = D::store(v[i]);
    }
}

// ---- reductions ----------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over a team of `team` consecutive threads that all call this; every member gets the
// sum. A team is a power of two up to 32 (several teams per warp: shuffles only) or the whole
// block (blockDim.x a multiple of 32: shuffles, then `scratch` (32 floats) across warps).
// The order of the additions depends only on the team size, so results are reproducible.
// ONLY: the block's only reduction, so `scratch` has no earlier reader to wait for.
template <bool ONLY = false>
__device__ __forceinline__ float team_sum(float v, int team, float* scratch) {
    if (team <= 32) {
        for (int o = team >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        return v;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (!ONLY) __syncthreads();  // scratch may still be read by the previous reduction
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < nwarps ? scratch[lane] : 0.f;
    return warp_sum(r);
}

// ---- activations --------------------------------------------------------------------------
//
// SiLU and the sigmoid (gated_act.cu; rms_norm.cu's gated norm). FAST, for 16-bit outputs: the
// fast exponential and division (a few MUFU instructions instead of expf's range reduction and
// an IEEE division's subroutine): their float32 error
// (a few ulp for |x| < 64) is far below a 16-bit rounding step, and these kernels are bound by
// instruction issue under a training step's clock (the step ran the accurate forms 12% slower
// than in isolation). Float32 outputs keep the accurate forms, as stock computes them.
template <bool FAST>
__device__ __forceinline__ float silu(float x) {
    return FAST ? __fdividef(x, 1.f + __expf(-x)) : x / (1.f + expf(-x));
}

template <bool FAST>
__device__ __forceinline__ float sigmoid(float x) {
    return FAST ? __fdividef(1.f, 1.f + __expf(-x)) : 1.f / (1.f + expf(-x));
}
