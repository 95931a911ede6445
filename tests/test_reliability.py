"""Nothing silently wrong, nothing lost, one-line errors (issue 13): resume rules, one run per output folder,
SIGTERM, non-finite training, write errors while saving, and the `error: <message>` exit 2 of users' mistakes.

The SIGTERM test runs a real training process, waits until its log shows step 2, freezes it (SIGSTOP) so that it
holds its lock while a second run tries the same folder, then sends SIGTERM and lets it continue: it finishes the
step it is in, writes a checkpoint and exits 143. The resumed run must equal an uninterrupted one bit for bit.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from checkpoint import RESUME_GLOBAL_BATCH, RESUME_MAY_CHANGE, RESUME_MUST_MATCH, RESUME_OGPSA, Checkpointer
from helpers import WEIGHTS_RTOL, load_weights, read_log, run_script, weights_relative_difference
from run_guard import PREEMPTED_EXIT, USER_ERROR_EXIT, UserError, run_main
from test_sft_e2e import sft_args
from train_dpo_pg import add_dpo_flags
from train_utils import build_parser, check_args, quiet_deepspeed_deprecations

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def flags(model, out, **overrides):
    return sft_args(model, out, **{"max_steps": STEPS, "logging_steps": 1, "save_strategy": "steps", "save_steps": 2,
                                   **overrides})


def parse(args):
    return build_parser("", "sft_pg", 1e-5).parse_args(args)


def test_every_flag_is_classified_for_resume():
    """A new flag must be put in one of the resume lists (checkpoint.py), or this fails."""
    parser = add_dpo_flags(build_parser("", "dpo_pg", 1e-6))
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    lists = [RESUME_MAY_CHANGE, RESUME_GLOBAL_BATCH, RESUME_MUST_MATCH]
    assert dests == set().union(*lists), (dests - set().union(*lists), set().union(*lists) - dests)
    assert sum(map(len, lists)) == len(dests)  # no flag in two lists
    assert RESUME_OGPSA <= RESUME_MUST_MATCH


@pytest.fixture(scope="module")
def preempted(tiny_model, tmp_path_factory):
    """An uninterrupted run, and the same run stopped by SIGTERM while a second run tried its folder."""
    root = tmp_path_factory.mktemp("preempted")
    full, out = root / "full", root / "out"
    run_script("train_sft_pg.py", flags(tiny_model, full))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, str(ROOT / "train_sft_pg.py"), *flags(tiny_model, out)], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "trainer_log.jsonl").exists() or not any(r["step"] >= 2 for r in read_log(out)):
        assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # holds its lock, mid-run
    second = run_script("train_sft_pg.py", flags(tiny_model, out, overwrite_output_dir=True), expect_ok=False)
    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGCONT)
    first_output = first.communicate(timeout=300)[0]
    return SimpleNamespace(full=full, out=out, first=first, first_output=first_output, second=second)


def model_of(preempted):
    return json.loads((preempted.out / "training_args.json").read_text())["model_name_or_path"]


def test_a_second_run_into_the_same_folder_stops_and_names_the_first(preempted):
    second = preempted.second
    assert second.returncode == USER_ERROR_EXIT, second.stderr[-3000:]
    assert f"is in use by another run (host {socket.gethostname()}, pid {preempted.first.pid}, started" in \
        second.stderr
    assert "Traceback" not in second.stderr and "training:" not in second.stderr  # stopped before training
    assert (preempted.out / "checkpoint-2").is_dir()  # and removed nothing despite --overwrite_output_dir
    # Once the first run has ended (here by SIGTERM), its lock is gone although run.lock stays.
    assert preempted.first.returncode is not None and (preempted.out / "run.lock").exists()
    take_lock = f"from run_guard import hold_output_dir; hold_output_dir({str(preempted.out)!r})"
    subprocess.run([sys.executable, "-c", take_lock], cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_sigterm_writes_a_checkpoint_and_resuming_is_bit_identical(preempted, tmp_path):
    first, out = preempted.first, preempted.out
    assert first.returncode == PREEMPTED_EXIT, preempted.first_output[-3000:]
    stopped = int(preempted.first_output.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 3 <= stopped < STEPS and "--resume_from_checkpoint True" in preempted.first_output
    assert (out / f"checkpoint-{stopped}" / "optimizer.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # the run did not finish
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    run_script("train_sft_pg.py", flags(model_of(preempted), resumed, resume_from_checkpoint="True"))
    expected, actual = load_weights(preempted.full), load_weights(resumed)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    timeless = [[{k: v for k, v in r.items() if k not in ("elapsed_s", "refresh_s")} for r in read_log(folder)]
                for folder in (preempted.full, resumed)]
    assert timeless[0] == timeless[1] and len(timeless[0]) == STEPS
    # train_loss is the mean over all steps (logging every step: of the logged losses), also across the resume
    results = [json.loads(Path(folder, "train_results.json").read_text()) for folder in (preempted.full, resumed)]
    mean = sum(r["loss"] for r in read_log(preempted.full)) / STEPS
    assert results[0]["train_loss"] == results[1]["train_loss"] == pytest.approx(mean, rel=1e-12)  # float64 sums


def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step(preempted, tmp_path):
    """Two processes under torchrun; only rank 1 gets SIGTERM. Both must stop after the same step and write one
    checkpoint together (else rank 0 would wait in the next collective); resuming it ends where one process does."""
    out = tmp_path / "two"
    two = flags(model_of(preempted), out, per_device_train_batch_size=2)  # the global batch of the one-process run
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    port = str(29500 + (os.getpid() + 7) % 1000)
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", port, str(ROOT / "train_sft_pg.py"), *two], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "trainer_log.jsonl").exists() or not any(r["step"] >= 2 for r in read_log(out)):
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[0][-3000:]
        time.sleep(0.05)
    rank0 = int((out / "run.lock").read_text().split("pid ")[1].split(",")[0])
    workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    rank1 = [int(pid) for pid in workers if int(pid) != rank0]
    assert len(rank1) == 1, workers
    os.kill(rank1[0], signal.SIGTERM)
    output = launcher.communicate(timeout=300)[0]
    assert launcher.returncode != 0 and output.count("stopped by SIGTERM after step ") == 1, output[-3000:]
    stopped = int(output.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert sorted(p.name for p in (out / f"checkpoint-{stopped}").glob("rng_state_*.json")) == \
        ["rng_state_0.json", "rng_state_1.json"]
    run_script("train_sft_pg.py", two + ["--resume_from_checkpoint", "True"], nproc=2)
    assert weights_relative_difference(load_weights(preempted.full), load_weights(out)) <= WEIGHTS_RTOL


@pytest.mark.parametrize("changes, listed", [
    ({"base_scope": "global"}, ["--base_scope per_param -> global"]),
    ({"base_directions": 2, "base_dtype": "bfloat16", "base_method": "threshold"},
     ["--base_directions 1 -> 2", "--base_dtype float32 -> bfloat16", "--base_method orthogonal_projection -> "
                                                                       "threshold"]),
    ({"learning_rate": 2e-3, "max_steps": 20}, ["--learning_rate 0.001 -> 0.002", f"--max_steps {STEPS} -> 20"]),
    ({"warmup_ratio": 0.1, "seed": 1, "cutoff_len": 64}, ["--cutoff_len 2048 -> 64", "--seed 42 -> 1",
                                                          "--warmup_ratio 0.0 -> 0.1"]),
])
def test_resume_with_settings_that_change_the_result_is_refused(preempted, changes, listed):
    model = model_of(preempted)
    checkpoint = sorted(preempted.out.glob("checkpoint-*"))[0]
    with pytest.raises(UserError) as refused:
        check_args(parse(flags(model, preempted.out, resume_from_checkpoint=checkpoint, **changes)), "sft_pg")
    message = str(refused.value)
    assert message.count("->") == len(listed) and all(item in message for item in listed), message
    assert f"start a new run from the checkpoint's model: --model_name_or_path {checkpoint}" in message
    assert ("the saved basis was built with the old value" in message) == any(k.startswith("base_") for k in changes)


def test_resume_may_change_logging_saving_and_output_flags(preempted, tmp_path):
    model = model_of(preempted)
    checkpoint = sorted(preempted.out.glob("checkpoint-*"))[0]
    args = check_args(parse(flags(model, tmp_path / "elsewhere", resume_from_checkpoint=checkpoint, logging_steps=5,
                                  save_steps=4, save_total_limit=2, plot_loss=True, per_device_train_batch_size=8,
                                  gradient_accumulation_steps=1)), "sft_pg")  # the same global batch
    assert args.resume_from_checkpoint == str(checkpoint)


def test_non_finite_training_stops_before_saving_anything_from_that_step(tiny_model, tmp_path):
    """A finite but absurd learning rate: step 1 is finite (and checkpointed), step 2's loss is not."""
    result = run_script("train_sft_pg.py", flags(tiny_model, tmp_path, learning_rate=1e30, optim="sgd",
                                                 save_steps=1), expect_ok=False)
    assert result.returncode == USER_ERROR_EXIT and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr.split("error: ")[1]
    assert message.startswith("non-finite training at step 2: loss nan") and "learning rate too high" in message
    assert f"the last checkpoint is {tmp_path / 'checkpoint-1'}" in message
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert not (tmp_path / "model.safetensors").exists()
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "checkpoint-1" / "model.safetensors").values())
    assert [r["step"] for r in read_log(tmp_path)] == [1]


