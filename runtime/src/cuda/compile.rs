//! Run-time compilation of `kernels/*.cu` with NVRTC, cached on disk.
//!
//! The cache key is the sha256 of the source, the options, the target architecture and the
//! NVRTC version, so an edit, a new option, another GPU or another NVRTC never reuses a
//! stale image. The directory is `$FORWARD_REWRITE_KERNEL_CACHE`, else
//! `$XDG_CACHE_HOME/forward-rewrite/kernels`, else `~/.cache/forward-rewrite/kernels`; a cache
//! that cannot be read or written only costs a compile.
//!
//! For kernel development, `$FORWARD_REWRITE_KERNEL_DIR` names a folder laid out like
//! `kernels/`: its files are compiled instead of the copies built into the binary, so an edited
//! kernel (same names and parameter blocks) is checked and timed on a GPU without rebuilding
//! the wheel, and several edits can be compared in one run.

use std::ffi::{CString, c_char, c_int};
use std::path::PathBuf;

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use sha2::{Digest, Sha256};

use super::error::{Context, CudaError, Result};
use super::libs;

/// The kernels of the fused loss, embedded in the binary.
pub const FUSED_CE_SOURCE: &str = include_str!("../../../kernels/fused_ce.cu");
pub const FUSED_CE_NAME: &str = "fused_ce.cu";

/// The decoder-fusion kernels, each behind the shared `kernels/fusion_common.cuh` (each file
/// starts with a `#line` directive, so NVRTC's messages point into the file itself).
pub const RMS_NORM_SOURCE: &str = concat!(
    include_str!("../../../kernels/fusion_common.cuh"),
    include_str!("../../../kernels/rms_norm.cu")
);
pub const ROTARY_SOURCE: &str = concat!(
    include_str!("../../../kernels/fusion_common.cuh"),
    include_str!("../../../kernels/rotary.cu")
);
pub const GATED_ACT_SOURCE: &str = concat!(
    include_str!("../../../kernels/fusion_common.cuh"),
    include_str!("../../../kernels/gated_act.cu")
);

const OPTIONS: &[&str] = &["--std=c++17"];

/// The folder whose kernel files replace the built-in ones (module docs).
pub const KERNEL_DIR_VAR: &str = "FORWARD_REWRITE_KERNEL_DIR";

/// The files a module is built from, in order: every module but the loss's starts with the
/// shared header (the `concat!`s above).
fn module_files(name: &str) -> Vec<&str> {
    if name == FUSED_CE_NAME {
        vec![name]
    } else {
        vec!["fusion_common.cuh", name]
    }
}

/// The text of module `name`: `built_in`, or its files read from `$FORWARD_REWRITE_KERNEL_DIR`
/// when that is set.
fn module_text<'a>(built_in: &'a str, name: &str) -> Result<std::borrow::Cow<'a, str>> {
    let dir = std::env::var_os(KERNEL_DIR_VAR).filter(|d| !d.is_empty());
    module_text_in(built_in, name, dir.as_deref())
}

fn module_text_in<'a>(
    built_in: &'a str,
    name: &str,
    dir: Option<&std::ffi::OsStr>,
) -> Result<std::borrow::Cow<'a, str>> {
    let Some(dir) = dir else {
        return Ok(built_in.into());
    };
    let mut text = String::new();
    for file in module_files(name) {
        let path = PathBuf::from(&dir).join(file);
        let part = std::fs::read_to_string(&path).map_err(|e| {
            CudaError::runtime(format!(
                "${KERNEL_DIR_VAR}: cannot read {}: {e}",
                path.display()
            ))
        })?;
        text.push_str(&part);
    }
    Ok(text.into())
}

/// A compiled module: a cubin for the exact architecture, or PTX for the driver to JIT.
pub struct Image {
    pub bytes: Vec<u8>,
    pub is_cubin: bool,
    pub log: String,
}

pub fn nvrtc_version() -> Result<(i32, i32)> {
    libs::require_nvrtc()?;
    let (mut major, mut minor) = (0 as c_int, 0 as c_int);
    // SAFETY: plain out-parameters.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .context("asking NVRTC its version")?;
    Ok((major, minor))
}

/// The architectures (e.g. 90 for sm_90) this NVRTC can emit code for.
pub fn supported_archs() -> Result<Vec<i32>> {
    libs::require_nvrtc()?;
    let mut n: c_int = 0;
    // SAFETY: out-parameter, then a buffer of the size NVRTC reported.
    unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut n) }
        .result()
        .context("listing NVRTC's architectures")?;
    let mut archs = vec![0 as c_int; n.max(0) as usize];
    unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .context("listing NVRTC's architectures")?;
    Ok(archs)
}

/// The target for a device of compute capability `cc` (e.g. 90): its own cubin when NVRTC
/// knows the architecture, else PTX of the newest one it knows below it.
pub fn target_for(cc: i32) -> Result<String> {
    let archs = supported_archs()?;
    if archs.contains(&cc) {
        return Ok(format!("sm_{cc}"));
    }
    match archs.iter().copied().filter(|a| *a <= cc).max() {
        Some(a) => Ok(format!("compute_{a}")),
        None => Err(CudaError::runtime(format!(
            "NVRTC supports none of the architectures up to sm_{cc} (it knows {archs:?})"
        ))),
    }
}

