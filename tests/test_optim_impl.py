"""optim.impl: the native optimizers make apex's updates, step for step.

apex is not installable on CPU machines, so each apex optimizer is transcribed here from its CUDA kernel
(csrc/multi_tensor_adam.cu, csrc/multi_tensor_lamb.cu) and Python driver (apex/optimizers/fused_adam.py,
fused_lamb.py), and the native optimizer that ``build_optimizer`` picks without apex is run against it in float64,
biases and norms (the excluded groups) included. Where apex and CUDA are present, the GPU test compares the real thing.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch import Tensor, nn

from ssltrain.config import ConfigError, OptimConfig, load_config
from ssltrain.engine.loop import train
from ssltrain.engine.optim import LAMB, LARS, _apex_optimizers, build_optimizer, set_lr
from ssltrain.engine.parallelize import _apex_parallel, convert_sync_batchnorm, resolve_sync_bn_impl

STEPS = 5


def model(zero_layer: bool = False) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4), nn.Linear(4, 3)).double()
    if zero_layer:  # a zero-initialised layer: trust ratios fall back to 1
        nn.init.zeros_(net[4].weight)
    return net


def groups_of(net: nn.Module, weight_decay: float) -> list[tuple[list[Tensor], float]]:
    """(params, weight decay) in build_optimizer's order: decayed matrices, then biases and norm weights (no decay)."""
    regular = [p for p in net.parameters() if p.ndim > 1]
    excluded = [p for p in net.parameters() if p.ndim <= 1]
    return [(regular, weight_decay), (excluded, 0.0)]


def fake_grads(net: nn.Module, step: int, zero: int | None = None) -> list[Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in net.parameters()]
    if zero is not None:
        grads[zero].zero_()  # a zero gradient: LARS/LAMB ratio 1
    return grads


def run_native(net: nn.Module, cfg: OptimConfig, lrs: list[float], zero: int | None = None) -> list[Tensor]:
    opt = build_optimizer(net, cfg, 256)
    for step, lr in enumerate(lrs):
        set_lr(opt, lr)
        for p, g in zip(net.parameters(), fake_grads(net, step, zero)):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def apex_fused_adam(net: nn.Module, wd: float, lrs: list[float], betas=(0.9, 0.999), eps=1e-8) -> list[Tensor]:
    """FusedAdam(adam_w_mode=True): AdamFunctor, ADAM_MODE_1; the step count lives in the group."""
    params = {id(p): p.detach().clone() for p in net.parameters()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.zeros_like(x) for k, x in params.items()}
    groups = groups_of(net, wd)
    beta1, beta2 = betas
    for step, lr in enumerate(lrs, start=1):
        grads = {id(p): g for p, g in zip(net.parameters(), fake_grads(net, step - 1))}
        for group, decay in groups:
            bc1, bc2 = 1 - beta1**step, 1 - beta2**step
            for p in group:
                k, g = id(p), grads[id(p)]
                m[k] = beta1 * m[k] + (1 - beta1) * g
                v[k] = beta2 * v[k] + (1 - beta2) * g * g
                update = (m[k] / bc1) / (torch.sqrt(v[k] / bc2) + eps) + decay * params[k]
                params[k] = params[k] - lr * update
    return [params[id(p)] for p in net.parameters()]


def apex_fused_lamb(
    net: nn.Module,
    wd: float,
    lrs: list[float],
    betas=(0.9, 0.999),
    eps=1e-6,
    max_grad_norm: float = math.inf,
    zero: int | None = None,
) -> list[Tensor]:
    """FusedLAMB(adam_w_mode=True, grad_averaging=True, use_nvlamb=False): LAMBStage1/2Functor."""
    params = {id(p): p.detach().clone() for p in net.parameters()}
    m = {k: torch.zeros_like(x) for k, x in params.items()}
    v = {k: torch.zeros_like(x) for k, x in params.items()}
    beta1, beta2 = betas
    beta3 = 1 - beta1
    for step, lr in enumerate(lrs, start=1):
        grads = {id(p): g for p, g in zip(net.parameters(), fake_grads(net, step - 1, zero))}
        global_norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
        clipped = global_norm / max_grad_norm if global_norm > max_grad_norm else 1.0
        for group, decay in groups_of(net, wd):
            bc1, bc2 = 1 - beta1**step, 1 - beta2**step
            for p in group:
                k = id(p)
                param_norm = params[k].norm()
                g = grads[k] / clipped
                m[k] = m[k] * beta1 + beta3 * g
                v[k] = v[k] * beta2 + (1 - beta2) * g * g
                r_p = params[k] if decay != 0 else torch.zeros_like(params[k])
                update = (m[k] / bc1) / (torch.sqrt(v[k] / bc2) + eps) + decay * r_p
                ratio = lr
                if decay != 0:
                    update_norm = update.norm()
                    ratio = lr * (param_norm / update_norm) if update_norm != 0 and param_norm != 0 else lr
                params[k] = params[k] - ratio * update
    return [params[id(p)] for p in net.parameters()]


