"""Drop-in modules that run fused kernels.

* FusedConvBNReLU: an nn.Sequential(conv, bn[, relu]) whose state_dict keys (0.*, 1.*) match
  torchvision's Conv2dNormActivation and any user Sequential(conv, bn, relu).
* FusedBasicBlock / FusedBottleneck: the torchvision blocks (same constructor, same child names,
  so state_dicts load both ways with strict=True); eval forward = 2 / 3 kernel launches, the
  downsample conv1x1+BN (if any) reduced into the last conv's accumulator.
* FusedConv2d / FoldedBatchNorm2d / FoldedReLU: what fastres.optimize() puts in place of a
  conv -> bn -> relu chain whose modules are separate attributes of a parent (the ResNet stem);
  the conv applies BN and ReLU in both modes, the other two pass their input through.
  They share their parameter/buffer/child dicts with the modules they replace, so the state_dict
  is unchanged and fastres.restore() can hand the originals back in sync.

Which path runs is decided by the BatchNorms' own `training` flags, the single source of truth:
* all BNs in eval -> the folded path. It is differentiable: with autograd recording, the BN is
  folded afresh (not from the cache) and gradients flow through the fused op's backward to the
  input, the conv weights and the BN's affine parameters - frozen-BN training runs fused.
* all of a block's BNs in train mode -> fastres::block_train (fastres.training): batch
  statistics in the conv epilogues, BN + ReLU in the next conv's prologue, fused BN backward;
  running statistics updated exactly as nn.BatchNorm2d does. Where the kernels do not run (CPU
  without TRITON_INTERPRET), the block runs its unfused computation.
* FusedConvBNReLU / FusedConv2d with its BN in train mode -> the same op for one conv -> BN
  (-> ReLU) chain (fastres.training.chain_train).
* a mix of train and eval BNs in one block -> exactly the unfused computation (running-stat
  updates included).
Under autocast, inputs and conv weights are cast to the autocast dtype as eager convolutions
cast them; BN parameters and running statistics stay in their own dtype.
Within the fused path, inputs the kernel does not handle fall back to the reference
computation, documented per case in `fallback_reason`:
  * dtypes other than float32/float16/bfloat16 (e.g. float64),
  * convs the kernel cannot do: groups > 1, padding_mode other than 'zeros', asymmetric 'same'.
Input that is simply wrong (mismatched dtypes or devices, wrong rank, wrong residual shape)
raises a clear error instead.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastres import reference
from fastres.folding import FoldCache, conv_bn_sources, fold_modules
from fastres.ops import (SUPPORTED_DTYPES, backend_for, conv_bn_act, execution_plan,
                         torch_conv_bn_act)


# ---------------------------------------------------------------------------------------------
# What the kernel can fuse

def conv_padding(conv: nn.Conv2d) -> Optional[Tuple[int, int]]:
    """The conv's padding as a pair, or None when it is not a symmetric zero padding."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                return None
            pads.append(total // 2)
        return tuple(pads)
    return tuple(conv.padding)


def conv_unfusable_reason(conv: nn.Module, check_type: bool = True) -> Optional[str]:
    if check_type and (type(conv).forward is not nn.Conv2d.forward or not isinstance(conv, nn.Conv2d)):
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups}) is not supported by the kernel"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} is not supported by the kernel"
    if conv_padding(conv) is None:
        return "asymmetric 'same' padding is not supported by the kernel"
    return None


def bn_unfusable_reason(bn: nn.Module, channels: int) -> Optional[str]:
    if not isinstance(bn, nn.BatchNorm2d) or type(bn).forward is not nn.BatchNorm2d.forward:
        return f"{type(bn).__name__} is not a plain nn.BatchNorm2d"
    if bn.running_mean is None or bn.running_var is None:
        return ("BatchNorm2d without running stats normalises with batch statistics even in eval "
                "mode, so it cannot be folded")
    if bn.num_features != channels:
        return f"BatchNorm2d has {bn.num_features} features, the conv has {channels} outputs"
    return None


def bn_train_unfusable_reason(bn: nn.Module, channels: int) -> Optional[str]:
    """Why a BN cannot run in the fused training path (which, unlike folding, needs no running
    statistics: without them it normalises with the batch's and updates nothing)."""
    if not isinstance(bn, nn.BatchNorm2d) or type(bn).forward is not nn.BatchNorm2d.forward:
        return f"{type(bn).__name__} is not a plain nn.BatchNorm2d"
    if bn.num_features != channels:
        return f"BatchNorm2d has {bn.num_features} features, the conv has {channels} outputs"
    return None


