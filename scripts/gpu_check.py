r"""Check on a GPU, in one command, what the CPU tests cannot, and write one report.

The CPU suite proves every exactness claim over gloo in float32. What only a GPU exercises: CUDA streams (DeepSpeed's
overlap_comm reduces on a side stream; offloaded gradient copies are asynchronous), NCCL, bf16 autocast on CUDA
kernels, DeepSpeed's fused CUDA optimizers, FSDP2 on CUDA, FlashAttention-2 with --padding_free, and the
performance targets. This script runs, on a small Qwen2-shaped model built on the spot (no hub):

  training    SFT and DPO in bf16 through the scripts as users launch them: one GPU; LLaMA-Factory's stock
              ds_z2/ds_z3 files and both offload files with one process; FSDP2 (fsdp2_config.yaml) with one
              process; LoRA; --base_project_update; --padding_free with sdpa, and with fa2 where flash-attn is
              installed. With 2 or more GPUs, 2 processes against 1 for DDP, ZeRO-2, ZeRO-3 and FSDP2.
  perf        bench/perf.py in a quick mode (0.5B, fewer rounds): OGPSA's step against plain, the projection against
              the bandwidth floor, memory, refresh; single process, ZeRO-2 and FSDP2.
  throughput  bench/throughput.py's GPU configuration: padded, length-aware and padding-free batches.

Every training run must pass the scripts' own guard (which stops a run whose projection does not act on the gradient
the optimizer steps with) and keep max_abs_cos below the bf16 bound on every logged step. A run is compared with its
one-GPU counterpart step by step on the logged loss: two bf16 runs that compute the same function differ by bf16
rounding, whose size the check measures itself as the largest per-step loss difference between the one-GPU bf16 run
and the same run in float32; a run passes within twice that (and at least 2^-8 relative, bf16's precision).

    python scripts/gpu_check.py                 # one GPU (more are used where found); about 10 minutes
    python scripts/gpu_check.py --only training --budget_s 300
    python scripts/gpu_check.py --dry_run       # anywhere: lists the runs and checks that every command parses (CI)

Writes bench/results/gpu_check-<gpu>.json (GPU name, versions, every figure and pass/fail) and prints a summary.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "accelerate_configs"
BF16_COS = 4 * 2.0 ** -8  # the guard's bound for bf16 (backends.GUARD_MAX_COS)
SECTIONS = ("training", "perf", "throughput")
MODEL_SHAPE = ["--vocab_size", "2048", "--hidden_size", "256", "--num_layers", "4"]  # 2.8M parameters, head dim 64
COMMON = {"dataset_dir": "data", "template": "qwen", "max_samples": 64, "max_steps": 4, "logging_steps": 1,
          "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
          "base_num_samples": 32, "base_num_steps": 2, "save_strategy": "no", "bf16": True}
SFT = {"dataset": "demo_safety_sft", "base_dataset": "demo_general_a_sft,demo_general_b_sft"}
DPO = {"dataset": "demo_safety_dpo", "base_dataset": "demo_general_dpo", "pref_beta": 0.2}


@dataclass
class Run:
    """One training run: how it is launched, and the one-GPU run it must match (None: the baseline itself)."""
    name: str
    script: str  # "sft" or "dpo"
    flags: dict
    compare_to: str = None
    nproc: int = 1
    launcher: str = "python"  # python, torchrun or accelerate
    config: str = None  # accelerate --config_file
    needs: str = None  # a package the run needs ("flash_attn"); skipped without it
    result: dict = field(default_factory=dict)

    def command(self, output_dir, model, port):
        script = "train_sft_pg.py" if self.script == "sft" else "train_dpo_pg.py"
        flags = {**COMMON, **(SFT if self.script == "sft" else DPO), "model_name_or_path": model,
                 "output_dir": output_dir, **self.flags}
        argv = [str(x) for key, value in flags.items() if value is not None for x in (f"--{key}", value)]
        if self.launcher == "python":
            launch = [sys.executable]
        elif self.launcher == "torchrun":
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.nproc),
                      "--master_port", str(port)]
        else:
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(self.nproc),
                      "--main_process_port", str(port)] + (["--config_file", str(CONFIGS / self.config)]
                                                           if self.config else [])
        return launch + [str(ROOT / script)] + argv


def training_plan(gpus):
    """The runs, baselines first. Names say what differs from the one-GPU bf16 baseline of the same script."""
    runs = []
    for script in ("sft", "dpo"):
        base = f"{script} one GPU"
        runs += [Run(base, script, {}), Run(f"{script} one GPU float32", script, {"bf16": False}, compare_to=None)]
        for config in ("ds_z2_config.json", "ds_z3_config.json") + (
                ("ds_z2_offload_config.json", "ds_z3_offload_config.json") if script == "sft" else ()):
            runs.append(Run(f"{script} {config}", script, {"deepspeed": f"accelerate_configs/{config}"}, base,
                            launcher="torchrun"))
        runs.append(Run(f"{script} FSDP2", script, {}, base, launcher="accelerate", config="fsdp2_config.yaml"))
        runs.append(Run(f"{script} LoRA", script, {"finetuning_type": "lora"}, None))
        runs.append(Run(f"{script} LoRA ZeRO-2", script, {"finetuning_type": "lora",
                                                          "deepspeed": "accelerate_configs/ds_z2_config.json"},
                        f"{script} LoRA", launcher="torchrun"))
    runs += [
        Run("sft update projection", "sft", {"base_project_update": True}),
        Run("sft update projection ZeRO-3", "sft", {"base_project_update": True,
                                                    "deepspeed": "accelerate_configs/ds_z3_config.json"},
            "sft update projection", launcher="torchrun"),
        Run("sft update projection FSDP2", "sft", {"base_project_update": True}, "sft update projection",
            launcher="accelerate", config="fsdp2_config.yaml"),
        Run("sft padding-free sdpa", "sft", {"padding_free": True, "flash_attn": "sdpa"}, "sft one GPU"),
        Run("dpo padding-free sdpa", "dpo", {"padding_free": True, "flash_attn": "sdpa"}, "dpo one GPU"),
        Run("sft padding-free fa2", "sft", {"padding_free": True, "flash_attn": "fa2"}, "sft one GPU",
            needs="flash_attn"),
        Run("sft fa2 padded", "sft", {"flash_attn": "fa2"}, "sft one GPU", needs="flash_attn"),
    ]
    if gpus >= 2:  # 2 processes must equal 1
        for name, flags, launch in [("DDP", {}, dict(launcher="torchrun")),
                                    ("ZeRO-2", {"deepspeed": "accelerate_configs/ds_z2_config.json"},
                                     dict(launcher="torchrun")),
                                    ("ZeRO-3", {"deepspeed": "accelerate_configs/ds_z3_config.json"},
                                     dict(launcher="torchrun")),
                                    ("FSDP2", {}, dict(launcher="accelerate", config="fsdp2_config.yaml"))]:
            runs.append(Run(f"sft {name} 2 GPUs", "sft", {**flags, "per_device_train_batch_size": 2}, "sft one GPU",
                            nproc=2, **launch))
    return runs


def perf_command(output):
    return [sys.executable, str(ROOT / "bench" / "perf.py"), "--models", "0.5b", "--steps", "3", "--hook_steps", "1",
            "--projection_reps", "5", "--output", str(output)]


def throughput_command(output):
    return [sys.executable, str(ROOT / "bench" / "throughput.py"), "--config", "gpu", "--output", str(output)]


# ---------------------------------------------------------------------------------------------------------------
# Dry run: every command parses
# ---------------------------------------------------------------------------------------------------------------

def check_parses(command):
    """Parse a planned command the way it will run: the launcher's flags with its own parser, the script's flags
    with the script's parser, and the config files it names exist. Returns the problem, or None."""
    from accelerate.commands.launch import launch_command_parser
    from torch.distributed.run import get_args_parser

    from run_guard import UserError
    from train_dpo_pg import add_dpo_flags
    from arguments import build_parser

    script_at = next(i for i, part in enumerate(command) if i > 0 and part.endswith(".py"))
    launcher, script, flags = command[1:script_at], Path(command[script_at]), command[script_at + 1:]
    try:
        if launcher[:2] == ["-m", "torch.distributed.run"]:
            get_args_parser().parse_args(launcher[2:] + [str(script)])
        elif launcher[:2] == ["-m", "accelerate.commands.launch"]:
            launch_command_parser().parse_args(launcher[2:] + [str(script)])
        if script.name == "train_sft_pg.py":
            build_parser("", "sft_pg", 1e-5).parse_args(flags)
        elif script.name == "train_dpo_pg.py":
            add_dpo_flags(build_parser("", "dpo_pg", 1e-6)).parse_args(flags)
        elif not script.is_file():
            return f"{script} does not exist"
        else:  # a benchmark: its own parser
            importlib.import_module(f"bench.{script.stem}").parse_settings(flags)
    except (UserError, SystemExit) as err:  # argparse prints its own message, then exits with code 2
        return f"{script.name}: {err}"
    for part in command:
        if part.endswith((".json", ".yaml")) and "accelerate_configs" in part and not Path(ROOT, part).is_file():
            return f"{part} does not exist"
    return None


