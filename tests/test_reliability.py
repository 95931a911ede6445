"""Nothing silently wrong, nothing lost, one-line errors (issues 13 and 22): resume rules (flags and data), one run
per output folder and no run over an earlier one or over its own model, SIGTERM and Ctrl-C, non-finite training,
write errors while saving, file modes, what a run prints, and the `error: <message>` exit 2 of users' mistakes
(also under torchrun).

The SIGTERM test runs a real training process, waits until its log shows step 2, freezes it (SIGSTOP) so that it
holds its lock while a second run tries the same folder, then sends SIGTERM and lets it continue: it finishes the
step it is in, writes a checkpoint and exits 143. The resumed run must equal an uninterrupted one bit for bit.
Ctrl-C takes the same path (checked to the checkpoint it writes).
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

from arguments import SCHEDULERS, build_parser, check_args
from checkpoint import RESUME_GLOBAL_BATCH, RESUME_MAY_CHANGE, RESUME_MUST_MATCH, RESUME_OGPSA, Checkpointer
from data_utils import DataError
from helpers import WEIGHTS_RTOL, load_weights, read_log, run_script, weights_relative_difference
from run_guard import INTERRUPTED_EXIT, PREEMPTED_EXIT, USER_ERROR_EXIT, UserError, run_main
from test_dpo import dpo_args
from test_sft_e2e import sft_args
from train_dpo_pg import add_dpo_flags
from train_utils import quiet_deepspeed_deprecations

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
    dests = {a.dest for a in parser._actions if a.dest != "help"} | {"config_file", "config_overrides"}  # recorded too
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
    backend = SimpleNamespace(grad_slice=SimpleNamespace(sharded=False), optimizer_state=optimizer.state_dict,
                              engine_name="one process or DDP")
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
    return tmp_path / "out", {"model_name_or_path": folder}, [f"--model_name_or_path {folder}: the folder has a "
                                                              "config.json but no weights"]


def truncated_weights(preempted, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_of(preempted), folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])  # as an interrupted copy leaves it
    return tmp_path / "out", {"model_name_or_path": folder}, [
        f"--model_name_or_path {folder}: the weights file {folder / 'model.safetensors'} is damaged"]


def finished_run_in_output_dir(preempted, tmp_path):
    """A folder holding a finished run without checkpoints (the default --save_steps 500 with fewer steps)."""
    out = tmp_path / "out"
    shutil.copytree(preempted.full, out, ignore=shutil.ignore_patterns("checkpoint-*"))
    return out, {}, [f"{out} is not empty (it holds ", "Pass --overwrite_output_dir True"]


def output_dir_is_the_model(preempted, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(model_of(preempted), model)
    return model, {"model_name_or_path": model, "overwrite_output_dir": True}, [
        f"--output_dir {model} is the folder of --model_name_or_path {model}: the run would write over"]


def bad_row(preempted, tmp_path):
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"instruction": "hi", "output": "ok"}, {"instruction": "hi", "output": 3}]))
    return tmp_path / "out", {"dataset": data}, [str(data), "row 2", "output"]


ONE_LINE_ERRORS = {
    "infinite learning rate": lambda p, t: (t, {"learning_rate": "inf"},
                                            ["argument --learning_rate: must be finite and > 0, got inf"]),
    "missing model folder": lambda p, t: (t, {"model_name_or_path": t / "no-model"},
                                          [f"--model_name_or_path {t / 'no-model'}: no such folder"]),
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
    "resume from a folder that does not exist": lambda p, t: (t, {"resume_from_checkpoint": t / "nowhere"},
                                                              [f"--resume_from_checkpoint {t / 'nowhere'}: no such "
                                                               "folder"]),
    "truncated model weights": truncated_weights,
    "a finished run in the output folder": finished_run_in_output_dir,
    "output folder is the model": output_dir_is_the_model,
    # refused after the data is read, before the model loads
    "no trainable token": lambda p, t: (t, {"cutoff_len": 3}, ["dataset 'demo_safety_sft' (data/demo_safety_sft.json) "
                                                               "has no trainable token: --cutoff_len 3 cuts every "
                                                               "response away"]),
}


@pytest.mark.parametrize("case", ONE_LINE_ERRORS)
def test_users_mistakes_are_one_line_errors_with_exit_code_2(preempted, tmp_path, case):
    out, overrides, expected = ONE_LINE_ERRORS[case](preempted, tmp_path)
    model = model_of(preempted)
    before = {p: p.read_bytes() for p in Path(out).rglob("*") if p.is_file() and p.name != "run.lock"} \
        if Path(out).is_dir() else {}
    result = run_script("train_sft_pg.py", flags(model, out, **overrides), expect_ok=False)
    assert result.returncode == USER_ERROR_EXIT, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert all(item in lines[0] for item in expected), lines[0]
    assert "steps per epoch" not in result.stdout  # stopped before the model loaded
    assert all(p.read_bytes() == data for p, data in before.items())  # and lost nothing


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


# ---------------------------------------------------------------------------------------------------------------
# Issue 22: output folders, data on resume, untrainable data, flags that could not be honoured, torchrun, Ctrl-C,
# file modes and what a run prints
# ---------------------------------------------------------------------------------------------------------------

def script_env(umask):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    return env, lambda: os.umask(umask)


def modes(folder):
    """{path: permission bits} of a folder and everything in it."""
    return {path: path.stat().st_mode & 0o777 for path in [Path(folder), *Path(folder).rglob("*")]}


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 and the plot, under umask 022, on a copy of the training data
    (which a test edits before resuming)."""
    root = tmp_path_factory.mktemp("finished")
    data = root / "safety.json"
    shutil.copy(ROOT / "data" / "demo_safety_sft.json", data)
    args = flags(tiny_model, root / "out", dataset=data, max_steps=4, plot_loss=True)
    env, umask = script_env(0o022)
    result = subprocess.run([sys.executable, str(ROOT / "train_sft_pg.py"), *args], cwd=ROOT, env=env,
                            preexec_fn=umask, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(out=root / "out", data=data, args=args, result=result)


def test_saved_files_and_folders_follow_the_umask(finished):
    """safetensors writes through a private temporary file (0600); everything must get what a plain write gets."""
    found = modes(finished.out)
    assert any(p.name == "model.safetensors" for p in found) and any(p.name == "checkpoint-2" for p in found)
    assert {path: mode for path, mode in found.items() if mode != (0o755 if path.is_dir() else 0o644)} == {}


def test_a_finished_run_ends_with_where_its_model_is_and_prints_no_library_noise(finished):
    out = finished.out
    lines = [line for line in finished.result.stdout.splitlines() if line.strip()]
    assert lines[-1] == f"done: the model is in {out}; loss curve: {out / 'training_loss.png'}", lines[-3:]
    output = finished.result.stdout + finished.result.stderr
    for noise in ("Setting accelerator to CPU", "Loading weights", "Writing model shards"):
        assert noise not in output


def test_the_final_line_names_the_adapter_and_the_merged_model(tmp_path, capsys):
    from train_utils import MetricLog

    args = SimpleNamespace(output_dir=str(tmp_path), finetuning_type="lora", export_merged=True, plot_loss=False)
    accelerator = FakeAccelerator(device=torch.device("cpu"), print=print, log=lambda *a, **k: None)
    log = MetricLog(accelerator, args, total_steps=1, start_step=0)
    log.flush(1, {})
    log.finish(1)
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"done: the adapter is in {tmp_path}, merged into the model in {tmp_path / 'merged'}"


def test_a_new_run_refuses_an_output_folder_with_anything_but_its_lock(tiny_model, tmp_path):
    out = tmp_path / "out"
    check_args(parse(flags(tiny_model, out)), "sft_pg")  # no folder yet
    out.mkdir()
    (out / "run.lock").write_text("host h, pid 1, started earlier\n")  # left by an ended run: fine
    check_args(parse(flags(tiny_model, out)), "sft_pg")
    (out / "trainer_log.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match=f"{re.escape(str(out))} is not empty \\(it holds trainer_log.jsonl\\)"):
        check_args(parse(flags(tiny_model, out)), "sft_pg")
    check_args(parse(flags(tiny_model, out, overwrite_output_dir=True)), "sft_pg")


@pytest.mark.parametrize("flag", ["model_name_or_path", "ref_model", "adapter_name_or_path"])
@pytest.mark.parametrize("where", ["is", "lies inside", "holds"])
def test_the_output_folder_may_not_be_inside_or_hold_a_model_the_run_reads(tiny_model, tmp_path, flag, where):
    folder = tmp_path / "read"
    folder.mkdir()
    out = {"is": folder, "lies inside": folder / "out", "holds": tmp_path}[where]
    overrides = {flag: folder, "overwrite_output_dir": True}
    if flag == "adapter_name_or_path":
        overrides["finetuning_type"] = "lora"
    parser = add_dpo_flags(build_parser("", "dpo_pg", 1e-6))
    with pytest.raises(UserError, match=f"--output_dir {re.escape(str(out))} {where} the folder of --{flag} "
                                        f"{re.escape(str(folder))}: the run would write over what it reads"):
        parser.parse_args(dpo_args(tiny_model, out, **overrides))


def test_data_fingerprints_count_the_tokenized_examples_in_order(tokenizer, tmp_path):
    """What counts: the token ids and labels of the examples the run reads, in order. Rows beyond --max_samples do
    not count; an edited or a moved row within them does."""
    from data_utils import load_tokenized

    rows = json.loads((ROOT / "data" / "demo_safety_sft.json").read_text())[:12]
    variants = {"same": rows, "appended": rows + [{"instruction": "new", "output": "row"}],
                "edited": rows[:3] + [{**rows[3], "output": rows[3]["output"] + "!"}] + rows[4:],
                "reordered": [rows[1], rows[0], *rows[2:]]}
    prints = {}
    for name, content in variants.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
        args = SimpleNamespace(dataset_dir="data", max_samples=12, cutoff_len=2048, preprocessing_num_workers=1,
                               enable_thinking=True,
                               template="qwen", strict_data=False, seed=42, preprocessing_batch_size=1000)
        found = {}
        load_tokenized(str(tmp_path / f"{name}.json"), args, tokenizer, False, log=lambda *_: None,
                       fingerprints=found)
        prints[name] = found[str(tmp_path / f"{name}.json")]
    assert prints["appended"] == prints["same"]
    assert len({prints["same"], prints["edited"], prints["reordered"]}) == 3


def test_resuming_after_the_data_changed_is_refused_naming_the_dataset(finished, tmp_path):
    state = json.loads((finished.out / "checkpoint-2" / "trainer_state.json").read_text())
    assert sorted(state["data_fingerprints"]) == sorted([str(finished.data), "demo_general_a_sft",
                                                         "demo_general_b_sft"])
    out = tmp_path / "out"
    shutil.copytree(finished.out, out)
    shutil.rmtree(out / "checkpoint-4")
    rows = json.loads(finished.data.read_text())
    rows[5]["output"] = "edited between the run and the resume"
    finished.data.write_text(json.dumps(rows))
    args = finished.args[:finished.args.index("--output_dir")] + ["--output_dir", str(out)] + \
        finished.args[finished.args.index("--output_dir") + 2:] + ["--resume_from_checkpoint", "True"]
    result = run_script("train_sft_pg.py", args, expect_ok=False)
    assert result.returncode == USER_ERROR_EXIT and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: cannot resume from {out / 'checkpoint-2'}: dataset '{finished.data}' changed since the " \
        "checkpoint was written" in result.stderr
    assert "steps per epoch" not in result.stdout  # before the model loaded


def test_a_checkpoint_without_fingerprints_resumes_with_a_warning(tmp_path):
    from checkpoint import check_data_unchanged

    (tmp_path / "trainer_state.json").write_text(json.dumps({"args": {}}))
    said = []
    check_data_unchanged(tmp_path, {"a": "1"}, said.append)
    assert len(said) == 1 and said[0].startswith(f"warning: {tmp_path} holds no fingerprint of its data")
    (tmp_path / "trainer_state.json").write_text(json.dumps({"args": {}, "data_fingerprints": {"a": "1", "b": "2"}}))
    check_data_unchanged(tmp_path, {"a": "1", "b": "2"}, said.append)
    with pytest.raises(UserError, match="datasets 'a', 'b' changed"):
        check_data_unchanged(tmp_path, {"a": "0", "b": "0"}, said.append)
    assert len(said) == 1


def test_data_without_a_trainable_token_is_refused_naming_the_dataset(tokenizer):
    from data_utils import load_tokenized

    for name, ranking, cutoff in [("demo_safety_sft", False, 3), ("demo_safety_dpo", True, 2)]:  # 3 leaves pairs 1
        args = SimpleNamespace(dataset_dir="data", max_samples=8, cutoff_len=cutoff, preprocessing_num_workers=1,
                               enable_thinking=True,
                               template="qwen", strict_data=False, seed=42, preprocessing_batch_size=1000)
        with pytest.raises(DataError, match=f"dataset '{name}' .* has no trainable token: --cutoff_len {cutoff} cuts "
                                            "every response away"):
            load_tokenized(name, args, tokenizer, ranking, log=lambda *_: None)


def test_each_reference_direction_needs_a_trainable_token_and_enough_samples():
    from ogpsa_core import ReferenceSet
    from train_utils import check_reference_sets

    examples = [{"num_targets": 0}] * 3 + [{"num_targets": 5}] * 3
    ref = ReferenceSet("ref", examples, None, None, lambda e: e["num_targets"])
    args = SimpleNamespace(base_num_samples=6, base_directions=1, cutoff_len=16)
    check_reference_sets([ref], args)  # one direction over all six samples
    with pytest.raises(UserError, match=r"reference set 'ref' has no trainable token in direction 1 of 2 \(samples "
                                        r"1-3\): --cutoff_len 16 cuts all their responses away"):
        check_reference_sets([ref], SimpleNamespace(base_num_samples=6, base_directions=2, cutoff_len=16))
    with pytest.raises(UserError, match="reference set 'ref': --base_directions 7 needs at least that many"):
        check_reference_sets([ref], SimpleNamespace(base_num_samples=200, base_directions=7, cutoff_len=16))
    with pytest.raises(UserError, match="--base_directions 5 needs at least that many reference samples per set, "
                                        "but --base_num_samples is 4"):
        check_args(parse(flags("model", "out", base_num_samples=4, base_directions=5)), "sft_pg")


def test_a_reference_chunk_without_units_gives_a_zero_direction_not_a_division_by_zero():
    """ogpsa_core itself: a chunk whose samples have no unit (all masked) adds nothing; the other direction is the
    mean gradient of its chunk, as plain autograd gives it."""
    from contextlib import nullcontext

    from backends import Backend
    from ogpsa_core import Projector, ReferenceGradients, ReferenceSet

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    accelerator = SimpleNamespace(backward=lambda loss: loss.backward(), no_sync=lambda m: nullcontext())
    backend = Backend(accelerator, model, torch.optim.SGD(model.parameters(), lr=0.1))
    examples = [{"x": torch.randn(3), "units": units} for units in (0, 0, 2, 1)]

    def loss_sum(model_, batch):  # a sample's loss counts only where it has units, as masked labels do
        return (model_(batch["x"]).squeeze(-1) ** 2 * batch["units"]).sum()

    ref = ReferenceSet("ref", examples, lambda b: {"x": torch.stack([e["x"] for e in b]),
                                                   "units": torch.tensor([float(e["units"]) for e in b])},
                       loss_sum, lambda e: e["units"])
    directions = []
    projector = Projector(backend.grad_slice, scope="global")
    projector.set_directions_ = lambda d, step: directions.append(d.clone())
    ReferenceGradients([ref], 4, 2, 4).refresh(projector, backend, model, 0, torch.device("cpu"))
    model.zero_grad()
    (loss_sum(model, ref.collate(examples[2:])) / 3).backward()
    assert torch.equal(directions[0][0], torch.zeros(3))
    assert torch.allclose(directions[0][1], model.weight.grad.flatten(), rtol=1e-6)  # float32, 2 terms


def test_a_tracker_that_is_not_installed_is_refused(monkeypatch):
    import accelerate.utils

    for installed in (False, True):
        monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda installed=installed: installed)
        monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
        with pytest.raises(UserError, match=r"--report_to wandb: the wandb package is not installed, so nothing "
                                            r"would be reported; pip install wandb"):
            check_args(parse(flags("model", "out", report_to="wandb")), "sft_pg")
        if installed:
            assert check_args(parse(flags("model", "out", report_to="all")), "sft_pg").report_to == "tensorboard"
            continue
        with pytest.raises(UserError, match="--report_to tensorboard: the tensorboard package is not installed"):
            check_args(parse(flags("model", "out", report_to="tensorboard")), "sft_pg")
        with pytest.raises(UserError, match="--report_to all: none of tensorboard, wandb is installed"):
            check_args(parse(flags("model", "out", report_to="all")), "sft_pg")


def test_flash_attention_without_its_package_is_refused_with_the_flags(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn"
                        else real_find_spec(name, *a))
    with pytest.raises(UserError, match="--flash_attn fa2 needs the flash-attn package, which is not installed"):
        check_args(parse(flags("model", "out", flash_attn="fa2")), "sft_pg")


SCHEDULE_SETTINGS = {"cosine_with_min_lr": {"min_lr_rate": 0.1},
                     "warmup_stable_decay": {"num_decay_steps": 4, "min_lr_ratio": 0.2}}
# The factor of the peak rate after the last of 10 steps without warm-up: 0 or the floor for the decaying schedules
# (polynomial: lr_end 1e-7), 1 for the constant ones; inverse_sqrt: 1 / sqrt((10 + timescale) / timescale) with
# transformers' default timescale 10_000.
LAST_FACTOR = {"linear": 0.0, "cosine": 0.0, "cosine_with_restarts": 0.0, "polynomial": 1e-7 / 1e-3, "constant": 1.0,
               "constant_with_warmup": 1.0, "inverse_sqrt": (10_010 / 10_000) ** -0.5, "cosine_with_min_lr": 0.1,
               "warmup_stable_decay": 0.2}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_listed_schedule_runs(name):
    """Each --lr_scheduler_type choice, with the settings it needs, builds and ends at its closed-form rate."""
    from train_utils import build_scheduler

    kwargs = SCHEDULE_SETTINGS.get(name)
    args = check_args(parse(flags("model", "out", lr_scheduler_type=name,
                                  lr_scheduler_kwargs=json.dumps(kwargs) if kwargs else None)), "sft_pg")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    scheduler = build_scheduler(optimizer, args, total_steps=10)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-3 * LAST_FACTOR[name], abs=1e-12)


