"""The CUDA backend: Rust through cudarc (``_native.cuda_fused_ce``, runtime/src/cuda/).

Same function as every backend (ARCHITECTURE.md, contract 4). Tensors are checked here
(Python errors naming the argument); outputs and the one scratch workspace are allocated
here with torch, on the tensors' device, so torch's allocator accounts for every byte; the
work is enqueued on torch's current stream in torch's own (primary) context.

Ignored rows are skipped: one host sync per call (``torch.nonzero``) finds the rows to
compute, and the products run on those rows only. While the stream is being captured into
a CUDA graph no sync is allowed; then every row goes through the products, and ignored
rows get a zero loss and zero gradients from the kernels.
"""

import ctypes
import glob
import importlib.util
import os

import torch

from . import _native
from ._backend import check_args

_DTYPES = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
}
_NVRTC_SONAME = "libnvrtc.so.13"


def _nvrtc_candidates():
    """Where torch's CUDA 13 wheels put NVRTC (nvidia/cu13/lib, or the older per-library
    nvidia/cuda_nvrtc/lib layout), then the toolkit under CUDA_HOME."""
    roots = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        roots.extend(spec.submodule_search_locations)
    found = []
    for root in roots:
        for sub in ("cu13/lib", "cuda_nvrtc/lib"):
            found.extend(sorted(glob.glob(os.path.join(root, sub, "libnvrtc.so.13*"))))
    for home in (
        os.environ.get("CUDA_HOME"),
        os.environ.get("CUDA_PATH"),
        "/usr/local/cuda",
    ):
        if home:
            found.extend(
                sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so.13*")))
            )
    return [p for p in found if "builtins" not in os.path.basename(p)]


_nvrtc_handle = None


def load_nvrtc():
    """Makes NVRTC loadable by its soname for the Rust side (cudarc dlopens
    ``libnvrtc.so.13``): the system's if the loader finds one, else the wheel's, loaded
    globally so the later dlopen by soname returns it. Returns the path or soname used."""
    global _nvrtc_handle
    if _nvrtc_handle is not None:
        return _nvrtc_handle._name
    errors = []
    for name in (_NVRTC_SONAME, *_nvrtc_candidates()):
        try:
            _nvrtc_handle = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return name
        except OSError as e:
            errors.append(f"{name}: {e}")
    raise RuntimeError(
        "forward_rewrite CUDA backend: NVRTC (libnvrtc.so.13) was not found; install "
        "torch's CUDA 13 wheels or a CUDA 13 toolkit. Tried: " + "; ".join(errors)
    )


