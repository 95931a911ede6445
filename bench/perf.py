r"""OGPSA performance benchmark: plain training and OGPSA side by side, in one run on one GPU.

On Qwen2-shaped models of about 0.5B and 1.5B parameters (random weights, float32 master weights, bf16 autocast)
with the reference SFT settings (micro-batch 4, gradient accumulation 4, seq 2048, AdamW, clip 1.0), it measures:

  steps       optimizer-step time and tokens/s of plain training and of OGPSA (default: per_param K=2, the
              reference setting; global K=2; global K=8 with a bf16 basis; per_param K=2 + update, which also
              projects AdamW's step as --base_project_update does), each OGPSA variant interleaved with plain
              steps in the same process; single process (Accelerate), DeepSpeed ZeRO-2 with one process (a
              torchrun worker of this script, one per model) and FSDP2 with one process (an `accelerate launch`
              worker with LLaMA-Factory's accelerate_configs/fsdp2_config.yaml);
  hook        the reference implementation's approach, written here as the baseline: a hook on every parameter
              that, on every micro-batch, copies two float32 reference gradients from CPU memory to the GPU,
              Gram-Schmidt-orthonormalises them and removes their span from the gradient;
  projection  `Projector.project_` alone against the memory-bandwidth floor (copy bandwidth measured in the same
              run), for global K=2, global K=8 and per_param K=2 with float32 and bfloat16 bases, and its error
              against the same projection computed in float64;
  memory      peak GPU memory of OGPSA steps against plain steps and the basis's K x P x bytes;
  refresh     `ogpsa_core.ReferenceGradients.refresh` for 200 reference samples against as many training micro-batches.

Everything runs through the project's own code: `train_utils.make_accelerator`, `build_optimizer`,
`backends.make_backend`, `response_nll_sum`, `ReferenceGradients.refresh`, and `ogpsa_core.Projector`. Every
figure, ratio and target goes into a JSON file and a markdown table is printed at the end.

GPU (one H100: about 6 minutes; writes bench/results/perf-<gpu name>.json):
    python bench/perf.py
    python bench/perf.py --models 0.5b --backends single --steps 3      # a quicker partial run
CPU check that every code path runs (tiny model, under a minute; figures are not meaningful, "timed": false):
    python bench/perf.py --cpu --output /tmp/perf-cpu.json
"""

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from operator import itemgetter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules live in the repository root

import ogpsa_core  # noqa: E402
import backends  # noqa: E402
import checkpoint  # noqa: E402
import arguments  # noqa: E402
import train_utils  # noqa: E402
from data_utils import IGNORE_INDEX, collate_sft, num_targets  # noqa: E402

