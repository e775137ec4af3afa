"""Static cost report of the fused conv kernel as compiled for a GPU, and its gate; no GPU needed.

    python -m fastres compile-check --sass [--arch 90] [--out DIR] [--quick] [--gate] [--bless]

Every distinct conv of torchvision's ResNet-18 and ResNet-50 (with the epilogue it has in the
model: conv+BN+ReLU, the block's last conv + identity residual, the last conv + the downsample
shortcut GEMM, the 7x7 stem with its flat reduction) is compiled through
fastres.launch.conv.fused_conv2d at its real batch-256 size, in fp16, bf16 and fp32 (tf32),
channels_last, with the first candidate config (FASTRES_AUTOTUNE=0's pick), plus the training
variants of the 3x3 and 1x1 convs in fp16 (STATS, no bias/ReLU; PROLOGUE + STATS). Compilation
goes through compile_check's compile-only driver (nothing is launched; the tensors are views of
one never-touched CPU allocation). For each cubin:

  * registers and stack (cuobjdump -res-usage), spill bytes (the bytes of the STL/LDL
    instructions, which is what ptxas -v reports as spill stores/loads), shared memory
    (metadata.shared + the 1 KiB every CTA reserves), CTAs per SM and what limits them
    (65536 registers per SM in 4 sub-partitions, allocated per warp in units of 256; 228 KiB
    of shared memory per SM; at most 32 CTAs and 64 warps);
  * static counts of HGMMA, LDGSTS, UTMALDG, LDG, STG, LDL, STL, BAR in the SASS (nvdisasm);
  * the loop structure from the SASS control flow: natural loops of the dominator tree (a
    branch to an instruction that dominates it); the innermost loop holding an MMA is the main
    loop; nesting gives the rest;
  * "instructions per warp per tile": each straight-line instruction counted once per trip of
    every loop around it. Trip counts come from the problem and the structure found, not
    assumed: a main loop inside a tap loop runs ceil(C/BLOCK_K) trips per tap and the tap loop
    R*S; a single main loop runs R*S*ceil(C/BLOCK_K) trips (ceil(R*S*C/BLOCK_K) with the flat
    reduction, R with its row-span order: one filter row of S*C <= BLOCK_K per step); the
    shortcut GEMM's loop ceil(C2/BLOCK_K); loops without an MMA count once;
  * "issue/tensor" = instructions per warp per tile x warps per SM sub-partition (num_warps/4)
    / tensor-core cycles of the tile at the dense rate (BLOCK_M*BLOCK_N*BLOCK_K*k_steps FMAs at
    2048 per clock per SM for fp16/bf16, 1024 for tf32). Above 1, issuing the instructions
    (1 per clock per sub-partition) takes longer than the tensor cores need for the MMAs.

The same numbers for kernels/reference_gemm.py (Triton's tutorial GEMM) compiled on the same
tile and implicit-GEMM sizes give the "ratio to reference" of each kernel's instructions per
tile. Results: DIR/sass.json (one record per kernel) and DIR/sass.md (a table per variant).

The gate compares the fresh records with a committed baseline (benchmarks/baselines/
sass_sm<arch>.json of a source checkout): added spill bytes, a lost HGMMA or UTMALDG, or more
than 10% more instructions per tile on any kernel fail, unless blessed (--bless). Instruction
counts are compared only under the triton and ptxas versions that blessed the baseline.
The method is the one of the static study in /work/shared/sass-study-3783e4b.md.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# ---------------------------------------------------------------------------------------------
# Hardware model (H100 / H200, sm_90)

REGS_PER_SM = 65536
SUB_PARTITIONS = 4
REG_ALLOC_UNIT = 256          # registers, per warp
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024  # every cubin's .nv.shared.reserved.0
MAX_CTAS_PER_SM = 32
MAX_WARPS_PER_SM = 64
DENSE_FMA_PER_CLK = {"fp16": 2048, "bf16": 2048, "fp32": 1024}  # per SM; fp32 operands run as tf32
NUM_SMS = 132                 # H100 SXM / H200, for the waves column

MMA_OPCODES = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA", "UTCHMMA", "UTCQMMA",
               "UTCIMMA", "UTCOMMA")
COUNTED_OPCODES = ("HGMMA", "LDGSTS", "UTMALDG", "LDG", "STG", "LDL", "STL", "BAR")
# Instructions after which control does not fall through (when not predicated).
TERMINATORS = ("EXIT", "RET", "KILL", "BPT")

BATCH = 256
MODELS = ("resnet18", "resnet50")
DTYPES = ("fp16", "bf16", "fp32")
VARIANTS = ("eval", "train-stats", "train-prologue-stats")
INSTR_TOLERANCE = 0.10  # the gate: more than 10% more instructions per tile fails
BASELINE_NAME = "sass_sm{arch}.json"


# ---------------------------------------------------------------------------------------------
# SASS listing -> instructions -> control-flow graph -> loops

_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;?\s*(?:/\*.*)?$")
_LABEL = re.compile(r"^\s*(\.L_x_\d+|\.L_\w+):\s*$")
_TARGET = re.compile(r"`?\(\s*(\.L_\w+)\s*\)|(0x[0-9a-fA-F]+)")
_SECTION = re.compile(r"^//-+\s+\.text\.(\S+)\s+-+")


@dataclass
class Instr:
    addr: int
    pred: str          # "" or e.g. "@!P0"
    opcode: str        # with its modifiers, e.g. "HGMMA.64x128x16.F32"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclass
class SassFunction:
    name: str
    instrs: List[Instr] = field(default_factory=list)
    labels: Dict[str, int] = field(default_factory=dict)  # label -> instruction index


def parse_sass(text: str) -> List[SassFunction]:
    """The functions of an `nvdisasm -c` listing, each with its instructions and labels."""
    functions: List[SassFunction] = []
    current: Optional[SassFunction] = None
    pending: List[str] = []
    for line in text.splitlines():
        section = _SECTION.match(line)
        if section:
            current = SassFunction(section.group(1))
            functions.append(current)
            pending = []
            continue
        if current is None:
            continue
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        body = m.group(2).strip().strip("{}").strip()
        if not body:
            continue
        pred = ""
        if body.startswith("@"):
            pred, _, body = body.partition(" ")
            body = body.strip()
        opcode, _, operands = body.partition(" ")
        for name in pending:
            current.labels[name] = len(current.instrs)
        pending = []
        current.instrs.append(Instr(int(m.group(1), 16), pred, opcode, operands.strip()))
    return functions


_PRED_OPERAND = re.compile(r"^!?U?P[0-6]\s*,")


def _unconditional(instr: Instr) -> bool:
    """Whether control never falls through the instruction: no guard predicate, no predicate
    operand (`BRA.U !UP0, target`), no divergence condition (BRA.DIV, BRA.CONV, ...)."""
    if instr.pred not in ("", "@PT", "@UPT") or _PRED_OPERAND.match(instr.operands):
        return False
    return not any(m in ("DIV", "CONV", "ANY", "ALL") for m in instr.opcode.split(".")[1:])


def _branch_target(fn: SassFunction, instr: Instr, index_of_addr: Dict[int, int]) -> Optional[int]:
    m = _TARGET.search(instr.operands)
    if not m:
        return None
    if m.group(1):
        return fn.labels.get(m.group(1))
    return index_of_addr.get(int(m.group(2), 16))


@dataclass
class Loop:
    header: int                 # block index
    blocks: frozenset
    parent: Optional[int] = None  # index into the loop list
    children: List[int] = field(default_factory=list)
    own_instrs: int = 0         # in the loop's blocks but not in a nested loop's
    own_mma: int = 0
    mma_total: int = 0          # in the loop and the loops inside it
    header_addr: int = 0
    end_addr: int = 0
    depth: int = 1              # 1 = outermost


@dataclass
class SassAnalysis:
    """What one kernel's SASS holds: static opcode counts, blocks, loops, and per block its
    instruction count and the loops around it (innermost last)."""
    name: str
    instr_count: int                       # reachable instructions
    counts: Dict[str, int]                 # COUNTED_OPCODES -> static count
    mma_opcodes: Dict[str, int]            # full MMA opcode -> static count
    spill_store_bytes: int
    spill_load_bytes: int
    block_sizes: List[int]
    block_addrs: List[int]
    block_loops: List[Tuple[int, ...]]     # loop indices around each block, outermost first
    loops: List[Loop]
    irreducible_edges: int = 0

    def top_level_mma_nests(self) -> List[int]:
        nests = [i for i, lp in enumerate(self.loops) if lp.parent is None and lp.mma_total]
        return sorted(nests, key=lambda i: self.loops[i].header_addr)

    def outside_regions(self) -> Dict[str, int]:
        """Instructions in no loop: before the first MMA loop nest, between such nests, after
        the last one (the epilogue)."""
        tops = sorted((self.loops[i].header_addr, self.loops[i].end_addr)
                      for i in self.top_level_mma_nests()
                      ) or sorted((lp.header_addr, lp.end_addr) for lp in self.loops
                                  if lp.parent is None)
        regions = {"pre": 0, "between": 0, "post": 0}
        for size, addr, around in zip(self.block_sizes, self.block_addrs, self.block_loops):
            if around:
                continue
            if not tops or addr < tops[0][0]:
                regions["pre"] += size
            elif addr > tops[-1][1]:
                regions["post"] += size
            else:
                regions["between"] += size
        return regions


def _access_bytes(opcode: str) -> int:
    mods = opcode.split(".")[1:]
    for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mod in mods:
            return size
    return 4


def analyze(fn: SassFunction) -> SassAnalysis:
    instrs = fn.instrs
    n = len(instrs)
    index_of_addr = {ins.addr: i for i, ins in enumerate(instrs)}
    # Basic blocks: leaders are the entry, branch targets and what follows a branch/terminator.
    targets: Dict[int, Optional[int]] = {}
    leaders = {0} if n else set()
    for i, ins in enumerate(instrs):
        if ins.base in ("BRA", "BRX", "JMP", "JMX"):
            t = _branch_target(fn, ins, index_of_addr) if ins.base in ("BRA", "JMP") else None
            targets[i] = t
            if t is not None:
                leaders.add(t)
            if i + 1 < n:
                leaders.add(i + 1)
        elif ins.base in TERMINATORS and i + 1 < n:
            leaders.add(i + 1)
    leaders.update(idx for idx in fn.labels.values() if idx < n)
    starts = sorted(leaders)
    block_of = {}
    bounds = []
    for b, s in enumerate(starts):
        e = starts[b + 1] if b + 1 < len(starts) else n
        bounds.append((s, e))
        for i in range(s, e):
            block_of[i] = b
    succs: List[List[int]] = []
    for s, e in bounds:
        last = instrs[e - 1]
        out = []
        falls = True
        if last.base in ("BRA", "BRX", "JMP", "JMX"):
            t = targets.get(e - 1)
            if t is not None:
                out.append(block_of[t])
            falls = not _unconditional(last)
        elif last.base in TERMINATORS:
            falls = not _unconditional(last)
        if falls and e < n:
            out.append(block_of[e])
        succs.append(sorted(set(out)))
    # Reachable blocks (the trailing `BRA self` padding after EXIT is not).
    reach, stack = set(), [0] if bounds else []
    while stack:
        b = stack.pop()
        if b in reach:
            continue
        reach.add(b)
        stack.extend(succs[b])
    order = sorted(reach)
    preds: Dict[int, List[int]] = {b: [] for b in order}
    for b in order:
        for t in succs[b]:
            preds[t].append(b)
    # Dominators (iterative; the graphs have tens of blocks).
    dom = {b: set(order) for b in order}
    if order:
        dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for b in order[1:]:
            ps = [dom[p] for p in preds[b]]
            new = (set.intersection(*ps) if ps else set()) | {b}
            if new != dom[b]:
                dom[b], changed = new, True
    # Natural loops, merged by header.
    bodies: Dict[int, set] = {}
    irreducible = 0
    for b in order:
        for t in succs[b]:
            if t in dom[b]:
                body = bodies.setdefault(t, {t})
                work = [b]
                while work:
                    x = work.pop()
                    if x not in body:
                        body.add(x)
                        work.extend(preds[x])
            elif bounds[t][0] <= bounds[b][0]:
                irreducible += 1  # a backward jump that is not a loop (e.g. out-of-line code)
    loops = [Loop(h, frozenset(body)) for h, body in sorted(bodies.items())]
    for i, lp in enumerate(loops):
        containing = [j for j, other in enumerate(loops)
                      if j != i and lp.blocks < other.blocks]
        if containing:
            lp.parent = min(containing, key=lambda j: len(loops[j].blocks))
            loops[lp.parent].children.append(i)
    for lp in loops:
        depth, p = 1, lp.parent
        while p is not None:
            depth, p = depth + 1, loops[p].parent
        lp.depth = depth
        lp.header_addr = instrs[bounds[lp.header][0]].addr
        lp.end_addr = max(instrs[bounds[b][1] - 1].addr for b in lp.blocks)
    counts = {op: 0 for op in COUNTED_OPCODES}
    mma: Dict[str, int] = {}
    spill_st = spill_ld = total = 0
    block_sizes, block_addrs, block_loops = [], [], []
    for b in order:
        s, e = bounds[b]
        around = sorted((i for i, lp in enumerate(loops) if b in lp.blocks),
                        key=lambda i: loops[i].depth)
        block_sizes.append(e - s)
        block_addrs.append(instrs[s].addr)
        block_loops.append(tuple(around))
        total += e - s
        if around:
            loops[around[-1]].own_instrs += e - s
        for ins in instrs[s:e]:
            if ins.base in counts:
                counts[ins.base] += 1
            if ins.base == "STL":
                spill_st += _access_bytes(ins.opcode)
            elif ins.base == "LDL":
                spill_ld += _access_bytes(ins.opcode)
            if ins.base in MMA_OPCODES:
                mma[ins.opcode] = mma.get(ins.opcode, 0) + 1
                if around:
                    loops[around[-1]].own_mma += 1
                for i in around:
                    loops[i].mma_total += 1
    return SassAnalysis(fn.name, total, counts, mma, spill_st, spill_ld, block_sizes, block_addrs,
                        block_loops, loops, irreducible)


# ---------------------------------------------------------------------------------------------
# Trip counts and the per-tile estimate

@dataclass(frozen=True)
class Reduction:
    """One GEMM reduction of a kernel: `taps` filter taps of `channels` channels each."""
    channels: int
    taps: int = 1
    flat: bool = False

    def steps(self, block_k: int) -> int:
        """Main-loop trips (BLOCK_K steps) the reduction takes."""
        if self.flat:
            return math.ceil(self.taps * self.channels / block_k)
        return self.taps * math.ceil(self.channels / block_k)

    def useful(self) -> int:
        return self.taps * self.channels


@dataclass
class Estimate:
    instr_per_tile: Optional[float]
    k_steps: int
    structure: str
    trips: Dict[int, int]                     # loop index -> trips per enclosing trip
    roles: Dict[int, str]
    notes: List[str]
    error: Optional[str] = None


def estimate(sass: SassAnalysis, reductions: Sequence[Reduction], block_k: int) -> Estimate:
    """Instructions per warp per tile: every block's instructions x the trips of the loops
    around it. The MMA loop nests are matched, in address order, with the kernel's reductions
    (the conv, then the shortcut GEMM); each nest's shape decides its trip counts."""
    k_steps = sum(r.steps(block_k) for r in reductions)
    nests = sass.top_level_mma_nests()
    trips: Dict[int, int] = {}
    roles: Dict[int, str] = {}
    notes: List[str] = []
    shapes = []

    def fail(message: str) -> Estimate:
        return Estimate(None, k_steps, "unrecognized", trips, roles, notes, message)

    if len(nests) != len(reductions):
        return fail(f"{len(nests)} top-level loop nest(s) with an MMA, expected "
                    f"{len(reductions)} (one per reduction)")
    for n_index, (nest, red) in enumerate(zip(nests, reductions)):
        chain = [nest]
        while True:
            inner = [c for c in sass.loops[chain[-1]].children if sass.loops[c].mma_total]
            if not inner:
                break
            if len(inner) > 1:
                return fail(f"the MMA loop nest at 0x{sass.loops[nest].header_addr:x} holds "
                            f"{len(inner)} MMA loops side by side")
            chain.append(inner[0])
        name = "main" if n_index == 0 else "shortcut"
        if len(chain) == 1:
            trips[chain[0]] = red.steps(block_k)
            roles[chain[0]] = name
            shapes.append("flat loop" if red.flat else "single loop")
        elif len(chain) == 2 and not red.flat and red.taps > 1:
            trips[chain[0]] = red.taps
            trips[chain[1]] = math.ceil(red.channels / block_k)
            roles[chain[0]], roles[chain[1]] = "tap", name
            shapes.append("tap loop > channel loop")
        else:
            return fail(f"an MMA loop nest {len(chain)} deep for a reduction of {red.taps} "
                        f"tap(s){' (flat)' if red.flat else ''}")
    for i, lp in enumerate(sass.loops):
        if i not in trips:
            trips[i] = 1
            roles[i] = "other"
            notes.append(f"loop at 0x{lp.header_addr:x} ({lp.own_instrs} instr) has no MMA: "
                         "counted once")
    total = 0.0
    for size, around in zip(sass.block_sizes, sass.block_loops):
        mult = 1
        for i in around:
            mult *= trips[i]
        total += size * mult
    return Estimate(total, k_steps, " + ".join(shapes), trips, roles, notes)


