"""OGPSA core: reference gradients, an orthonormal basis of their span, and in-place projection of the gradient.

Orthogonal Gradient Projection for Safety Alignment removes from every safety gradient g its component in the
span of K reference gradients (gradients of the LM loss on general-capability data):

    g  <-  g - U (U^T g)            U: P x K with orthonormal columns

so that, to first order, an update leaves every reference loss unchanged. Here U is stored transposed, as a K x n
tensor over the n gradient entries this rank owns ("the local slice"): the full gradient on a single process or
under DDP (where it is replicated), one partition under DeepSpeed ZeRO. Every inner product over the whole model
is a sum of local inner products, so the only communication is an all-reduce of K numbers (global scope) or of a
(num_params x K) table (per-parameter scope), and the basis is built from all-reduced K x K Gram matrices; no
rank ever holds more than its own slice of a direction.

Scopes:
    global     one basis over all parameters (K directions in R^P).
    per_param  every parameter tensor gets its own basis, from the reference gradients restricted to it (the
               reference implementation's semantics). A tensor split across two ranks' partitions is still exact:
               its segment-wise partial sums are added by the all-reduce.

Backends (single process, DDP, DeepSpeed ZeRO) differ only in where the gradient lives; a `GradSlice` tells the
projection which flat views this rank owns and how they map onto parameters. This file holds the interface and
the slice of a replicated gradient (one process, DDP); the ZeRO slices are in backends.py, beside the DeepSpeed
internals they read.

Contents: gradient slices; basis construction (`orthonormal_coefficients`); the projection (`Projector`);
reference-gradient collection and refresh (`ReferenceSet`, `ReferenceGradients`); projecting the optimizer's step
(`UpdateProjector`, --base_project_update). Nothing here imports the rest of the project.
"""

import bisect
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Directions whose singular value (svd) or residual norm (qr) falls below this fraction of the largest are
# dropped even at --base_threshold 0: below it a float32 direction cannot be told apart from rounding noise.
NUMERICAL_RTOL = 1e-5
# Elements per chunk when a pass over the slice needs float64 or other temporaries: bounds extra memory.
CHUNK_NUMEL = 1 << 22
METHODS = ("none", "orthogonal_projection", "threshold")
SCOPES = ("per_param", "global")
BASES = ("qr", "svd")


# ---------------------------------------------------------------------------------------------------------------
# Where the gradient lives
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Segment:
    """A run of this rank's flat slice that belongs to one parameter tensor."""
    param_index: int  # position of the parameter in the model's trainable-parameter list (same on every rank)
    start: int  # offset in this rank's flat slice (the concatenation of `GradSlice.pieces()`)
    length: int
    param_start: int = 0  # offset of the run inside the flattened parameter (non-zero where a partition splits it)


class GradSlice:
    """The gradient entries this rank owns, as flat 1-D views that the projection edits in place.

    Subclasses set `num_params` and `segments` (sorted by start; together the layout of this rank's "local
    coordinates", fixed for the run) and implement `pieces()`: (start, view) pairs whose views cover every
    segment. Entries of a view outside all segments are padding: zero in gradients and directions alike.
    `sharded` says whether ranks own disjoint slices (ZeRO: partial sums must be all-reduced) or identical copies
    (single process, DDP: nothing to reduce).
    """

    num_params: int
    segments: list
    numel: int  # size of the local coordinate space (segments plus padding)
    device: torch.device
    dtype: torch.dtype  # of the gradient the projection edits
    sharded: bool = False

    def pieces(self):
        raise NotImplementedError

    def reduce_(self, tensor):
        """Sum partial results over ranks that own disjoint slices, in place."""
        if self.sharded and dist.is_available() and dist.is_initialized():
            dist.all_reduce(tensor)
        return tensor

    def norm(self):
        """||g|| over all ranks (float32 accumulation)."""
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for _, view in self.pieces():
            total += view.float().square().sum().to(self.device)
        return self.reduce_(total).sqrt()

    def mul_(self, factor):
        for _, view in self.pieces():
            view.mul_(factor)

    def masters(self):
        """(start, tensor) pairs of the float32 master weights in local coordinates, where an optimizer keeps them
        partitioned (ZeRO); empty where the parameters are the masters."""
        return []

    def local_values(self, param, segment):
        """The parameter's own values for `segment`, as this rank holds them."""
        raise NotImplementedError

    @torch.no_grad()
    def misplaced_params(self, params):
        """Indices of parameters whose float32 master entries, read through this slice's coordinates, differ from
        the parameter's own values: a check of the coordinate map that does not go through the gradient."""
        masters = self.masters()
        starts = [start for start, _ in masters]
        misplaced = []
        if not masters:
            return misplaced
        for segment in self.segments:
            start, master = masters[bisect.bisect_right(starts, segment.start) - 1]
            values = self.local_values(params[segment.param_index], segment)
            mapped = master[segment.start - start:segment.start - start + segment.length]
            if not torch.equal(mapped.to(device=values.device, dtype=values.dtype), values):
                misplaced.append(segment.param_index)
        return misplaced


