"""`python -m fastres compile-check --sass`: the static SASS report and its gate.

The SASS analysis runs here on a short committed listing (cut down from what nvdisasm prints for
the fused conv kernel on sm_90a: a tap loop around a pipelined channel loop), the gate's compare
on synthetic records; compiling the real kernels takes a minute or more and is marked slow."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastres.tools import cli
from fastres.tools import sass_report as sr

ROOT = Path(__file__).resolve().parents[2]

# The shape of `nvdisasm -c` output for fused_conv2d_kernel (3x3, two-level reduction): 4
# instructions before the loops, a tap loop (8 instructions of its own) around a channel loop
# (8, two HGMMAs, a 4-byte spill store and an 8-byte spill load), an epilogue of 7, and the
# unreachable `BRA self` + NOP padding every function ends with.
LISTING = """\
//--------------------- .text.fused_conv2d_kernel --------------------------
        .section        .text.fused_conv2d_kernel,"ax",@progbits
fused_conv2d_kernel:
.text.fused_conv2d_kernel:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   S2R R9, SR_CTAID.X ;
        /*0020*/                   IMAD.SHL.U32 R6, R3, 0x8, RZ ;
        /*0030*/                   LDG.E R7, desc[UR6][R4.64] ;
.L_x_2:
        /*0040*/                   ULOP3.LUT UR5, UR4, 0xff, URZ, 0xc0, !UPT ;
        /*0050*/                   LDGSTS.E.BYPASS.128 [R199+0xc800], desc[UR20][R152.64+0x80], P5 ;
        /*0060*/               @P5 BRA `(.L_x_0) ;
        /*0070*/                   UMOV UR22, 0x2 ;
.L_x_1:
        /*0080*/                   DEPBAR.LE SB0, 0x4 ;
        /*0090*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*00a0*/                   HGMMA.64x128x16.F32 R88, gdesc[UR8], R88 ;
        /*00b0*/                   HGMMA.64x128x16.F32 R88, gdesc[UR12], R88, gsb0 ;
        /*00c0*/                   LDGSTS.E.BYPASS.128 [R159+0x8800], desc[UR20][R22.64], P5 ;
        /*00d0*/                   STL [R1+0x10], R5 ;
        /*00e0*/                   LDL.64 R4, [R1+0x18] ;
        /*00f0*/               @P5 BRA `(.L_x_1) ;
.L_x_0:
        /*0100*/                   UIADD3 UR4, UR4, 0x1, URZ ;
        /*0110*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0120*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0130*/              @!P1 BRA `(.L_x_2) ;
        /*0140*/                   IABS R2, R3 ;
        /*0150*/                   LDG.E.128 R8, desc[UR20][R20.64] ;
        /*0160*/                   FMNMX R4, RZ, R4, !PT ;
        /*0170*/               @P3 STG.E.128 desc[UR20][R20.64], R32 ;
        /*0180*/              @!P0 EXIT ;
        /*0190*/                   STG.E.128 desc[UR20][R168.64], R56 ;
        /*01a0*/                   EXIT ;
.L_x_3:
        /*01b0*/                   BRA `(.L_x_3);
        /*01c0*/                   NOP;
        /*01d0*/                   NOP;