def tensor_cycles(block_m: int, block_n: int, block_k: int, k_steps: int, dtype: str) -> float:
    """Tensor-core cycles of one tile's MMAs at the dense rate (padding included)."""
    return block_m * block_n * block_k * k_steps / DENSE_FMA_PER_CLK[dtype]


def issue_per_tensor(instr_per_tile: float, num_warps: int, cycles: float) -> float:
    """Issue cycles (1 instruction per clock per sub-partition, num_warps/4 warps on each) over
    the tensor-core cycles of the same tile."""
    return instr_per_tile * (num_warps / SUB_PARTITIONS) / cycles


def occupancy(regs: int, shared: int, num_warps: int) -> Tuple[int, str]:
    """(CTAs per SM, what limits it) for `regs` registers per thread and `shared` bytes of
    dynamic shared memory per CTA."""
    per_warp = max(1, math.ceil(regs * 32 / REG_ALLOC_UNIT)) * REG_ALLOC_UNIT
    warps_by_regs = (REGS_PER_SM // SUB_PARTITIONS // per_warp) * SUB_PARTITIONS
    limits = {"regs": warps_by_regs // num_warps,
              "smem": SMEM_PER_SM // (shared + SMEM_RESERVED_PER_CTA),
              "warps": MAX_WARPS_PER_SM // num_warps,
              "ctas": MAX_CTAS_PER_SM}
    best = min(limits.values())
    return best, "/".join(k for k, v in limits.items() if v == best)


# ---------------------------------------------------------------------------------------------
# The CUDA tools Triton bundles

def _tool(name: str) -> str:
    from triton import knobs
    tool = getattr(knobs.nvidia, name.replace("-", "_"), None)
    path = getattr(tool, "path", None) if tool is not None else None
    if path:
        return path
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def tool_versions(arch: int) -> Dict[str, str]:
    import triton
    out = subprocess.run([_tool("ptxas-blackwell" if arch >= 100 else "ptxas"), "--version"],
                         capture_output=True, text=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return {"triton": triton.__version__, "ptxas": m.group(1) if m else out.strip()[-40:]}


def resource_usage(cubin_path: str) -> Dict[str, int]:
    """REG, STACK, LOCAL, SHARED of the cubin's one function (cuobjdump -res-usage)."""
    out = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin_path], capture_output=True,
                         text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in fields.items()}


