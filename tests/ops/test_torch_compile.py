"""torch.compile(fullgraph=True) of optimized models: no graph breaks, same results."""
import copy

import torch
from helpers import assert_close, randomize_bn
from torch import nn

import fastres
from fastres import FusedBasicBlock, FusedBottleneck


def _small_resnet():
    ds = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        FusedBasicBlock(16, 16),
        FusedBottleneck(16, 8, 2, ds),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))


def test_compile_fullgraph_optimized_model(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = randomize_bn(_small_resnet()).eval()
    reference_model = copy.deepcopy(model).double()
    fastres.optimize(model)
    compiled = torch.compile(model, fullgraph=True)  # raises on any graph break
    x = torch.randn(2, 3, 9, 9)
    from fastres.launch import conv as conv_launch
    with torch.no_grad():
        before = conv_launch.launch_count()
        out = compiled(x)
        if conv_launch.INTERPRETED or torch.cuda.is_available():
            assert conv_launch.launch_count() - before == 1 + 2 + 3  # the fused kernels ran
        eager = model(x)
        ref = reference_model(x.double())
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    # 3x3 stem, then the deepest path: basic block (2 convs) and bottleneck (3 convs)
    assert_close(out, ref, torch.float32, [27, 144, 144, 16, 72, 8 + 16, 32])


def test_fake_impl_matches_real_output(tmp_path, monkeypatch):
    """The fake (meta) implementation promises the shape/dtype/strides the real one returns."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastres.ops.conv_bn_act import _conv_bn_act
    args = lambda t: (t(2, 8, 7, 7).contiguous(memory_format=torch.channels_last),  # noqa: E731
                      t(16, 8, 3, 3), torch.zeros(16), None, None, None, [2, 2], [1, 1], [1, 1],
                      [1, 1], 1, "relu", 0.0, "ieee")
    real = _conv_bn_act(*args(torch.randn))
    with FakeTensorMode():
        fake = _conv_bn_act(*args(torch.randn))
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype


def test_compile_backward_through_the_fused_op(tmp_path, monkeypatch):
    """Frozen-BN training under torch.compile(fullgraph=True): forward and backward through
    fastres::conv_bn_act's registered autograd, gradients equal to eager fastres."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    block = randomize_bn(FusedBasicBlock(8, 8)).eval()
    compiled_block = copy.deepcopy(block)
    compiled = torch.compile(compiled_block, fullgraph=True)
    x = torch.randn(2, 8, 6, 6)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    block(x1).square().sum().backward()
    compiled(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(compiled_block.named_parameters(), block.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_compile_training_mode_through_the_block_op(tmp_path, monkeypatch):
    """Batch-statistics training under torch.compile(fullgraph=True): fastres::block_train is
    one opaque node with a fake implementation and registered autograd; outputs, gradients,
    running statistics and num_batches_tracked equal eager fastres over two steps."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    from fastres.launch import conv as conv_launch
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    model = randomize_bn(nn.Sequential(FusedBasicBlock(8, 8), FusedBottleneck(8, 4, 2, ds))).train()
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(2):
        x = torch.randn(3, 8, 7, 7)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out1 = model(x1)
        before = conv_launch.launch_count()
        out2 = compiled(x2)
        if conv_launch.INTERPRETED or torch.cuda.is_available():
            assert conv_launch.launch_count() - before == 2 + 4  # one stats conv per conv
        torch.testing.assert_close(out2, out1, rtol=1e-5, atol=1e-5)
        out1.square().sum().backward()
        out2.square().sum().backward()
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(compiled_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, b), c in zip(compiled_model.named_buffers(), model.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)
    assert int(compiled_model[1].bn3.num_batches_tracked) == 2
