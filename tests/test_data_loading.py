"""LLaMA-Factory's data-loading keys: --dataloader_num_workers (micro-batches built ahead of the step in worker
processes), --tokenized_path / --overwrite_cache (tokenize once, keep it on disk) and --preprocessing_batch_size."""

import json
import shutil
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import data_utils
from data_utils import (CACHE_INDEX, DataError, StepSampler, collate_pairs, load_tokenized, padded_length,
                        step_micro_batches, tokenize_dataset, tokenized_once)
from helpers import load_weights, run_script
from test_sft_e2e import sft_args

ROOT = Path(__file__).resolve().parents[1]
ONE_PROCESS = SimpleNamespace(num_processes=1, is_main_process=True)


def test_micro_batches_from_worker_processes_are_the_in_process_ones_from_any_step():
    """Pairs of random lengths, length-aware micro-batches: 2 workers give the in-process micro-batches (indices
    and tensors), step by step, also when starting at a later step (a resumed run)."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 30, (40, 2), generator=generator).tolist()
    examples = [{f"{role}_{key}": list(range(n)) for role, n in zip(("chosen", "rejected"), pair)
                 for key in ("input_ids", "labels")} for pair in lengths]
    sampler = StepSampler(len(examples), 3, 2, 1, 2, seed=7, lengths=[padded_length(e) for e in examples])
    collate = partial(collate_pairs, pad_token_id=0)
    in_process = list(step_micro_batches(sampler, examples, collate, 0, 12))
    assert [[indices for indices, _ in step] for step in in_process] == [sampler.micro_batches(s) for s in range(12)]
    for first_step in (0, 5):
        from_workers = list(step_micro_batches(sampler, examples, collate, first_step, 12, num_workers=2))
        assert len(from_workers) == 12 - first_step
        for expected, actual in zip(in_process[first_step:], from_workers):
            assert [indices for indices, _ in expected] == [indices for indices, _ in actual]
            assert all(batch.keys() == other.keys() and all(torch.equal(batch[k], other[k]) for k in batch)
                       for (_, batch), (_, other) in zip(expected, actual))


def test_data_workers_ignore_ctrl_c_and_sigterm_and_leave_them_to_the_main_process():
    """A terminal's Ctrl-C, or a scheduler's SIGTERM, reaches every process of the group: the workers go on building
    micro-batches (the main process stops after the step, run_guard) instead of dying, which would fail the run."""
    import multiprocessing
    import os
    import signal
    import time

    examples = [{"input_ids": [1, 2, 3][:n], "labels": [1, 2, 3][:n]} for n in (1, 2, 3) * 8]
    sampler = StepSampler(len(examples), 2, 1, 0, 2, seed=3)
    collate = partial(data_utils.collate_sft, pad_token_id=0)
    before = {child.pid for child in multiprocessing.active_children()}
    batches = step_micro_batches(sampler, examples, collate, 0, 20, num_workers=2)
    first = next(batches)
    workers = [child for child in multiprocessing.active_children() if child.pid not in before]
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signal.SIGINT)
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)  # a worker that took the signal would be gone by now
    rest = list(batches)
    assert [[i for i, _ in step] for step in [first, *rest]] == [sampler.micro_batches(s) for s in range(20)]


def data_args(tmp_path, **overrides):
    """load_tokenized's flags, on a copy of a demo dataset (which the tests edit)."""
    if not (tmp_path / "safety.json").exists():
        shutil.copy(ROOT / "data" / "demo_safety_sft.json", tmp_path / "safety.json")
    args = dict(dataset_dir=str(tmp_path), dataset=str(tmp_path / "safety.json"), base_dataset=None,
                base_method="none", stage="sft_pg", max_samples=24, cutoff_len=2048, preprocessing_num_workers=1,
                preprocessing_batch_size=1000, template="qwen", enable_thinking=True, strict_data=False, seed=42,
                output_dir=str(tmp_path),
                tokenized_path=str(tmp_path / "tokenized"), overwrite_cache=False)
    return SimpleNamespace(**{**args, **overrides})