def disassemble(cubin_path: str) -> str:
    return subprocess.run([_tool("nvdisasm"), "-c", cubin_path], capture_output=True, text=True,
                          check=True).stdout


@dataclass
class KernelFacts:
    """Everything read off one cubin (shared by every record compiled to it)."""
    name: str
    hash: str
    num_warps: int
    num_stages: int
    shared: int
    regs: int
    stack: int
    sass: SassAnalysis
    constexprs: Dict[str, Any] = field(default_factory=dict)  # as the launch specialised them


def read_kernel(compiled) -> KernelFacts:
    """The facts of a triton CompiledKernel, from its cubin."""
    meta = compiled.metadata
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "k.cubin")
        Path(path).write_bytes(compiled.asm["cubin"])
        res = resource_usage(path)
        functions = [f for f in parse_sass(disassemble(path)) if f.instrs]
    fn = next((f for f in functions if f.name == meta.name), functions[0])
    names = compiled.src.fn.arg_names
    constexprs = {names[path[0]]: value for path, value in compiled.src.constants.items()
                  if len(path) == 1}
    return KernelFacts(meta.name, meta.hash, meta.num_warps, meta.num_stages, meta.shared,
                       res.get("REG", 0), res.get("STACK", 0) + res.get("LOCAL", 0), analyze(fn),
                       constexprs)


