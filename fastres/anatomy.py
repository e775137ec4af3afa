"""What fastres may fuse, in one place: the anatomy of a ResNet block, the conv/BN/shortcut rules
of the kernels, the forwards fastres knows, and what makes a module off limits (hooks,
parametrizations).

A block is fused only while fastres can promise the user's own forward would compute the same
thing. Two ways to know that:
* a known forward, by the function's identity: torchvision's and timm's BasicBlock/Bottleneck
  (and fastres's own blocks). Their code reads nothing but the child modules, so checking the
  children on each call is enough: convs/BNs the kernels take, ReLUs that are plain nn.ReLU, and
  the optional extras (timm's drop_block, aa, se, drop_path) acting as identities.
* any other forward: a probe on a float64 copy with randomised weights and statistics, at
  several shapes (odd and even sizes >= 16, batch 1 and 3), in eval and in train mode; the
  block then stays fused only while its children and plain attributes are the ones probed.
Neither runs a user hook: blocks whose submodules carry hooks are never probed.
"""
from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from fastres import reference

# The convs of each block kind, in order; each conv<i> is followed by bn<i>.
BLOCK_STAGES: Dict[str, Tuple[str, ...]] = {"Bottleneck": ("conv1", "conv2", "conv3"),
                                            "BasicBlock": ("conv1", "conv2")}


def block_kind(module: nn.Module) -> Optional[str]:
    """"BasicBlock", "Bottleneck" or None, judged by the module's children (not its class)."""
    children = module._modules
    for kind, stages in BLOCK_STAGES.items():  # Bottleneck first: it is a superset
        names = [n for s in stages for n in (s, "bn" + s[-1])]
        if all(children.get(n) is not None for n in names):
            if kind == "BasicBlock" and children.get("conv3") is not None:
                return None
            return kind
    return None


# ---------------------------------------------------------------------------------------------
# Convolutions and BatchNorms the kernels take

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


def conv_unfusable_reason(conv: nn.Module, conv_type: type = nn.Conv2d) -> Optional[str]:
    """Why the kernel cannot run this conv (None: it can). The type must be exactly conv_type:
    a subclass (or a parametrized conv, which torch makes a subclass) may compute otherwise."""
    if type(conv) is not conv_type:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups}) is not supported by the kernel"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} is not supported by the kernel"
    if conv_padding(conv) is None:
        return "asymmetric 'same' padding is not supported by the kernel"
    return None


def _plain_bn_reason(bn: nn.Module, channels: int, bn_types: tuple) -> Optional[str]:
    if type(bn) not in bn_types:
        return f"{type(bn).__name__} is not a plain nn.BatchNorm2d"
    if bn.num_features != channels:
        return f"BatchNorm2d has {bn.num_features} features, the conv has {channels} outputs"
    return None


def bn_unfusable_reason(bn: nn.Module, channels: int,
                        bn_types: tuple = (nn.BatchNorm2d,)) -> Optional[str]:
    """Why this BN cannot be folded into the conv before it (None: it can)."""
    reason = _plain_bn_reason(bn, channels, bn_types)
    if reason is None and (bn.running_mean is None or bn.running_var is None):
        return ("BatchNorm2d without running stats normalises with batch statistics even in eval "
                "mode, so it cannot be folded")
    return reason


def bn_train_unfusable_reason(bn: nn.Module, channels: int,
                              bn_types: tuple = (nn.BatchNorm2d,)) -> Optional[str]:
    """Why a BN cannot run in the fused training path (which, unlike folding, needs no running
    statistics: without them it normalises with the batch's and updates nothing)."""
    return _plain_bn_reason(bn, channels, bn_types)


def shortcut_unfusable_reason(ds: nn.Module, bn_reason=bn_unfusable_reason) -> Optional[str]:
    """None when a block's downsample is nn.Sequential([nn.Identity, ...,] 1x1 conv, BN) - the
    leading identities are timm's stride-1 "avg-pool" shortcut - so that its last two modules
    are the conv and BN the kernel reduces as its second GEMM."""
    mods = list(ds) if type(ds) is nn.Sequential else []
    if (len(mods) < 2 or any(type(m) is not nn.Identity for m in mods[:-2])
            or type(mods[-2]) is not nn.Conv2d or mods[-2].kernel_size != (1, 1)
            or conv_padding(mods[-2]) != (0, 0) or mods[-2].dilation != (1, 1)):
        names = " + ".join(type(m).__name__ for m in mods) if mods else type(ds).__name__
        return f"shortcut is {names}, not a 1x1 conv + BatchNorm2d"
    return conv_unfusable_reason(mods[-2]) or bn_reason(mods[-1], mods[-2].out_channels)


