//! The fused linear + cross-entropy on the GPU (ARCHITECTURE.md, contract 4).
//!
//! Per chunk of rows, on torch's stream:
//! 1. logits = h W^T: cuBLAS, bf16/fp16/fp32 in, float32 out;
//! 2. the loss kernel: transforms, log-sum-exp, row loss; dlogits written in place over the
//!    logits (input dtype), the target column's gradient kept exactly in float32;
//! 3. dh = dlogits W (+ the target term): cuBLAS into float32, then `dh_finish`;
//! 4. dW += dlogits^T h, db += column sums: cuBLAS, accumulating in dW's dtype.
//!
//! Then once: dW[t] += sum of target-column gradient * h over the rows whose target is t
//! (`target_scatter`, one rounding per row of dW), and db cast from its float32 sum.

use std::ffi::c_void;

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{result as drv, sys as drv_sys};

use super::device::{self, Device, Dims as Launch, Dtype, launch};
use super::error::{Context, CudaError, Result};
use super::gemm::{Blas, Dims, Mat};
use super::plan::{CUBLAS_WORKSPACE_BYTES, Plan, Shape};

/// Knobs for experiments (gpu/bench.py); `Default` is what the op uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tuning {
    pub dh_splits: Option<u64>,
    pub slice_bytes: Option<u32>,
    pub block: Option<u32>,
    pub max_cluster: Option<u32>,
    pub pipelined: Option<bool>,
    pub generic: bool,
}

/// Split-K factor of the dh product when not tuned. cuBLAS already splits K itself for
/// these skinny products; our own split (a strided-batched call) was measured slower on the
/// H100 at all three benchmark shapes, and at (8192, 2304, 256000) cuBLAS then picked an
/// sm_75 kernel that took 91 ms instead of 13.
pub const DEFAULT_DH_SPLITS: u64 = 1;
/// Shared memory per block of the cluster loss kernel and its threads: three blocks of 384
/// threads fit an SM. Measured on the H200 (`gpu/bench.py --variants --profile`, the loss
/// kernel's time per call of the three benchmark shapes): 6.3 / 7.0 / 8.6 ms against 6.7 /
/// 8.4 / 8.8 with the former two blocks of 512 threads and ~100 KB slices (end to end 77.1 /
/// 48.1 / 49.3 against 80.2 / 51.7 / 50.7 ms). On the H100 (2026-11-27, an older kernel) the
/// same change was mixed: 6.9 / 7.2 / 9.4 against 6.5 / 8.3 / 9.1 ms.
const DEFAULT_SLICE_BYTES: u32 = 64 * 1024;
const DEFAULT_CLUSTER_BLOCK: u32 = 384;
/// Threads of the one-block-per-row loss kernel (GPUs before sm_90, `Tuning::generic`).
const DEFAULT_ROWS_BLOCK: u32 = 512;

/// One call, as `_cuda.py` passes it: raw device addresses (0 = absent) owned by torch.
#[derive(Clone, Debug)]
pub struct Call {
    pub device: i32,
    pub stream: u64,
    pub dtype: Dtype,
    pub rows: u64,
    pub hidden: u64,
    pub vocab: u64,
    pub h: u64,
    pub ld_h: u64,
    pub w: u64,
    pub bias: u64,
    pub targets: u64,
    pub row_map: u64,
    pub order: u64,
    pub grad_scale: u64,
    pub grad_scale_stride: u64,
    pub row_loss: u64,
    pub dh: u64,
    pub dw: u64,
    pub db: u64,
    pub workspace: u64,
    pub workspace_bytes: u64,
    pub budget: u64,
    pub ignore_index: i64,
    pub smoothing: f32,
    pub scale: f32,
    pub softcap: f32,
    pub compute_grads: bool,
    pub tuning: Tuning,
}

impl Call {
    pub fn shape(&self) -> Shape {
        Shape {
            rows: self.rows,
            hidden: self.hidden,
            vocab: self.vocab,
            elem_bytes: self.dtype.bytes(),
            has_bias: self.bias != 0,
            compute_grads: self.compute_grads,
            weight_grad: self.dw != 0,
            gathered: self.row_map != 0,
            dh_splits: self
                .tuning
                .dh_splits
                .unwrap_or(DEFAULT_DH_SPLITS)
                .clamp(1, 16),
        }
    }
}

// Kernel parameter blocks; the layouts match the structs in kernels/fused_ce.cu.