class ReplicatedGradSlice(GradSlice):
    """Single process or DDP: the whole (reduced) gradient, kept in one flat buffer.

    Every parameter's `.grad` becomes a view into one contiguous buffer, so the projection is one matrix-vector
    product over all parameters. Autograd, DDP and `clip_grad_norm_` all write `.grad` in place, which keeps the
    views valid; only `zero_grad(set_to_none=True)` would break them, and `pieces()` checks for that.
    """

    def __init__(self, params):
        params = list(params)
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"all trainable parameters must share one dtype, got {sorted(map(str, dtypes))}")
        self.num_params = len(params)
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        self.segments, start = [], 0
        for index, param in enumerate(params):
            param.grad = self.flat[start:start + param.numel()].view_as(param)
            self.segments.append(Segment(index, start, param.numel()))
            start += param.numel()
        self.numel, self.device, self.dtype = start, self.flat.device, self.flat.dtype
        self._params = params
        self._grad_ptrs = [p.grad.data_ptr() for p in params]

    def pieces(self):
        if any(p.grad is None or p.grad.data_ptr() != ptr for p, ptr in zip(self._params, self._grad_ptrs)):
            raise RuntimeError("a parameter's .grad no longer views the flat gradient buffer; "
                               "call optimizer.zero_grad(set_to_none=False) when OGPSA is on")
        return [(0, self.flat)]

    def zero_(self):
        self.flat.zero_()


def merge_adjacent_views(views, starts):
    """(start, view) pairs, merging consecutive 1-D views that are also consecutive in one storage."""
    merged = []
    for start, view in zip(starts, views):
        if merged:
            first, run = merged[-1]
            if (run.dtype == view.dtype and run.device == view.device and first + run.numel() == start
                    and run.untyped_storage().data_ptr() == view.untyped_storage().data_ptr()
                    and run.storage_offset() + run.numel() == view.storage_offset()):
                merged[-1] = (first, run.new_empty(0).set_(run.untyped_storage(), run.storage_offset(),
                                                          (run.numel() + view.numel(),)))
                continue
        merged.append((start, view))
    return merged


# ---------------------------------------------------------------------------------------------------------------
# Basis construction (float64 algebra on K x K Gram matrices)
# ---------------------------------------------------------------------------------------------------------------