class FakeAccelerator(SimpleNamespace):
    """One process, as Checkpointer sees it."""

    is_main_process, process_index, num_processes = True, 0, 1

    def wait_for_everyone(self):
        pass

    def get_state_dict(self, model):
        return model.state_dict()

    def unwrap_model(self, model):
        return model


def test_a_write_error_while_saving_keeps_the_previous_checkpoints_and_names_the_path(tiny_model, tmp_path,
                                                                                      monkeypatch):
    import checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    args = parse(flags(tiny_model, tmp_path))
    optimizer = torch.optim.AdamW(model.parameters())
    backend = SimpleNamespace(grad_slice=SimpleNamespace(sharded=False), optimizer_state=optimizer.state_dict)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    saver = Checkpointer(args, FakeAccelerator(), model, AutoTokenizer.from_pretrained(tiny_model), backend,
                         scheduler, None)
    saver.save(2, {"metric_totals": {}})
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-2").iterdir()}

    real_save_file = checkpoint.save_file

    def full_disk(tensors, filename, *a, **kw):  # half the file is written, then the disk is full
        real_save_file(tensors, filename, *a, **kw)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[:len(data) // 2])
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(UserError) as failed:
        saver.save(4, {"metric_totals": {}})
    message = str(failed.value)
    assert f"writing checkpoint {tmp_path / 'checkpoint-4'} failed" in message
    assert "No space left on device" in message and str(tmp_path / ".partial-checkpoint-4") in message
    assert f"newest: {tmp_path / 'checkpoint-2'}" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # the partial folder is gone
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-2").iterdir()} == before
    checkpoint.verify_checkpoint(tmp_path / "checkpoint-2")  # every file of it still opens


def corrupt_latest(preempted, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(preempted.out, out)
    found = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    data = (found[-1] / "model.safetensors").read_bytes()
    (found[-1] / "model.safetensors").write_bytes(data[:len(data) // 3])  # truncated, as a crash or full disk leaves
    return out, {"resume_from_checkpoint": found[-1]}, [f"checkpoint file {found[-1] / 'model.safetensors'} is "
                                                        f"damaged", f"use the previous checkpoint {found[-2]}"]


def no_weights(preempted, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_of(preempted), folder)
    (folder / "model.safetensors").unlink()
    return tmp_path / "out", {"model_name_or_path": folder}, [f"model {folder}: the folder has a config.json but "
                                                              "no weights"]


def bad_row(preempted, tmp_path):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"instruction": "hi", "output": "ok"}, {"instruction": "hi", "output": 3}]))
    return tmp_path / "out", {"dataset": data}, [str(data), "row 2", "output"]