GIB = 2 ** 30
MODELS = {  # Qwen2-0.5B and Qwen2-1.5B shapes; "tiny" is the CPU check's
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
# At 1.5B, float32 weights, gradients and AdamW states (25 GB), a K=8 bf16 basis (25 GB) and the activations of
# micro-batch 4 x seq 2048 (about 16 GB of layers plus 15 GB around the 151936-way logits) exceed 80 GB: recompute
# the layers' activations in backward, as --gradient_checkpointing does.
CHECKPOINTED = ("1.5b",)
PRESETS = {
    "gpu": dict(models="0.5b,1.5b", micro_batch=4, grad_accum=4, seq_len=2048, warmup=1, steps=5, hook_steps=2,
                refresh_samples=200, projection_reps=10, copy_mib=2048),
    "cpu": dict(models="tiny", micro_batch=2, grad_accum=2, seq_len=64, warmup=1, steps=2, hook_steps=1,
                refresh_samples=8, projection_reps=2, copy_mib=16),
}
# K=8 gets a bf16 basis: in float32 its bandwidth floor alone is 2.6% of a 0.5B step, and it is 49 GB at 1.5B.
DEFAULT_VARIANTS = "per_param:2:float32,global:2:float32,global:8:bfloat16,per_param:2:float32:update"
PROJECTION_CASES = [("global", 2), ("global", 8), ("per_param", 2)]
BASIS_DTYPES = ("float32", "bfloat16")
REFRESH_DIRECTIONS = 2  # the reference setting: K=2
LIMITS = {  # target: (limit, "max" or "min")
    "step_ratio": (1.02, "max"),  # OGPSA step (no refresh) / plain step
    "memory_ratio": (1.05, "max"),  # extra peak memory / (K x P/N x bytes of the basis)
    "projection_floor_ratio": (1.3, "max"),  # projection time / bandwidth floor
    "refresh_ratio": (1.1, "max"),  # refresh / as many training micro-batches
    "hook_overhead_ratio": (10.0, "min"),  # hook baseline's overhead / OGPSA's overhead
}
# The CPU check installs K > 4 bases the way a basis that would not fit in GPU memory is installed, so that both
# ways run (see `install_basis`).
CPU_MAX_SET_DIRECTIONS = 4
MARGIN_BYTES = 2 * GIB  # headroom kept free when deciding whether float32 directions fit
DEFINITIONS = {
    "step_s": "median time of one optimizer step: grad_accum micro-batches of forward + backward, projection (OGPSA), "
              "clip to norm 1.0, AdamW, zero; measured rounds after warm-up, OGPSA and plain steps alternating",
    "step_ratio": "OGPSA step_s / plain step_s of the same rounds; '+ update' variants (--base_project_update: "
                  "the optimizer's step is projected too) are measured against no target",
    "tokens_per_s": "micro_batch x grad_accum x seq_len tokens (prompt included) / step_s",
    "projection_s": "median time of project_(diagnostics=False) inside the step",
    "overhead_s": "step_s - plain_step_s",
    "memory_ratio": "(peak of an OGPSA step - peak of a plain step with no basis) / expected_extra_bytes, where "
                    "expected_extra_bytes = K x (gradient entries on this process) x bytes per basis element, plus "
                    "for '+ update' variants the snapshot of what the optimizer updates (gradient entries x 4 bytes "
                    "for float32 weights or master partitions)",
    "floor_bytes": "2 x basis bytes + 3 x float32 gradient bytes (basis and gradient read twice, gradient written "
                   "once); floor_s = floor_bytes / copy bandwidth (bytes read + written per second)",
    "relative_error": "||g' - g'_64|| / ||g'_64||, g'_64 = g - B^T (B g) in float64 over the same stored basis B, "
                      "per unit (global: all parameters, per_param: each tensor)",
    "hook_overhead_ratio": "(hook step - plain step) / max(OGPSA step - plain step, projection_s), OGPSA = the "
                           "per_param K=2 variant (else the first)",
    "refresh_ratio": "basis refresh time / time of as many forward + backward micro-batches of the training shape",
}
DECISIONS = [
    "K=8 variants default to a bfloat16 basis: a float32 one is 2.6% of a 0.5B step at its bandwidth floor alone "
    "and 49 GB at 1.5B",
    "1.5B runs with gradient checkpointing (see the model's decisions)",
    "a basis whose float32 directions do not fit in free GPU memory at once is stored directly as random unit rows "
    "(see basis_init)",
    "the hook baseline keeps 2 float32 copies of every gradient in pageable CPU memory (2 x P x 4 bytes)",
    "an out-of-memory error ends only its own measurement, which is recorded as skipped",
]


def log(message):
    print(f"[perf] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory: CUDA events and the caching allocator's peak on a GPU; perf_counter and nothing on the CPU
# ---------------------------------------------------------------------------------------------------------------

class Clock:
    """Marks on the device's timeline; `seconds(start, end)` waits for the end mark."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end):
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_device_bytes(device):
    free_memory(device)
    return torch.cuda.mem_get_info(device)[0]


def guarded(case, measure, cleanup=None):
    """measure(), or `case` marked as skipped when the GPU runs out of memory (recorded, not fatal)."""
    try:
        return measure()
    except torch.cuda.OutOfMemoryError as error:
        if cleanup is not None:
            cleanup()
        return {**case, "skipped": f"out of GPU memory: {str(error).splitlines()[0]}"}


def median(values):
    return statistics.median(values) if values else None


def ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


# ---------------------------------------------------------------------------------------------------------------
# Model, data and the training step
# ---------------------------------------------------------------------------------------------------------------

def build_model(name, device, gradient_checkpointing, seed):
    """Qwen2ForCausalLM from a config (random weights), float32 as train_utils.load_model loads it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**MODELS[name], use_cache=False, attn_implementation="sdpa")
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def training_args(settings, output_dir, deepspeed=None):
    """The training scripts' own flags (arguments.build_parser), set to the benchmark's shape."""
    argv = ["--output_dir", output_dir, "--model_name_or_path", "random", "--dataset", "random",
            "--per_device_train_batch_size", settings.micro_batch, "--gradient_accumulation_steps",
            settings.grad_accum, "--bf16", not settings.cpu, "--base_num_samples", settings.refresh_samples,
            "--base_directions", REFRESH_DIRECTIONS, "--base_batch_size", settings.micro_batch]
    if deepspeed:
        argv += ["--deepspeed", deepspeed]
    return arguments.build_parser(__doc__, "sft_pg", 1e-5).parse_args([str(a) for a in argv])


def token_rows(settings, vocab, count, generator):
    """`count` random sequences of seq_len tokens, as lists, and their labels: the first quarter is a prompt."""
    ids = torch.randint(vocab, (count, settings.seq_len), generator=generator).tolist()
    prompt = settings.seq_len // 4
    return [(row, [IGNORE_INDEX] * prompt + row[prompt:]) for row in ids]


def training_batches(settings, vocab, device, generator):
    """One optimizer step's micro-batches (on the device) and its number of target tokens."""
    batches, targets = [], 0
    for _ in range(settings.grad_accum):
        rows = token_rows(settings, vocab, settings.micro_batch, generator)
        examples = [{"input_ids": ids, "labels": labels} for ids, labels in rows]
        batches.append(train_utils.to_device(collate_sft(examples, pad_token_id=0), device))
        targets += sum(num_targets(labels) for _, labels in rows)
    return batches, targets


def train_step(backend, model, batches, targets, clock, projector=None, update_projector=None):
    """One optimizer step as train_sft_pg.py runs it; returns (step seconds, gradient projection seconds)."""
    start = clock.mark()
    for m, batch in enumerate(batches):
        with backend.micro_batch(sync=m == len(batches) - 1):
            backend.backward(train_utils.response_nll_sum(model, batch) / targets)
    before = clock.mark()
    if projector is not None:
        projector.project_(diagnostics=False)
    after = clock.mark()
    if update_projector is not None:  # the backend projects the step inside clip_and_step
        update_projector.snapshot()
    backend.clip_and_step(1.0)
    end = clock.mark()
    return clock.seconds(start, end), clock.seconds(before, after)


def interleaved(step_a, step_b, warmup, steps):
    """Results of step_a and step_b over `steps` rounds after `warmup`, alternating which of the two goes first."""
    results_a, results_b = [], []
    for i in range(warmup + steps):
        if i % 2 == 0:
            a, b = step_a(), step_b()
        else:
            b, a = step_b(), step_a()
        if i >= warmup:
            results_a.append(a)
            results_b.append(b)
    return results_a, results_b


# ---------------------------------------------------------------------------------------------------------------
# Bases
# ---------------------------------------------------------------------------------------------------------------

def unit_ranges(projector):
    """(start, length) of each unit of the local slice: all of it (global) or each parameter's run (per_param)."""
    if projector.scope == "global":
        return [(0, projector.grad_slice.numel)]
    return [(s.start, s.length) for s in projector.grad_slice.segments]


def install_basis(projector, k):
    """Give the projector a basis of K random directions; returns how it was made.

    The normal way is `set_directions_` on random float32 directions, as a refresh does. It needs K x n float32
    entries at once (plus the basis in its own dtype); where that does not fit in free GPU memory (1.5B, K=8: 49 GB),
    random rows of unit norm per unit are stored directly in the basis dtype through `load_state_dict`. They are
    orthogonal to within about 1/sqrt(unit size), and the cost of a projection does not depend on the values.
    """
    grad_slice, dtype = projector.grad_slice, projector.dtype
    n, device = grad_slice.numel, grad_slice.device
    needed = k * n * 4 + (k * n * dtype.itemsize if dtype != torch.float32 else 0)
    if device.type == "cuda":
        room = free_device_bytes(device) - MARGIN_BYTES
        fits = needed <= room
        why = f"set_directions_ would need {needed / GIB:.1f} GiB at once, {room / GIB:.1f} GiB are free"
    else:
        fits, why = k <= CPU_MAX_SET_DIRECTIONS, f"the CPU check takes this way for K > {CPU_MAX_SET_DIRECTIONS}"
    if fits:
        projector.set_directions_(torch.randn(k, n, device=device), step=0)
        return "set_directions_ (random float32 directions)"
    basis = torch.zeros(k, n, dtype=dtype, device=device)
    for start, length in unit_ranges(projector):
        basis[:, start:start + length].normal_(0.0, length ** -0.5)
    projector.load_state_dict({"basis": basis, "refreshed_at": torch.tensor(0),
                               "rank_per_unit": torch.full((projector.num_units,), k, device=device)})
    return f"random unit rows stored directly: {why}"


def expected_basis_bytes(k, numel, dtype_name):
    return k * numel * getattr(torch, dtype_name).itemsize


# ---------------------------------------------------------------------------------------------------------------
# Steps: plain, OGPSA variants and the hook baseline, each interleaved with plain steps
# ---------------------------------------------------------------------------------------------------------------

class HookBaseline:
    """The reference implementation's approach to projection, written here only as the baseline to beat.

    Every parameter tensor gets an autograd hook that runs on EVERY micro-batch's gradient of that tensor: it copies
    the tensor's two float32 reference gradients from (pageable) CPU memory to the GPU, Gram-Schmidt-orthonormalises
    them and removes their span from the gradient: g <- g - (g.u1) u1 - (g.u2) u2.
    """

    def __init__(self, params, device):
        self.params = params
        self.references = [tuple(torch.randn(p.shape, device=device).cpu() for _ in range(2)) for p in params]
        self.handles = []

    def attach(self):
        self.handles = [p.register_hook(partial(self._project, refs)) for p, refs in zip(self.params, self.references)]

    def detach(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @staticmethod
    def _project(references, grad):
        first, second = (r.to(grad.device) for r in references)
        first = first / first.norm()
        second = second - (second * first).sum() * first
        second = second / second.norm()
        for direction in (first, second):
            grad = grad - (grad * direction).sum() * direction
        return grad


def time_steps(backend, model, batches, targets, settings, clock, device, hook_baseline):
    """Plain steps, then each OGPSA variant (and the hook baseline) interleaved with plain steps."""
    plain = partial(train_step, backend, model, batches, targets, clock)
    for _ in range(settings.warmup):
        plain()
    reset_peak_memory(device)
    plain()
    plain_peak = peak_memory(device)
    section = {"gradient_entries": backend.grad_slice.numel, "plain_peak_memory_bytes": plain_peak, "variants": []}
    for variant in settings.variants:
        log(f"  {variant_name(variant)}")
        section["variants"].append(guarded(variant, partial(time_variant, backend, plain, variant, plain_peak,
                                                            settings, device), cleanup=backend.zero_grad))
        free_memory(device)
    if hook_baseline:
        log("  hook baseline")
        section["hook_baseline"] = guarded({}, partial(time_hook_baseline, backend, plain, section["variants"],
                                                       settings, device), cleanup=backend.zero_grad)
        free_memory(device)
    return section


def time_variant(backend, plain, variant, plain_peak, settings, device):
    projector = ogpsa_core.Projector(backend.grad_slice, scope=variant["scope"], method="orthogonal_projection",
                                     basis="qr", dtype=getattr(torch, variant["dtype"]))
    basis_init = install_basis(projector, variant["k"])
    update_projector = ogpsa_core.UpdateProjector(projector, backend.params) if variant["update"] else None
    peaks = []

    def ogpsa():
        reset_peak_memory(device)
        backend.project_steps(update_projector)
        try:
            result = plain(projector=projector, update_projector=update_projector)
        finally:
            backend.project_steps(None)
        peaks.append(peak_memory(device))
        return result

    plain_runs, ogpsa_runs = interleaved(plain, ogpsa, settings.warmup, settings.steps)
    step_s, plain_s = median([r[0] for r in ogpsa_runs]), median([r[0] for r in plain_runs])
    expected = expected_basis_bytes(variant["k"], backend.grad_slice.numel, variant["dtype"])
    if update_projector is not None:
        expected += update_projector.before.numel() * update_projector.before.element_size()
    extra = max(peaks) - plain_peak if plain_peak is not None else None
    return {**variant, "basis_init": basis_init, "step_s": step_s, "plain_step_s": plain_s,
            "step_ratio": ratio(step_s, plain_s), "tokens_per_s": settings.tokens_per_step / step_s,
            "plain_tokens_per_s": settings.tokens_per_step / plain_s,
            "projection_s": median([r[1] for r in ogpsa_runs]), "overhead_s": step_s - plain_s,
            "peak_memory_bytes": max(peaks) if plain_peak is not None else None, "extra_memory_bytes": extra,
            "expected_extra_bytes": expected, "memory_ratio": ratio(extra, expected)}


def time_hook_baseline(backend, plain, variants, settings, device):
    hooks = HookBaseline(backend.params, device)
    peaks = []

    def hooked():
        hooks.attach()
        try:
            reset_peak_memory(device)
            result = plain()
            peaks.append(peak_memory(device))
        finally:
            hooks.detach()
        return result

    plain_runs, hook_runs = interleaved(plain, hooked, settings.warmup, settings.hook_steps)
    step_s, plain_s = median([r[0] for r in hook_runs]), median([r[0] for r in plain_runs])
    measured = [v for v in variants if "skipped" not in v]
    reference = next((v for v in measured if v["scope"] == "per_param" and v["k"] == 2 and not v["update"]),
                     measured[0] if measured
                     else None)
    ogpsa_overhead = max(reference["overhead_s"], reference["projection_s"]) if reference else None
    return {"reference_gradients": "2 per tensor, float32, pageable CPU memory, copied on every micro-batch",
            "step_s": step_s, "plain_step_s": plain_s, "step_ratio": ratio(step_s, plain_s),
            "tokens_per_s": settings.tokens_per_step / step_s, "overhead_s": step_s - plain_s,
            "peak_memory_bytes": max(peaks) if peaks[0] is not None else None,
            "compared_with": {k: reference[k] for k in ("scope", "k", "dtype")} if reference else None,
            "ogpsa_overhead_s": ogpsa_overhead, "hook_overhead_ratio": ratio(step_s - plain_s, ogpsa_overhead)}


# ---------------------------------------------------------------------------------------------------------------
# Projection alone against the memory-bandwidth floor
# ---------------------------------------------------------------------------------------------------------------

def copy_bandwidth(settings, device, clock):
    """Bytes read plus bytes written per second by a large device-to-device copy."""
    source = torch.randn(settings.copy_mib * 2 ** 20 // 4, device=device)
    target = torch.empty_like(source)
    times = []
    for i in range(3 + settings.projection_reps):
        start = clock.mark()
        target.copy_(source)
        end = clock.mark()
        if i >= 3:
            times.append(clock.seconds(start, end))
    moved = 2 * source.numel() * source.element_size()
    return {"bytes_per_copy": moved, "seconds": median(times), "bytes_per_s": moved / median(times)}


@torch.no_grad()
def float64_error(before, after, basis, units):
    """||after - (g - B^T B g)|| / ||g - B^T B g|| with g = before, per unit, in float64, chunk by chunk."""
    error = torch.zeros((), dtype=torch.float64, device=before.device)
    norm = torch.zeros_like(error)
    for start, length in units:
        chunks = [(lo, min(lo + ogpsa_core.CHUNK_NUMEL, start + length))
                  for lo in range(start, start + length, ogpsa_core.CHUNK_NUMEL)]
        coeff = sum(basis[:, lo:hi].double() @ before[lo:hi].double() for lo, hi in chunks)
        for lo, hi in chunks:
            expected = before[lo:hi].double() - basis[:, lo:hi].double().T @ coeff
            error += (after[lo:hi].double() - expected).square().sum()
            norm += expected.square().sum()
    return (error / norm).sqrt().item()


def projection_vs_floor(grad_slice, bandwidth, settings, clock, device):
    """Time `project_` on a random gradient in the model's flat buffer, for every scope, K and basis dtype."""
    flat = grad_slice.flat
    flat.normal_()
    original = flat.clone()
    cases = []
    for scope, k in PROJECTION_CASES:
        for dtype in BASIS_DTYPES:
            case = {"scope": scope, "k": k, "dtype": dtype}
            log(f"  projection {variant_name(case)}")
            cases.append(guarded(case, partial(time_projection, grad_slice, original, case, bandwidth, settings,
                                               clock)))
            free_memory(device)
    grad_slice.zero_()
    return cases


def time_projection(grad_slice, original, case, bandwidth, settings, clock):
    projector = ogpsa_core.Projector(grad_slice, scope=case["scope"], method="orthogonal_projection", basis="qr",
                                     dtype=getattr(torch, case["dtype"]))
    basis_init = install_basis(projector, case["k"])
    flat = grad_slice.flat
    flat.copy_(original)
    projector.project_(diagnostics=False)
    error = float64_error(original, flat, projector.basis, unit_ranges(projector))
    times = []
    for i in range(2 + settings.projection_reps):
        flat.copy_(original)
        start = clock.mark()
        projector.project_(diagnostics=False)
        end = clock.mark()
        if i >= 2:
            times.append(clock.seconds(start, end))
    floor_bytes = 2 * projector.basis.numel() * projector.basis.element_size() + 3 * flat.numel() * 4
    floor_s = floor_bytes / bandwidth["bytes_per_s"]
    return {**case, "basis_init": basis_init, "seconds": median(times),
            "floor_bytes": floor_bytes, "floor_s": floor_s, "projection_floor_ratio": median(times) / floor_s,
            "relative_error": error}


# ---------------------------------------------------------------------------------------------------------------
# Refresh against training micro-batches
# ---------------------------------------------------------------------------------------------------------------

def refresh_vs_training(backend, model, vocab, batches, targets, train_args, settings, clock, device, generator):
    """`ReferenceGradients.refresh` over refresh_samples reference samples vs as many micro-batches of forward and
    backward."""
    examples = [{"input_ids": ids, "labels": labels, "num_targets": num_targets(labels)}
                for ids, labels in token_rows(settings, vocab, settings.refresh_samples, generator)]
    reference = ogpsa_core.ReferenceSet("random", examples, partial(collate_sft, pad_token_id=0),
                                        train_utils.response_nll_sum, itemgetter("num_targets"))
    micro_batches = sum(len(ogpsa_core.rank_micro_batches(chunk, 0, 1, train_args.base_batch_size))
                        for chunk in ogpsa_core.reference_chunks(len(examples), train_args.base_num_samples,
                                                                 train_args.base_directions))
    start = clock.mark()
    for m in range(micro_batches):
        with backend.micro_batch(sync=True):
            backend.backward(train_utils.response_nll_sum(model, batches[m % len(batches)]) / targets)
    backend.zero_grad()
    train_s = clock.seconds(start, clock.mark())
    projector = ogpsa_core.Projector(backend.grad_slice, scope="per_param", method="orthogonal_projection",
                                     basis="qr", dtype=torch.float32)
    start = clock.mark()
    references = ogpsa_core.ReferenceGradients([reference], train_args.base_num_samples, train_args.base_directions,
                                               train_args.base_batch_size)
    reported = references.refresh(projector, backend, model, 0, device)
    refresh_s = clock.seconds(start, clock.mark())
    return {"samples": len(examples), "directions": train_args.base_directions, "scope": "per_param",
            "micro_batches": micro_batches, "refresh_s": refresh_s, "refresh_reported_s": reported,
            "training_micro_batches_s": train_s, "refresh_ratio": refresh_s / train_s}


# ---------------------------------------------------------------------------------------------------------------
# One model: single process (this process); ZeRO-2 and FSDP2 with one process (workers)
# ---------------------------------------------------------------------------------------------------------------

def model_header(name, model):
    decisions = []
    if name in CHECKPOINTED:
        decisions.append("gradient checkpointing on: activations of micro-batch 4 x seq 2048 do not fit in 80 GB "
                         "beside weights, gradients, AdamW states and a K=8 basis")
    return {"num_params": sum(p.numel() for p in model.parameters()), "config": MODELS[name],
            "attention": model.config._attn_implementation, "gradient_checkpointing": name in CHECKPOINTED,
            "decisions": decisions}


def prepared(name, accelerator, train_args, settings):
    model = build_model(name, accelerator.device, name in CHECKPOINTED, settings.seed)
    optimizer = train_utils.build_optimizer(model, train_args)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, backends.make_backend(accelerator, model, optimizer)


def single_process(name, accelerator, train_args, bandwidth, settings, clock):
    """This process: projection vs floor (before AdamW allocates its states), steps, hook baseline, refresh."""
    device = accelerator.device
    generator = torch.Generator().manual_seed(settings.seed)
    model, backend = prepared(name, accelerator, train_args, settings)
    section = model_header(name, accelerator.unwrap_model(model))
    vocab = MODELS[name]["vocab_size"]
    batches, targets = training_batches(settings, vocab, device, generator)
    log(f"{name}: projection alone vs the bandwidth floor")
    section["projection"] = projection_vs_floor(backend.grad_slice, bandwidth, settings, clock, device)
    log(f"{name}: optimizer steps, single process")
    section["single"] = time_steps(backend, model, batches, targets, settings, clock, device, hook_baseline=True)
    log(f"{name}: refresh vs training micro-batches")
    section["refresh"] = refresh_vs_training(backend, model, vocab, batches, targets, train_args, settings, clock,
                                             device, generator)
    accelerator.free_memory(model, backend.optimizer)
    del model, backend, batches
    free_memory(device)
    return section


WORKER_NAMES = {"zero2": "DeepSpeed ZeRO-2", "fsdp2": "FSDP2"}


def engine_worker(settings):
    """Run as a one-process worker (ZeRO-2 under torchrun, FSDP2 under `accelerate launch` with the stock FSDP2
    config): steps through make_accelerator / make_backend, for one model."""
    (name,) = settings.models
    with tempfile.TemporaryDirectory() as output_dir:
        deepspeed = ROOT / "accelerate_configs" / "ds_z2_config.json" if settings.worker == "zero2" else None
        train_args = training_args(settings, output_dir, deepspeed)
        accelerator = train_utils.make_accelerator(train_args)
        device = accelerator.device
        model, backend = prepared(name, accelerator, train_args, settings)
        batches, targets = training_batches(settings, MODELS[name]["vocab_size"], device,
                                            torch.Generator().manual_seed(settings.seed))
        log(f"{name}: optimizer steps, {WORKER_NAMES[settings.worker]} with one process")
        section = time_steps(backend, model, batches, targets, settings, Clock(device), device, hook_baseline=False)
    checkpoint.write_json(settings.worker_output, section)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_engine_worker(engine, name, settings):
    """This script as a one-process `--worker ENGINE` (ZeRO-2: torchrun; FSDP2: accelerate launch with the stock
    FSDP2 config, in the precision the benchmark runs); returns its section (or the error)."""
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder, f"{engine}.json")
        with socket.socket() as probe:  # a free port for the worker's process group
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
                    str(port)] if engine == "zero2" else \
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
             str(ROOT / "accelerate_configs" / "fsdp2_config.yaml"), "--num_processes", "1", "--main_process_port",
             str(port), "--mixed_precision", "no" if settings.cpu else "bf16"]
        command = launcher + [str(Path(__file__).resolve()), "--worker", engine, "--worker_output", str(output),
                              *forwarded_flags(settings, name)]
        returncode = subprocess.run(command, cwd=ROOT).returncode
        if returncode != 0:
            return {"error": f"{WORKER_NAMES[engine]} worker exited with code {returncode} (its output is above)"}
        return json.loads(output.read_text())