#[repr(C)]
struct CeParams {
    logits: u64,
    bias: u64,
    targets: u64,
    grad_scale: u64,
    row_loss: u64,
    row_map: u64,
    target_grad: u64,
    ld_logits: i64,
    ld_dlogits: i64,
    ignore_index: i64,
    row0: i64,
    vocab: i32,
    slice: i32,
    gs_stride: i32,
    compute_grads: i32,
    scale: f32,
    softcap: f32,
    smoothing: f32,
    pad: i32,
}

#[repr(C)]
struct DhParams {
    partials: u64,
    weight: u64,
    targets: u64,
    target_grad: u64,
    row_map: u64,
    dh: u64,
    row0: i64,
    ignore_index: i64,
    rows: i32,
    hidden: i32,
    splits: i32,
    vocab: i32,
}

#[repr(C)]
struct ScatterParams {
    order: u64,
    targets: u64,
    target_grad: u64,
    hidden: u64,
    row_map: u64,
    dw: u64,
    db: u64,
    ld_hidden: i64,
    n: i64,
    hidden_size: i32,
    vocab: i32,
    dw_is_f32: i32,
    pad: i32,
}

fn arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

/// How the loss kernel runs for this vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossLaunch {
    /// `clusters` resident clusters of `cluster` blocks loop over the rows, each block
    /// holding `slice` vocabulary entries of two rows (one computed, one arriving). Opt-in
    /// (`Tuning::pipelined`): measured slower than `Cluster` on the H100 (10.9 ms against
    /// 7.0 ms per call at (16384, 4096, 128256)): one block per SM with clusters of 8.
    Pipelined {
        cluster: u32,
        slice: u32,
        block: u32,
        clusters: u32,
    },
    /// One cluster of `cluster` blocks per row, `slice` vocabulary entries per block.
    Cluster {
        cluster: u32,
        slice: u32,
        block: u32,
    },
    /// One block per row, reading the row twice.
    Rows { block: u32 },
}

/// Resident clusters of kernel `f` for a configuration, measured once per configuration.
fn capacity(
    dev: &mut Device,
    f: drv_sys::CUfunction,
    cluster: u32,
    block: u32,
    smem: u32,
) -> Result<i32> {
    let key = (f as usize, cluster, smem, block);
    if let Some(c) = dev.cluster_capacity.get(&key) {
        return Ok(*c);
    }
    // SAFETY: a kernel of the loaded module.
    let c = unsafe { device::max_active_clusters(f, cluster, block, smem)? };
    dev.cluster_capacity.insert(key, c);
    Ok(c)
}

pub fn loss_launch(
    dev: &mut Device,
    dtype: Dtype,
    vocab: u64,
    tuning: &Tuning,
) -> Result<LossLaunch> {
    let threads = |default: u32| tuning.block.unwrap_or(default).clamp(64, 1024) / 32 * 32;
    let rows = LossLaunch::Rows {
        block: threads(DEFAULT_ROWS_BLOCK),
    };
    if dev.compute_capability < 90 || tuning.generic {
        return Ok(rows);
    }
    let block = threads(DEFAULT_CLUSTER_BLOCK);
    let limit = (dev.max_smem_optin - 2048).max(4096) as u64;
    if tuning.pipelined == Some(true) {
        // The smallest power-of-two cluster whose two slices fit one block's shared memory:
        // one block per SM, and clusters of 1 to 8 pack the GPCs' SMs well.
        let pipe_block = threads(1024);
        for cluster in [1u64, 2, 4, 8] {
            let slice = vocab.div_ceil(cluster).div_ceil(4) * 4;
            if 2 * slice * 4 > limit {
                continue;
            }
            let cluster = vocab.div_ceil(slice) as u32;
            let smem = (2 * slice * 4) as u32;
            let f = dev.kernels(dtype).ce_rows_pipelined;
            let clusters = capacity(dev, f, cluster, pipe_block, smem)?;
            if clusters > 0 {
                return Ok(LossLaunch::Pipelined {
                    cluster,
                    slice: slice as u32,
                    block: pipe_block,
                    clusters: clusters as u32,
                });
            }
            break;
        }
    }
    let slice_bytes = (tuning.slice_bytes.unwrap_or(DEFAULT_SLICE_BYTES) as u64).clamp(4096, limit);
    let max_cluster = tuning.max_cluster.unwrap_or(16).clamp(1, 16) as u64;
    let mut cluster = (vocab * 4).div_ceil(slice_bytes);
    if cluster > max_cluster {
        // Fewer, larger slices (fewer blocks per SM) rather than an oversized cluster.
        cluster = max_cluster;
        if (vocab.div_ceil(cluster) + 4) * 4 > limit {
            return Ok(rows);
        }
    }
    let slice = vocab.div_ceil(cluster).div_ceil(4) * 4;
    let cluster = vocab.div_ceil(slice) as u32;
    let slice = slice as u32;
    let f = dev.kernels(dtype).ce_rows_cluster;
    Ok(if capacity(dev, f, cluster, block, slice * 4)? > 0 {
        LossLaunch::Cluster {
            cluster,
            slice,
            block,
        }
    } else {
        rows
    })
}

