"""Drop-in means drop-in: an optimize()d model keeps behaving like the user's model in every way
users rely on - outputs after train/eval switches and every kind of in-place update, hooks,
parametrizations, custom blocks, isinstance, shared modules, pickling, tracing/scripting/export,
bad input. Each test compares with the unconverted model going through the same steps."""
import copy
import io
import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from helpers import UNIT_ROUNDOFF, free_port, randomize_bn
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune
from torchvision.models.resnet import BasicBlock

import fastres
import fastres.nn.blocks
import fastres.nn.plan
from fastres import FusedBasicBlock, FusedConv2d
from fastres.launch import conv as conv_launch


class TinyNet(nn.Module):
    """A torchvision-style ResNet, small enough for the interpreter: stem conv/bn1/relu, a
    BasicBlock with an identity shortcut and one with a downsample, pooling and a classifier."""

    def __init__(self, width=16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        ds = nn.Sequential(nn.Conv2d(width, 24, 1, 2, bias=False), nn.BatchNorm2d(24))
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, 24, 2, ds))
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _pair(model=None):
    """(unconverted model, optimize()d deep copy), BN statistics randomised, eval mode."""
    original = randomize_bn(model if model is not None else TinyNet()).eval()
    return original, fastres.optimize(copy.deepcopy(original))