@pytest.mark.parametrize("name, settings, message", [
    ("cosine_with_min_lr", None, "--lr_scheduler_type cosine_with_min_lr needs --lr_scheduler_kwargs with min_lr or "
                                 "min_lr_rate"),
    ("warmup_stable_decay", None, "needs --lr_scheduler_kwargs with num_decay_steps"),
    ("warmup_stable_decay", '{"decay_type": "linear"}', "needs --lr_scheduler_kwargs with num_decay_steps"),
    ("cosine_with_min_lr", '{"min_lr_ratio": 0.1}', "'min_lr_ratio' is not a setting of --lr_scheduler_type "
                                                    "cosine_with_min_lr \\(its settings: num_cycles, min_lr, "
                                                    "min_lr_rate\\)"),
    ("cosine_with_min_lr", '{"min_lr": 1e-5, "min_lr_rate": 0.1}', "Only one of min_lr or min_lr_rate"),
    ("warmup_stable_decay", '{"num_decay_steps": 4, "decay_type": "sideways"}', "Unknown decay type: sideways"),
    ("linear", '{"num_training_steps": 5}', "num_training_steps is set by --max_steps or --num_train_epochs"),
    ("constant", '{"num_cycles": 2}', "'num_cycles' is not a setting of --lr_scheduler_type constant \\(its "
                                      "settings: none\\)"),
    ("cosine", "[0.1]", "argument --lr_scheduler_kwargs: must be a JSON object"),
])
def test_wrong_schedule_settings_are_refused_by_name(name, settings, message):
    with pytest.raises(UserError, match=message):
        check_args(parse(flags("model", "out", lr_scheduler_type=name, lr_scheduler_kwargs=settings)), "sft_pg")


