"""`python -m fastres bench`: run the pytest-benchmark suites and turn them into a report.

It runs benchmarks/test_{layers,blocks,models}.py in-process with the chosen options, shows a
progress bar, then prints one table row per (level, case, dtype) - each provider's median time,
fastres's speedup over eager channels_last and over the best other provider, and fastres's
fraction of the roofline floor - and writes to the output folder:
  raw.json      pytest-benchmark's JSON (extra_info holds every derived number)
  results.json  the table rows, with device, versions and commit
  results.csv   the same rows
  speedup.png   fastres speedup per case and roofline fraction (needs matplotlib)
Needs a source checkout (the suites live in benchmarks/, which is not installed).
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
LEVEL_FILES = {"layer": "test_layers.py", "block": "test_blocks.py", "model": "test_models.py",
               "train": "test_train.py"}
PROVIDER_ORDER = ("eager_nchw", "eager_cl", "eager_folded", "compile", "compile_max_autotune", "fastres")


class _Progress:
    """A one-line progress bar over the collected benchmarks (a pytest plugin)."""

    def __init__(self, stream=sys.stderr) -> None:
        self.total = self.done = 0
        self.start = time.time()
        self.stream = stream

    def pytest_collection_finish(self, session):
        self.total = len(session.items)

    def pytest_runtest_logreport(self, report):
        if report.when != "call" and not (report.when == "setup" and report.skipped):
            return
        self.done += 1
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        name = report.nodeid.split("[", 1)[-1].rstrip("]")[:60]
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                          f"{time.time() - self.start:6.0f} s  {name:<60}")
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def run_suites(out: Path, levels: List[str], extra_args: List[str]) -> int:
    import pytest

    files = [str(ROOT / "benchmarks" / LEVEL_FILES[level]) for level in levels]
    args = files + ["-q", "-p", "no:cacheprovider", "--benchmark-disable-gc",
                    f"--benchmark-json={out / 'raw.json'}", "--benchmark-columns=median",
                    "-o", "console_output_style=classic"] + extra_args
    return pytest.main(args, plugins=[_Progress()])


def rows_from_raw(raw: dict) -> List[Dict]:
    groups: Dict[tuple, Dict[str, dict]] = {}
    for bench in raw["benchmarks"]:
        info = bench["extra_info"]
        groups.setdefault((info["level"], info["case"], info["dtype"]), {})[info["provider"]] = info
    rows = []
    for (level, case, dtype), by_provider in groups.items():
        row = {"level": level, "case": case, "dtype": dtype}
        for p in PROVIDER_ORDER:
            if p in by_provider:
                row[f"{p}_ms"] = by_provider[p]["median_ms"]
        fast = by_provider.get("fastres")
        if fast:
            others = {p: i["median_ms"] for p, i in by_provider.items() if p != "fastres"}
            row["fastres_roofline_fraction"] = fast["roofline_fraction"]
            row["fastres_tflops"] = fast["tflops"]
            row["fastres_gbps"] = fast["gbps"]
            if "eager_cl" in others:
                row["speedup_vs_eager_cl"] = others["eager_cl"] / fast["median_ms"]
            if others:
                best = min(others, key=others.get)
                row["best_other"] = best
                row["speedup_vs_best_other"] = others[best] / fast["median_ms"]
        rows.append(row)
    return rows


def format_table(rows: List[Dict]) -> str:
    present = [p for p in PROVIDER_ORDER if any(f"{p}_ms" in r for r in rows)]
    head = f"{'level':<11} {'case':<44} {'dtype':<8} " + " ".join(f"{p[:12]:>12}" for p in present) \
        + f" {'vs eager_cl':>11} {'vs best':>8} {'roofline':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{r[f'{p}_ms']:12.3f}" if f"{p}_ms" in r else f"{'-':>12}" for p in present)
        vs_cl = f"{r['speedup_vs_eager_cl']:10.2f}x" if "speedup_vs_eager_cl" in r else f"{'-':>11}"
        vs_best = f"{r['speedup_vs_best_other']:7.2f}x" if "speedup_vs_best_other" in r else f"{'-':>8}"
        roof = f"{100 * r['fastres_roofline_fraction']:7.1f}%" if "fastres_roofline_fraction" in r else f"{'-':>8}"
        lines.append(f"{r['level']:<11} {r['case'][:44]:<44} {r['dtype']:<8} {cells} {vs_cl} {vs_best} {roof}")
    lines.append("(times: median ms per call; vs: fastres speedup; roofline: fastres's fraction of "
                 "max(FLOP floor, byte floor) at the peaks measured in this run)")
    return "\n".join(lines)


def plot(rows: List[Dict], path: Path) -> Optional[str]:
    """Bar chart of fastres's speedup over eager channels_last and its roofline fraction."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    rows = [r for r in rows if "speedup_vs_eager_cl" in r]
    if not rows:
        return "no fastres-vs-eager_cl pairs to plot"
    labels = [f"{r['case']} {r['dtype']}" for r in rows]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(rows) + 3), 8), sharex=True)
    axes[0].bar(range(len(rows)), [r["speedup_vs_eager_cl"] for r in rows], color="tab:blue")
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    axes[0].set_ylabel("fastres speedup vs eager channels_last")
    axes[1].bar(range(len(rows)), [100 * r["fastres_roofline_fraction"] for r in rows], color="tab:green")
    axes[1].set_ylabel("fastres % of roofline floor")
    axes[1].set_xticks(range(len(rows)))
    axes[1].set_xticklabels(labels, rotation=75, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def environment() -> dict:
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run(out: Path, levels: List[str], extra_args: List[str]) -> int:
    if not (ROOT / "benchmarks" / "conftest.py").is_file():
        print(f"bench: the suites live in a source checkout's benchmarks/ folder, not found next to "
              f"this fastres ({ROOT}); run it from a checkout (pip install -e .)")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    code = run_suites(out, levels, extra_args)
    raw_path = out / "raw.json"
    if not raw_path.is_file():
        print(f"bench: the suites wrote no results (pytest exit code {code})")
        return code or 1
    rows = rows_from_raw(json.loads(raw_path.read_text()))
    env = environment()
    print(f"\n{env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit'][:12]}")
    print(format_table(rows))
    (out / "results.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("level", "case", "dtype"), k))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    note = plot(rows, out / "speedup.png")
    print(f"bench: wrote raw.json, results.json, results.csv{'' if note else ', speedup.png'} to {out}"
          + (f" ({note})" if note else ""))
    return code