def _x(batch=2, size=8, channels=3, seed=0):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def assert_matches(fused, original, x):
    """fused(x) is as close to the float64 computation of `original` as eager fp32 is (within
    4x eager's error or 2u of the output scale: the tests' whole-model rule)."""
    with torch.no_grad():
        want = copy.deepcopy(original).double()(x.double())
        got, eager = fused(x).double(), original(x).double()
    err, eager_err = (got - want).abs().max().item(), (eager - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= max(4 * eager_err, 2 * UNIT_ROUNDOFF[torch.float32] * scale), (err, eager_err, scale)


def _train_forward(model, x):
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


# ---- 1. folded weights never go stale ------------------------------------------------------------

def test_eval_train_eval_refolds_the_updated_statistics():
    """m.eval(); m(x); m.train(); m(x2); m.eval(); m(x): torch's BN kernels update the running
    statistics without bumping version counters, so the fold must be invalidated by the
    train-mode forward itself - for the blocks and for the optimize()d stem."""
    original, fused = _pair()
    x = _x()
    assert_matches(fused, original, x)
    for m in (original, fused):
        _train_forward(m, _x(seed=1) * 2 + 1)
    assert_matches(fused, original, x)


def test_frozen_backbone_with_head_steps_then_eval():
    """A frozen backbone left in train mode for a few head steps, then eval: argmax agrees."""
    original, fused = _pair()
    x = _x(batch=6)
    for m in (original, fused):
        with torch.no_grad():
            m(x)  # eval forward first: the fold is cached
        m.train()
        for p in m.parameters():
            p.requires_grad_(False)
        m.fc.weight.requires_grad_(True)
        opt = torch.optim.SGD([m.fc.weight], lr=0.1)
        for step in range(2):
            F.cross_entropy(m(_x(batch=6, seed=step) + 0.5), torch.arange(6)).backward()
            opt.step()
        m.eval()
    with torch.no_grad():
        assert torch.equal(fused(x).argmax(1), original(x).argmax(1))
    assert_matches(fused, original, x)


def _update_bn(m):
    torch.optim.swa_utils.update_bn([_x(seed=3) + 1], m)


def _momentum_none(m):
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None
    _train_forward(m, _x(seed=4) - 1)


def _optimizer_step(optimizer, **kwargs):
    def step(m):
        # Frozen-BN fine-tuning: BNs stay in eval mode, the convs and BN affines train.
        opt = optimizer(m.parameters(), lr=0.5, **kwargs)
        m(_x(seed=5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return step


def _load_state_dict_assign(m):
    state = {k: v * 1.5 if v.is_floating_point() else v for k, v in m.state_dict().items()}
    m.load_state_dict(state, assign=True)


def _copy_under_no_grad(m):
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_var.copy_(bn.running_var * 3)
                bn.weight.copy_(-bn.weight)


def _ema_lerp(m):
    # What timm's ModelEmaV3 does: lerp every parameter and buffer towards another model's.
    with torch.random.fork_rng():
        torch.manual_seed(7)
        other = randomize_bn(TinyNet(), seed=7)
    with torch.no_grad():
        for a, b in zip(m.state_dict().values(), other.state_dict().values()):
            if a.is_floating_point():
                a.lerp_(b, 0.5)


def _inference_mode_edit(m):
    with torch.inference_mode():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.add_(0.5)
        m.layer1[0].conv1.weight.mul_(-1)


WRITERS = {
    "swa_update_bn": _update_bn, "momentum_none": _momentum_none,
    "sgd_foreach": _optimizer_step(torch.optim.SGD, momentum=0.9, foreach=True),
    "adamw_fused": _optimizer_step(torch.optim.AdamW, fused=True),
    "adamw_for_loop": _optimizer_step(torch.optim.AdamW, foreach=False),
    "load_state_dict_assign": _load_state_dict_assign, "copy_no_grad": _copy_under_no_grad,
    "ema_lerp": _ema_lerp, "inference_mode_edit": _inference_mode_edit,
}


@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_of_bn_buffers_and_parameters_is_seen(writer):
    """The fold is cached by a first eval forward; each writer changes BN buffers or conv/BN
    parameters the way users do; the next eval forward must use the new values."""
    original, fused = _pair()
    x = _x()
    assert_matches(fused, original, x)
    for m in (original, fused):
        WRITERS[writer](m)
        m.eval()
    assert_matches(fused, original, x)


def test_timm_model_ema_v3_of_an_optimized_model():
    from timm.utils import ModelEmaV3
    original, fused = _pair()
    emas = [ModelEmaV3(m, decay=0.5) for m in (original, fused)]
    x = _x()
    assert_matches(emas[1].module, emas[0].module, x)
    for m, ema in zip((original, fused), emas):
        _copy_under_no_grad(m)
        ema.update(m, step=10)
    assert_matches(emas[1].module, emas[0].module, x)


def _ddp_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        original, fused = _pair()
        ddps = [nn.parallel.DistributedDataParallel(m) for m in (original, fused)]
        x = _x(seed=9)
        outs = []
        for step in range(3):
            for d in ddps:
                d.eval()
                with torch.no_grad():
                    outs.append(d(x))
                d.train()
                d(_x(seed=10 + 2 * step + rank) * (1 + rank)).sum().backward()
        for d in ddps:
            d.eval()
            with torch.no_grad():
                outs.append(d(x))
        torch.save(outs, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_broadcast_buffers_between_train_and_eval(tmp_path):
    """DDP broadcasts rank 0's BN buffers before each forward without bumping version counters;
    on rank 1 the fused model's eval outputs must still follow the unfused DDP model's."""
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        outs = torch.load(tmp_path / f"rank{rank}.pt")
        for original_out, fused_out in zip(outs[0::2], outs[1::2]):
            torch.testing.assert_close(fused_out, original_out, rtol=1e-4, atol=1e-4)


# ---- 3. hooks and reparametrisations ------------------------------------------------------------

REPARAMETRIZE = {
    "spectral_norm": lambda conv: parametrizations.spectral_norm(conv),
    "weight_norm": lambda conv: parametrizations.weight_norm(conv),
    "parametrize": lambda conv: parametrize.register_parametrization(conv, "weight", _Doubled()),
    "prune": lambda conv: prune.l1_unstructured(conv, "weight", amount=0.5),
    "old_weight_norm": lambda conv: torch.nn.utils.weight_norm(conv),
    "old_spectral_norm": lambda conv: torch.nn.utils.spectral_norm(conv),
}


class _Doubled(nn.Module):
    def forward(self, w):
        return 2 * w


def _seeded(fn, seed=0):
    """fn() with the global RNG seeded (reparametrisations draw random vectors), restored after."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return fn()


@pytest.mark.parametrize("how", list(REPARAMETRIZE))
@pytest.mark.parametrize("when", ["before", "after"])
def test_reparametrized_conv_inside_a_block(how, when):
    """A parametrization or hook-based reparametrisation on a block's conv: the block is left
    alone (before optimize()) or runs unfused (added after), exactly as the original. (Models
    with old-style weight_norm or pruning cannot be deep-copied, so each is built twice.)"""
    def build():
        model = randomize_bn(TinyNet()).eval()
        if when == "before":
            REPARAMETRIZE[how](model.layer1[0].conv2)
        return model
    original, fused = _seeded(build), fastres.optimize(_seeded(build))
    if when == "before":
        entry = fastres.fusion_report(fused).find("layer1.0")
        assert not entry.fused and "conv2" in entry.detail, entry
    else:
        for m in (original, fused):
            _seeded(lambda: REPARAMETRIZE[how](m.layer1[0].conv2), seed=1)
        assert fused.layer1[0].fallback_reason
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), original(x), rtol=1e-4, atol=1e-5)


class _Recorder:
    """A forward hook (module, args, output) or pre-hook (module, args) that keeps a copy of
    the tensor it saw (the output, or the first argument)."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, args, output=None):
        self.calls.append((output if output is not None else args[0]).detach().clone())


def _hooked_pair(path, kind, when):
    """A TinyNet pair with a recording hook of `kind` on the module at `path` (registered on
    both models, before or after optimize()); returns models, recorders and how many times the
    fused model's hook fired during optimize()."""
    model = randomize_bn(TinyNet()).eval()
    original = model
    fused_src = copy.deepcopy(model)
    recs = [_Recorder(), _Recorder()]

    def register(m, rec):
        target = m.get_submodule(path)
        getattr(target, f"register_{kind}")(rec)
    register(original, recs[0])
    if when == "before":
        register(fused_src, recs[1])
    fused = fastres.optimize(fused_src)
    during = len(recs[1].calls)
    if when == "after":
        register(fused, recs[1])
    return original, fused, recs, during


HOOK_SITES = ["layer1.0", "layer1.0.conv1", "layer1.0.bn2", "layer1.1.downsample.1", "conv1",
              "bn1", "relu"]


@pytest.mark.parametrize("path", HOOK_SITES)
@pytest.mark.parametrize("kind", ["forward_hook", "forward_pre_hook"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_hooks_keep_firing_with_the_tensors_they_saw_before(path, kind, when):
    """Hooks on blocks, on their convs/BNs and on the stem's conv/BN/ReLU: optimize() never runs
    them (not even on its probe), and afterwards they fire as often as on the unconverted model,
    with the same tensors (the module is left alone, or runs unfused while hooked)."""
    original, fused, recs, during = _hooked_pair(path, kind, when)
    assert during == 0
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), original(x), rtol=1e-4, atol=1e-5)
    assert len(recs[1].calls) == len(recs[0].calls) == 1
    torch.testing.assert_close(recs[1].calls[0], recs[0].calls[0], rtol=1e-4, atol=1e-5)


def test_global_hooks_are_never_run_by_optimize_and_fire_as_before():
    fired = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: fired.append(type(m)))
    try:
        original, fused = _pair(_UserNet(_ToggleBlock))
        assert not fired  # no probe, no torch.fx trace ran it
        x = _x(channels=16)
        with torch.no_grad():
            fused(x)
            n_fused = len(fired)
            fired.clear()
            original(x)
        assert n_fused == len(fired)
    finally:
        handle.remove()


def test_backward_hook_on_a_conv_inside_a_block():
    original, fused = _pair()
    grads = [[], []]
    for m, g in zip((original, fused), grads):
        m.layer1[1].conv2.register_full_backward_hook(lambda mod, gi, go, g=g: g.append(go[0].clone()))
        m(_x()).sum().backward()
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-4, atol=1e-5)


# ---- 4. custom blocks ---------------------------------------------------------------------------

class _ToggleBlock(nn.Module):
    """A user block whose forward reads a plain attribute."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c)
        self.downsample = None
        self.use_residual = True
        self.tag = "mine"

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + x) if self.use_residual else F.relu(out)


class _BatchDependentBlock(_ToggleBlock):
    def forward(self, x):
        out = super().forward(x)
        return out * 0.5 if x.shape[0] > 2 else out


class _SizeDependentBlock(_ToggleBlock):
    def forward(self, x):
        out = super().forward(x)
        return out.flip(-1) if x.shape[-1] > 12 else out


class _NeedsLargeInputBlock(_ToggleBlock):
    """Computes the torchvision formula but refuses small images (as anti-aliasing or dilated
    blocks do)."""

    def forward(self, x):
        if x.shape[-1] < 30:
            raise RuntimeError("input too small")
        return super().forward(x)


class _UserNet(nn.Module):
    def __init__(self, block_cls, c=16):
        super().__init__()
        self.body = nn.Sequential(block_cls(c), block_cls(c))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("cls", [_BatchDependentBlock, _SizeDependentBlock])
def test_block_that_differs_at_other_shapes_is_left_alone(cls):
    original, fused = _pair(_UserNet(cls))
    assert not any(e.fused for e in fastres.fusion_report(fused).entries), fastres.fusion_report(fused)
    for batch, size in ((1, 9), (3, 16), (4, 33)):
        x = _x(batch, size, 16)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), original(x))


def test_plain_attributes_stay_reachable_and_toggling_them_is_honoured():
    original, fused = _pair(_UserNet(_ToggleBlock))
    block = fused.body[0]
    assert isinstance(block, FusedBasicBlock) and isinstance(block, _ToggleBlock)
    assert block.tag == "mine" and block.use_residual is True
    x = _x(2, 9, 16)
    assert_matches(fused, original, x)
    for m in (original, fused):
        m.body[0].use_residual = False
        m.body[1].tag = "changed"
    assert "use_residual" in block.fallback_reason
    assert_matches(fused, original, x)
    for m in (original, fused):
        m.body[0].use_residual = True
    assert block.fallback_reason is None
    assert_matches(fused, original, x)


def test_block_that_needs_a_larger_input_is_probed_at_a_size_it_accepts():
    original, fused = _pair(_UserNet(_NeedsLargeInputBlock))
    report = fastres.fusion_report(fused)
    assert report.find("body.0").fused and report.find("body.1").fused, report
    assert_matches(fused, original, _x(1, 31, 16))


def test_known_forwards_are_not_probed_and_others_can_be_trusted(monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("a known or trusted forward was probed")
    monkeypatch.setattr(fastres.nn.blocks, "probe_reason", no_probe)
    original, fused = _pair()  # torchvision blocks
    assert all(e.fused for e in fastres.fusion_report(fused).entries)
    import timm
    fastres.optimize(timm.create_model("resnet18", pretrained=False, num_classes=10))
    original, fused = randomize_bn(_UserNet(_ToggleBlock)).eval(), None
    fused = fastres.optimize(copy.deepcopy(original), trust=(_ToggleBlock,))
    assert all(e.fused for e in fastres.fusion_report(fused).entries)
    assert_matches(fused, original, _x(2, 9, 16))


def test_block_called_with_extra_arguments_runs_its_own_forward():
    class WithShortcut(_ToggleBlock):  # as timm's DLA blocks: forward(x, shortcut=None)
        def forward(self, x, shortcut=None):
            shortcut = x if shortcut is None else shortcut
            out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(out + shortcut)
    original = randomize_bn(WithShortcut(16)).eval()
    holder = fastres.optimize(nn.Sequential(copy.deepcopy(original)))
    fused = holder[0]
    assert isinstance(fused, FusedBasicBlock)
    x, s = _x(2, 9, 16), _x(2, 9, 16, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, s), original(x, s), rtol=0, atol=0)
        torch.testing.assert_close(fused(x, shortcut=s), original(x, shortcut=s), rtol=0, atol=0)


def test_from_block_fuses_in_place():
    block = randomize_bn(BasicBlock(16, 16)).eval()
    same = FusedBasicBlock.from_block(block)
    assert same is block and isinstance(block, FusedBasicBlock) and isinstance(block, BasicBlock)
    refused = BasicBlock(16, 16)
    refused.conv1.padding_mode = "reflect"
    with pytest.raises(ValueError, match="padding_mode"):
        FusedBasicBlock.from_block(refused)


# ---- 5. isinstance, 6. shared modules -----------------------------------------------------------

def test_fused_blocks_pass_isinstance_of_the_class_they_replace(monkeypatch):
    monkeypatch.setenv("FASTRES_BACKEND", "torch")  # full-size models: the folded torch path
    original, fused = _pair(torchvision.models.resnet18(num_classes=10))
    blocks = [m for m in fused.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 and all(isinstance(b, FusedBasicBlock) for b in blocks)
    assert isinstance(fused.conv1, nn.Conv2d) and isinstance(fused.bn1, nn.BatchNorm2d)
    # A user loop that zero-inits every block's last BN finds them all.
    for m in (original, fused):
        for b in m.modules():
            if isinstance(b, BasicBlock):
                nn.init.zeros_(b.bn2.weight)
    assert_matches(fused, original, _x(1, 32))
    import timm
    tm = fastres.optimize(timm.create_model("resnet50", pretrained=False, num_classes=10))
    assert sum(isinstance(m, timm.models.resnet.Bottleneck) for m in tm.modules()) == 16


class _SharedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = BasicBlock(16, 16)
        self.again = self.block  # one block object under two names, used twice

    def forward(self, x):
        return self.again(self.block(self.stem(x)))


def test_shared_block_instance_is_fused_once_and_reported_truthfully():
    original, fused = _pair(_SharedNet())
    report = fastres.fusion_report(fused)
    assert fused.block is fused.again and isinstance(fused.block, FusedBasicBlock)
    assert type(fused.block.conv1) is nn.Conv2d  # the chain pass never reached inside
    for e in report.entries:
        m = fused.get_submodule(e.path)
        assert e.fused == (isinstance(m, (FusedBasicBlock, FusedConv2d)) and m.fallback_reason is None), e
    assert {e.path for e in report.fused} >= {"block", "again", "stem.0"}
    assert_matches(fused, original, _x())


def test_shared_conv_under_two_names_is_not_fused_twice():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn1, self.bn2 = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
            self.alias = self.conv

        def forward(self, x):
            return self.bn1(self.conv(x)) + self.bn2(self.alias(x))
    original, fused = _pair(Net())
    assert not fastres.fusion_report(fused).fused
    assert_matches(fused, original, _x())


# ---- 7. pickling, 8. prune/weight_norm, 9. inference_mode ----------------------------------------

@pytest.mark.parametrize("how", ["torch_save", "pickle", "deepcopy"])
def test_pickling_and_deepcopy_at_any_time(how):
    original, fused = _pair()
    x = _x()
    with torch.no_grad():
        fused(x)  # caches filled

    def roundtrip(m):
        if how == "deepcopy":
            return copy.deepcopy(m)
        if how == "pickle":
            return pickle.loads(pickle.dumps(m))
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)
    copied = roundtrip(fused)
    assert type(copied.layer1[0]) is type(fused.layer1[0]) and isinstance(copied.conv1, FusedConv2d)
    assert str(fastres.fusion_report(copied)) == str(fastres.fusion_report(fused))
    assert_matches(copied, original, x)
    with torch.no_grad():  # the copy is independent of the original's cache
        for m in (original, copied):
            m.bn1.running_mean.add_(1)
    assert_matches(copied, original, x)
    fastres.restore(copied)
    assert type(copied.layer1[0]) is BasicBlock and type(copied.conv1) is nn.Conv2d


def test_optimize_on_pruned_and_weight_normed_models_names_the_module():
    """Such models cannot even be deep-copied; optimize() must not try (it used to, in its
    probe): the hooked convs' block and chain are left alone, each with its module named."""
    def build():
        model = randomize_bn(TinyNet()).eval()
        prune.l1_unstructured(model.layer1[0].conv1, "weight", amount=0.3)
        torch.nn.utils.weight_norm(model.layer1[1].conv2)
        prune.l1_unstructured(model.conv1, "weight", amount=0.3)
        return model
    original, fused = _seeded(build), fastres.optimize(_seeded(build))
    report = fastres.fusion_report(fused)
    assert "conv1" in report.find("layer1.0").detail and "pre-hook" in report.find("layer1.0").detail
    assert "conv2" in report.find("layer1.1").detail
    assert not report.find("conv1").fused
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), original(x), rtol=1e-4, atol=1e-5)