def forwarded_flags(settings, name):
    """The resolved settings as flags, so that the worker measures exactly what this process would."""
    flags = ["--models", name, "--variants", ",".join(variant_name(v, ":") for v in settings.variants),
             "--seed", str(settings.seed)]
    for key in PRESETS["gpu"]:
        if key != "models":
            flags += [f"--{key}", str(getattr(settings, key))]
    return flags + (["--cpu"] if settings.cpu else [])


# ---------------------------------------------------------------------------------------------------------------
# Report: environment, targets, JSON and a markdown table
# ---------------------------------------------------------------------------------------------------------------

def variant_name(case, separator=" "):
    return separator.join([case["scope"], f"{'K=' if separator == ' ' else ''}{case['k']}", case["dtype"]]
                          + ([("+ " if separator == " " else "") + "update"] if case.get("update") else []))


def environment(device):
    versions = {name: importlib.metadata.version(name) for name in ("transformers", "accelerate", "deepspeed")}
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
            "torch": torch.__version__, "cuda": torch.version.cuda, **versions, "python": platform.python_version(),
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def evaluate_targets(models, timed):
    """One row per target and case; `met` is None where nothing was timed (CPU check) or measured (skipped)."""
    rows = []

    def add(target, model, backend, case, value):
        limit, kind = LIMITS[target]
        met = None if not timed or value is None else (value <= limit if kind == "max" else value >= limit)
        rows.append({"target": target, "model": model, "backend": backend, "case": case, "value": value,
                     "limit": limit, "kind": kind, "met": met})

    for model, section in models.items():
        for backend in ("single", *WORKER_NAMES):
            for variant in section.get(backend, {}).get("variants", []):
                if not variant["update"]:  # the step projection's cost is measured, with no target
                    add("step_ratio", model, backend, variant_name(variant), variant.get("step_ratio"))
                add("memory_ratio", model, backend, variant_name(variant), variant.get("memory_ratio"))
        for case in section.get("projection", []):
            add("projection_floor_ratio", model, "single", variant_name(case), case.get("projection_floor_ratio"))
        if "refresh" in section:
            add("refresh_ratio", model, "single", "per_param K=2 float32", section["refresh"]["refresh_ratio"])
        hook = section.get("single", {}).get("hook_baseline")
        if hook:
            add("hook_overhead_ratio", model, "single", "hook baseline", hook.get("hook_overhead_ratio"))
    return rows


