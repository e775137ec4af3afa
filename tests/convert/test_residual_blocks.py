"""Residual blocks of any shape (fastres.nn.residual): found by their traced forward, fused in
eval mode with the add and the activation in the last launch's epilogue, checked against the
float64 original, with every drop-in promise of the named blocks: attribute and structure
changes, hooks, train mode, pickling and restore.

Blocks: torchvision's RegNet ResBottleneckBlock (1x1 projection as the second GEMM, grouped
3x3) and MobileNetV2 InvertedResidual (depthwise, ReLU6, no final activation); timm's ResNet-D
Bottleneck (AvgPool2d(ceil_mode) + 1x1 shortcut: the pool runs, the conv is the second GEMM;
odd sizes), the anti-aliased Bottleneck (a pool inside the branch), cspnet's block
(BatchNormAct2d + LeakyReLU), byobnet's BasicBlock (timm gernet), a user block with a 3x3
conv shortcut (its own launch, added as the residual), SE / ECA gates at the end and in the
middle of the branch, pre-activation blocks (with a shared BN -> ReLU before the first conv and
the downsample), RepVGG's sum of three terms, and a BasicBlock with SiLU. Through the kernels
where they run (the interpreter), on the torch path otherwise.
"""
import copy
import io

import pytest
import timm
import torch
import torchvision
from helpers import assert_close, randomize_bn
from torch import nn

import fastres
from fastres.launch import conv as conv_launch
from fastres.nn.blocks import FusedResidualBase
from fastres.nn.residual import input_channels

USES_KERNELS = conv_launch.INTERPRETED


class ConvShortcutBlock(nn.Module):
    """A user block: relu(bn2(conv2(relu(bn1(conv1 x)))) + bn_s(conv_s x)) with a 3x3 shortcut."""

    def __init__(self, cin=6, cout=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.conv_s, self.bn_s = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.act(out + self.bn_s(self.conv_s(x)))


def _timm_block(name, path):
    return timm.create_model(name, pretrained=False).get_submodule(path)


# name: (make the block, conv launches per eval forward, gate passes)
BLOCKS = {
    "tv_regnet_projection": (lambda: torchvision.models.regnet_x_400mf().trunk_output[1][0], 3, 0),
    "tv_mobilenet_v2_inverted_residual": (lambda: torchvision.models.mobilenet_v2(width_mult=0.25).features[3],
                                          3, 0),
    "timm_resnet_d_avgpool_shortcut": (lambda: _timm_block("resnet26d", "layer2.0"), 3, 0),
    # (its pool floors odd sizes, its 1x1 strided shortcut rounds up: even sizes only)
    "timm_antialiased_bottleneck": (lambda: _timm_block("resnetaa50", "layer2.0"), 3, 0),
    "timm_cspnet_leaky_relu": (lambda: _timm_block("cspresnet50", "stages.0.blocks.1"), 3, 0),
    "timm_byobnet_basic": (lambda: _timm_block("gernet_s", "stages.1.0"), 2, 0),
    "user_conv_shortcut": (lambda: ConvShortcutBlock(), 3, 0),
    # SE / ECA gates: at the branch's end (the shortcut conv its own launch), in its middle
    # (after a depthwise conv with SiLU; after a grouped conv)
    "timm_se_basic_block": (lambda: _timm_block("seresnet18", "layer2.0"), 3, 1),
    "timm_eca_bottleneck": (lambda: _timm_block("ecaresnet26t", "layer1.0"), 4, 1),
    "timm_efficientnet_depthwise_se": (lambda: _timm_block("efficientnet_b0", "blocks.2.1"), 3, 1),
    "timm_regnety_grouped_se": (lambda: _timm_block("regnety_002", "s1.b1"), 3, 1),
    # pre-activation (timm resnetv2): BN -> ReLU before the first conv, run as modules; with a
    # downsample both sides start from it; the last conv has no BN
    "timm_preact_bottleneck": (lambda: _timm_block("resnetv2_50", "stages.0.blocks.1"), 3, 0),
    "timm_preact_downsample": (lambda: _timm_block("resnetv2_50", "stages.1.blocks.0"), 3, 0),
    # RepVGG: a 3x3 + a 1x1 (the second GEMM) + a BN of the input (the residual): one launch
    "timm_repvgg_three_terms": (lambda: _timm_block("repvgg_a0", "stages.1.1"), 1, 0),
    "timm_repvgg_stride_2": (lambda: _timm_block("repvgg_a0", "stages.1.0"), 1, 0),
    # a middle fastres does not fuse, run as the block's own traced ops (its chains fused as
    # chains): res2net's split / per-scale convs / concatenation, a selective-kernel and a
    # split-attention block
    "timm_res2net_segment": (lambda: _timm_block("res2net50_14w_8s", "layer2.0"), 2, 0),
    "timm_selective_kernel_segment": (lambda: _timm_block("skresnet18", "layer1.0"), 1, 0),
    "timm_split_attention_segment": (lambda: _timm_block("resnest14d", "layer1.0"), 3, 0),
    # a named BasicBlock whose activation is not ReLU: fused as a residual block
    "timm_basic_block_silu": (lambda: timm.create_model("resnet18", act_layer="silu").layer2[0],
                              2, 0),
}


def _prepare(name):
    make, launches, gates = BLOCKS[name]
    torch.manual_seed(0)
    block = randomize_bn(make()).eval()
    fused = fastres.optimize(nn.Sequential(copy.deepcopy(block)))
    r = fused[0].__dict__.get("_fastres_residual")
    channels = input_channels(block, r) if r else None
    return block, fused, channels, (launches, gates)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_residual_block_fuses_and_matches_float64(name):
    block, fused, channels, (launches, gates) = _prepare(name)
    entry = fastres.fusion_report(fused).find("0")
    assert entry.fused and entry.kind == "residual", str(fastres.fusion_report(fused))
    assert entry.detail.startswith(f"{launches + gates} launch"), entry.detail
    assert isinstance(fused[0], FusedResidualBase) and isinstance(fused[0], type(block))
    # odd sizes: the ResNet-D pool's ceil_mode border
    x = torch.randn(2, channels, *((10, 12) if name == "timm_antialiased_bottleneck" else (9, 11)))
    with torch.no_grad():
        before = conv_launch.launch_count()
        out = fused(x)
        launched = conv_launch.launch_count() - before
        want = copy.deepcopy(block).double()(x.double())
    if "(its own ops)" in entry.detail:  # (the segment's own chains launch too)
        assert launched >= (launches if USES_KERNELS else 0)
    else:
        assert launched == (launches if USES_KERNELS else 0)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    lengths = [c.in_channels // c.groups * c.kernel_size[0] * c.kernel_size[1] for c in convs]
    assert_close(out, want, torch.float32, lengths)


@pytest.mark.skipif(not USES_KERNELS, reason="the kernels run through the interpreter here")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_residual_block_in_half_precision_channels_last(dtype):
    block, fused, channels, _ = _prepare("timm_resnet_d_avgpool_shortcut")
    fused = fused.to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(2, channels, 9, 7).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = fused(x)
        eager = copy.deepcopy(block).to(dtype)(x)
        want = copy.deepcopy(block).double()(x.double())
    assert out.is_contiguous(memory_format=torch.channels_last)
    err = (out.double() - want).abs().max().item()
    eager_err = (eager.double() - want).abs().max().item()
    assert err <= 4 * eager_err, (err, eager_err)


def test_attribute_change_runs_the_blocks_own_forward():
    block, fused, channels, _ = _prepare("tv_mobilenet_v2_inverted_residual")
    fused[0].use_res_connect = False
    block.use_res_connect = False
    assert "use_res_connect" in fused[0].fallback_reason
    x = torch.randn(2, channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x))


def test_hooked_submodule_and_train_mode_run_the_blocks_own_forward():
    block, fused, channels, _ = _prepare("tv_regnet_projection")
    x = torch.randn(2, channels, 8, 8)
    calls = []
    handle = fused[0].f.b[0].register_forward_hook(lambda *a: calls.append(1))
    assert "forward hooks" in fused[0].fallback_reason
    with torch.no_grad():
        torch.testing.assert_close(fused(x), block(x), rtol=1e-5, atol=1e-5)
    assert calls == [1]
    handle.remove()
    assert fused[0].fallback_reason is None
    # train mode: the block's own forward (its chains fused as chains), BN statistics as eager
    fused.train()
    block.train()
    assert "train as their own forward" in fused[0].train_fallback_reason
    out, want = fused(x), block(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    bn, bn_ref = fused[0].f.a[1], block.f.a[1]
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)


def test_pickle_deepcopy_and_restore():
    block, fused, channels, _ = _prepare("timm_byobnet_basic")
    x = torch.randn(1, channels, 8, 8)
    with torch.no_grad():
        out = fused(x)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(fused)):
        assert isinstance(other[0], FusedResidualBase) and other[0].fallback_reason is None
        with torch.no_grad():
            torch.testing.assert_close(other(x), out)
    keys = list(block.state_dict())
    assert [k[2:] for k in fused.state_dict()] == keys
    fastres.restore(fused)
    assert type(fused[0]) is type(block)
    assert not any(k.startswith("_fastres") for m in fused.modules() for k in m.__dict__)


