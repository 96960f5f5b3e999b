"""Fast kernels for QuIP linear layers: the C++/CUDA extension `quipc_runtime._kernels`.

numpy level (no torch needed): `prepare(layer)` builds a CPU plan once per layer (scales
converted to float32, transforms set up; the packed codes are used in place, never
repacked), `quip_linear(plan, x)` runs the fused layer, and `kron_apply` the transforms.
torch level: `KernelQuipLinear(layer, device)`, a drop-in for `QuipLinearRef`.

Threads: `threads=None` means `default_threads()` (env QUIPC_NUM_THREADS, else
torch.get_num_threads() when torch is loaded, else os.cpu_count()). The portable scalar
kernels can be forced with `force_scalar=True` or the env var QUIPC_FORCE_SCALAR=1.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from .formats import require_format
from .hadamard import hadamard
from .layer import QuantizedLinear
from .transforms import Transform

try:
    from . import _kernels as _ext
    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # not built: the reference path still works
    _ext = None
    _IMPORT_ERROR = exc


def cpu_has_avx512_vnni() -> bool:
    """True where the int8-activation GEMVs run on row tiles by the AVX-512 VNNI kernels
    (QUIPC_NO_AVX512=1 turns them off)."""
    return _ext is not None and _ext.cpu_has_avx512_vnni()


def available() -> bool:
    """True when the compiled extension is importable (CPU kernels)."""
    return _ext is not None


def cuda_available() -> bool:
    """True when the extension was built with CUDA and a CUDA device is visible."""
    return _ext is not None and _ext.cuda_built() and _ext.cuda_device_count() > 0


def _require() -> None:
    if _ext is None:
        raise RuntimeError(f"quipc kernels are not built ({_IMPORT_ERROR}); "
                           "install with `pip install --no-build-isolation .`")


# Set while a model runs with torch held at one thread (see `hand_threads_to_kernels`):
# the thread count torch had, which the kernels' pool then uses instead.
_pool_threads: int | None = None


def default_threads() -> int:
    env = os.environ.get("QUIPC_NUM_THREADS")
    if env:
        return max(1, int(env))
    if _pool_threads:
        return _pool_threads
    torch = sys.modules.get("torch")
    if torch is not None:
        return max(1, torch.get_num_threads())
    return max(1, os.cpu_count() or 1)


def kernel_name(force_scalar: bool = False) -> str:
    """'avx2' or 'scalar': the CPU kernel set that runs."""
    _require()
    return _ext.kernel_name(force_scalar)


def transform_factors(t: Transform, transpose: bool = False) -> list[tuple[np.ndarray, bool]]:
    """(matrix, fwht) pairs for the extension. Power-of-two factors of a Hadamard transform
    are Sylvester matrices and run as fast Walsh-Hadamard transforms (symmetric, so
    `transpose` leaves them alone; their matrix is never built: a zero-stride placeholder
    of the right shape stands in); the others are applied densely."""
    if t.kind == "identity":
        return []
    out = []
    for i, order in enumerate(t.orders):
        if t.kind == "hadamard" and order > 1 and order & (order - 1) == 0:
            out.append((np.broadcast_to(np.float32(0), (order, order)), True))
            continue
        if t.kind == "hadamard":
            mat = (hadamard(order) / np.sqrt(order)).astype(np.float32)
        else:
            mat = t.matrices()[i]
        out.append((np.ascontiguousarray(mat.T if transpose else mat, dtype=np.float32), False))
    return out


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _layer_args(layer: QuantizedLinear) -> dict:
    """The plan's inputs (shared by the CPU and CUDA plans). Input signs are not read from
    t_in: the stored form folds them into in_scale (as the reference does)."""
    if not isinstance(layer, QuantizedLinear):
        raise TypeError(f"expected a QuantizedLinear, got {type(layer).__name__}")
    layer.validate()
    return dict(
        m=layer.out_features, n=layer.in_features, bits=layer.bits, format=layer.format,
        codes=np.ascontiguousarray(layer.codes), scale=_f32(layer.scale),
        zero=None if layer.zero is None else _f32(layer.zero),
        in_scale=_f32(layer.in_scale_f32()), out_scale=_f32(layer.t_out.sign_vector()),
        bias=None if layer.bias is None else _f32(layer.bias),
        in_factors=transform_factors(layer.t_in),
        out_factors=transform_factors(layer.t_out, transpose=True))


# Code formats the kernels run (runtime/quipc_runtime/formats); others are refused by name.
CPU_FORMATS = ("grid", "e8p", "trellis", "trellis256")
CUDA_FORMATS = ("grid", "e8p", "trellis", "trellis256")


def prepare(layer: QuantizedLinear, e8p_as_grid4: bool = True, int8_activations: bool = False,
            trellis_as_int8: bool = False, row_tiles: str = "auto"):
    """A CPU plan for one layer (`_kernels.Plan`): forward / transform_in / matmul / transform_out.
    e8p_as_grid4: an e8p layer's GEMV (batch <= 4) runs by the 4-bit grid kernel, one pass per
    stage (the same weights, its codes also widened to nibbles in the plan: at 2 bits ~0.7x the
    time at batch 1; at 3 bits only with int8_activations); False keeps the e8p kernels.
    int8_activations: the GEMV of 4-bit codes (4-bit grid layers and those e8p_as_grid4 layers)
    takes its activations quantized to int8 per block of 32, as llama.cpp's Q8_0 and
    onnxruntime's accuracy_level 4 (`plan.gemv_int8` says whether the layer has such a GEMV).
    trellis_as_int8: a trellis layer's GEMV runs on an 8-bit copy of W' that the plan builds
    once (int8_rows: per row round(W' / step), |q| <= 127, as two 4-bit grid planes): 4-5x
    faster at SmolLM2's shapes, but a weight moves by up to max_j |W'_ij| / 254, an error the
    rounding spreads evenly where LDLQ shaped the code's own by the Hessian (SmolLM2 w2, the
    trellis head alone: decode perplexity +0.27 %); the plan then holds 1 byte a weight. The
    loader takes it for every trellis layer by default (`load(trellis_as_int8="all")`; "head" for
    the lm_head only); False (the default here) keeps the exact GEMV. The GEMM (batch > 4) is
    exact either way."""
    _require()
    if isinstance(layer, QuantizedLinear):
        require_format(layer, CPU_FORMATS, "the C++ kernel backend")
        _require_no_patch(layer)
    return _ext.Plan(**_layer_args(layer), e8p_as_grid4=e8p_as_grid4, int8_activations=int8_activations,
                     trellis_as_int8=trellis_as_int8, row_tiles=row_tiles)


def _require_no_patch(layer: QuantizedLinear) -> None:
    if layer.has_row_patch:
        raise ValueError(f"layer {layer.name} keeps {len(layer.row_ids)} rows at 8 bits, which a plan "
                         "(the codes alone) does not compute: use KernelQuipLinear")


def quip_linear(plan, x: np.ndarray, threads: int | None = None, force_scalar: bool = False,
                out: np.ndarray | None = None) -> np.ndarray:
    """y = s_out * K_out^T (W' (K_in (in_scale * x))) + bias for float32 x of shape (..., n).
    `plan` is a `prepare()` result or a QuantizedLinear (prepared on the fly)."""
    if isinstance(plan, QuantizedLinear):
        plan = prepare(plan)
    x = np.asarray(x) if not isinstance(x, np.ndarray) else x
    if x.ndim < 1 or x.shape[-1] != plan.n:
        raise ValueError(f"x must have shape (..., {plan.n}), got {x.shape}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, plan.n) if x.ndim != 2 else x
    y = plan.forward(x2, out=out, threads=threads or default_threads(), force_scalar=force_scalar)
    return y.reshape(*lead, plan.m)


def trellis_encode(x: np.ndarray, table: np.ndarray, k: int, threads: int | None = None,
                   force_scalar: bool = False) -> np.ndarray:
    """Tail-biting Viterbi encoding of (B, T) float32 sequences (the "trellis" format's
    encoder kernel; quipc/passes/encoders/trellis_viterbi.py is its numpy reference)."""
    _require()
    return _ext.trellis_encode(x, table, k, threads or default_threads(), force_scalar)


def kron_apply(x: np.ndarray, t: Transform, transpose: bool = False,
               force_scalar: bool = False) -> np.ndarray:
    """(F_1 x ... x F_k) x (or its transpose) on each row of float32 x (B, n); no signs."""
    _require()
    return _ext.kron_apply(x, transform_factors(t, transpose), force_scalar=force_scalar)


# --- CUDA (any object with __cuda_array_interface__: torch, cupy, numba) ---------------
def prepare_cuda(layer: QuantizedLinear, device: int = 0):
    """A CUDA plan (`_kernels.CudaPlan`): the layer copied to GPU `device`."""
    if not cuda_available():
        raise RuntimeError("CUDA kernels unavailable: build with QUIPC_CUDA=ON on a machine "
                           "with the CUDA toolkit, and run where a GPU is visible")
    require_format(layer, CUDA_FORMATS, "the CUDA kernel backend")
    _require_no_patch(layer)
    return _ext.CudaPlan(device=device, **_layer_args(layer))


def _cuda_ptr(obj, name: str, shape: tuple, writable: bool = False) -> int:
    """Device pointer of a C-contiguous float32 CUDA array of exactly `shape` (checked)."""
    iface = getattr(obj, "__cuda_array_interface__", None)
    if iface is None:
        raise TypeError(f"{name} must be a CUDA array (__cuda_array_interface__), got {type(obj).__name__}")
    if np.dtype(iface["typestr"]) != np.float32:
        raise TypeError(f"{name} must be float32, got {np.dtype(iface['typestr'])}")
    if tuple(iface["shape"]) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(iface['shape'])}, expected {tuple(shape)}")
    strides = iface.get("strides")
    if strides is not None and len(shape) == 2 and shape[0] > 1 and shape[1] > 0 and \
            (strides[1] != 4 or strides[0] != 4 * shape[1]) and not (shape[1] == 1 and strides[0] == 4):
        raise ValueError(f"{name} must be C-contiguous")
    ptr, readonly = iface["data"]
    if writable and readonly:
        raise ValueError(f"{name} must be writeable")
    if ptr % 4:
        raise ValueError(f"{name} is not 4-byte aligned")
    return int(ptr)


def cuda_quip_linear(plan, x, out, stream: int = 0) -> None:
    """out (B, m) = quip_linear(x (B, n)) on the GPU, both float32 CUDA arrays on plan.device."""
    batch = int(getattr(x, "__cuda_array_interface__", {}).get("shape", (0,))[0]) \
        if hasattr(x, "__cuda_array_interface__") else None
    if batch is None:
        raise TypeError("x must be a CUDA array (__cuda_array_interface__)")
    xp = _cuda_ptr(x, "x", (batch, plan.n))
    yp = _cuda_ptr(out, "out", (batch, plan.m), writable=True)
    plan.forward_ptr(xp, yp, batch, int(stream))


try:
    import torch
    from torch import nn

    from .modules import apply_row_patch
except ImportError:  # numpy-only deployments
    torch = None


if torch is not None:
    class KernelQuipLinear(nn.Module):
        """QuipLinearRef's semantics on the fast kernels (CPU or CUDA), inference only (with
        trellis_as_int8, on the CPU, a trellis layer's GEMV within max_j |W'_ij| / 254 a weight:
        see `prepare`)."""

        def __init__(self, layer: QuantizedLinear, device: str = "cpu", threads: int | None = None,
                     int8_activations: bool = False, trellis_as_int8: bool = False):
            super().__init__()
            _require()
            self.device = torch.device(device)
            require_format(layer, CUDA_FORMATS if self.device.type == "cuda" else CPU_FORMATS,
                           "the CUDA kernel backend" if self.device.type == "cuda"
                           else "the C++ kernel backend")
            self.in_features, self.out_features = layer.in_features, layer.out_features
            self.bits, self.format = layer.bits, layer.format
            self.threads = threads
            self._fast = self.device.type   # forward's fast path for this device ("cpu" / "cuda"; None: none)
            args = _layer_args(layer)
            if self.device.type == "cpu":
                self._plan = _ext.Plan(**args, int8_activations=int8_activations, trellis_as_int8=trellis_as_int8)
            elif self.device.type == "cuda":
                if not cuda_available():
                    raise RuntimeError("KernelQuipLinear(device='cuda'): the extension was built "
                                       "without CUDA (QUIPC_CUDA=ON) or no GPU is visible")
                index = self.device.index if self.device.index is not None else torch.cuda.current_device()
                self.device = torch.device("cuda", index)
                self._plan = _ext.CudaPlan(device=index, **args)
            else:
                raise ValueError(f"unsupported device {device!r}: use 'cpu' or 'cuda'")
            self.row_ids = self.row_weight = None   # rows kept at 8 bits: a dense matmul after the kernel
            if layer.has_row_patch:
                ids, rows = layer.row_patch_f32()
                self.row_ids, self.row_weight = (torch.from_numpy(ids).to(self.device),
                                                 torch.from_numpy(rows).to(self.device))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # decode's common case first (one float32 row per call, ~200 calls a token; on a GPU
            # these calls are a decode token's host time): the checks below cost as much as a
            # small layer's kernel
            if (self._fast is not None and type(x) is torch.Tensor and x.dtype is torch.float32
                    and x.device.type == self._fast and (self._fast == "cpu" or x.device == self.device)
                    and x.shape[-1] == self.in_features and not x.requires_grad and x.is_contiguous()
                    and self.row_ids is None):
                return self._run(x.view(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() < 1 or x.shape[-1] != self.in_features:
                raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
            if x.device != self.device and not (x.device.type == self.device.type == "cpu"):
                raise ValueError(f"x is on {x.device}, this layer runs on {self.device}")
            lead, dtype = x.shape[:-1], x.dtype
            x2 = x.detach().reshape(-1, self.in_features).to(torch.float32).contiguous()
            y = apply_row_patch(self._run(x2), x2, self.row_ids, self.row_weight)
            return y.reshape(*lead, self.out_features).to(dtype)

        def _run(self, x2: torch.Tensor) -> torch.Tensor:
            """(rows, in_features) float32, contiguous, on this layer's device -> (rows, out_features)."""
            if self.device.type == "cpu":
                return torch.from_numpy(self._plan.forward(x2.numpy(), threads=self.threads or default_threads()))
            y = torch.empty(x2.shape[0], self.out_features, device=self.device)
            if x2.shape[0]:
                self._plan.forward_ptr(x2.data_ptr(), y.data_ptr(), x2.shape[0],
                                       torch.cuda.current_stream(self.device).cuda_stream)
            return y

        def extra_repr(self) -> str:
            return (f"in_features={self.in_features}, out_features={self.out_features}, "
                    f"bits={self.bits}, format={self.format}, device={self.device}")

    def hand_threads_to_kernels(model: nn.Module) -> nn.Module:
        """While `model` runs, torch uses one thread and the kernels' pool the threads torch had.

        Two thread pools on the same cores stall each other: after each op torch's OpenMP
        workers spin, holding the cores the kernels' workers need next (measured here, SmolLM2
        w2 decode, 2 cores: 63 ms/token with both pools at 2 threads, 19 ms with torch at 1).
        The quantized linears, the heavy part, run on the pool; the small ops in between run
        single-threaded. Restored after every forward, also when it raises."""
        saved: list[int] = []

        def before(module, args):
            global _pool_threads
            saved.append(torch.get_num_threads())
            if len(saved) == 1:  # outermost call
                _pool_threads = saved[0]
                torch.set_num_threads(1)

        def after(module, args, output):
            global _pool_threads
            count = saved.pop()
            if not saved:
                _pool_threads = None
                torch.set_num_threads(count)

        model.register_forward_pre_hook(before)
        model.register_forward_hook(after, always_call=True)
        return model
else:
    class KernelQuipLinear:  # noqa: D101 - placeholder that explains itself
        def __init__(self, *args, **kwargs):
            raise RuntimeError("KernelQuipLinear needs torch; use prepare()/quip_linear() with numpy")
