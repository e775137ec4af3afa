"""Eval-mode BatchNorm folding, and a cache that can never go stale.

BN(conv(x)) = conv(x, w * g / sqrt(var + eps)) + (b - mean * g / sqrt(var + eps) + conv_bias * ...)
is computed in float32 (float64 for float64 models) and only then cast to the compute dtype:
folding in fp16 would round g / sqrt(var + eps) before the multiply.

FoldCache keys each result on the identity of every source tensor: its storage pointer, its
version counter (bumped by every in-place write: optimizer steps, load_state_dict, no_grad edits),
dtype, device, shape and strides, plus eps. `.to()`, `.half()` and friends give a parameter new
storage, so they change the key too. The cache holds a reference to the storages it was computed
from, so a freed storage's address cannot be reused by a new tensor and alias a stale entry.
Version counters are not the whole story: torch's own batch-norm kernels update running_mean and
running_var in place without bumping them, and so do fused optimizers (`fused=True`) for the
parameters and DDP's buffer broadcast. So the key also holds
* num_batches_tracked, which nn.BatchNorm2d increments with a Python-level add_ on every
  train-mode forward that updates the statistics (a version bump), and
* a process-wide generation, bumped after every optimizer step (a global step hook) and every
  train-mode forward of a fastres module, fused or not.
What remains unseen: in-place edits through `param.data` (PyTorch hides them from version
counters on purpose), writes by foreign C++/CUDA code, and a DDP buffer broadcast of values
that only another rank changed outside training. Call fastres.refresh(model) after those.
Inference tensors (a model built under torch.inference_mode()) have no version counter: their
folds are recomputed on every call. Under torch.compile, torch.jit.trace and with autograd
recording, the fold is recomputed too (traced into the graph / differentiable).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook


def fold_conv_bn(conv_weight: Tensor, conv_bias: Optional[Tensor], bn_weight: Optional[Tensor],
                 bn_bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor, eps: float,
                 dtype: Optional[torch.dtype] = None,
                 memory_format: torch.memory_format = torch.channels_last) -> Tuple[Tensor, Tensor]:
    """Return (weight, bias) of the conv with the eval-mode BN folded in.

    The weight is cast to `dtype` (default: the conv weight's dtype) and laid out in
    `memory_format`: channels_last (each output channel's (r, s, c) filter contiguous, the order
    the Triton kernel reduces in) or preserve_format (the conv weight's own strides, so that the
    CPU torch path runs exactly the convolution algorithm the original conv would). The bias is
    float32 (float64 for a float64 model); it is added in fp32 inside the kernel's epilogue.
    affine=False BNs (no weight/bias) are handled.
    """
    dtype = dtype or conv_weight.dtype
    math = torch.float64 if conv_weight.dtype == torch.float64 else torch.float32
    # Differentiable: with autograd recording, gradients of the folded weight and bias flow
    # back to the conv weight and the BN's affine parameters (frozen-BN training).
    scale = torch.rsqrt(running_var.to(math) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(math)
    shift = -running_mean.to(math) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(math)
    if conv_bias is not None:
        shift = shift + conv_bias.to(math) * scale
    weight = (conv_weight.to(math) * scale.view(-1, 1, 1, 1)).to(dtype)
    if memory_format != torch.preserve_format:
        weight = weight.contiguous(memory_format=memory_format)
    return weight, shift


def kernel_weight_layout(weight: Tensor) -> Tensor:
    """The weight laid out for the Triton kernel: channels_last, so each output channel's (r, s,
    c) filter is contiguous, the kernel's reduction order. For a conv the kernel reduces over
    the flattened (r, s, c) index one filter row at a time (the 7x7 stem: rows of S*C = 21
    elements), each filter row is padded with zeros to fastres.launch.conv.padded_row_length
    (32), so that the kernel reads the weight in aligned 16-byte vectors instead of 2-byte
    gathers: a (K, C, R, S) view with strides (R * row, 1, row, C) of a (K, R, row) buffer.
    A depthwise filter (C = 1) is stored tap-major instead, (R, S, K). Differentiable (views
    of a padded or permuted copy)."""
    from fastres.launch.conv import mark_zero_padded, padded_row_length

    K, C, R, S = weight.shape
    if C == 1 and R * S > 1:
        # A depthwise filter (kernels/depthwise.py reads one tap of BLOCK_C channels at a time):
        # tap-major, the channels contiguous, so that a tap's weights load as vectors.
        return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
    weight = weight.contiguous(memory_format=torch.channels_last)
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return weight  # (traced: the kernel trusts only padding it saw made, see padded_rows)
    row = padded_row_length(C, R, S)
    if not row:
        return weight
    rows = torch.nn.functional.pad(weight.permute(0, 2, 3, 1).reshape(K, R, S * C), (0, row - S * C))
    mark_zero_padded(rows)
    return rows[:, :, :S * C].unflatten(2, (S, C)).permute(0, 3, 1, 2)


def fold_modules(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d],
                 memory_format: torch.memory_format = torch.channels_last,
                 dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """fold_conv_bn of the modules' tensors; for the kernel (channels_last), in the layout
    kernel_weight_layout gives it. bn None: the conv alone (its weight cast and laid out, its
    bias, or zeros, in fp32)."""
    if bn is None:
        math = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
        weight = conv.weight.to(dtype or conv.weight.dtype)
        if memory_format != torch.preserve_format:
            weight = weight.contiguous(memory_format=memory_format)
        bias = (conv.bias.to(math) if conv.bias is not None
                else torch.zeros(conv.out_channels, dtype=math, device=weight.device))
    else:
        weight, bias = fold_conv_bn(conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean,
                                    bn.running_var, bn.eps, dtype=dtype,
                                    memory_format=memory_format)
    if memory_format == torch.channels_last:
        weight = kernel_weight_layout(weight)
    return weight, bias


_generation = 0


def invalidate_all(*_args) -> None:
    """Make every FoldCache in the process recompute on its next use (cheap: one integer)."""
    global _generation
    _generation += 1


# Fused optimizers write parameters without bumping their version counters; every optimizer
# step therefore invalidates the folds (they are recomputed once, at the next eval forward).
register_optimizer_step_post_hook(invalidate_all)


class FoldCache:
    """Caches one computed value per set of source tensors; recomputes when any source changed.
    A cache is not state: pickling or deep-copying a module gives it an empty one."""

    def __init__(self) -> None:
        self._key = None
        self._value = None
        self._keep_alive: list = []

    def clear(self) -> None:
        self._key, self._value, self._keep_alive = None, None, []

    def __getstate__(self):
        return {}

    def __setstate__(self, state) -> None:
        self.__init__()

    def __deepcopy__(self, memo):
        return FoldCache()

    def get(self, sources: Sequence[Optional[Tensor]], extra: tuple, compute: Callable[[], object]):
        """The cached value, recomputed if any source tensor changed. A source's signature is
        (data pointer, version counter, dtype): a new dtype, device, shape or storage means a
        new data pointer (the cache keeps the old storages alive, so pointers cannot be
        recycled), and every in-place write bumps the version."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            # Traced into the graph (inductor fuses it; a TorchScript trace recomputes it from
            # the parameters on every run instead of freezing today's folded weights).
            return compute()
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources):
            # Autograd is recording through the parameters (frozen-BN training, eval-mode
            # gradients): fold afresh, differentiably, so gradients reach the conv and BN.
            return compute()
        if any(t is not None and t.is_inference() for t in sources):
            return compute()  # no version counter to key on
        key = [None if t is None else (t.data_ptr(), t._version, t.dtype) for t in sources]
        key.append(extra)
        key.append(_generation)
        if key != self._key:
            with torch.no_grad():
                value = compute()
            self._keep_alive = [t.untyped_storage() for t in sources if t is not None]
            self._key, self._value = key, value
        return self._value


