"""Training where users train: a float64 gradcheck of the training op's autograd formula,
autocast (AMP), and DistributedDataParallel (gloo backend, 2 processes)."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import (
    TinyResNet,
    assert_close_scaled,
    assert_step_as_accurate_as_eager,
    free_port,
    fused,
    kink_free_grad,
    randomize_bn,
    relative_error,
    torchvision_block,
)
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

import fastres
from fastres.launch import conv as conv_launch
from fastres.nn.blocks import block_train

USES_KERNELS = conv_launch.INTERPRETED or torch.cuda.is_available()


# ---- gradcheck ------------------------------------------------------------------------------------

class _BlockOp(nn.Module):
    """Calls the training op on a block, so functional_call can swap the block's parameters."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return block_train(self.block, x)


TINY_BLOCKS = {
    "basic_downsample": (lambda: BasicBlock(3, 4, 2, nn.Sequential(nn.Conv2d(3, 4, 1, 2, bias=False),
                                                                    nn.BatchNorm2d(4))), 3),
    "basic_identity": (lambda: BasicBlock(4, 4), 4),
    "bottleneck_downsample": (lambda: Bottleneck(4, 2, 2, nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False),
                                                                        nn.BatchNorm2d(8))), 4),
    "bottleneck_identity": (lambda: Bottleneck(8, 2), 8),
}