def load(args, tokenizer):
    """One run's loading: (examples, fingerprints, log lines)."""
    lines, fingerprints = [], {}
    with tokenized_once(ONE_PROCESS, args, tokenizer, lines.append) as cache:
        examples = load_tokenized(args.dataset, args, tokenizer, ranking=False, log=lines.append,
                                  fingerprints=fingerprints, cache=cache)
    return examples, fingerprints, lines


def test_tokenized_path_is_written_once_read_back_equal_and_rebuilt_on_request(tokenizer, tmp_path):
    args = data_args(tmp_path)
    built, built_fingerprints, lines = load(args, tokenizer)
    assert "read from" not in lines[0] and f"saved to --tokenized_path {args.tokenized_path}" in lines[-1]
    assert not any(p.name.startswith(".tokenized") for p in tmp_path.iterdir())  # the build folder moved into place
    fresh, fresh_fingerprints, _ = load(data_args(tmp_path, tokenized_path=None), tokenizer)
    read, read_fingerprints, lines = load(args, tokenizer)
    assert read == built == fresh and read_fingerprints == built_fingerprints == fresh_fingerprints  # resume's check
    assert lines == [f"dataset {args.dataset} ({args.dataset}): 24 samples [read from --tokenized_path "
                     f"{args.tokenized_path}]"]
    assert "read from" in load(data_args(tmp_path, seed=7), tokenizer)[2][0]  # no num_samples: the seed draws nothing
    # --overwrite_cache True tokenizes again (here from an edited file) and replaces the cache
    rows = json.loads(Path(args.dataset).read_text())
    Path(args.dataset).write_text(json.dumps(rows[1:]))
    rebuilt, _, lines = load(data_args(tmp_path, overwrite_cache=True), tokenizer)
    assert rebuilt == built[1:] + [rebuilt[-1]] and "read from" not in lines[0]
    assert load(args, tokenizer)[0] == rebuilt


@pytest.mark.parametrize("change, message", [
    ("cutoff_len", "was built from cutoff_len 2048 (now 1024); pass --overwrite_cache True to tokenize again"),
    ("file", "was built from data file {dataset} with SHA-256 "),
    ("base_dataset", "was built from base_dataset None (now '{dataset}')"),
])
def test_a_tokenized_path_built_from_other_data_is_refused_by_name(tokenizer, tmp_path, change, message):
    args = data_args(tmp_path)
    load(args, tokenizer)
    if change == "cutoff_len":
        args.cutoff_len = 1024
    elif change == "file":
        Path(args.dataset).write_text(Path(args.dataset).read_text().replace("I can't", "I cannot", 1))
    else:
        args.base_method, args.base_dataset = "orthogonal_projection", args.dataset
    with pytest.raises(DataError) as refused:
        load(args, tokenizer)
    assert message.format(dataset=args.dataset) in str(refused.value)
    assert f"--tokenized_path {args.tokenized_path} " in str(refused.value)