_MISSING = object()


def _member(module: nn.Module, store: str, name: str):
    # The module's own dicts first: nn.Module.__getattr__ is slow enough to show on small
    # inputs. Anything else (e.g. a parametrized weight, a property) through getattr.
    t = module.__dict__[store].get(name, _MISSING)
    return getattr(module, name) if t is _MISSING else t


def conv_bn_sources(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> list:
    """The tensors a fold reads, and num_batches_tracked (see the module docstring)."""
    if bn is None:
        return [_member(conv, "_parameters", "weight"), _member(conv, "_parameters", "bias")]
    return [_member(conv, "_parameters", "weight"), _member(conv, "_parameters", "bias"),
            _member(bn, "_parameters", "weight"), _member(bn, "_parameters", "bias"),
            _member(bn, "_buffers", "running_mean"), _member(bn, "_buffers", "running_var"),
            _member(bn, "_buffers", "num_batches_tracked")]


def cached_fold(cache: FoldCache, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                memory_format: torch.memory_format, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(weight, bias) of conv with bn folded in, from `cache` unless a source changed."""
    return cache.get(conv_bn_sources(conv, bn), (_eps(bn), memory_format, dtype),
                     lambda: fold_modules(conv, bn, memory_format, dtype))


def _eps(bn: Optional[nn.BatchNorm2d]) -> Optional[float]:
    return None if bn is None else bn.eps


def cached_fold_with_shortcut(cache: FoldCache, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                              ds_conv: nn.Conv2d, ds_bn: nn.BatchNorm2d,
                              memory_format: torch.memory_format,
                              dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """(weight, shortcut weight, bias) of a block's last conv + BN and its downsample conv +
    BN, reduced into one accumulator: the two folded shifts add up to one bias."""
    def compute():
        w, b = fold_modules(conv, bn, memory_format, dtype)
        w2, b2 = fold_modules(ds_conv, ds_bn, memory_format, dtype)
        return w, w2, b + b2
    return cache.get(conv_bn_sources(conv, bn) + conv_bn_sources(ds_conv, ds_bn),
                     (_eps(bn), _eps(ds_bn), memory_format, dtype), compute)
