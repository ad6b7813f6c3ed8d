//! The input dtypes of the CPU backend and their conversions to and from float32, the
//! type all arithmetic is done in.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// The dtypes the fused op accepts, named as torch names them (`str(dtype)` without the
/// `torch.` prefix), which is how the Python side passes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn parse(name: &str) -> Option<DType> {
        match name {
            "float32" => Some(DType::F32),
            "float16" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// An element type of the inputs and gradient outputs. Tiles are converted to float32 for
/// the GEMMs; float32 inputs are used in place (`as_f32`), which is why that hook exists.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;

    fn to_f32(self) -> f32;

    /// Rounds to nearest even, as torch does when it casts.
    fn from_f32(x: f32) -> Self;

    /// Converts `src` into `dst` (same length).
    fn load(src: &[Self], dst: &mut [f32]);

    /// Converts `src` into `dst` (same length), rounding to nearest even.
    fn store(src: &[f32], dst: &mut [Self]);

    /// The same memory seen as float32, for float32 inputs only.
    fn as_f32(s: &[Self]) -> Option<&[f32]>;

    /// The same memory seen as float32, for float32 outputs only.
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;

    fn to_f32(self) -> f32 {
        self
    }

    fn from_f32(x: f32) -> Self {
        x
    }

    fn load(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }

    fn store(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }

    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }

    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }
}

macro_rules! half_element {
    ($t:ty, $dtype:expr) => {
        impl Element for $t {
            const DTYPE: DType = $dtype;

            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }

            fn from_f32(x: f32) -> Self {
                <$t>::from_f32(x)
            }

            fn load(src: &[Self], dst: &mut [f32]) {
                src.convert_to_f32_slice(dst);
            }

            fn store(src: &[f32], dst: &mut [Self]) {
                dst.convert_from_f32_slice(src);
            }

            fn as_f32(_: &[Self]) -> Option<&[f32]> {
                None
            }

            fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
                None
            }
        }
    };
}

half_element!(f16, DType::F16);
half_element!(bf16, DType::BF16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_round_trip() {
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(DType::parse(d.name()), Some(d));
        }
        assert_eq!(DType::parse("float64"), None);
        assert_eq!(DType::parse("torch.float32"), None);
    }

    #[test]
    fn half_conversions_round_to_nearest_even() {
        // 1 + 2^-8 lies exactly between two bf16 values (1 and 1 + 2^-7): ties go to even.
        let x = 1.0f32 + 2f32.powi(-8);
        assert_eq!(<bf16 as Element>::from_f32(x).to_f32(), 1.0);
        let mut out = [bf16::ZERO; 2];
        bf16::store(&[x, 3.0], &mut out);
        assert_eq!(out[0].to_f32(), 1.0);
        assert_eq!(out[1].to_f32(), 3.0);
        let mut back = [0f32; 2];
        bf16::load(&out, &mut back);
        assert_eq!(back, [1.0, 3.0]);
        assert_eq!(<f16 as Element>::from_f32(65504.0).to_f32(), 65504.0);
    }
}