# ---------------------------------------------------------------------------------------------
# The problems: every distinct conv of the models, with its epilogue

@dataclass(frozen=True)
class Layer:
    """One fused conv of a model (batch BATCH, channels_last), as benchmarks/cases.py's
    LayerCase describes it."""
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: int
    padding: int
    epilogue: str  # "relu" | "residual" | "shortcut" | "none" (training: raw output)
    C2: int = 0
    H2: int = 0
    stride2: int = 1

    @property
    def P(self) -> int:
        return (self.H + 2 * self.padding - self.R) // self.stride + 1

    @property
    def Q(self) -> int:
        return (self.W + 2 * self.padding - self.S) // self.stride + 1

    @property
    def name(self) -> str:
        extra = {"relu": "", "none": "", "residual": " +res",
                 "shortcut": f" +ds{self.C2}s{self.stride2}"}[self.epilogue]
        return f"{self.C}@{self.H}->{self.K} {self.R}x{self.S} s{self.stride}{extra}"

    @property
    def flat(self) -> bool:
        from fastres.launch.conv import use_flat_reduction
        return use_flat_reduction(self.C, self.R, self.S)

    def reductions(self, block_k: int) -> List[Reduction]:
        """The kernel's reductions with this BLOCK_K. A flat one whose filter row (S*C elements)
        suits a step is the kernel's ROW_SPAN order (the report's tensors are channels_last):
        R steps of one filter row each, like R taps of S*C channels."""
        from fastres.launch.conv import row_span_fits

        if self.flat and row_span_fits(self.S, self.C, block_k):
            main = Reduction(self.S * self.C, self.R)
        else:
            main = Reduction(self.C, self.R * self.S, self.flat)
        return [main] + ([Reduction(self.C2)] if self.epilogue == "shortcut" else [])


def layers_from_cases(cases_module, models: Sequence[str]) -> Dict[Layer, List[str]]:
    """Distinct layers (-> the models that have them) from benchmarks/cases.py's layer_cases."""
    found: Dict[Layer, List[str]] = {}
    for model in models:
        for c in cases_module.layer_cases(model, BATCH):
            layer = Layer(c.C, c.H, c.W, c.K, c.R, c.S, c.stride, c.padding, c.epilogue, c.C2,
                          c.H2, c.stride2)
            found.setdefault(layer, []).append(model)
    return found


def layers_from_torchvision(models: Sequence[str]) -> Dict[Layer, List[str]]:
    """The same list derived from torchvision directly (no checkout): one batch-1 forward per
    model records every conv's input shape; a block's last conv takes the identity residual, or
    the downsample conv as the shortcut GEMM; the downsample convs are not layers of their own."""
    import torch
    import torchvision
    from torch import nn

    from fastres.nn.anatomy import BLOCK_STAGES, block_kind

    found: Dict[Layer, List[str]] = {}
    for model_name in models:
        model = torchvision.models.get_model(model_name, weights=None).eval()
        shapes: Dict[str, Tuple[int, ...]] = {}

        def recorder(path):
            def hook(module, args):  # returns None: the input goes on unchanged
                shapes.setdefault(path, tuple(args[0].shape))
            return hook

        hooks = [m.register_forward_pre_hook(recorder(path)) for path, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) or block_kind(m)]
        with torch.no_grad():
            model(torch.zeros(1, 3, 224, 224))
        for h in hooks:
            h.remove()
        for path, conv in model.named_modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            parent_path, _, leaf = path.rpartition(".")
            if parent_path.endswith("downsample"):
                continue
            parent = model.get_submodule(parent_path) if parent_path else model
            kind = block_kind(parent)
            _, C, H, W = shapes[path]
            epilogue, C2, H2, stride2 = "relu", 0, 0, 1
            if kind and leaf == BLOCK_STAGES[kind][-1]:
                if parent.downsample is None:
                    epilogue = "residual"
                else:
                    epilogue = "shortcut"
                    C2, H2 = shapes[parent_path][1], shapes[parent_path][2]
                    stride2 = parent.downsample[0].stride[0]
            layer = Layer(C, H, W, conv.out_channels, conv.kernel_size[0], conv.kernel_size[1],
                          conv.stride[0], conv.padding[0], epilogue, C2, H2, stride2)
            models_of = found.setdefault(layer, [])
            if model_name not in models_of:
                models_of.append(model_name)
    return found


