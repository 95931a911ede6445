"""Validation during training (--val_size, --eval_dataset, --eval_general_dataset, --eval_strategy, ...).

As LLaMA-Factory and Hugging Face's Trainer do it: a held-out part of the training data (--val_size) or named
datasets (--eval_dataset) are evaluated every --eval_steps steps or every epoch, and at the end (--do_eval), with
`eval_` names in trainer_log.jsonl, the trackers and the loss plot, and in eval_results.json. OGPSA's addition:
--eval_general_dataset, general-capability data whose per-token NLL is logged as eval_general_loss at each
evaluation (the alignment tax, while it happens).

Evaluation does not change training: dropout off (model.eval()), no gradients, and every random state (python,
numpy, torch, cuda) restored afterwards, so the weights with and without evaluation are equal. Every rank runs the
same number of forward passes (a ZeRO-3 or FSDP2 forward is collective): a rank with no batch left in a round runs
a dummy one whose sums it drops. The sums and counts are reduced over ranks before dividing, so a metric does not
depend on the evaluation batch size or the number of processes (to float rounding).
"""

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkpoint import write_json
from data_utils import DataError, is_ranking, load_tokenized
from train_utils import forward_logps, response_positions

GENERAL = "general"  # the prefix of --eval_general_dataset's metrics: eval_general_loss


@dataclass
class EvalSet:
    """One evaluated set: its metrics are logged as f"{prefix}_{metric}" (eval_loss, eval_<name>_loss, ...)."""
    name: str
    prefix: str
    examples: list
    general: bool = False  # SFT-style per-token NLL in both scripts


def split_off(examples, val_size, seed, name):
    """(train, held out): --val_size split off the training examples as LLaMA-Factory's split_dataset does.

    LLaMA-Factory (data/data_utils.py split_dataset) calls datasets' Dataset.train_test_split(test_size=val_size,
    seed=training seed) on the tokenized, concatenated training set, with val_size as a count when > 1, else as a
    fraction. Exact: the same call on the row numbers of the same concatenated examples, so the same rows go to each
    side, in the same order. (The examples are ours: a row LLaMA-Factory's tokenizer drops and ours keeps, or the
    reverse, would shift the numbering; for the rows both keep, they agree.)
    """
    from datasets import Dataset

    count = len(examples)
    test_size = int(val_size) if val_size > 1 else val_size
    held = math.ceil(test_size * count) if isinstance(test_size, float) else test_size
    if not 0 < held < count:
        raise DataError(f"--val_size {val_size}: the training data ({name}) has {count} samples, so that would hold "
                        f"out {held} of them and leave {count - held} to train on; pass a fraction below 1 or a count "
                        f"between 1 and {count - 1}")
    parts = Dataset.from_dict({"row": list(range(count))}).train_test_split(test_size=test_size, seed=seed)
    return [examples[i] for i in parts["train"]["row"]], [examples[i] for i in parts["test"]["row"]]


def load_eval_sets(args, tokenizer, ranking, log, cache, held_out=None):
    """The evaluation sets: the --val_size held-out part (`held_out`) or --eval_dataset (one set, or one per dataset
    with --eval_on_each_dataset), then --eval_general_dataset. Not fingerprinted: they may change on resume."""
    kind = "preference pairs" if ranking else "SFT (prompt and response)"
    sets = []
    if held_out is not None:
        sets.append(EvalSet("val_size", "eval", held_out))
    names = [n.strip() for n in (args.eval_dataset or "").split(",") if n.strip()]
    for name in names:
        if is_ranking(name, args.dataset_dir) != ranking:
            raise DataError(f"--eval_dataset {name}: it is {'preference pairs' if not ranking else 'SFT data'}, and "
                            f"this script evaluates {kind} data like its training set; pass a dataset of that kind")
    if names and args.eval_on_each_dataset:
        sets += [EvalSet(name, f"eval_{name}", load_tokenized(name, args, tokenizer, ranking, log=log, cache=cache))
                 for name in names]
    elif names:
        sets.append(EvalSet(",".join(names), "eval", load_tokenized(names, args, tokenizer, ranking, log=log,
                                                                    cache=cache)))
    general = [n.strip() for n in (args.eval_general_dataset or "").split(",") if n.strip()]
    for name in general:
        if is_ranking(name, args.dataset_dir):
            raise DataError(f"--eval_general_dataset {name}: it is preference pairs; general-capability data is "
                            "evaluated as SFT data (per-token NLL of the responses): pass an SFT dataset")
    if general:
        sets.append(EvalSet(",".join(general), f"eval_{GENERAL}",
                            load_tokenized(general, args, tokenizer, False, log=log, cache=cache), general=True))
    return sets