/// Whether the loss has no bias, scale 1, no soft-capping and no label smoothing: then the
/// cluster kernel's `PLAIN` instance computes it (`kernels/fused_ce.cu`), which skips the
/// transforms and exponentiates each logit once.
pub fn plain_loss(has_bias: bool, scale: f32, softcap: f32, smoothing: f32) -> bool {
    let capped = softcap > 0.0; // as the kernels read it
    !has_bias && scale == 1.0 && !capped && smoothing == 0.0
}

fn check(call: &Call, plan: &Plan) -> Result<()> {
    let i32_max = i32::MAX as u64;
    if call.hidden == 0 || call.vocab == 0 {
        return Err(CudaError::argument(
            "hidden and vocab sizes must be positive",
        ));
    }
    if call.hidden > i32_max || plan.ld_dlogits > i32_max || call.ld_h > i32_max {
        return Err(CudaError::argument(format!(
            "sizes beyond cuBLAS's 32-bit dimensions (hidden {}, vocab {})",
            call.hidden, call.vocab
        )));
    }
    if call.ld_h < call.hidden {
        return Err(CudaError::argument(format!(
            "hidden: row stride {} < hidden size {}",
            call.ld_h, call.hidden
        )));
    }
    if call.workspace_bytes < plan.total_bytes {
        return Err(CudaError::argument(format!(
            "workspace: {} bytes given, the plan needs {}",
            call.workspace_bytes, plan.total_bytes
        )));
    }
    if call.compute_grads && (call.dh == 0 || call.grad_scale == 0 || call.order == 0) {
        return Err(CudaError::argument(
            "compute_grads needs dh, grad_scale and order (dw: 0 for no weight gradient)",
        ));
    }
    if call.compute_grads && call.bias != 0 && call.db == 0 {
        return Err(CudaError::argument("db: needed when there is a bias"));
    }
    Ok(())
}