@pytest.mark.parametrize("config, message", [
    ({"fp16": {"enabled": True}}, "fp16.enabled is not supported"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage 4"),
    ({"zero_optimization": {"stage": 0}, "fp16": {"enabled": True}}, "fp16.enabled is not supported"),
    ({"optimizer": {"type": "AdamW"}}, "has a 'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR"}}, "has a 'scheduler' section"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme"}}}, "offload_optimizer.device nvme"),
    ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}, "zero_quantized_weights \\(ZeRO\\+\\+\\)"),
    ({"train_micro_batch_size_per_gpu": 3}, "train_micro_batch_size_per_gpu=3 but --per_device_train_batch_size "
                                            "gives 8"),
])
def test_deepspeed_config_mistakes_are_refused_before_deepspeed_starts(tmp_path, monkeypatch, config, message):
    """Read with the file, before the Accelerator (and DeepSpeed) starts: no engine is needed to see these."""
    from train_utils import deepspeed_file_config

    monkeypatch.setenv("WORLD_SIZE", "1")
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **config}))
    args = parse(flags("model", "out", deepspeed=path, per_device_train_batch_size=8))
    with pytest.raises(SystemExit, match=message):
        deepspeed_file_config(args)
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"zero_optimization": {"stage": 2}}).encode())  # with a BOM
    assert deepspeed_file_config(args)[1] == 2


