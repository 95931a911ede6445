"""Shared test helpers: a synthetic gradient slice and an independent float64 reference of the projection."""

import torch

import ogpsa_core


class FlatSlice(ogpsa_core.GradSlice):
    """A gradient slice over a given flat tensor, split into `num_pieces` pieces (as ZeRO param groups are)."""

    def __init__(self, flat, lengths, num_pieces=1, first_param=0, num_params=None, sharded=False, offset=0):
        """lengths: parameter lengths inside this slice, in order; first_param: index of the first one."""
        self.flat, self.sharded, self.numel, self.device = flat, sharded, flat.numel(), flat.device
        self.num_params = num_params if num_params is not None else first_param + len(lengths)
        self.segments, start = [], 0
        for i, length in enumerate(lengths):
            self.segments.append(ogpsa_core.Segment(first_param + i, start, length))
            start += length
        cuts = sorted({0, flat.numel()} | {s.start for s in self.segments[::max(1, len(lengths) // num_pieces)]})
        self.bounds = list(zip(cuts, cuts[1:]))

    def pieces(self):
        return [(a, self.flat[a:b]) for a, b in self.bounds]


def reference_projection(grad, directions, lengths, scope, method="orthogonal_projection", scale=1.0,
                         rtol=ogpsa_core.NUMERICAL_RTOL):
    """g' by dense float64 linear algebra: per unit, Householder QR (threshold) or SVD (projection) of D^T."""
    grad, directions = grad.double(), directions.double()
    out = grad.clone()
    bounds = [(0, grad.numel())] if scope == "global" else []
    if scope == "per_param":
        start = 0
        for length in lengths:
            bounds.append((start, length))
            start += length
    for start, length in bounds:
        g, d = grad[start:start + length], directions[:, start:start + length]
        norms = d.norm(dim=1, keepdim=True)
        d = torch.where(norms > 0, d / norms.clamp_min(1e-300), torch.zeros_like(d))
        if method == "orthogonal_projection":
            u, s, _ = torch.linalg.svd(d.T, full_matrices=False)
            keep = s > rtol * s.max() if s.numel() and s.max() > 0 else torch.zeros_like(s, dtype=torch.bool)
            q = u[:, keep]
            out[start:start + length] = g - q @ (q.T @ g)
        else:  # threshold: Gram-Schmidt order and orientation, from Householder QR with positive diagonal
            q, r = torch.linalg.qr(d.T)
            sign = torch.sign(torch.diagonal(r))
            q = q * torch.where(sign == 0, 1.0, sign)
            keep = torch.diagonal(r).abs() > rtol
            q = q[:, keep]
            c = q.T @ g
            conflicts = c < 0
            if conflicts.any():
                out[start:start + length] = g - q[:, conflicts] @ c[conflicts]
            elif keep.any():
                out[start:start + length] = g * scale
    return out


def float32_rtol(n, amplification=1.0):
    """Relative-error bound for a float32 result built from sums of n terms.

    Each sum carries rounding error of about sqrt(n) x eps (terms of random sign; n x eps in the worst case, which
    blocked summation does not reach at these sizes); a result that cancels (its norm far below its inputs')
    magnifies that by ||inputs|| / ||result||, passed as `amplification`. A factor 8 leaves room for the few
    sums chained in a projection. A wrong formula misses by O(1).
    """
    return float(8 * torch.finfo(torch.float32).eps * n ** 0.5 * amplification)


# Two float32 training runs of the same function whose sums are grouped differently (another process count or
# batching, precomputed reference log-probs, a resume) differ by float32 rounding in every step's gradient, ~1e-7
# relative, which a few AdamW steps carry into the weights at ~1e-7 (measured 1e-8 to 7e-7 over this suite's runs;
# up to 2.1e-6 with --base_project_update in the global scope with 3 processes, where AdamW's first steps,
# g / (|g| + eps), magnify the rounding of near-zero gradient entries). 1e-5 leaves 5x room or more; a wrong gradient
# or projection moves the weights by 1e-3 or more (the round_robin_gradients bug: 9e-3; skipping the update
# projection: 1.5e-3).
WEIGHTS_RTOL = 1e-5


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def run_script(script, args, nproc=1, expect_ok=True, timeout=600, launcher=None, config_file=None, launch_args=()):
    """Run a script with python (nproc 1), torchrun (nproc > 1, or launcher="torchrun"), or `accelerate launch`
    (launcher="accelerate", with an optional --config_file and `launch_args` for accelerate launch itself); returns
    the completed process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    port = str(29500 + os.getpid() % 1000)
    if launcher == "accelerate":
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc),
                    "--main_process_port", port] + (["--config_file", str(config_file)] if config_file else []) \
            + list(launch_args)
    elif nproc == 1 and launcher != "torchrun":
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                    port]
    command = launcher + [str(root / script)] + [str(a) for a in args]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def load_weights(folder):
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def weights_relative_difference(a, b):
    assert sorted(a) == sorted(b), f"the saved models hold different tensors: {sorted(set(a) ^ set(b))}"
    num = sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a)
    den = sum((a[k].double() ** 2).sum() for k in a)
    return (num / den).sqrt().item()


def read_log(folder):
    import json
    from pathlib import Path

    return [json.loads(line) for line in (Path(folder) / "trainer_log.jsonl").read_text().splitlines()]
