"""`python -m fastres demo`, called in-process through fastres.cli.main.

Under conftest.py a CPU-only process runs the fused op through Triton's interpreter, at ~10 s per
resnet18 forward whatever the image size; the demo runs each model 3+ times. So the in-process
runs here take the folded torch path (FASTRES_BACKEND=torch, read on every call), which still
goes through optimize(), the custom op and every step of the demo; the Triton kernels are
checked by the demo's own interpreter subprocess (test_demo_interpreter_check), which ignores
FASTRES_BACKEND.
"""
import re

import pytest
import torch

import fastres
from fastres import cli

TINY = ["demo", "--model", "resnet18", "--batch", "1", "--size", "32", "--iters", "1"]


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
    assert "timing: CPU (folded torch path, not the Triton kernels)" in out
    assert "interpreter check" not in out
    assert out.rstrip().endswith("demo: PASS")


def test_demo_fails_when_the_check_fails(torch_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "tolerance", lambda dtype, device: -1.0)
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
    assert out.rstrip().endswith("demo: PASS")


def test_fused_op_counts_as_one_launch(torch_path):
    """On the folded torch path conv_bn_act runs a conv, an add_ and a relu_ inside; the counter
    sees the op once, as a GPU sees its one kernel."""
    x = torch.randn(1, 8, 6, 6)
    w = torch.randn(8, 8, 3, 3)
    b = torch.randn(8)
    cpu = torch.device("cpu")
    fused = cli.count_launches(lambda: fastres.conv_bn_act(x, w, b, padding=1, residual=x), cpu)
    unfused = cli.count_launches(
        lambda: torch.relu_(torch.conv2d(x, w, b, padding=1).add_(x)), cpu)
    assert (fused, unfused) == (1, 3)


def test_views_are_not_counted():
    x = torch.randn(4, 6)
    cpu = torch.device("cpu")
    assert cli.count_launches(lambda: x.view(24).unsqueeze(0).expand(3, 24).select(0, 1), cpu) == 0
    assert cli.count_launches(lambda: x.t().reshape(24), cpu) == 1  # a reshape that copies


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "{demo,bench,gate}" in capsys.readouterr().err