def dry_run(gpus):
    runs = training_plan(gpus)
    commands = [(run.name, run.command("OUT", "MODEL", 29500)) for run in runs]
    commands += [("perf", perf_command("OUT.json")), ("throughput", throughput_command("OUT.json"))]
    problems = []
    for name, command in commands:
        problem = check_parses(command)
        print(f"{'FAILS' if problem else 'ok   '} {name}: {shlex.join(command)}" + (f"\n      {problem}" if problem
                                                                                    else ""))
        problems += [problem] if problem else []
    print(f"{len(commands)} commands for {gpus} GPU(s) ({len(runs)} training runs); "
          f"{'all parse' if not problems else f'{len(problems)} do not parse'}")
    return not problems


# ---------------------------------------------------------------------------------------------------------------
# Running and judging
# ---------------------------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def execute(run, work, model, deadline):
    """Run one training command (skipped without its package or past the deadline); fill run.result."""
    if run.needs and importlib.util.find_spec(run.needs) is None:
        run.result = {"skipped": f"{run.needs} is not installed"}
        return run
    remaining = deadline - time.monotonic()
    if remaining < 60:
        run.result = {"skipped": "out of time budget"}
        return run
    output = work / re.sub(r"[^a-z0-9]+", "-", run.name.lower())
    command = run.command(output, model, free_port())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=remaining)
        returncode, tail = done.returncode, (done.stdout + done.stderr)[-3000:]
    except subprocess.TimeoutExpired:
        returncode, tail = None, "timed out"
    run.result = {"command": shlex.join(command), "seconds": round(time.monotonic() - start, 1),
                  "returncode": returncode}
    log_file = output / "trainer_log.jsonl"
    if returncode == 0 and log_file.is_file():
        records = [json.loads(line) for line in log_file.read_text().splitlines()]
        run.result["losses"] = [r["loss"] for r in records]
        run.result["max_abs_cos"] = max((r.get("max_abs_cos", 0.0) for r in records), default=None)
        engine = re.search(r"^engine: (.*)$", done.stdout, re.MULTILINE)
        run.result["engine"] = engine.group(1) if engine else None
    else:
        run.result["error_tail"] = tail
    return run