def training_layers(layers: Dict[Layer, List[str]]) -> Dict[Layer, List[str]]:
    """The 3x3 and 1x1 convs as a training step runs them (raw output, no epilogue): every
    non-stem layer, and the downsample convs, which train as convs of their own."""
    found: Dict[Layer, List[str]] = {}
    for layer, models in layers.items():
        if layer.flat:
            continue
        convs = [Layer(layer.C, layer.H, layer.W, layer.K, layer.R, layer.S, layer.stride,
                       layer.padding, "none")]
        if layer.epilogue == "shortcut":
            convs.append(Layer(layer.C2, layer.H2, layer.H2, layer.K, 1, 1, layer.stride2, 0,
                               "none"))
        for conv in convs:
            models_of = found.setdefault(conv, [])
            models_of.extend(m for m in models if m not in models_of)
    return found


# ---------------------------------------------------------------------------------------------
# Compiling: real-sized tensors that are never touched

class Arena:
    """CPU tensors of any size and strides, all views of one untouched allocation (the
    allocator maps pages only when written, so batch-256 activations cost no memory)."""

    def __init__(self) -> None:
        self._storage = None
        self._bytes = 0

    def tensor(self, size, stride, dtype):
        import torch
        elem = torch.empty((), dtype=dtype).element_size()
        need = (sum((s - 1) * st for s, st in zip(size, stride)) + 1) * elem
        if need > self._bytes:
            self._bytes = max(need, 2 * self._bytes)
            self._storage = torch.empty(self._bytes, dtype=torch.uint8).untyped_storage()
        return torch.empty(0, dtype=dtype).set_(self._storage, 0, tuple(size), tuple(stride))

    def channels_last(self, N, C, H, W, dtype):
        return self.tensor((N, C, H, W), (H * W * C, 1, W * C, C), dtype)


TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def _torch_dtype(name: str):
    import torch
    return getattr(torch, TORCH_DTYPES[name])


def first_config(layer: Layer, dtype: str, stats: bool, arch: int) -> dict:
    import torch

    from fastres.launch import configs
    from fastres.launch.target import Target
    elem = torch.empty((), dtype=_torch_dtype(dtype)).element_size()
    return configs.candidate_configs(M=BATCH * layer.P * layer.Q, C=layer.C, K=layer.K, R=layer.R,
                                     S=layer.S, flat=layer.flat, elem_bytes=elem, stats=stats,
                                     target=Target.for_arch(arch))[0]


def launch_conv(arena: Arena, layer: Layer, dtype: str, variant: str, cfg: dict) -> None:
    """fused_conv2d as fastres's ops launch it for this layer (eval: folded bias + epilogue;
    training: no bias or ReLU, the statistics epilogue, the BN + ReLU prologue)."""
    import torch

    from fastres.launch.conv import fused_conv2d, stats_chunks
    from fastres.nn.folding import kernel_weight_layout
    dt = _torch_dtype(dtype)
    N, L = BATCH, layer
    x = arena.channels_last(N, L.C, L.H, L.W, dt)
    w = arena.channels_last(L.K, L.C, L.R, L.S, dt)
    if variant == "eval":
        w = kernel_weight_layout(w)  # as fastres's eval folding lays it out (the stem's padded rows)
    out = arena.channels_last(N, L.K, L.P, L.Q, dt)
    bias = residual = x2 = w2 = stats = prologue = None
    if variant == "eval":
        bias = arena.tensor((L.K,), (1,), torch.float32)
        if L.epilogue == "residual":
            residual = arena.channels_last(N, L.K, L.P, L.Q, dt)
        elif L.epilogue == "shortcut":
            x2 = arena.channels_last(N, L.C2, L.H2, L.H2, dt)
            w2 = arena.channels_last(L.K, L.C2, 1, 1, dt)
    else:
        chunks = stats_chunks(N * L.P * L.Q)
        stats = arena.tensor((chunks, 2, L.K), (2 * L.K, L.K, 1), torch.float32)
        if variant == "train-prologue-stats":
            prologue = (arena.tensor((L.C,), (1,), torch.float32),
                        arena.tensor((L.C,), (1,), torch.float32))
    fused_conv2d(x, w, bias, residual, x2, w2, out, (L.stride, L.stride), (L.padding, L.padding),
                 (1, 1), (L.stride2, L.stride2), variant == "eval", "tf32", prologue=prologue,
                 stats=stats, config=cfg)


def gemm_sizes(layer: Layer) -> Tuple[int, int, int]:
    """The conv's implicit GEMM: M = N*P*Q, N = K, K = C*R*S (+ C2, the shortcut's reduction
    into the same tile)."""
    return (BATCH * layer.P * layer.Q, layer.K,
            layer.C * layer.R * layer.S + (layer.C2 if layer.epilogue == "shortcut" else 0))


def launch_reference(arena: Arena, layer: Layer, dtype: str, cfg: dict) -> None:
    """kernels/reference_gemm.py on the layer's implicit GEMM and tile, B stored as the conv's
    weight is (reduction contiguous)."""
    import triton

    from fastres.kernels.reference_gemm import reference_gemm_kernel
    dt = _torch_dtype(dtype)
    M, N, K = gemm_sizes(layer)
    a = arena.tensor((M, K), (K, 1), dt)
    b = arena.tensor((K, N), (1, K), dt)
    c = arena.tensor((M, N), (N, 1), dt)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    reference_gemm_kernel[grid](
        a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
        c.stride(1), INPUT_PRECISION="tf32", BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])


