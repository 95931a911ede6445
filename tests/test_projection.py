"""Projection and basis construction against dense float64 linear algebra (tests/helpers.py)."""

import pytest
import torch

import ogpsa_core
from helpers import FlatSlice, float32_rtol, reference_projection, relative_error

# A layout with repeated shapes (as transformer layers have) and odd sizes, so strided batching is exercised.
LAYOUT = [64, 8, 64, 8, 64, 8, 5, 33, 64, 8, 1, 17]
# float32 bound for sums over the whole layout (see helpers.float32_rtol): 1.8e-5; wrong formulas miss by O(1).
TOL = float32_rtol(sum(LAYOUT))


def make(lengths=LAYOUT, k=2, seed=0, num_pieces=1, **projector_kwargs):
    generator = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    directions = torch.randn(k, n, generator=generator)
    grad = torch.randn(n, generator=generator)
    grad_slice = FlatSlice(grad.clone(), lengths, num_pieces=num_pieces)
    projector = ogpsa_core.Projector(grad_slice, **projector_kwargs)
    return projector, grad_slice, grad, directions


@pytest.mark.parametrize("scope", ogpsa_core.SCOPES)
@pytest.mark.parametrize("basis", ogpsa_core.BASES)
@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("num_pieces", [1, 3])
def test_projection_matches_float64_reference(scope, basis, k, num_pieces):
    projector, grad_slice, grad, directions = make(k=k, num_pieces=num_pieces, scope=scope, basis=basis)
    projector.set_directions_(directions.clone(), step=0)
    stats = projector.project_(diagnostics=True)
    expected = reference_projection(grad, directions, LAYOUT, scope)
    tol = float32_rtol(sum(LAYOUT), grad.norm() / expected.norm())  # g' is what is left after cancellation
    assert relative_error(grad_slice.flat, expected) < tol
    assert stats.max_abs_cos < tol  # U^T g' ~ 0
    assert stats.grad_norm == pytest.approx(grad.norm().item(), rel=TOL)
    assert stats.grad_norm_projected == pytest.approx(expected.norm().item(), rel=tol)
    assert stats.removed_fraction == pytest.approx(1 - expected.norm().item() / grad.norm().item(), abs=tol)


@pytest.mark.parametrize("scope", ogpsa_core.SCOPES)
def test_bf16_basis_within_bf16_precision(scope):
    projector, grad_slice, grad, directions = make(k=3, scope=scope, dtype=torch.bfloat16)
    projector.set_directions_(directions.clone(), step=0)
    assert projector.basis.dtype == torch.bfloat16
    stats = projector.project_(diagnostics=True)
    expected = reference_projection(grad, directions, LAYOUT, scope)
    removed = (grad.double() - expected).norm()
    # bf16 keeps 8 significant bits: the basis, hence the removed component, is accurate to ~2^-8 relative.
    assert ((grad_slice.flat.double() - expected).norm() / removed).item() < 2e-2
    assert stats.max_abs_cos < 2e-2


@pytest.mark.parametrize("scope", ogpsa_core.SCOPES)
def test_norms_of_a_bf16_gradient_are_taken_in_float32(scope):
    """A gradient kept in bf16 (ZeRO with bf16 accumulation): the diagnostic norms, which the guard compares with
    the optimizer's own to 1e-3, are float32 sums of the stored bf16 values (float32_rtol). Per-tensor products in
    bf16 rounded each tensor's squared norm to 8 bits: 1.2e-3 off DeepSpeed's norm under ZeRO-3, which stopped a
    correct run."""
    lengths = [4096, 4096, 64]
    projector, grad_slice, _, directions = make(lengths, scope=scope)
    grad_slice.flat = grad_slice.flat.bfloat16()
    projector.set_directions_(directions.clone(), step=0)
    before = grad_slice.flat.double().norm().item()
    stats = projector.project_(diagnostics=True)
    assert stats.grad_norm == pytest.approx(before, rel=float32_rtol(sum(lengths)))
    assert stats.grad_norm_projected == pytest.approx(grad_slice.flat.double().norm().item(),
                                                      rel=float32_rtol(sum(lengths)))


@pytest.mark.parametrize("scope", ogpsa_core.SCOPES)
@pytest.mark.parametrize("basis", ogpsa_core.BASES)
def test_projecting_twice_changes_nothing(scope, basis):
    projector, grad_slice, _, directions = make(k=3, scope=scope, basis=basis)
    projector.set_directions_(directions, step=0)
    projector.project_()
    once = grad_slice.flat.clone()
    projector.project_()
    assert (grad_slice.flat - once).norm() <= TOL * once.norm()  # only rounding is left to remove


