"""Validation during training (validation.py): what is evaluated, that the numbers are right, and that evaluating
does not change training."""

import json
import math
import random
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from arguments import build_parser, check_args
from data_utils import DataError, collate_sft, load_tokenized
from helpers import WEIGHTS_RTOL, float32_rtol, load_weights, read_log, run_script
from run_guard import UserError
from test_dpo import dpo_args
from test_sft_e2e import sft_args
from validation import EvalSet, Evaluator, load_eval_sets, split_off

# The single_runs fixture's SFT run (4 steps, per_param) plus evaluation: every 2 steps (--eval_steps defaults to
# --logging_steps 2), an odd evaluation batch size, the general-capability loss, and a checkpoint at step 2.
EVAL_FLAGS = dict(eval_dataset="demo_general_a_sft", eval_general_dataset="demo_general_b_sft", eval_strategy="steps",
                  per_device_eval_batch_size=5, plot_loss=True, save_strategy="steps", save_steps=2)


def parsed(tiny_model, tmp_path, **flags):
    argv = sft_args(tiny_model, tmp_path / "parsed", base_scope="per_param", max_steps=4, **flags)
    return check_args(build_parser("", "sft_pg").parse_args(argv), "sft_pg")


@pytest.fixture(scope="module")
def eval_run(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("validation") / "run"
    run_script("train_sft_pg.py", sft_args(tiny_model, out, base_scope="per_param", max_steps=4, **EVAL_FLAGS))
    return out


def test_evaluation_leaves_training_bitwise_equal(eval_run, single_runs):
    plain, evaluated = load_weights(single_runs("sft", "per_param")), load_weights(eval_run)
    assert sorted(plain) == sorted(evaluated)
    assert all(torch.equal(plain[k], evaluated[k]) for k in plain), "evaluation changed the trained weights"


def test_records_results_and_plot(eval_run):
    log = read_log(eval_run)
    evaluations = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [2, 4]  # eval_steps = logging_steps, as in Hugging Face
    assert all("eval_general_loss" in r and "eval_runtime_s" in r and "loss" not in r for r in evaluations)
    results = json.loads((eval_run / "eval_results.json").read_text())
    assert results == {"step": 4, **{k: v for k, v in evaluations[-1].items() if k not in ("step", "eval_runtime_s")}}
    train = json.loads((eval_run / "train_results.json").read_text())
    assert train["train_runtime_s"] == [r for r in log if "loss" in r][-1]["elapsed_s"]
    assert (eval_run / "training_loss.png").stat().st_size > 1000


def test_eval_loss_equals_an_independent_recomputation(eval_run, tiny_model, tmp_path):
    """eval_loss at the last step is the mean NLL over every response token of the evaluation set, of the saved
    (final) model: recomputed here with the model's own loss (mean over shifted labels x their count)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(eval_run)
    args = parsed(tiny_model, tmp_path, **EVAL_FLAGS)
    model = AutoModelForCausalLM.from_pretrained(eval_run, dtype=torch.float32).eval()
    expected = {}
    for key, names in (("eval_loss", args.eval_dataset), ("eval_general_loss", args.eval_general_dataset)):
        examples = load_tokenized(names, args, tokenizer, ranking=False, log=lambda *_: None)
        batch = collate_sft(examples, tokenizer.pad_token_id)  # one batch: labels -100 on the padding
        with torch.no_grad():
            mean = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        expected[key] = mean.item()  # the model's own mean over every response token of the set
    results = json.loads((eval_run / "eval_results.json").read_text())
    for key, value in expected.items():
        # float32 forward passes over sequences of ~100 tokens and a 64-sample sum: float32_rtol of those sizes
        assert results[key] == pytest.approx(value, rel=float32_rtol(64 * 128)), key


def test_resumed_on_two_processes_evaluates_as_the_uninterrupted_run(eval_run, tiny_model, tmp_path):
    """The one-process run resumed from its step-2 checkpoint on 2 DDP processes x 1 accumulation (the same global
    batch) with another evaluation batch size: the step-2 evaluation is kept, not repeated; step 4's, where each
    rank evaluates every other batch (64 samples in 5 batches of 13: the second rank's third forward is a dummy
    batch whose sums it drops) and the sums are reduced before dividing, equals the uninterrupted run's."""
    resumed = tmp_path / "resumed"
    shutil.copytree(eval_run, resumed, ignore=lambda folder, _: [
        "checkpoint-4", "model.safetensors", "eval_results.json"] if folder == str(eval_run) else [])
    run_script("train_sft_pg.py", sft_args(tiny_model, resumed, base_scope="per_param", max_steps=4,
                                           gradient_accumulation_steps=1, resume_from_checkpoint="True",
                                           **{**EVAL_FLAGS, "per_device_eval_batch_size": 13}), nproc=2)
    one = [r for r in read_log(eval_run) if "eval_loss" in r]
    two = [r for r in read_log(resumed) if "eval_loss" in r]
    assert [r["step"] for r in two] == [2, 4] and two[0] == one[0]
    for key in ("eval_loss", "eval_general_loss"):
        # the weights of the two runs differ by float32 rounding (WEIGHTS_RTOL); a loss moves no more than that
        assert two[1][key] == pytest.approx(one[1][key], rel=WEIGHTS_RTOL), key


def test_val_size_holds_out_the_rows_llama_factory_holds_out(tokenizer, tiny_model, tmp_path):
    """LLaMA-Factory: datasets' train_test_split(test_size=val_size, seed=seed) of the tokenized training set; here
    the same split on the examples' token ids, a fraction and a count."""
    from datasets import Dataset

    args = parsed(tiny_model, tmp_path, val_size=0.25, eval_strategy="epoch")
    examples = load_tokenized(args.dataset, args, tokenizer, ranking=False, log=lambda *_: None)
    table = Dataset.from_dict({"ids": [e["input_ids"] for e in examples]})
    for val_size, test_size in ((0.25, 0.25), (10.0, 10)):
        expected = table.train_test_split(test_size=test_size, seed=args.seed)
        train, held = split_off(examples, val_size, args.seed, args.dataset)
        assert [e["input_ids"] for e in held] == expected["test"]["ids"]
        assert [e["input_ids"] for e in train] == expected["train"]["ids"]
    assert len(split_off(examples, 0.25, args.seed, "x")[1]) == math.ceil(0.25 * len(examples))


def test_bad_input_is_refused_in_one_line(tokenizer, tiny_model, tmp_path):
    with pytest.raises(DataError, match=r"--val_size 64.0: the training data \(demo\) has 64 samples"):
        split_off(list(range(64)), 64.0, 42, "demo")
    with pytest.raises(UserError, match="--eval_steps 3 applies to --eval_strategy steps"):
        parsed(tiny_model, tmp_path, eval_dataset="demo_general_a_sft", eval_strategy="epoch", eval_steps=3)
    with pytest.raises(UserError, match="evaluation data is given .* but no evaluation"):
        parsed(tiny_model, tmp_path, val_size=0.1)
    with pytest.raises(UserError, match="needs evaluation data"):
        parsed(tiny_model, tmp_path, eval_strategy="steps")
    args = parsed(tiny_model, tmp_path, eval_dataset="demo_safety_dpo", do_eval=True)
    with pytest.raises(DataError, match="--eval_dataset demo_safety_dpo: it is preference pairs"):
        load_eval_sets(args, tokenizer, False, print, None)


def test_eval_on_each_dataset_names_each_set(tokenizer, tiny_model, tmp_path):
    args = parsed(tiny_model, tmp_path, eval_dataset="demo_general_a_sft,demo_general_b_sft", eval_on_each_dataset=True,
                  eval_general_dataset="demo_general_a_sft", do_eval=True)
    sets = load_eval_sets(args, tokenizer, False, lambda *_: None, None)
    assert [(s.prefix, len(s.examples), s.general) for s in sets] == [
        ("eval_demo_general_a_sft", 64, False), ("eval_demo_general_b_sft", 64, False), ("eval_general", 64, True)]


class Noisy(torch.nn.Module):
    """A model whose output depends on dropout: evaluated in training mode, it would give other numbers."""

    def __init__(self):
        super().__init__()
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.dropout(x)


def test_evaluate_turns_dropout_off_and_restores_every_random_state():
    accelerator = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"), is_main_process=False)
    args = SimpleNamespace(per_device_eval_batch_size=3, output_dir=None)
    logged = []
    metrics = SimpleNamespace(log_evaluation=lambda step, record, seconds: logged.append((step, record)))
    values = [float(v) for v in range(1, 8)]

    def sums(model, eval_set, indices, batch):
        random.random(), np.random.rand(), torch.rand(1)  # draws that must not shift the training's random streams
        return {"loss": (model(batch["x"]).sum(), len(indices))}

    evaluator = Evaluator(accelerator, args, [EvalSet("set", "eval", values)],
                          lambda _, rows: {"x": torch.tensor(rows)}, sums)
    model = Noisy().train()
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    result = evaluator.evaluate(model, 3, metrics)
    assert result == {"eval_loss": pytest.approx(sum(values) / len(values))}  # 7 values in batches 3, 3, 1
    assert model.training
    assert random.getstate() == before[0] and np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    assert logged[0][0] == 3 and "eval_runtime_s" in logged[0][1]


def test_dpo_eval_metrics_are_present_and_consistent(tiny_model, tmp_path):
    out = tmp_path / "dpo"
    run_script("train_dpo_pg.py", dpo_args(tiny_model, out, max_steps=2, val_size=8, eval_strategy="steps",
                                           eval_steps=1, eval_general_dataset="demo_general_a_sft",
                                           per_device_eval_batch_size=3))
    evaluations = [r for r in read_log(out) if "eval_loss" in r]
    assert [r["step"] for r in evaluations] == [1, 2]
    for r in evaluations:
        margin = r["eval_rewards/chosen"] - r["eval_rewards/rejected"]
        assert r["eval_rewards/margins"] == pytest.approx(margin, abs=1e-6)
        assert 0 <= r["eval_rewards/accuracies"] <= 1 and r["eval_logps/chosen"] < 0 and r["eval_general_loss"] > 0
        # sigmoid loss -log sigmoid(margin) is convex: its mean is at least its value at the mean margin
        assert r["eval_loss"] >= -torch.nn.functional.logsigmoid(torch.tensor(margin)).item() - 1e-6
    # the held-out pairs are the training data's kind: the policy learns them as it learns the training pairs
    assert evaluations[1]["eval_loss"] < evaluations[0]["eval_loss"] < math.log(2)