def number(value, scale=1.0, digits=1):
    return "-" if value is None else f"{value * scale:,.{digits}f}"


def markdown(results):
    """The summary tables (the README's table is made from them)."""
    timed = results["timed"]
    lines = [f"OGPSA benchmark on {results['environment']['device']}"
             + ("" if timed else " -- CPU check, figures NOT timed"), "",
             "| model | backend | variant | step ms | plain ms | ratio | tokens/s | projection ms | extra GiB "
             "| expected GiB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, section in results["models"].items():
        for backend in ("single", *WORKER_NAMES):
            part = section.get(backend, {})
            if "error" in part:
                lines.append(f"| {model} | {backend} | {part['error']} |")
            for v in part.get("variants", []):
                if "skipped" in v:
                    lines.append(f"| {model} | {backend} | {variant_name(v)} | {v['skipped']} |")
                    continue
                lines.append(f"| {model} | {backend} | {variant_name(v)} | {number(v['step_s'], 1e3)} "
                             f"| {number(v['plain_step_s'], 1e3)} | {number(v['step_ratio'], digits=3)} "
                             f"| {number(v['tokens_per_s'], digits=0)} | {number(v['projection_s'], 1e3, 2)} "
                             f"| {number(v['extra_memory_bytes'], 1 / GIB, 2)} "
                             f"| {number(v['expected_extra_bytes'], 1 / GIB, 2)} |")
            hook = part.get("hook_baseline")
            if hook and "skipped" in hook:
                lines.append(f"| {model} | {backend} | hook baseline | {hook['skipped']} |")
            elif hook:
                lines.append(f"| {model} | {backend} | hook baseline | {number(hook['step_s'], 1e3)} "
                             f"| {number(hook['plain_step_s'], 1e3)} | {number(hook['step_ratio'], digits=3)} "
                             f"| {number(hook['tokens_per_s'], digits=0)} | overhead "
                             f"{number(hook['hook_overhead_ratio'], digits=1)}x OGPSA's | | |")
    lines += ["", f"Copy bandwidth: {number(results['copy_bandwidth']['bytes_per_s'], 1e-9, 0)} GB/s", "",
              "| model | projection | ms | floor ms | ratio | rel. error vs float64 |", "|---|---|---:|---:|---:|---:|"]
    for model, section in results["models"].items():
        for case in section.get("projection", []):
            if "skipped" in case:
                lines.append(f"| {model} | {variant_name(case)} | {case['skipped']} |")
                continue
            lines.append(f"| {model} | {variant_name(case)} | {number(case['seconds'], 1e3, 2)} "
                         f"| {number(case['floor_s'], 1e3, 2)} | {number(case['projection_floor_ratio'], digits=2)} "
                         f"| {case['relative_error']:.1e} |")
    lines += ["", "| model | refresh s | micro-batches | training micro-batches s | ratio |",
              "|---|---:|---:|---:|---:|"]
    for model, section in results["models"].items():
        refresh = section.get("refresh")
        if refresh:
            lines.append(f"| {model} | {number(refresh['refresh_s'], digits=2)} | {refresh['micro_batches']} "
                         f"| {number(refresh['training_micro_batches_s'], digits=2)} "
                         f"| {number(refresh['refresh_ratio'], digits=3)} |")
    summary = results["summary"]
    lines += ["", f"Targets met: {summary['met']} of {summary['evaluated']}" if timed
              else "Targets: not evaluated (CPU check)"]
    lines += [f"  missed: {row['target']} {row['model']} {row['backend']} {row['case']}: "
              f"{number(row['value'], digits=3)} ({row['kind']} {row['limit']})"
              for row in results["targets"] if row["met"] is False]
    return "\n".join(lines)


def default_output(device_name):
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return ROOT / "bench" / "results" / f"perf-{slug}.json"


# ---------------------------------------------------------------------------------------------------------------
# Flags and main
# ---------------------------------------------------------------------------------------------------------------

def parse_variants(text):
    """'per_param:2:float32,global:8:bfloat16:update' -> [{"scope": "per_param", "k": 2, "dtype": "float32",
    "update": False}, ...]; a trailing ":update" also projects the optimizer's step (--base_project_update)."""
    variants = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) not in (3, 4) or parts[0] not in ogpsa_core.SCOPES or not parts[1].isdigit() \
                or int(parts[1]) < 1 or parts[2] not in BASIS_DTYPES or parts[3:] not in ([], ["update"]):
            raise argparse.ArgumentTypeError(f"{item!r}: expected SCOPE:K:DTYPE[:update] with SCOPE in "
                                             f"{ogpsa_core.SCOPES}, K >= 1, DTYPE in {BASIS_DTYPES}")
        variants.append({"scope": parts[0], "k": int(parts[1]), "dtype": parts[2], "update": parts[3:] == ["update"]})
    return variants