def test_model_built_under_inference_mode():
    with torch.inference_mode():
        original = randomize_bn(TinyNet()).eval()
        fused = fastres.optimize(copy.deepcopy(original))
        x = _x()
        torch.testing.assert_close(fused(x), original(x), rtol=1e-4, atol=1e-5)
        for m in (original, fused):
            m.bn1.running_mean.add_(1)  # an inference-mode edit: no version counter to see
        torch.testing.assert_close(fused(x), original(x), rtol=1e-4, atol=1e-5)


# ---- 10. tracing, scripting, export, feature extraction ------------------------------------------

def test_jit_trace_records_the_fold_and_checks():
    original, fused = _pair()
    x = _x()
    with torch.no_grad():
        traced = torch.jit.trace(fused, x)  # check_trace on: two traces must agree
        torch.testing.assert_close(traced(x), original(x), rtol=1e-4, atol=1e-5)
        for m in (original, fused):
            m.layer1[0].bn1.running_var.mul_(4)  # no folded constant frozen into the trace
        torch.testing.assert_close(traced(x), original(x), rtol=1e-4, atol=1e-5)


def test_jit_script_raises_a_clear_error_naming_restore():
    _, fused = _pair()
    with pytest.raises(RuntimeError, match=r"fastres\.restore"):
        torch.jit.script(fused)
    torch.jit.script(fastres.restore(fused))  # the way out works


