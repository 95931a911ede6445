"""bench/step_size_sweep.py: the smoke configuration end to end, the step rule, the commands, the counter-examples,
and bench/param_change.py's step record against an independent computation."""

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bench import alignment_tax as tax
from bench import step_size_sweep as sweep
from bench.param_change import StepRecorder

ROOT = Path(__file__).resolve().parents[1]


def expected_runs(cfg):
    """(seed, pipeline, rate, method, variant) of every run record the configuration must produce, with multiplicity."""
    runs = Counter((seed, "pre", None, "pre", "") for seed in cfg.seeds)
    for seed in cfg.seeds:
        for regime in sweep.regimes(cfg):
            for key in sweep.methods_of(cfg, regime.pipeline):
                runs[(seed, regime.pipeline, regime.rate, *sweep.setting(key)[:2])] += 1
            for weight in cfg.merge_weights:
                runs[(seed, regime.pipeline, regime.rate, "merge", tax.MERGE_LABEL.format(weight))] += 1
    return runs


def test_smoke_end_to_end(tmp_path):
    work = tmp_path / "smoke"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "bench.step_size_sweep", "--config", "smoke", "--work_dir",
                             str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "Target in sft at the smallest rate" in result.stdout

    out = json.loads(Path(f"{work}.json").read_text())
    cfg = sweep.CONFIGS["smoke"]
    assert out["config"] == "smoke" and out["timing"]["total_s"] > 0
    runs = out["runs"]
    assert Counter((r["seed"], r["pipeline"], r["rate"], r["method"], r["variant"]) for r in runs) == \
        expected_runs(cfg)  # one record per method x rate x seed, nothing else

    steps = {(regime.pipeline, regime.rate): regime.steps for regime in sweep.regimes(cfg)}
    for run in runs:
        for split in ("val", "test"):
            metrics = run[split]
            for key in ("refusal", "over_refusal", "accuracy"):
                assert 0.0 <= metrics[key] <= 1.0, (run["model"], split, key, metrics[key])
            assert math.isfinite(metrics["nll"]) and metrics["nll"] > 0
        assert math.isfinite(run["reference_nll"]) and math.isfinite(run["reference_first_order"])
        if run["method"] in ("pre", "merge"):  # not trained: no steps of their own
            assert run["relative_step"] is None and run["relative_displacement"] is None
            continue
        assert 0 < run["relative_step"] < 1 and 0 < run["relative_displacement"] < 10
        record = json.loads((work / run["model"] / "param_steps.json").read_text())
        assert len(record["relative_steps"]) == steps[(run["pipeline"], run["rate"])] == run["steps"]

    # The step measure follows the learning rate: Adam's step is about proportional to it
    rates = {"sft": cfg.sft_rates, "dpo": cfg.dpo_rates, "sft_dpo": cfg.dpo_rates}
    trained = [run for run in runs if run["method"] not in ("pre", "merge")]
    for run in trained:
        low, high = rates[run["pipeline"]]
        if run["rate"] == high:
            slow = next(r for r in trained if (r["seed"], r["pipeline"], r["method"], r["variant"], r["rate"]) ==
                        (run["seed"], run["pipeline"], run["method"], run["variant"], low))
            ratio = run["relative_step"] / slow["relative_step"]
            assert high / low / 3 < ratio < high / low * 3, (run["model"], ratio)

    # The recorded net move equals the one read from the saved weights (pre-alignment -> SFT result)
    naive = next(r for r in runs if r["pipeline"] == "sft" and r["method"] == "naive" and r["rate"] == high)
    before, after = load_file(work / "base" / "pre" / "model.safetensors"), \
        load_file(work / naive["model"] / "model.safetensors")
    moved = math.sqrt(sum((after[k].double() - before[k].double()).square().sum().item() for k in before))
    norm = math.sqrt(sum(before[k].double().square().sum().item() for k in before))
    assert naive["relative_displacement"] == pytest.approx(moved / norm, rel=1e-4)

    summary = out["summary"]
    assert summary[0]["pipeline"] == "pre"
    assert len(summary) == 1 + sum(len(sweep.methods_of(cfg, p)) + len(cfg.merge_weights) for p, _ in steps)
    for row in summary[1:]:
        assert row["seeds"] == len(cfg.seeds)
        assert all(math.isfinite(row[k]["mean"]) for k in ("refusal", "over_refusal", "nll_loss", "accuracy_loss"))
        if row["method"] == "naive":
            assert row["nll_reduction"] in (None, {"mean": 0.0, "sd": 0.0, "min": 0.0, "max": 0.0})
    assert {(c["pipeline"], c["rate"], c["metric"]) for c in out["target"]} == \
        {(p, rate, m) for p, rate in steps for m in tax.UTILITY}
    assert all(c["best_ogpsa"].startswith("ogpsa") and isinstance(c["met"], bool) for c in out["target"])
    assert set(out["verdicts"]) == set(cfg.pipelines)
    consistency = out["refusal_consistency"]
    assert {(e["pipeline"], e["rate"]) for e in consistency["naive_val"]} == set(steps)
    assert all(0 <= gap <= 1 for gap in consistency["largest_gap"].values())
    assert Path(f"{work}.png").stat().st_size > 10_000
    assert "| pipeline | rate | steps | method |" in Path(f"{work}.md").read_text()