@pytest.mark.parametrize("scope", ogpsa_core.SCOPES)
def test_qr_and_svd_span_the_same_space(scope):
    bases = {}
    for basis in ogpsa_core.BASES:
        projector, _, _, directions = make(k=4, scope=scope, basis=basis)
        projector.set_directions_(directions, step=0)
        bases[basis] = projector.basis.double()
    lengths = LAYOUT if scope == "per_param" else [sum(LAYOUT)]
    start = 0
    for length in lengths:  # orthogonal projector onto the span, unit by unit
        qr, svd = (b[:, start:start + length] for b in (bases["qr"], bases["svd"]))
        assert torch.allclose(qr.T @ qr, svd.T @ svd, atol=TOL)  # float32 bases, compared in float64
        start += length


@pytest.mark.parametrize("scope", ogpsa_core.SCOPES)
@pytest.mark.parametrize("basis", ogpsa_core.BASES)
def test_rank_deficient_zero_and_parallel_directions(scope, basis):
    projector, grad_slice, grad, directions = make(k=5, scope=scope, basis=basis)
    directions[2] = directions[0] + 2 * directions[1]  # dependent
    directions[3] = 0  # zero
    directions[4] = -3 * directions[1]  # parallel
    projector.set_directions_(directions.clone(), step=0)
    assert not torch.isnan(projector.basis).any()
    assert int(projector.rank_per_unit.max()) == 2
    stats = projector.project_(diagnostics=True)
    expected = reference_projection(grad, directions, LAYOUT, scope)
    tol = float32_rtol(sum(LAYOUT), grad.norm() / expected.norm())
    assert relative_error(grad_slice.flat, expected) < tol
    assert stats.max_abs_cos < tol


@pytest.mark.parametrize("scope", ogpsa_core.SCOPES)
def test_all_zero_directions_leave_the_gradient_alone(scope):
    projector, grad_slice, grad, directions = make(k=2, scope=scope)
    projector.set_directions_(torch.zeros_like(directions), step=0)
    stats = projector.project_(diagnostics=True)
    assert torch.equal(grad_slice.flat, grad)
    assert stats.removed_fraction == 0 and stats.max_abs_cos == 0


def test_a_parameter_with_zero_reference_gradient_is_left_alone():
    projector, grad_slice, grad, directions = make(k=2, scope="per_param")
    directions[:, 64:72] = 0  # the second parameter never moved on the reference data
    projector.set_directions_(directions.clone(), step=0)
    projector.project_()
    assert torch.equal(grad_slice.flat[64:72], grad[64:72])
    expected = reference_projection(grad, directions, LAYOUT, "per_param")
    assert relative_error(grad_slice.flat, expected) < float32_rtol(sum(LAYOUT), grad.norm() / expected.norm())


@pytest.mark.parametrize("basis", ogpsa_core.BASES)
def test_threshold_drops_weak_directions(basis):
    projector, _, _, directions = make(k=2, scope="global", basis=basis, threshold=0.05)
    generator = torch.Generator().manual_seed(1)
    directions[1] = directions[0] + 0.01 * directions[0].norm() * torch.randn(directions.shape[1],
                                                                               generator=generator) / 15
    projector.set_directions_(directions, step=0)
    assert int(projector.rank_per_unit.max()) == 1
    projector, _, _, directions = make(k=2, scope="global", basis=basis, threshold=0.0)
    directions[1] = directions[0] + 0.01 * directions[0].norm() * torch.randn(directions.shape[1],
                                                                               generator=generator) / 15
    projector.set_directions_(directions, step=0)
    assert int(projector.rank_per_unit.max()) == 2


@pytest.mark.parametrize("scope", ogpsa_core.SCOPES)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_threshold_method_matches_reference_rule(scope, k, sign):
    projector, grad_slice, grad, directions = make(k=k, scope=scope, method="threshold", scale=0.5)
    grad_slice.flat.copy_(sign * directions[0] + 0.3 * grad)  # mostly aligned with (or against) d_0
    grad = grad_slice.flat.clone()
    projector.set_directions_(directions.clone(), step=0)
    projector.project_()
    expected = reference_projection(grad, directions, LAYOUT, scope, method="threshold", scale=0.5)
    assert relative_error(grad_slice.flat, expected) < float32_rtol(sum(LAYOUT), grad.norm() / expected.norm())


def test_single_direction_threshold_is_the_reference_rule():
    """One direction, global: project if cos(g, d) < 0, else g *= base_scale (the reference implementation)."""
    projector, grad_slice, grad, directions = make(k=1, scope="global", method="threshold", scale=0.25)
    d = directions[0].double()
    for g in (d + 0.1 * grad.double(), -d + 0.1 * grad.double()):
        grad_slice.flat.copy_(g)
        projector.set_directions_(directions.clone(), step=0)
        projector.project_()
        cos = (g @ d) / (g.norm() * d.norm())
        expected = g - (g @ d) / (d @ d) * d if cos < 0 else 0.25 * g
        assert relative_error(grad_slice.flat, expected) < float32_rtol(g.numel(), g.norm() / expected.norm())


