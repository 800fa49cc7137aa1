"""The fused SIGReg kernel (ssltrain.kernels._sigreg, reached through ssltrain.losses.dispatch) against the eager
reference (ssltrain.losses.lejepa: ``ecf_sums``, ``sigreg``, ``lejepa_loss``) evaluated in float64 on the same
numbers: the characteristic-function sums, SIGReg's value and input gradient, and the LeJEPA method with
``loss.impl`` triton.

Without a GPU the kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), whose blocks
are 16 wide: N=37 rows span three row tiles (the last one ragged), D=19 two reduction tiles, S=11 one ragged slice
block and S=37 three, 17 nodes a padded node block; the forward's rows are split over programs. Kernel buffers
start as NaN, so an element the kernel fails to write fails the comparison.
"""

from __future__ import annotations

import copy

import pytest
import torch

import ssltrain.kernels as K
from ssltrain.config import LeJEPAConfig
from ssltrain.data.loaders import Views
from ssltrain.losses import dispatch as D
from ssltrain.losses import lejepa_loss, sigreg, sigreg_directions
from ssltrain.losses.lejepa import ecf_sums, epps_pulley_grid
from ssltrain.methods.lejepa import LeJEPA

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
F64 = torch.float64
needs_triton = pytest.mark.skipif(not K.triton_available(), reason="triton is not installed")
TOL = 2e-5  # fp32 kernel against the float64 reference, relative to the largest reference entry


pytestmark = pytest.mark.usefixtures("poisoned_buffers")


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """Counts the calls of the fused sums (so a test knows which path the dispatcher took)."""
    calls: list[int] = []
    fused = K.sigreg_sums

    def counted(*args):
        calls.append(1)
        return fused(*args)

    monkeypatch.setattr(K, "sigreg_sums", counted)
    return calls


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, (a.shape, e.shape)
    if e.numel() == 0:
        return 0.0
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-300))


def check(actual, expected, tol, what, seed):
    err = rel(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} (seed {seed})"


def nodes(num_points: int) -> torch.Tensor:
    return epps_pulley_grid(num_points, 5.0)[0]


def directions(d: int, s: int, seed: int) -> torch.Tensor:
    return sigreg_directions(d, s, seed, 3, DEV, torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# the kernel's sums


@needs_triton
@pytest.mark.parametrize(
    "shape,num_slices,num_points",
    [((37, 19), 11, 33), ((2, 37, 19), 37, 33), ((3, 5, 40), 11, 16), ((1, 19), 3, 2), ((2, 0, 19), 11, 17)],
    ids=["N37-D19-S11-T17", "V2-S37", "V3-N5-D40-even-grid", "N1-S3-T1", "no-rows"],
)
def test_sums_and_gradient_match_eager(shape, num_slices, num_points, seed):
    z = (torch.randn(*shape, dtype=F64) * 1.5 + 0.3).to(DEV)
    a = directions(shape[-1], num_slices, seed)
    t = nodes(num_points).to(DEV)
    ker_in = z.float().requires_grad_()
    ref_in = z.clone().requires_grad_()
    out = K.sigreg_sums(ker_in, a, t.float())
    ref = ecf_sums(ref_in, a.double(), t)
    assert out.shape == ref.shape and out.dtype == torch.float32
    check(out, ref, TOL, f"sums {shape}", seed)
    w = torch.randn(ref.shape, dtype=F64, device=DEV)
    (g,) = torch.autograd.grad((out * w.float()).sum(), ker_in)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), ref_in)
    assert g.dtype == torch.float32 and g.shape == z.shape
    check(g, g_ref, TOL, f"d/dz {shape}", seed)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16bit_and_strided_inputs(dtype, seed):
    """16-bit tiles are cast to fp32 on load (the same numbers as the eager cast); a transposed view is read
    through its strides; the gradient comes back in the input dtype."""
    z = torch.randn(19, 37, dtype=F64, device=DEV).to(dtype).t()  # (37, 19), not contiguous
    a = directions(19, 11, seed)
    t = nodes(17).to(DEV)
    ker_in = z.detach().requires_grad_()
    ref_in = z.detach().double().requires_grad_()
    out = K.sigreg_sums(ker_in, a, t.float())
    ref = ecf_sums(ref_in, a.double(), t)
    check(out, ref, TOL, f"sums {dtype}", seed)
    w = torch.randn(ref.shape, dtype=F64, device=DEV)
    (g,) = torch.autograd.grad((out * w.float()).sum(), ker_in)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), ref_in)
    assert g.dtype == dtype
    check(g, g_ref, 1e-2, f"d/dz {dtype}", seed)  # the gradient's own 16-bit rounding


