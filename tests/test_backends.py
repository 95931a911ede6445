"""DDP and DeepSpeed ZeRO-1/2/3 with 2 CPU processes (gloo) against the single-process run.

Tolerance: weights within 1e-5 relative. Both runs see the same samples in every micro-batch and normalise the
loss by the global number of tokens (pairs), so they compute the same function; only the float32 summation order
differs (all-reduce or reduce-scatter of two partial sums versus one sum), which moves weights by ~1e-7.
"""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from helpers import load_weights, read_log, run_script, weights_relative_difference
from test_dpo import dpo_args
from test_sft_e2e import sft_args
from train_utils import build_parser, check_args, configure_deepspeed, make_projector

BACKENDS = {
    "ddp": [],
    "zero1": ["--deepspeed", "accelerate_configs/ds_z1_config.json"],
    "zero2": ["--deepspeed", "accelerate_configs/ds_z2_config.json"],
    "zero3": ["--deepspeed", "accelerate_configs/ds_z3_config.json"],
}
SCRIPTS = {"sft": ("train_sft_pg.py", sft_args), "dpo": ("train_dpo_pg.py", dpo_args)}


@pytest.fixture(scope="module")
def single_runs(tiny_model, tmp_path_factory):
    """Single-process reference runs, one per (script, scope, batch size), made on first use."""
    cache = {}

    def get(script, scope, batch_size=4):
        key = script, scope, batch_size
        if key not in cache:
            out = tmp_path_factory.mktemp(f"single-{script}-{scope}-{batch_size}")
            path, make_args = SCRIPTS[script]
            run_script(path, make_args(tiny_model, out, base_scope=scope, per_device_train_batch_size=batch_size,
                                       max_steps=4))
            cache[key] = out
        return cache[key]

    return get


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("scope", ["per_param", "global"])
def test_two_processes_equal_one(tiny_model, tmp_path, single_runs, backend, script, scope):
    path, make_args = SCRIPTS[script]
    run_script(path, make_args(tiny_model, tmp_path, base_scope=scope, per_device_train_batch_size=2, max_steps=4)
               + BACKENDS[backend], nproc=2)
    single = single_runs(script, scope)
    assert weights_relative_difference(load_weights(single), load_weights(tmp_path)) <= 1e-5
    assert read_log(tmp_path)[-1]["loss"] == pytest.approx(read_log(single)[-1]["loss"], rel=1e-5)


@pytest.mark.parametrize("backend", ["zero2", "zero3"])
def test_three_processes_equal_one(tiny_model, tmp_path, single_runs, backend):
    """Three ranks: the tiny model's tensor sizes are not multiples of 3, so ZeRO pads partitions and splits
    parameters across rank boundaries at odd offsets, which two ranks never do."""
    assert any(weight.numel() % 3 for weight in load_weights(tiny_model).values())
    run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path, base_scope="per_param",
                                           per_device_train_batch_size=2, max_steps=4) + BACKENDS[backend], nproc=3)
    single = single_runs("sft", "per_param", batch_size=6)
    assert weights_relative_difference(load_weights(single), load_weights(tmp_path)) <= 1e-5


def test_update_projection_under_ddp_equals_one_process(tiny_model, tmp_path):
    """DPO (the other loop), global scope: every rank projects the same replicated update."""
    common = dict(base_scope="global", max_steps=4, base_project_update=True)
    run_script("train_dpo_pg.py", dpo_args(tiny_model, tmp_path / "single", per_device_train_batch_size=4, **common))
    run_script("train_dpo_pg.py", dpo_args(tiny_model, tmp_path / "ddp", per_device_train_batch_size=2, **common),
               nproc=2)
    assert weights_relative_difference(load_weights(tmp_path / "single"), load_weights(tmp_path / "ddp")) <= 1e-5
    assert read_log(tmp_path / "ddp")[-1]["update_removed_fraction"] > 0


def test_update_projection_is_refused_under_deepspeed(tiny_model, tmp_path):
    args = check_args(build_parser("", "sft_pg", 1e-5).parse_args(
        sft_args(tiny_model, tmp_path, base_project_update=True)), "sft_pg")
    with pytest.raises(SystemExit, match="--base_project_update is not supported under DeepSpeed"):
        make_projector(args, SimpleNamespace(sharded_optimizer=True))


CLIP_RUN = dict(dataset="demo_general_a_sft", base_dataset="demo_general_a_sft", max_samples=16, base_num_samples=16,
                gradient_accumulation_steps=1, optim="sgd", max_steps=1, learning_rate=0.5,
                lr_scheduler_type="constant", base_scope="global")


@pytest.fixture(scope="module")
def plain_step(tiny_model, tmp_path_factory):
    """One plain SGD step on the whole batch, unclipped: the reference for the clipping test."""
    out = tmp_path_factory.mktemp("plain-step")
    run_script("train_sft_pg.py", sft_args(tiny_model, out, base_method="none", max_grad_norm=0,
                                           per_device_train_batch_size=16, **CLIP_RUN))
    return out


