"""Length-aware micro-batches and padding-free batches (issue 25): the step's samples stay, only their grouping
changes, so every loss and gradient is the same sum in another order.

- The sampler: each step keeps its samples, every rank computes the same assignment, padding drops, ranks balance.
- Padding-free forward passes (sdpa and eager) against padded ones on the tiny model: logits, per-token and
  per-response log-probabilities, the DPO pair log-probabilities and the gradient; a model that ignores position
  ids for masking is refused.
- Training runs against the positional, padded assignment (one process): SFT and DPO, one and two processes
  (DDP), ZeRO-2 with LLaMA-Factory's stock file, precomputed DPO reference log-probabilities, and a resume that
  switches both settings (LoRA: tests/test_lora.py). The data has responses of 1 to 8 times the demo's length, so
  padded micro-batches in sampled order are about a third padding.

Tolerances. Forward passes of packed and padded batches differ by float32 rounding of the same dot products
(helpers.float32_rtol with n = the longest reduction: the MLP's 128 inputs for logits and log-probabilities, a
response's tokens for its summed log-probability, the batch's tokens for the gradient; measured 1e-7 relative,
bounds 1e-5 to 3e-5); a sequence attending to its neighbour moves its logits by O(1). Training runs compute the same
function with sums grouped otherwise: weights and logged losses within helpers.WEIGHTS_RTOL (1e-5; a wrong grouping
that dropped, repeated or mis-weighted a sample misses by 1e-3 or more).
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_utils import (StepSampler, collate_pairs, collate_sft, describe_batching, load_tokenized, padded_length,
                        padding_fraction)
from helpers import WEIGHTS_RTOL, float32_rtol, load_weights, read_log, run_script, weights_relative_difference
from run_guard import UserError
from test_dpo import dpo_args
from test_sft_e2e import sft_args
from train_dpo_pg import pair_logps
from train_utils import check_padding_free, input_tokens, response_nll_sum, response_positions, token_logps

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


# ---- the assignment -------------------------------------------------------------------------------------------

def samplers(num_samples, batch, world, accum, lengths, seed=3, padding_free=False):
    return [StepSampler(num_samples, batch, world, rank, accum, seed, lengths=lengths, padding_free=padding_free)
            for rank in range(world)]


def cost(indices, lengths):
    """Positions a padded micro-batch computes: its samples times its longest."""
    return len(indices) * max(lengths[i] for i in indices)


@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("batch, world, accum", [(4, 1, 4), (2, 1, 16), (2, 2, 3), (1, 3, 2), (3, 4, 1)])
def test_each_step_keeps_its_samples_and_every_rank_sees_the_same_assignment(batch, world, accum, padding_free):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 400, (61,), generator=generator).tolist()  # 61: the epoch's last step wraps around
    aware = samplers(61, batch, world, accum, lengths, padding_free=padding_free)
    positional = samplers(61, batch, world, accum, None)
    for step in range(2 * aware[0].steps_per_epoch):
        assignment = aware[0].assignment(step)
        assert all(s.assignment(step) == assignment for s in aware)  # a function of (seed, step, lengths)
        assert len(assignment) == accum and all(len(ranks) == world for ranks in assignment)
        for rank, sampler in enumerate(aware):
            assert sampler.micro_batches(step) == [ranks[rank] for ranks in assignment]
        dealt = [i for ranks in assignment for indices in ranks for i in indices]
        assert sorted(dealt) == sorted(positional[0].step_indices(step))  # the same samples, each once
        longest = max(lengths[i] for i in dealt)
        for indices in (indices for ranks in assignment for indices in ranks):
            if padding_free:  # a packed row has no padding to save: the size stays
                assert len(indices) == batch
            else:  # sizes vary, but no micro-batch computes more than the largest one of equal sizes
                assert indices and cost(indices, lengths) <= batch * longest
        # the micro-batches are consecutive runs of the step sorted by length, and every rank's come costliest first
        grouped = [[[lengths[i] for i in indices] for indices in ranks] for ranks in assignment]  # [m][r]
        runs = sorted((group for ranks in grouped for group in ranks), key=lambda g: (max(g), min(g)), reverse=True)
        assert all(min(longer) >= max(shorter) for longer, shorter in zip(runs, runs[1:]))
        for rank in range(world):
            costs = [len(ranks[rank]) * max(ranks[rank]) for ranks in grouped]
            assert costs == sorted(costs, reverse=True)


def test_without_lengths_the_assignment_is_the_positional_one():
    sampler = StepSampler(50, per_device_batch=2, world_size=2, rank=1, grad_accum=3, seed=7)
    indices = sampler.step_indices(4)
    assert sampler.micro_batches(4) == [indices[(m * 2 + 1) * 2:(m * 2 + 2) * 2] for m in range(3)]


def set_partitions(items, count):
    """Every way to split `items` into `count` non-empty groups (order of groups and within them ignored)."""
    if not items:
        if count == 0:
            yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest, count - 1):
        yield [[first]] + partition
    for partition in set_partitions(rest, count):
        for k in range(len(partition)):
            yield partition[:k] + [[first] + partition[k]] + partition[k + 1:]


def test_padded_micro_batches_compute_the_fewest_positions_of_any_split():
    """Against every split of the step into micro-batches, not only into consecutive runs of the sorted step: on
    small random steps (up to 9 samples: 3,025 splits of 9 into 3) the sampler's costs the fewest positions among
    those whose micro-batches stay within the memory of equal sizes (per-device batch x the step's longest)."""
    generator = torch.Generator().manual_seed(1)
    for trial in range(40):
        batch, world, accum = [(2, 1, 3), (3, 1, 3), (2, 2, 2), (2, 1, 4), (4, 1, 2)][trial % 5]
        global_batch = batch * world * accum
        lengths = torch.randint(1, 60, (global_batch,), generator=generator).tolist()
        sampler = StepSampler(global_batch, batch, world, 0, accum, seed=trial, lengths=lengths)
        chosen = sum(cost(indices, lengths) for ranks in sampler.assignment(0) for indices in ranks)
        budget = batch * max(lengths)
        least = min(sum(cost(group, lengths) for group in split)
                    for split in set_partitions(list(range(global_batch)), world * accum)
                    if all(cost(group, lengths) <= budget for group in split))
        assert chosen == least, (lengths, batch, world, accum)


def lognormal_lengths(count, seed=0):
    """Sequence lengths spread like chat data (median 150 tokens, a tenth above 400)."""
    generator = torch.Generator().manual_seed(seed)
    return (150 * torch.exp(0.75 * torch.randn(count, generator=generator))).clamp(8, 1024).long().tolist()


@pytest.mark.parametrize("batch, world, accum", [(4, 1, 4), (2, 1, 16), (4, 2, 4), (2, 8, 16)])
def test_padding_and_the_slowest_rank_fall_at_the_reference_settings(batch, world, accum):
    """At the reference settings (SFT 4 x 4, DPO 2 x 16) and with 2 and 8 ranks; a micro-batch costs its padded
    positions (samples x longest).

    Micro-batches of equal sizes cost the fewest positions when each takes a consecutive run of the step sorted by
    length (moving a sample between runs never lowers a maximum): computed here from the sorted lengths alone, and
    the sizes the sampler chooses cost less still (measured 14% padding against 27% at 4 x 4, 47% in
    sampled order). Ranks that wait for
    each other after every micro-batch (ZeRO-2/3 reduce the gradient of each one) take the sum over micro-batches of
    the slowest rank's cost, DDP, which waits once per step, the slowest rank's total: both below the sampled
    order's."""
    lengths = lognormal_lengths(4096)
    examples = [{"input_ids": [0] * n} for n in lengths]
    aware, positional = samplers(4096, batch, world, accum, lengths), samplers(4096, batch, world, accum, None)
    steps = range(aware[0].steps_per_epoch)
    real = least_equal_sizes = 0
    for step in steps:
        ordered = sorted((lengths[i] for i in positional[0].step_indices(step)), reverse=True)
        real += sum(ordered)
        least_equal_sizes += sum(batch * ordered[start] for start in range(0, len(ordered), batch))
    after, before = padding_fraction(aware[0], examples, steps), padding_fraction(positional[0], examples, steps)
    assert after < 1 - real / least_equal_sizes < before

    def slowest_rank(sampler):  # (waiting after every micro-batch, waiting once per step), summed over the steps
        every = once = 0
        for step in steps:
            costs = [[cost(indices, lengths) for indices in ranks] for ranks in sampler.assignment(step)]
            every += sum(max(ranks) for ranks in costs)
            once += max(sum(ranks[r] for ranks in costs) for r in range(world))
        return every, once

    (every, once), (every_before, once_before) = slowest_rank(aware[0]), slowest_rank(positional[0])
    assert every < every_before and once < once_before  # measured 0.37-0.73 of before


def test_the_log_line_reports_the_padding():
    examples = [{"input_ids": [0] * n} for n in lognormal_lengths(256)]
    aware = StepSampler(256, 4, 1, 0, 4, 0, lengths=[padded_length(e) for e in examples])
    assert describe_batching(aware, examples, padding_free=False).startswith("length-aware micro-batches: padding ")
    assert "no padding" in describe_batching(aware, examples, padding_free=True)


# ---- padding-free forward passes against padded ones ----------------------------------------------------------

def varied(examples, keys):
    """The examples cut to lengths from 40 tokens up, so padded batches hold a lot of padding."""
    return [{**e, **{key: e[key][:40 + 11 * i] for key in keys}} for i, e in enumerate(examples)]


@pytest.fixture(scope="module")
def tiny_examples(tokenizer):
    args = SimpleNamespace(dataset_dir=str(DATA), max_samples=6, cutoff_len=2048, preprocessing_num_workers=1,
                           enable_thinking=True,
                           template="qwen", strict_data=False, seed=42, preprocessing_batch_size=1000)
    sft = load_tokenized("demo_general_b_sft", args, tokenizer, False, log=lambda *_: None)
    pairs = load_tokenized("demo_safety_dpo", args, tokenizer, True, log=lambda *_: None)
    return (varied(sft, ("input_ids", "labels")),
            varied(pairs, ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")))


def relative(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_free_batches_give_the_padded_results(tiny_model, tiny_examples, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention)
    sft, pairs = tiny_examples
    padded, packed = collate_sft(sft, 0), collate_sft(sft, 0, padding_free=True)
    assert packed["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in sft))  # one row, no padding
    assert packed["position_ids"][0].tolist() == [p for e in sft for p in range(len(e["input_ids"]))]
    assert torch.equal(response_positions(padded), response_positions(packed))
    assert input_tokens(padded) == input_tokens(packed) == packed["input_ids"].numel()

    logps_padded, logits_padded = token_logps(model, padded)
    logps_packed, logits_packed = token_logps(model, packed)
    hidden = model.config.intermediate_size
    inside = padded["attention_mask"].bool()
    assert relative(logits_packed[0], logits_padded[inside]) <= float32_rtol(hidden)  # measured 1e-7
    assert relative(logps_packed, logps_padded) <= float32_rtol(hidden)
    # the first label of every sequence is never a target, so no sequence predicts its neighbour's first token
    assert torch.equal(logps_packed == 0, logps_padded == 0)

    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        response_nll_sum(model, batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert relative(grads[1], grads[0]) <= float32_rtol(inside.sum().item())  # measured 1.5e-7

    with torch.no_grad():
        by_pairs = [pair_logps(model, collate_pairs(pairs, 0, padding_free), average)
                    for average in (False, True) for padding_free in (False, True)]
    longest = max(padded_length(e) for e in pairs)
    for padded_values, packed_values in (by_pairs[:2], by_pairs[2:]):
        for a, b in zip(padded_values[:3], packed_values[:3]):  # chosen, rejected, chosen mean
            assert relative(b, a) <= float32_rtol(longest)


class IgnoresPositionIds(torch.nn.Module):
    """A model whose mask comes from the row alone (as in model classes that build their own mask): drops
    position_ids, so a padding-free row is one causal sequence."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, position_ids=None, **kwargs):
        return self.model(**kwargs)


def test_a_model_that_mixes_packed_sequences_is_refused(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).train()
    accelerator = SimpleNamespace(device=torch.device("cpu"), unwrap_model=lambda m: m)
    check_padding_free(model, accelerator)  # transformers' Qwen2 keeps them apart
    assert model.training  # and the check left the mode as it was
    mixing = IgnoresPositionIds(model)
    mixing.config = model.config
    with pytest.raises(UserError, match=r"--padding_free True: the model \(IgnoresPositionIds, attention sdpa\) "
                                        r"does not keep the sequences of a padding-free row apart"):
        check_padding_free(mixing, accelerator)


# ---- training runs --------------------------------------------------------------------------------------------

def repeat(text, times):
    return " ".join([text] * times)


@pytest.fixture(scope="module")
def varied_data(tmp_path_factory):
    """The demo's safety sets with responses of 1, 2, 4 or 8 times their length (abstract placeholders, as the
    demo's); the reference sets are the demo's."""
    folder = tmp_path_factory.mktemp("varied-data")
    sft = json.loads((DATA / "demo_safety_sft.json").read_text())[:64]
    pairs = json.loads((DATA / "demo_safety_dpo.json").read_text())[:64]
    for i, row in enumerate(sft):
        row["output"] = repeat(row["output"], 2 ** (i % 4))
    for i, row in enumerate(pairs):
        row["chosen"], row["rejected"] = repeat(row["chosen"], 2 ** (i % 3)), repeat(row["rejected"], 2 ** (i // 3 % 4))
    (folder / "sft.json").write_text(json.dumps(sft))
    (folder / "dpo.json").write_text(json.dumps(pairs))
    info = json.loads((DATA / "dataset_info.json").read_text())
    info = {name: {**entry, "file_name": str(DATA / entry["file_name"])} for name, entry in info.items()}
    info["varied_sft"] = {"file_name": "sft.json"}
    info["varied_dpo"] = {**info["demo_safety_dpo"], "file_name": "dpo.json"}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


SCRIPTS = {"sft": ("train_sft_pg.py", sft_args, "varied_sft"), "dpo": ("train_dpo_pg.py", dpo_args, "varied_dpo")}
POSITIONAL = {"length_aware_micro_batches": False}
STOCK_ZERO2 = ["--deepspeed", "accelerate_configs/ds_z2_config.json"]
RUNS = {  # name: (script, processes, flags, extra arguments); per_device_train_batch_size 4 // processes
    "sft positional": ("sft", 1, POSITIONAL, []),
    "sft length-aware": ("sft", 1, {"save_strategy": "steps", "save_steps": 2}, []),
    "sft zero2 padding-free": ("sft", 2, {"padding_free": True}, STOCK_ZERO2),
    "dpo positional": ("dpo", 1, POSITIONAL, []),
    "dpo ddp padding-free": ("dpo", 2, {"padding_free": True}, []),
    "dpo padding-free precomputed": ("dpo", 1, {"padding_free": True, "precompute_ref_log_probs": True}, []),
}


def run_args(script, model, out, data, nproc=1, **flags):
    """4 steps of global batch 8 (4 per device on one process, 2 on two), logged every step, at a learning rate
    at which the DPO loss falls to 0.03 by step 4 (at 1e-3 it falls to 1e-4, where its gradient carries little)."""
    _, make_args, dataset = SCRIPTS[script]
    return make_args(model, out, dataset_dir=data, dataset=dataset, max_steps=4, logging_steps=1,
                     per_device_train_batch_size=4 // nproc, **{"learning_rate": 2e-4, **flags})


@pytest.fixture(scope="module")
def runs(tiny_model, varied_data, tmp_path_factory):
    """The runs of RUNS, made on first use: name -> (folder, stdout)."""
    cache = {}

    def get(name):
        if name not in cache:
            script, nproc, flags, extra = RUNS[name]
            out = tmp_path_factory.mktemp(name.replace(" ", "-"))
            result = run_script(SCRIPTS[script][0], run_args(script, tiny_model, out, varied_data, nproc, **flags)
                                + extra, nproc=nproc)
            cache[name] = out, result.stdout
        return cache[name]

    return get


def assert_same_training(actual, expected):
    """Weights within WEIGHTS_RTOL; each step's loss too, relative to the first step's (a loss far below it, as a
    DPO loss that fell 100x, carries the rounding of the log-probabilities it came from, not of its own size)."""
    assert weights_relative_difference(load_weights(expected), load_weights(actual)) <= WEIGHTS_RTOL
    losses = [[record["loss"] for record in read_log(folder)] for folder in (actual, expected)]
    assert len(losses[0]) == 4
    assert losses[0] == pytest.approx(losses[1], rel=WEIGHTS_RTOL, abs=WEIGHTS_RTOL * losses[1][0])


@pytest.mark.parametrize("name", ["sft length-aware", "sft zero2 padding-free", "dpo ddp padding-free",
                                  "dpo padding-free precomputed"])
def test_runs_equal_the_positional_padded_run(runs, name):
    out, stdout = runs(name)
    assert_same_training(out, runs(f"{RUNS[name][0]} positional")[0])
    before = float(runs(f"{RUNS[name][0]} positional")[1].split("micro-batches in sampled order: padding ")[1]
                   .split("%")[0])
    assert before > 25  # the positional run computes on padding ...
    if RUNS[name][2].get("padding_free"):  # ... this one does not
        assert "padding-free micro-batches, length-aware: no padding" in stdout
    else:  # ... this one on less (the least possible: test_padding_and_the_slowest_rank_are_the_least_possible)
        assert float(stdout.split(f"length-aware micro-batches: padding {before:.0f}% -> ")[1].split("%")[0]) < before


def test_resume_may_switch_both_settings(runs, tiny_model, varied_data, tmp_path):
    """The checkpoint of a length-aware padded run, resumed positional and padding-free: the run it completes is
    the uninterrupted one (resuming with the same settings is bit for bit: tests/test_reliability.py)."""
    full, _ = runs("sft length-aware")
    part = tmp_path / "part"
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    run_script("train_sft_pg.py", run_args("sft", tiny_model, part, varied_data, **RUNS["sft length-aware"][2],
                                           resume_from_checkpoint="True", padding_free=True, **POSITIONAL))
    assert weights_relative_difference(load_weights(full), load_weights(part)) <= WEIGHTS_RTOL
    resumed, uninterrupted = read_log(part), [r for r in read_log(full) if r["step"] > 2]
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in uninterrupted], rel=WEIGHTS_RTOL)
