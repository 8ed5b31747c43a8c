"""Kernel choice, in one place: when a CPU fast path runs instead of the plain maths.

The models' ``forward`` methods are the paper's maths. Some pieces have a faster
kernel for the same numbers, and this module alone decides when it runs:

- attention: ``F.scaled_dot_product_attention`` (timm's ``use_fused_attn()``
  setting, kept per module as ``Attention.fused_attn``) — except bf16 on CPU,
  where the plain matmuls are faster in the models (:func:`use_sdpa`);
- the channel MLP in CPU inference: oneDNN linear kernels that fuse the bias,
  the GELU and the residual sum (:func:`use_fused_mlp`);
- every :class:`Linear` in fp32 on CPU, forward and input gradient: oneDNN's
  GEMM (``torch.ops.mkldnn._linear_pointwise``) instead of the BLAS ``addmm``/``mm``
  (MKL: on AMD CPUs 1.0–1.5x slower per GEMM at these shapes, up to 2x where
  the CPU has full-width AVX-512 units); the weight gradient, a reduction over
  all tokens read through transposed views, on BLAS (oneDNN copies the views
  first) — :func:`use_onednn_linear`;
- the token-mixing MLP's ``W @ x`` (:func:`token_matmul`): one batched GEMM over
  the broadcast weight (``torch.matmul`` copies the tokens and the result to fold
  the batch), and in training a weight gradient that is one GEMM over all samples
  instead of autograd's per-sample products (a ``(B, tN, N)`` tensor summed over
  the batch).

The fast paths follow timm's switches (off when timm is set ``scriptable`` or
``exportable``), and they are off whenever a tool reads the model instead of
running it: TorchScript, ``torch.jit.trace``, ``torch.fx``, ``torch.compile``
and ``torch.export`` (hence ONNX). ``set_fused_kernels(False)`` — or the
environment variable ``SPACH_FUSED_KERNELS=0`` — turns them off everywhere.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import is_exportable, is_scriptable

# oneDNN linear with a fused GELU or residual add (the kernels torch.compile itself uses on CPU)
HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN's bf16 GEMMs need a CPU with bf16 support (AVX512-BF16 / AMX, or AVX512 emulation); elsewhere
# its fused bf16 kernels cannot be created and bf16 runs the plain path
HAS_ONEDNN_BF16 = HAS_ONEDNN_LINEAR and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

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
    bf16 tokens (bf16 where the CPU has oneDNN bf16 support), where dropout and drop
    path are identities and the result equals the plain path's (tested).
    """
    if not (_FUSED_KERNELS and HAS_ONEDNN_LINEAR) or training or is_graph_capture():
        return False
    dtypes = (torch.float32, torch.bfloat16) if HAS_ONEDNN_BF16 else (torch.float32,)
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype in dtypes
            and not torch.is_autocast_enabled(x.device.type))


def use_sdpa(q: torch.Tensor, fused_attn: bool) -> bool:
    """Run attention through ``F.scaled_dot_product_attention``? (TorchScript-compatible.)

    ``fused_attn`` is the module's setting (timm's ``use_fused_attn()`` at build
    time). For bf16 on CPU the plain matmuls run instead: faster in the models at
    every token count of the zoo, 49 to 784 (benchmarks/RESULTS.md; isolated
    from the model the fused kernel wins from 784 tokens, inside it not).
    """
    return fused_attn and not (q.dtype == torch.bfloat16 and q.device.type == "cpu")


@torch.jit.unused  # TorchScript runs the plain path (callers test torch.jit.is_scripting() first)
def use_onednn_linear(x: torch.Tensor) -> bool:
    """Run a linear layer (forward and backward) on oneDNN's GEMM instead of BLAS?

    Eager fp32 on CPU, outside autocast (under bf16 autocast torch's own linear
    already runs on oneDNN) and outside any graph capture.
    """
    if not (_FUSED_KERNELS and HAS_ONEDNN_LINEAR) or is_graph_capture():
        return False
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def _onednn_mm(a: torch.Tensor, b_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # a @ b_t.T (+ bias) through oneDNN; a: (..., K), b_t: (N, K), strided views allowed
    return torch.ops.mkldnn._linear_pointwise(a, b_t, bias, "none", [], "")


class OneDnnLinearFunction(torch.autograd.Function):
    """``F.linear`` with the forward and the input gradient on oneDNN's GEMM, the weight gradient on BLAS."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_mm(grad, weight.t())  # (..., N) @ (N, K)
        if ctx.needs_input_grad[1]:
            # (N, M) @ (M, K), a reduction over all tokens: BLAS reads the transposed views in place, while
            # oneDNN copies them first (1.1-2.4x slower on 1 and 2 threads, benchmarks/RESULTS.md)
            grad_w = torch.mm(g.t(), x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


@torch.jit.unused
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on oneDNN (autograd through :class:`OneDnnLinearFunction`)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return OneDnnLinearFunction.apply(x, weight, bias)
    return _onednn_mm(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same maths) whose kernel :func:`use_onednn_linear` chooses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and use_onednn_linear(x):
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def _batched(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # weight (M, N) @ x (B, N, C) as one batched GEMM over a broadcast (stride-0) weight: no copies
    # (torch.matmul folds the batch into the columns instead, copying x and the result)
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


class TokenMatmulFunction(torch.autograd.Function):
    """``weight @ x`` for ``weight (M, N)`` and tokens ``x (B, N, C)``, with the weight gradient
    ``sum_b grad_b @ x_b^T`` as one GEMM over (batch, channels) instead of per-sample products."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, x)
        return _batched(weight, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, x = ctx.saved_tensors
        grad_w = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_w = torch.tensordot(grad, x, dims=([0, 2], [0, 2]))  # (M, N)
        if ctx.needs_input_grad[1]:
            grad_x = _batched(weight.t(), grad)
        return grad_w, grad_x


@torch.jit.unused  # TorchScript runs torch.matmul (callers test torch.jit.is_scripting() first)
def use_token_matmul(x: torch.Tensor) -> bool:
    """Take :func:`token_matmul` for a token-mixing product? (Eager on CPU or CUDA, outside graph capture;
    not on the ``meta`` device where models are counted.)"""
    return _FUSED_KERNELS and not is_graph_capture() and x.device.type in ("cpu", "cuda")


@torch.jit.unused
def token_matmul(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(weight, x)`` (autocast-aware): a batched GEMM without copies, and in training
    through :class:`TokenMatmulFunction`."""
    device = x.device.type
    if torch.is_autocast_enabled(device):  # cast as autocast would, then run the product without it
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return token_matmul(weight.to(dtype), x.to(dtype))
    if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
        return TokenMatmulFunction.apply(weight, x)
    return _batched(weight, x)
