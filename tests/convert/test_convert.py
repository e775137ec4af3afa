"""optimize()/restore() on real torchvision and timm models and on user ResNets."""
import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from helpers import UNIT_ROUNDOFF, randomize_bn
from torch import nn

import fastres
from fastres import FusedBasicBlock, FusedBottleneck, FusedConv2d
from fastres.launch import conv as conv_launch

USES_KERNELS = conv_launch.INTERPRETED or torch.cuda.is_available()


def _pair(model):
    model = randomize_bn(model).eval()
    return model, fastres.optimize(copy.deepcopy(model))


def _model_errors(original, fused, x, dtype):
    """Max |error| of the fused model and of the eager model in `dtype`, both against float64."""
    with torch.no_grad():
        ref = copy.deepcopy(original).double().cpu()(x.double().cpu())
        eager = original.to(dtype)(x.to(dtype)).double().cpu()
        before = conv_launch.launch_count()
        out = fused.to(dtype)(x.to(dtype))
        launches = conv_launch.launch_count() - before
    assert torch.isfinite(out).all()
    return ((out.double().cpu() - ref).abs().max().item(), (eager - ref).abs().max().item(),
            ref.abs().max().item(), launches)


def _assert_model_close(err, eager_err, scale, dtype):
    """A converted model must be about as accurate as PyTorch's own eager model in that dtype:
    within 4x its error, or within 2u of the output scale (u: the tolerance table's roundoff)."""
    assert err <= max(4 * eager_err, 2 * UNIT_ROUNDOFF[dtype] * scale), (err, eager_err, scale)


@pytest.mark.parametrize("name, blocks, kind", [("resnet18", 8, "BasicBlock"),
                                                ("resnet50", 16, "Bottleneck")])
def test_torchvision_models_match_unconverted(name, blocks, kind, device):
    original, fused = _pair(getattr(torchvision.models, name)(num_classes=10))
    report = fastres.fusion_report(fused)
    assert [e.kind for e in report.fused].count(kind) == blocks
    assert any(e.path == "conv1" and e.kind == "conv+bn+relu" for e in report.fused)
    assert not report.left_alone
    original, fused = original.to(device), fused.to(device)
    x = torch.randn(1, 3, 32, 32, device=device)
    err, eager_err, scale, launches = _model_errors(original, fused, x, torch.float32)
    _assert_model_close(err, eager_err, scale, torch.float32)
    if USES_KERNELS:  # stem + 2 (BasicBlock) or 3 (Bottleneck) launches per block
        assert launches == 1 + blocks * (2 if kind == "BasicBlock" else 3)


# bf16 is held to fp16's rule; it is slow-marked only for time (the interpreter takes 15-40 s per
# resnet18 forward): its conv paths all run in tests/kernels/test_conv_kernel.py's bf16 cases by default.
@pytest.mark.parametrize("dtype", [torch.float16,
                                   pytest.param(torch.bfloat16, marks=pytest.mark.slow)],
                         ids=["fp16", "bf16"])