def test_misleading_messages_now_say_what_is_wrong(tiny_model, tmp_path):
    from data_utils import resolve_dataset

    with pytest.raises(DataError, match=f"--dataset_dir {re.escape(str(tmp_path))} has no dataset_info.json"):
        resolve_dataset("my_set", tmp_path)
    with pytest.raises(DataError, match=f"--dataset_dir {re.escape(str(tmp_path / 'no'))} does not exist"):
        resolve_dataset("my_set", tmp_path / "no")
    from train_utils import load_model

    parser = add_dpo_flags(build_parser("", "dpo_pg", 1e-6))
    args = check_args(parser.parse_args(dpo_args(tiny_model, tmp_path / "out", ref_model=tmp_path / "ref")), "dpo_pg")
    with pytest.raises(UserError, match=f"--ref_model {re.escape(str(tmp_path / 'ref'))}: no such folder"):
        load_model(args.ref_model, args)


def test_openai_style_messages_without_tags_say_how_to_set_the_tags(tmp_path):
    from data_utils import load_conversations

    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    (tmp_path / "chat.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"chat": {"file_name": "chat.json",
                                                                     "formatting": "sharegpt",
                                                                     "columns": {"messages": "messages"}}}))
    _, conversations, notes = load_conversations("chat", tmp_path, ranking=False)
    assert conversations == [] and len(notes) == 1
    assert '"tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user"' in next(iter(notes))
    with pytest.raises(DataError, match="row 1, field 'messages': message 0 has OpenAI-style 'role' and 'content' "
                                        "keys, not 'from': give the dataset's entry in dataset_info.json \"tags\""):
        load_conversations("chat", tmp_path, ranking=False, strict=True)


