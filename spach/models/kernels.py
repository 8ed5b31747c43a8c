"""Kernel choice, in one place: when a CPU fast path runs instead of the plain maths.

The models' ``forward`` methods are the paper's maths. Two pieces have a faster
kernel for the same numbers, and this module alone decides when it runs:

- attention: ``F.scaled_dot_product_attention`` (timm's ``use_fused_attn()``
  setting, kept per module as ``Attention.fused_attn``) — except bf16 on CPU,
  where the plain matmuls are faster at these head widths;
- the channel MLP in CPU inference: oneDNN linear kernels that fuse the bias,
  the GELU and the residual sum (:func:`use_fused_mlp`).

The fast paths follow timm's switches (off when timm is set ``scriptable`` or
``exportable``), and they are off whenever a tool reads the model instead of
running it: TorchScript, ``torch.jit.trace``, ``torch.fx``, ``torch.compile``
and ``torch.export`` (hence ONNX). ``set_fused_kernels(False)`` — or the
environment variable ``SPACH_FUSED_KERNELS=0`` — turns them off everywhere.
"""
import os

import torch
from timm.layers import is_exportable, is_scriptable

# oneDNN linear with a fused GELU or residual add (the kernels torch.compile itself uses on CPU)
HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

_FUSED_KERNELS = os.environ.get("SPACH_FUSED_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def set_fused_kernels(enable: bool = True) -> None:
    """Allow (default) or forbid the fast CPU kernels for every model in this process."""
    global _FUSED_KERNELS
    _FUSED_KERNELS = bool(enable)


def fused_kernels_enabled() -> bool:
    """The user's setting (``set_fused_kernels`` / ``SPACH_FUSED_KERNELS``)."""
    return _FUSED_KERNELS


@torch.jit.unused
def is_graph_capture() -> bool:
    """True while a tool traces, scripts, compiles or exports the model (plain maths only)."""
    return (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
            or torch.compiler.is_compiling() or is_exportable() or is_scriptable())


@torch.jit.unused  # TorchScript runs the plain path (callers test torch.jit.is_scripting() first)
def use_fused_mlp(x: torch.Tensor, training: bool) -> bool:
    """Run the channel MLP and its residual sum through oneDNN's fused linear kernels?

    Only in eager CPU inference (eval mode, no autograd, no autocast) on fp32 or
    bf16 tokens, where dropout and drop path are identities and the result equals
    the plain path's (tested).
    """
    if not (_FUSED_KERNELS and HAS_ONEDNN_LINEAR) or training or is_graph_capture():
        return False
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_autocast_enabled(x.device.type))


def use_sdpa(q: torch.Tensor, fused_attn: bool) -> bool:
    """Run attention through ``F.scaled_dot_product_attention``? (TorchScript-compatible.)

    ``fused_attn`` is the module's setting (timm's ``use_fused_attn()`` at build
    time). For bf16 on CPU the plain matmuls are faster than the fused kernel
    at these head widths (benchmarks/RESULTS.md), so they run instead.
    """
    return fused_attn and not (q.dtype == torch.bfloat16 and q.device.type == "cpu")