@pytest.mark.parametrize("backend", ["single", "ddp", "zero1", "zero2", "zero3"])
def test_clipping_sees_the_projected_gradient(tiny_model, tmp_path, plain_step, backend):
    """threshold + base_scale 0.1 with the reference set equal to the batch: g' = 0.1 g, 10x below its norm.

    With --max_grad_norm = 0.3 ||g||, clipping the projected gradient does nothing; clipping the unprojected
    one would shrink the update 3.3x more. One SGD step must move the weights by exactly 0.1 of the plain step.
    """
    initial = load_weights(tiny_model)
    plain_norm = read_log(plain_step)[0]["grad_norm"]
    nproc = 1 if backend == "single" else 2
    run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path, base_method="threshold", base_scale=0.1,
                                           max_grad_norm=0.3 * plain_norm, per_device_train_batch_size=16 // nproc,
                                           **CLIP_RUN) + BACKENDS.get(backend, []), nproc=nproc)
    record = read_log(tmp_path)[0]
    assert record["grad_norm_projected"] == pytest.approx(0.1 * record["grad_norm"], rel=1e-4)
    plain, ogpsa = load_weights(plain_step), load_weights(tmp_path)
    step = {k: (ogpsa[k].double() - initial[k].double()) for k in initial}
    expected = {k: 0.1 * (plain[k].double() - initial[k].double()) for k in initial}
    error = sum(((step[k] - expected[k]) ** 2).sum() for k in step).sqrt()
    assert error / sum((v ** 2).sum() for v in expected.values()).sqrt() < 1e-4


@pytest.mark.parametrize("backend, script", [("zero2", "sft"), ("zero3", "dpo")])
def test_resume_under_zero_equals_uninterrupted(tiny_model, tmp_path, backend, script):
    path, make_args = SCRIPTS[script]
    common = dict(per_device_train_batch_size=2, lr_scheduler_type="cosine", base_num_steps=4, max_steps=6)
    if script == "dpo":
        common["precompute_ref_log_probs"] = True
    run_script(path, make_args(tiny_model, tmp_path / "full", **common) + BACKENDS[backend], nproc=2)
    part = tmp_path / "part"
    saving = dict(save_strategy="steps", save_steps=3, **common)
    run_script(path, make_args(tiny_model, part, **saving) + BACKENDS[backend], nproc=2)
    assert sorted(p.name for p in (part / "checkpoint-3").glob("ogpsa_basis_*")) == \
        ["ogpsa_basis_0.safetensors", "ogpsa_basis_1.safetensors"]  # each rank saves its slice of the basis
    shutil.rmtree(part / "checkpoint-6")
    (part / "model.safetensors").unlink()
    run_script(path, make_args(tiny_model, part, resume_from_checkpoint=part / "checkpoint-3", **saving)
               + BACKENDS[backend], nproc=2)
    assert weights_relative_difference(load_weights(tmp_path / "full"), load_weights(part)) <= 1e-5
    if backend == "zero2" and script == "sft":  # a different number of processes is refused, not mis-sharded
        result = run_script(path, make_args(tiny_model, part, resume_from_checkpoint=part / "checkpoint-3",
                                            **{**saving, "per_device_train_batch_size": 4}) + BACKENDS[backend],
                            nproc=1, launcher="torchrun", expect_ok=False)
        assert result.returncode != 0 and "saved by 2 processes" in result.stdout + result.stderr


def ds_config(**zero):
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": 2, **zero}}


def flags(**kw):
    from types import SimpleNamespace

    return SimpleNamespace(**{"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                              "max_grad_norm": 1.0, **kw})


def test_deepspeed_auto_values_come_from_the_flags():
    config = ds_config()
    configure_deepspeed(config, flags(), world_size=8)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (4, 2, 64, 1.0)
    config = ds_config(stage=3)
    configure_deepspeed(config, flags(), world_size=1)
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("config, message", [
    (ds_config(offload_optimizer={"device": "cpu"}), "zero_optimization.offload_optimizer is not supported"),
    (ds_config(stage=3, offload_param={"device": "cpu"}), "zero_optimization.offload_param is not supported"),
    (ds_config(stage=0), "zero_optimization.stage 0"),
    ({**ds_config(), "fp16": {"enabled": True}}, "fp16.enabled is not supported"),
    ({**ds_config(), "optimizer": {"type": "AdamW"}}, "has a 'optimizer' section"),
    ({**ds_config(), "gradient_clipping": 0.5}, "gradient_clipping=0.5 but --max_grad_norm gives 1.0"),
])
def test_deepspeed_settings_the_projection_cannot_honour_are_refused(config, message):
    with pytest.raises(SystemExit, match=message):
        configure_deepspeed(json.loads(json.dumps(config)), flags(), world_size=2)


@pytest.mark.parametrize("config", ["multi_gpu", "deepspeed_zero2"])
def test_accelerate_configs_run_with_cpu_processes(tiny_model, tmp_path, single_runs, config):
    run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path, per_device_train_batch_size=2, max_steps=4),
               nproc=2, launcher="accelerate", config_file=f"accelerate_configs/{config}.yaml")
    assert weights_relative_difference(load_weights(single_runs("sft", "per_param")), load_weights(tmp_path)) <= 1e-5


def test_basis_memory_per_rank_is_k_times_the_partition(tiny_model, tmp_path):
    """Each ZeRO rank stores K x (its partition) basis entries, not K x P."""
    from safetensors.torch import load_file

    run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path, per_device_train_batch_size=2, max_steps=2,
                                           save_strategy="steps", save_steps=2) + BACKENDS["zero2"], nproc=2)
    total = sum(v.numel() for v in load_weights(tiny_model).values())
    bases = [load_file(str(tmp_path / "checkpoint-2" / f"ogpsa_basis_{r}.safetensors"))["basis"] for r in range(2)]
    assert all(b.shape[0] == 2 for b in bases)  # K = 2 reference sets
    assert sum(b.shape[1] for b in bases) == total and max(b.shape[1] for b in bases) <= total // 2 + 64
    assert torch.isfinite(torch.cat(bases, 1)).all()
