"""Residual blocks of any shape: act(f(x) + shortcut(x)) where f is a chain of conv -> BN
(-> activation) stages, found by tracing the block's own forward with torch.fx.

The blocks fastres.nn.anatomy knows by their child names (BasicBlock, Bottleneck) are only
some of the residual blocks people run: torchvision's RegNet ResBottleneckBlock and
MobileNetV2 InvertedResidual, timm's byobnet/cspnet/regnet/efficientnet blocks, a ResNet-D
Bottleneck with its avg-pool shortcut... Each computes, in eval mode,

    out = act( f(p) + s(p) [+ more terms] )   p = prefix(x) (usually x itself)

with every op one of: a conv -> BN (-> activation) stage (Stage; or a conv alone), a pooling
module (Pool) or a BN (-> activation) on no conv (Norm, a pre-activation) run as they are, an
SE / ECA gate (Gate), or a middle fastres does not fuse run as the block's own traced code
(Segment: res2net's splits, SK / ResNeSt attention); s may be empty (the identity). f ends in a
stage without activation or a gate, and `act` is any activation the kernel computes (or none).
That is what `find_residual` reads off the traced graph of a block (`Residual`); eval-mode
fusion then runs f's stages as fused launches, and the add and the activation in the epilogue
of f's last conv: with s (and the other terms) as its residual, or - where s ends in an
unpadded 1x1 conv + BN - with that conv as the kernel's second GEMM on s's input (a ResNet-D
shortcut: the pooled x; RepVGG's 1x1 branch).

The trace shows what the forward does with the attributes it had when traced (`if
self.has_skip:`), so a fused block stays fused only while its submodules and plain attributes
are the ones traced, and only after a probe on a float64 copy with random weights agreed with
the formula at several input shapes. Train mode runs the block's own forward (its conv -> BN
chains fused as chains where they can be).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.fx
from torch import Tensor, nn

from fastres import activations
from fastres.nn.anatomy import (
    PROBE_SHAPES,
    acts_as_identity,
    attributes_changed,
    bn_act_reason,
    bn_unfusable_reason,
    conv_unfusable_reason,
    function_activation,
    hooks_reason,
    is_bn_act,
    is_drop_layer,
    original_class,
    probe_against,
    structure_changed,
    submodule_hooks_reason,
    timm_bn_act_class,
)

# Modules a branch may run as they are, between (or before) its conv stages.
POOLS = (nn.AvgPool2d, nn.MaxPool2d)


@dataclass(frozen=True)
class Stage:
    """conv -> BN (-> activation), by the modules' paths inside the block. The activation is
    the module at `act`, or `function` (a (name, slope) applied by a function in the
    forward), or the BN's own (timm's BatchNormAct2d), or none. bn None: a conv alone (a
    pre-activation block's, whose BN comes before the next conv)."""
    conv: str
    bn: Optional[str]
    act: Optional[str] = None
    function: Optional[Tuple[str, float]] = None


@dataclass(frozen=True)
class Norm:
    """A BN (-> activation) that follows no conv, run as its modules: a pre-activation block's
    BN -> ReLU before its first conv."""
    bn: str
    act: Optional[str] = None
    function: Optional[Tuple[str, float]] = None


@dataclass(frozen=True)
class Pool:
    """A pooling module the branch runs as it is."""
    module: str


@dataclass(frozen=True)
class Gate:
    """An SE / ECA gate on the stage before it: z * gate(mean of z over the image), where the
    gate is any computation on the pooled (N, C[, 1, 1]) mean alone (z's shape aside): the
    block's own modules and ops, run as a torch.fx module (gate_modules). index: which gate of
    the block; keepdim: the pooled mean keeps its 1x1 spatial dimensions."""
    index: int
    keepdim: bool


@dataclass(frozen=True)
class Segment:
    """A part of the branch fastres does not fuse, run as the block's own traced code (a torch.fx
    module of it, segment_modules): res2net's split, per-scale convs and concatenation, a
    selective-kernel or split-attention middle. It reads only the result before it; its own
    conv -> BN chains still fuse as chains. index: which segment of the block."""
    index: int


@dataclass(frozen=True)
class Residual:
    branch: tuple                 # f: Stage / Pool / Norm / Gate ops, the last a Stage or Gate
    shortcut: tuple               # s: ops; () is the identity
    drops: Tuple[str, ...] = ()   # modules between the ops that must act as identities
    act: Optional[str] = None     # the activation module after the add
    function: Optional[Tuple[str, float]] = None  # or an activation function after it
    prefix: tuple = ()            # ops from x both f and s start after (a shared pre-activation)
    extra: Tuple[tuple, ...] = ()  # more terms of the sum (RepVGG: a 1x1 branch and a BN on x)

    def describe(self) -> str:
        def name(o):
            return (o.conv if isinstance(o, Stage) else o.module if isinstance(o, Pool)
                    else o.bn if isinstance(o, Norm) else "gate" if isinstance(o, Gate)
                    else "(its own ops)")

        def ops(seq):
            return " -> ".join(name(o) for o in seq)
        s = ops(self.shortcut) if self.shortcut else "identity"
        first = f"{ops(self.prefix)}, then " if self.prefix else ""
        more = "".join(f" + {ops(t) if t else 'identity'}" for t in self.extra)
        return f"{first}{ops(self.branch)} + {s}{more}"


# ---------------------------------------------------------------------------------------------
# Reading the structure off the block's traced forward

class _BlockTracer(torch.fx.Tracer):
    """Convs, BNs (timm's BatchNormAct2d included), activation modules, pools and drop layers
    are leaves, and so is any module with hooks (tracing must not fire them)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm) + POOLS)
                or is_bn_act(m) or activations.of_module(m) is not None or is_drop_layer(m)
                or hooks_reason(m) is not None or super().is_leaf_module(m, qualname))


class _Shared(Exception):
    """A node of a branch that feeds more than that branch (a prefix both sides share?)."""

    def __init__(self, node):
        super().__init__(node)
        self.node = node


class NotResidual(Exception):
    """The block is no residual block at all (not a candidate)."""


class Unfusable(Exception):
    """A residual block whose structure fastres cannot fuse; the message says why."""


def trace_block(block: nn.Module) -> torch.fx.Graph:
    """The block's forward traced for a call with one input: parameters after the first that
    have defaults keep them (DLA's forward(x, shortcut=None, children=None)). A block fastres
    fused is traced as its own class (swapped back for the trace)."""
    import inspect

    fused_class = type(block)
    own_class = fused_class.__dict__.get("_fastres_original_class") or fused_class
    try:
        params = list(inspect.signature(own_class.forward).parameters.values())[1:]
    except (TypeError, ValueError) as exc:
        raise NotResidual(str(exc)) from exc
    concrete = {p.name: p.default for p in params[1:] if p.default is not inspect.Parameter.empty}
    if not params or len(params) - 1 != len(concrete):
        raise NotResidual("its forward takes more than one input")
    block.__class__ = own_class
    try:
        return _BlockTracer().trace(block, concrete_args=concrete or None)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: not a block fastres can read
        raise NotResidual(f"not traceable ({type(exc).__name__})") from exc
    finally:
        block.__class__ = fused_class


_ADDS = (operator.add, operator.iadd, torch.add)


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADDS:
        return len(node.args) == 2 and not node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_") and len(node.args) == 2 \
        and not node.kwargs


def _depends_on(node, x) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is x:
            return True
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes)
    return False


class _Reader:
    """Reads one traced block graph into a Residual."""

    def __init__(self, block: nn.Module, graph: torch.fx.Graph):
        self.block = block
        self.graph = graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        # (the parameters traced with their defaults are placeholders fx only asserts on)
        if not placeholders or any(u.op != "call_function" or "assert" not in u.target.__name__
                                   for p in placeholders[1:] for u in p.users):
            raise NotResidual("its traced forward has more than one input")
        self.x = placeholders[0]
        self.calls: Dict[str, int] = {}
        for n in graph.nodes:
            if n.op == "call_module":
                self.calls[n.target] = self.calls.get(n.target, 0) + 1
        self.drops: List[str] = []
        self.gates: List[Tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]] = []  # (z, pool, g)
        self.segments: List[Tuple[torch.fx.Node, torch.fx.Node, list]] = []  # (from, to, nodes)
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        output = next(n for n in graph.nodes if n.op == "output")
        self.live = _ancestors(output) | {output}  # (results the forward uses)

    def module(self, node) -> Optional[nn.Module]:
        return self.block.get_submodule(node.target) if node.op == "call_module" else None

    def read(self) -> Residual:
        out = next(n for n in self.graph.nodes if n.op == "output").args[0]
        if not isinstance(out, torch.fx.Node):
            raise NotResidual("its forward does not return one tensor")
        node = self._skip_identities(out)
        act = function = None
        if not _is_add(node):
            try:
                act, function, node = self._activation(node)
            except Unfusable:
                raise NotResidual("its output is not a sum") from None
            node = self._skip_identities(node)
        if not _is_add(node) or not all(isinstance(a, torch.fx.Node) and _depends_on(a, self.x)
                                        for a in node.args):
            raise NotResidual("its output is not the sum of two functions of its input")
        if node.meta.get("nn_module_stack"):
            # the sum is a submodule's (a stage whose last block adds): that one is the block
            raise NotResidual("its sum is computed inside a submodule")
        if not any(self._has_conv(a) for a in node.args):
            raise NotResidual("no convolution before its sum")
        terms = self._terms(node)
        self._single_use(terms)
        prefix = []
        try:
            read = [self._ops(t) for t in terms]
        except _Shared as shared:
            # Both sides start from one shared result (a pre-activation block's BN -> ReLU
            # feeds its first conv and its downsample): read the prefix up to it, then each
            # side from it.
            start = shared.node
            self.gates, self.drops, self.segments = [], [], []
            read = [self._ops(t, start) for t in terms]
            prefix = self._ops(start, shared_end=True)
        branch, shortcut, extra = self._which_is_f(read)
        self._check_calls(prefix + branch + shortcut + [o for t in extra for o in t], act)
        return Residual(tuple(branch), tuple(shortcut), tuple(self.drops), act, function,
                        tuple(prefix), tuple(tuple(t) for t in extra))

    def _terms(self, node) -> list:
        """The terms of a sum of sums (a + b + c, with drop layers or identities between)."""
        terms = []
        for a in node.args:
            inner = self._skip_identities(a)
            if _is_add(inner) and len(inner.users) == 1 and inner is not self.x:
                terms += self._terms(inner)
            else:
                terms.append(a)
        return terms

    def _has_conv(self, node) -> bool:
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen or n is self.x:
                continue
            seen.add(n)
            if isinstance(self.module(n), nn.Conv2d):
                return True
            stack.extend(n.all_input_nodes)
        return False

    def _skip_identities(self, node):
        """Walk back over identity modules and drop layers (recorded: each call checks that
        they act as identities), and F.dropout calls that were identities when traced (p = 0 or
        training=False: the trace holds the mode it was made in; the probe runs eval mode)."""
        while node.op in ("call_module", "call_function"):
            if node.op == "call_function":
                if not _traced_identity_dropout(node):
                    break
                node = node.args[0]
                continue
            m = self.module(node)
            # (original_class: the chain search may have folded it, when the gate is re-read)
            if original_class(m) is nn.Identity or is_drop_layer(m):
                if original_class(m) is not nn.Identity:
                    self.drops.append(node.target)
                node = self._arg(node)
            else:
                break
        return node

    def _arg(self, node):
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            raise Unfusable(f"{node.target} is called with more than one tensor")
        return node.args[0]

    def _activation(self, node):
        """(module path, function, the node before) of an activation node."""
        m = self.module(node)
        if m is not None and activations.of_module(m) is not None and not is_bn_act(m):
            return node.target, None, self._arg(node)
        spec = function_activation(node) if node.op in ("call_function", "call_method") else None
        if spec is not None:
            return None, spec, node.args[0]
        raise Unfusable(f"{_describe(node, self.block)} after the sum is not an activation the "
                        "kernel computes")

    def _single_use(self, nodes, start=None) -> None:
        for n in nodes:
            if n is not self.x and len(n.users) != 1:
                if start is None and n.op == "call_module":
                    raise _Shared(n)
                raise Unfusable(f"{_describe(n, self.block)}'s result is used twice")

    def _ops(self, node, start=None, shared_end: bool = False) -> list:
        """The ops from x (or from the node `start`, which the walk must meet) to `node`, first
        to last; shared_end: `node`'s result may feed more than one op (the shared prefix)."""
        ops = []
        end = node
        # a gate's z (used by the gate besides the op that follows it), or a segment's start
        # (whose users are all in the segment): not single-use, and read by one op still
        gated = None
        begin = self.x if start is None else start
        while node is not begin:
            if node is self.x:
                raise Unfusable("one side of the sum does not start from the shared part")
            node = self._skip_identities(node)
            if node is begin:
                break
            try:
                gate = self._gate(node)
            except Unfusable:
                node = gated = self._segment(node, begin, ops)
                continue
            if gate is not None:
                z, pool, g, keepdim = gate
                ops.append(Gate(len(self.gates), keepdim))
                self.gates.append((z, pool, g))
                node = gated = z
                continue
            if node is not gated and not (shared_end and node is end):
                self._single_use([node], start)
            m = self.module(node)
            if isinstance(m, POOLS):
                ops.append(Pool(node.target))
                node = self._arg(node)
                continue
            if isinstance(m, nn.Conv2d):  # a conv with no BN after it
                ops.append(Stage(node.target, None))
                node = self._arg(node)
                continue
            act = function = None
            op_node = node
            if not (isinstance(m, nn.modules.batchnorm._BatchNorm) or is_bn_act(m)):
                try:
                    act, function, node = self._activation(node)
                except Unfusable:
                    node = gated = self._segment(op_node, begin, ops)
                    continue
                node = self._skip_identities(node)
                self._single_use([node], start)
                m = self.module(node)
            if not isinstance(m, (nn.modules.batchnorm._BatchNorm,)) and not is_bn_act(m):
                node = gated = self._segment(op_node, begin, ops)
                continue
            if is_bn_act(m) and (act or function):
                raise Unfusable(f"{node.target} applies its own activation, then another follows")
            conv_node = self._arg(node)
            if not isinstance(self.module(conv_node), nn.Conv2d):
                # a BN (-> activation) on something else than a conv: run as it is
                ops.append(Norm(node.target, act, function))
                node = conv_node
                continue
            self._single_use([conv_node], start)
            ops.append(Stage(conv_node.target, node.target, act, function))
            node = self._arg(conv_node)
        ops = ops[::-1]
        for i, op in enumerate(ops):
            if isinstance(op, Gate) and (i == 0 or not isinstance(ops[i - 1], Stage)):
                raise Unfusable("an SE / ECA gate that does not follow a conv + BN")
        return ops

    def _live_users(self, node) -> list:
        """node's users whose results the forward uses (not res2net's unused `spx[0]`, nor a
        shape read whose result goes nowhere)."""
        return [u for u in node.users if u in self.live]

    def _segment(self, end, begin, ops):
        """Record the nodes from the nearest result `start` on the branch (begin or after it)
        that alone feeds everything up to `end` (whose intermediate results feed nothing else)
        as a Segment op; return start. Raises Unfusable if there is none."""
        ancestors = _ancestors(end)
        for start in sorted(ancestors, key=self.order.get, reverse=True):
            if start.op == "get_attr" or (start is not begin and begin not in _ancestors(start)):
                continue
            inside = _reachable(start, ancestors | {end})
            if not inside or end not in inside:
                continue
            closed = all(m in inside or m is start or m.op == "get_attr"
                         for n in inside for m in n.all_input_nodes)
            contained = all(u in inside for n in inside if n is not end for u in self._live_users(n))
            alone = start is begin or all(u in inside for u in self._live_users(start))
            # (the segment starts at the branch's start or right after a module: a stage's,
            # pool's or activation's result, where the walk can go on)
            boundary = start is begin or start.op == "call_module"
            if closed and contained and alone and boundary and not any(
                    n.op in ("placeholder", "output") for n in inside):
                nodes = sorted(inside, key=self.order.get)
                ops.append(Segment(len(self.segments)))
                self.segments.append((start, end, nodes))
                return start
        raise Unfusable(f"its branch has {_describe(end, self.block)}, which reads more than one "
                        "result of the branch")

    def _gate(self, node):
        """(z, pool node, gate node, keepdim) when node is z * gate(pool(z)) with the gate
        reading z only through its mean over the image (and its shape), else None."""
        is_mul = ((node.op == "call_function" and node.target in (operator.mul, torch.mul))
                  or (node.op == "call_method" and node.target == "mul"))
        if not is_mul or len(node.args) != 2 or node.kwargs:
            return None
        self._single_use([node])
        for z, g in (node.args, node.args[::-1]):
            if not (isinstance(z, torch.fx.Node) and isinstance(g, torch.fx.Node)):
                continue
            found = self._gate_reads(g, z)
            if found is not None:
                pool, keepdim = found
                others = [u for u in z.users if u is not node and u is not pool
                          and not _shape_use(u, z)]
                if others:
                    raise Unfusable(f"{_describe(z, self.block)}'s result is used besides its gate")
                return z, pool, g, keepdim
        raise Unfusable(f"its branch has {_describe(node, self.block)}, which is not an SE / ECA "
                        "gate (z * f(mean of z))")

    def _gate_reads(self, g, z):
        """(pool node, keepdim) if g depends on z through one mean over the image (and shape
        reads) and not on the block's input otherwise, else None."""
        pools, seen, stack = [], set(), [g]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n is self.x or n is z:
                return None  # z's values, or the input, reach the gate other than by the mean
            keepdim = _image_mean(n, z, self.block)
            if keepdim is not None:
                pools.append((n, keepdim))
                continue
            stack.extend(a for a in n.all_input_nodes if not (a is z and _shape_use(n, z)))
        return pools[0] if len(pools) == 1 else None

    def _which_is_f(self, terms):
        """(f, s, the other terms): f must end in a stage with no activation (its conv's
        epilogue adds the rest) or a gate; of several such, the one with most stages (then the
        widest filter: RepVGG's 3x3 beside its 1x1). s: a term the kernel can reduce as its
        second GEMM if there is one, else the first other term."""
        def ends_plain(ops):
            return bool(ops) and (isinstance(ops[-1], Gate) or (
                isinstance(ops[-1], Stage)
                and stage_activation(self.block, ops[-1]) == ("identity", 0.0)))

        def rank(i):
            ops = terms[i]
            last = next((o for o in reversed(ops) if isinstance(o, Stage)), None)
            size = self.block.get_submodule(last.conv).kernel_size if last else (0, 0)
            return (sum(isinstance(o, Stage) for o in ops), size)
        candidates = [i for i, ops in enumerate(terms) if ends_plain(ops)]
        if not candidates:
            raise Unfusable("no term of the sum ends in a conv + BN without activation")
        f = max(candidates, key=rank)
        rest = [t for i, t in enumerate(terms) if i != f]
        if any(isinstance(o, Gate) for t in rest for o in t):
            raise Unfusable("an SE / ECA gate outside the main branch")
        dual = next((t for t in rest if _dual_candidate(self.block, t)), rest[0])
        rest.remove(dual)
        return terms[f], dual, rest

    def _check_calls(self, ops, act) -> None:
        """Each conv, BN, pool and drop layer is called once (an activation module may be
        called more often: it holds no state)."""
        names = [n for o in ops for n in ((o.conv, o.bn) if isinstance(o, Stage) else
                                          (o.module,) if isinstance(o, Pool) else
                                          (o.bn,) if isinstance(o, Norm) else ()) if n is not None]
        for n in names + self.drops:
            if self.calls.get(n, 0) != 1:
                raise Unfusable(f"{n} is called more than once")


def _traced_identity_dropout(node) -> bool:
    """Whether node is F.dropout(x, p, training) with constant p == 0 or training False."""
    if node.target is not nn.functional.dropout or not node.args:
        return False
    args = dict(zip(("input", "p", "training", "inplace"), node.args), **node.kwargs)
    p, training = args.get("p", 0.5), args.get("training", True)
    return isinstance(node.args[0], torch.fx.Node) and (
        (isinstance(p, (int, float)) and p == 0) or training is False)


def _ancestors(node) -> set:
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _reachable(start, within: set) -> set:
    """The nodes of `within` that use start's result, directly or not."""
    seen, stack = set(), [u for u in start.users if u in within]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(u for u in n.users if u in within)
    return seen


def _shape_use(node, z) -> bool:
    """Whether node reads only z's shape: z.shape, z.size(), g.expand_as(z), g.view_as(z)."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2:
        return node.args[0] is z and node.args[1] == "shape"
    if node.op == "call_method":
        if node.target in ("size", "dim") and node.args[0] is z:
            return True
        return node.target in ("expand_as", "view_as", "reshape_as") and len(node.args) == 2 \
            and node.args[1] is z and node.args[0] is not z
    return False


def _image_mean(node, z, block) -> Optional[bool]:
    """keepdim if node is z's mean over its two spatial dimensions (z.mean((2, 3)),
    torch.mean, AdaptiveAvgPool2d(1), F.adaptive_avg_pool2d(z, 1)), else None."""
    if not node.args or node.args[0] is not z:
        return None
    if (node.op == "call_method" and node.target == "mean") or (
            node.op == "call_function" and node.target is torch.mean):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if isinstance(dims, (tuple, list)) and sorted(d % 4 for d in dims) == [2, 3] \
                and isinstance(keepdim, bool):
            return keepdim
        return None
    size = None
    if node.op == "call_module" and type(block.get_submodule(node.target)) is nn.AdaptiveAvgPool2d:
        size = block.get_submodule(node.target).output_size
    elif node.op == "call_function" and node.target is nn.functional.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    return True if size in (1, (1, 1), [1, 1]) else None


def _describe(node, block) -> str:
    if node.op == "call_module":
        return f"{type(block.get_submodule(node.target)).__name__} {node.target}"
    target = getattr(node.target, "__name__", node.target)
    return f"{node.op.replace('call_', '')} {target}"


def find_residual(block: nn.Module) -> Residual:
    """The block's Residual structure. Raises NotResidual (not a residual block) or Unfusable
    (a residual block fastres cannot fuse, with the reason)."""
    return _Reader(block, trace_block(block)).read()


# ---------------------------------------------------------------------------------------------
# What the structure computes, and the probe

def stage_activation(block: nn.Module, stage: Stage) -> Optional[Tuple[str, float]]:
    """(name, slope) of the stage's activation now (read off the modules), identity for none;
    None if it is no longer one the kernel computes."""
    bn = block.get_submodule(stage.bn) if stage.bn is not None else None
    if bn is not None and is_bn_act(bn):
        return None if bn_act_reason(bn) else activations.of_module(bn.act)
    if stage.act is not None:
        return activations.of_module(block.get_submodule(stage.act))
    return stage.function or ("identity", 0.0)


def final_activation(block: nn.Module, r: Residual) -> Optional[Tuple[str, float]]:
    if r.act is not None:
        return activations.of_module(block.get_submodule(r.act))
    return r.function or ("identity", 0.0)


def image_mean(z: Tensor, keepdim: bool) -> Tensor:
    return z.mean((2, 3), keepdim=keepdim)


def run_norm(block: nn.Module, op: Norm, h: Tensor) -> Tensor:
    """A Norm op: its BN (-> activation) modules, as the block runs them."""
    h = block.get_submodule(op.bn)(h)
    if op.act is not None:
        return block.get_submodule(op.act)(h)
    return activations.apply(h, *op.function) if op.function is not None else h


def _run_ops(block: nn.Module, ops, h: Tensor) -> Tensor:
    for op in ops:
        if isinstance(op, Pool):
            h = block.get_submodule(op.module)(h)
            continue
        if isinstance(op, Gate):
            h = h * gate_modules(block)[op.index](image_mean(h, op.keepdim), h)
            continue
        if isinstance(op, Norm):
            h = run_norm(block, op, h)
            continue
        if isinstance(op, Segment):
            h = segment_modules(block)[op.index](h)
            continue
        h = block.get_submodule(op.conv)(h)
        if op.bn is not None:
            h = block.get_submodule(op.bn)(h)
        if op.act is not None:
            h = block.get_submodule(op.act)(h)
        elif op.function is not None:
            h = activations.apply(h, *op.function)
    return h


def residual_formula(block: nn.Module, r: Residual, x: Tensor) -> Tensor:
    """act(f(x) + s(x)) with the block's own modules, the oracle of the fused path."""
    x = _run_ops(block, r.prefix, x)
    out = _run_ops(block, r.branch, x) + _run_ops(block, r.shortcut, x)
    for term in r.extra:
        out = out + _run_ops(block, term, x)
    if r.act is not None:
        return block.get_submodule(r.act)(out)
    return activations.apply(out, *(r.function or ("identity", 0.0)))




def input_channels(block: nn.Module, r: Residual) -> Optional[int]:
    """The block's input channels: those of the first conv or BN that reads the input (pools
    keep the channels)."""
    for ops in ([r.prefix] if r.prefix else [r.branch, r.shortcut, *r.extra]):
        for op in ops:
            if isinstance(op, Stage):
                return block.get_submodule(op.conv).in_channels
            if isinstance(op, Norm):
                return block.get_submodule(op.bn).num_features
            if not isinstance(op, Pool):
                break
    if not r.prefix and (not r.shortcut or not all(r.extra)):
        # an identity term: the input has the output's channels, those of f's last conv
        last = next((op for op in reversed(r.branch) if isinstance(op, Stage)), None)
        if last is not None:
            return block.get_submodule(last.conv).out_channels
    return None


def probe_residual(block: nn.Module, r: Residual) -> Optional[str]:
    """Run the block's own forward and residual_formula on a randomised float64 copy in eval
    mode at every probe shape (fastres.nn.anatomy.probe_against); None when they agree.
    Callers make sure no hook would run."""
    return probe_against(block, False, lambda probe: input_channels(probe, r),
                         lambda probe, x: residual_formula(probe, r, x),
                         f"{r.describe()} in eval mode")


# ---------------------------------------------------------------------------------------------
# Per call

def _conv_reason(conv: nn.Module) -> Optional[str]:
    # fastres's chain conv (FusedConv2d, class-swapped by the chain search) is an nn.Conv2d
    plain = type(conv) is nn.Conv2d or bool(type(conv).__dict__.get("_fastres_chain_head"))
    if not plain:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    return conv_unfusable_reason(conv, type(conv))


def _bn_reason(bn: nn.Module, channels: int) -> Optional[str]:
    cls = original_class(bn)
    if cls is not nn.BatchNorm2d and cls is not timm_bn_act_class():
        return f"{type(bn).__name__} is not a plain nn.BatchNorm2d or timm's BatchNormAct2d"
    return bn_unfusable_reason(bn, channels, (type(bn),))


def ops_reason(block: nn.Module, r: Residual, training: Optional[bool] = None) -> Optional[str]:
    """Why the block's modules cannot run fused (None: they can), its drop layers judged in
    their current mode or, given `training`, in that one."""
    for op in r.prefix + r.branch + r.shortcut + tuple(o for t in r.extra for o in t):
        if not isinstance(op, Stage):
            continue
        conv = block.get_submodule(op.conv)
        reason = _conv_reason(conv)
        if reason is None and op.bn is not None:
            reason = _bn_reason(block.get_submodule(op.bn), conv.out_channels)
        if reason is None and stage_activation(block, op) is None:
            reason = "its activation is not one the kernel computes"
        if reason:
            return f"{op.conv}: {reason}"
    if isinstance(r.branch[-1], Stage) and stage_activation(block, r.branch[-1]) != ("identity", 0.0):
        return f"{r.branch[-1].conv}: an activation before the sum"
    if final_activation(block, r) is None:
        return f"{r.act}: not an activation the kernel computes"
    for name in r.drops:
        if not acts_as_identity(block.get_submodule(name), training):
            return f"{name} is not an identity in this mode"
    return None


def residual_block_reason(block: nn.Module, train: bool, call: bool = False) -> Optional[str]:
    """Why a fused residual block runs its own forward whatever the input (None: it fuses), for
    a call in train (train=True) or eval mode; call: judge the drop layers in their current
    mode (the plan passes train=True when any submodule is in train mode).
    Reads the block's fastres state (fastres.nn.blocks.FusedResidualBase)."""
    d = block.__dict__
    if "_fastres_residual" not in d:
        return "made without fastres's set-up"
    if train:
        return ("residual blocks other than BasicBlock/Bottleneck train as their own forward "
                "(their conv -> BN chains fused as chains)")
    structure, attributes = d["_fastres_probed"]
    reason = (structure_changed(block, structure) or attributes_changed(block, attributes)
              or submodule_hooks_reason(block))
    if reason:
        return reason
    # (a call in eval mode: the plan found every submodule in eval mode already)
    return ops_reason(block, d["_fastres_residual"], None if call else False)


def dual_gemm_shortcut(block: nn.Module, r: Residual) -> bool:
    """Whether the shortcut's last op is a conv the kernel reduces as its second GEMM: an
    unpadded, undilated, ungrouped 1x1 conv + BN with no activation."""
    return not isinstance(r.branch[-1], Gate) and _dual_candidate(block, r.shortcut)


def _dual_candidate(block: nn.Module, ops) -> bool:
    if not ops or not isinstance(ops[-1], Stage):
        return False
    op = ops[-1]
    conv = block.get_submodule(op.conv)
    return (stage_activation(block, op) == ("identity", 0.0)
            and conv.kernel_size == (1, 1) and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding in ((0, 0), "valid"))


def launches(r: Residual, dual: bool) -> int:
    """Kernel launches of one eval forward: the fused convs and a gate pass per gate (the
    gate's own small network on the pooled means runs as torch ops besides)."""
    convs = sum(isinstance(o, Stage)
                for o in r.prefix + r.branch + r.shortcut + tuple(o for t in r.extra for o in t))
    return convs - (1 if dual else 0) + sum(isinstance(o, Gate) for o in r.branch)


# ---------------------------------------------------------------------------------------------
# The gates' own networks, as torch.fx modules of the block's traced forward

def gate_modules(block: nn.Module) -> List[torch.fx.GraphModule]:
    """For each Gate of the block (by index): a torch.fx module (pooled, z) -> gate, the part of
    the block's traced forward between the mean of z and the gate, calling the block's own
    submodules (the same objects). Built from a fresh trace and cached in the block's dict
    (not pickled: rebuilt after a copy)."""
    return _traced_modules(block)[0]


def segment_modules(block: nn.Module) -> List[torch.fx.GraphModule]:
    """For each Segment of the block (by index): a torch.fx module of that part of its traced
    forward (as gate_modules)."""
    return _traced_modules(block)[1]


def _traced_modules(block: nn.Module):
    d = block.__dict__
    cached = d.get("_fastres_traced")
    if cached is not None:
        return cached
    reader = _Reader(block, trace_block(block))
    reader.read()
    gates = []
    for z, pool, g in reader.gates:
        graph = torch.fx.Graph()
        env = {pool: graph.placeholder("pooled"), z: graph.placeholder("z")}
        for n in reader.graph.nodes:
            if n in env or not _between(n, g, env):
                continue
            env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output(env[g])
        gates.append(torch.fx.GraphModule(block, graph, class_name="SEGate"))
    segments = []
    for start, end, nodes in reader.segments:
        graph = torch.fx.Graph()
        env = {start: graph.placeholder("x")}
        for n in reader.graph.nodes:  # (the constants it reads, then its nodes, in order)
            if n.op == "get_attr" and any(n in m.all_input_nodes for m in nodes):
                env[n] = graph.node_copy(n, lambda a: env[a])
        for n in nodes:
            env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output(env[end])
        segments.append(torch.fx.GraphModule(block, graph, class_name="BlockSegment"))
    d["_fastres_traced"] = (gates, segments)
    return d["_fastres_traced"]


def _between(n, g, env) -> bool:
    """Whether node n is an ancestor of g (or g) computed from env's nodes only."""
    stack, seen = [g], set()
    while stack:
        m = stack.pop()
        if m is n:
            return True
        if m in seen or m in env:
            continue
        seen.add(m)
        stack.extend(m.all_input_nodes)
    return False


__all__ = ["Stage", "Pool", "Gate", "Norm", "Segment", "segment_modules", "run_norm",
           "gate_modules", "image_mean", "Residual", "NotResidual", "Unfusable", "find_residual",
           "residual_formula", "probe_residual", "ops_reason", "dual_gemm_shortcut",
           "stage_activation", "final_activation", "launches", "residual_block_reason",
           "PROBE_SHAPES"]
