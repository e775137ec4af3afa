"""`python -m fastres demo`, called in-process through fastres.tools.cli.main.

Under conftest.py a CPU-only process runs the fused op through Triton's interpreter, at ~10 s per
resnet18 forward whatever the image size; the demo runs each model 3+ times. So the in-process
runs here take the folded torch path (FASTRES_BACKEND=torch, read on every call), which still
goes through optimize(), the custom op and every step of the demo; the Triton kernels are
checked by the demo's own interpreter subprocess (test_demo_interpreter_check), which ignores
FASTRES_BACKEND.
"""
import re
import subprocess
import sys

import pytest
import torch

import fastres
from fastres.tools import cli, demo

TINY = ["demo", "--model", "resnet18", "--batch", "1", "--size", "32", "--iters", "1"]
PASS = "demo: PASS (the checks above; speed is not a pass criterion)"


@pytest.fixture
def torch_path(monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "torch")


def _launches(out: str, label: str):
    match = re.search(rf"{label}\s+original\s+(\d+) -> fastres\s+(\d+)", out)
    assert match, f"no launch counts for {label!r} in:\n{out}"
    return int(match.group(1)), int(match.group(2))


def test_demo(torch_path, capsys):
    assert cli.main(TINY + ["--no-interpreter-check"]) == 0
    out = capsys.readouterr().out
    assert "fastres demo: resnet18, batch 1, 3x32x32, float32, channels_last" in out
    assert "fused: 8 BasicBlock, 1 conv+bn+relu; left alone: 0" in out
    assert re.search(r"fused\s+BasicBlock\s+layer4\.0\s+\(2 launches \+ downsample\)", out)
    assert re.search(r"max rel error\s+\S+ .*threshold 1e-04\)\s+ok", out)
    before, after = _launches(out, "model")
    # 8 blocks x 2 fused convs + the fused stem + maxpool, avgpool, linear.
    assert after == 20 < before
    assert _launches(out, "one BasicBlock") == (7, 2)
    assert "timing: CPU (folded torch path, not the Triton kernels), 1 interleaved forward " \
        "per model (wall clock); median [interquartile range]" in out
    assert re.search(r"original\s+\S+ ms/iter \[no spread: 1 iteration\]", out)
    # One forward each: no spread, so no speed claim either way.
    assert re.search(r"ratio\s+\S+x \[no spread: 1 iteration\]   original / fastres per "
                     r"iteration; one iteration has no spread: no speed claim", out)
    assert "interpreter check" not in out
    assert out.rstrip().endswith(PASS)


