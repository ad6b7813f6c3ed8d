//! Per-GPU state: torch's primary context, the loaded kernel module, a cuBLAS handle, and
//! the decoder-fusion modules, each loaded on its first use.
//!
//! Built on first use of a device and kept for the life of the process. Every call takes
//! the state's lock for the time it enqueues work (the cuBLAS handle is not thread-safe).

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, c_void};
use std::sync::{Mutex, MutexGuard, OnceLock};

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result as drv, sys as drv_sys};

use super::compile;
use super::error::{Context, CudaError, Result};
use super::libs;

/// Element type of the inputs (and of dh, dW, db).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bf16,
    F16,
    F32,
}

impl Dtype {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "bfloat16" => Ok(Dtype::Bf16),
            "float16" => Ok(Dtype::F16),
            "float32" => Ok(Dtype::F32),
            other => Err(CudaError::argument(format!(
                "dtype: {other:?} is not bfloat16, float16 or float32"
            ))),
        }
    }
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            _ => 2,
        }
    }
    /// The suffix of the kernel instances for this dtype (`_bf16`, `_f16`, `_f32`).
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
            Dtype::F32 => "f32",
        }
    }
    pub fn cublas(self) -> blas_sys::cudaDataType {
        match self {
            Dtype::Bf16 => blas_sys::cudaDataType::CUDA_R_16BF,
            Dtype::F16 => blas_sys::cudaDataType::CUDA_R_16F,
            Dtype::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        }
    }
}

/// The kernels of `kernels/fused_ce.cu` for one dtype.
pub struct Kernels {
    pub ce_rows: drv_sys::CUfunction,
    pub ce_rows_cluster: drv_sys::CUfunction,
    /// The cluster kernel specialised for no bias, scale 1, no soft-capping and no label
    /// smoothing ([`crate::cuda::fused::plain_loss`]); the launcher picks it.
    pub ce_rows_cluster_plain: drv_sys::CUfunction,
    pub ce_rows_pipelined: drv_sys::CUfunction,
    pub dh_finish: drv_sys::CUfunction,
    pub target_scatter: drv_sys::CUfunction,
    pub gather_rows: drv_sys::CUfunction,
    pub cast_from_f32: drv_sys::CUfunction,
    pub fill: drv_sys::CUfunction,
    pub scale_by: drv_sys::CUfunction,
}

pub struct Device {
    pub ctx: drv_sys::CUcontext,
    pub compute_capability: i32,
    pub sm_count: i32,
    /// Largest dynamic shared memory a block may opt into, in bytes.
    pub max_smem_optin: i32,
    pub target: String,
    pub blas: blas_sys::cublasHandle_t,
    kernels: HashMap<Dtype, Kernels>,
    /// Cluster kernel configurations already checked: (kernel, cluster size, smem, block)
    /// -> how many clusters can be resident (0: cannot run).
    pub cluster_capacity: HashMap<(usize, u32, u32, u32), i32>,
    /// The decoder-fusion modules (`kernels/rms_norm.cu`, ...), each compiled or read from
    /// the cache and loaded on its first use, with the functions looked up so far.
    modules: HashMap<&'static str, LoadedModule>,
}

/// A kernel source compiled and loaded on first use (the decoder-fusion kernels).
#[derive(Clone, Copy, Debug)]
pub struct ModuleSource {
    /// The file name NVRTC reports and the cache names files after.
    pub name: &'static str,
    pub source: &'static str,
}

struct LoadedModule {
    module: drv_sys::CUmodule,
    functions: HashMap<String, drv_sys::CUfunction>,
    /// Blocks per SM by (function, block size, dynamic shared memory), measured once.
    occupancy: HashMap<(usize, u32, u32), i32>,
    /// Functions allowed all the opt-in dynamic shared memory ([`Device::function_with_max_smem`]).
    max_smem: HashSet<usize>,
}

/// Loads a compiled image into the current context.
fn load_image(image: compile::Image) -> Result<drv_sys::CUmodule> {
    let mut bytes = image.bytes;
    if !image.is_cubin && bytes.last() != Some(&0) {
        bytes.push(0); // PTX is loaded as a C string
    }
    // SAFETY: a cubin or NUL-terminated PTX image that NVRTC produced.
    unsafe { drv::module::load_data(bytes.as_ptr() as *const c_void) }
        .context("loading the kernel module")
}

// SAFETY: the raw handles are only used while holding the state's mutex.
unsafe impl Send for Device {}

impl Device {
    /// Its multiprocessors (at least 1): the blocks a resident grid fills.
    pub fn sms(&self) -> u32 {
        self.sm_count.max(1) as u32
    }

    pub fn kernels(&self, dtype: Dtype) -> &Kernels {
        &self.kernels[&dtype]
    }

