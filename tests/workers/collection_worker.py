"""Collect reference directions through the real training backend, and record what training sees around it.

    python tests/workers/collection_worker.py OUT_DIR MODEL [extra training flags]
    torchrun --nproc_per_node 2 tests/workers/collection_worker.py OUT_DIR MODEL [extra training flags]

Writes OUT_DIR/rank{r}.safetensors with this rank's directions (before orthonormalisation), the gradient of one
training batch computed before and after the collection, the global position of each local gradient entry,
and flags for the invariants (gradient zero afterwards, RNG and model mode unchanged).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from arguments import build_parser, check_args
from data_utils import collate_sft, load_tokenized
from backends import make_backend
from ogpsa_core import ReferenceGradients, ReferenceSet, read_gradient_
from train_utils import build_optimizer, load_model, load_tokenizer, make_accelerator, response_nll_sum, to_device


class CapturingProjector:
    def set_directions_(self, directions, step):
        self.directions = directions.clone()


def global_positions(grad_slice, params):
    offsets = torch.tensor([0] + [getattr(p, "ds_numel", p.numel()) for p in params]).cumsum(0)  # ZeRO-3: numel 0
    positions = torch.full((grad_slice.numel,), -1, dtype=torch.int64)  # -1: padding
    for seg in grad_slice.segments:
        first = offsets[seg.param_index] + seg.param_start
        positions[seg.start:seg.start + seg.length] = torch.arange(first, first + seg.length)
    return positions


def main():
    out, model_path, extra = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    args = check_args(build_parser("", "sft_pg", 1e-3).parse_args([
        "--model_name_or_path", model_path, "--dataset", "demo_safety_sft", "--output_dir", str(out),
        "--base_dataset", "demo_general_a_sft,demo_general_b_sft", "--base_num_samples", "10",
        "--base_directions", "2", "--base_batch_size", "3", "--template", "qwen", "--overwrite_output_dir", "True",
        *extra]), "sft_pg")
    accelerator = make_accelerator(args)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    tokenizer = load_tokenizer(model_path, args)
    pad = tokenizer.pad_token_id
    sets = [ReferenceSet(n, load_tokenized(n, args, tokenizer, False, log=lambda *_: None),
                         lambda b: collate_sft(b, pad), response_nll_sum, lambda e: e["num_targets"])
            for n in args.base_dataset.split(",")]
    train = load_tokenized("demo_safety_sft", args, tokenizer, False, log=lambda *_: None)[:4]
    model = load_model(model_path, args)
    optimizer = build_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    backend = make_backend(accelerator, model, optimizer)
    model.train()

    def training_gradient():
        share = train[rank * 4 // world:(rank + 1) * 4 // world]
        with backend.micro_batch(sync=True):
            loss = response_nll_sum(model, to_device(collate_sft(share, pad), device))
            backend.backward(loss * world / sum(e["num_targets"] for e in train))
        grad = torch.empty(backend.grad_slice.numel)
        read_gradient_(backend.grad_slice, grad)
        backend.zero_grad()
        return grad

    before = training_gradient()
    rng = torch.get_rng_state()
    projector = CapturingProjector()
    ReferenceGradients(sets, args.base_num_samples, args.base_directions, args.base_batch_size).refresh(
        projector, backend, model, 0, device)
    leftover = torch.zeros(backend.grad_slice.numel)
    try:
        read_gradient_(backend.grad_slice, leftover)
    except RuntimeError as err:  # ZeRO-1/2 after the reset: no gradient is held at all
        assert "holds no reduced gradient" in str(err)
    after = training_gradient()
    save_file({"directions": projector.directions.cpu(), "grad_before": before, "grad_after": after,
               "positions": global_positions(backend.grad_slice, backend.params),
               "leftover_abs_max": leftover.abs().max().reshape(1),
               "rng_unchanged": torch.tensor([torch.equal(rng, torch.get_rng_state())]),
               "still_training": torch.tensor([model.training])}, str(out / f"rank{rank}.safetensors"))
    accelerator.wait_for_everyone()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