def judge(runs):
    """pass/fail per run: it ran, the guard let it finish, max_abs_cos within the bf16 bound, and its losses within
    twice the measured bf16 rounding of its one-GPU counterpart."""
    by_name = {run.name: run for run in runs}
    for run in runs:
        result = run.result
        if "skipped" in result:
            result["passed"] = None
            continue
        checks = {"ran": result.get("returncode") == 0}
        if checks["ran"]:
            checks["max_abs_cos"] = result["max_abs_cos"] is not None and result["max_abs_cos"] < BF16_COS
        reference = by_name.get(run.compare_to)
        if checks["ran"] and reference is not None and "losses" in reference.result:
            fp32 = by_name.get(f"{run.script} one GPU float32")
            rounding = max((abs(a - b) for a, b in zip(by_name[f"{run.script} one GPU"].result.get("losses", []),
                                                       fp32.result.get("losses", []))), default=math.nan)
            tolerance = max(2 * rounding, 2.0 ** -8 * max(reference.result["losses"]))
            difference = max(abs(a - b) for a, b in zip(run.result["losses"], reference.result["losses"]))
            checks["matches " + run.compare_to] = difference <= tolerance
            result.update(loss_difference=difference, loss_tolerance=tolerance)
        result["checks"] = checks
        result["passed"] = all(checks.values())
    return runs