    /// Makes this device's primary context current on the calling thread.
    pub fn bind(&self) -> Result<()> {
        // SAFETY: ctx is a retained primary context that is never released.
        unsafe { drv::ctx::set_current(self.ctx) }.context("making torch's CUDA context current")
    }

    fn open(ordinal: i32) -> Result<Device> {
        libs::require_driver()?;
        libs::require_cublas()?;
        drv::init().context("initialising the CUDA driver")?;
        let dev = drv::device::get(ordinal).context("opening the device")?;
        // The primary context is the one torch uses: retaining it attaches to it.
        let ctx =
            unsafe { drv::primary_ctx::retain(dev) }.context("retaining the primary context")?;
        unsafe { drv::ctx::set_current(ctx) }.context("making the primary context current")?;
        let attr =
            |a| unsafe { drv::device::get_attribute(dev, a) }.context("reading a device attribute");
        use drv_sys::CUdevice_attribute::*;
        let major = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sm_count = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let max_smem_optin = attr(CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let cc = major * 10 + minor;
        if cc < 80 {
            return Err(CudaError::runtime(format!(
                "compute capability {major}.{minor} is below 8.0 (bf16 needs Ampere or newer)"
            )));
        }
        let target = compile::target_for(cc)?;
        let image = compile::cached(compile::FUSED_CE_SOURCE, compile::FUSED_CE_NAME, &target)?;
        let module = load_image(image)?;
        let mut kernels = HashMap::new();
        for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let f = |base: &str| -> Result<drv_sys::CUfunction> {
                let name = CString::new(format!("{base}_{}", dtype.suffix()))
                    .expect("kernel names have no NUL");
                unsafe { drv::module::get_function(module, name) }
                    .context("finding a kernel in the module")
            };
            let k = Kernels {
                ce_rows: f("ce_rows")?,
                ce_rows_cluster: f("ce_rows_cluster")?,
                ce_rows_cluster_plain: f("ce_rows_cluster_plain")?,
                ce_rows_pipelined: f("ce_rows_pipelined")?,
                dh_finish: f("dh_finish")?,
                target_scatter: f("target_scatter")?,
                gather_rows: f("gather_rows")?,
                cast_from_f32: f("cast_from_f32")?,
                fill: f("fill")?,
                scale_by: f("scale_by")?,
            };
            if cc >= 90 {
                use drv_sys::CUfunction_attribute::*;
                for f in [
                    k.ce_rows_cluster,
                    k.ce_rows_cluster_plain,
                    k.ce_rows_pipelined,
                ] {
                    unsafe {
                        drv::function::set_function_attribute(
                            f,
                            CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            max_smem_optin - 2048, // room for the kernel's static shared memory
                        )
                        .context("raising the cluster kernels' shared memory limit")?;
                        drv::function::set_function_attribute(
                            f,
                            CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                            1,
                        )
                        .context("allowing clusters of up to 16 blocks")?;
                    }
                }
            }
            kernels.insert(dtype, k);
        }
        let blas = blas::create_handle().context("creating a cuBLAS handle")?;
        Ok(Device {
            ctx,
            compute_capability: cc,
            sm_count,
            max_smem_optin,
            target,
            blas,
            kernels,
            cluster_capacity: HashMap::new(),
            modules: HashMap::new(),
        })
    }

    fn loaded(&mut self, src: &ModuleSource) -> Result<&mut LoadedModule> {
        if !self.modules.contains_key(src.name) {
            let image = compile::cached(src.source, src.name, &self.target)?;
            let module = load_image(image)?;
            self.modules.insert(
                src.name,
                LoadedModule {
                    module,
                    functions: HashMap::new(),
                    occupancy: HashMap::new(),
                    max_smem: HashSet::new(),
                },
            );
        }
        Ok(self.modules.get_mut(src.name).expect("just inserted"))
    }

    /// Kernel `name` of the module `src` (compiled, or read from the disk cache, and loaded
    /// on first use).
    pub fn function(&mut self, src: &ModuleSource, name: &str) -> Result<drv_sys::CUfunction> {
        let m = self.loaded(src)?;
        if let Some(f) = m.functions.get(name) {
            return Ok(*f);
        }
        let cname = CString::new(name).map_err(|_| CudaError::runtime("kernel name with NUL"))?;
        // SAFETY: a loaded module that is never unloaded.
        let f = unsafe { drv::module::get_function(m.module, cname) }
            .context(&format!("finding kernel {name} in {}", src.name))?;
        m.functions.insert(name.to_string(), f);
        Ok(f)
    }