@needs_triton
def test_large_phases_as_accurate_as_eager_fp32(seed):
    """Embeddings at scale 100 (phases in the thousands): the kernel's range reduction keeps it as close to the
    float64 reference as the eager fp32 computation is (both are limited by the fp32 phase)."""
    z = torch.randn(37, 19, dtype=F64, device=DEV) * 100
    a = directions(19, 11, seed)
    t = nodes(17).to(DEV)
    ref = ecf_sums(z, a.double(), t)
    eager32 = rel(ecf_sums(z.float(), a, t.float()), ref)
    check(K.sigreg_sums(z.float(), a, t.float()), ref, 3 * eager32 + TOL, "sums at scale 100", seed)


# ---------------------------------------------------------------------------------------------------------------
# sigreg / lejepa through the dispatcher


@needs_triton
@pytest.mark.parametrize("shape", [(37, 19), (2, 37, 19)], ids=["N37-D19", "V2-N37-D19"])
def test_sigreg_value_and_gradient(shape, seed, kernel_calls):
    z = torch.randn(*shape, dtype=F64, device=DEV) + 0.2
    a = directions(shape[-1], 11, seed)
    ker_in = z.float().requires_grad_()
    ref_in = z.clone().requires_grad_()
    got = D.sigreg(ker_in, a, num_points=33, impl="triton")
    ref = sigreg(ref_in, a.double(), num_points=33)
    assert kernel_calls == [1] and got.dtype == torch.float32
    check(got, ref, TOL, "sigreg", seed)
    (g,) = torch.autograd.grad(got, ker_in)
    (g_ref,) = torch.autograd.grad(ref, ref_in)
    check(g, g_ref, TOL, "d sigreg / dz", seed)


@needs_triton
def test_sigreg_under_bf16_autocast(seed, kernel_calls):
    """Under autocast the kernel path, like the eager one, computes in float32 on the given numbers."""
    z = torch.randn(37, 19, device=DEV).to(torch.bfloat16)
    a = directions(19, 11, seed)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        got = D.sigreg(z, a, impl="triton")
    assert kernel_calls == [1] and got.dtype == torch.float32
    check(got, sigreg(z.double(), a.double()), TOL, "sigreg bf16 autocast", seed)


@needs_triton
def test_lejepa_loss_terms_and_gradients(seed, kernel_calls):
    views = [torch.randn(37, 19, dtype=F64, device=DEV) for _ in range(3)]
    a = directions(19, 11, seed)
    ker_in = [v.float().requires_grad_() for v in views]
    ref_in = [v.clone().requires_grad_() for v in views]
    got = D.lejepa(ker_in, 2, a, 0.3, impl="triton")
    ref = lejepa_loss(ref_in, 2, a.double(), 0.3)
    assert kernel_calls == [1] and got.keys() == ref.keys()
    for k in ref:
        check(got[k], ref[k], TOL, k, seed)
    for i, (g, g_ref) in enumerate(
        zip(torch.autograd.grad(got["loss"], ker_in), torch.autograd.grad(ref["loss"], ref_in))
    ):
        check(g, g_ref, TOL, f"d loss / d view {i}", seed)


@pytest.mark.skipif(CUDA, reason="on CPU only")
def test_dispatcher_takes_eager_where_the_kernel_does_not_apply(kernel_calls):
    """auto on CPU, eager, float64 inputs and directions that need a gradient take the reference path, bit for bit."""
    z = torch.randn(9, 5)
    a = sigreg_directions(5, 4, 0, 0)
    assert torch.equal(D.sigreg(z, a, impl="auto"), sigreg(z, a))
    assert torch.equal(D.sigreg(z, a, impl="eager"), sigreg(z, a))
    ref = lejepa_loss([z, z + 1], 1, a)
    got = D.lejepa([z, z + 1], 1, a, impl="auto")
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    if K.triton_available():
        assert torch.equal(D.sigreg(z.double(), a, impl="triton"), sigreg(z.double(), a))
        a_grad = a.clone().requires_grad_()
        assert torch.equal(D.sigreg(z, a_grad, impl="triton"), sigreg(z, a))
    assert kernel_calls == []
    with pytest.raises(ValueError, match="directions"):
        D.sigreg(z, a[:3], impl="auto")


# ---------------------------------------------------------------------------------------------------------------
# the method with loss.impl = triton


def _method(impl: str) -> LeJEPA:
    torch.manual_seed(7)
    return LeJEPA(torch.nn.Identity(), 19, [13], LeJEPAConfig(lambd=0.3, num_slices=11, num_points=33), 5, impl)