/// Compiles `source` for `target` ("sm_90" gives a cubin, "compute_90" PTX). An error
/// carries NVRTC's log.
pub fn compile(source: &str, name: &str, target: &str) -> Result<Image> {
    libs::require_nvrtc()?;
    let src = CString::new(source)
        .map_err(|_| CudaError::runtime("kernel source contains a NUL byte"))?;
    let cname =
        CString::new(name).map_err(|_| CudaError::runtime("kernel name contains a NUL byte"))?;
    let prog = nvrtc::create_program(&src, Some(&cname)).context("creating an NVRTC program")?;
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={target}"));
    // SAFETY: `prog` is a live program until destroy_program below; buffers are sized by NVRTC.
    let outcome = unsafe { nvrtc::compile_program(prog, &options) };
    let log = unsafe { nvrtc::get_program_log(prog) }
        .map(|raw| c_chars_to_string(&raw))
        .unwrap_or_default();
    let image = match outcome {
        Err(e) => Err(CudaError::runtime(format!(
            "NVRTC could not compile {name} for {target} ({e:?}):\n{log}"
        ))),
        Ok(()) if target.starts_with("sm_") => unsafe { cubin(prog) }.map(|bytes| Image {
            bytes,
            is_cubin: true,
            log: log.clone(),
        }),
        Ok(()) => unsafe { nvrtc::get_ptx(prog) }
            .context("reading PTX")
            .map(|raw| Image {
                bytes: raw.iter().map(|c| *c as u8).collect(),
                is_cubin: false,
                log: log.clone(),
            }),
    };
    // SAFETY: destroyed once; nothing refers to it afterwards.
    let _ = unsafe { nvrtc::destroy_program(prog) };
    image
}

unsafe fn cubin(prog: nvrtc_sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) }
        .result()
        .context("reading the cubin's size")?;
    let mut bytes = vec![0u8; size];
    unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr() as *mut c_char) }
        .result()
        .context("reading the cubin")?;
    Ok(bytes)
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).trim().to_string()
}

pub fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("FORWARD_REWRITE_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    if let Some(xdg) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(xdg).join("forward-rewrite").join("kernels"));
    }
    std::env::var_os("HOME").map(|home| {
        PathBuf::from(home)
            .join(".cache")
            .join("forward-rewrite")
            .join("kernels")
    })
}

/// sha256 over everything that decides the image.
pub fn cache_key(source: &str, target: &str, nvrtc: (i32, i32)) -> String {
    let mut h = Sha256::new();
    for part in [
        source,
        &OPTIONS.join(" "),
        target,
        &format!("nvrtc {}.{}", nvrtc.0, nvrtc.1),
    ] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The image of `source` (or of its files in `$FORWARD_REWRITE_KERNEL_DIR`) for `target`,
/// from the disk cache or freshly compiled (and then stored, atomically: written to a
/// temporary name, then renamed).
pub fn cached(source: &str, name: &str, target: &str) -> Result<Image> {
    let source = &*module_text(source, name)?;
    let key = cache_key(source, target, nvrtc_version()?);
    let ext = if target.starts_with("sm_") {
        "cubin"
    } else {
        "ptx"
    };
    let stem = name.trim_end_matches(".cu");
    let path = cache_dir().map(|d| d.join(format!("{stem}-{key}.{ext}")));
    if let Some(bytes) = path
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .filter(|b| !b.is_empty())
    {
        return Ok(Image {
            bytes,
            is_cubin: ext == "cubin",
            log: String::new(),
        });
    }
    let image = compile(source, name, target)?;
    if let Some(path) = path {
        let _ = store(&path, &image.bytes);
    }
    Ok(image)
}

fn store(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_each_input() {
        let base = cache_key("src", "sm_90", (13, 0));
        assert_eq!(base.len(), 64);
        assert_eq!(base, cache_key("src", "sm_90", (13, 0)));
        assert_ne!(base, cache_key("src2", "sm_90", (13, 0)));
        assert_ne!(base, cache_key("src", "sm_80", (13, 0)));
        assert_ne!(base, cache_key("src", "sm_90", (13, 2)));
    }

    #[test]
    fn built_in_modules_are_their_files_in_order() {
        let kernels = concat!(env!("CARGO_MANIFEST_DIR"), "/../kernels/");
        for (name, built_in) in [
            (FUSED_CE_NAME, FUSED_CE_SOURCE),
            ("rms_norm.cu", RMS_NORM_SOURCE),
            ("rotary.cu", ROTARY_SOURCE),
            ("gated_act.cu", GATED_ACT_SOURCE),
            ("attnres_mix.cu", crate::cuda::attnres::ATTNRES_MIX.source),
        ] {
            let files: String = module_files(name)
                .iter()
                .map(|f| std::fs::read_to_string(format!("{kernels}{f}")).unwrap())
                .collect();
            assert_eq!(files, built_in, "{name}");
        }
    }

    #[test]
    fn a_kernel_folder_replaces_the_built_in_files() {
        let dir = std::env::temp_dir().join(format!("fr-kernel-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("fusion_common.cuh"), "// common\n").unwrap();
        std::fs::write(dir.join("rms_norm.cu"), "// edited\n").unwrap();
        std::fs::write(dir.join(FUSED_CE_NAME), "// loss\n").unwrap();
        let text = |name| module_text_in("built-in", name, Some(dir.as_os_str()));
        assert_eq!(text("rms_norm.cu").unwrap(), "// common\n// edited\n");
        assert_eq!(text(FUSED_CE_NAME).unwrap(), "// loss\n");
        let missing = text("rotary.cu").unwrap_err().to_string();
        assert!(
            missing.contains(KERNEL_DIR_VAR) && missing.contains("rotary.cu"),
            "{missing}"
        );
        assert_eq!(
            module_text_in("built-in", "rotary.cu", None).unwrap(),
            "built-in"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cache_dir_honours_the_variable() {
        // Only reads the environment; the variable is set by no other test.
        if std::env::var_os("FORWARD_REWRITE_KERNEL_CACHE").is_none() {
            assert!(cache_dir().is_none_or(|d| d.ends_with("forward-rewrite/kernels")));
        }
    }
}