def token_nll_sums(model, eval_set, indices, batch):
    """SFT evaluation (and --eval_general_dataset in both scripts): the summed NLL of the batch's response tokens
    and their count, so that eval_loss is the per-token mean over the whole set, as the training loss."""
    logps, _ = forward_logps(model, batch)
    return {"loss": (-logps.sum(), int(response_positions(batch).sum()))}


def evaluation_due(args, step, steps_per_epoch):
    """Whether the loop evaluates after optimizer step `step` (Hugging Face's eval_strategy: every eval_steps steps,
    or at each epoch's end)."""
    if args.eval_strategy == "steps":
        return step % args.eval_steps == 0
    return args.eval_strategy == "epoch" and step % steps_per_epoch == 0


class RandomStates:
    """Every random state the run draws from (python, numpy, torch, cuda), restored on exit."""

    def __enter__(self):
        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
                       torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)

    def __exit__(self, *exc):
        python, numpy, cpu, cuda = self.states
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class Evaluator:
    """Runs the evaluation sets through the model data-parallel and logs the result.

    `batch_sums(model, eval_set, indices, batch)` returns {metric: (sum over the batch, count)} for a batch of
    `eval_set`'s examples at `indices` (moved to the device); `collate(eval_set, examples)` builds the batch.
    """

    def __init__(self, accelerator, args, sets, collate, batch_sums):
        self.accelerator, self.args, self.sets = accelerator, args, sets
        self.collate, self.batch_sums = collate, batch_sums
        self.last = None  # (step, metrics) of the latest evaluation

    @torch.no_grad()
    def evaluate(self, model, step, metrics):
        """Evaluate every set at `step`; log one record with the metrics and eval_runtime_s (through `metrics`, a
        train_utils.MetricLog, whose training time leaves it out); return the metrics."""
        start = time.perf_counter()
        training = model.training
        model.eval()  # no dropout
        try:
            with RandomStates():
                result = {}
                for eval_set in self.sets:
                    result |= self.evaluate_set(model, eval_set)
        finally:
            model.train(training)
        seconds = time.perf_counter() - start
        metrics.log_evaluation(step, result | {"eval_runtime_s": round(seconds, 3)}, seconds)
        self.last = step, result
        return result

    def evaluate_set(self, model, eval_set):
        """{prefix_metric: mean}: sums and counts over every example of the set, reduced over ranks, then divided.
        Batches of --per_device_eval_batch_size in the set's order are dealt round-robin to the ranks; every rank
        runs ceil(batches / world) forwards."""
        accelerator, size = self.accelerator, self.args.per_device_eval_batch_size
        world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
        batches = [list(range(i, min(i + size, len(eval_set.examples)))) for i in range(0, len(eval_set.examples),
                                                                                         size)]
        sums = {}
        for round_ in range(math.ceil(len(batches) / world)):
            b = round_ * world + rank
            indices = batches[b] if b < len(batches) else batches[0]  # a dummy batch: its sums are dropped
            batch = {k: v.to(device) for k, v in self.collate(eval_set, [eval_set.examples[i]
                                                                         for i in indices]).items()}
            for name, (total, count) in self.batch_sums(model, eval_set, indices, batch).items():
                old_total, old_count = sums.get(name, (0.0, 0))  # every rank knows every name (packed alike)
                sums[name] = (old_total + total.double(), old_count + count) if b < len(batches) else \
                    (old_total, old_count)
        names = sorted(sums)
        packed = torch.tensor([v for n in names for v in (float(sums[n][0]), sums[n][1])], dtype=torch.float64,
                              device=device)
        if world > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        packed = packed.tolist()
        return {f"{eval_set.prefix}_{name}": packed[2 * i] / packed[2 * i + 1] if packed[2 * i + 1] else float("nan")
                for i, name in enumerate(names)}

    def final(self, model, step, metrics):
        """--do_eval: the end-of-training metrics (those of `step` if it was just evaluated), written to
        eval_results.json with the step."""
        result = self.last[1] if self.last and self.last[0] == step else self.evaluate(model, step, metrics)
        if self.accelerator.is_main_process:
            write_json(Path(self.args.output_dir, "eval_results.json"), {"step": step, **result})
        return result