def test_resnet18_half_channels_last(dtype, device):
    original, fused = _pair(torchvision.models.resnet18(num_classes=10))
    original = original.to(device, memory_format=torch.channels_last)
    fused = fused.to(device, memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    err, eager_err, scale, _ = _model_errors(original, fused, x, dtype)
    _assert_model_close(err, eager_err, scale, dtype)


@pytest.mark.parametrize("name, blocks", [("resnet18", 8), ("resnet50", 16)])
def test_timm_models(name, blocks, device):
    original, fused = _pair(timm.create_model(name, pretrained=False, num_classes=10))
    report = fastres.fusion_report(fused)
    assert len([e for e in report.fused if e.kind in ("BasicBlock", "Bottleneck")]) == blocks
    assert not report.left_alone
    if name == "resnet50":
        original, fused = original.to(device), fused.to(device)
        x = torch.randn(1, 3, 32, 32, device=device)
        err, eager_err, scale, _ = _model_errors(original, fused, x, torch.float32)
        _assert_model_close(err, eager_err, scale, torch.float32)


def test_timm_resnet50d_avgpool_shortcut_fuses_as_a_residual_block(monkeypatch):
    original, fused = _pair(timm.create_model("resnet50d", pretrained=False, num_classes=10))
    report = fastres.fusion_report(fused)
    assert not report.left_alone, str(report)
    # The AvgPool2d + conv1x1 + BN shortcuts of layer2-4's first blocks: the block is read from
    # its forward (fastres.nn.residual), the pool runs as it is, the conv is the second GEMM.
    residual = {e.path: e.detail for e in report.fused if e.kind == "residual"}
    assert set(residual) == {"layer2.0", "layer3.0", "layer4.0"}
    assert all("downsample.0 -> downsample.1 (downsample.1 as the second GEMM)" in d
               for d in residual.values()), residual
    # layer1.0's shortcut is Identity + conv1x1 + BN (the stride-1 "avg-pool"): a Bottleneck.
    fused_blocks = [e.path for e in report.fused if e.kind == "Bottleneck"]
    assert len(fused_blocks) == 13 and "layer1.0" in fused_blocks
    # The deep stem's three conv+bn+relu chains and the chains inside left-alone blocks fuse.
    assert {"conv1.0", "conv1.3", "conv1.6"} <= {e.path for e in report.fused}
    # Equivalence through the folded torch path: the kernels themselves are covered above, and
    # this model's many single-conv launches are slow under the interpreter.
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    x = torch.randn(1, 3, 32, 32)
    err, eager_err, scale, _ = _model_errors(original, fused, x, torch.float32)
    _assert_model_close(err, eager_err, scale, torch.float32)


@pytest.mark.parametrize("name, blocks", [("resnet34", 16), ("resnet101", 33), ("resnet152", 50),
                                          ("wide_resnet50_2", 16)])
def test_other_torchvision_resnets_convert_and_match_on_cpu_path(name, blocks, monkeypatch):
    """Bigger models: conversion and equivalence via the folded torch path (fast on CPU)."""
    original, fused = _pair(getattr(torchvision.models, name)(num_classes=10))
    report = fastres.fusion_report(fused)
    assert len([e for e in report.fused if e.kind in ("BasicBlock", "Bottleneck")]) == blocks
    assert list(fused.state_dict()) == list(original.state_dict())
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    x = torch.randn(1, 3, 32, 32)
    err, eager_err, scale, _ = _model_errors(original, fused, x, torch.float32)
    _assert_model_close(err, eager_err, scale, torch.float32)


def test_grouped_resnext_blocks_fuse_in_eval_and_train_unfused():
    fused = fastres.optimize(torchvision.models.resnext50_32x4d(num_classes=10))
    report = fastres.fusion_report(fused)
    blocks = [e for e in report.fused if e.kind == "Bottleneck"]
    assert len(blocks) == 16 and not report.left_alone, str(report)
    assert all("conv2: grouped convolutions (groups=32) are fused in eval mode only" in e.detail
               for e in blocks)


def test_restore_gives_back_a_state_dict_identical_model():
    original = randomize_bn(torchvision.models.resnet50(num_classes=10))
    model = copy.deepcopy(original)
    fastres.optimize(model)
    assert isinstance(model.layer1[0], FusedBottleneck) and isinstance(model.conv1, FusedConv2d)
    fastres.restore(model)
    assert type(model.layer1[0]) is torchvision.models.resnet.Bottleneck
    assert type(model.conv1) is nn.Conv2d and type(model.bn1) is nn.BatchNorm2d
    assert [type(m) for m in model.modules()] == [type(m) for m in original.modules()]
    sd, want = model.state_dict(), original.state_dict()
    assert list(sd) == list(want) and all(torch.equal(sd[k], want[k]) for k in sd)
    assert fastres.fusion_report(model) is None


def test_changes_made_while_optimized_survive_restore():
    model = fastres.optimize(torchvision.models.resnet18(num_classes=10))
    other = randomize_bn(torchvision.models.resnet18(num_classes=10), seed=5)
    model.load_state_dict(other.state_dict(), strict=True)
    model.half()
    fastres.restore(model)
    sd, want = model.state_dict(), other.half().state_dict()
    assert all(torch.equal(sd[k], want[k]) for k in want)
    assert model.bn1.running_mean.dtype == torch.float16


def test_train_eval_switching_on_an_optimized_model(device):
    """model.train() / model.eval() mid-run: train-mode forwards (fused training blocks, unfused
    stem) track the float64 model as closely as eager fp32 does, running statistics included,
    and the eval forward that follows folds the updated statistics."""
    # One block per stage (an identity block, then three with a downsample shortcut): every kind
    # of resnet18 block at half its interpreter time.
    resnet = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                              num_classes=10)
    original, fused = _pair(resnet)
    ref = copy.deepcopy(original).double().cpu().train()
    original, fused = original.to(device).train(), fused.to(device).train()
    # 64x64 and batch 4: layer4's BNs see 16 values per channel (a batch of 2 at 32x32 leaves
    # them 2, and BN over 2 values amplifies any rounding without bound).
    for step in range(2):
        x = torch.randn(4, 3, 64, 64, device=device)
        want = ref(x.double().cpu())
        _assert_model_close((fused(x).double().cpu() - want).abs().max().item(),
                            (original(x).double().cpu() - want).abs().max().item(),
                            want.abs().max().item(), torch.float32)
    for (k, a), b, c in zip(fused.state_dict().items(), original.state_dict().values(),
                            ref.state_dict().values()):
        if k.endswith("num_batches_tracked"):
            assert int(a) == int(b) == 2, k
        else:
            _assert_model_close((a.double().cpu() - c).abs().max().item(),
                                (b.double().cpu() - c).abs().max().item(), c.abs().max().item(),
                                torch.float32)
    original.eval(), fused.eval()
    err, eager_err, scale, _ = _model_errors(original, fused, x[:1], torch.float32)
    _assert_model_close(err, eager_err, scale, torch.float32)