def test_a_refused_lora_resume_suggests_flags_that_work(tiny_model, tmp_path):
    """The suggestion for a LoRA checkpoint (which holds an adapter, not a model) is accepted as it stands."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from checkpoint import json_safe

    out = tmp_path / "out"
    checkpoint = out / "checkpoint-2"
    lora = flags(tiny_model, out, finetuning_type="lora")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=8, lora_alpha=16,
                                                                                      target_modules="all-linear"))
    saved = check_args(parse(lora), "sft_pg")  # the flags the checkpoint was written with
    model.save_pretrained(checkpoint, save_embedding_layers=False)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"args": json_safe(vars(saved))}))
    with pytest.raises(UserError) as refused:
        check_args(parse(lora + ["--resume_from_checkpoint", str(checkpoint), "--learning_rate", "1e-2"]), "sft_pg")
    suggestion = f"--adapter_name_or_path {checkpoint} with --model_name_or_path {tiny_model}"
    assert f"start a new run from the checkpoint's adapter: {suggestion}" in str(refused.value)
    args = check_args(parse(flags(tiny_model, tmp_path / "new", finetuning_type="lora", learning_rate=1e-2,
                                  adapter_name_or_path=checkpoint)), "sft_pg")
    assert args.adapter_name_or_path == str(checkpoint)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_data_files_with_a_byte_order_mark_are_read(tmp_path, suffix):
    from data_utils import load_conversations

    rows = [{"instruction": "q", "output": "a"}, {"instruction": "r", "output": "b"}]
    text = json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / f"set{suffix}").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "dataset_info.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"set": {"file_name": f"set{suffix}"}})
                                                 .encode())
    _, conversations, _ = load_conversations("set", tmp_path, ranking=False)
    assert [c["turns"] for c in conversations] == [[("q", "a")], [("r", "b")]]


def test_a_data_error_on_rank_0_under_torchrun_stops_every_rank_quietly(tiny_model, tmp_path):
    """Rank 1 waits for rank 0's data loading; it must leave with rank 0's error, not a traceback of its wait. Only
    the launcher's own report of the failed worker remains."""
    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"instruction": "hi", "output": "ok"}, {"instruction": "hi", "output": 3}]))
    result = run_script("train_sft_pg.py", flags(tiny_model, tmp_path / "out", dataset=data, strict_data=True,
                                                 per_device_train_batch_size=2), nproc=2, expect_ok=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert [line for line in output.splitlines() if "error: " in line] == \
        [f"error: {data}, row 2, field 'output': expected str, got int"], output[-3000:]
    project = [name for name in ("train_sft_pg.py\", line", "run_guard.py", "data_utils.py", "train_utils.py")
               if name in output]
    assert project == [] and "[rank1]" not in output and "[rank0]" not in output, output[-3000:]
    assert "exitcode  : 2" in output  # rank 0 stopped with the user-error code, not an abort


def test_ctrl_c_finishes_the_step_writes_a_checkpoint_and_exits_130(tiny_model, tmp_path):
    """The first Ctrl-C takes SIGTERM's path (whose resume is tested bit for bit above); under umask 077 every file
    written is 0600 and every folder 0700."""
    from checkpoint import verify_checkpoint

    out = tmp_path / "out"
    env, umask = script_env(0o077)
    run = subprocess.Popen([sys.executable, str(ROOT / "train_sft_pg.py"), *flags(tiny_model, out, save_steps=100)],
                           cwd=ROOT, env=env, preexec_fn=umask, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    deadline = time.time() + 300
    while not (out / "trainer_log.jsonl").exists() or not any(r["step"] >= 2 for r in read_log(out)):
        assert run.poll() is None and time.time() < deadline, run.communicate()[0][-3000:]
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    output = run.communicate(timeout=300)[0]
    assert run.returncode == INTERRUPTED_EXIT and "Traceback" not in output, output[-3000:]
    stopped = int(output.split("stopped by Ctrl-C (SIGINT) after step ")[1].split(";")[0])
    assert 2 <= stopped < STEPS and "--resume_from_checkpoint True" in output
    verify_checkpoint(out / f"checkpoint-{stopped}")
    assert {path: mode for path, mode in modes(out).items() if mode != (0o700 if path.is_dir() else 0o600)} == {}


def test_a_second_ctrl_c_stops_at_once_and_says_so(capsys):
    from run_guard import StepGuard

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        guard = StepGuard(SimpleNamespace(is_main_process=False), SimpleNamespace())
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs between bytecodes
        except KeyboardInterrupt:  # caught here, or pytest would take it for the user stopping the session
            pytest.fail("the first Ctrl-C raised KeyboardInterrupt instead of asking to stop after the step")
        assert guard.received == signal.SIGINT  # the first only asks to stop after the step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        run_main(interrupted)
    assert stopped.value.code == INTERRUPTED_EXIT and capsys.readouterr().err == "\nstopped by Ctrl-C\n"