ONE_LINE_ERRORS = {
    "infinite learning rate": lambda p, t: (t, {"learning_rate": "inf"},
                                            ["argument --learning_rate: must be finite and > 0, got inf"]),
    "missing model folder": lambda p, t: (t, {"model_name_or_path": t / "no-model"},
                                          [f"model {t / 'no-model'}: no such folder"]),
    "model folder without weights": no_weights,
    "hub id, offline": lambda p, t: (t, {"model_name_or_path": "nobody/no-such-model"},
                                     ["cannot load the tokenizer nobody/no-such-model: no such local folder, and not "
                                      "loadable from the hub"]),
    "unknown dataset": lambda p, t: (t, {"dataset": "no_such_set"}, ["unknown dataset 'no_such_set'"]),
    "bad data row": bad_row,
    "missing DeepSpeed config": lambda p, t: (t, {"deepspeed": t / "ds.json"}, [f"--deepspeed {t / 'ds.json'}: no "
                                                                                 "such file"]),
    "corrupted checkpoint": corrupt_latest,
    "resume with another base_scope": lambda p, t: (p.out, {"resume_from_checkpoint": "True", "base_scope": "global"},
                                                    ["--base_scope per_param -> global"]),
}


@pytest.mark.parametrize("case", ONE_LINE_ERRORS)
def test_users_mistakes_are_one_line_errors_with_exit_code_2(preempted, tmp_path, case):
    out, overrides, expected = ONE_LINE_ERRORS[case](preempted, tmp_path)
    model = model_of(preempted)
    result = run_script("train_sft_pg.py", flags(model, out, **overrides), expect_ok=False)
    assert result.returncode == USER_ERROR_EXIT, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert all(item in lines[0] for item in expected), lines[0]