def test_feature_extractor_traces_the_unfused_modules_and_keeps_the_mode():
    from torchvision.models.feature_extraction import create_feature_extractor
    original, fused = _pair()
    extractor = create_feature_extractor(fused, {"layer1.0": "a", "fc": "out"})
    assert not fused.training and not extractor.training
    x = _x()
    ref = create_feature_extractor(original, {"layer1.0": "a", "fc": "out"})
    with torch.no_grad():
        got, want = extractor(x), ref(x)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)


def test_torch_export_of_an_optimized_model():
    original, fused = _pair()
    x = _x()
    program = torch.export.export(fused, (x,))
    torch.testing.assert_close(program.module()(x), original(x), rtol=1e-4, atol=1e-5)
    names = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("fastres" in n for n in names), names


# ---- 11. bad input ------------------------------------------------------------------------------

def test_unbatched_input_fails_where_the_original_fails():
    """nn.Conv2d takes a 3-D (C, H, W) input but nn.BatchNorm2d does not: the fused modules
    fail where the unconverted model fails, with its error, not later at the classifier."""
    original, fused = _pair()
    block = FusedBasicBlock(16, 16).eval()
    for m, x in ((original, _x()[0]), (fused, _x()[0]), (original.layer1[0], _x(1, 8, 16)[0]),
                 (fused.layer1[0], _x(1, 8, 16)[0]), (block, _x(1, 8, 16)[0])):
        with pytest.raises(ValueError, match="expected 4D input"):
            m(x)