def orthonormal_coefficients(gram, basis="qr", threshold=0.0):
    """Coefficients C with U = C D orthonormal, from the Gram matrix of the directions D alone.

    Args:
        gram: (units, K, K) float64, gram[u] = D_u D_u^T for the K directions restricted to unit u.
        basis: "qr" keeps the directions' order (Gram-Schmidt: u_j spans the part of d_j not already covered);
            "svd" takes principal directions (u_j = v_j^T D / sigma_j from gram = V diag(sigma^2) V^T).
        threshold: drop a direction whose residual norm (qr) or singular value (svd) is below
            max(threshold, NUMERICAL_RTOL) x the largest direction norm (qr) or singular value (svd) of its unit.

    Returns:
        (units, K, K) float64 C. Dropped directions are zero rows, so all-zero or parallel directions give
        zero rows, never NaN. A kept row k of C D has unit norm; for "qr" its inner product with d_k is positive.
    """
    units, k, _ = gram.shape
    rtol = max(threshold, NUMERICAL_RTOL)
    coeff = torch.zeros_like(gram)
    if basis == "svd":
        eigvals, eigvecs = torch.linalg.eigh(gram)  # ascending
        sigma = eigvals.clamp_min(0).sqrt().flip(-1)
        eigvecs = eigvecs.flip(-1)
        keep = (sigma > rtol * sigma[:, :1]) & (sigma[:, :1] > 0)
        safe_sigma = torch.where(keep, sigma, torch.ones_like(sigma))
        coeff = eigvecs.transpose(1, 2) / safe_sigma.unsqueeze(-1) * keep.unsqueeze(-1)
        # Orient each principal direction along the sum of the reference directions, so that threshold's
        # "conflicts with the reference gradient" test has a meaning.
        sign = torch.sign((coeff @ gram).sum(-1, keepdim=True))
        return coeff * torch.where(sign == 0, torch.ones_like(sign), sign)
    if basis != "qr":
        raise ValueError(f"unknown basis {basis!r}, expected one of {BASES}")
    scale = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().amax(-1)  # largest direction norm per unit
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device).expand(units, k, k)
    for j in range(k):
        residual = eye[:, j].clone()  # coefficients of d_j
        for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to working precision
            overlap = coeff @ (gram @ residual.unsqueeze(-1))  # u_i . residual
            residual = residual - (coeff.transpose(1, 2) @ overlap).squeeze(-1)
        norm = (residual.unsqueeze(1) @ gram @ residual.unsqueeze(-1)).reshape(units).clamp_min(0).sqrt()
        keep = (norm > rtol * scale) & (scale > 0)
        coeff[:, j] = residual / torch.where(keep, norm, torch.ones_like(norm)).unsqueeze(-1) * keep.unsqueeze(-1)
    return coeff