@needs_triton
def test_method_with_triton_impl_matches_eager_float64(seed, kernel_calls):
    fused = _method("triton").to(DEV)
    eager = copy.deepcopy(fused).double()
    eager.loss_impl = "eager"
    views = [torch.randn(37, 19, dtype=F64, device=DEV) for _ in range(2)]
    index = torch.arange(37)
    for m in (fused, eager):
        m.on_step_start(4, 10)
    ker_in = [v.float().requires_grad_() for v in views]
    ref_in = [v.clone().requires_grad_() for v in views]
    got = fused(Views(ker_in, [], index, None))
    ref = eager(Views(ref_in, [], index, None))
    assert kernel_calls == [1]
    for k in ("loss", "prediction", "sigreg"):
        check(got[k], ref[k], TOL, k, seed)
    params = [p for p in fused.parameters() if p.requires_grad]
    ref_params = [p for p in eager.parameters() if p.requires_grad]
    grads = torch.autograd.grad(got["loss"], ker_in + params)
    ref_grads = torch.autograd.grad(ref["loss"], ref_in + ref_params)
    for i, (g, g_ref) in enumerate(zip(grads, ref_grads)):
        check(g, g_ref, TOL, f"gradient {i}", seed)


@pytest.mark.skipif(CUDA, reason="on CPU only")
def test_method_with_auto_impl_is_eager_on_cpu(kernel_calls):
    method = _method("auto")
    views = [torch.randn(8, 19) for _ in range(2)]
    method(Views(views, [], torch.arange(8), None))["loss"].backward()
    assert kernel_calls == []


# ---------------------------------------------------------------------------------------------------------------
# data parallel: the kernel's sums go through the same autograd all-reduce as the eager ones

WORLD, DIST_SHAPE, DIST_SLICES = 2, (2, 21, 19), 11


def _dist_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    z = torch.randn(*DIST_SHAPE, generator=g, dtype=F64)
    return z, sigreg_directions(DIST_SHAPE[-1], DIST_SLICES, 0, 2)


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from ssltrain.core.collectives import row_offset

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        z, a = _dist_inputs()
        rows = DIST_SHAPE[1] // world + (rank < DIST_SHAPE[1] % world)  # uneven: 11 and 10 rows
        start = row_offset(rows)
        mine = z[:, start : start + rows].float().requires_grad_()
        loss = D.sigreg(mine, a, num_points=33, impl="triton")
        (grad,) = torch.autograd.grad(loss, mine)
        torch.save({"loss": loss.detach(), "grad": grad, "start": start}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@needs_triton
@pytest.mark.skipif(CUDA, reason="the interpreter's CPU processes")
def test_two_processes_equal_the_single_process(tmp_path):
    """Each rank's loss is the whole batch's and its gradient, over the world size, the single-process gradient of
    its rows (tests/test_distributed_losses.py's convention), with the kernel computing each rank's sums."""
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(WORLD, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    z, a = _dist_inputs()
    z.requires_grad_()
    ref = sigreg(z, a.double(), num_points=33)
    (g_ref,) = torch.autograd.grad(ref, z)
    for r in range(WORLD):
        res = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        rows = res["grad"].shape[1]
        check(res["loss"], ref, TOL, f"rank {r} loss", 0)
        check(res["grad"] / WORLD, g_ref[:, res["start"] : res["start"] + rows], TOL, f"rank {r} gradient", 0)


# ---------------------------------------------------------------------------------------------------------------
# the compiled kernel at a real size (GPU only; bench/gpu_checks.sh runs these)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_sigreg_matches_eager(dtype):
    torch.manual_seed(0)
    z = (torch.randn(4, 1000, 300, device="cuda") / 300**0.5 + 0.01).to(dtype)
    a = sigreg_directions(300, 257, seed=0, step=1, device="cuda")
    assert K.resolve_impl("auto", z, a) == "triton"
    ker_in, ref_in = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = D.sigreg(ker_in, a, impl="auto")
    ref = D.sigreg(ref_in, a, impl="eager")
    assert rel(got, ref) <= 1e-4, rel(got, ref)
    (g,) = torch.autograd.grad(got, ker_in)
    (g_ref,) = torch.autograd.grad(ref, ref_in)
    assert g.dtype == dtype
    assert rel(g, g_ref) <= (1e-2 if dtype == torch.bfloat16 else 1e-4), rel(g, g_ref)
    with torch.no_grad():  # the forward-only path
        assert rel(D.sigreg(z, a, impl="triton"), ref) <= 1e-4