def fused_ce_tuned(
    hidden,
    weight,
    bias,
    targets,
    *,
    ignore_index,
    label_smoothing,
    scale,
    softcap,
    grad_scale,
    compute_grads,
    chunk_budget_bytes,
    weight_grad=True,
    skip_ignored=None,
    tuning=None,
):
    """``fused_ce`` with the knobs the GPU scripts turn: ``skip_ignored`` (None: skip unless
    the stream is capturing) and ``tuning`` (dh_splits, slice_bytes, block, max_cluster,
    pipelined, generic: kernel choices; poison: fill outputs and workspace with NaN first).
    Without ``weight_grad`` dW is neither allocated nor computed: dw is None (contract 4)."""
    n, h, v = check_args(
        hidden,
        weight,
        bias,
        targets,
        grad_scale,
        compute_grads,
        "cuda",
        row_strided_hidden=True,
    )
    if isinstance(chunk_budget_bytes, bool) or not isinstance(chunk_budget_bytes, int):
        raise TypeError(
            f"chunk_budget_bytes: expected an int, got {chunk_budget_bytes!r}"
        )
    if chunk_budget_bytes <= 0:
        raise ValueError(
            f"chunk_budget_bytes: must be positive, got {chunk_budget_bytes}"
        )
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            f"label_smoothing: expected a value in [0, 1], got {label_smoothing}"
        )
    scale = float(scale)
    softcap = 0.0 if softcap is None else float(softcap)
    if softcap < 0.0:
        raise ValueError(f"softcap: expected None or a positive number, got {softcap}")
    tuning = dict(tuning or {})

    device = hidden.device
    dtype = hidden.dtype
    row_loss = torch.empty(n, dtype=torch.float32, device=device)
    dh = dw = db = None
    if compute_grads:
        dh = torch.empty((n, h), dtype=dtype, device=device)
        dw = torch.empty_like(weight) if weight_grad else None
        db = torch.empty_like(bias) if bias is not None else None
    if tuning.get("poison"):
        # Checks: every element the backend leaves unwritten shows up as NaN.
        for t in (row_loss, dh, dw, db):
            if t is not None:
                t.fill_(float("nan"))
    if n == 0:
        for t in (dh, dw, db):
            if t is not None:
                t.zero_()
        return row_loss, dh, dw, db

    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        if skip_ignored is None:
            skip_ignored = not torch.cuda.is_current_stream_capturing()
        row_map = None
        rows_targets = targets
        rows_scale = grad_scale
        if skip_ignored:
            # The one host sync: how many rows count, and which.
            keep = torch.nonzero(targets != ignore_index).squeeze(1)
            kept = keep.numel()
            if kept < n:
                row_loss.zero_()  # the kernels write the kept rows only
                if compute_grads:
                    dh.zero_()
                if kept == 0:
                    for t in (dw, db):
                        if t is not None:
                            t.zero_()
                    return row_loss, dh, dw, db
                row_map = keep
                rows_targets = targets.index_select(0, keep)
                if compute_grads and grad_scale.numel() == n:
                    rows_scale = grad_scale.index_select(0, keep)
        rows = rows_targets.numel()
        order = None
        if compute_grads:
            # Rows sorted by target: dW's target rows are summed per target (no atomics).
            order = torch.argsort(rows_targets, stable=True)
        ws_bytes, _ = _native.cuda_workspace_bytes(
            rows=rows,
            hidden=h,
            vocab=v,
            dtype=_DTYPES[dtype],
            has_bias=bias is not None,
            compute_grads=bool(compute_grads),
            gathered=row_map is not None,
            chunk_budget_bytes=chunk_budget_bytes,
            dh_splits=tuning.get("dh_splits"),
            weight_grad=bool(weight_grad),
        )
        workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=device)
        if tuning.get("poison"):
            workspace.fill_(
                0xFF
            )  # NaN in every float32 the kernels might read unwritten
        load_nvrtc()
        _native.cuda_fused_ce(
            device=device.index
            if device.index is not None
            else torch.cuda.current_device(),
            stream=stream.cuda_stream,
            dtype=_DTYPES[dtype],
            rows=rows,
            hidden=h,
            vocab=v,
            hidden_ptr=hidden.data_ptr(),
            ld_hidden=hidden.stride(0) if n > 1 else h,
            weight=weight.data_ptr(),
            bias=bias.data_ptr() if bias is not None else 0,
            targets=rows_targets.data_ptr(),
            row_map=row_map.data_ptr() if row_map is not None else 0,
            order=order.data_ptr() if order is not None else 0,
            grad_scale=rows_scale.data_ptr() if compute_grads else 0,
            grad_scale_stride=1 if compute_grads and rows_scale.numel() > 1 else 0,
            row_loss=row_loss.data_ptr(),
            dh=dh.data_ptr() if compute_grads else 0,
            dw=dw.data_ptr() if dw is not None else 0,
            db=db.data_ptr() if db is not None else 0,
            workspace=workspace.data_ptr(),
            workspace_bytes=ws_bytes,
            ignore_index=int(ignore_index),
            label_smoothing=label_smoothing,
            scale=scale,
            softcap=softcap,
            compute_grads=bool(compute_grads),
            chunk_budget_bytes=chunk_budget_bytes,
            dh_splits=tuning.get("dh_splits"),
            slice_bytes=tuning.get("slice_bytes"),
            block=tuning.get("block"),
            max_cluster=tuning.get("max_cluster"),
            pipelined=tuning.get("pipelined"),
            generic=bool(tuning.get("generic", False)),
        )
    return row_loss, dh, dw, db


def scale_in_place(t, factor) -> bool:
    """``t *= factor`` by our kernel (``scale_by``: the float32 product rounded once to t's
    dtype), which skips the pass when the factor is exactly 1, with no host sync. Returns
    False, having done nothing, where the kernel does not apply: a non-contiguous or CPU
    tensor, another dtype, a factor that is not one float32 on t's device, or a wheel
    without the kernel."""
    if not (
        t.is_cuda
        and t.dtype in _DTYPES
        and t.is_contiguous()
        and factor.device == t.device
        and factor.dtype == torch.float32
        and factor.numel() == 1
        and hasattr(_native, "cuda_scale_in_place")
    ):
        return False
    if t.numel():
        load_nvrtc()
        with torch.cuda.device(t.device):
            _native.cuda_scale_in_place(
                device=t.device.index
                if t.device.index is not None
                else torch.cuda.current_device(),
                stream=torch.cuda.current_stream(t.device).cuda_stream,
                dtype=_DTYPES[t.dtype],
                data=t.data_ptr(),
                count=t.numel(),
                factor=factor.data_ptr(),
            )
    return True


#: The backend function of contract 4 (the tuning knobs keep their defaults).
fused_ce = fused_ce_tuned
