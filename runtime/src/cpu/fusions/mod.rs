//! CPU twins of the decoder-fusion kernels (`kernels/rms_norm.cu`, `kernels/rotary.cu`,
//! `kernels/gated_act.cu`, the gated RMSNorm of Qwen3-Next and Kimi, and DeepSeek-V4's
//! unweighted scale-first RMSNorm): the same arithmetic in the same type, with the same rounding
//! points, so that what CI tests here is what the GPU runs (README, "Fused decoder ops").
//!
//! Arithmetic is in float32 for bf16/fp16/fp32 storage (the CUDA kernels' type) and in
//! float64 for float64 storage (CPU only: it is what `torch.autograd.gradcheck` needs).
//! Work is spread over rayon's pool; reductions that cross rows (the RMSNorm weight
//! gradients) add fixed-size partials in a fixed order, so results do not depend on the
//! number of threads.

pub mod attnres_mix;
pub mod gated;
pub mod gated_norm;
mod python;
pub mod rms_norm;
pub mod rotary;
pub mod scale_first;
#[cfg(test)]
mod tests;

use half::{bf16, f16};
use pyo3::prelude::*;
use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// Adds the fused ops' CPU functions to `forward_rewrite._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    python::register(m)?;
    attnres_mix::register(m)
}

/// Below this many elements a call computes on the calling thread: waking rayon's workers
/// costs more than the work (hundreds of microseconds on a loaded machine, against a few for
/// a tiny model's layer).
pub const SERIAL_ELEMENTS: usize = 1 << 15;

/// The arithmetic type: f32 (for bf16, fp16 and fp32 storage) or f64.
pub trait Real:
    Copy
    + Send
    + Sync
    + Debug
    + PartialOrd
    + Default
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn sqrt(self) -> Self;
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
        }
    };
}
real!(f32);
real!(f64);

/// How an element is stored, and its conversions to and from the arithmetic type `A`
/// (rounding to nearest even, as torch's casts do).
pub trait Storage<A: Real>: Copy + Send + Sync + 'static {
    fn load(self) -> A;
    fn store(a: A) -> Self;
}

impl Storage<f32> for f32 {
    fn load(self) -> f32 {
        self
    }
    fn store(a: f32) -> f32 {
        a
    }
}

impl Storage<f32> for bf16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(a: f32) -> bf16 {
        bf16::from_f32(a)
    }
}

impl Storage<f32> for f16 {
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(a: f32) -> f16 {
        f16::from_f32(a)
    }
}

impl Storage<f64> for f64 {
    fn load(self) -> f64 {
        self
    }
    fn store(a: f64) -> f64 {
        a
    }
}

/// `a` rounded to the storage type `S` and back: what `tensor.to(dtype)` does to a value.
#[inline]
pub fn round_to<A: Real, S: Storage<A>>(a: A) -> A {
    S::store(a).load()
}

/// The storage dtypes of the fused ops, named as torch names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FDtype {
    Bf16,
    F16,
    F32,
    F64,
}

impl FDtype {
    pub fn parse(name: &str) -> Option<FDtype> {
        match name {
            "bfloat16" => Some(FDtype::Bf16),
            "float16" => Some(FDtype::F16),
            "float32" => Some(FDtype::F32),
            "float64" => Some(FDtype::F64),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            FDtype::Bf16 | FDtype::F16 => 2,
            FDtype::F32 => 4,
            FDtype::F64 => 8,
        }
    }
}

/// The activations of the gated MLP product (silu, gelu_tanh) and of the gated RMSNorm's gate
/// (silu, sigmoid).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x / (1 + exp(-x))`
    Silu,
    /// `F.gelu(x, approximate="tanh")`
    GeluTanh,
    /// `1 / (1 + exp(-x))`
    Sigmoid,
    /// GPT-OSS's / MiniMax-M3's `(up + 1) * gate * sigmoid(alpha * gate)`, rounded at each of
    /// its statements (`gated.rs`, [`crate::cpu::fusions::gated::Gated::alpha`]).
    SwigluOai,
}

/// The gated MLP product's activations (`gated_act.cu` has these three).
pub const PRODUCT_ACTIVATIONS: &[Activation] = &[
    Activation::Silu,
    Activation::GeluTanh,
    Activation::SwigluOai,
];
/// The gated norm's gate activations: SiLU (Qwen3-Next) and sigmoid (Kimi).
pub const GATE_ACTIVATIONS: &[Activation] = &[Activation::Silu, Activation::Sigmoid];

impl Activation {
    pub fn parse(name: &str) -> Option<Activation> {
        match name {
            "silu" => Some(Activation::Silu),
            "gelu_tanh" => Some(Activation::GeluTanh),
            "sigmoid" => Some(Activation::Sigmoid),
            "swiglu_oai" => Some(Activation::SwigluOai),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Activation::Silu => "silu",
            Activation::GeluTanh => "gelu_tanh",
            Activation::Sigmoid => "sigmoid",
            Activation::SwigluOai => "swiglu_oai",
        }
    }

    /// `name` parsed when it is one of `allowed` (an op's activations: [`PRODUCT_ACTIVATIONS`],
    /// [`GATE_ACTIVATIONS`]); else the error message, naming the argument.
    pub fn parse_one_of(name: &str, allowed: &[Activation]) -> Result<Activation, String> {
        match Activation::parse(name) {
            Some(act) if allowed.contains(&act) => Ok(act),
            _ => {
                let names: Vec<String> =
                    allowed.iter().map(|a| format!("'{}'", a.name())).collect();
                Err(format!(
                    "activation: expected {}, got {name:?}",
                    names.join(" or ")
                ))
            }
        }
    }

    /// The code the CUDA kernels take.
    pub fn code(self) -> i32 {
        match self {
            Activation::Silu => 0,
            Activation::GeluTanh => 1,
            Activation::Sigmoid => 2,
            Activation::SwigluOai => 3,
        }
    }
}

/// A raw address that may cross into rayon's workers. Only used for writes to disjoint
/// elements (the callers check that an output's layout does not overlap itself).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub *mut T);
// SAFETY: see the type's documentation: each element is written by one task only.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
