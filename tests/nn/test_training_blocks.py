"""Training-mode fused blocks with autograd (the fused modules' train-mode default, through the
fastres::block_train op): outputs, input and parameter gradients and running statistics equal the
unfused torchvision block in train mode (float64 reference), and a tiny ResNet trains the same."""
import copy

import pytest
import torch
from helpers import (
    DTYPE_IDS,
    DTYPES,
    FORMAT_IDS,
    FORMATS,
    UNIT_ROUNDOFF,
    TinyResNet,
    assert_close_scaled,
    assert_step_as_accurate_as_eager,
    fused,
    kink_free_grad,
    randomize_bn,
    to_format,
    torchvision_block,
)
from torch import nn

import fastres
from fastres import FusedBasicBlock, FusedConv2d


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("downsample", [False, True], ids=["identity", "downsample"])
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_forward_backward_and_running_stats_match_unfused(kind, downsample, dtype, fmt, device):
    """Against float64, fastres must be as accurate as PyTorch's own eager block in the same
    dtype: relative error within 4x eager's, or within 2u. (In bf16 both are several percent
    off on these small batches: BN's backward subtracts per-channel means of rounded values.)"""
    block = randomize_bn(torchvision_block(kind, downsample)).train()
    ref = copy.deepcopy(block).double()
    eager = copy.deepcopy(block).to(device=device, dtype=dtype, memory_format=fmt)
    block = block.to(device=device, dtype=dtype, memory_format=fmt)
    x0 = to_format(torch.randn(4, block.conv1.in_channels, 9, 7, device=device).to(dtype), fmt)
    x, x_eager = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    x_ref = x0.detach().double().cpu().requires_grad_()
    outs = (fused(block)(x), eager(x_eager), ref(x_ref))
    grad = kink_free_grad(outs[2], dtype)
    for out, g in zip(outs, (grad.to(device=device, dtype=dtype),) * 2 + (grad,)):
        out.backward(g)
    assert_step_as_accurate_as_eager((block, eager, ref), outs, (x, x_eager, x_ref), dtype)


# conv -> BN (-> ReLU) chains outside blocks: (C, K, kernel, stride, padding, relu). The first is
# a stem (C=3, 7x7: the flattened reduction with the statistics epilogue).
CHAINS = {"stem_7x7_s2": (3, 16, 7, 2, 3, True), "3x3_no_relu": (10, 12, 3, 1, 1, False)}


@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(CHAINS))
def test_conv_bn_relu_chain_trains_fused(name, dtype, fmt, device):
    """FusedConvBNReLU in train mode runs the training op (one conv -> BN -> ReLU stage) and is
    as accurate as eager's Conv2d + BatchNorm2d + ReLU: output, gradients, running stats."""
    from torchvision.ops.misc import Conv2dNormActivation

    from fastres import FusedConvBNReLU
    C, K, R, stride, padding, relu = CHAINS[name]
    seq = randomize_bn(Conv2dNormActivation(C, K, R, stride, padding,
                                            activation_layer=nn.ReLU if relu else None)).train()
    ref = copy.deepcopy(seq).double()
    eager = copy.deepcopy(seq).to(device=device, dtype=dtype, memory_format=fmt)
    seq = seq.to(device=device, dtype=dtype, memory_format=fmt)
    model = FusedConvBNReLU.from_modules(seq[0], seq[1], relu=relu)
    x0 = to_format(torch.randn(3, C, 13, 11, device=device).to(dtype), fmt)
    x, x_eager = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    x_ref = x0.detach().double().cpu().requires_grad_()
    outs = (model(x), eager(x_eager), ref(x_ref))
    assert "fastres_block_train" in outs[0].grad_fn.name()
    grad = kink_free_grad(outs[2], dtype) if relu else torch.randn_like(outs[2])
    for out, g in zip(outs, (grad.to(device=device, dtype=dtype),) * 2 + (grad,)):
        out.backward(g)
    assert_step_as_accurate_as_eager((model, eager, ref), outs, (x, x_eager, x_ref), dtype)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_strided_view_input(kind, device):
    """A strided view as the block input (not dense in any memory format): same outputs,
    gradients and running statistics as torchvision (fp32, within the fp32 training bound)."""
    block = randomize_bn(torchvision_block(kind, False)).train().to(device)
    ref = copy.deepcopy(block)
    base = torch.randn(3, block.conv1.in_channels, 7, 13, device=device)
    x, x_ref = base.clone().requires_grad_(), base.clone().requires_grad_()
    out, want = fused(block)(x[..., ::2]), ref(x_ref[..., ::2])
    assert_close_scaled(out, want, 32 * UNIT_ROUNDOFF[torch.float32], "output")
    out.square().sum().backward()
    want.square().sum().backward()
    assert_close_scaled(x.grad, x_ref.grad, 32 * UNIT_ROUNDOFF[torch.float32], "input grad")
    for (name, p), q in zip(block.named_parameters(), ref.parameters()):
        assert_close_scaled(p.grad, q.grad, 32 * UNIT_ROUNDOFF[torch.float32], name)
    for (name, b), c in zip(block.named_buffers(), ref.buffers()):
        assert_close_scaled(b, c, 32 * UNIT_ROUNDOFF[torch.float32], name)