def lars_per_tensor(
    net: nn.Module, wd: float, lrs: list[float], momentum: float, eta: float, zero: int | None = None
) -> list[Tensor]:
    """ssltrain's LARS formula one tensor at a time: ``(g + wd w) * eta ||w|| / ||g + wd w||`` into momentum SGD."""
    params = {id(p): p.detach().clone() for p in net.parameters()}
    bufs: dict[int, Tensor] = {}
    for step, lr in enumerate(lrs):
        grads = {id(p): g for p, g in zip(net.parameters(), fake_grads(net, step, zero))}
        for group, decay in groups_of(net, wd):
            for p in group:
                k, d = id(p), grads[id(p)]
                if group[0].ndim > 1:  # the decayed, adapted group
                    d = d + decay * params[k]
                    pn, dn = params[k].norm(), d.norm()
                    d = d * (eta * pn / dn if pn > 0 and dn > 0 else 1.0)
                bufs[k] = d.clone() if k not in bufs else momentum * bufs[k] + d
                params[k] = params[k] - lr * bufs[k]
    return [params[id(p)] for p in net.parameters()]


def apex_larc_sgd(
    net: nn.Module, wd: float, lrs: list[float], momentum: float, eta: float, eps: float = 1e-8
) -> list[Tensor]:
    """apex.parallel.LARC(SGD(momentum), clip=False) on the decayed group: LARC folds the group's weight decay into
    the gradient, scales it by ``eta ||w|| / (||g|| + wd ||w|| + eps)`` (when both norms are non-zero), zeroes the
    group's weight decay for the inner SGD step and restores it afterwards."""
    params = {id(p): p.detach().clone() for p in net.parameters()}
    bufs: dict[int, Tensor] = {}
    regular, _ = groups_of(net, wd)[0]
    for step, lr in enumerate(lrs):
        grads = {id(p): g for p, g in zip(net.parameters(), fake_grads(net, step))}
        for p in regular:
            k, g = id(p), grads[id(p)]
            pn, gn = params[k].norm(), g.norm()
            if pn != 0 and gn != 0:
                g = (g + wd * params[k]) * (eta * pn / (gn + pn * wd + eps))
            bufs[k] = g.clone() if k not in bufs else momentum * bufs[k] + g
            params[k] = params[k] - lr * bufs[k]
    return [params[id(p)] for p in regular]


def assert_same(a: list[Tensor], b: list[Tensor], rtol: float = 1e-12) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol)


LRS = [0.1, 0.05, 0.2, 0.01, 0.3][:STEPS]


def test_native_adamw_makes_apex_fused_adam_updates() -> None:
    cfg = OptimConfig(name="adamw", impl="native", weight_decay=0.05)
    native = run_native(model(), cfg, LRS)
    assert_same(native, apex_fused_adam(model(), 0.05, LRS))
    assert not torch.equal(native[0], model()[0].weight.detach())  # it moved


@pytest.mark.parametrize("zero_layer", [False, True])
def test_native_lamb_makes_apex_fused_lamb_updates(zero_layer: bool) -> None:
    cfg = OptimConfig(name="lamb", impl="native", weight_decay=0.05)
    zero = 2  # the BatchNorm weight gets a zero gradient
    native = run_native(model(zero_layer), cfg, LRS, zero=zero)
    assert_same(native, apex_fused_lamb(model(zero_layer), 0.05, LRS, zero=zero))
    assert isinstance(build_optimizer(model(), cfg, 256), LAMB)


@pytest.mark.parametrize("zero_layer", [False, True])
def test_multi_tensor_lars_makes_the_per_tensor_updates(zero_layer: bool) -> None:
    cfg = OptimConfig(name="lars", impl="native", weight_decay=0.05, momentum=0.9, eta=0.02)
    native = run_native(model(zero_layer), cfg, LRS, zero=2)
    assert_same(native, lars_per_tensor(model(zero_layer), 0.05, LRS, 0.9, 0.02, zero=2))