# ---- 12. the optimize()d stem trains fused; 14. the report survives --------------------------------

@pytest.mark.skipif(not (conv_launch.INTERPRETED or torch.cuda.is_available()),
                    reason="the fused training op runs on the Triton kernels")
def test_optimized_stem_trains_through_the_fused_op(monkeypatch):
    calls = []
    real = fastres.nn.plan.run_train_op
    monkeypatch.setattr(fastres.nn.plan, "run_train_op",
                        lambda *a, **k: calls.append(a[0][0]) or real(*a, **k))
    original, fused = _pair()
    assert "trains fused" in fastres.fusion_report(fused).find("conv1").detail
    for m in (original, fused):
        m.train()
    x = _x(4, 8)
    out, want = fused(x), original(x)
    assert calls and calls[0] is fused.conv1
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(fused.bn1.running_var, original.bn1.running_var, rtol=1e-4, atol=1e-5)
    assert int(fused.bn1.num_batches_tracked) == 1


def test_report_survives_a_second_optimize_and_copies():
    _, fused = _pair()
    first = str(fastres.fusion_report(fused))
    fastres.optimize(fused)
    assert str(fastres.fusion_report(fused)) == first and fastres.fusion_report(fused).fused
    assert str(fastres.fusion_report(copy.deepcopy(fused))) == first
    fastres.restore(fused)
    assert fastres.fusion_report(fused) is None


def test_children_replaced_after_optimize_run_the_blocks_own_forward():
    """Children swapped after optimize() - a ReLU for a GELU, the downsample for a lone conv, a
    BN for an Identity - make the block run its own forward, whatever it computes now."""
    original, fused = _pair()
    x = _x()
    for m in (original, fused):
        m.layer1[0].relu = nn.GELU()
        m.layer1[1].downsample = nn.Conv2d(16, 24, 1, 2, bias=False)
        m.layer1[1].downsample.weight.data.copy_(original.layer1[1].downsample.weight.data)
    assert "relu" in fused.layer1[0].fallback_reason
    assert_matches(fused, original, x)
    for m in (original, fused):
        m.layer1[0].bn2 = nn.Identity()
    assert_matches(fused, original, x)


def test_downsample_set_to_a_plain_callable_runs_the_blocks_own_forward():
    """torchvision's forward calls self.downsample whatever it is; a plain function there
    (not a module, so not a child) must not be taken for an identity shortcut."""
    original, fused = _pair()
    for m in (original, fused):
        m.layer1[0].downsample = lambda t: 2 * t
    assert "shortcut" in fused.layer1[0].fallback_reason
    assert_matches(fused, original, _x())