def test_gradient_accumulation(device):
    block = randomize_bn(torchvision_block("bottleneck", True)).train().to(device)
    ref = copy.deepcopy(block)
    xs = [torch.randn(2, 24, 8, 8, device=device) for _ in range(2)]
    for x in xs:
        fused(block)(x).square().mean().backward()
        ref(x).square().mean().backward()
    for (name, p), q in zip(block.named_parameters(), ref.parameters()):
        assert_close_scaled(p.grad, q.grad, 32 * UNIT_ROUNDOFF[torch.float32], name)





def test_tiny_resnet_trains_like_the_reference(device):
    """12 SGD steps on synthetic data: losses and weights track the unfused model."""
    torch.manual_seed(0)
    ref = TinyResNet().to(device).train()
    model = fastres.optimize(copy.deepcopy(ref))
    assert all(isinstance(b, FusedBasicBlock) for b in model.blocks)
    assert isinstance(model.stem[0], FusedConv2d)  # the stem trains fused too
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    data = torch.randn(8, 3, 8, 8, device=device)
    target = torch.randint(0, 4, (8,), device=device)
    losses, ref_losses = [], []
    for _ in range(12):
        for m, o, log in ((model, opt, losses), (ref, opt_ref, ref_losses)):
            o.zero_grad()
            loss = nn.functional.cross_entropy(m(data), target)
            loss.backward()
            o.step()
            log.append(loss.item())
    # Stated tolerance: fp32 differences of ~1e-6 per step, grown by 12 steps of SGD with
    # momentum on a network this small, stay below 1e-3. (This tracks a whole training run; the
    # gradients themselves are checked tightly per block above.)
    assert max(abs(a - b) for a, b in zip(losses, ref_losses)) < 1e-3, (losses, ref_losses)
    assert losses[-1] < losses[0]  # it does learn
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close_scaled(p, q, 1e-3, name)


def test_without_kernels_a_whole_model_trains_exactly_like_eager(device, monkeypatch):
    """Where the kernels do not run (the CPU torch path), an optimized model in train mode is
    the original model, bit for bit: outputs, gradients, running statistics."""
    monkeypatch.setenv("FASTRES_BACKEND", "torch")
    ref = TinyResNet().to(device).train()
    model = fastres.optimize(copy.deepcopy(ref))
    assert isinstance(model.stem[0], FusedConv2d)
    x = torch.randn(4, 3, 8, 8, device=device)
    for _ in range(2):
        out, want = model(x), ref(x)
        assert torch.equal(out, want)
        out.square().sum().backward()
        want.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        assert torch.equal(b, c), name