    /// Kernel `name` of module `src`, allowed to take all the dynamic shared memory a block may
    /// opt into (`max_smem_optin`; the kernel has no static shared memory): set once.
    pub fn function_with_max_smem(
        &mut self,
        src: &ModuleSource,
        name: &str,
    ) -> Result<drv_sys::CUfunction> {
        let f = self.function(src, name)?;
        let limit = self.max_smem_optin;
        let m = self.loaded(src)?;
        if !m.max_smem.contains(&(f as usize)) {
            // SAFETY: a kernel of a loaded module.
            unsafe {
                drv::function::set_function_attribute(
                    f,
                    drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    limit,
                )
            }
            .context(&format!("raising {name}'s shared memory limit"))?;
            m.max_smem.insert(f as usize);
        }
        Ok(f)
    }

    /// How many blocks of `block` threads (and `smem` bytes of dynamic shared memory) of
    /// kernel `f` of module `src` fit on one SM at once (at least 1).
    ///
    /// # Safety
    /// `f` must be a kernel of the module `src` (from [`Device::function`]).
    pub unsafe fn blocks_per_sm(
        &mut self,
        src: &ModuleSource,
        f: drv_sys::CUfunction,
        block: u32,
        smem: u32,
    ) -> Result<u32> {
        let m = self.loaded(src)?;
        let key = (f as usize, block, smem);
        if let Some(n) = m.occupancy.get(&key) {
            return Ok(*n as u32);
        }
        // SAFETY: a kernel of a loaded module.
        let n = unsafe {
            drv::occupancy::max_active_block_per_multiprocessor(f, block as i32, smem as usize)
        }
        .context("asking the occupancy of a kernel")?
        .max(1);
        m.occupancy.insert(key, n);
        Ok(n as u32)
    }
}

static DEVICES: OnceLock<Mutex<HashMap<i32, Device>>> = OnceLock::new();

/// The state of GPU `ordinal`, locked, created (module compiled or read from the cache,
/// cuBLAS handle made) on first use.
pub fn lock(ordinal: i32) -> Result<DeviceGuard> {
    let map = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
    let mut guard = map.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let std::collections::hash_map::Entry::Vacant(slot) = guard.entry(ordinal) {
        slot.insert(Device::open(ordinal)?);
    }
    guard.get(&ordinal).expect("just inserted").bind()?;
    Ok(DeviceGuard { guard, ordinal })
}

pub struct DeviceGuard {
    guard: MutexGuard<'static, HashMap<i32, Device>>,
    ordinal: i32,
}

impl DeviceGuard {
    pub fn dev(&mut self) -> &mut Device {
        self.guard
            .get_mut(&self.ordinal)
            .expect("present while locked")
    }
}

/// Grid, block and shared memory of a launch; with `cluster = Some(n)`, blocks run in
/// clusters of n along x.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem: u32,
    pub cluster: Option<u32>,
}

impl Dims {
    pub fn new(grid: (u32, u32, u32), block: u32) -> Self {
        Dims {
            grid,
            block,
            smem: 0,
            cluster: None,
        }
    }
}

/// Launches `f` on `stream`.
///
/// # Safety
/// `params` must match the kernel's parameter list, each entry pointing at a live value;
/// the addresses inside must be live device buffers.
pub unsafe fn launch(
    f: drv_sys::CUfunction,
    dims: Dims,
    stream: drv_sys::CUstream,
    params: &mut [*mut c_void],
    what: &str,
) -> Result<()> {
    let Dims {
        grid,
        block,
        smem,
        cluster,
    } = dims;
    let mut attr: drv_sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    let mut config = drv_sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: stream,
        attrs: std::ptr::null_mut(),
        numAttrs: 0,
    };
    if let Some(n) = cluster {
        attr.id = drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
        attr.value.clusterDim.x = n;
        attr.value.clusterDim.y = 1;
        attr.value.clusterDim.z = 1;
        config.attrs = &mut attr;
        config.numAttrs = 1;
    }
    unsafe { drv_sys::cuLaunchKernelEx(&config, f, params.as_mut_ptr(), std::ptr::null_mut()) }
        .result()
        .context(&format!("launching {what}"))
}

/// How many clusters of `cluster` blocks (each `block` threads, `smem` dynamic bytes) can be
/// resident at once; 0 means the configuration cannot run.
///
/// # Safety
/// `f` must be a kernel of a loaded module.
pub unsafe fn max_active_clusters(
    f: drv_sys::CUfunction,
    cluster: u32,
    block: u32,
    smem: u32,
) -> Result<i32> {
    let mut attr: drv_sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = cluster;
    attr.value.clusterDim.y = 1;
    attr.value.clusterDim.z = 1;
    let config = drv_sys::CUlaunchConfig {
        gridDimX: cluster * 64,
        gridDimY: 1,
        gridDimZ: 1,
        blockDimX: block,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem,
        hStream: std::ptr::null_mut(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    let mut n = 0;
    let r = unsafe { drv_sys::cuOccupancyMaxActiveClusters(&mut n, f, &config) };
    Ok(if r == drv_sys::CUresult::CUDA_SUCCESS {
        n
    } else {
        0
    })
}