/// Enqueues the whole computation on `call.stream`. Returns once enqueued.
pub fn run(call: &Call) -> Result<()> {
    let shape = call.shape();
    let plan = shape.plan(call.budget);
    check(call, &plan)?;
    if call.rows == 0 {
        return Ok(());
    }
    let mut guard = device::lock(call.device)?;
    let dev = guard.dev();
    let launch_kind = loss_launch(dev, call.dtype, call.vocab, &call.tuning)?;
    let k = dev.kernels(call.dtype);
    let cluster_kernel = if plain_loss(call.bias != 0, call.scale, call.softcap, call.smoothing) {
        k.ce_rows_cluster_plain
    } else {
        k.ce_rows_cluster
    };
    let stream = call.stream as drv_sys::CUstream;
    let ws = call.workspace;
    let es = call.dtype.bytes();
    let (n, hidden, vocab) = (call.rows, call.hidden, call.vocab);
    let splits = shape.dh_splits;

    let blas = Blas {
        handle: dev.blas,
        dtype: call.dtype,
    };
    unsafe {
        blas_sys::cublasSetStream_v2(dev.blas, stream as blas_sys::cudaStream_t)
            .result()
            .context("binding cuBLAS to torch's stream")?;
        blas_sys::cublasSetWorkspace_v2(
            dev.blas,
            (ws + plan.cublas) as *mut c_void,
            CUBLAS_WORKSPACE_BYTES as usize,
        )
        .result()
        .context("giving cuBLAS its workspace")?;
    }
    let with_db = call.compute_grads && call.bias != 0;
    if with_db {
        unsafe {
            drv::memset_d8_async(ws + plan.db_acc, 0, (vocab * 4) as usize, stream)
                .context("clearing db")?;
            let (mut dst, mut count, mut value) = (ws + plan.ones, plan.chunk_rows as i64, 1f32);
            launch(
                k.fill,
                Launch::new((plan.chunk_rows.div_ceil(256) as u32, 1, 1), 256),
                stream,
                &mut [arg(&mut dst), arg(&mut count), arg(&mut value)],
                "fill",
            )?;
        }
    }
    let col_blocks = |cols: u64| (cols.div_ceil(256).min(64)) as u32;

    // dW's destination: the float32 accumulator or dW itself; 0 when the weight is frozen.
    let with_dw = call.compute_grads && call.dw != 0;
    let dw_out = if with_dw {
        plan.dw_acc.map_or(call.dw, |off| ws + off)
    } else {
        0
    };

    for chunk in 0..plan.chunks {
        let row0 = chunk * plan.chunk_rows;
        let rows = plan.chunk_rows.min(n - row0);
        let (h_chunk, ld_h_chunk) = if call.row_map != 0 {
            let stage = ws + plan.hidden_stage;
            unsafe {
                let (mut src, mut ld, mut map, mut r0, mut dst, mut hs) = (
                    call.h,
                    call.ld_h as i64,
                    call.row_map,
                    row0 as i64,
                    stage,
                    hidden as i32,
                );
                launch(
                    k.gather_rows,
                    Launch::new((col_blocks(hidden), rows as u32, 1), 256),
                    stream,
                    &mut [
                        arg(&mut src),
                        arg(&mut ld),
                        arg(&mut map),
                        arg(&mut r0),
                        arg(&mut dst),
                        arg(&mut hs),
                    ],
                    "gather_rows",
                )?;
            }
            (stage, hidden)
        } else {
            (call.h + row0 * call.ld_h * es, call.ld_h)
        };
        let logits = ws + plan.logits;
        let dims = Dims {
            rows,
            hidden,
            vocab,
        };
        let h_mat = Mat {
            ptr: h_chunk,
            ld: ld_h_chunk,
        };
        let logits_mat = Mat {
            ptr: logits,
            ld: plan.ld_logits,
        };
        let dlogits_mat = Mat {
            ptr: logits,
            ld: plan.ld_dlogits,
        };
        unsafe { blas.logits(dims, call.w, h_mat, logits_mat)? };

        let mut p = CeParams {
            logits,
            bias: call.bias,
            targets: call.targets,
            grad_scale: call.grad_scale,
            row_loss: call.row_loss,
            row_map: call.row_map,
            target_grad: ws + plan.target_grad,
            ld_logits: plan.ld_logits as i64,
            ld_dlogits: plan.ld_dlogits as i64,
            ignore_index: call.ignore_index,
            row0: row0 as i64,
            vocab: vocab as i32,
            slice: 0,
            gs_stride: call.grad_scale_stride as i32,
            compute_grads: call.compute_grads as i32,
            scale: call.scale,
            softcap: call.softcap,
            smoothing: call.smoothing,
            pad: 0,
        };
        match launch_kind {
            LossLaunch::Pipelined {
                cluster,
                slice,
                block,
                clusters,
            } => {
                p.slice = slice as i32;
                let mut rows_arg = rows as i32;
                unsafe {
                    launch(
                        k.ce_rows_pipelined,
                        Launch {
                            grid: (clusters.min(rows as u32) * cluster, 1, 1),
                            block,
                            smem: 2 * slice * 4,
                            cluster: Some(cluster),
                        },
                        stream,
                        &mut [arg(&mut p), arg(&mut rows_arg)],
                        "the loss kernel (pipelined clusters)",
                    )?
                };
            }
            LossLaunch::Cluster {
                cluster,
                slice,
                block,
            } => {
                p.slice = slice as i32;
                unsafe {
                    launch(
                        cluster_kernel,
                        Launch {
                            grid: (rows as u32 * cluster, 1, 1),
                            block,
                            smem: slice * 4,
                            cluster: Some(cluster),
                        },
                        stream,
                        &mut [arg(&mut p)],
                        "the loss kernel (clusters)",
                    )?
                };
            }
            LossLaunch::Rows { block } => unsafe {
                launch(
                    k.ce_rows,
                    Launch::new((rows as u32, 1, 1), block),
                    stream,
                    &mut [arg(&mut p)],
                    "the loss kernel",
                )?
            },
        }
        if !call.compute_grads {
            continue;
        }
        let partials = ws + plan.dh_partials;
        unsafe { blas.dh_partials(dims, splits, dlogits_mat, call.w, partials)? };
        let mut d = DhParams {
            partials,
            weight: call.w,
            targets: call.targets,
            target_grad: ws + plan.target_grad,
            row_map: call.row_map,
            dh: call.dh,
            row0: row0 as i64,
            ignore_index: call.ignore_index,
            rows: rows as i32,
            hidden: hidden as i32,
            splits: splits as i32,
            vocab: vocab as i32,
        };
        unsafe {
            launch(
                k.dh_finish,
                Launch::new((col_blocks(hidden), rows as u32, 1), 256),
                stream,
                &mut [arg(&mut d)],
                "dh_finish",
            )?;
            if with_dw {
                blas.dw(
                    dims,
                    h_mat,
                    dlogits_mat,
                    dw_out,
                    plan.dw_acc.is_some(),
                    chunk > 0,
                )?;
            }
            if with_db {
                blas.db(dims, dlogits_mat, ws + plan.ones, ws + plan.db_acc)?;
            }
        }
    }

    if with_dw || with_db {
        let mut s = ScatterParams {
            order: call.order,
            targets: call.targets,
            target_grad: ws + plan.target_grad,
            hidden: call.h,
            row_map: call.row_map,
            dw: dw_out,
            db: if with_db { ws + plan.db_acc } else { 0 },
            ld_hidden: call.ld_h as i64,
            n: n as i64,
            hidden_size: hidden as i32,
            vocab: vocab as i32,
            dw_is_f32: plan.dw_acc.is_some() as i32,
            pad: 0,
        };
        unsafe {
            launch(
                k.target_scatter,
                Launch::new((n as u32, 1, 1), 256),
                stream,
                &mut [arg(&mut s)],
                "target_scatter",
            )?;
        }
        // Float32 accumulators to the output dtype: dW (when accumulated in float32), db.
        let mut casts = Vec::new();
        if plan.dw_acc.is_some() {
            casts.push((dw_out, call.dw, vocab * hidden));
        }
        if with_db {
            casts.push((ws + plan.db_acc, call.db, vocab));
        }
        for (src, dst, count) in casts {
            unsafe {
                let (mut src, mut dst, mut count) = (src, dst, count as i64);
                launch(
                    k.cast_from_f32,
                    Launch::new(((count as u64).div_ceil(256).min(4096) as u32, 1, 1), 256),
                    stream,
                    &mut [arg(&mut src), arg(&mut dst), arg(&mut count)],
                    "cast_from_f32",
                )?;
            }
        }
    }
    Ok(())
}

