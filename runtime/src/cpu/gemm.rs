//! A bounds-checked float32 GEMM on strided slices, on top of `matrixmultiply` (packed,
//! SIMD micro-kernels chosen at run time). Parallelism is ours (rayon, one GEMM per task).

/// A matrix view: `rows x cols` elements of `data`, element (i, j) at `i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> View<'a> {
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of this view (no copy).
    pub fn t(self) -> View<'a> {
        View {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn assert_fits(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < self.data.len(), "gemm: {what} view out of bounds");
        }
    }
}

/// `c = a @ b + beta * c`, with `c` row-major (`a.rows x b.cols`, row stride `ldc`).
/// With `beta == 0` the old contents of `c` are not read.
pub fn gemm(a: View<'_>, b: View<'_>, beta: f32, c: &mut [f32], ldc: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "gemm: inner dimensions differ");
    a.assert_fits("a");
    b.assert_fits("b");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        ldc >= n && (m - 1) * ldc + n <= c.len(),
        "gemm: c out of bounds"
    );
    // SAFETY: every element the call reads or writes lies inside the slices (checked above);
    // `c` is borrowed mutably, so it cannot alias `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.data.as_ptr(),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr(),
            b.rs as isize,
            b.cs as isize,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_naive_product_with_transposes() {
        let a: Vec<f32> = (0..6).map(|x| x as f32).collect(); // 2x3
        let b: Vec<f32> = (0..12).map(|x| (x as f32) * 0.5).collect(); // 4x3, used transposed
        let mut c = vec![1.0f32; 8];
        gemm(
            View::rows(&a, 2, 3),
            View::rows(&b, 4, 3).t(),
            1.0,
            &mut c,
            4,
        );
        for i in 0..2 {
            for j in 0..4 {
                let want: f32 = 1.0 + (0..3).map(|p| a[i * 3 + p] * b[j * 3 + p]).sum::<f32>();
                assert_eq!(c[i * 4 + j], want);
            }
        }
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn refuses_a_view_past_its_slice() {
        let a = [0.0f32; 5];
        let mut c = [0.0f32; 4];
        gemm(View::rows(&a, 2, 3), View::rows(&a, 3, 2), 0.0, &mut c, 2);
    }
}