def test_a_damaged_tokenized_path_or_a_folder_that_is_not_one_is_a_one_line_error(tokenizer, tmp_path):
    args = data_args(tmp_path)
    load(args, tokenizer)
    cache = Path(args.tokenized_path)
    arrow = next(cache.rglob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:200])
    with pytest.raises(DataError, match=r"is damaged \(00-.*; pass --overwrite_cache True") as damaged:
        load(args, tokenizer)
    (cache / CACHE_INDEX).write_text("{")
    with pytest.raises(DataError, match=rf"is damaged \({CACHE_INDEX}: ") as broken_index:
        load(args, tokenizer)
    assert all("\n" not in str(e.value) for e in (damaged, broken_index))
    assert load(data_args(tmp_path, overwrite_cache=True), tokenizer)[0] == load(args, tokenizer)[0]
    with pytest.raises(DataError, match="holds no tokenized datasets .* name a new or empty folder"):
        load(data_args(tmp_path, tokenized_path=str(ROOT / "data"), overwrite_cache=True), tokenizer)
    assert (ROOT / "data" / "dataset_info.json").is_file()  # left alone
    (tmp_path / "from_llamafactory").mkdir()
    (tmp_path / "from_llamafactory" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    with pytest.raises(DataError, match="it looks like LLaMA-Factory's, which does not record what it was built from"):
        load(data_args(tmp_path, tokenized_path=str(tmp_path / "from_llamafactory")), tokenizer)


def test_preprocessing_batch_size_is_the_rows_per_worker_batch(tokenizer, monkeypatch):
    import datasets

    conversations = [{"system": None, "turns": [(f"question {i}", f"answer {i}")]} for i in range(2000)]
    template = data_utils.get_template(tokenizer, "qwen")
    sizes = []
    map_ = datasets.Dataset.map
    monkeypatch.setattr(datasets.Dataset, "map", lambda self, *a, **k: sizes.append(k["batch_size"]) or map_(
        self, *a, **k))
    in_workers = tokenize_dataset(conversations, tokenizer, template, 2048, False, num_workers=2, batch_size=7)
    assert sizes == [7] and in_workers == tokenize_dataset(conversations, tokenizer, template, 2048, False)


TWO_RANKS = """
import sys
from types import SimpleNamespace
from accelerate import Accelerator
from transformers import AutoTokenizer
import data_utils
from data_utils import apply_template, load_tokenized, tokenized_once

calls = []
tokenize = data_utils.tokenize_dataset
data_utils.tokenize_dataset = lambda *a, **k: calls.append(1) or tokenize(*a, **k)
accelerator = Accelerator(cpu=True)
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
apply_template(tokenizer, "qwen")
args = SimpleNamespace(dataset_dir="data", dataset="demo_safety_sft,demo_general_a_sft", base_dataset=None,
                       base_method="none", stage="sft_pg", max_samples=16, cutoff_len=2048,
                       preprocessing_num_workers=1, enable_thinking=True,
                       preprocessing_batch_size=1000, template="qwen", strict_data=False, seed=42,
                       output_dir=sys.argv[2], tokenized_path=None, overwrite_cache=False)
fingerprints = {}
with tokenized_once(accelerator, args, tokenizer) as cache:
    load_tokenized(args.dataset, args, tokenizer, ranking=False, log=lambda line: None, fingerprints=fingerprints,
                   cache=cache)
print(f"rank {accelerator.process_index}: tokenized {len(calls)} datasets; fingerprints {sorted(fingerprints.items())}")
"""


def test_under_torchrun_only_the_main_process_tokenizes(tiny_model, tmp_path):
    """Without --tokenized_path: rank 1 reads rank 0's examples (through OUTPUT_DIR, cleaned up afterwards)."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    out = tmp_path / "out"
    out.mkdir()
    result = run_script(script, [tiny_model, out], nproc=2)
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert [line.split(";")[0] for line in lines] == ["rank 0: tokenized 2 datasets", "rank 1: tokenized 0 datasets"], \
        result.stdout[-3000:]
    assert lines[0].split(";")[1] == lines[1].split(";")[1]  # the same examples
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def runs_with_workers(tiny_model, single_runs, tmp_path_factory):
    """The one-process 4-step run (0 workers, shared with test_backends), the same run with 2 data workers writing
    --tokenized_path, and that run resumed from its step-3 checkpoint with 2 workers, reading --tokenized_path."""
    root = tmp_path_factory.mktemp("workers")
    common = dict(per_device_train_batch_size=4, max_steps=4, base_scope="per_param", dataloader_num_workers=2,
                  tokenized_path=root / "tokenized", save_strategy="steps", save_steps=3)
    run_script("train_sft_pg.py", sft_args(tiny_model, root / "workers", **common))
    resumed = root / "resumed"
    shutil.copytree(root / "workers", resumed)
    (resumed / "model.safetensors").unlink()
    result = run_script("train_sft_pg.py", sft_args(tiny_model, resumed, resume_from_checkpoint=True, **common))
    return SimpleNamespace(single=single_runs("sft", "per_param"), workers=root / "workers", resumed=resumed,
                           resumed_output=result.stdout + result.stderr)


def test_data_workers_and_a_resume_reading_tokenized_path_give_the_one_process_weights(runs_with_workers):
    expected = load_weights(runs_with_workers.single)
    for folder in (runs_with_workers.workers, runs_with_workers.resumed):
        actual = load_weights(folder)
        assert all(torch.equal(expected[k], actual[k]) for k in expected), folder  # the same batches: bitwise
    assert runs_with_workers.resumed_output.count("[read from --tokenized_path") == 3  # training + 2 reference sets
