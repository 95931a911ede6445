"""bench/alignment_tax.py: the smoke configuration end to end, held-out data never trained on, valid commands."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import alignment_tax as bench

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_end_to_end(tmp_path):
    work = tmp_path / "smoke"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "bench.alignment_tax", "--config", "smoke", "--work_dir", str(work)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "Target on answer NLL" in result.stdout

    out = json.loads(Path(f"{work}.json").read_text())
    cfg = bench.CONFIGS["smoke"]
    assert out["config"] == "smoke" and out["timing"]["total_s"] > 0
    runs = out["runs"]
    expected = {("pre", "pre", "")}
    for pipeline in cfg.pipelines:
        expected |= {(pipeline, *bench.TRAINED_METHODS[key][:2]) for key in cfg.methods}
        expected |= {(pipeline, "merge", bench.MERGE_LABEL.format(w)) for w in cfg.merge_weights}
    assert {(r["pipeline"], r["method"], r["variant"]) for r in runs} == expected
    assert {r["seed"] for r in runs} == set(cfg.seeds)
    for run in runs:
        assert math.isfinite(run["reference_nll"]) and run["reference_nll"] > 0
        assert math.isfinite(run["reference_first_order"])
        for split in ("val", "test"):
            metrics = run[split]
            for key in ("refusal", "over_refusal", "accuracy", *metrics["accuracy_by_family"]):
                value = metrics.get(key, metrics["accuracy_by_family"].get(key))
                assert 0.0 <= value <= 1.0, (run["pipeline"], run["method"], split, key, value)
            assert math.isfinite(metrics["nll"]) and metrics["nll"] > 0
    pre = next(r for r in runs if r["pipeline"] == "pre")
    assert pre["reference_first_order"] == 0.0

    for row in out["summary"]:
        assert row["seeds"] == len(cfg.seeds)
        assert all(math.isfinite(row[k]["mean"]) for k in ("refusal", "accuracy", "nll", "nll_loss", "accuracy_loss"))
    assert {(c["pipeline"], c["metric"]) for c in out["target"]} == \
        {(p, m) for p in cfg.pipelines for m in bench.UTILITY}
    for check in out["target"]:
        assert check["best_ogpsa"].startswith("ogpsa") and isinstance(check["met"], bool)
    assert Path(f"{work}.png").stat().st_size > 10_000
    assert "| pipeline | method |" in Path(f"{work}.md").read_text()


@pytest.mark.parametrize("config", sorted(bench.CONFIGS))
def test_heldout_data_never_trained_on(tmp_path, config):
    cfg = bench.CONFIGS[config]
    splits, ids = bench.make_splits(cfg)
    bench.make_base_data(cfg, splits, ids, tmp_path / "base")
    for seed in cfg.seeds:
        bench.make_seed_data(cfg, splits, ids, seed, tmp_path / f"seed-{seed}")
    prompts = [row["instruction"] for path in tmp_path.glob("*/*.json") if path.name != "dataset_info.json"
               for row in json.loads(path.read_text())]
    trained = set(prompts)
    for split in splits.values():
        assert not trained & {q for _, q, _ in split["general"]}
        for kind in ("harmful", "benign"):
            requests = {p[p.index("<"):p.index(">") + 1] for p in split[kind]}
            assert not {p[p.index("<"):p.index(">") + 1] for p in trained if "<" in p} & requests
            assert len(requests) == cfg.heldout_requests
    assert not set(splits["val"]["harmful"]) & set(splits["test"]["harmful"])
    assert len(prompts) > cfg.pretrain_tasks + 2 * cfg.safety_samples


@pytest.mark.parametrize("config", sorted(bench.CONFIGS))
def test_every_command_parses(tmp_path, config):
    """Every safety-stage command of every configuration (the gpu one included) is accepted by its script."""
    import train_dpo_pg
    from arguments import build_parser, check_args

    parsers = {"train_sft_pg.py": build_parser("", "sft_pg", 1e-5),
               "train_dpo_pg.py": train_dpo_pg.add_dpo_flags(build_parser("", "dpo_pg", 1e-6))}
    cfg = bench.configure(config, [])
    if cfg.sft_lr is None:  # chosen by the learning-rate rule at run time
        cfg = bench.replace(cfg, sft_lr=1e-3, dpo_lr=3e-4)
    jobs = bench.base_jobs(cfg, tmp_path / "base")
    for seed in cfg.seeds:
        jobs += bench.seed_jobs(cfg, seed, tmp_path / f"seed-{seed}", tmp_path / "base" / "pre")
    assert len(jobs) == 2 + len(cfg.seeds) * len(cfg.pipelines) * len(cfg.methods)
    for job in jobs[1:]:
        script = Path(job.command[0]).name
        stage = "sft_pg" if script == "train_sft_pg.py" else "dpo_pg"
        args = check_args(parsers[script].parse_args([str(a) for a in job.command[1:]]), stage)
        assert args.base_method == ("none" if "naive" in job.name or "replay" in job.name or job.name == "pre"
                                    else "orthogonal_projection")


def test_lr_rule_takes_the_largest_rate_that_refuses_and_keeps_half_the_accuracy():
    def metrics(refusal, accuracy):
        return {"refusal": refusal, "accuracy": accuracy}

    results = {("sft", 1e-4): metrics(0.95, 0.40), ("sft", 1e-3): metrics(1.0, 0.25),
               ("sft", 3e-3): metrics(1.0, 0.10),  # wrecked: below half of 0.4
               ("dpo", 1e-4): metrics(0.50, 0.40),  # not safe yet
               ("dpo", 3e-4): metrics(0.92, 0.30), ("dpo", 1e-3): metrics(0.0, 0.05)}
    chosen, passing = bench.lr_rule(metrics(0.0, 0.40), results)
    assert chosen == {"sft_lr": 1e-3, "dpo_lr": 3e-4}
    assert passing == {("sft", 1e-4), ("sft", 1e-3), ("dpo", 3e-4)}