def run_section(command, output, deadline):
    remaining = deadline - time.monotonic()
    if remaining < 120:
        return {"skipped": "out of time budget", "command": shlex.join(command)}
    start = time.monotonic()
    try:
        returncode = subprocess.run(command, cwd=ROOT, timeout=remaining).returncode
    except subprocess.TimeoutExpired:
        returncode = None
    section = {"command": shlex.join(command), "returncode": returncode, "seconds": round(time.monotonic() - start, 1)}
    if returncode == 0 and Path(output).is_file():
        section["results"] = json.loads(Path(output).read_text())
    section["passed"] = returncode == 0
    return section


def environment():
    import torch

    packages = ("torch", "transformers", "accelerate", "deepspeed", "peft", "flash_attn")
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(), "cuda": torch.version.cuda,
            **versions}


def summary(report):
    lines = [f"GPU check on {report['environment']['gpus']} x {report['environment']['gpu']}", "",
             "| run | result | loss diff / tolerance | max_abs_cos | s |", "|---|---|---|---|---:|"]
    for run in report.get("training", []):
        r = run["result"]
        verdict = "skipped: " + r["skipped"] if "skipped" in r else ("pass" if r["passed"] else "FAIL")
        diff = (f"{r['loss_difference']:.2e} / {r['loss_tolerance']:.2e}" if "loss_difference" in r else "")
        cos = f"{r['max_abs_cos']:.1e}" if r.get("max_abs_cos") is not None else ""
        lines.append(f"| {run['name']} | {verdict} | {diff} | {cos} | {r.get('seconds', '')} |")
    for section in ("perf", "throughput"):
        if section in report:
            part = report[section]
            lines.append(f"\n{section}: " + ("skipped: " + part["skipped"] if "skipped" in part else
                                              "pass" if part["passed"] else f"FAIL (exit code {part['returncode']})"))
    lines.append(f"\n{report['passed']} passed, {report['failed']} failed, {report['skipped']} skipped")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", action="store_true", help="list the commands and check that each parses")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--budget_s", type=float, default=570, help="stop starting new work after this many seconds")
    parser.add_argument("--parallel", type=int, default=4, help="one-GPU training runs at a time (small model)")
    parser.add_argument("--output", help="report JSON (default bench/results/gpu_check-<gpu>.json)")
    parser.add_argument("--gpus", type=int, help="dry run: plan for this many GPUs (default 2: every run)")
    settings = parser.parse_args()
    sections = settings.only.split(",")
    if not set(sections) <= set(SECTIONS):
        parser.error(f"--only takes {', '.join(SECTIONS)}")
    if settings.dry_run:
        sys.exit(0 if dry_run(settings.gpus or 2) else 1)

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this check is for GPU machines (--dry_run works anywhere)")
    deadline = time.monotonic() + settings.budget_s
    report = {"environment": environment(), "bf16_cos_bound": BF16_COS}
    gpu = report["environment"]["gpu"]
    output = Path(settings.output or ROOT / "bench" / "results"
                  / f"gpu_check-{re.sub(r'[^a-z0-9]+', '-', gpu.lower()).strip('-')}.json")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        if "training" in sections:
            model = work / "model"
            subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--output_dir", str(model),
                            *MODEL_SHAPE], check=True, cwd=ROOT)
            runs = training_plan(report["environment"]["gpus"])
            single = [run for run in runs if run.nproc == 1]
            with ThreadPoolExecutor(settings.parallel) as pool:  # small runs share the GPU
                list(pool.map(lambda run: execute(run, work, model, deadline), single))
            for run in runs:
                if run.nproc > 1:  # these take every GPU
                    execute(run, work, model, deadline)
            report["training"] = [{"name": run.name, "result": run.result} for run in judge(runs)]
        if "perf" in sections:
            report["perf"] = run_section(perf_command(work / "perf.json"), work / "perf.json", deadline)
        if "throughput" in sections:
            report["throughput"] = run_section(throughput_command(work / "throughput.json"),
                                               work / "throughput.json", deadline)
    verdicts = [run["result"]["passed"] for run in report.get("training", [])] + \
        [report[s].get("passed") for s in ("perf", "throughput") if s in report]
    report.update(passed=sum(v is True for v in verdicts), failed=sum(v is False for v in verdicts),
                  skipped=sum(v is None for v in verdicts))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(summary(report))
    print(f"report: {output}")
    sys.exit(1 if report["failed"] else 0)


if __name__ == "__main__":
    main()
