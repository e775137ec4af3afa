"""`python -m fastres bench`: run the pytest-benchmark suites and turn them into a report.

It runs benchmarks/test_{layers,blocks,models}.py in-process with the chosen options, shows a
progress bar, then prints one table row per (level, case, dtype) - each provider's median time,
fastres's speedup over eager channels_last and over the best other provider, and fastres's
fraction of the roofline floor (n/a on a CPU; flagged INVALID, never printed, where the floor
exceeds the measured time) - and writes to the output folder:
  raw.json      pytest-benchmark's JSON (extra_info holds every derived number)
  results.json  the table rows, with device, versions and commit
  results.csv   the same rows
  speedup.png   fastres speedup per case and roofline fraction (needs matplotlib)
A checkout-only tool: the suites live beside it in benchmarks/, which is not installed, and
`python -m fastres bench` loads this file from the source checkout.
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

BENCHMARKS = Path(__file__).resolve().parent
LEVEL_FILES = {"layer": "test_layers.py", "block": "test_blocks.py", "model": "test_models.py",
               "train": "test_train.py"}
PROVIDER_ORDER = ("eager_nchw", "eager_cl", "eager_folded", "compile", "compile_max_autotune", "fastres")

CPU_ROOFLINE_NOTE = ("n/a on a CPU: no measured peak bounds these cases (oneDNN's convolutions "
                     "can outrun a timed matmul, and the inputs sit in cache, faster than a DRAM "
                     "copy), so no floor is computed")


def roofline(flops: float, traffic: float, median_ms: float, peak_flops: Optional[float],
             peak_bytes: Optional[float]) -> Dict:
    """A result's roofline fields (the suites' extra_info): the floor, max(flops / peak_flops,
    traffic / peak_bytes) in ms, and the fraction of it reached, floor / median_ms, with a status.
    The floor bounds the time from below only if the peaks bound the rates from above, so:
      "n/a"      no peaks (None: a CPU run), no floor, no fraction;
      "invalid"  the floor exceeds the measured time, which proves a peak too low: a bug in the
                 peak measurement, reported as such, not as a fraction above 100%;
      "ok"       the fraction, at most 1."""
    if peak_flops is None or peak_bytes is None:
        return dict(roofline_status="n/a", roofline_floor_ms=None, roofline_fraction=None,
                    roofline_note=CPU_ROOFLINE_NOTE)
    floor_ms = max(flops / peak_flops, traffic / peak_bytes) * 1e3
    if floor_ms > median_ms:
        return dict(roofline_status="invalid", roofline_floor_ms=floor_ms, roofline_fraction=None,
                    roofline_note=f"floor {floor_ms:.4g} ms > measured {median_ms:.4g} ms: a peak "
                                  f"measured in this run is no peak (benchmarks/conftest.py)")
    return dict(roofline_status="ok", roofline_floor_ms=floor_ms,
                roofline_fraction=floor_ms / median_ms, roofline_note=None)


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

    files = [str(BENCHMARKS / LEVEL_FILES[level]) for level in levels]
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
            for field in ("status", "fraction", "note"):
                row[f"fastres_roofline_{field}"] = fast[f"roofline_{field}"]
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
        lines.append(f"{r['level']:<11} {r['case'][:44]:<44} {r['dtype']:<8} {cells} {vs_cl} "
                     f"{vs_best} {_roofline_cell(r):>8}")
    lines.append("(times: median ms per call; vs: fastres speedup; roofline: fastres's fraction of "
                 "max(FLOP floor, byte floor) at the peaks measured in this run)")
    notes = {r["fastres_roofline_note"] for r in rows
             if r.get("fastres_roofline_status") == "n/a"}
    lines += [f"roofline {note}" for note in sorted(notes)]
    lines += [f"roofline INVALID for {r['level']} {r['case']} {r['dtype']}: "
              f"{r['fastres_roofline_note']}"
              for r in rows if r.get("fastres_roofline_status") == "invalid"]
    return "\n".join(lines)


def _roofline_cell(row: Dict) -> str:
    status = row.get("fastres_roofline_status")
    if status == "ok":
        return f"{100 * row['fastres_roofline_fraction']:.1f}%"
    return {"n/a": "n/a", "invalid": "INVALID"}.get(status, "-")  # None: no fastres result


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
    # The roofline panel only where some case has a fraction (none on a CPU); a case without one
    # is labelled with its status (n/a, INVALID) instead of a bar.
    with_roofline = any(r["fastres_roofline_status"] == "ok" for r in rows)
    fig, axes = plt.subplots(2 if with_roofline else 1, 1, squeeze=False, sharex=True,
                             figsize=(max(8, 0.35 * len(rows) + 3), 8 if with_roofline else 5))
    axes = axes[:, 0]
    axes[0].bar(range(len(rows)), [r["speedup_vs_eager_cl"] for r in rows], color="tab:blue")
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    axes[0].set_ylabel("fastres speedup vs eager channels_last")
    if with_roofline:
        for i, r in enumerate(rows):
            if r["fastres_roofline_status"] == "ok":
                axes[1].bar(i, 100 * r["fastres_roofline_fraction"], color="tab:green")
            else:
                axes[1].text(i, 1, _roofline_cell(r), rotation=90, ha="center", fontsize=7)
        axes[1].set_ylabel("fastres % of roofline floor")
    else:
        statuses = sorted({_roofline_cell(r) for r in rows})
        axes[0].set_title(f"roofline: {', '.join(statuses)} (see the table)", fontsize=9)
    axes[-1].set_xticks(range(len(rows)))
    axes[-1].set_xticklabels(labels, rotation=75, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def environment() -> dict:
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=BENCHMARKS, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "triton": triton.__version__, "commit": commit,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def run(out: Path, levels: List[str], extra_args: List[str]) -> int:
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