def test_strided_batches_cover_each_segment_once():
    lengths = [100, 10, 10, 30, 100, 10, 10, 30, 100, 10, 10, 30, 7]
    segments, start = [], 0
    for i, length in enumerate(lengths):
        segments.append(ogpsa_core.Segment(i, start, length))
        start += length
    batches = ogpsa_core.plan_strided_batches(segments, "cpu")
    covered = sorted((b.start + j * b.stride, b.length, int(b.param_index[j]))
                     for b in batches for j in range(b.count))
    assert covered == sorted((s.start, s.length, s.param_index) for s in segments)
    assert len(batches) == 5  # 100s, two interleaved runs of 10s, 30s, 7


def test_checkpointed_basis_round_trips():
    projector, grad_slice, grad, directions = make(k=2, scope="per_param")
    projector.set_directions_(directions, step=30)
    restored = ogpsa_core.Projector(FlatSlice(grad.clone(), LAYOUT), scope="per_param")
    restored.load_state_dict(projector.state_dict())
    assert restored.refreshed_at == 30 and torch.equal(restored.basis, projector.basis)
    projector.project_()
    restored.project_()
    assert torch.equal(restored.grad_slice.flat, grad_slice.flat)
    with pytest.raises(ValueError, match="same model, backend and number of processes"):
        ogpsa_core.Projector(FlatSlice(grad[:100].clone(), [100])).load_state_dict(projector.state_dict())


def test_reference_chunks_and_rank_shares():
    chunks = ogpsa_core.reference_chunks(num_rows=10, num_samples=7, num_directions=3)
    assert chunks == [[0, 1], [2, 3, 4], [5, 6]]
    assert ogpsa_core.reference_chunks(5, 200, 1) == [[0, 1, 2, 3, 4]]  # a small set is used whole
    with pytest.raises(ValueError, match="base_directions 4"):
        ogpsa_core.reference_chunks(3, 200, 4)
    indices = list(range(7))
    shares = [ogpsa_core.rank_micro_batches(indices, r, 3, 2) for r in range(3)]
    assert {len(s) for s in shares} == {2}  # same number of micro-batches on every rank
    seen = sorted(i for share in shares for batch in share if batch for i in batch)
    assert seen == indices  # none repeated, none missed
    assert shares[1][1] is None and shares[2][1] is None  # padding micro-batches


@pytest.mark.parametrize("scope", ogpsa_core.SCOPES)
def test_chunked_casts_give_the_same_projection(monkeypatch, scope):
    """A bf16 basis is cast chunk by chunk; chunk boundaries must not change the result."""
    results = []
    for chunk in (ogpsa_core.CHUNK_NUMEL, 50):
        monkeypatch.setattr(ogpsa_core, "CHUNK_NUMEL", chunk)
        projector, grad_slice, _, directions = make(k=3, scope=scope, dtype=torch.bfloat16)
        projector.set_directions_(directions, step=0)
        projector.project_()
        results.append(grad_slice.flat)
    # Same products, only the casts split differently: float32 rounding of the gathered sums at most.
    assert relative_error(results[0], results[1]) < TOL


class MasterSlice(FlatSlice):
    """A slice whose optimizer keeps separate float32 masters (ZeRO), here one tensor whose last entries are
    padding past every segment, as on ZeRO-3's last rank."""

    def __init__(self, grad, lengths, master):
        super().__init__(grad, lengths)
        self.master = master

    def masters(self):
        return [(0, self.master)]


@pytest.mark.parametrize("scope", ["per_param", "global"])
def test_update_projection_of_master_partitions_ignores_uninitialised_padding(scope):
    """ZeRO leaves partition padding unset: a NaN there must not reach the projected step (in the global scope
    0 x NaN in the coefficient would make every entry NaN). The change of the segments equals its float64
    projection within float32_rtol of the 12-entry sums, amplified by ||step|| / ||projected step||."""
    torch.manual_seed(0)
    lengths, padding = [5, 7], 3
    numel = sum(lengths) + padding
    directions = torch.randn(2, numel)
    directions[:, -padding:] = 0  # directions are zero on padding, as read from a gradient
    master = torch.randn(numel)
    master[-padding:] = float("nan")
    projector = ogpsa_core.Projector(MasterSlice(torch.zeros(numel), lengths, master), scope=scope)
    projector.set_directions_(directions.clone(), step=0)
    update = ogpsa_core.UpdateProjector(projector, params=None)
    update.snapshot()
    before = master.clone()
    step = torch.randn(numel)
    master.add_(step)  # the optimizer's step
    update.project_()
    change = (master[:-padding] - before[:-padding]).double()
    expected = reference_projection(step[:-padding], directions[:, :-padding], lengths, scope)
    assert torch.isfinite(change).all()
    amplification = (step[:-padding].norm() / expected.norm()).item()
    assert relative_error(change, expected) <= float32_rtol(sum(lengths), amplification)