@pytest.mark.parametrize("flag, value, requirement", [
    ("--cutoff_len", "1", "must be >= 2"), ("--per_device_train_batch_size", "0", "must be >= 1"),
    ("--gradient_accumulation_steps", "0", "must be >= 1"), ("--learning_rate", "nan", "finite and > 0"),
    ("--learning_rate", "-1e-3", "finite and > 0"), ("--warmup_ratio", "1", "in [0, 1)"),
    ("--max_steps", "0", ">= 1, or -1"), ("--base_directions", "0", "must be >= 1"),
    ("--max_grad_norm", "inf", "finite and >= 0"), ("--save_steps", "0", "must be >= 1"),
    ("--learning_rate", "fast", "invalid float value"),
])
def test_numeric_flags_are_checked_while_parsing(tmp_path, flag, value, requirement):
    with pytest.raises(UserError, match=f"argument {flag}: .*{re.escape(requirement)}"):
        parse(flags("model", tmp_path) + [f"{flag}={value}"])


def test_unexpected_errors_keep_their_traceback(capsys):
    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_main(bug)

    def mistake():
        raise UserError("a mistake")

    with pytest.raises(SystemExit) as stopped:
        run_main(mistake)
    assert stopped.value.code == USER_ERROR_EXIT and capsys.readouterr().err == "error: a mistake\n"


def test_only_torchs_deprecation_of_deepspeeds_collectives_is_hidden():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_deepspeed_deprecations()
        for name in ("reduce_scatter_tensor", "all_gather_into_tensor", "all_reduce"):
            warnings.warn(f"`torch.distributed.{name}` is deprecated. Please use `x` instead.", FutureWarning,
                          stacklevel=1)
    assert [str(w.message) for w in caught] == ["`torch.distributed.all_reduce` is deprecated. Please use `x` "
                                                "instead."]


def test_deepspeeds_first_op_build_is_announced(tmp_path, monkeypatch, capsys):
    """An empty extensions cache: each op this run would compile is announced; a built one is not."""
    from train_utils import announce_deepspeed_builds

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    announce_deepspeed_builds({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    out = capsys.readouterr().out
    assert "building DeepSpeed's cpu_adam op once (about a minute" in out
    assert ("deepspeed_shm_comm" in out) == (not torch.cuda.is_available())
    (tmp_path / "cpu_adam").mkdir(exist_ok=True)  # the check made it
    (tmp_path / "cpu_adam" / "cpu_adam.so").touch()
    announce_deepspeed_builds({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    assert "cpu_adam" not in capsys.readouterr().out
