"""The Triton backend: the merged composition of hdnas.mixed.merged with Triton depthwise
primitives (hdnas.kernels.ops: custom ops ``hdnas_triton::dw_taps`` / ``dw_taps_backward``).

The dense merged conv and the pointwise GEMMs stay on cuDNN/cuBLAS (dense channel-mixing work
they already do at full speed); the depthwise stages, which PyTorch runs through its slow native
depthwise kernel (one block per weight element for the weight gradient, docs/kernels.md §3.2), run in
Triton: stage 1 reads x once for all sep/dil first stages with one shared ReLU.

Importing this module raises ImportError when triton is missing (the registry then skips it).
On CPU the kernels only run when TRITON_INTERPRET=1 was set before hdnas.kernels was imported
(tests/conftest.py does it); in that mode the backend is registered with a low priority so that
'fused' keeps choosing a compiled backend on CPU. With CUDA, triton is the 'fused' choice for CUDA
tensors (see ``_priority``).
"""
from __future__ import annotations

import torch

import triton  # noqa: F401  (ImportError here: backend not available)

from hdnas.kernels import ops as _ops
from hdnas.mixed.base import register_backend
from hdnas.mixed.merged import DecomposedBackend
from hdnas.mixed.primitives import Primitives
from hdnas.model.space import LRELU_SLOPE

GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTERP_DTYPES = (torch.float16, torch.float32, torch.float64)


TRITON_PRIMITIVES = Primitives("triton", _ops.grouped_dw, _ops.mixed_dw)


def triton_unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton kernels cannot run on (device, dtype), or None."""
    interp = _ops.interpreting()
    if device.type == "cpu":
        if not interp:
            return ("CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before "
                    "hdnas is imported (it is for testing; use 'merged' on CPU)")
        if dtype not in INTERP_DTYPES:
            return f"{dtype} is not supported by the Triton interpreter (bf16 is not emulated)"
        return None
    if device.type == "cuda":
        if interp:
            return "TRITON_INTERPRET=1 is set: the interpreter runs CPU tensors only"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        if dtype not in GPU_DTYPES:
            return f"dtype {dtype} is not supported"
        return None
    return f"no Triton kernels for device type {device.type!r}"


class TritonBackend(DecomposedBackend):
    """The composition with Triton depthwise stages and the fused alpha-block GEMM epilogue
    (``hdnas_triton::pw_epilogue``: final pointwise convs of every sep/dil op + dense-conv output
    + residual + LeakyReLU in one pass)."""

    def primitives_unsupported_reason(self, device, dtype, plan=None):
        return triton_unsupported_reason(device, dtype)

    def epilogue(self, terms, add, res, lrelu, out_dtype):
        if not (1 <= len(terms) <= 2 and _epilogue_ok(terms[0][0])):
            return super().epilogue(terms, add, res, lrelu, out_dtype)
        (z1, w1), (z2, w2) = terms[0], (terms[1] if len(terms) == 2 else (None, None))
        dt = z1.dtype
        if add is not None and add.dtype != dt:  # autocast with 'skip' (x's dtype joins add)
            return super().epilogue(terms, add, res, lrelu, out_dtype)
        if res is None or (res.dtype == dt and out_dtype == dt):
            return _ops.pw_epilogue(z1, w1, z2, w2, add, res, bool(lrelu)).to(out_dtype)
        # autocast: the GEMMs and their sum in one kernel (fp32 accumulation, stored in z's
        # dtype), then the residual of another dtype and the activation in the promoted dtype
        y = _ops.pw_epilogue(z1, w1, z2, w2, add, None, False)
        y = y.to(torch.promote_types(out_dtype, torch.float32)) + res
        return (torch.nn.functional.leaky_relu(y, LRELU_SLOPE) if lrelu else y).to(out_dtype)


def _epilogue_ok(z):
    # fp64 is a checking dtype: on CUDA it keeps the cuBLAS GEMMs (an fp64 tl.dot compiles for
    # sm_90 with triton 3.9 but has not been run on a GPU here)
    return not (z.device.type == "cuda" and z.dtype == torch.float64)


def _priority() -> int:
    """The registry ranks by one static number, so the device rule is encoded here: on a
    machine with CUDA, triton outranks every other fused backend (native is 30) for CUDA
    tensors and declines CPU tensors (so 'fused' goes on to native/merged for those); under the
    interpreter it ranks below merged (10), so 'fused' never picks the numpy interpreter."""
    if _ops.interpreting():
        return 5
    return 40 if torch.cuda.is_available() else 20


TRITON = register_backend(TritonBackend("triton", TRITON_PRIMITIVES, priority=_priority()))