def block_modules_reason(block: nn.Module, stages: Tuple[str, ...],
                         bn_reason=bn_unfusable_reason) -> Optional[str]:
    """The first stage conv/BN (BN judged by bn_reason) or shortcut of `block` the kernels
    cannot take (None: all can). The downsample is read as the block's forward reads it
    (an attribute, which need not be a module)."""
    mods = block._modules
    for conv_name in stages:
        bn_name = "bn" + conv_name[-1]
        conv, bn = mods.get(conv_name), mods.get(bn_name)
        if conv is None or bn is None:
            return f"{conv_name}/{bn_name}: removed"
        reason = conv_unfusable_reason(conv) or bn_reason(bn, conv.out_channels)
        if reason:
            return f"{conv_name}/{bn_name}: {reason}"
    ds = getattr(block, "downsample", None)
    if ds is not None:
        reason = shortcut_unfusable_reason(ds, bn_reason)
        if reason:
            return reason if reason.startswith("shortcut") else f"downsample: {reason}"
    return None


# ---------------------------------------------------------------------------------------------
# Hooks and parametrizations: a fused kernel would skip them

def global_hooks_registered() -> bool:
    """Module hooks registered for every module (nn.modules.module.register_module_forward_hook
    and friends): a fused kernel would not fire them for the modules it replaces."""
    g = torch.nn.modules.module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks
                or g._global_backward_hooks or g._global_backward_pre_hooks)


def hooks_reason(module: nn.Module) -> Optional[str]:
    """Why `module`'s own call cannot be replaced by a fused kernel (None: it can): its hooks
    would not fire, or a reparametrisation would not be applied. weight_norm, spectral_norm
    (the old-style ones) and torch.nn.utils.prune are forward pre-hooks. Runs on every fused
    call: the message is only built for a module that has one."""
    if "parametrizations" in module._modules:  # what parametrize.is_parametrized looks for
        what = "a parametrization"
    elif module._forward_pre_hooks:
        what = "forward pre-hooks (weight_norm, spectral_norm or pruning, or a user hook)"
    elif module._forward_hooks:
        what = "forward hooks"
    elif module._backward_hooks or module._backward_pre_hooks:
        what = "backward hooks"
    else:
        return None
    return f"{type(module).__name__} has {what}"


def submodule_hooks_reason(block: nn.Module) -> Optional[str]:
    """The first hooked or parametrized module inside `block` (the block's own hooks are fine:
    they fire around the fused forward with the same tensors). Walks the child dicts directly
    (named_modules() costs several times more on every fused call)."""
    stack = list(block._modules.items())
    while stack:
        name, m = stack.pop()
        if m is None:
            continue
        reason = hooks_reason(m)
        if reason:
            return f"{name}: {reason}"
        if m._modules:
            stack.extend((f"{name}.{k}", c) for k, c in m._modules.items())
    return None


# ---------------------------------------------------------------------------------------------
# Forwards fastres knows

@dataclass(frozen=True)
class KnownForward:
    """A block forward whose code fastres has read: relu(BN(conv(...)) ...) over the stage
    children, with `relus` the ReLU children it calls and `identities` the optional children it
    calls (or skips when None) that must act as identities for the fused block to match."""
    source: str
    relus: Tuple[str, ...] = ()
    identities: Tuple[str, ...] = ()


_TIMM_EXTRAS = ("drop_block", "aa", "se", "drop_path")
# (module, class, spec) - looked up in sys.modules only: a block of that class exists only if
# its module was imported, so fastres never imports torchvision or timm itself.
_KNOWN_FORWARDS = (
    ("torchvision.models.resnet", "BasicBlock", KnownForward("torchvision BasicBlock", ("relu",))),
    ("torchvision.models.resnet", "Bottleneck", KnownForward("torchvision Bottleneck", ("relu",))),
    ("timm.models.resnet", "BasicBlock",
     KnownForward("timm BasicBlock", ("act1", "act2"), _TIMM_EXTRAS)),
    ("timm.models.resnet", "Bottleneck",
     KnownForward("timm Bottleneck", ("act1", "act2", "act3"), _TIMM_EXTRAS)),
)


def known_forward(cls: type, trusted: tuple = ()) -> Optional[KnownForward]:
    """The spec of cls.forward if fastres knows that function (or the user vouched for cls by
    passing it in `trusted`), else None."""
    fn = getattr(cls, "forward", None)
    for module_name, cls_name, spec in _KNOWN_FORWARDS:
        known = getattr(sys.modules.get(module_name), cls_name, None)
        if known is not None and fn is known.forward:
            return spec
    for t in trusted:
        if isinstance(t, type) and issubclass(cls, t) and fn is t.forward:
            return KnownForward(f"{t.__name__} (trusted by optimize(trust=...))")
    return None


def _timm_drop_types() -> tuple:
    mod = sys.modules.get("timm.layers.drop")
    return tuple(t for t in (getattr(mod, "DropPath", None), getattr(mod, "DropBlock2d", None)) if t)


def acts_as_identity(m: Optional[nn.Module], training: Optional[bool] = None) -> bool:
    """Whether child m passes its input through unchanged (None: skipped), in its current mode
    or, given `training`, in that one."""
    if m is None or type(m) is nn.Identity:
        return True
    training = m.training if training is None else training
    if type(m) in (nn.Dropout, nn.Dropout2d):
        return not training or m.p == 0
    if type(m) in _timm_drop_types():
        return not training or not m.drop_prob
    return False


