"""Benchmark the fused Triton loss kernels (ssltrain.kernels) against the eager references. Not a test.

    python bench/kernels.py                 # full table on a CUDA GPU
    python bench/kernels.py --quick         # one shape per loss, fewer repetitions
    python bench/kernels.py --json out.json # also write the rows as JSON
    python bench/kernels.py --cpu-interpret # no GPU: tiny shapes under the Triton interpreter, to show it runs
    python bench/kernels.py --compile-only  # no GPU needed: compile every kernel variant for sm_90a and print
                                            # registers / spills / shared memory per variant

Each row times forward + backward (gradients w.r.t. the bf16 inputs) with CUDA events after a warm-up, and
reports the median, the peak extra memory (torch.cuda.max_memory_allocated during the step minus what was
allocated before it: inputs excluded, gradients included), the speed-up eager / fused, and for VICReg and
Barlow Twins the fraction of the matmul floor reached: 2 * min(N, D) * N * D FLOPs (one Gram or covariance
product) at the rate of a bf16 torch.matmul of that shape measured in the same run. See bench/README.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys

import torch

TARGETS = "targets (H100): VICReg/Barlow >= 5x eager where N < D, >= 1.5x elsewhere, extra memory <= 1/4 of eager"


def _time_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_extra_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _step(loss_fn, inputs):
    """forward + backward of the sum of all differentiable outputs, gradients discarded."""

    def run():
        out = loss_fn(*inputs)
        vals = out.values() if isinstance(out, dict) else out
        total = sum(v for v in vals if v.requires_grad)
        torch.autograd.grad(total, inputs)

    return run


def _matmul_tflops(n: int, d: int, warmup: int, reps: int) -> float:
    """bf16 torch.matmul rate for the min(N, D)-sided product of an N x D matrix with itself."""
    rows, inner = (n, d) if n < d else (d, n)
    a = torch.randn(rows, inner, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(inner, rows, device="cuda", dtype=torch.bfloat16)
    ms = _time_ms(lambda: a @ b, warmup, reps)
    return 2.0 * min(n, d) * n * d / (ms * 1e-3) / 1e12


def _bench_pair(name, fused, eager, inputs, warmup, reps, floor_flops=None, rate=None):
    row = {"loss": name}
    for impl, fn in (("eager", eager), ("fused", fused)):
        step = _step(fn, inputs)
        try:
            row[f"{impl}_ms"] = _time_ms(step, warmup, reps)
            row[f"{impl}_mib"] = _peak_extra_mib(step)
        except torch.cuda.OutOfMemoryError:
            row[f"{impl}_ms"] = row[f"{impl}_mib"] = float("nan")
            torch.cuda.empty_cache()
    row["speedup"] = row["eager_ms"] / row["fused_ms"]
    row["mem_ratio"] = row["fused_mib"] / row["eager_mib"]
    if floor_flops is not None:
        floor_ms = floor_flops / (rate * 1e12) * 1e3
        row["floor_ms"] = floor_ms
        row["floor_frac"] = floor_ms / row["fused_ms"]
    return row


def _print_row(shape: str, row: dict) -> None:
    floor = f"{100 * row['floor_frac']:5.1f}%" if "floor_frac" in row else "     -"
    print(
        f"{row['loss']:<14}{shape:<22}{row['eager_ms']:>10.3f}{row['fused_ms']:>10.3f}{row['speedup']:>8.2f}x"
        f"{row['eager_mib']:>11.1f}{row['fused_mib']:>11.1f}{row['mem_ratio']:>8.3f}  {floor}",
        flush=True,
    )


def run_gpu(args) -> list[dict]:
    from ssltrain.losses import dispatch as D

    warmup, reps = (2, 5) if args.quick else (3, 20)
    ns, ds = ((1024,), (2048,)) if args.quick else ((256, 1024, 4096), (2048, 8192))
    prec = os.environ.get("SSLTRAIN_TRITON_DOT_PRECISION", "tf32x3")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  fp32 dot precision: {prec}")
    print(TARGETS)
    print(
        f"{'loss':<14}{'shape':<22}{'eager ms':>10}{'fused ms':>10}{'speedup':>9}{'eager MiB':>11}{'fused MiB':>11}"
        f"{'mem':>8}  floor"
    )
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for d in ds:
        for n in ns:
            rate = _matmul_tflops(n, d, warmup, reps)
            floor = 2.0 * min(n, d) * n * d
            z_a = (torch.randn(n, d, device="cuda", generator=gen) + 0.2).to(torch.bfloat16).requires_grad_()
            z_b = 0.8 * z_a.detach().float() + 0.6 * torch.randn(n, d, device="cuda", generator=gen)
            z_b = z_b.to(torch.bfloat16).requires_grad_()
            shape = f"N={n} D={d}"
            for name, fused, eager, inputs in (
                (
                    "vicreg_reg",
                    lambda z: D.vicreg_regularizer(z, impl="triton"),
                    lambda z: D.vicreg_regularizer(z, impl="eager"),
                    [z_a],
                ),
                (
                    "barlow_twins",
                    lambda a, b: D.barlow_twins(a, b, impl="triton"),
                    lambda a, b: D.barlow_twins(a, b, impl="eager"),
                    [z_a, z_b],
                ),
            ):
                row = _bench_pair(name, fused, eager, inputs, warmup, reps, floor, rate)
                row.update(n=n, d=d, matmul_tflops=rate)
                _print_row(shape, row)
                rows.append(row)
            del z_a, z_b
    n, d = (4096, 256) if args.quick else (16384, 256)
    base = torch.randn(n, d, device="cuda", generator=gen)
    views = [
        (base + 0.7 * torch.randn(n, d, device="cuda", generator=gen)).to(torch.bfloat16).requires_grad_()
        for _ in range(4)
    ]
    for label, rows_idx in (("all rows", None), ("1/8 rows", torch.randperm(2 * n, device="cuda")[: 2 * n // 8])):
        shape = f"N={n} D={d} {label}"
        for name, fused, eager, inputs in (
            (
                "nt_xent",
                functools.partial(D.nt_xent, temperature=0.1, rows=rows_idx, impl="triton"),
                functools.partial(D.nt_xent, temperature=0.1, rows=rows_idx, impl="eager"),
                views[:2],
            ),
            (
                "cissl",
                functools.partial(D.cissl, temperature=0.07, rows=rows_idx, impl="triton"),
                functools.partial(D.cissl, temperature=0.07, rows=rows_idx, impl="eager"),
                views,
            ),
        ):
            row = _bench_pair(name, fused, eager, inputs, warmup, reps)
            row.update(n=n, d=d, rows=label)
            _print_row(shape, row)
            rows.append(row)
    rows += _sigreg_rows(args, gen, warmup, reps)
    return rows


def _sigreg_rows(args, gen, warmup: int, reps: int) -> list[dict]:
    """SIGReg (LeJEPA) on V=8 bf16 views of N rows: the fused projection + characteristic-function sums against
    the eager reference, which forms V x N x S x T phases (num_points=17 on [-5, 5]: T = 9 nodes)."""
    from ssltrain.losses import dispatch as D
    from ssltrain.losses.lejepa import sigreg_directions

    v, n, num_points = 8, 4096, 17
    shapes = ((512, 256),) if args.quick else ((512, 256), (2048, 1024))
    rows = []
    for d, s in shapes:
        z = (torch.randn(v, n, d, device="cuda", generator=gen) / d**0.5).to(torch.bfloat16).requires_grad_()
        a = sigreg_directions(d, s, seed=0, step=0, device="cuda")
        row = _bench_pair(
            "sigreg",
            lambda x, a=a: (D.sigreg(x, a, num_points, impl="triton"),),
            lambda x, a=a: (D.sigreg(x, a, num_points, impl="eager"),),
            [z],
            warmup,
            reps,
        )
        row.update(v=v, n=n, d=d, s=s, num_points=num_points)
        _print_row(f"{v}x{n} D={d} S={s}", row)
        rows.append(row)
        del z
    return rows


def run_cpu_interpret() -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first used
    import time

    from ssltrain import losses
    from ssltrain.losses import dispatch as D

    torch.manual_seed(0)
    n, d = 13, 40
    z_a = torch.randn(n, d, requires_grad=True)
    z_b = (z_a.detach() + 0.5 * torch.randn(n, d)).requires_grad_()
    directions = losses.sigreg_directions(d, 24, seed=0, step=0)
    cases = (
        (
            "vicreg_reg",
            lambda: D.vicreg_regularizer(z_a, impl="triton"),
            lambda: (losses.variance_hinge(z_a), losses.covariance_offdiag(z_a)),
        ),
        ("barlow_twins", lambda: D.barlow_twins(z_a, z_b, impl="triton"), lambda: losses.barlow_twins_loss(z_a, z_b)),
        ("nt_xent", lambda: D.nt_xent(z_a, z_b, impl="triton"), lambda: losses.nt_xent_loss(z_a, z_b)),
        ("cissl", lambda: D.cissl(z_a, z_b, z_b, z_a, impl="triton"), lambda: losses.cissl_loss(z_a, z_b, z_b, z_a)),
        (
            "sigreg",
            lambda: (D.sigreg(torch.stack([z_a, z_b]), directions, impl="triton"),),
            lambda: (losses.sigreg(torch.stack([z_a, z_b]), directions),),
        ),
    )
    print(f"Triton interpreter on CPU, N={n} D={d} fp32 (timings are the interpreter's, meaningless for a GPU)")
    for name, fused, eager in cases:
        t0 = time.perf_counter()
        out = fused()
        vals = list(out.values() if isinstance(out, dict) else out)
        grads = torch.autograd.grad(sum(v for v in vals if v.requires_grad), [z_a, z_b], allow_unused=True)
        dt = time.perf_counter() - t0
        ref = eager()
        rvals = list(ref.values() if isinstance(ref, dict) else ref)
        rgrads = torch.autograd.grad(sum(v for v in rvals if v.requires_grad), [z_a, z_b], allow_unused=True)
        err = max(float((a.detach() - b.detach()).abs().max()) for a, b in zip(vals, rvals))
        gerr = max(float((a - b).abs().max()) for a, b in zip(grads, rgrads) if a is not None)
        print(f"{name:<14}{dt:8.2f} s   max |value diff| {err:.2e}   max |grad diff| {gerr:.2e}")


def run_compile_only(capability: int) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    from ssltrain.kernels import _aot, _cov, _infonce, _sigreg

    def every_variant():
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            for n, d in ((64, 256), (256, 64)):  # Gram regime, feature regime
                z = torch.randn(n, d, dtype=dtype, requires_grad=True)
                zb = torch.randn(n, d, dtype=dtype, requires_grad=True)
                v, c = _cov.VICRegRegularizer.apply(z, 1.0, 1e-4, None)
                torch.autograd.grad(v + c, [z])
                out = _cov.BarlowTwins.apply(z, zb, 0.005, 1e-5, None)
                torch.autograd.grad(sum(out), [z, zb])
                with torch.no_grad():
                    _cov.VICRegRegularizer.apply(z, 1.0, 1e-4, None)
                    _cov.BarlowTwins.apply(z, zb, 0.005, 1e-5, None)
            rows = torch.arange(2 * n, dtype=torch.int32)
            for idx, all_rows in ((rows, True), (rows[:10], False)):
                loss, _ = _infonce.NTXent.apply(z, zb, idx, all_rows, 0.1)
                torch.autograd.grad(loss, [z, zb])
                loss, _ = _infonce.CISSL.apply(z, zb, zb, z, idx, all_rows, 0.1)
                torch.autograd.grad(loss, [z, zb])
            if dtype != torch.float64:  # SIGReg computes in fp32 (fp64 inputs take the eager path)
                sums = _sigreg.ECFSums.apply(z, torch.randn(d, 96), torch.linspace(0, 5, 9))
                torch.autograd.grad(sums.sum(), [z])

    recs = _aot.compile_all(every_variant, capability)
    spills = 0
    print(f"compiled {len(recs)} kernel variants for sm_{capability}a (GPU launch configurations)")
    for r in recs:
        print(
            f"{r['kernel']:<20} warps={r.get('num_warps')} stages={r.get('num_stages')} shared={r['shared']:>6}  "
            f"{r['resources']:<28} {r['blocks']}  {r['flags']}"
        )
        spills += "stack=0 " not in r["resources"] + " "
    print(f"{spills} variant(s) use a stack (register spills)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one shape per loss, fewer repetitions")
    p.add_argument("--json", help="write the result rows to this JSON file")
    p.add_argument("--cpu-interpret", action="store_true", help="no GPU: tiny shapes under the Triton interpreter")
    p.add_argument("--compile-only", action="store_true", help="compile every kernel variant for a GPU, no GPU needed")
    p.add_argument("--capability", type=int, default=90, help="compute capability for --compile-only (default 90)")
    args = p.parse_args(argv)
    if args.compile_only:
        run_compile_only(args.capability)
        return 0
    if args.cpu_interpret:
        run_cpu_interpret()
        return 0
    if not torch.cuda.is_available():
        print(
            "No CUDA device: nothing to benchmark. The fused kernels only pay off on a GPU. Use --cpu-interpret to "
            "run tiny shapes under the Triton interpreter, or --compile-only to check that every kernel compiles."
        )
        return 0
    rows = run_gpu(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
