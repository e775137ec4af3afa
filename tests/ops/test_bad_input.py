"""Bad input: a clear error naming the problem (or a documented fallback); inputs and
parameters are never modified."""
import copy

import pytest
import torch
from helpers import assert_close, randomize_bn
from torch import nn

from fastres import FusedBasicBlock, FusedConvBNReLU, conv_bn_act
from fastres.launch import conv as conv_launch


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, snap):
    return all(torch.equal(v, snap[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("make_args, error, match", [
    (lambda d: (torch.randn(8, 5, 5, device=d), torch.randn(4, 8, 3, 3, device=d)), ValueError, "4-D"),
    (lambda d: (torch.randn(1, 8, 5, 5, device=d), torch.randn(4, 8, 3, device=d)), ValueError, "weight must be 4-D"),
    (lambda d: (torch.randn(1, 8, 5, 5, device=d), torch.randn(4, 8, 3, 3, device=d).half()),
     TypeError, "does not match weight dtype"),
    (lambda d: (torch.randn(1, 8, 5, 5, device=d).double(), torch.randn(4, 8, 3, 3, device=d).double()),
     TypeError, "not supported"),
    (lambda d: (torch.randn(1, 8, 5, 5, device=d), torch.randn(4, 4, 3, 3, device=d)), ValueError, "input channels"),
    (lambda d: (torch.randn(1, 8, 2, 2, device=d), torch.randn(4, 8, 3, 3, device=d)), ValueError, "too small"),
])
def test_functional_rejects(make_args, error, match, device):
    x, w = make_args(device)
    with pytest.raises(error, match=match):
        conv_bn_act(x, w)


def test_functional_rejects_bad_residual_and_shortcut(device):
    x = torch.randn(2, 8, 6, 6, device=device)
    w = torch.randn(4, 8, 1, 1, device=device)
    with pytest.raises(ValueError, match="residual has shape"):
        conv_bn_act(x, w, residual=torch.randn(2, 4, 5, 6, device=device))
    with pytest.raises(TypeError, match="residual dtype"):
        conv_bn_act(x, w, residual=torch.randn(2, 4, 6, 6, device=device).half())
    with pytest.raises(ValueError, match="shortcut output"):
        conv_bn_act(x, w, shortcut=(torch.randn(2, 3, 6, 6, device=device),
                                    torch.randn(4, 3, 1, 1, device=device), 2))
    with pytest.raises(ValueError, match="shortcut weight"):
        conv_bn_act(x, w, shortcut=(x, torch.randn(4, 8, 3, 3, device=device), 1))
    with pytest.raises(ValueError, match="stride"):
        conv_bn_act(x, w, stride=0)
    with pytest.raises(ValueError, match="fp32_precision"):
        conv_bn_act(x, w, fp32_precision="fast")


def test_module_errors_name_the_problem_and_mutate_nothing(device):
    block = randomize_bn(FusedBasicBlock(8, 8)).eval().to(device)
    snap = _snapshot(block)
    x = torch.randn(1, 8, 5, 5, device=device)
    x_copy = x.clone()
    with torch.no_grad():
        with pytest.raises(TypeError, match="does not match conv1.weight dtype"):
            block(x.half())
        with pytest.raises(RuntimeError, match="3D .* or 4D"):  # torchvision's block's error
            block(x.unsqueeze(0))
        with pytest.raises(ValueError, match="input channels|expects 8"):
            block(torch.randn(1, 6, 5, 5, device=device))
        block(x)
    assert torch.equal(x, x_copy)
    assert _unchanged(block, snap)


def test_unsupported_conv_module_falls_back_to_reference(device):
    """A padding mode the kernel does not take: the documented fallback (the reference path),
    with the reason exposed."""
    conv = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", bias=False)
    with pytest.raises(ValueError, match="padding_mode"):
        FusedConvBNReLU.from_modules(conv, nn.BatchNorm2d(8))
    m = FusedConvBNReLU(8, 8, 3).eval().to(device)
    m[0] = conv.to(device)
    assert "padding_mode" in m.fallback_reason
    x = torch.randn(1, 8, 5, 5, device=device)
    with torch.no_grad():
        torch.testing.assert_close(m(x), torch.relu(m[1](m[0](x))))


def test_grouped_conv_module_fuses_in_eval_and_trains_unfused(device):
    """groups > 1: fused in eval mode; in train mode the documented fallback (the modules
    unfused), with the reason exposed."""
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
    m = FusedConvBNReLU.from_modules(conv, nn.BatchNorm2d(8)).to(device)
    assert m.fallback_reason is None and "grouped" in m.train_fallback_reason
    x = torch.randn(2, 8, 5, 5, device=device)
    ref = copy.deepcopy(m).double()
    with torch.no_grad():
        assert_close(m.eval()(x), torch.relu(ref[1].eval()(ref[0](x.double()))), torch.float32, 36)
        before = conv_launch.launch_count()
        out = m.train()(x)
        assert conv_launch.launch_count() == before
        torch.testing.assert_close(out, torch.relu(ref[1].train()(ref[0](x.double()))).float())
    torch.testing.assert_close(m[1].running_mean.double(), ref[1].running_mean)


def test_batchnorm_without_running_stats_is_not_folded(device):
    bn = nn.BatchNorm2d(8, track_running_stats=False)
    with pytest.raises(ValueError, match="running stats"):
        FusedConvBNReLU.from_modules(nn.Conv2d(4, 8, 1), bn)


def test_device_mismatch_is_reported():
    if not torch.cuda.is_available():
        pytest.skip("needs two devices")
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(ValueError, match="is on"):
        conv_bn_act(x, torch.randn(4, 8, 1, 1, device="cuda"))


def test_train_mode_errors_name_the_problem_and_mutate_nothing(device):
    """Train mode (the fused training op where the kernels run): the same clear errors as eager,
    and a call that raised has not touched the running statistics or num_batches_tracked."""
    from fastres import FusedBottleneck
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    block = randomize_bn(FusedBottleneck(8, 4, 2, ds)).train().to(device)
    snap = _snapshot(block)
    x = torch.randn(2, 8, 5, 5, device=device)
    x_copy = x.clone()
    with pytest.raises(TypeError, match="does not match conv1.weight dtype"):
        block(x.half())
    with pytest.raises(ValueError, match="input channels|expects 8"):
        block(torch.randn(2, 6, 5, 5, device=device))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(torch.randn(1, 8, 1, 1, device=device))  # BN over a single value
    assert torch.equal(x, x_copy)
    assert _unchanged(block, snap)
    block(x)  # and a good call still works, updating the statistics once
    assert int(block.bn1.num_batches_tracked) == int(snap["bn1.num_batches_tracked"]) + 1