def test_demo_fails_when_the_check_fails(torch_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "model_tolerance", lambda dtype, device: -1.0)
    assert cli.main(TINY + ["--no-interpreter-check"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"max rel error .*FAIL", out)
    assert "demo: FAIL (max rel error" in out


def test_demo_interpreter_check(torch_path, capsys):
    """~10 s alone (a fresh Python, one resnet18 forward at 64x64 interpreted), 30 s on a busy
    2-core machine."""
    assert cli.main(TINY) == 0
    out = capsys.readouterr().out
    assert "interpreter check: the Triton kernels through TRITON_INTERPRET=1" in out
    # 8 blocks x 2 + the stem: the child ran the kernels, though this process forces the torch path.
    assert re.search(r"launches\s+17 fused-kernel launches per forward", out)
    assert re.search(r"subprocess\s+\S+ s, exit code 0", out)
    assert out.rstrip().endswith(PASS)


def _spread(original_ms, fastres_ms):
    return demo.Spread.of([b / f for b, f in zip(original_ms, fastres_ms)])


def test_speed_verdict_claims_only_outside_the_noise():
    """Synthetic per-iteration timings (ms) of five interleaved forwards."""
    original = [10.0, 10.2, 9.9, 10.1, 10.0]
    assert demo.speed_verdict(_spread(original, [8.0, 8.1, 7.9, 8.0, 8.2])) == "fastres faster"
    assert demo.speed_verdict(_spread(original, [12.0, 12.1, 11.9, 12.3, 12.0])) == "fastres slower"
    # Medians 10.5 vs 9.8 (1.07x), but the per-iteration ratios' quartiles, 0.96 and 1.07,
    # straddle 1: the difference is inside the noise.
    noisy = _spread([10.0, 12.0, 9.0, 11.0, 10.5], [9.5, 12.5, 8.0, 11.5, 9.8])
    assert (noisy.q1, noisy.q3) == (pytest.approx(0.96), pytest.approx(1.0714, abs=1e-4))
    assert demo.speed_verdict(noisy) == "within noise: no speedup or slowdown claimed"
    # A quartile exactly at 1 is still inside.
    assert demo.speed_verdict(demo.Spread(1.1, 1.0, 1.2)) == \
        "within noise: no speedup or slowdown claimed"
    assert demo.speed_verdict(_spread([10.0], [5.0])) == \
        "one iteration has no spread: no speed claim"


def test_spread_is_median_and_interquartile_range():
    spread = demo.Spread.of([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (spread.median, spread.q1, spread.q3) == (3.0, 2.0, 4.0)
    assert spread.format(" ms/iter", 2) == "3.00 ms/iter [IQR 2.00 - 4.00]"
    assert demo.Spread.of([7.0]) == demo.Spread(7.0, None, None)


def test_demo_does_not_claim_a_speedup_inside_the_noise(torch_path, capsys, monkeypatch):
    """The timings of the noisy case above, as the demo's interleaved timer's result: the
    medians alone would read as a 1.07x speedup."""
    times = [[10.0, 12.0, 9.0, 11.0, 10.5], [9.5, 12.5, 8.0, 11.5, 9.8]]
    monkeypatch.setattr(demo, "interleaved_times_ms", lambda fns, device, iters: times)
    assert cli.main(TINY[:-1] + ["5", "--no-interpreter-check"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"original\s+10\.50 ms/iter \[IQR 10\.00 - 11\.00\]", out)
    assert re.search(r"fastres\s+9\.80 ms/iter \[IQR 9\.50 - 11\.50\]", out)
    assert re.search(r"ratio\s+1\.05x \[IQR 0\.96 - 1\.07\]   original / fastres per iteration; "
                     r"within noise: no speedup or slowdown claimed", out)
    assert not re.search(r"speedup \d|faster|slower", out)
    assert out.rstrip().endswith(PASS)


def test_fused_op_counts_as_one_launch(torch_path):
    """On the folded torch path conv_bn_act runs a conv, an add_ and a relu_ inside; the counter
    sees the op once, as a GPU sees its one kernel."""
    x = torch.randn(1, 8, 6, 6)
    w = torch.randn(8, 8, 3, 3)
    b = torch.randn(8)
    cpu = torch.device("cpu")
    fused = demo.count_launches(lambda: fastres.conv_bn_act(x, w, b, padding=1, residual=x), cpu)
    unfused = demo.count_launches(
        lambda: torch.relu_(torch.conv2d(x, w, b, padding=1).add_(x)), cpu)
    assert (fused, unfused) == (1, 3)


def test_views_are_not_counted():
    x = torch.randn(4, 6)
    cpu = torch.device("cpu")
    assert demo.count_launches(lambda: x.view(24).unsqueeze(0).expand(3, 24).select(0, 1), cpu) == 0
    assert demo.count_launches(lambda: x.t().reshape(24), cpu) == 1  # a reshape that copies


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "{demo,bench,gate,compile-check,coverage}" in capsys.readouterr().err


def test_help_lists_every_command_without_importing_torchvision():
    """--help runs in a fresh Python, whose modules show what building the parser imported."""
    code = ("import sys\n"
            "from fastres.tools import cli\n"
            "print(cli.build_parser().format_help())\n"
            "print('torchvision imported:', 'torchvision' in sys.modules)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "{demo,bench,gate,compile-check,coverage}" in run.stdout
    assert "demo-interpret" not in run.stdout
    assert "torchvision imported: False" in run.stdout


def test_unknown_model_lists_the_valid_ones(capsys):
    assert cli.main(["demo", "--model", "resnet5"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("demo: unknown model 'resnet5'; choose one of: ")
    assert "resnet18" in out and "wide_resnet50_2" in out


@pytest.mark.parametrize("command", [["demo"], ["gate"], ["bench", "--level", "layer"]])
def test_missing_torchvision_is_a_clear_error(command, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    assert cli.main(command) == 2
    assert "needs torchvision" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["gate", "bench"])
def test_checkout_tools_without_a_checkout(command, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "checkout_roots", lambda: [tmp_path])
    monkeypatch.delitem(sys.modules, f"fastres_benchmarks_{command}", raising=False)
    assert cli.main([command]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"{command}: `python -m fastres {command}` needs a fastres source "
                          "checkout")
    assert "pip install -e" in out
