"""scripts/gpu_check.py without a GPU: the dry run (CI), what it catches, and how runs are judged."""

import pytest

import gpu_check
from helpers import run_script


def test_dry_run_lists_every_run_and_each_command_parses():
    result = run_script("scripts/gpu_check.py", ["--dry_run"])
    listed = [line for line in result.stdout.splitlines() if line.startswith(("ok ", "FAILS "))]
    runs = gpu_check.training_plan(2)
    assert len(listed) == len(runs) + 2  # every training run, perf and throughput
    assert all(line.startswith("ok ") for line in listed)
    assert "all parse" in result.stdout.splitlines()[-1]
    names = {run.name for run in runs}  # the list, as runs
    for expected in ("sft one GPU", "dpo one GPU", "sft ds_z2_config.json", "sft ds_z3_offload_config.json",
                     "dpo FSDP2", "sft LoRA ZeRO-2", "sft update projection FSDP2", "sft padding-free sdpa",
                     "sft padding-free fa2", "sft ZeRO-3 2 GPUs"):
        assert expected in names
    assert not any(run.nproc > 1 for run in gpu_check.training_plan(1))


def test_dry_run_catches_a_command_that_does_not_parse():
    bad_flag = gpu_check.Run("bad", "dpo", {"no_such_flag": 1}).command("OUT", "MODEL", 29500)
    assert "unrecognized arguments: --no_such_flag" in gpu_check.check_parses(bad_flag)
    bad_value = gpu_check.Run("bad", "sft", {"base_scope": "nowhere"}).command("OUT", "MODEL", 29500)
    assert "--base_scope" in gpu_check.check_parses(bad_value)
    missing = gpu_check.Run("bad", "sft", {}, launcher="accelerate", config="no_such.yaml").command("O", "M", 1)
    assert "no_such.yaml does not exist" in gpu_check.check_parses(missing)
    assert gpu_check.check_parses(gpu_check.throughput_command("OUT.json") + ["--config", "huge"]) is not None


def test_runs_are_judged_against_the_measured_bf16_rounding():
    """Tolerance: twice the largest per-step loss difference between the one-GPU bf16 and float32 runs (here 0.01),
    at least 2^-8 of the loss; max_abs_cos below the bf16 bound; a skipped run is neither passed nor failed."""
    def run(name, losses, compare_to=None, cos=1e-7, returncode=0, **extra):
        r = gpu_check.Run(name, "sft", {}, compare_to)
        r.result = {"returncode": returncode, "losses": losses, "max_abs_cos": cos, **extra}
        return r

    runs = gpu_check.judge([
        run("sft one GPU", [2.0, 1.5]), run("sft one GPU float32", [2.0, 1.51]),
        run("close", [2.0, 1.515], "sft one GPU"), run("far", [2.0, 1.53], "sft one GPU"),
        run("not orthogonal", [2.0, 1.5], "sft one GPU", cos=0.1), run("crashed", None, "sft one GPU", returncode=1),
        gpu_check.Run("skipped", "sft", {}, "sft one GPU", result={"skipped": "flash_attn is not installed"})])
    verdicts = {r.name: r.result["passed"] for r in runs}
    assert verdicts == {"sft one GPU": True, "sft one GPU float32": True, "close": True, "far": False,
                        "not orthogonal": False, "crashed": False, "skipped": None}
    assert runs[2].result["loss_tolerance"] == pytest.approx(2 * 0.01)