# ---------------------------------------------------------------------------------------------------------------
# Batched per-parameter segments
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StridedBatch:
    """`count` segments of equal `length` at start, start + stride, ...: one strided (count, length) view.

    Transformer layers repeat, so the hundreds of parameter tensors of a model fall into a few such batches and
    per-parameter projection becomes a handful of batched matrix products instead of a Python loop.
    """
    start: int
    stride: int
    count: int
    length: int
    param_index: torch.Tensor  # (count,) int64

    def chunks(self, max_numel):
        """Sub-batches of at most max_numel entries (at least one segment each)."""
        step = max(1, max_numel // self.length)
        for i in range(0, self.count, step):
            count = min(step, self.count - i)
            yield StridedBatch(self.start + i * self.stride, self.stride, count, self.length,
                               self.param_index[i:i + count])

    def view(self, tensor, rows=None):
        """(count, 1, length) view of a flat tensor, or (count, rows, length) of a (rows, n) one."""
        if rows is None:
            return tensor.as_strided((self.count, 1, self.length), (self.stride, self.length, 1),
                                     tensor.storage_offset() + self.start)
        return tensor.as_strided((self.count, rows, self.length), (self.stride, tensor.stride(0), 1),
                                 tensor.storage_offset() + self.start)


def plan_strided_batches(segments, device):
    """Group segments of equal length whose starts form arithmetic progressions (longest progression first)."""
    by_length = {}
    for seg in segments:
        by_length.setdefault(seg.length, {})[seg.start] = seg.param_index
    batches = []
    for length, index_at in by_length.items():
        unassigned = sorted(index_at)
        while unassigned:
            first, rest = unassigned[0], set(unassigned[1:])
            best = [first]
            for candidate in unassigned[1:9]:  # strides to try: to each of the next few starts
                run, stride = [first], candidate - first
                while run[-1] + stride in rest:
                    run.append(run[-1] + stride)
                if len(run) > len(best):
                    best = run
            stride = best[1] - best[0] if len(best) > 1 else length
            batches.append(StridedBatch(first, stride, len(best), length,
                                        torch.tensor([index_at[s] for s in best], device=device)))
            taken = set(best)
            unassigned = [s for s in unassigned if s not in taken]
    return batches


# ---------------------------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class ProjectionStats:
    grad_norm: float  # ||g|| before projection
    grad_norm_projected: float  # ||g'|| after
    removed_fraction: float  # 1 - ||g'|| / ||g||
    max_abs_cos: float  # largest |cos(g'_unit, u)| over basis vectors u (0 up to rounding after projection);
    # units whose projected gradient is below 1e-4 of its original norm (fully in the span) are skipped


class Projector:
    """Holds this rank's slice of the basis and projects this rank's slice of the gradient in place.

    Args:
        grad_slice: where the gradient lives (see `GradSlice`).
        scope: "global" or "per_param".
        method: "orthogonal_projection" removes the basis component; "threshold" removes only the components
            that conflict (u_k . g < 0, u_k oriented along its reference gradient) and, in a unit with no
            conflict, multiplies g by `scale`. With one direction this is the reference implementation's rule
            (project if cos(g, g_ref) < 0, else g *= base_scale). A unit is one parameter (per_param) or the
            whole model (global).
        basis: "qr" or "svd" (see `orthonormal_coefficients`); threshold: see there.
        dtype: storage dtype of the basis (float32, or bfloat16 to halve its memory).
    """

    def __init__(self, grad_slice, scope="per_param", method="orthogonal_projection", basis="qr",
                 threshold=0.0, scale=1.0, dtype=torch.float32):
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}, expected one of {SCOPES}")
        if method not in METHODS[1:]:
            raise ValueError(f"unknown projection method {method!r}, expected one of {METHODS[1:]}")
        self.grad_slice, self.scope, self.method = grad_slice, scope, method
        self.basis_kind, self.threshold, self.scale, self.dtype = basis, threshold, scale, dtype
        self.basis = None  # (K, n) this rank's columns of U^T
        self.rank_per_unit = None  # (units,) directions kept per unit
        self.params_without_direction = []  # parameters whose reference gradient was zero at the last refresh
        self.refreshed_at = -1  # optimizer step at which the basis was computed
        self._batch_cache = {}

    # -- geometry ------------------------------------------------------------------------------------------------
    @property
    def num_units(self):
        return self.grad_slice.num_params if self.scope == "per_param" else 1

    def _batches(self, start, length, device):
        """Strided batches (per_param) of the segments inside the piece [start, start + length), cached."""
        key = (start, length)
        if key not in self._batch_cache:
            inside = [Segment(s.param_index, s.start - start, s.length) for s in self.grad_slice.segments
                      if start <= s.start and s.start + s.length <= start + length]
            self._batch_cache[key] = plan_strided_batches(inside, device)
        return self._batch_cache[key]

    def _pieces(self, target):
        """(basis columns, target view, strided batches) for every (start, view) piece of the target."""
        return [(self.basis[:, start:start + view.numel()], view, self._batches(start, view.numel(), view.device))
                for start, view in target]

    def _coefficients(self, pieces):
        """Per-unit inner products U_unit^T g, summed over ranks: (units, K) float32."""
        k = pieces[0][0].shape[0]
        coeff = torch.zeros(self.num_units, k, dtype=torch.float32, device=pieces[0][1].device)
        for u, g, batches in pieces:
            if self.scope == "global":
                coeff[0] += _matvec(u, g)
            else:
                for b in _cast_sized(batches, u, g, k):
                    partial = torch.bmm(b.view(g), _cast(b.view(u, k), g.dtype).transpose(1, 2))
                    coeff.index_add_(0, b.param_index, partial.squeeze(1).float())
        return self.grad_slice.reduce_(coeff)

    def _unit_sq_norms(self, pieces):
        """Per-unit squared norms, in float32 whatever the gradient's dtype: a bfloat16 product would round each
        tensor's squared norm to 8 bits (the guard compares these norms with the optimizer's to 1e-3)."""
        sq = torch.zeros(self.num_units, dtype=torch.float32, device=pieces[0][1].device)
        for _, g, batches in pieces:
            if self.scope == "global":
                sq[0] += sum(g[lo:lo + CHUNK_NUMEL].float().square().sum() for lo in range(0, g.numel(), CHUNK_NUMEL))
            else:
                if g.dtype != torch.float32:  # the float32 copy below then holds at most CHUNK_NUMEL entries
                    batches = [chunk for b in batches for chunk in b.chunks(CHUNK_NUMEL)]
                for b in batches:
                    view = b.view(g).float()
                    sq.index_add_(0, b.param_index, torch.bmm(view, view.transpose(1, 2)).reshape(-1))
        return self.grad_slice.reduce_(sq)

    # -- projection ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def project_(self, diagnostics=False, target=None):
        """Project this rank's gradient slice in place; return `ProjectionStats` when `diagnostics` is set.

        `target`: (start, view) pieces of another vector in the same local coordinates to project instead (the
        optimizer's step, see `UpdateProjector`). Cost without diagnostics: two passes over the basis and the
        gradient (coefficients, then subtraction) and one all-reduce of the coefficient table when the slice is
        sharded. Diagnostics add two passes.
        """
        pieces = self._pieces(self.grad_slice.pieces() if target is None else target)
        sq_before = self._unit_sq_norms(pieces) if diagnostics else None
        coeff = self._coefficients(pieces)
        if self.method == "threshold":
            conflicts = coeff < 0
            has_basis = (self.rank_per_unit > 0).to(coeff.device)
            unit_scale = torch.where(conflicts.any(-1) | ~has_basis, 1.0, self.scale).to(coeff.dtype)
            coeff = coeff * conflicts
            if self.scale != 1.0:
                self._scale_units_(pieces, unit_scale)
        for u, g, batches in pieces:
            if self.scope == "global":
                _sub_matvec_t_(g, u, coeff[0])
            else:
                k = u.shape[0]
                for b in _cast_sized(batches, u, g, k):
                    b.view(g).baddbmm_(coeff[b.param_index].unsqueeze(1).to(g.dtype), _cast(b.view(u, k), g.dtype),
                                       alpha=-1)
        if not diagnostics:
            return None
        sq_after = self._unit_sq_norms(pieces)
        coeff_after = self._coefficients(pieces)
        # A unit whose gradient lay entirely in its span keeps only rounding noise, whose angle means nothing.
        unit_norm = sq_after.sqrt().unsqueeze(-1)
        defined = unit_norm > 1e-4 * sq_before.sqrt().unsqueeze(-1)
        cos = torch.where(defined, coeff_after.abs() / unit_norm.clamp_min(1e-30), 0.0)
        before, after = sq_before.sum().sqrt().item(), sq_after.sum().sqrt().item()
        return ProjectionStats(before, after, 1.0 - after / before if before > 0 else 0.0,
                               cos.max().item() if cos.numel() else 0.0)

    def _scale_units_(self, pieces, unit_scale):
        for _, g, batches in pieces:
            if self.scope == "global":
                g.mul_(unit_scale[0])
            else:
                for b in batches:
                    b.view(g).mul_(unit_scale[b.param_index].view(-1, 1, 1).to(g.dtype))

    # -- basis ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_directions_(self, directions, step):
        """Turn K reference directions (a (K, n) tensor over this rank's slice, consumed in place) into the basis.

        Each direction is first normalised per unit (per parameter, or globally), so that every reference set
        counts equally; then it is orthonormalised per unit from all-reduced float64 Gram matrices, twice
        (the second pass restores orthogonality lost to float32 rounding when forming U = C D).
        """
        self.basis = None  # free the old basis before the new one is formed
        self.params_without_direction = self._params_without_direction(directions)
        gram = self._gram(directions)
        norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        inverse_norm = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-300), 0.0)
        gram = gram * inverse_norm.unsqueeze(-1) * inverse_norm.unsqueeze(-2)
        coeff = orthonormal_coefficients(gram, self.basis_kind, self.threshold) * inverse_norm.unsqueeze(-2)
        self._apply_coefficients_(directions, coeff)
        coeff = orthonormal_coefficients(self._gram(directions), "qr", 0.0)
        self._apply_coefficients_(directions, coeff)
        self.rank_per_unit = (coeff.abs().sum(-1) > 0).sum(-1)
        self.basis = directions.to(self.dtype)
        self.refreshed_at = step

    def _params_without_direction(self, directions):
        """Indices of the parameters whose reference gradient is zero in every direction (on all ranks): the
        basis has nothing for them, so the projection leaves their gradient as it is (LoRA: every A matrix until
        its B has moved from zero)."""
        largest = torch.zeros(self.grad_slice.num_params, dtype=torch.float32, device=directions.device)
        for s in self.grad_slice.segments:
            piece = directions[:, s.start:s.start + s.length]
            largest[s.param_index] = largest[s.param_index].maximum(piece.abs().max())
        return (self.grad_slice.reduce_(largest) == 0).nonzero().flatten().tolist()

    def _unit_ranges(self):
        """(unit, start, length) runs of the local slice: one per segment (per_param), or all of it (global)."""
        if self.scope == "global":
            return [(0, 0, self.grad_slice.numel)]
        return [(s.param_index, s.start, s.length) for s in self.grad_slice.segments]

    def _gram(self, directions):
        k = directions.shape[0]
        gram = torch.zeros(self.num_units, k, k, dtype=torch.float64, device=directions.device)
        for unit, start, length in self._unit_ranges():
            for lo in range(start, start + length, CHUNK_NUMEL):
                chunk = directions[:, lo:min(lo + CHUNK_NUMEL, start + length)].double()
                gram[unit] += chunk @ chunk.T
        return self.grad_slice.reduce_(gram)

    def _apply_coefficients_(self, directions, coeff):
        """directions[:, unit] <- coeff[unit] @ directions[:, unit], chunk by chunk (no (K, n) temporary)."""
        coeff = coeff.to(directions.dtype)
        for unit, start, length in self._unit_ranges():
            for lo in range(start, start + length, CHUNK_NUMEL):
                chunk = directions[:, lo:min(lo + CHUNK_NUMEL, start + length)]
                chunk.copy_(coeff[unit] @ chunk)

    # -- checkpointing -------------------------------------------------------------------------------------------
    def state_dict(self):
        """This rank's basis slice and its metadata (tensors only, for safetensors)."""
        return {"basis": self.basis.contiguous(), "rank_per_unit": self.rank_per_unit,
                "refreshed_at": torch.tensor(self.refreshed_at)}

    def load_state_dict(self, state):
        basis = state["basis"]
        if basis.shape[1] != self.grad_slice.numel:
            raise ValueError(f"the saved OGPSA basis covers {basis.shape[1]} gradient entries on this rank, but this "
                             f"rank owns {self.grad_slice.numel}: resume with the same model, backend and number "
                             "of processes")
        self.basis = basis.to(device=self.grad_slice.device, dtype=self.dtype)
        self.rank_per_unit = state["rank_per_unit"]
        self.refreshed_at = int(state["refreshed_at"])


