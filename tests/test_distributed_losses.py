"""Each method's loss and gradients on 2 and 4 gloo processes equal the single-process result on the whole batch.

Collectives that drop autograd silently scale or drop other ranks' gradient contributions; this is the test that
catches it. Convention (what DDP optimises): the objective is the mean over ranks of the per-rank losses, so
  * each rank's loss is the full-batch loss (losses on gathered statistics), or their mean is (row-split losses);
  * an input's gradient, divided by the world size, is the single-process gradient of those rows;
  * replicated parameters' gradients averaged over ranks (DDP) equal the single-process ones; sharded parameters'
    (DIET's head) are the single-process gradient of their rows.
Each case runs twice: gradients averaged by hand, and through DistributedDataParallel as training runs it, where
the forward's embeddings and features must come back detached.
"""

from __future__ import annotations

from pathlib import Path

import dist_cases
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssltrain.core.collectives import gather, local_rows, row_offset

pytestmark = pytest.mark.distributed

# Losses whose value on each rank is that of the whole batch; the others (rows split over ranks) agree on average.
ROW_SPLIT = {"simclr", "cissl", "dissl", "byol", "mocov3", "dino", "swav", "swav_queue", "mae", "ijepa"}
ROW_SPLIT |= {"dinov2", "dinov2_centering"}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: dist_cases.run(name, rank, world) for name in dist_cases.METHODS}
        results |= {f"ddp/{name}": dist_cases.run(name, rank, world, ddp=True) for name in dist_cases.METHODS}
        results["_collectives"] = _collective_checks(rank, world)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _collective_checks(rank: int, world: int) -> dict[str, torch.Tensor]:
    """gather with uneven row counts (a rank that skipped corrupt samples) and its backward."""
    rows = rank + 1
    x = torch.full((rows, 2), float(rank), dtype=torch.float64, requires_grad=True)
    g = gather(x)
    weights = torch.arange(g.shape[0], dtype=torch.float64)[:, None]
    (g * weights).sum().backward()
    return {"gathered": g.detach(), "grad": x.grad, "offset": torch.tensor(row_offset(rows)), "rows": local_rows(rows)}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def distributed_results(request, tmp_path_factory) -> tuple[int, list[dict]]:
    world = request.param
    tmp = tmp_path_factory.mktemp(f"dist{world}")
    mp.spawn(_worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=True)
    return world, [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(scope="module")
def single_results() -> dict[str, dict]:
    return {name: dist_cases.run(name) for name in dist_cases.METHODS}


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("ddp", [False, True], ids=["allreduce", "ddp"])
@pytest.mark.parametrize("name", dist_cases.METHODS)
def test_distributed_equals_single_process(name: str, ddp: bool, distributed_results, single_results) -> None:
    world, ranks = distributed_results
    single = single_results[name]
    per_rank = [r[f"ddp/{name}" if ddp else name] for r in ranks]
    b = dist_cases.BATCH // world

    losses = torch.stack([r["loss"] for r in per_rank])
    _close(losses.mean(), single["loss"], "mean over ranks of the loss")
    if name not in ROW_SPLIT:
        for r, loss in enumerate(losses):
            _close(loss, single["loss"], f"rank {r}'s loss")

    for key in [k for k in single if k.startswith("input_grad/")]:
        if single[key] is None:  # a view the method does not read (I-JEPA reads global view 0 only)
            assert all(res[key] is None for res in per_rank), f"{key}: no gradient in one process, one in another"
            continue
        for r, res in enumerate(per_rank):
            _close(res[key] / world, single[key][r * b : (r + 1) * b], f"rank {r} {key}")

    param_keys = [k for k in single if k.startswith("param_grad/")]
    assert param_keys, "the method has trainable parameters with gradients"
    for key in param_keys:
        if name == "diet" and key.startswith("param_grad/head."):
            shards = torch.cat([res[key] for res in per_rank])[: single[key].shape[0]]
            _close(shards, single[key], f"sharded {key}")
            continue
        for r, res in enumerate(per_rank):
            _close(res[key], single[key], f"rank {r} {key} (DDP-averaged)")

    for key in [k for k in single if k.startswith("buffer/")]:  # DINO's centre, SwAV's queue
        for r, res in enumerate(per_rank):
            _close(res[key], single[key], f"rank {r} {key}")

    # what the monitors read: this rank's rows of the embeddings and features, detached (through DDP too)
    for key in dist_cases.OUTPUTS:
        assert single[f"output_detached/{key}"], key
        for r, res in enumerate(per_rank):
            assert res[f"output_detached/{key}"], f"rank {r} {key} is not detached"
            _close(res[f"output/{key}"], single[f"output/{key}"][r * b : (r + 1) * b], f"rank {r} {key}")


def test_gather_uneven_rows_and_gradient(distributed_results) -> None:
    world, ranks = distributed_results
    counts = [r + 1 for r in range(world)]
    expected = torch.cat([torch.full((n, 2), float(r), dtype=torch.float64) for r, n in enumerate(counts)])
    for r, res in enumerate(ranks):
        c = res["_collectives"]
        _close(c["gathered"], expected, "gathered rows")
        start = sum(counts[:r])
        assert int(c["offset"]) == start
        # every rank's loss sum(g * weights) has d/dx = weights of x's rows; the backward sums over the W ranks
        weights = torch.arange(start, start + counts[r], dtype=torch.float64)[:, None].expand(-1, 2)
        _close(c["grad"], world * weights, "gather backward")
        total = sum(counts)
        own = list(range(start, start + counts[r]))
        assert c["rows"].tolist() == own + [total + i for i in own]
