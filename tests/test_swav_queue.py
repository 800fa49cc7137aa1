"""SwAV's queue for small batches: the official main_swav.py loop step for step, no non-finite rows, exact reload.

(Its distributed equivalence is the ``swav_queue`` case of test_distributed_losses.py; resume through the training
loop is in test_methods.py.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssltrain.config import ConfigError, SwAVConfig, load_config
from ssltrain.data.loaders import Views
from ssltrain.losses import sinkhorn_knopp
from ssltrain.methods.swav import SwAV

F64 = torch.float64
DIM, OUT, PROTOS, BS = 6, 5, 7, 4


def _swav(queue_size: int, start: int = 0) -> SwAV:
    torch.manual_seed(0)
    cfg = SwAVConfig(prototypes=PROTOS, epsilon=0.5, queue_size=queue_size, queue_start_step=start)
    return SwAV(nn.Identity(), DIM, [OUT], cfg, num_global=2).double()


def _crops(step: int, count: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(BS, DIM, generator=g, dtype=F64) for _ in range(count)]


def _official_step(method: SwAV, crops: list[torch.Tensor], queue: torch.Tensor, t: float) -> torch.Tensor:
    """Transcription of facebookresearch/swav main_swav.py train() for one iteration (crops_for_assign [0, 1],
    2 + 2 crops, queue of shape (2, L, D)); updates ``queue`` in place as the official code does."""
    bs, nmb_crops, crops_for_assign = BS, [2, 2], [0, 1]
    with torch.no_grad():
        w = method.prototypes.weight.data.clone()
        w = F.normalize(w, dim=1, p=2)
    embedding = F.normalize(method.projector(torch.cat(crops)), dim=1, p=2)
    output = embedding @ w.t()
    embedding = embedding.detach()
    use_the_queue, loss = False, 0.0
    for i, crop_id in enumerate(crops_for_assign):
        with torch.no_grad():
            out = output[bs * crop_id : bs * (crop_id + 1)].detach()
            if use_the_queue or not torch.all(queue[i, -1, :] == 0):
                use_the_queue = True
                out = torch.cat((torch.mm(queue[i], w.t()), out))
            queue[i, bs:] = queue[i, :-bs].clone()
            queue[i, :bs] = embedding[crop_id * bs : (crop_id + 1) * bs]
            q = sinkhorn_knopp(out, epsilon=0.5, iterations=3)[-bs:]
        subloss = 0
        for v in [j for j in range(sum(nmb_crops)) if j != crop_id]:
            x = output[bs * v : bs * (v + 1)] / t
            subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss += subloss / (sum(nmb_crops) - 1)
    return loss / len(crops_for_assign)


def test_queue_matches_the_official_loop_step_for_step() -> None:
    # L = 2 batches: the queue fills over steps 0 and 1 and is used from step 2 on, then rolls.
    method = _swav(queue_size=2 * BS)
    queue = torch.zeros(2, 2 * BS, OUT, dtype=F64)
    no_queue = _swav(queue_size=0)
    g = torch.Generator().manual_seed(7)
    for step in range(5):
        with torch.no_grad():  # prototypes move between steps: queued rows are scored with the current ones
            method.prototypes.weight.add_(0.3 * torch.randn(PROTOS, OUT, generator=g, dtype=F64))
            no_queue.prototypes.weight.copy_(method.prototypes.weight)
        crops = _crops(step)
        expected = _official_step(method, crops, queue, t=0.1)
        method.on_step_start(step, 5)
        got = method(Views(crops[:2], crops[2:], None, None))["loss"]
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(method.queue, queue, rtol=0, atol=0)
        without = no_queue(Views(crops[:2], crops[2:], None, None))["loss"]
        if step < 2:
            assert int(method.queue_rows) == (step + 1) * BS
            torch.testing.assert_close(got, without)
        else:
            assert not torch.allclose(got, without), "a full queue changes the codes"


def test_queue_starts_at_its_step_and_skips_a_non_finite_batch() -> None:
    method = _swav(queue_size=BS, start=2)
    for step in range(2):
        method.on_step_start(step, 4)
        method(Views(_crops(step)[:2], [], None, None))
    assert int(method.queue_rows) == 0 and method.queue.eq(0).all(), "nothing is queued before queue_start_step"
    method.on_step_start(2, 4)
    method(Views(_crops(2)[:2], [], None, None))
    filled = method.queue.clone()
    assert filled.ne(0).any(dim=-1).all()
    bad = _crops(3)[:2]
    bad[1][0, 0] = float("nan")
    method.on_step_start(3, 4)
    method(Views(bad, [], None, None))
    assert torch.equal(method.queue, filled), "a batch with NaN is not queued"


def test_eval_mode_does_not_push() -> None:
    method = _swav(queue_size=BS).eval()
    method.on_step_start(0, 1)
    method(Views(_crops(0)[:2], [], None, None))
    assert int(method.queue_rows) == 0


def test_loaded_queue_is_used_at_once() -> None:
    trained = _swav(queue_size=BS)
    trained.on_step_start(0, 2)
    trained(Views(_crops(0)[:2], [], None, None))
    fresh = _swav(queue_size=BS).eval()
    fresh.on_step_start(1, 2)
    fresh(Views(_crops(5)[:2], [], None, None))  # reads its own fill count (0), then is loaded over
    fresh.train().load_state_dict(trained.state_dict())
    trained.on_step_start(1, 2)
    views = Views(_crops(1)[:2], [], None, None)
    torch.testing.assert_close(fresh(views)["loss"], trained(views)["loss"], rtol=0, atol=0)


def test_queue_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="method.swav.queue_size"):
        load_config(None, ["data.train=shards/train-*.tar", "method.swav.queue_size=-1"])
    method = _swav(queue_size=BS)
    method.on_step_start(0, 1)
    with pytest.raises(ValueError, match="global_crops.count"):
        method(Views(_crops(0)[:3], [], None, None))
