"""Training-mode fused forward (issue 4, in progress): outputs and running statistics equal to
the unfused torchvision block in train mode, float64 reference."""
import copy

import pytest
import torch
from helpers import (
    DTYPE_IDS,
    DTYPES,
    FORMAT_IDS,
    FORMATS,
    UNIT_ROUNDOFF,
    randomize_bn,
    to_format,
    torchvision_block,
)

from fastres import reference
from fastres.launch.bn import bn_act
from fastres.nn.blocks import block_train_forward


def _formula(kind):
    return reference.basic_block_reference if kind == "basic" else reference.bottleneck_reference


def _check_stats(block, ref_block, dtype):
    tol = 8 * UNIT_ROUNDOFF[dtype]
    for (name, b), r in zip(block.named_buffers(), ref_block.buffers()):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b.cpu(), r), name
        else:
            torch.testing.assert_close(b.double().cpu(), r, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_train_forward_matches_unfused(kind, downsample, dtype, fmt, device):
    block = randomize_bn(torchvision_block(kind, downsample)).train()
    ref_block = copy.deepcopy(block).double()
    block = block.to(device=device, dtype=dtype, memory_format=fmt)
    x = to_format(torch.randn(4, block.conv1.in_channels, 9, 7, device=device).to(dtype), fmt)
    with torch.no_grad():
        out = block_train_forward(block, x)
        ref = _formula(kind)(ref_block, x.double().cpu())
    # Batch-normalised outputs are O(1); each stage's rounding is amplified by at most its BN
    # scale, so the bound is the dtype's roundoff times a small stage-count factor.
    tol = 16 * UNIT_ROUNDOFF[dtype]
    assert out.shape == ref.shape and out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)
    _check_stats(block, ref_block, dtype)


def test_cumulative_average_momentum_none_over_two_batches(device):
    block = randomize_bn(torchvision_block("bottleneck", True, momentum=None)).train()
    ref_block = copy.deepcopy(block).double()
    block = block.to(device)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(2, 24, 8, 8, device=device)
            block_train_forward(block, x)
            reference.bottleneck_reference(ref_block, x.double().cpu())
    _check_stats(block, ref_block, torch.float32)
    assert int(block.bn1.num_batches_tracked) == 2


def test_no_running_stats_normalises_with_batch_stats(device):
    block = torchvision_block("basic", True, track_running_stats=False).train()
    ref_block = copy.deepcopy(block).double()
    block = block.to(device)
    x = torch.randn(3, 12, 8, 8, device=device)
    with torch.no_grad():
        out = block_train_forward(block, x)
        ref = reference.basic_block_reference(ref_block, x.double().cpu())
    tol = 16 * UNIT_ROUNDOFF[torch.float32]
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol)
    assert block.bn1.running_mean is None


def test_bn_act_elementwise_tail(device):
    y = torch.randn(2, 5, 3, 4, device=device).contiguous(memory_format=torch.channels_last)
    r = torch.randn_like(y)
    s, b, rs, rb = (torch.randn(5, device=device) for _ in range(4))
    out = bn_act(y, s, b, residual=r, residual_scale=rs, residual_shift=rb)
    v = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    torch.testing.assert_close(out, torch.relu(y * v(s) + v(b) + r * v(rs) + v(rb)))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(bn_act(y.contiguous(), s, b, relu=False), y * v(s) + v(b))
    with pytest.raises(ValueError, match="strides"):
        bn_act(y, s, b, residual=r.contiguous())