# ---------------------------------------------------------------------------------------------
# Records

def kernel_numbers(facts: KernelFacts, reductions: Sequence[Reduction], cfg: dict, dtype: str,
                   grid_tiles: int, useful_n: float) -> Dict[str, Any]:
    """The per-kernel numbers of a record (also those of its reference GEMM)."""
    sass = facts.sass
    est = estimate(sass, reductions, cfg["BLOCK_K"])
    ctas, limiter = occupancy(facts.regs, facts.shared, facts.num_warps)
    cycles = tensor_cycles(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], est.k_steps, dtype)
    regions = sass.outside_regions()
    loops = []
    for i, lp in sorted(enumerate(sass.loops), key=lambda t: t[1].header_addr):
        loops.append({"addr": f"0x{lp.header_addr:x}", "depth": lp.depth,
                      "role": est.roles.get(i, "other"), "trips": est.trips.get(i),
                      "instr": lp.own_instrs, "mma": lp.own_mma})
    useful_k = sum(r.useful() for r in reductions) / (est.k_steps * cfg["BLOCK_K"])
    return {
        "kernel": facts.name, "hash": facts.hash[:16],
        "regs": facts.regs, "stack_bytes": facts.stack,
        "spill_store_bytes": sass.spill_store_bytes, "spill_load_bytes": sass.spill_load_bytes,
        "shared_bytes": facts.shared, "ctas_per_sm": ctas, "cta_limit": limiter,
        "warps_per_sm": ctas * facts.num_warps,
        "counts": dict(sass.counts), "mma": dict(sass.mma_opcodes),
        "instr_total": sass.instr_count, "structure": est.structure, "loops": loops,
        "outside": regions, "k_steps": est.k_steps,
        "instr_per_tile": None if est.instr_per_tile is None else round(est.instr_per_tile),
        "tensor_cycles": round(cycles, 1),
        "issue_per_tensor": (None if est.instr_per_tile is None else
                             round(issue_per_tensor(est.instr_per_tile, facts.num_warps, cycles),
                                   3)),
        "useful_mma": round(useful_n * useful_k, 3),
        "grid": grid_tiles, "waves": round(grid_tiles / (ctas * NUM_SMS), 2) if ctas else None,
        "notes": est.notes + ([est.error] if est.error else [])
        + ([f"{sass.irreducible_edges} backward jump(s) that close no loop (out-of-line code)"]
           if sass.irreducible_edges else []),
    }


def record_key(layer: Layer, dtype: str, variant: str) -> str:
    return f"{layer.name} {dtype} {variant}"


def config_label(cfg: dict) -> str:
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} "
            f"s{cfg['num_stages']}")


@dataclass
class SassReport:
    arch: int
    quick: bool
    versions: Dict[str, str]
    layer_source: str
    records: List[Dict[str, Any]] = field(default_factory=list)
    failures: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    commit: Optional[str] = None

    def to_json(self) -> dict:
        return {"arch": self.arch, "quick": self.quick, "batch": BATCH, **self.versions,
                "commit": self.commit, "layer_source": self.layer_source,
                "seconds": round(self.seconds, 1), "records": self.records,
                "failures": [{"what": w, "error": e} for w, e in self.failures]}


def problems(layers: Dict[Layer, List[str]], quick: bool
             ) -> List[Tuple[Layer, List[str], str, str]]:
    """(layer, models, dtype, variant) in report order: eval per dtype, then training (fp16)."""
    dtypes = ("fp16",) if quick else DTYPES
    out = [(layer, models, dtype, "eval") for dtype in dtypes for layer, models in layers.items()]
    train = training_layers(layers)
    for variant in VARIANTS[1:]:
        out += [(layer, models, "fp16", variant) for layer, models in train.items()]
    return out


def run(arch: int = 90, quick: bool = False, cases_module=None, commit: Optional[str] = None,
        log: Callable[[str], None] = print) -> SassReport:
    """Compile and measure every problem (see the module docstring)."""
    from fastres.kernels.common import INTERPRETED
    from fastres.launch.conv import row_tiles
    from fastres.launch.target import Target
    from fastres.tools import compile_check

    if INTERPRETED:
        raise RuntimeError("compile-check --sass needs the real Triton JIT: unset TRITON_INTERPRET "
                           "before fastres is imported")
    start = time.perf_counter()
    models = ("resnet50",) if quick else MODELS
    if cases_module is not None:
        layers, source = layers_from_cases(cases_module, models), "benchmarks/cases.py"
    else:
        layers, source = layers_from_torchvision(models), "torchvision (no checkout)"
    report = SassReport(arch, quick, tool_versions(arch), source, commit=commit)
    arena = Arena()
    captured: List[Any] = []
    facts: Dict[str, KernelFacts] = {}
    holder = compile_check.CompileReport(arch)
    holder.on_compile = captured.append

    def compile_one(launch: Callable[[], None]) -> KernelFacts:
        captured.clear()
        launch()
        compiled = captured[-1]
        if compiled.hash not in facts:
            facts[compiled.hash] = read_kernel(compiled)
        return facts[compiled.hash]

    todo = problems(layers, quick)
    log(f"compile-check --sass: {len(todo)} kernels for sm_{arch} (layers from {source})")
    with compile_check._compile_only(Target.for_arch(arch), holder):
        for layer, models, dtype, variant in todo:
            what = record_key(layer, dtype, variant)
            try:
                cfg = first_config(layer, dtype, variant != "eval", arch)
                conv = compile_one(lambda: launch_conv(arena, layer, dtype, variant, cfg))
                ref = compile_one(lambda: launch_reference(arena, layer, dtype, cfg))
                M, N, Kg = gemm_sizes(layer)
                useful_n = N / (math.ceil(N / cfg["BLOCK_N"]) * cfg["BLOCK_N"])
                width = conv.constexprs.get("TILE_W", 0)  # what the launch chose
                rows = row_tiles(BATCH, layer.P, layer.Q, cfg["BLOCK_M"], width)
                if width:  # output patches: rows outside the image are computed and dropped
                    useful_n *= M / (rows * cfg["BLOCK_M"])
                tiles = rows * math.ceil(N / cfg["BLOCK_N"])
                numbers = kernel_numbers(conv, layer.reductions(cfg["BLOCK_K"]), cfg, dtype, tiles,
                                         useful_n)
                if width:
                    by = "TMA over " if conv.constexprs.get("TMA") else ""
                    numbers["notes"].append(f"{by}{cfg['BLOCK_M'] // width}x{width} output "
                                            f"patches: useful MMA {numbers['useful_mma']}")
                ref_numbers = kernel_numbers(ref, [Reduction(Kg)], cfg, dtype, tiles, useful_n)
                ratio = (None if None in (numbers["instr_per_tile"], ref_numbers["instr_per_tile"])
                         else round(numbers["instr_per_tile"] / ref_numbers["instr_per_tile"], 2))
                report.records.append({
                    "key": what, "layer": layer.name, "models": models, "dtype": dtype,
                    "variant": variant, "geometry": {k: getattr(layer, k) for k in (
                        "C", "H", "W", "K", "R", "S", "stride", "padding", "epilogue", "C2", "H2",
                        "stride2", "P", "Q")},
                    "flat": layer.flat, "config": cfg, "config_label": config_label(cfg),
                    **numbers, "ref": ref_numbers, "ratio_to_ref": ratio})
            except Exception:  # noqa: BLE001 - every failure is reported, then the run fails
                report.failures.append((what, traceback.format_exc(limit=-4)))
    report.seconds = time.perf_counter() - start
    log(f"compile-check --sass: {len(report.records)} records, {len(facts)} distinct cubins, "
        f"{report.seconds:.0f} s")
    return report


