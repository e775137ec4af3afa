"""The fused conv kernel's tuning configurations: the one place that reads conv_configs.json and
decides which configs a problem may run with on a target.

Used alike by the autotuner on a GPU (its early_config_prune), by FASTRES_AUTOTUNE=0 (the first
candidate, untimed), and by `python -m fastres compile-check` (every config, on its target).

The table's classes are tried in order; the first whose conditions the problem meets supplies
the candidates: its "configs" for fp16/bf16, its "configs_fp32" for fp32 (whose operands take
twice the shared memory and registers), minus those whose pipelined tiles do not fit the
target's shared memory, and minus those whose BLOCK_N exceeds the problem's K (half an MMA or
more would compute padding) while another is left. A launch with the batch-statistics epilogue
needs BLOCK_M to be a multiple of STATS_CHUNK.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import triton

from fastres.launch.target import Target, current_target

CONFIG_FILE = Path(__file__).with_name("conv_configs.json")
MIN_BLOCK = 16  # tl.dot needs every block dimension >= 16 to compile for a GPU
STATS_CHUNK = 64  # output rows per batch-statistics partial (STATS needs BLOCK_M % 64 == 0)

# Shared memory the epilogue needs beside the operand staging, as compiled for sm_90 by
# `python -m fastres compile-check`: at most 1 KiB plain; with the STATS reductions 8-9 KiB for
# tiles up to 128x64 and 33 KiB for 128x128 and 128x256. Estimated (from above) as 2 KiB, plus
# 2 bytes per tile element with STATS.
EPILOGUE_SHARED_BYTES = 2 * 1024
_META_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")


def load_config_table(path: Path = CONFIG_FILE) -> dict:
    """The table at `path`, checked (every block dimension >= MIN_BLOCK)."""
    with open(path) as f:
        table = json.load(f)
    for entry in table["classes"]:
        for cfg in entry["configs"] + entry["configs_fp32"]:
            for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                if cfg[key] < MIN_BLOCK:
                    raise ValueError(f"{path}: {key}={cfg[key]} < {MIN_BLOCK} in class {entry['name']}")
    return table


_table_cache: dict = {}


def config_table() -> dict:
    """The shipped table, read once."""
    if "table" not in _table_cache:
        _table_cache["table"] = load_config_table()
    return _table_cache["table"]


def shape_class(table: dict, *, M: int, C: int, K: int, R: int, S: int, flat: bool) -> str:
    """Name of the first class in the table whose conditions the problem meets."""
    facts = dict(M=M, C=C, K=K, R=R, S=S, flat=flat)
    for entry in table["classes"]:
        ok = True
        for key, cond in entry.get("when", {}).items():
            value = facts[key]
            if isinstance(cond, dict):
                ok &= value >= cond.get("min", value) and value <= cond.get("max", value)
            else:
                ok &= value == cond
        if ok:
            return entry["name"]
    raise LookupError("conv_configs.json has no catch-all class")


def config_id(cfg: dict) -> tuple:
    return tuple(cfg[k] for k in _META_KEYS) + (cfg["num_warps"], cfg["num_stages"])


def launch_meta(cfg: dict) -> dict:
    """The keyword arguments a launch with this config passes (block sizes, warps, stages)."""
    return dict({k: cfg[k] for k in _META_KEYS}, num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])


def fits_shared_memory(block_m: int, block_n: int, block_k: int, num_stages: int,
                       elem_bytes: int, stats: bool = False,
                       target: Optional[Target] = None) -> bool:
    """Whether a config's pipelined operand tiles (num_stages copies of the BLOCK_M x BLOCK_K
    and BLOCK_K x BLOCK_N tiles) and its epilogue fit the target's shared memory (default: the
    current target). A config that fits in fp16 can fail to compile in fp32."""
    target = target or current_target()
    staging = num_stages * (block_m * block_k + block_k * block_n) * elem_bytes
    epilogue = EPILOGUE_SHARED_BYTES + (2 * block_m * block_n if stats else 0)
    return staging + epilogue <= target.shared_memory_limit


def _fits(cfg: dict, elem_bytes: int, stats: bool, target: Target) -> bool:
    return fits_shared_memory(cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_stages"],
                              elem_bytes, stats, target)


def class_configs(entry: dict, elem_bytes: int) -> List[dict]:
    """A class's configs for operands of elem_bytes bytes (4: fp32)."""
    return entry["configs_fp32"] if elem_bytes == 4 else entry["configs"]


def all_configs(table: Optional[dict] = None, elem_bytes: Optional[int] = None) -> List[dict]:
    """Every config of the table once, in table order (only those for operands of elem_bytes
    bytes, if given)."""
    seen, configs = set(), []
    for entry in (table or config_table())["classes"]:
        lists = ([class_configs(entry, elem_bytes)] if elem_bytes is not None
                 else [entry["configs"], entry["configs_fp32"]])
        for cfg in (c for group in lists for c in group):
            if config_id(cfg) not in seen:
                seen.add(config_id(cfg))
                configs.append(cfg)
    return configs


def candidate_configs(*, M: int, C: int, K: int, R: int, S: int, flat: bool, elem_bytes: int,
                      stats: bool, target: Optional[Target] = None,
                      table: Optional[dict] = None) -> List[dict]:
    """The configs this problem may run with on `target`, best guess first: its class's that
    fit, without those whose BLOCK_N exceeds K (half an MMA or more would compute padding)
    unless no other is left; with stats, only BLOCK_M % STATS_CHUNK == 0 (from any class if its
    own has none); never empty while some config fits."""
    table = table or config_table()
    target = target or current_target()
    fits = [c for c in all_configs(table, elem_bytes) if _fits(c, elem_bytes, stats, target)]
    name = shape_class(table, M=M, C=C, K=K, R=R, S=S, flat=flat)
    own = class_configs(next(e for e in table["classes"] if e["name"] == name), elem_bytes)
    kept = [c for c in own if c in fits]
    kept = [c for c in kept if c["BLOCK_N"] <= max(K, MIN_BLOCK)] or kept
    stats_ok = [c for c in fits if c["BLOCK_M"] % STATS_CHUNK == 0]
    if stats:
        kept = [c for c in (kept or fits) if c["BLOCK_M"] % STATS_CHUNK == 0]
    return kept or stats_ok[:1]


def all_tuning_configs(pre_hook=None) -> list:
    """Every curated config once, as triton.Config objects (the autotuner's full list), each
    with pre_hook (run before each launch with that config)."""
    return [triton.Config({k: c[k] for k in _META_KEYS}, num_warps=c["num_warps"],
                          num_stages=c["num_stages"], pre_hook=pre_hook) for c in all_configs()]


def prune_to_shape_class(configs, named_args, **kwargs):
    """The autotuner's early_config_prune: the triton.Configs among `configs` that
    candidate_configs() allows for this launch. named_args holds the launch's positional
    arguments, kwargs its constexprs."""
    args = {**named_args, **kwargs}
    allowed = candidate_configs(
        M=args["N"] * args["P"] * args["Q"], C=args["C"], K=args["K"], R=args["R"], S=args["S"],
        flat=args["FLAT_C"] > 0, elem_bytes=args["x_ptr"].element_size(),
        stats=bool(args.get("STATS")))
    wanted = [config_id(c) for c in allowed]
    by_id = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["GROUP_M"],
              c.num_warps, c.num_stages): c for c in configs}
    return [by_id[i] for i in wanted if i in by_id]