def shortcut_unfusable_reason(ds: nn.Module, bn_reason=bn_unfusable_reason) -> Optional[str]:
    """None when a block's downsample is nn.Sequential([nn.Identity, ...,] 1x1 conv, BN) - the
    leading identities are timm's stride-1 "avg-pool" shortcut - so that its last two modules
    are the conv and BN the kernel reduces as its second GEMM."""
    mods = list(ds) if isinstance(ds, nn.Sequential) else []
    if (len(mods) < 2 or any(type(m) is not nn.Identity for m in mods[:-2])
            or not isinstance(mods[-2], nn.Conv2d) or mods[-2].kernel_size != (1, 1)
            or conv_padding(mods[-2]) != (0, 0) or mods[-2].dilation != (1, 1)):
        names = " + ".join(type(m).__name__ for m in mods) if mods else type(ds).__name__
        return f"shortcut is {names}, not a 1x1 conv + BatchNorm2d"
    return conv_unfusable_reason(mods[-2]) or bn_reason(mods[-1], mods[-2].out_channels)


def _kernels_train(x: Tensor) -> bool:
    """Whether the fused training op runs for x: the Triton kernels on x's device (CUDA, or the
    CPU under TRITON_INTERPRET) and a dtype they take."""
    return _fallback_reason(x) is None and backend_for(x) == "triton"


def _chain_train(conv, bn, relu: bool, x: Tensor, named_convs) -> Tensor:
    from fastres.training import chain_train  # training imports this module
    x, unbatched = _prepare_input(x, named_convs)
    out = chain_train(conv, bn, relu, x)
    return out.squeeze(0) if unbatched else out


def _fallback_reason(x: Tensor) -> Optional[str]:
    """Why this call cannot take the fused path (None: it can)."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"input dtype {x.dtype} (the kernel supports float32, float16, bfloat16)"
    return None


def _as_batched(x: Tensor) -> Tuple[Tensor, bool]:
    """nn.Conv2d accepts an unbatched (C, H, W) input; so do the fused modules."""
    if x.dim() == 3:
        return x.unsqueeze(0), True
    if x.dim() != 4:
        raise ValueError(f"fastres: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got shape "
                         f"{tuple(x.shape)}")
    return x, False


def _fused_conv_bn(x: Tensor, conv: nn.Conv2d, folded: Tuple[Tensor, Tensor], relu: bool,
                   eager_torch: bool, residual: Optional[Tensor] = None, shortcut=None,
                   bias: Optional[Tensor] = None):
    weight, shift = folded
    bias = shift if bias is None else bias
    if eager_torch:
        # The module already checked dtypes and devices and never needs autograd here.
        x2, w2, s2 = shortcut if shortcut is not None else (None, None, None)
        return torch_conv_bn_act(x, weight, bias, residual, x2, w2, conv.stride,
                                 conv_padding(conv), conv.dilation, s2, relu)
    return conv_bn_act(x, weight, bias, stride=conv.stride, padding=conv_padding(conv),
                       dilation=conv.dilation, residual=residual, shortcut=shortcut, relu=relu)


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype eager convolutions would compute x in under an active autocast (None: no
    autocast for x's device, or x is float64, which autocast leaves alone)."""
    if (torch.is_autocast_enabled(x.device.type) and x.is_floating_point()
            and x.dtype != torch.float64):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _prepare_input(x: Tensor, named_convs) -> Tuple[Tensor, bool]:
    """(x batched, and cast to the autocast dtype when autocast is on; was it unbatched).
    Checks that the convs' weights are on x's device and, without autocast, of x's dtype (under
    autocast the weights are cast, as eager convolutions cast them)."""
    x, unbatched = _as_batched(x)
    cast = autocast_dtype(x)
    if cast is not None:
        x = x.to(cast)
    for name, conv in named_convs:
        w = conv.weight
        if cast is None and w.dtype != x.dtype:
            raise TypeError(f"fastres: input dtype {x.dtype} does not match {name}.weight dtype {w.dtype}")
        if w.device != x.device:
            raise ValueError(f"fastres: input is on {x.device} but {name}.weight is on {w.device}")
    return x, unbatched


def _fold(cache: FoldCache, conv: nn.Conv2d, bn: nn.BatchNorm2d, fmt: torch.memory_format,
          dtype: torch.dtype):
    return cache.get(conv_bn_sources(conv, bn), (bn.eps, fmt, dtype),
                     lambda: fold_modules(conv, bn, fmt, dtype))