# ---------------------------------------------------------------------------------------------
# Tables

def _spill(r) -> str:
    return f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"


def _num(v, fmt="{}") -> str:
    return "-" if v is None else fmt.format(v)


TABLE_COLUMNS = ("layer", "models", "config", "regs", "spill st/ld B", "smem KiB", "CTAs/SM (limit)",
                 "HGMMA", "LDGSTS", "UTMALDG", "LDG", "STG", "LDL/STL", "BAR", "structure",
                 "main loop instr", "instr/tile", "issue/tensor", "ref instr/tile",
                 "ref issue/tensor", "ratio to ref")


def table_row(r: dict) -> List[str]:
    c = r["counts"]
    main = [str(lp["instr"]) for lp in r["loops"] if lp["role"] in ("main", "shortcut")]
    models = ",".join(m.replace("resnet", "r") for m in r["models"])
    return [r["layer"], models, r["config_label"], str(r["regs"]), _spill(r),
            f"{(r['shared_bytes'] + SMEM_RESERVED_PER_CTA) / 1024:.0f}",
            f"{r['ctas_per_sm']} ({r['cta_limit']})", str(c["HGMMA"]), str(c["LDGSTS"]),
            str(c["UTMALDG"]), str(c["LDG"]), str(c["STG"]), f"{c['LDL']}/{c['STL']}",
            str(c["BAR"]), r["structure"], "+".join(main) or "-", _num(r["instr_per_tile"]),
            _num(r["issue_per_tensor"], "{:.2f}"), _num(r["ref"]["instr_per_tile"]),
            _num(r["ref"]["issue_per_tensor"], "{:.2f}"), _num(r["ratio_to_ref"], "{:.2f}")]


def markdown(report: SassReport) -> str:
    v = report.versions
    lines = [f"# Static SASS report, sm_{report.arch} (batch {BATCH}, channels_last, first "
             "candidate config)", "",
             f"triton {v['triton']}, ptxas {v['ptxas']}"
             + (f", commit {report.commit}" if report.commit else "")
             + f"; layers from {report.layer_source}"
             + ("; --quick (fp16, ResNet-50)" if report.quick else "") + ".",
             "Generated by `python -m fastres compile-check --sass` (docs/compile-check.md): "
             "static counts and straight-line estimates, no GPU run. instr/tile = estimated "
             "instructions per warp per output tile; issue/tensor > 1 means issuing them takes "
             "longer than the tile's MMAs at the dense tensor-core rate; ratio to ref = instr/tile "
             "over that of kernels/reference_gemm.py on the same tile and implicit GEMM; models: r18 = "
             "ResNet-18, r50 = ResNet-50.", ""]
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for r in report.records:
        groups.setdefault((r["variant"], r["dtype"]), []).append(r)
    for (variant, dtype), rows in groups.items():
        lines += [f"## {variant} {dtype}" + (" (tf32)" if dtype == "fp32" else ""), "",
                  "| " + " | ".join(TABLE_COLUMNS) + " |",
                  "|" + "---|" * len(TABLE_COLUMNS)]
        lines += ["| " + " | ".join(table_row(r)) + " |" for r in rows]
        lines.append("")
    notes = sorted({n for r in report.records for n in r["notes"]})
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    for what, error in report.failures:
        lines += [f"FAILED {what}:", "```", error.rstrip(), "```", ""]
    return "\n".join(lines)


SUMMARY_COLUMNS = ("layer", "dtype", "variant", "config", "regs", "spill", "CTAs",
                   "instr/tile", "issue/tensor", "ref", "ratio")


def summary(report: SassReport) -> str:
    """The short table printed on the terminal (sass.md has every column)."""
    rows = [[r["layer"], r["dtype"], r["variant"], r["config_label"], str(r["regs"]), _spill(r),
             str(r["ctas_per_sm"]), _num(r["instr_per_tile"]), _num(r["issue_per_tensor"], "{:.2f}"),
             _num(r["ref"]["instr_per_tile"]), _num(r["ratio_to_ref"], "{:.2f}")]
            for r in report.records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(SUMMARY_COLUMNS)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*SUMMARY_COLUMNS)] + [fmt.format(*row) for row in rows])


def write(report: SassReport, out: Path) -> Tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    js, md = out / "sass.json", out / "sass.md"
    js.write_text(json.dumps(report.to_json(), indent=1) + "\n")
    md.write_text(markdown(report))
    return js, md


# ---------------------------------------------------------------------------------------------
# The gate

