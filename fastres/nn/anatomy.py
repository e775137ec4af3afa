"""What fastres may fuse, in one place: the anatomy of a ResNet block, the conv/BN/shortcut rules
of the kernels, the forwards fastres knows, what makes a module off limits (hooks,
parametrizations), and the per-call rules the fused modules' plan (fastres.nn.plan) applies.

A block is fused only while fastres can promise the user's own forward would compute the same
thing. Two ways to know that:
* a known forward, by the function's identity: torchvision's and timm's BasicBlock/Bottleneck
  (and fastres's own blocks). Their code reads nothing but the child modules, so checking the
  children on each call is enough: convs/BNs the kernels take, ReLUs that are plain nn.ReLU, and
  the optional extras (timm's drop_block, aa, se, drop_path) acting as identities.
* any other forward: a probe on a float64 copy with randomised weights and statistics, at
  several shapes (even sizes >= 16 and an odd one, batch 2 and 3), in eval and in train mode; the
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
import torch.fx
from torch import Tensor, nn

from fastres import activations, reference
from fastres.ops.conv_bn_act import SUPPORTED_DTYPES, backend_for, conv_padding

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


def block_pairs(block: nn.Module, stages: Tuple[str, ...]) -> Optional[List[Tuple[nn.Module, nn.Module]]]:
    """(conv, bn) of each stage, then of the downsample (its last two modules, after any
    leading nn.Identity) if any; None when the children no longer have that shape (a stage
    removed, the downsample replaced by a lone module). Reads the child dict directly:
    nn.Module.__getattr__ is slow enough to matter on small inputs."""
    mods = block._modules
    try:
        pairs = [(mods[name], mods["bn" + name[-1]]) for name in stages]
        ds = mods.get("downsample")
        if ds is not None:
            pairs.append((ds[-2], ds[-1]))
    except (KeyError, TypeError, IndexError):
        return None
    return None if any(m is None for pair in pairs for m in pair) else pairs


# ---------------------------------------------------------------------------------------------
# Convolutions and BatchNorms the kernels take

def conv_unfusable_reason(conv: nn.Module, conv_type: type = nn.Conv2d) -> Optional[str]:
    """Why the kernel cannot run this conv (None: it can). The type must be exactly conv_type:
    a subclass (or a parametrized conv, which torch makes a subclass) may compute otherwise."""
    if type(conv) is not conv_type:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} is not supported by the kernel"
    if conv_padding(conv) is None:
        return "asymmetric 'same' padding is not supported by the kernel"
    return None


def grouped_train_reason(conv: nn.Module) -> Optional[str]:
    """Why the fused training path cannot take this conv (None: it can): a grouped conv runs
    fused in eval mode only (the training kernels' prologue and statistics are not grouped)."""
    if conv.groups != 1:
        return f"grouped convolutions (groups={conv.groups}) are fused in eval mode only"
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


def function_activation(node: torch.fx.Node) -> Optional[Tuple[str, float]]:
    """The activation a call_function / call_method node applies to its first argument, for the
    functions whose result the kernel can compute (fastres.activations), else None."""
    F = torch.nn.functional
    if node.op == "call_function":
        simple = {torch.relu: "relu", F.relu: "relu", torch.relu_: "relu", F.relu6: "relu6",
                  F.silu: "silu", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid"}
        if node.target in simple and len(node.args) == 1:
            return simple[node.target], 0.0
        if node.target is F.gelu and len(node.args) == 1:
            approximate = node.kwargs.get("approximate", "none")
            return ({"none": ("gelu", 0.0), "tanh": ("gelu_tanh", 0.0)}.get(approximate)
                    if isinstance(approximate, str) else None)
        if node.target is F.leaky_relu:
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
            return ("leaky_relu", float(slope)) if isinstance(slope, (int, float)) else None
        return None
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return "relu", 0.0
    return None


def _drop_types() -> dict:
    """The drop layers of timm (DropPath, DropBlock2d) and torchvision (StochasticDepth, as in
    its EfficientNet), by class: the attribute holding their probability (looked up only if the
    library is loaded)."""
    found = {}
    for module_name, cls_name, attr in (("timm.layers.drop", "DropPath", "drop_prob"),
                                        ("timm.layers.drop", "DropBlock2d", "drop_prob"),
                                        ("torchvision.ops.stochastic_depth", "StochasticDepth", "p")):
        cls = getattr(sys.modules.get(module_name), cls_name, None)
        if cls is not None:
            found[cls] = attr
    return found


def acts_as_identity(m: Optional[nn.Module], training: Optional[bool] = None) -> bool:
    """Whether child m passes its input through unchanged (None: skipped), in its current mode
    or, given `training`, in that one."""
    if m is None or type(m) is nn.Identity:
        return True
    training = m.training if training is None else training
    if type(m) in (nn.Dropout, nn.Dropout2d):
        return not training or m.p == 0
    attr = _drop_types().get(type(m))
    if attr is not None:
        return not training or not getattr(m, attr)
    return False


def is_drop_layer(m: nn.Module) -> bool:
    """Whether m is a dropout or drop-path layer (an identity in eval mode)."""
    cls = original_class(m)
    return cls in (nn.Dropout, nn.Dropout2d) or cls in _drop_types()


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

# (batch, height, width) of the probe inputs: batch 2 and 3, even sizes >= 16 and an odd one
# (where a stride's or a pool's rounding shows). A forward that cannot run at these sizes
# (anti-aliasing, dilations) is tried at twice and four times them.
PROBE_SHAPES = ((2, 16, 16), (3, 16, 20), (2, 17, 19))
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
    reference.randomize_batchnorms(probe, gen, shift_scale=1.0)


def probe_reason(block: nn.Module, kind: str, training: bool) -> Optional[str]:
    """Run the block's own forward and the torchvision formula on a randomised float64 copy, in
    eval mode or (training=True) in train mode, at every probe shape; None when they agree.
    Callers make sure no hook would run (submodules unhooked, no global hooks); the copy's
    forward is called directly, so the block's own hooks do not run either."""
    formula = reference.bottleneck_reference if kind == "Bottleneck" else reference.basic_block_reference
    mode = "train" if training else "eval"
    return probe_against(block, training, lambda probe: probe.conv1.in_channels, formula,
                         f"a torchvision {kind} in {mode} mode")


def probe_against(block: nn.Module, training: bool, channels_of, formula,
                  what: str) -> Optional[str]:
    """The probe itself: a float64 copy of the block in train (training=True) or eval mode with
    random conv weights and BN statistics; its own forward against formula(probe, x) at every
    probe shape (twice or four times them where it refuses them); None when they agree, else
    why. channels_of(probe): the input channels, or None if they cannot be told."""
    gen = torch.Generator().manual_seed(0)
    try:
        probe = copy.deepcopy(block).to(device="cpu", dtype=torch.float64).train(training)
    except Exception as exc:  # noqa: BLE001 - any failure to copy is a reason not to fuse
        return f"could not copy the block for the probe: {type(exc).__name__}: {exc}"
    _randomize(probe, gen)
    channels = channels_of(probe)
    if channels is None:
        return "no conv or BN reads the block's input directly (its channels are unknown)"
    failure = None
    for scale in PROBE_SCALES:
        failure = None
        for batch, h, w in PROBE_SHAPES:
            x = torch.randn(batch, channels, h * scale, w * scale, generator=gen, dtype=torch.float64)
            try:
                with torch.no_grad():
                    got = probe.forward(x.clone())
                    want = formula(probe, x.clone())
            except Exception as exc:  # noqa: BLE001 - a forward that fails here is not fused
                failure = f"forward() failed on a probe input: {type(exc).__name__}: {exc}"
                break
            if (not isinstance(got, Tensor) or got.shape != want.shape
                    or not torch.allclose(got, want, rtol=1e-9, atol=1e-9)):
                return (f"forward() does not compute {what} (checked on a "
                        f"{batch}x{channels}x{h * scale}x{w * scale} probe input)")
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


# ---------------------------------------------------------------------------------------------
# Per call: what the input, the context and the modules allow (asked by fastres.nn.plan)

def input_reason(x: Tensor) -> Optional[str]:
    """Why the fused path cannot take this input (None: it can)."""
    if x.dtype not in SUPPORTED_DTYPES:
        return f"input dtype {x.dtype} (the kernel supports float32, float16, bfloat16)"
    return None


def train_kernels_run(x: Tensor) -> bool:
    """Whether the fused training op runs for x: the Triton kernels on x's device (CUDA, or the
    CPU under TRITON_INTERPRET) and a dtype they take. Elsewhere train mode runs unfused."""
    return input_reason(x) is None and backend_for(x) == "triton"


def call_reason(args: tuple, kwargs: dict, training: bool) -> Optional[str]:
    """Why this call must run the unfused modules, whatever the modules are (None: it may fuse)."""
    if kwargs or len(args) != 1:
        return "called with other arguments than one input tensor"
    x = args[0]
    if not isinstance(x, Tensor):
        return "input is not a tensor (torch.fx tracing: the unfused modules are traced)"
    if x.dim() != 4:
        return f"{x.dim()}-D input (nn.BatchNorm2d takes 4-D input only)"
    if training and torch.jit.is_tracing():
        return "TorchScript tracing in train mode traces the unfused modules"
    if global_hooks_registered():
        return "global module hooks are registered"
    return None


def sequential_reason(seq: nn.Module, train: bool) -> Optional[str]:
    """Why a FusedConvBNReLU (a Sequential of conv, BN[, ReLU]) runs as a plain Sequential in
    train (train=True) or eval mode whatever the input (None: it fuses)."""
    mods = list(seq._modules.values())
    if len(mods) < 2 or len(mods) > 3 or (len(mods) == 3 and type(mods[2]) is not nn.ReLU):
        return "the Sequential holds other modules than conv, BN and an nn.ReLU"
    for m in mods:
        reason = hooks_reason(m)
        if reason:
            return reason
    conv, bn = mods[0], mods[1]
    bn_reason = bn_train_unfusable_reason if train else bn_unfusable_reason
    return (conv_unfusable_reason(conv) or bn_reason(bn, conv.out_channels)
            or (grouped_train_reason(conv) if train else None))


def timm_bn_act_class() -> Optional[type]:
    """timm's BatchNormAct2d (a BatchNorm2d that applies its `drop` and `act` children after
    normalising), if timm is loaded; fastres does not import timm itself."""
    mod = sys.modules.get("timm.layers.norm_act")
    return getattr(mod, "BatchNormAct2d", None) if mod is not None else None


def original_class(m: nn.Module) -> type:
    """m's class before fastres swapped it (its own class if fastres did not)."""
    return getattr(type(m), "_fastres_original_class", None) or type(m)


def is_bn_act(bn: nn.Module) -> bool:
    """Whether bn is (or was, before fastres folded it) exactly timm's BatchNormAct2d."""
    cls = timm_bn_act_class()
    return cls is not None and original_class(bn) is cls


def bn_act_reason(bn: nn.Module) -> Optional[str]:
    """Why the activation part of a BatchNormAct2d cannot go into the kernel's epilogue (None:
    it can): its act must be one the kernel computes and its drop an identity (in the BN's
    current mode)."""
    if activations.of_module(bn.act) is None:
        return f"its act is {type(bn.act).__name__}, which the kernel does not compute"
    if not acts_as_identity(bn.drop):
        return f"its drop ({type(bn.drop).__name__}) is not an identity in this mode"
    return None


def chain_activation(conv: nn.Module) -> Optional[Tuple[str, float]]:
    """(name, slope) of the activation the chain that `conv` (a FusedConv2d) heads applies
    after its BN, read off the modules now (a module's slope may have changed since): the
    BatchNormAct2d's act, the activation module after the BN, or the functional activation
    optimize() found; ("identity", 0.0) for none; None if it is no longer one the kernel
    computes."""
    d = conv.__dict__
    bn, act = d["_fastres_bn"], d["_fastres_act"]
    if is_bn_act(bn):
        return activations.of_module(bn.act)
    if act is not None:
        return activations.of_module(act)
    return d["_fastres_function_act"] or ("identity", 0.0)


def chain_reason(conv: nn.Module) -> Optional[str]:
    """Why the conv -> BN (-> activation) chain that `conv` (a FusedConv2d) heads runs as plain
    modules right now (None: fused). Its BN and activation module are the folded classes
    optimize() made of them (their exact classes set _fastres_folded; the conv's sets
    _fastres_chain_head), kept in the conv's state `_fastres_bn`, `_fastres_act`."""
    d = conv.__dict__
    bn, act = d["_fastres_bn"], d["_fastres_act"]
    if bn.training and torch.jit.is_tracing():
        return "TorchScript tracing in train mode traces the unfused modules"
    if not _own_flag(bn, "_fastres_folded") or (
            act is not None and not _own_flag(act, "_fastres_folded")):
        return "the BN or activation was replaced or changed class"
    for m in (conv, bn, act):
        if m is not None:
            reason = hooks_reason(m)
            if reason:
                return reason
    if global_hooks_registered():
        return "global module hooks are registered"
    if is_bn_act(bn):
        reason = submodule_hooks_reason(bn) or bn_act_reason(bn)
        if reason:
            return f"{type(bn).__name__}: {reason}"
    elif chain_activation(conv) is None:
        return f"the activation is {type(act).__name__}, which the kernel does not compute"
    bn_reason = bn_train_unfusable_reason if bn.training else bn_unfusable_reason
    if not _own_flag(conv, "_fastres_chain_head"):
        return f"{type(conv).__name__} is not fastres's chain conv"
    return (conv_unfusable_reason(conv, type(conv))
            or bn_reason(bn, conv.out_channels, (type(bn),)))


def _own_flag(m: nn.Module, flag: str) -> bool:
    """Whether m's exact class (not a base or a subclass) sets `flag`."""
    return bool(type(m).__dict__.get(flag, False))


def block_reason(block: nn.Module, train: bool, call: bool = False) -> Optional[str]:
    """Why a fused block runs its own (unfused) forward whatever the input, for a call with
    every BN in train mode (train=True) or in eval mode (None: it fuses). call: judge the
    modules' current train/eval flags too (on a call; the fallback_reason properties describe
    the modes). Reads the block's fastres state (`_fastres_*` entries, see fastres.nn.blocks)."""
    d = block.__dict__
    if "_fastres_caches" not in d:
        return "made without fastres's set-up (e.g. by calling its class directly)"
    reason = block_modules_reason(block, block._fastres_stages,
                                  bn_train_unfusable_reason if train else bn_unfusable_reason)
    if reason:
        return reason
    if train:
        for name in block._fastres_stages:
            reason = grouped_train_reason(block._modules[name])
            if reason:
                return f"{name}: {reason}"

    reason = submodule_hooks_reason(block)
    if reason:
        return reason
    spec = d["_fastres_spec"]
    if spec is not None:
        # On a call the children's own flags decide; the properties assume the mode.
        return known_forward_reason(block, spec, None if call else train)
    probed = d["_fastres_probed"]
    if probed is None:
        return "its forward is neither known to fastres nor probed"
    reason = structure_changed(block, probed[0]) or attributes_changed(block, probed[1])
    if reason:
        return reason
    # A probed forward was checked with every module in one mode.
    if call and any(m.training != train for m in block.modules()):
        return f"not every submodule is in {'train' if train else 'eval'} mode (probed that way)"
    if train:
        return d["_fastres_train_probe_reason"]
    return None
