"""optimize() on conv -> BN -> activation chains: every activation the kernel computes, spelled as
a module after an nn.BatchNorm2d, as torchvision's Conv2dNormActivation, as timm's
BatchNormAct2d (the BN applies its own act), or as a function; in eval mode (fused, through the
kernels where they run) and in train mode (ReLU and none fused, the others run unfused and say
so); and what the converted model keeps: outputs after its modules change, isinstance,
pickling, restore()."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, randomize_bn
from timm.layers import ConvNormAct
from torch import nn
from torchvision.ops import Conv2dNormActivation

import fastres
from fastres import FusedConv2d
from fastres.launch import conv as conv_launch

USES_KERNELS = conv_launch.INTERPRETED or torch.cuda.is_available()

ACTIVATION_MODULES = {
    "relu6": nn.ReLU6(), "silu": nn.SiLU(inplace=True), "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"), "hardswish": nn.Hardswish(),
    "hardsigmoid": nn.Hardsigmoid(), "leaky_relu": nn.LeakyReLU(0.2), "relu": nn.ReLU(),
}


class Chain(nn.Module):
    """conv -> bn -> act as separate attributes (a stem), then a functional tail."""

    def __init__(self, act: nn.Module, tail=None):
        super().__init__()
        self.conv = nn.Conv2d(5, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.act = act
        self.tail = tail

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))
        return self.tail(x) if self.tail is not None else x


def _check_eval(model, x, lengths=45):
    """optimize() a copy of model (eval) and compare it with the original in float64; return
    the optimized copy and its report."""
    model = randomize_bn(model).eval()
    fused = fastres.optimize(copy.deepcopy(model))
    with torch.no_grad():
        before = conv_launch.launch_count()
        out = fused(x)
        launched = conv_launch.launch_count() - before
        ref = copy.deepcopy(model).double()(x.double())
    assert_close(out, ref, torch.float32, lengths)
    return fused, fastres.fusion_report(fused), launched


@pytest.mark.parametrize("name", list(ACTIVATION_MODULES))
def test_activation_module_after_the_bn_is_fused(name):
    fused, report, launched = _check_eval(Chain(copy.deepcopy(ACTIVATION_MODULES[name])),
                                          torch.randn(2, 5, 7, 6))
    entry = report.find("conv")
    assert entry.fused and entry.kind == f"conv+bn+{name}", str(report)
    assert isinstance(fused.conv, FusedConv2d) and isinstance(fused.act, type(ACTIVATION_MODULES[name]))
    assert launched == (1 if USES_KERNELS else 0)
    assert ("trains fused" in entry.detail) == (name == "relu"), entry.detail


def test_functional_activations_fuse_only_where_applying_them_twice_changes_nothing():
    """F.relu6 after the BN still runs (it is a function), so the kernel may apply it too; F.silu
    would then be applied twice, so the chain fuses conv + BN only and SiLU runs after it."""
    x = torch.randn(2, 5, 7, 6)

    class Functional(Chain):
        def __init__(self, fn):
            super().__init__(nn.Identity())
            self.fn = fn

        def forward(self, x):
            return self.fn(self.bn(self.conv(x)))

    for fn, kind in ((F.relu6, "conv+bn+relu6"), (F.silu, "conv+bn"),
                     (lambda t: F.leaky_relu(t, 0.3), "conv+bn")):
        fused, report, _ = _check_eval(Functional(fn), x)
        assert report.find("conv").fused and report.find("conv").kind == kind, str(report)


def test_torchvision_conv2d_norm_activation_with_hardswish():
    model = nn.Sequential(Conv2dNormActivation(5, 8, 3, activation_layer=nn.Hardswish),
                          Conv2dNormActivation(8, 4, 1, activation_layer=nn.SiLU))
    fused, report, launched = _check_eval(model, torch.randn(2, 5, 9, 8), [45, 8])
    assert [(e.path, e.kind, e.fused) for e in report.entries] == [
        ("0.0", "conv+bn+hardswish", True), ("1.0", "conv+bn+silu", True)], str(report)
    assert launched == (2 if USES_KERNELS else 0)


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, nn.GELU, nn.Identity])
def test_timm_batchnormact2d(act):
    """timm's ConvNormAct: conv + BatchNormAct2d, whose own act the kernel applies."""
    fused, report, _ = _check_eval(ConvNormAct(5, 8, 3, act_layer=act), torch.randn(2, 5, 7, 6))
    entry = report.find("conv")
    name = {nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu", nn.Identity: "identity"}[act]
    assert entry.fused and entry.kind == ("conv+bn" if name == "identity" else f"conv+bn+{name}")
    assert "BatchNormAct2d bn folded" in entry.detail, entry.detail
    assert type(fused.bn).__name__ == "FoldedBatchNormAct2d"
    assert isinstance(fused.bn, type(ConvNormAct(1, 1, 1).bn))


def test_timm_batchnormact2d_left_alone_with_an_activation_the_kernel_lacks():
    fused, report, _ = _check_eval(ConvNormAct(5, 8, 3, act_layer=nn.Tanh), torch.randn(2, 5, 7, 6))
    entry = report.find("conv")
    assert not entry.fused and "Tanh" in entry.detail, str(report)


def test_changes_after_optimize_are_followed():
    """A LeakyReLU's slope edited, a BatchNormAct2d's act replaced by one the kernel lacks, a
    drop layer that is not an identity in train mode: each call reads the modules now."""
    x = torch.randn(2, 5, 7, 6)
    fused, _, _ = _check_eval(Chain(nn.LeakyReLU(0.2)), x)
    fused.act.negative_slope = 0.5
    with torch.no_grad():
        out = fused(x)
        ref = F.leaky_relu(fused.bn.__class__._fastres_original_class.forward(
            fused.bn, nn.Conv2d.forward(fused.conv, x)), 0.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)

    fused, _, _ = _check_eval(ConvNormAct(5, 8, 3, act_layer=nn.SiLU), x)
    fused.bn.act = nn.Tanh()
    assert "Tanh" in fused.conv.fallback_reason
    with torch.no_grad():
        out = fused(x)
        ref = torch.tanh(F.batch_norm(F.conv2d(x, fused.conv.weight, padding=1), fused.bn.running_mean,
                                      fused.bn.running_var, fused.bn.weight, fused.bn.bias, False, 0.0,
                                      fused.bn.eps))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)

    fused, _, _ = _check_eval(ConvNormAct(5, 8, 3, act_layer=nn.ReLU), x)
    fused.bn.drop = nn.Dropout(0.5)  # (made in train mode: it drops)
    assert "drop" in fused.conv.fallback_reason
    fused.bn.drop.eval()
    assert fused.conv.fallback_reason is None  # eval: Dropout is the identity
    fused.train()
    assert "drop" in fused.conv.fallback_reason