def parse_settings(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU check: tiny model, a couple of steps, seq 64; runs every code path but times "
                             "nothing meaningful (the JSON says \"timed\": false)")
    parser.add_argument("--output", help="JSON file (default: bench/results/perf-<gpu name>.json; required with --cpu)")
    parser.add_argument("--models", help=f"comma-separated model shapes out of {', '.join(MODELS)} "
                                          f"(default {PRESETS['gpu']['models']}; --cpu: tiny)")
    parser.add_argument("--backends", default="single,zero2,fsdp2",
                        help="single (this process, Accelerate), zero2 (DeepSpeed ZeRO-2, one torchrun process) "
                             "and/or fsdp2 (FSDP2, one process launched with accelerate_configs/fsdp2_config.yaml)")
    parser.add_argument("--variants", type=parse_variants, default=DEFAULT_VARIANTS,
                        help=f"OGPSA variants timed against plain steps: SCOPE:K:DTYPE,... (default "
                             f"{DEFAULT_VARIANTS})")
    sizes = {"micro_batch": "samples per micro-batch", "grad_accum": "micro-batches per optimizer step",
             "seq_len": "tokens per sample", "warmup": "untimed rounds before each measurement",
             "steps": "measured rounds (one OGPSA and one plain step each) per variant",
             "hook_steps": "measured rounds of the (slow) hook baseline",
             "refresh_samples": "reference samples of the timed refresh (--base_num_samples)",
             "projection_reps": "timed repetitions of each projection and of the copy",
             "copy_mib": "MiB copied to measure the bandwidth"}
    for key, text in sizes.items():
        parser.add_argument(f"--{key}", type=int,
                            help=f"{text} (default {PRESETS['gpu'][key]}; --cpu: {PRESETS['cpu'][key]})")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, tokens and directions")
    parser.add_argument("--worker", choices=list(WORKER_NAMES),
                        help="internal: run as the ZeRO-2 or FSDP2 worker (launched by perf.py)")
    parser.add_argument("--worker_output", help="internal: where the worker writes its JSON section")
    settings = parser.parse_args(argv)
    for key, value in PRESETS["cpu" if settings.cpu else "gpu"].items():
        if getattr(settings, key) is None:
            setattr(settings, key, value)
    settings.models = settings.models.split(",")
    settings.backends = settings.backends.split(",")
    if not set(settings.models) <= set(MODELS) or not set(settings.backends) <= {"single", *WORKER_NAMES}:
        parser.error(f"--models takes {', '.join(MODELS)}; --backends takes single, {', '.join(WORKER_NAMES)}")
    if settings.cpu and not settings.output and not settings.worker:
        parser.error("--cpu needs --output: its figures are not results for bench/results")
    if settings.worker and not settings.worker_output:
        parser.error("--worker needs --worker_output")
    settings.tokens_per_step = settings.micro_batch * settings.grad_accum * settings.seq_len
    return settings