def _cast(tensor, dtype):
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _cast_sized(batches, basis, grad, k):
    """The batches as they are, or, when the basis must be cast to the gradient's dtype, in chunks small enough
    that the cast copy stays bounded (CHUNK_NUMEL x K entries, or one parameter's segment)."""
    if basis.dtype == grad.dtype:
        return batches
    return [chunk for b in batches for chunk in b.chunks(CHUNK_NUMEL)]


def _matvec(basis, grad):
    """basis @ grad for a (K, m) basis and an (m,) gradient, in float32; chunked when the basis needs a cast."""
    if basis.dtype == grad.dtype:
        return torch.mv(basis, grad).float()
    out = torch.zeros(basis.shape[0], dtype=torch.float32, device=grad.device)
    for lo in range(0, grad.numel(), CHUNK_NUMEL):
        hi = lo + CHUNK_NUMEL
        out += torch.mv(basis[:, lo:hi].to(grad.dtype), grad[lo:hi]).float()
    return out


def _sub_matvec_t_(grad, basis, coeff):
    """grad -= basis^T coeff, in place."""
    coeff = coeff.to(grad.dtype)
    if basis.dtype == grad.dtype:
        grad.addmv_(basis.t(), coeff, alpha=-1)
        return
    for lo in range(0, grad.numel(), CHUNK_NUMEL):
        hi = lo + CHUNK_NUMEL
        grad[lo:hi].addmv_(basis[:, lo:hi].to(grad.dtype).t(), coeff, alpha=-1)