@pytest.mark.parametrize("config", ["cpu", "gpu"])
def test_step_rule_keeps_the_path_length_and_spans_30x(config):
    cfg = sweep.configure(config, [])
    for rates in (cfg.sft_rates, cfg.dpo_rates):
        assert max(rates) / min(rates) >= 30 * (1 - 1e-9)  # 3e-4 / 1e-5 is 29.999999999999996
    for pipeline, largest in (("sft", cfg.sft_largest_steps), ("dpo", cfg.dpo_largest_steps)):
        regimes = sorted((r for r in sweep.regimes(cfg) if r.pipeline == pipeline), key=lambda r: r.rate)
        assert [r.steps for r in regimes] == sorted((r.steps for r in regimes), reverse=True)  # more when smaller
        assert regimes[-1].steps == largest
        path = largest * regimes[-1].rate
        for regime in regimes:  # the same rate x steps, up to the rounding of one step
            assert path * (1 - 1e-9) <= regime.rate * regime.steps < path + regime.rate


@pytest.mark.parametrize("config", sorted(sweep.CONFIGS))
def test_every_command_parses(tmp_path, config):
    """Every training command of every configuration is accepted by its script, with the regime's rate and steps."""
    import train_dpo_pg
    from arguments import build_parser, check_args

    parsers = {"train_sft_pg.py": build_parser("", "sft_pg", 1e-5),
               "train_dpo_pg.py": train_dpo_pg.add_dpo_flags(build_parser("", "dpo_pg", 1e-6))}
    cfg = sweep.configure(config, ["pipelines=sft,dpo,sft_dpo"])
    pre = tmp_path / "pre"  # the pre-alignment model's folder, beside the runs' (not around them)
    jobs = [job for seed in cfg.seeds for job in sweep.sweep_jobs(cfg, seed, tmp_path / f"seed-{seed}", pre)]
    runs = {sweep.run_name(r.pipeline, r.rate, key): (r, key) for r in sweep.regimes(cfg)
            for key in sweep.methods_of(cfg, r.pipeline)}
    assert len(jobs) == len(cfg.seeds) * len(runs)
    for job in jobs:
        assert job.command[:2] == ["-m", "bench.param_change"]
        out, script, flags = Path(job.command[2]), Path(job.command[3]).name, [str(a) for a in job.command[4:]]
        stage = "sft_pg" if script == "train_sft_pg.py" else "dpo_pg"
        args = check_args(parsers[script].parse_args(flags), stage)
        regime, key = runs[out.parent.name]
        assert (args.learning_rate, args.max_steps) == (regime.rate, regime.steps)
        assert (stage == "sft_pg") == (regime.pipeline == "sft")
        assert args.base_method == ("none" if key in ("naive", "replay") else "orthogonal_projection")
        if stage == "dpo_pg":
            assert args.base_loss == ("sft" if key in sweep.SFT_LOSS_METHODS else "pairs_nll")
        if regime.pipeline == "sft_dpo":
            start = sweep.run_name("sft", regime.start_rate, sweep.setting(key)[2])
            assert Path(args.model_name_or_path).name == start and job.after == (f"{job.name.split('-')[0]}-{start}",)
            same_end = min if regime.rate == min(cfg.dpo_rates) else max
            assert regime.start_rate == same_end(cfg.sft_rates)


