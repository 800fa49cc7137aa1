"""SyncBatchNorm: torch's against apex's, on the ResNet-50 training step, to decide ``dist.sync_bn_impl``.

    torchrun --nproc-per-node 8 bench/syncbn.py                  # ResNet-50, 224 px, batch 64 per GPU, bf16
    torchrun --nproc-per-node 2 bench/syncbn.py --channels-last  # NHWC inputs (train.channels_last on a GPU)

Each implementation converts the same torchvision ResNet-50 (``nn.SyncBatchNorm.convert_sync_batchnorm`` /
``apex.parallel.convert_syncbn_model``), wrapped in DDP, and times forward + backward + SGD over ``--steps`` steps
after ``--warmup``, CUDA-synchronised, on synthetic inputs already on the GPU. Prints images/s per GPU, the ratio
apex / native measured in this run, and the largest difference of the first step's loss (the two must normalise
with the same global statistics). Needs CUDA and at least 2 ranks to mean anything; apex's row is reported as
unavailable where apex's ``syncbn`` extension does not import.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def _step_time(impl: str, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """Seconds per step and the first step's loss for one SyncBatchNorm implementation."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50()
    if impl == "apex":
        import apex.parallel  # type: ignore[import-not-found]

        model = apex.parallel.convert_syncbn_model(model)
    else:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    ddp = DistributedDataParallel(model, device_ids=[device.index])
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator(device=device).manual_seed(dist.get_rank())
    x = torch.randn(args.batch, 3, args.size, args.size, device=device, generator=generator)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, 1000, (args.batch,), device=device, generator=generator)
    first_loss = float("nan")
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not args.fp32):
            loss = nn.functional.cross_entropy(ddp(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i == 0:
            first_loss = float(loss)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / args.steps, first_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="per GPU")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    args = parser.parse_args()
    if not torch.cuda.is_available() or "RANK" not in os.environ:
        raise SystemExit(
            "bench/syncbn.py needs CUDA and torchrun (2+ GPUs): torchrun --nproc-per-node N bench/syncbn.py"
        )
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl")
    from ssltrain.engine.parallelize import _apex_parallel

    results = {"native": _step_time("native", args, device)}
    if _apex_parallel() is not None:
        results["apex"] = _step_time("apex", args, device)
    if dist.get_rank() == 0:
        print(
            f"{torch.cuda.get_device_name(device)} x {dist.get_world_size()}, ResNet-50 {args.size} px, batch "
            f"{args.batch}/GPU, {'fp32' if args.fp32 else 'bf16'}, "
            f"{'channels_last' if args.channels_last else 'NCHW'}"
        )
        print("| SyncBatchNorm | img/s per GPU | first-step loss |\n| --- | ---: | ---: |")
        for impl, (seconds, loss) in results.items():
            print(f"| {impl} | {args.batch / seconds:.0f} | {loss:.6f} |")
        if "apex" in results:
            print(
                f"apex / native speed: {results['native'][0] / results['apex'][0]:.3f}; first-step loss "
                f"difference {abs(results['apex'][1] - results['native'][1]):.2e}"
            )
        else:
            print("apex: unavailable (apex.parallel with its syncbn extension does not import)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