def test_apex_larc_differs_from_lars_only_in_its_denominator() -> None:
    """Why optim.impl=apex leaves LARS native: without weight decay (and LARC's eps) LARC + SGD is ssltrain's LARS;
    with it, LARC divides by ||g|| + wd ||w|| instead of ||g + wd w||."""
    regular = lambda params: [p for p in params if p.ndim > 1]  # noqa: E731  (the decayed matrices, in order)
    no_decay = OptimConfig(name="lars", impl="native", weight_decay=0.0, momentum=0.9, eta=0.02)
    assert_same(regular(run_native(model(), no_decay, LRS)), apex_larc_sgd(model(), 0.0, LRS, 0.9, 0.02, eps=0.0))
    decay = OptimConfig(name="lars", impl="native", weight_decay=0.5, momentum=0.9, eta=0.02)
    ours, larc = regular(run_native(model(), decay, LRS)), apex_larc_sgd(model(), 0.5, LRS, 0.9, 0.02)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, larc)) > 1e-6


def test_auto_is_native_without_apex_or_cuda() -> None:
    net = model()
    assert isinstance(build_optimizer(net, OptimConfig(name="adamw"), 256), torch.optim.AdamW)
    assert isinstance(build_optimizer(net, OptimConfig(name="lamb"), 256), LAMB)
    assert isinstance(build_optimizer(net, OptimConfig(name="lars"), 256), LARS)


@pytest.mark.skipif(_apex_optimizers() is not None, reason="apex is installed here")
@pytest.mark.parametrize("name", ["adamw", "lamb", "lars"])
def test_impl_apex_without_apex_says_where_to_get_it(name: str) -> None:
    with pytest.raises(ConfigError, match=r"apex cannot be imported.*NGC PyTorch.*optim\.impl=native"):
        build_optimizer(model(), OptimConfig(name=name, impl="apex"), 256)


@pytest.mark.skipif(_apex_optimizers() is None, reason="needs NVIDIA apex")
def test_impl_apex_refuses_cpu_parameters() -> None:
    with pytest.raises(ConfigError, match=r"plain CUDA tensors.*on cpu"):
        build_optimizer(model(), OptimConfig(name="adamw", impl="apex"), 256)


def test_lamb_trains_checkpoints_and_resumes(tmp_path: Path, shard_dir: Path) -> None:
    cfg = tiny_config(tmp_path, str(shard_dir), steps=3, **{"optim.name": "lamb", "checkpoint.every": 1})
    run = train(cfg, stop_after_steps=2)
    assert (run / "checkpoints" / "step-2").is_dir()
    train(cfg)  # resumes from step 2: LAMB's state loads
    assert (run / "checkpoints" / "step-3").is_dir()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or _apex_optimizers() is None, reason="needs CUDA and NVIDIA apex")
@pytest.mark.parametrize("name", ["adamw", "lamb"])
def test_apex_on_cuda_matches_native(name: str) -> None:
    def trained(impl: str) -> list[Tensor]:
        net = model(zero_layer=True).float().cuda()
        opt = build_optimizer(net, OptimConfig(name=name, impl=impl, weight_decay=0.05), 256)
        assert type(opt).__name__.startswith("Apex") == (impl == "apex")
        for step, lr in enumerate(LRS):
            set_lr(opt, lr)
            for p, g in zip(net.parameters(), fake_grads(net, step, zero=2)):
                p.grad = g.float().cuda()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return [p.detach().double().cpu() for p in net.parameters()]

    assert_same(trained("apex"), trained("native"), rtol=2e-5)


@pytest.mark.skipif(_apex_parallel() is not None, reason="apex is installed here")
def test_sync_bn_impl_apex_without_apex_says_where_to_get_it() -> None:
    with pytest.raises(ConfigError, match=r"apex\.parallel\.SyncBatchNorm cannot be imported.*sync_bn_impl=native"):
        convert_sync_batchnorm(model(), torch.device("cpu"), "apex")


def test_sync_bn_native_is_torchs() -> None:
    assert resolve_sync_bn_impl("native") == "native"
    net = model()
    assert convert_sync_batchnorm(net, torch.device("cpu"), "native") is net  # one process: nothing to synchronise


def test_sync_bn_impl_is_checked_in_the_config() -> None:
    with pytest.raises(ConfigError, match="dist.sync_bn_impl"):
        load_config(None, ["data.train=x-*.tar", "dist.sync_bn_impl=fast"])
