//! The naive float64 implementation the tests hold the CPU backend to: full logits, one row
//! at a time, written from the definitions with no chunking and no shared code.

pub struct Reference {
    pub row_loss: Vec<f64>,
    pub dh: Vec<f64>,
    pub dw: Vec<f64>,
    pub db: Vec<f64>,
}

pub struct RefInputs<'a> {
    pub hidden: &'a [f64],
    pub weight: &'a [f64],
    pub bias: Option<&'a [f64]>,
    pub targets: &'a [i64],
    pub n: usize,
    pub h: usize,
    pub v: usize,
    pub ignore_index: i64,
    pub label_smoothing: f64,
    pub scale: f64,
    pub softcap: Option<f64>,
    /// One per row.
    pub grad_scale: &'a [f64],
}

pub fn reference(x: &RefInputs<'_>) -> Reference {
    let (n, h, v) = (x.n, x.h, x.v);
    let eps = x.label_smoothing;
    let mut out = Reference {
        row_loss: vec![0.0; n],
        dh: vec![0.0; n * h],
        dw: vec![0.0; v * h],
        db: vec![0.0; v],
    };
    for i in 0..n {
        if x.targets[i] == x.ignore_index {
            continue;
        }
        let y = x.targets[i] as usize;
        let hi = &x.hidden[i * h..(i + 1) * h];
        // pre[c] = scale * (h . w_c + b_c); z[c] = the soft-capped logit.
        let pre: Vec<f64> = (0..v)
            .map(|c| {
                let dot: f64 = (0..h).map(|k| hi[k] * x.weight[c * h + k]).sum();
                (dot + x.bias.map_or(0.0, |b| b[c])) * x.scale
            })
            .collect();
        let z: Vec<f64> = pre
            .iter()
            .map(|&u| x.softcap.map_or(u, |cap| cap * (u / cap).tanh()))
            .collect();
        let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + z.iter().map(|&t| (t - max).exp()).sum::<f64>().ln();
        let mean_z = z.iter().sum::<f64>() / v as f64;
        out.row_loss[i] = (1.0 - eps) * (lse - z[y]) + eps * (lse - mean_z);

        let g = x.grad_scale[i];
        for c in 0..v {
            let target = if c == y { 1.0 - eps } else { 0.0 };
            let dz = g * ((z[c] - lse).exp() - eps / v as f64 - target);
            let dcap = x
                .softcap
                .map_or(1.0, |cap| 1.0 - (pre[c] / cap).tanh().powi(2));
            let da = dz * dcap * x.scale;
            let wc = &x.weight[c * h..(c + 1) * h];
            for (k, (&hk, &wk)) in hi.iter().zip(wc).enumerate() {
                out.dh[i * h + k] += da * wk;
                out.dw[c * h + k] += da * hk;
            }
            out.db[c] += da;
        }
    }
    out
}