def main():
    settings = parse_settings()
    if settings.cpu:
        # The check runs on the CPU even on a GPU machine, single-threaded: the tiny model gains nothing from
        # threads, whose wake-ups dominate on small machines. The environment carries both to the workers.
        os.environ.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --cpu for the (untimed) check that the benchmark runs")
    if settings.worker:
        engine_worker(settings)
        return
    started = time.perf_counter()
    # The workers first, while this process holds no GPU memory.
    workers = {(engine, name): run_engine_worker(engine, name, settings) for engine in WORKER_NAMES
               if engine in settings.backends for name in settings.models}
    device = torch.device("cpu" if settings.cpu else "cuda")
    clock = Clock(device)
    results = {"benchmark": "OGPSA vs plain training: steps, projection, memory, refresh", "timed": not settings.cpu,
               "note": "CPU check: every code path ran; the figures are not meaningful" if settings.cpu else
               "one run on one GPU; every ratio compares figures measured in this run",
               "environment": environment(device),
               "settings": {k: v for k, v in vars(settings).items() if k not in ("worker", "worker_output", "output")},
               "decisions": DECISIONS, "definitions": DEFINITIONS, "limits": LIMITS}
    with tempfile.TemporaryDirectory() as output_dir:
        train_args = training_args(settings, output_dir)
        accelerator = train_utils.make_accelerator(train_args)
        results["copy_bandwidth"] = copy_bandwidth(settings, accelerator.device, clock)
        results["models"] = {}
        for name in settings.models:
            section = single_process(name, accelerator, train_args, results["copy_bandwidth"], settings, clock) \
                if "single" in settings.backends else {}
            section.update({engine: part for (engine, model), part in workers.items() if model == name})
            results["models"][name] = section
    results["targets"] = evaluate_targets(results["models"], results["timed"])
    verdicts = [row["met"] for row in results["targets"] if row["met"] is not None]
    results["summary"] = {"evaluated": len(verdicts), "met": sum(verdicts),
                          "all_met": all(verdicts) if results["timed"] and verdicts else None,
                          "wall_s": round(time.perf_counter() - started, 1)}
    output = Path(settings.output) if settings.output else default_output(results["environment"]["device"])
    output.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(output, results)
    print(markdown(results), flush=True)
    log(f"results: {output} ({results['summary']['wall_s']} s)")


if __name__ == "__main__":
    main()
