"""Reference-gradient collection through the real backend: exact across process counts, and leaves no trace."""

import pytest
import torch
from safetensors.torch import load_file

from helpers import float32_rtol, relative_error, run_script
from test_backends import LAUNCH


def gathered(folder, nproc, key):
    """Reassemble per-rank slices of `key` into full flattened-parameter vectors."""
    parts = [load_file(str(folder / f"rank{r}.safetensors")) for r in range(nproc)]
    size = int(max(p["positions"].max() for p in parts)) + 1
    full = torch.zeros(*parts[0][key].shape[:-1], size, dtype=torch.float64)
    for part in parts:
        owned = part["positions"] >= 0
        full[..., part["positions"][owned]] = part[key][..., owned].double()
    return full, parts


@pytest.fixture(scope="module")
def single(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("collect1")
    run_script("tests/workers/collection_worker.py", [out, tiny_model])
    return out


def check_invariants(parts):
    for part in parts:
        assert part["leftover_abs_max"].item() == 0  # nothing left for the next optimizer step
        assert torch.equal(part["grad_before"], part["grad_after"])  # a training step sees no trace
        assert part["rng_unchanged"].item() and part["still_training"].item()


def test_collection_leaves_training_untouched(single):
    _, parts = gathered(single, 1, "directions")
    check_invariants(parts)


def test_collection_is_the_mean_token_gradient_of_each_chunk(single, tiny_model):
    """Independent check: plain autograd, whole chunk in one batch, mean over its response tokens."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_utils import apply_template, collate_sft, load_tokenized
    from train_utils import response_nll_sum

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    apply_template(tokenizer, "qwen")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    args = SimpleNamespace(dataset_dir="data", max_samples=None, cutoff_len=2048, preprocessing_num_workers=1,
                           enable_thinking=True,
                           template="qwen", strict_data=False, seed=42, preprocessing_batch_size=1000)
    expected = []
    for name in ("demo_general_a_sft", "demo_general_b_sft"):
        examples = load_tokenized(name, args, tokenizer, False, log=lambda *_: None)
        for chunk in (examples[:5], examples[5:10]):
            model.zero_grad()
            batch = collate_sft(chunk, tokenizer.pad_token_id)
            (response_nll_sum(model, batch) / sum(e["num_targets"] for e in chunk)).backward()
            expected.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    directions, _ = gathered(single, 1, "directions")
    # float32 gradients of the same loss, batched differently: each entry sums at most a few thousand token
    # contributions, so they differ by float32 rounding (helpers.float32_rtol).
    assert relative_error(directions, torch.stack(expected)) < float32_rtol(4096)


@pytest.mark.parametrize("backend", ["ddp", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "fsdp2"])
def test_two_processes_collect_what_one_does(single, tiny_model, tmp_path, backend):
    """Also the leak test: the training gradient after collection is bit-for-bit the one before it."""
    extra = [] if backend in ("ddp", "fsdp2") else ["--deepspeed", f"accelerate_configs/ds_z{backend[4:]}_config.json"]
    run_script("tests/workers/collection_worker.py", [tmp_path, tiny_model, *extra], nproc=2,
               **LAUNCH.get(backend, {}))
    one, _ = gathered(single, 1, "directions")
    two, parts = gathered(tmp_path, 2, "directions")
    check_invariants(parts)
    for k in range(one.shape[0]):
        assert relative_error(two[k], one[k]) < float32_rtol(4096)