def known_forward_reason(block: nn.Module, spec: KnownForward,
                         training: Optional[bool] = None) -> Optional[str]:
    """Why the known forward's extra children keep the block from matching the fused one (None:
    they do not), with drop layers judged in their current mode or, given `training`, in that
    one."""
    for name in spec.relus:
        m = block._modules.get(name)
        if type(m) is not nn.ReLU:
            return f"{name} is {type(m).__name__}, not nn.ReLU"
    for name in spec.identities:
        m = getattr(block, name, None)
        if not acts_as_identity(m, training):
            active = acts_as_identity(m, False)  # a drop layer: an identity in eval mode only
            return (f"{name} is {type(m).__name__}" + (", active in training" if active else
                                                       ", which fastres does not fuse"))
    return None


# ---------------------------------------------------------------------------------------------
# The probe, for forwards fastres does not know

# (batch, height, width) of the probe inputs: odd and even sizes, batch 1 and 3. A forward that
# cannot run at these sizes (anti-aliasing, dilations) is tried at twice and four times them.
PROBE_SHAPES = ((1, 16, 17), (3, 17, 16))
PROBE_SCALES = (1, 2, 4)


def _randomize(probe: nn.Module, gen: torch.Generator) -> None:
    """Random weights and statistics, so that zero-initialised BNs or convs cannot hide a
    difference between the forward and the formula."""
    with torch.no_grad():
        for m in probe.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=torch.float64)
                               / math.sqrt(fan_in))
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=gen, dtype=torch.float64))
                    m.running_var.copy_(torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
                if m.weight is not None:
                    m.weight.copy_(torch.rand(n, generator=gen, dtype=torch.float64) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen, dtype=torch.float64))


def probe_reason(block: nn.Module, kind: str, training: bool) -> Optional[str]:
    """Run the block's own forward and the torchvision formula on a randomised float64 copy, in
    eval mode or (training=True) in train mode, at every probe shape; None when they agree.
    Callers make sure no hook would run (submodules unhooked, no global hooks); the copy's
    forward is called directly, so the block's own hooks do not run either."""
    gen = torch.Generator().manual_seed(0)
    try:
        probe = copy.deepcopy(block).to(device="cpu", dtype=torch.float64).train(training)
    except Exception as exc:
        return f"could not copy the block for the probe: {type(exc).__name__}: {exc}"
    _randomize(probe, gen)
    formula = reference.bottleneck_reference if kind == "Bottleneck" else reference.basic_block_reference
    channels = probe.conv1.in_channels
    failure = None
    for scale in PROBE_SCALES:
        failure = None
        for batch, h, w in PROBE_SHAPES:
            x = torch.randn(batch, channels, h * scale, w * scale, generator=gen, dtype=torch.float64)
            try:
                with torch.no_grad():
                    got = probe.forward(x.clone())
                    want = formula(probe, x.clone())
            except Exception as exc:
                failure = f"forward() failed on a probe input: {type(exc).__name__}: {exc}"
                break
            if (not isinstance(got, Tensor) or got.shape != want.shape
                    or not torch.allclose(got, want, rtol=1e-9, atol=1e-9)):
                mode = "train" if training else "eval"
                return (f"forward() does not compute a torchvision {kind} in {mode} mode (checked "
                        f"on a {batch}x{channels}x{h * scale}x{w * scale} probe input)")
        if failure is None:
            return None
    return failure


_SIMPLE = (type(None), bool, int, float, complex, str, torch.dtype, torch.device)


def _is_simple(v) -> bool:
    return isinstance(v, _SIMPLE) or (isinstance(v, tuple) and all(_is_simple(e) for e in v))


def attribute_snapshot(block: nn.Module) -> Dict[str, object]:
    """The block's plain attributes (not modules, parameters or buffers), as a probed forward
    may read them (`self.use_residual`)."""
    return {k: v for k, v in block.__dict__.items() if not k.startswith("_") and k != "training"}


def attributes_changed(block: nn.Module, snapshot: Dict[str, object]) -> Optional[str]:
    """The first plain attribute whose value is not the probed one: simple values by equality,
    anything else by identity (an object changed inside is not seen: see the README)."""
    d = block.__dict__
    for k, v in snapshot.items():
        cur = d.get(k, snapshot)
        if cur is v:
            continue
        if cur is snapshot or not (_is_simple(v) and _is_simple(cur) and cur == v):
            return f"attribute {k!r} changed since optimize() probed the block"
    return None


def module_structure(block: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Every submodule by name (references, so deepcopy and pickling keep them matched)."""
    return [(name, m) for name, m in block.named_modules() if m is not block]


def structure_changed(block: nn.Module, verified: List[Tuple[str, nn.Module]]) -> Optional[str]:
    current = module_structure(block)
    if len(current) != len(verified) or any(
            n1 != n2 or m1 is not m2 for (n1, m1), (n2, m2) in zip(current, verified)):
        return "its submodules changed since optimize() probed it"
    return None