# ---- user-defined ResNets: found by structure, not class name ---------------------------------

class MyBlock(nn.Module):
    def __init__(self, cin, cout, stride=1, final_relu=True, extra=False, dropout=0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.final_relu = final_relu
        self.gate = nn.Linear(cout, cout) if extra else None
        self.dropout = dropout

    def forward(self, x):
        out = F.dropout(F.relu(self.bn1(self.conv1(x))), self.dropout, self.training)
        out = self.bn2(self.conv2(out))
        out = out + (x if self.downsample is None else self.downsample(x))
        return F.relu(out) if self.final_relu else out


class MyNet(nn.Module):
    def __init__(self, final_relu=True, extra=False, dropout=0.0):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(MyBlock(16, 16), MyBlock(16, 24, 2, final_relu, extra, dropout))
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def test_user_resnet_is_found_by_structure(device):
    original, fused = _pair(MyNet())
    report = fastres.fusion_report(fused)
    assert [e.path for e in report.fused if e.kind == "BasicBlock"] == ["body.0", "body.1"]
    assert any(e.path == "stem.0" and e.kind == "conv+bn+relu" for e in report.fused)
    assert isinstance(fused.body[1], FusedBasicBlock)
    original, fused = original.to(device), fused.to(device)
    x = torch.randn(2, 3, 10, 10, device=device)
    err, eager_err, scale, launches = _model_errors(original, fused, x, torch.float32)
    _assert_model_close(err, eager_err, scale, torch.float32)
    if USES_KERNELS:
        assert launches == 1 + 2 + 2


def test_block_that_acts_differently_in_training_fuses_for_eval_only(device):
    """Dropout inside a block's forward is invisible in eval mode: the block fuses, but the train
    probe sees it, so train mode runs the block's own (unfused) forward, dropout included."""
    original, fused = _pair(MyNet(dropout=0.5))
    block = fused.body[1]
    assert isinstance(block, FusedBasicBlock) and fused.body[0].train_fallback_reason is None
    assert "does not compute" in block.train_fallback_reason
    entry = next(e for e in fastres.fusion_report(fused).fused if e.path == "body.1")
    assert "train mode runs unfused" in entry.detail
    original, block = original.body[1].to(device).train(), block.to(device).train()
    h = torch.randn(2, 16, 10, 10, device=device)
    torch.manual_seed(3)
    out = block(h)
    torch.manual_seed(3)
    assert torch.equal(out, original(h))  # the same dropout mask: the block's own forward ran


def test_timm_drop_path_blocks_train_unfused():
    model = fastres.optimize(timm.create_model("resnet18", pretrained=False, num_classes=10,
                                               drop_path_rate=0.1))
    blocks = [m for m in model.modules() if isinstance(m, FusedBasicBlock)]
    assert len(blocks) == 8
    reasons = [b.train_fallback_reason for b in blocks]
    # timm's first block has drop-path rate 0 (nn.Identity); the rest have a DropPath child
    assert reasons[0] is None and all("DropPath" in r for r in reasons[1:])


@pytest.mark.parametrize("kwargs", [dict(final_relu=False), dict(extra=True)],
                         ids=["no_final_relu", "unused_extra_parameters"])
def test_block_the_named_path_refuses_is_read_from_its_forward(kwargs, device):
    """A BasicBlock-shaped block whose forward is not torchvision's (no final ReLU), or that has
    a child with parameters its forward does not use, is not a BasicBlock to the named path; its
    traced forward makes it a residual block (fastres.nn.residual), fused and checked."""
    original, fused = _pair(MyNet(**kwargs))
    entry = fastres.fusion_report(fused).find("body.1")
    assert entry.fused and entry.kind == "residual", entry.detail
    assert "conv1 -> conv2 + downsample.0" in entry.detail
    assert not isinstance(fused.body[1], FusedBasicBlock)
    original, fused = original.to(device), fused.to(device)
    err, eager_err, scale, _ = _model_errors(original, fused, torch.randn(2, 3, 9, 11, device=device),
                                             torch.float32)
    _assert_model_close(err, eager_err, scale, torch.float32)