/// `count` elements of `dtype` at `data` multiplied in place by the float32 at `factor`, on
/// torch's stream `stream` of GPU `device`; the kernel leaves them untouched when the factor
/// is exactly 1 (`scale_by` in kernels/fused_ce.cu). The loss's backward scales the gradients
/// it computed in the forward by the incoming gradient with this.
pub fn scale_in_place(
    device: i32,
    stream: u64,
    dtype: Dtype,
    data: u64,
    count: u64,
    factor: u64,
) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    if data == 0 || factor == 0 {
        return Err(CudaError::argument("scale_in_place: a null address"));
    }
    let mut guard = device::lock(device)?;
    let dev = guard.dev();
    let f = dev.kernels(dtype).scale_by;
    let vectors = count.div_ceil(16 / dtype.bytes());
    let blocks = vectors.div_ceil(256).min(u64::from(dev.sms()) * 8).max(1) as u32;
    let (mut data, mut count, mut factor) = (data, count as i64, factor);
    // SAFETY: the parameters match scale_by's list; `data` holds `count` elements of `dtype`
    // and `factor` one float32, both torch allocations on this device (checked by the caller).
    unsafe {
        launch(
            f,
            Launch::new((blocks, 1, 1), 256),
            stream as drv_sys::CUstream,
            &mut [arg(&mut data), arg(&mut count), arg(&mut factor)],
            "scale_by",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::plain_loss;

    #[test]
    fn only_the_untransformed_loss_is_plain() {
        assert!(plain_loss(false, 1.0, 0.0, 0.0));
        assert!(plain_loss(false, 1.0, -1.0, 0.0)); // a non-positive cap means none
        assert!(!plain_loss(true, 1.0, 0.0, 0.0));
        assert!(!plain_loss(false, 0.5, 0.0, 0.0));
        assert!(!plain_loss(false, 1.0, 30.0, 0.0));
        assert!(!plain_loss(false, 1.0, 0.0, 0.1));
        assert!(!plain_loss(false, f32::NAN, 0.0, 0.0));
    }
}