def baseline_entry(record: dict) -> dict:
    """What the baseline keeps of a record: the gated numbers and a few for context."""
    return {"regs": record["regs"], "spill_store_bytes": record["spill_store_bytes"],
            "spill_load_bytes": record["spill_load_bytes"], "hgmma": record["counts"]["HGMMA"],
            "utmaldg": record["counts"]["UTMALDG"], "instr_per_tile": record["instr_per_tile"],
            "issue_per_tensor": record["issue_per_tensor"],
            "ratio_to_ref": record["ratio_to_ref"], "config": record["config_label"]}


def baseline_json(report: SassReport, previous: Optional[dict] = None) -> dict:
    """The baseline file's content; a --quick bless keeps the previous baseline's other
    records (same versions only, checked by the caller)."""
    records = dict(previous["records"]) if previous else {}
    records.update({r["key"]: baseline_entry(r) for r in report.records})
    return {"arch": report.arch, **report.versions, "commit": report.commit, "batch": BATCH,
            "records": dict(sorted(records.items()))}


def compare(baseline: dict, fresh: dict, tolerance: float = INSTR_TOLERANCE
            ) -> Tuple[bool, List[str]]:
    """(ok, lines): the fresh baseline-style records against the baseline's. Fails on added
    spill bytes, an HGMMA or UTMALDG count fallen to 0, more than `tolerance` more
    instructions per tile (only under the baseline's triton and ptxas versions), a missing
    estimate, or a kernel the baseline does not have."""
    same = all(baseline.get(k) == fresh.get(k) for k in ("triton", "ptxas"))
    ok, lines, unchanged = True, [], 0
    base, now = baseline["records"], fresh["records"]
    for key in sorted(now):
        got, exp = now[key], base.get(key)
        if exp is None:
            ok = False
            lines.append(f"NEW (not in the baseline)  {key}")
            continue
        bad, good = [], []
        for k in ("spill_store_bytes", "spill_load_bytes"):
            if got[k] > exp[k]:
                bad.append(f"{k} {exp[k]} -> {got[k]}")
            elif got[k] < exp[k]:
                good.append(f"{k} {exp[k]} -> {got[k]}")
        for k in ("hgmma", "utmaldg"):
            if exp[k] > 0 and got[k] == 0:
                bad.append(f"{k.upper()} lost ({exp[k]} -> 0)")
        if same:
            e, g = exp["instr_per_tile"], got["instr_per_tile"]
            if g is None and e is not None:
                bad.append("instructions per tile could not be estimated")
            elif e is not None and g is not None:
                change = g / e - 1
                if change > tolerance:
                    bad.append(f"instr/tile {e} -> {g} ({100 * change:+.1f}%)")
                elif change < -tolerance:
                    good.append(f"instr/tile {e} -> {g} ({100 * change:+.1f}%)")
        info = ([f"config {exp.get('config')} -> {got.get('config')}"]
                if got.get("config") != exp.get("config") else [])
        if bad:
            ok = False
            lines.append(f"REGRESSION  {key}: " + "; ".join(bad + good + info))
        elif good:
            lines.append(f"improvement {key}: " + "; ".join(good + info))
        elif info:
            lines.append(f"changed     {key}: " + "; ".join(info))
        else:
            unchanged += 1
    missing = sorted(set(base) - set(now))
    lines.append(f"{unchanged} kernel(s) unchanged (within +-{100 * tolerance:.0f}% instr/tile, "
                 f"no added spills, HGMMA/UTMALDG kept)"
                 + (f"; {len(missing)} baseline kernel(s) not measured in this run" if missing
                    else ""))
    if not same:
        lines.append(f"note: the baseline was blessed under triton {baseline.get('triton')} / "
                     f"ptxas {baseline.get('ptxas')}, this is triton {fresh.get('triton')} / "
                     f"ptxas {fresh.get('ptxas')}: only spills, HGMMA and UTMALDG are compared, "
                     "not instruction counts")
    return ok, lines


def gate(report: SassReport, baseline_path: Path, bless: bool) -> int:
    """Check the report against the baseline (exit code 0/1), or bless it."""
    fresh = baseline_json(report)
    if report.failures:
        print(f"compile-check --sass: {len(report.failures)} kernel(s) failed to compile or "
              "analyse; nothing compared or blessed")
        return 1
    if bless:
        previous = None
        if report.quick and baseline_path.is_file():
            previous = json.loads(baseline_path.read_text())
            if any(previous.get(k) != fresh[k] for k in ("triton", "ptxas", "arch")):
                print(f"compile-check --sass --bless --quick: {baseline_path} was blessed under "
                      "other versions; bless a full run (without --quick) instead")
                return 1
        data = baseline_json(report, previous)
        baseline_path.parent.mkdir(parents=True, exist_ok=True)
        baseline_path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"compile-check --sass: blessed {len(report.records)} kernel(s) into "
              f"{baseline_path} ({len(data['records'])} in all)")
        return 0
    if not baseline_path.is_file():
        print(f"compile-check --sass --gate: no baseline at {baseline_path}; create it with "
              "`python -m fastres compile-check --sass --bless` (a full run) and commit it")
        return 1
    ok, lines = compare(json.loads(baseline_path.read_text()), fresh)
    print("\n".join(lines))
    print("sass gate: PASS" if ok else
          f"sass gate: FAIL (against {baseline_path}; if the change is intended, bless it with "
          "`python -m fastres compile-check --sass --bless` and commit the baseline)")
    return 0 if ok else 1


def main(arch: int, quick: bool, out: Path, gate_check: bool, bless: bool,
         baseline_path: Optional[Path], cases_module=None, commit: Optional[str] = None,
         no_baseline_reason: Optional[str] = None) -> int:
    """The command: measure, write DIR/sass.json and DIR/sass.md, print the table, then gate
    or bless when asked."""
    report = run(arch, quick, cases_module, commit)
    js, md = write(report, out)
    print(summary(report))
    for what, error in report.failures:
        print(f"FAILED {what}:\n{error}")
    print(f"wrote {js} and {md}")
    if not (gate_check or bless):
        return 1 if report.failures else 0
    if baseline_path is None:
        print(no_baseline_reason or "compile-check --sass: no baseline path")
        return 2
    return gate(report, baseline_path, bless)

