//! The memory the Python entry points are handed: raw `data_ptr()` addresses, checked as
//! regions before any slice is made of them.

use pyo3::PyResult;
use pyo3::exceptions::PyValueError;

/// One memory region an argument points to.
pub struct Region {
    pub name: &'static str,
    pub start: usize,
    pub bytes: usize,
    pub align: usize,
    pub output: bool,
}

impl Region {
    /// `elems` elements of `size` bytes (aligned to `size`) at `start`; a size that overflows
    /// saturates, and [`check`] reports it.
    pub fn new(name: &'static str, start: usize, elems: usize, size: usize, output: bool) -> Self {
        Region {
            name,
            start,
            bytes: elems.saturating_mul(size),
            align: size,
            output,
        }
    }
}

/// Null, misaligned, overflowing and wrapping pointers are errors (a ValueError naming the
/// argument), and an output may overlap nothing.
pub fn check(regions: &[Region]) -> PyResult<()> {
    let err = |msg: String| Err(PyValueError::new_err(msg));
    for r in regions {
        if r.bytes == 0 {
            continue;
        }
        if r.bytes == usize::MAX {
            return err(format!("{}: size overflows", r.name));
        }
        if r.start == 0 {
            return err(format!("{}: null pointer", r.name));
        }
        if r.start % r.align != 0 {
            return err(format!(
                "{}: pointer not aligned to {} bytes",
                r.name, r.align
            ));
        }
        if r.start.checked_add(r.bytes).is_none() {
            return err(format!("{}: region wraps around", r.name));
        }
    }
    let live: Vec<&Region> = regions.iter().filter(|r| r.bytes > 0).collect();
    for (i, a) in live.iter().enumerate() {
        for b in &live[i + 1..] {
            let overlap = a.start < b.start + b.bytes && b.start < a.start + a.bytes;
            if overlap && (a.output || b.output) {
                return err(format!("{} and {} overlap in memory", a.name, b.name));
            }
        }
    }
    Ok(())
}

/// A checked region as a slice.
///
/// # Safety
/// `ptr` is null only when `len == 0`, else points to `len` initialised, aligned elements
/// that live for the call and that nothing else of this call writes ([`check`] and the
/// Python wrappers uphold it).
pub unsafe fn slice<'a, T>(ptr: usize, len: usize) -> &'a [T] {
    if len == 0 {
        return &[];
    }
    unsafe { std::slice::from_raw_parts(ptr as *const T, len) }
}

/// # Safety
/// As [`slice`], and nothing else of this call reads or writes the region.
pub unsafe fn slice_mut<'a, T>(ptr: usize, len: usize) -> &'a mut [T] {
    if len == 0 {
        return &mut [];
    }
    unsafe { std::slice::from_raw_parts_mut(ptr as *mut T, len) }
}