@pytest.mark.parametrize("name", list(TINY_BLOCKS))
def test_gradcheck_float64(name):
    """The op's backward is the derivative of its forward, checked by finite differences in
    float64 with respect to the input and every conv and BN parameter. The Triton kernels take
    fp32/fp16/bf16 only, so float64 runs the op's torch implementation: what this checks is the
    autograd formula (BN/ReLU backward, the recomputed activations, the shortcut's two paths),
    which the kernels implement and the kernel tests compare against float64 autograd."""
    make, channels = TINY_BLOCKS[name]
    block = randomize_bn(make()).double().train()
    wrapper = _BlockOp(block)
    names = [f"block.{n}" for n, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in block.parameters()]
    x = torch.randn(2, channels, 5, 5, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(wrapper, dict(zip(names, ps)), (x,))

    assert "fastres_block_train" in f(x, *params).grad_fn.name()
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


# ---- autocast ----------------------------------------------------------------------------------

def _autocast_dtype(device):
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def _autocast_models(kind, train, device):
    """(the torchvision block, its float64 copy, its eager copy and a fastres copy on device)."""
    block = randomize_bn(torchvision_block(kind, True)).train(train)
    return (block, copy.deepcopy(block).double(), copy.deepcopy(block).to(device),
            fused(copy.deepcopy(block).to(device)))


@pytest.mark.skipif(not USES_KERNELS, reason="the fused training path needs CUDA or the interpreter")
@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_autocast_training_is_as_accurate_as_eager_autocast(kind, device):
    """Under torch.autocast (fp16 on CUDA, bf16 on the CPU) the fused block computes in the
    autocast dtype as eager does, keeps fp32 parameters, gradients and running statistics, and
    is as accurate against float64 as eager's autocast block."""
    dtype = _autocast_dtype(device)
    block, ref, eager, model = _autocast_models(kind, True, device)
    x0 = torch.randn(4, block.conv1.in_channels, 9, 7, device=device)
    x, x_eager = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    x_ref = x0.double().cpu().requires_grad_()
    with torch.autocast(device.type, dtype=dtype):
        before = conv_launch.launch_count()
        out = model(x)
        n_convs = (3 if kind == "basic" else 4)  # with the downsample
        assert conv_launch.launch_count() - before == n_convs  # the fused training path ran
        out_eager = eager(x_eager)
    out_ref = ref(x_ref)
    assert out.dtype == out_eager.dtype == dtype
    grad = kink_free_grad(out_ref, dtype)
    out.backward(grad.to(device=device, dtype=dtype))
    out_eager.backward(grad.to(device=device, dtype=dtype))
    out_ref.backward(grad)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert_step_as_accurate_as_eager((model, eager, ref), (out, out_eager, out_ref),
                                     (x, x_eager, x_ref), dtype)


@pytest.mark.parametrize("kind", ["basic", "bottleneck"])
def test_autocast_eval_folds_into_the_autocast_dtype(kind, device):
    """Eval under autocast: the input and the folded weights are cast to the autocast dtype,
    the output has eager's dtype, and the error is eager autocast's."""
    dtype = _autocast_dtype(device)
    block, ref, eager, model = _autocast_models(kind, False, device)
    x = torch.randn(2, block.conv1.in_channels, 9, 7, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        out, out_eager = model(x), eager(x)
    out_ref = ref(x.double().cpu())
    assert out.dtype == out_eager.dtype == dtype
    assert relative_error(out, out_ref) <= max(4 * relative_error(out_eager, out_ref), 2 ** -8)


# ---- DistributedDataParallel -------------------------------------------------------------------




def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        ref = TinyResNet().train()
        model = fastres.optimize(copy.deepcopy(ref))
        ddp_models = [nn.parallel.DistributedDataParallel(m) for m in (model, ref)]
        opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, ref)]
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own shard
        losses = [[], []]
        for _ in range(4):
            data = torch.randn(4, 3, 8, 8, generator=gen)
            target = torch.randint(0, 4, (4,), generator=gen)
            for m, opt, log in zip(ddp_models, opts, losses):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(m(data), target)
                loss.backward()
                opt.step()
                log.append(loss.item())
        torch.save({"losses": losses, "fused": model.state_dict(), "ref": ref.state_dict(),
                    "kernel_launches": conv_launch.launch_count()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_distributed_data_parallel_gloo_two_processes(tmp_path):
    """Two processes, gloo, each training on its own data shard: the fused model's gradients
    all-reduce like the unfused one's, so both ranks end with identical weights that track the
    unfused DDP model's."""
    world = 2
    mp.spawn(_ddp_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for res in results:
        assert res["kernel_launches"] > 0 or not USES_KERNELS  # the fused blocks ran
        fused_losses, ref_losses = res["losses"]
        assert max(abs(a - b) for a, b in zip(fused_losses, ref_losses)) < 1e-3
        for name, value in res["fused"].items():
            assert_close_scaled(value.float(), res["ref"][name].float(), 1e-3, name)
    for name, value in results[0]["fused"].items():
        if "running" in name or "num_batches" in name:
            continue  # BN statistics are per-process (DDP broadcasts rank 0's before forwards)
        assert torch.equal(value, results[1]["fused"][name]), name


# ---- launches per training step -----------------------------------------------------------------

class _CountingKernel:
    """Stands in for a @triton.jit kernel and counts its launches (kernel[grid](...))."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.skipif(not USES_KERNELS, reason="counts the Triton launches")
@pytest.mark.parametrize("kind, downsample, forward, backward", [
    ("basic", False, 5, 7), ("basic", True, 7, 7), ("bottleneck", False, 7, 11),
    ("bottleneck", True, 9, 11)])
def test_triton_launches_per_training_step(kind, downsample, forward, backward, device,
                                           monkeypatch):
    """Forward: one stats conv per conv, one BN finalize per BN, one elementwise tail. Backward:
    three BN+ReLU launches per BN (the last BN and the downsample's share theirs) and one
    activation recompute per inner stage; the conv gradients are aten convolution_backward
    calls (cuDNN on a GPU) and not counted here."""
    from fastres.launch import bn as bn_launch
    counters = []
    for name in ("bn_act_kernel", "bn_finalize_kernel", "bn_backward_reduce_kernel",
                 "bn_backward_finalize_kernel", "bn_backward_apply_kernel"):
        counter = _CountingKernel(getattr(bn_launch, name))
        monkeypatch.setattr(bn_launch, name, counter)
        counters.append(counter)
    model = fused(randomize_bn(torchvision_block(kind, downsample)).to(device).train())
    x = torch.randn(2, model.conv1.in_channels, 6, 6, device=device, requires_grad=True)
    convs_before = conv_launch.launch_count()
    out = model(x)
    launched = conv_launch.launch_count() - convs_before + sum(c.launches for c in counters)
    assert launched == forward
    out.sum().backward()
    assert conv_launch.launch_count() - convs_before + sum(c.launches for c in counters) \
        == forward + backward