# ---------------------------------------------------------------------------------------------------------------
# Reference-gradient collection
# ---------------------------------------------------------------------------------------------------------------

def reference_chunks(num_rows, num_samples, num_directions):
    """Row indices of each direction's samples: the first `num_samples` rows split into contiguous chunks."""
    used = min(num_rows, num_samples)
    if num_directions > used:
        raise ValueError(f"--base_directions {num_directions} needs at least that many reference samples, "
                         f"but only {used} are available")
    bounds = [round(i * used / num_directions) for i in range(num_directions + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(num_directions)]


def rank_micro_batches(indices, rank, world_size, batch_size):
    """This rank's share of `indices` (every world_size-th), as micro-batches of at most `batch_size`.

    Every rank gets the same number of micro-batches so that collective backward passes stay in step; a rank
    with fewer samples gets padding micro-batches, marked by `None`, to run with zero loss weight.
    """
    share = indices[rank::world_size]
    per_rank = math.ceil(len(indices) / world_size)
    num_batches = max(1, math.ceil(per_rank / batch_size))
    batches = [share[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]
    return [batch if batch else None for batch in batches]


@torch.no_grad()
def read_gradient_(grad_slice, out):
    """Copy this rank's gradient slice into `out` (an (n,) tensor in local coordinates; padding stays zero)."""
    out.zero_()
    for start, view in grad_slice.pieces():
        out[start:start + view.numel()].copy_(view)


class ReferenceSet:
    """Reference samples plus how to batch them and which loss their gradient is taken of.

    loss_sum(model, batch) returns the loss summed over the batch's units (tokens or pairs); weight(example)
    is the number of units an example contributes, so every direction is the gradient of the mean over units.
    """

    def __init__(self, name, examples, collate, loss_sum, weight):
        self.name, self.examples, self.collate, self.loss_sum, self.weight = name, examples, collate, loss_sum, weight


class ReferenceGradients:
    """The reference sets and how their directions are taken: the first `num_samples` examples of each set, split
    into `num_directions` chunks, one direction per chunk (the gradient of the chunk's mean loss over its units),
    in micro-batches of `batch_size` per process. With `length(example)`, each chunk is taken longest first, so its
    micro-batches hold similar lengths (little padding) and the ranks similar totals; a direction is a sum over its
    chunk, so only the grouping of that sum changes."""

    def __init__(self, sets, num_samples, num_directions, batch_size, length=None):
        self.sets, self.num_samples, self.num_directions, self.batch_size = sets, num_samples, num_directions, \
            batch_size
        self.length = length

    def refresh(self, projector, backend, model, step, device):
        """Collect the directions with the training backend and rebuild the basis; leaves no trace. Returns seconds.

        `backend` runs the backward passes: `micro_batch(sync)`, `backward(loss)`, `grad_slice`, `zero_grad()`.
        Each rank runs the same number of micro-batches (padding ones with zero weight), so collective backward
        passes stay in step. The random state is restored afterwards, and the gradient is zeroed.
        """
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        plans = [(ref, chunk) for ref in self.sets
                 for chunk in reference_chunks(len(ref.examples), self.num_samples, self.num_directions)]
        directions = torch.empty(len(plans), backend.grad_slice.numel, dtype=torch.float32,
                                 device=backend.grad_slice.device)
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for k, (ref, chunk) in enumerate(plans):
                units = sum(ref.weight(ref.examples[i]) for i in chunk)
                if self.length is not None:
                    chunk = sorted(chunk, key=lambda i: -self.length(ref.examples[i]))
                batches = rank_micro_batches(chunk, rank, world, self.batch_size)
                for j, indices in enumerate(batches):
                    # A chunk with no unit (every response cut away: the scripts refuse that before training) gives
                    # a zero direction, which the basis drops, rather than a division by zero.
                    scale = world / units if indices and units else 0.0
                    batch = ref.collate([ref.examples[i] for i in (indices or chunk[:1])])
                    batch = {key: value.to(device) for key, value in batch.items()}
                    with backend.micro_batch(sync=j == len(batches) - 1):
                        backend.backward(ref.loss_sum(model, batch) * scale)
                read_gradient_(backend.grad_slice, directions[k])
                backend.zero_grad()
        projector.set_directions_(directions, step)
        return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# Projecting the optimizer's step (--base_project_update)
# ---------------------------------------------------------------------------------------------------------------

class UpdateProjector:
    """Project the optimizer's parameter step too: theta <- before + P(theta - before).

    AdamW rescales every coordinate, so the step it takes from a projected gradient keeps a component in the
    basis. `snapshot()` before the optimizer step keeps one copy of what the optimizer updates; the backend calls
    `project_()` once the optimizer has stepped (and, under ZeRO, before the float32 partitions are copied to the
    model's precision and gathered; see `Backend.project_steps`). Where the optimizer updates the parameters
    themselves (one process, DDP), the change is staged in the gradient buffer, free after the step, whose layout
    the parameters share. Under ZeRO it updates this rank's float32 master partitions, in local coordinates:
    each holds its change in place while it is projected, so the only extra memory is the partition-sized copy.
    """

    def __init__(self, projector, params):
        self.projector, self.params = projector, params
        self.masters = projector.grad_slice.masters()
        like = self.masters[0][1] if self.masters else projector.grad_slice.flat
        self.before = torch.empty(projector.grad_slice.numel, dtype=like.dtype, device=like.device)
        self.master_padding = self._master_padding()
        self.diagnostics, self.stats, self.pending = False, None, False

    def _master_padding(self):
        """(master index, start, end) of each master entry outside every segment. ZeRO leaves such padding
        uninitialised; its change must be zero before the projection, or a NaN there (0 x NaN in the global
        coefficient) would poison every entry."""
        segments = sorted(self.projector.grad_slice.segments, key=lambda s: s.start)
        gaps, covered = [], 0
        for segment in segments + [Segment(-1, self.projector.grad_slice.numel, 0)]:
            if segment.start > covered:
                gaps.append((covered, segment.start))
            covered = max(covered, segment.start + segment.length)
        padding = []
        for index, (start, master) in enumerate(self.masters):
            end = start + master.numel()
            padding += [(index, max(lo, start) - start, min(hi, end) - start) for lo, hi in gaps
                        if lo < end and hi > start]
        return padding

    @torch.no_grad()
    def snapshot(self, diagnostics=False):
        """Keep the values the optimizer is about to update; `stats` will be filled on diagnostic steps."""
        self.diagnostics, self.stats, self.pending = diagnostics, None, True
        if self.masters:
            for start, master in self.masters:
                self.before[start:start + master.numel()].copy_(master.view(-1))
        else:
            torch.cat([p.reshape(-1) for p in self.params], out=self.before)

    @torch.no_grad()
    def project_(self):
        if not self.pending:
            raise RuntimeError("UpdateProjector.project_() without snapshot() before the optimizer step")
        self.pending = False
        if self.masters:
            changes = [(start, master.view(-1).sub_(self.before[start:start + master.numel()]))
                       for start, master in self.masters]
            for index, lo, hi in self.master_padding:
                changes[index][1][lo:hi].zero_()
            self.stats = self.projector.project_(self.diagnostics, target=changes)
            for start, change in changes:
                change.add_(self.before[start:start + change.numel()])
            return
        change = self.projector.grad_slice.flat
        torch.cat([p.reshape(-1) for p in self.params], out=change).sub_(self.before)
        self.stats = self.projector.project_(self.diagnostics)
        self.before.add_(change)
        for param, segment in zip(self.params, self.projector.grad_slice.segments):
            param.copy_(self.before[segment.start:segment.start + segment.length].view_as(param))