def test_configure_refuses_the_fields_the_sweep_replaces_and_incomplete_methods():
    with pytest.raises(SystemExit, match="sft_rates"):
        sweep.configure("cpu", ["sft_lr=1e-3"])
    with pytest.raises(SystemExit, match="include naive"):
        sweep.configure("cpu", ["dpo_methods=ogpsa_global"])
    with pytest.raises(SystemExit, match="sft_dpo starts from the sft runs"):
        sweep.configure("cpu", ["methods=naive"])  # the dpo methods' SFT stages are missing


def test_benign_counter_examples_are_added_and_leave_the_rest_unchanged(tmp_path):
    cfg = sweep.CONFIGS["smoke"]
    splits, ids = tax.make_splits(cfg)
    tax.make_seed_data(cfg, splits, ids, 0, tmp_path / "with")
    tax.make_seed_data(tax.replace(cfg, safety_benign=0), splits, ids, 0, tmp_path / "without")

    def rows(folder, name):
        return json.loads((tmp_path / folder / f"{name}.json").read_text())

    def request(prompt):
        return prompt[prompt.index("<"):prompt.index(">") + 1]

    for name in ("ref_a_sft", "ref_b_sft", "ref_a_dpo", "ref_b_dpo"):
        assert rows("with", name) == rows("without", name)
    sft, dpo = rows("with", "safety_sft"), rows("with", "safety_dpo")
    assert sft[:cfg.safety_samples] == rows("without", "safety_sft")
    assert dpo[:cfg.safety_samples] == rows("without", "safety_dpo")
    counter_sft, counter_dpo = sft[cfg.safety_samples:], dpo[cfg.safety_samples:]
    assert len(counter_sft) == len(counter_dpo) == cfg.safety_benign
    assert all("<benign request" in r["instruction"] and r["output"].startswith("Sure.") for r in counter_sft)
    assert all(r["chosen"].startswith("Sure.") and tax.is_refusal(r["rejected"]) for r in counter_dpo)
    counter = {request(r["instruction"]) for r in counter_sft + counter_dpo}
    assert len(counter) == 2 * cfg.safety_benign  # distinct requests, none of them a reference or held-out one
    references = {request(r["instruction"]) for name in ("ref_a_sft", "ref_b_sft") for r in rows("with", name)
                  if "<" in r["instruction"]}
    heldout = {request(p) for split in splits.values() for p in split["benign"]}
    assert not counter & references and not counter & heldout


def test_step_recorder_counts_a_change_made_after_the_optimizer_step():
    """Against the parameters read directly: the change after the step (as --base_project_update makes) is part of
    the step, each step is counted once, and a second optimizer is refused."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = StepRecorder()
    handle = register_optimizer_step_pre_hook(recorder.before_step)
    try:
        flat = [torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()]
        for _ in range(3):
            model(torch.randn(5, 4)).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            with torch.no_grad():
                model.bias.mul_(0.5)  # a change after the step
            flat.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double())
        with pytest.raises(RuntimeError, match="second optimizer"):
            torch.optim.SGD(model.parameters(), lr=0.1).step()
    finally:
        handle.remove()
    result = recorder.result()
    expected = [((b - a).norm() / a.norm()).item() for a, b in zip(flat, flat[1:])]
    assert result["relative_steps"] == pytest.approx(expected, rel=1e-12)
    assert result["displacement"] == pytest.approx((flat[-1] - flat[0]).norm().item(), rel=1e-12)
    assert result["initial_norm"] == pytest.approx(flat[0].norm().item(), rel=1e-12)