def test_residual_blocks_it_cannot_fuse_are_reported_with_the_reason():
    """DLA's blocks take their shortcut as an argument: called with one input, a downsampling
    one fails (the probe says so); listed with the reason, never skipped silently. Modules that
    are no residual block are not listed."""
    model = timm.create_model("dla34", pretrained=False).eval()
    report = fastres.fusion_report(fastres.optimize(model))
    alone = [e for e in report.entries if not e.fused and e.kind in ("residual", "BasicBlock")]
    assert alone and all("probe input" in e.detail for e in alone), str(report)
    assert not any(e.path.endswith(("conv1", "bn1", "base_layer")) for e in report.entries
                   if e.kind == "residual")


@pytest.mark.parametrize("name", ["timm_se_basic_block", "timm_efficientnet_depthwise_se"])
def test_gated_blocks_run_their_own_forward_where_autograd_records(name):
    """The SE / ECA gate's fused pass is for inference: with gradients recorded the block runs
    its own forward (its conv -> BN chains fused as chains), with the reason."""
    block, fused, channels, _ = _prepare(name)
    x = torch.randn(2, channels, 8, 8, requires_grad=True)
    p = fastres.nn.plan.plan(fused[0], (x,), {})
    assert p.path == "unfused" and "autograd" in p.reason
    out = fused(x)
    out.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    want = block(x_ref)
    want.sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


def test_gated_block_pickles_and_copies():
    block, fused, channels, _ = _prepare("timm_eca_bottleneck")
    x = torch.randn(1, channels, 8, 8)
    with torch.no_grad():
        out = fused(x)  # builds the gate's module (cached, not pickled)
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        buffer.seek(0)
        for other in (torch.load(buffer, weights_only=False), copy.deepcopy(fused)):
            assert "_fastres_traced" not in other[0].__dict__
            torch.testing.assert_close(other(x), out)