.L_x_4:
"""
PRE, TAP, MAIN, POST = 4, 8, 8, 7


def _analysis(text=LISTING):
    (fn,) = sr.parse_sass(text)
    return sr.analyze(fn)


def test_listing_counts_and_loops():
    a = _analysis()
    assert a.name == "fused_conv2d_kernel"
    assert a.instr_count == PRE + TAP + MAIN + POST  # the padding after EXIT is unreachable
    assert a.counts == {"HGMMA": 2, "LDGSTS": 2, "UTMALDG": 0, "LDG": 2, "STG": 2, "LDL": 1,
                        "STL": 1, "BAR": 2}
    assert a.mma_opcodes == {"HGMMA.64x128x16.F32": 2}
    assert (a.spill_store_bytes, a.spill_load_bytes) == (4, 8)
    assert len(a.loops) == 2  # `BRA self` after EXIT is no loop
    outer, inner = sorted(a.loops, key=lambda lp: lp.depth)
    assert (outer.header_addr, outer.depth, outer.own_instrs, outer.own_mma) == (0x40, 1, TAP, 0)
    assert (inner.header_addr, inner.depth, inner.own_instrs, inner.own_mma) == (0x80, 2, MAIN, 2)
    assert a.loops[inner.parent] is outer and outer.mma_total == 2
    assert a.outside_regions() == {"pre": PRE, "between": 0, "post": POST}


def test_estimate_two_level_loop():
    """A channel loop inside a tap loop: ceil(C/BLOCK_K) trips per tap, R*S taps."""
    est = sr.estimate(_analysis(), [sr.Reduction(64, 9)], block_k=32)
    assert est.error is None and est.structure == "tap loop > channel loop"
    assert sorted(est.roles.values()) == ["main", "tap"]
    assert est.k_steps == 18
    assert est.instr_per_tile == PRE + POST + 9 * (TAP + 2 * MAIN)


def test_estimate_single_loop_detected_from_the_sass():
    """The same code with the tap loop's back edge gone: one loop of R*S*ceil(C/BLOCK_K)
    trips, or ceil(R*S*C/BLOCK_K) for the flat reduction (the stem)."""
    single = _analysis(LISTING.replace("@!P1 BRA `(.L_x_2)", "PLOP3.LUT P1, PT, PT, PT, UP0, 0x40, 0x0"))
    assert len(single.loops) == 1
    est = sr.estimate(single, [sr.Reduction(64, 9)], block_k=32)
    assert est.structure == "single loop"
    assert est.instr_per_tile == PRE + TAP + POST + 18 * MAIN
    flat = sr.estimate(single, [sr.Reduction(3, 49, flat=True)], block_k=32)
    assert flat.structure == "flat loop" and flat.k_steps == 5
    assert flat.instr_per_tile == PRE + TAP + POST + 5 * MAIN


def test_estimate_refuses_a_structure_it_does_not_know():
    two = sr.estimate(_analysis(), [sr.Reduction(64, 9), sr.Reduction(64)], block_k=32)
    assert two.instr_per_tile is None and "expected 2" in two.error
    # Two nested MMA loops for a 1x1 conv: no tap loop to explain the outer one.
    one_by_one = sr.estimate(_analysis(), [sr.Reduction(64, 1)], block_k=32)
    assert one_by_one.instr_per_tile is None and "2 deep" in one_by_one.error


def test_out_of_line_wait_loop_counts_once():
    """An mbarrier-style retry loop placed after EXIT, reached by a forward branch and jumping
    back: its own self-loop (no MMA, counted once, noted); the jump back closes no loop."""
    text = LISTING.replace(
        "        /*0140*/                   IABS R2, R3 ;\n",
        "        /*0140*/              @!P2 BRA `(.L_x_9) ;\n.L_x_8:\n"
        "        /*0148*/                   IABS R2, R3 ;\n").replace(
        ".L_x_3:\n",
        ".L_x_9:\n        /*01a8*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [UR4], R2 ;\n"
        "        /*01a9*/              @!P2 BRA `(.L_x_9) ;\n"
        "        /*01aa*/                   BRA `(.L_x_8) ;\n.L_x_3:\n")
    a = _analysis(text)
    assert len(a.loops) == 3 and a.irreducible_edges == 1
    est = sr.estimate(a, [sr.Reduction(64, 9)], block_k=32)
    assert est.error is None and len(est.notes) == 1 and "counted once" in est.notes[0]
    assert est.instr_per_tile == PRE + POST + 1 + 3 + 9 * (TAP + 2 * MAIN)


def test_occupancy_and_issue_ratio():
    # The static study's figures (sass-study-3783e4b.md): 226 regs x 4 warps -> 2 CTAs by
    # registers; 8 warps at 128 regs and 96 KiB -> 2 by both; 163 regs x 8 warps -> 1.
    assert sr.occupancy(226, 65536, 4) == (2, "regs")
    assert sr.occupancy(128, 98304, 8) == (2, "regs/smem")
    assert sr.occupancy(163, 98304, 8) == (1, "regs")
    assert sr.occupancy(24, 0, 4) == (16, "warps")
    cycles = sr.tensor_cycles(128, 128, 32, 18, "fp16")
    assert cycles == 4608
    assert round(sr.issue_per_tensor(5493, 4, cycles), 2) == 1.19
    assert sr.tensor_cycles(128, 128, 32, 18, "fp32") == 2 * cycles  # tf32 runs at half rate


def _entry(**changes):
    entry = {"regs": 226, "spill_store_bytes": 0, "spill_load_bytes": 0, "hgmma": 4,
             "utmaldg": 0, "instr_per_tile": 1000, "issue_per_tensor": 1.0, "ratio_to_ref": 2.0,
             "config": "128x128x32 w4 s4"}
    entry.update(changes)
    return entry


def _file(records, triton="3.8.0", ptxas="12.9.86"):
    return {"arch": 90, "triton": triton, "ptxas": ptxas, "records": records}


BASE = _file({"k fp16 eval": _entry(), "j fp16 eval": _entry(utmaldg=8)})


def _compare(**changes):
    fresh = json.loads(json.dumps(BASE))
    fresh["records"]["k fp16 eval"].update(changes)
    return sr.compare(BASE, fresh)


def test_gate_compare():
    ok, lines = sr.compare(BASE, BASE)
    assert ok and "2 kernel(s) unchanged" in lines[-1]
    assert not _compare(spill_store_bytes=8)[0]
    assert not _compare(spill_load_bytes=4)[0]
    ok, lines = _compare(instr_per_tile=1110)  # +11%
    assert not ok and "REGRESSION  k fp16 eval: instr/tile 1000 -> 1110 (+11.0%)" in lines
    assert _compare(instr_per_tile=1090)[0]  # +9%
    assert not _compare(hgmma=0)[0]
    fresh = json.loads(json.dumps(BASE))
    fresh["records"]["j fp16 eval"]["utmaldg"] = 0
    assert not sr.compare(BASE, fresh)[0]
    assert not _compare(instr_per_tile=None)[0]
    ok, lines = _compare(instr_per_tile=700, spill_store_bytes=0)
    assert ok and any(line.startswith("improvement k fp16 eval: instr/tile 1000 -> 700")
                      for line in lines)


def test_gate_new_and_unmeasured_kernels():
    fresh = json.loads(json.dumps(BASE))
    del fresh["records"]["j fp16 eval"]  # a --quick run measures a subset: fine
    ok, lines = sr.compare(BASE, fresh)
    assert ok and "1 baseline kernel(s) not measured" in lines[-1]
    fresh["records"]["new fp16 eval"] = _entry()
    ok, lines = sr.compare(BASE, fresh)
    assert not ok and "NEW (not in the baseline)  new fp16 eval" in lines


def test_gate_under_other_versions_compares_only_spills_and_mma():
    for versions in ({"triton": "3.9.0"}, {"ptxas": "13.0.1"}):
        fresh = json.loads(json.dumps(BASE))
        fresh.update(versions)
        fresh["records"]["k fp16 eval"]["instr_per_tile"] = 2000
        ok, lines = sr.compare(BASE, fresh)
        assert ok and "only spills, HGMMA and UTMALDG are compared" in lines[-1]
        fresh["records"]["k fp16 eval"]["spill_store_bytes"] = 4
        assert not sr.compare(BASE, fresh)[0]
        fresh["records"]["k fp16 eval"].update(spill_store_bytes=0, hgmma=0)
        assert not sr.compare(BASE, fresh)[0]


def _record(key="64@56->64 3x3 s1 fp16 eval", instr=1000, spill=0):
    return {"key": key, "regs": 226, "spill_store_bytes": spill, "spill_load_bytes": spill,
            "counts": {"HGMMA": 4, "UTMALDG": 0}, "instr_per_tile": instr,
            "issue_per_tensor": 1.0, "ratio_to_ref": 2.0, "config_label": "128x128x32 w4 s4"}


def _report(records, quick=False, triton="3.8.0"):
    return sr.SassReport(90, quick, {"triton": triton, "ptxas": "12.9.86"}, "test",
                         records=records)


def test_gate_bless_then_check(tmp_path, capsys):
    path = tmp_path / "baselines" / "sass_sm90.json"
    assert sr.gate(_report([_record()]), path, bless=False) == 1
    assert "no baseline" in capsys.readouterr().out
    assert sr.gate(_report([_record(), _record("b fp16 eval")]), path, bless=True) == 0
    assert set(json.loads(path.read_text())["records"]) == {"64@56->64 3x3 s1 fp16 eval",
                                                            "b fp16 eval"}
    assert sr.gate(_report([_record(instr=1050)]), path, bless=False) == 0
    assert "sass gate: PASS" in capsys.readouterr().out
    assert sr.gate(_report([_record(spill=8)]), path, bless=False) == 1
    assert "sass gate: FAIL" in capsys.readouterr().out
    # A --quick bless updates its records and keeps the others ...
    assert sr.gate(_report([_record(instr=900)], quick=True), path, bless=True) == 0
    records = json.loads(path.read_text())["records"]
    assert records["64@56->64 3x3 s1 fp16 eval"]["instr_per_tile"] == 900 and "b fp16 eval" in records
    # ... but not across versions.
    assert sr.gate(_report([_record()], quick=True, triton="3.9.0"), path, bless=True) == 1


def test_cli_parses_the_sass_options(monkeypatch):
    args = cli.build_parser().parse_args(
        ["compile-check", "--sass", "--gate", "--bless", "--quick", "--arch", "90",
         "--out", "somewhere"])
    assert (args.sass, args.gate, args.bless, args.quick, args.arch, args.out) == (
        True, True, True, True, 90, Path("somewhere"))
    assert args.run is cli._compile_check
    calls = []
    monkeypatch.setattr(sr, "main", lambda *a, **k: calls.append(a) or 0)
    assert cli.main(["compile-check", "--sass", "--gate", "--quick"]) == 0
    arch, quick, out, gate, bless, baseline, cases = calls[0][:7]
    assert (arch, quick, out, gate, bless) == (90, True, Path("fastres-sass-out"), True, False)
    assert baseline == ROOT / "benchmarks" / "baselines" / "sass_sm90.json"
    assert cases is not None and hasattr(cases, "layer_cases")


def test_cli_without_a_checkout(monkeypatch, capsys):
    """Installed without a checkout: layers from torchvision, and --gate says what is missing."""
    monkeypatch.setattr(cli, "checkout_root", lambda: None)
    calls = []
    monkeypatch.setattr(sr, "main", lambda *a, **k: calls.append(a) or 0)
    assert cli.main(["compile-check", "--sass", "--gate", "--quick"]) == 0
    assert "no fastres source checkout" in capsys.readouterr().out
    baseline, cases, commit, reason = calls[0][5:9]
    assert baseline is None and cases is None and commit is None
    assert "benchmarks/baselines/sass_sm90.json of a fastres source checkout" in reason
    assert "--baseline FILE" in reason


def test_cli_gate_needs_sass(capsys):
    assert cli.main(["compile-check", "--gate"]) == 2
    assert "go with --sass" in capsys.readouterr().out


def test_layers_match_benchmarks_cases():
    """Without a checkout the layers come from torchvision directly: the same list."""
    pytest.importorskip("torchvision")
    cases = cli.load_checkout_tool("cases")
    from_cases = sr.layers_from_cases(cases, sr.MODELS)
    direct = sr.layers_from_torchvision(sr.MODELS)
    assert direct == from_cases
    names = {layer.name for layer in direct}
    assert {"3@224->64 7x7 s2", "64@56->64 3x3 s1 +res", "64@56->256 1x1 s1 +ds64s1",
            "512@7->512 3x3 s1"} <= names
    assert "1024@14->2048 1x1 s2" not in names  # a downsample: the shortcut GEMM of a last conv
    stem = next(layer for layer in direct if layer.R == 7)
    assert stem.flat and direct[stem] == ["resnet18", "resnet50"]
    train = sr.training_layers(direct)
    assert not any(layer.flat or layer.epilogue != "none" for layer in train)
    assert any(layer.name == "1024@14->2048 1x1 s2" for layer in train)  # a downsample conv


def test_arena_tensors_share_one_untouched_allocation():
    import torch
    arena = sr.Arena()
    x = arena.channels_last(256, 64, 56, 56, torch.float16)
    w = arena.channels_last(64, 64, 3, 3, torch.float16)
    assert x.shape == (256, 64, 56, 56) and x.is_contiguous(memory_format=torch.channels_last)
    assert w.stride() == (576, 1, 192, 64)
    assert x.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    assert x.data_ptr() % 16 == 0


@pytest.mark.slow
def test_quick_report_passes_the_committed_gate(tmp_path):
    """The CI step: compile ResNet-50's convs in fp16 for sm_90a, check them against
    benchmarks/baselines/sass_sm90.json (about a minute cold on 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "fastres", "compile-check", "--sass", "--quick",
                          "--gate", "--out", str(tmp_path)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "sass gate: PASS" in run.stdout
    data = json.loads((tmp_path / "sass.json").read_text())
    assert not data["failures"] and len(data["records"]) > 50
    assert all(r["instr_per_tile"] and r["ref"]["instr_per_tile"] for r in data["records"])
    assert (tmp_path / "sass.md").read_text().startswith("# Static SASS report, sm_90")