@pytest.mark.parametrize("make", [lambda: Chain(nn.SiLU()), lambda: ConvNormAct(5, 8, 3, act_layer=nn.GELU)],
                         ids=["silu_module", "timm_bnact_gelu"])
def test_train_mode_runs_other_activations_unfused_with_the_bn_bookkeeping(make):
    model = randomize_bn(make())
    fused = fastres.optimize(copy.deepcopy(model))
    x = torch.randn(3, 5, 7, 6)
    model.train(), fused.train()
    assert "train mode runs unfused" in fastres.fusion_report(fused).find("conv").detail
    out, ref = fused(x), model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.bn.running_mean, model.bn.running_mean)
    torch.testing.assert_close(fused.bn.running_var, model.bn.running_var)
    assert int(fused.bn.num_batches_tracked) == int(model.bn.num_batches_tracked) == 1


def test_pickle_deepcopy_and_restore_keep_the_modules():
    model = nn.Sequential(Chain(nn.SiLU()), ConvNormAct(8, 4, 3, act_layer=nn.Hardswish))
    fused, _, _ = _check_eval(model, torch.randn(2, 5, 7, 6), [45, 72])
    x = torch.randn(2, 5, 7, 6)
    with torch.no_grad():
        out = fused(x)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(fused)):
        assert type(other[0].act).__name__ == "FoldedSiLU" and isinstance(other[0].act, nn.SiLU)
        assert type(other[1].bn).__name__ == "FoldedBatchNormAct2d"
        with torch.no_grad():
            torch.testing.assert_close(other(x), out)
    keys = set(model.state_dict())
    assert set(fused.state_dict()) == keys
    fastres.restore(fused)
    assert type(fused[0].act) is nn.SiLU and type(fused[0].conv) is nn.Conv2d
    assert type(fused[1].bn) is type(ConvNormAct(1, 1, 1).bn)
    assert not any(k.startswith("_fastres") for m in fused.modules() for k in m.__dict__)


def test_every_conv_bn_pair_is_reported_fused_or_not():
    """Pairs the chain search cannot fold are listed with the reason, never skipped silently."""
    from torchvision.ops import FrozenBatchNorm2d

    class Pairs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.a_bn = nn.Conv2d(5, 8, 3, padding=1), nn.SyncBatchNorm(8)
            self.b, self.b_bn = nn.Conv2d(8, 8, 1), FrozenBatchNorm2d(8)
            self.c, self.c_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
            self.d, self.d_bn = nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8)
            self.e, self.e_bn = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

        def forward(self, x):
            x = self.b_bn(self.b(self.a_bn(self.a(x))))
            c = self.c(x)
            x = self.c_bn(c) + c  # the conv's output feeds more than its BN
            return self.e_bn(self.e(self.d_bn(self.d(x))))

    fused, report, _ = _check_eval(Pairs(), torch.randn(2, 5, 6, 6), [45, 8, 8, 18, 8])
    got = {e.path: (e.fused, e.detail) for e in report.entries}
    assert set(got) == {"a", "b", "c", "d", "e"}, str(report)
    assert not got["a"][0] and "SyncBatchNorm is not a plain" in got["a"][1]
    assert not got["b"][0] and "FrozenBatchNorm2d is not a plain" in got["b"][1]
    assert not got["c"][0] and "used by more than its BN" in got["c"][1]
    assert got["d"][0] and "grouped convolutions (groups=4) are fused in eval mode only" in got["d"][1]
    assert got["e"][0]