# ---------------------------------------------------------------------------------------------
# conv + BN (+ ReLU) as a Sequential

class FusedConvBNReLU(nn.Sequential):
    """conv2d + BatchNorm2d (+ ReLU) in one kernel launch in eval mode.

    Same children (0: Conv2d, 1: BatchNorm2d, 2: ReLU) and hence the same state_dict keys as
    torchvision.ops.Conv2dNormActivation and nn.Sequential(conv, bn, relu).

        block = FusedConvBNReLU(64, 128, kernel_size=3, stride=2).eval()
        y = block(x)                       # one fused launch on CUDA
        block = FusedConvBNReLU.from_modules(conv, bn, relu=True)   # wrap existing modules
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = None, dilation: int = 1, bias: bool = False,
                 relu: bool = True, eps: float = 1e-5, momentum: float = 0.1, device=None,
                 dtype=None) -> None:
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        layers = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation,
                            bias=bias, device=device, dtype=dtype),
                  nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, device=device, dtype=dtype)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self._fold_cache = FoldCache()

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, relu: bool = True) -> "FusedConvBNReLU":
        """Wrap existing modules (shared, not copied). Raises ValueError if they cannot fuse."""
        reason = conv_unfusable_reason(conv) or bn_unfusable_reason(bn, conv.out_channels)
        if reason:
            raise ValueError(f"FusedConvBNReLU.from_modules: {reason}")
        self = cls.__new__(cls)
        layers = [conv, bn] + ([nn.ReLU(inplace=True)] if relu else [])
        nn.Sequential.__init__(self, *layers)
        self._fold_cache = FoldCache()
        return self

    def __getitem__(self, idx):
        # nn.Sequential slices by calling type(self)(OrderedDict); a slice of a fused module is
        # just a plain Sequential of the same (shared) children.
        if isinstance(idx, slice):
            return nn.Sequential(*list(self._modules.values())[idx])
        return super().__getitem__(idx)

    @property
    def fallback_reason(self) -> Optional[str]:
        return conv_unfusable_reason(self[0]) or bn_unfusable_reason(self[1], self[0].out_channels)

    @property
    def train_fallback_reason(self) -> Optional[str]:
        """Why a train-mode forward runs the unfused modules whatever the input (None: fused)."""
        return conv_unfusable_reason(self[0]) or bn_train_unfusable_reason(self[1], self[0].out_channels)

    def forward(self, x: Tensor) -> Tensor:
        conv, bn, relu = self[0], self[1], len(self) > 2
        if bn.training:
            if self.train_fallback_reason or not _kernels_train(x):
                return super().forward(x)
            return _chain_train(conv, bn, relu, x, [("0", conv)])
        if self.fallback_reason or _fallback_reason(x):
            return super().forward(x)
        x, unbatched = _prepare_input(x, [("0", conv)])
        eager_torch, fmt = execution_plan(x)
        out = _fused_conv_bn(x, conv, _fold(self._fold_cache, conv, bn, fmt, x.dtype), relu,
                             eager_torch)
        return out.squeeze(0) if unbatched else out


# ---------------------------------------------------------------------------------------------
# conv -> bn -> relu chain whose modules are attributes of a parent (the ResNet stem)

def _share_state(cls, original: nn.Module) -> nn.Module:
    """A `cls` instance that shares the original's parameter, buffer and child dicts, so both
    always see the same tensors (state_dict unchanged, restore() trivially in sync)."""
    new = cls.__new__(cls)
    new.__dict__.update(original.__dict__)
    new.__dict__["_fastres_original"] = original
    return new


class FusedConv2d(nn.Conv2d):
    """An nn.Conv2d that also applies the BatchNorm after it and optionally the following ReLU:
    folded in eval mode, with batch statistics (fastres.training.chain_train) in train mode.
    Made by fastres.optimize(); the BN becomes a FoldedBatchNorm2d and the ReLU a FoldedReLU,
    which pass their input through."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, fuse_relu: bool) -> "FusedConv2d":
        new = _share_state(cls, conv)
        new.__dict__["_folded_bn"] = bn  # not registered as a child: its parent owns it
        new.__dict__["_fuse_relu"] = fuse_relu
        new.__dict__["_fold_cache"] = FoldCache()
        return new

    def forward(self, x: Tensor) -> Tensor:
        bn = self._folded_bn
        if bn.training:
            if (conv_unfusable_reason(self, check_type=False)
                    or bn_train_unfusable_reason(bn, self.out_channels) or not _kernels_train(x)):
                # Exactly the unfused modules: nn.BatchNorm2d's own train-mode forward
                # (running statistics, num_batches_tracked), then the ReLU.
                out = nn.BatchNorm2d.forward(bn, super().forward(x))
                return F.relu(out) if self._fuse_relu else out
            return _chain_train(self, bn, self._fuse_relu, x, [("conv", self)])
        if conv_unfusable_reason(self, check_type=False) or _fallback_reason(x):
            out = F.batch_norm(super().forward(x), bn.running_mean, bn.running_var, bn.weight,
                               bn.bias, False, 0.0, bn.eps)
            return F.relu(out) if self._fuse_relu else out
        x, unbatched = _prepare_input(x, [("conv", self)])
        eager_torch, fmt = execution_plan(x)
        folded = _fold(self._fold_cache, self, bn, fmt, x.dtype)
        out = _fused_conv_bn(x, self, folded, self._fuse_relu, eager_torch)
        return out.squeeze(0) if unbatched else out


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d fused into the preceding FusedConv2d: an identity, in either mode (the conv
    applies it: folded in eval mode, with batch statistics in train mode)."""

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> "FoldedBatchNorm2d":
        return _share_state(cls, bn)

    def forward(self, x: Tensor) -> Tensor:
        return x


class FoldedReLU(nn.ReLU):
    """A ReLU fused into the preceding FusedConv2d: an identity (the conv applies it)."""

    @classmethod
    def from_relu(cls, relu: nn.ReLU) -> "FoldedReLU":
        return _share_state(cls, relu)

    def forward(self, x: Tensor) -> Tensor:
        return x


# ---------------------------------------------------------------------------------------------
# ResNet blocks

def _conv3x3(cin, cout, stride=1, groups=1, dilation=1):
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, groups=groups, bias=False, dilation=dilation)


def _conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class _FusedBlock(nn.Module):
    """Shared machinery of the fused blocks; subclasses define the conv/bn stages."""

    _reference: Callable = None  # reference.basic_block_reference / bottleneck_reference
    _stages: Tuple[str, ...] = ()

    def _init_caches(self) -> None:
        self._fold_caches = {name: FoldCache() for name in self._stages + ("last",)}
        self.__dict__["_original"] = None  # the wrapped block, deliberately not a child module

    @classmethod
    def from_block(cls, block: nn.Module) -> "_FusedBlock":
        """Wrap an existing block (torchvision, timm or user) in place: its children become this
        module's children under the same names (shared, not copied), so the state_dict is the
        same. fastres.optimize() checks a block can be wrapped before calling this."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in block.named_children():
            new.add_module(name, child)
        new.downsample = getattr(block, "downsample", None)  # None is a plain attribute
        new.stride = getattr(block, "stride", None)
        new._init_caches()
        new.__dict__["_original"] = block
        new.train(block.training)
        return new

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "_original", None) is not None:
            self._original.training = mode
        return self

    def _pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        """(conv, bn) of each stage, then of the downsample if any. Reads the child dict
        directly: nn.Module.__getattr__ is slow enough to matter on small inputs."""
        mods = self._modules
        pairs = [(mods[name], mods["bn" + name[-1]]) for name in self._stages]
        ds = mods.get("downsample")
        if ds is not None:
            pairs.append((ds[-2], ds[-1]))  # after any leading nn.Identity
        return pairs

    def _modules_reason(self, pairs, bn_reason) -> Optional[str]:
        """The first conv, BN (judged by bn_reason) or shortcut the kernels cannot take."""
        ds = self._modules.get("downsample")
        if ds is not None:
            reason = shortcut_unfusable_reason(ds, bn_reason)
            if reason:
                return reason
        for conv, bn in pairs:
            reason = conv_unfusable_reason(conv) or bn_reason(bn, conv.out_channels)
            if reason:
                return reason
        return None

    def _static_reason(self, pairs) -> Optional[str]:
        return self._modules_reason(pairs, bn_unfusable_reason)

    @property
    def fallback_reason(self) -> Optional[str]:
        """Why the eval forward runs the reference path whatever the input (None: it fuses)."""
        return self._static_reason(self._pairs())

    def _unfused_forward(self, x: Tensor) -> Tensor:
        if self._original is not None:
            # A wrapped block runs its own forward (timm's drop-path etc. included), on the same
            # child modules as ours.
            self._original._modules.update(self._modules)
            return self._original(x)
        return type(self)._reference(self, x)

    def _train_reason(self, pairs) -> Optional[str]:
        """Why a train-mode forward runs the unfused block (None: it runs fastres::block_train)."""
        reason = self._modules_reason(pairs, bn_train_unfusable_reason)
        if reason:
            return reason
        if self._original is not None:
            # A wrapped block's other children act in train mode too (timm's drop-path, drop-block,
            # anti-aliasing...): only ReLUs and identities are known to match the fused block.
            known = set(self._stages) | {"bn" + n[-1] for n in self._stages} | {"downsample"}
            for name, child in self._modules.items():
                if name not in known and child is not None and type(child) not in (nn.ReLU, nn.Identity):
                    return f"child {name!r} ({type(child).__name__}) may act differently in training"
        return self.__dict__.get("_train_probe_reason")  # set by fastres.optimize()'s probe

    @property
    def train_fallback_reason(self) -> Optional[str]:
        """Why the train-mode forward runs the unfused block whatever the input (None: fused)."""
        return self._train_reason(self._pairs())

    def forward(self, x: Tensor) -> Tensor:
        pairs = self._pairs()
        training = [bn.training for _, bn in pairs]
        if any(training):
            # Train mode: the fused training op when every BN is in train mode (a mix of frozen
            # and training BNs runs unfused) and the kernels run on x's device.
            if not all(training) or self._train_reason(pairs) or not _kernels_train(x):
                return self._unfused_forward(x)
            x, unbatched = _prepare_input(x, [(name, conv) for name, (conv, _) in
                                              zip(self._stages + ("downsample",), pairs)])
            from fastres.training import block_train  # training imports this module
            out = block_train(self, x)
            return out.squeeze(0) if unbatched else out
        if self._static_reason(pairs) or _fallback_reason(x):
            return self._unfused_forward(x)
        x, unbatched = _prepare_input(x, [(name, conv) for name, (conv, _) in
                                              zip(self._stages + ("downsample",), pairs)])
        eager_torch, fmt = execution_plan(x)  # the intermediates are on x's device and layout
        dtype = x.dtype
        caches = self._fold_caches
        n = len(self._stages)
        out = x
        # Every stage but the last: conv + folded BN + ReLU.
        for name, (conv, bn) in zip(self._stages[:-1], pairs[:n - 1]):
            out = _fused_conv_bn(out, conv, _fold(caches[name], conv, bn, fmt, dtype), True,
                                 eager_torch)
        # Last stage: conv + folded BN + shortcut + ReLU in one launch.
        last, last_bn = pairs[n - 1]
        if len(pairs) == n:
            out = _fused_conv_bn(out, last, _fold(caches["last"], last, last_bn, fmt, dtype), True,
                                 eager_torch, residual=x)
        else:
            ds_conv, ds_bn = pairs[n]
            w, w2, bias = caches["last"].get(
                conv_bn_sources(last, last_bn) + conv_bn_sources(ds_conv, ds_bn),
                (last_bn.eps, ds_bn.eps, fmt, dtype),
                lambda: self._fold_with_shortcut(last, last_bn, ds_conv, ds_bn, fmt, dtype))
            out = _fused_conv_bn(out, last, (w, None), True, eager_torch,
                                 shortcut=(x, w2, ds_conv.stride), bias=bias)
        return out.squeeze(0) if unbatched else out

    @staticmethod
    def _fold_with_shortcut(conv, bn, ds_conv, ds_bn, fmt, dtype):
        w, b = fold_modules(conv, bn, fmt, dtype)
        w2, b2 = fold_modules(ds_conv, ds_bn, fmt, dtype)
        return w, w2, b + b2


class FusedBasicBlock(_FusedBlock):
    """torchvision's BasicBlock (same constructor and child names); eval forward = 2 launches:
    conv1+bn1+relu, then conv2+bn2 (+ downsample conv1x1+bn as a second GEMM) + residual + relu."""

    expansion = 1
    _reference = reference.basic_block_reference
    _stages = ("conv1", "conv2")

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride
        self._init_caches()


class FusedBottleneck(_FusedBlock):
    """torchvision's Bottleneck (v1.5, stride on the 3x3; same constructor and child names);
    eval forward = 3 launches, the downsample fused into the last one."""

    expansion = 4
    _reference = reference.bottleneck_reference
    _stages = ("conv1", "conv2", "conv3")

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1, base_width: int = 64,
                 dilation: int = 1, norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self._init_caches()
