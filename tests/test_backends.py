"""DDP and DeepSpeed ZeRO-0/1/2/3 (with and without CPU offload) with 2-3 CPU processes (gloo) against one process.

The DeepSpeed runs use LLaMA-Factory's stock config files byte for byte (accelerate_configs/ds_z*_config.json),
which set round_robin_gradients, comms_config and monitor_config: what users pass is what the tests run.

Tolerance: weights within helpers.WEIGHTS_RTOL (1e-5) relative. Both runs see the same samples in every
micro-batch and normalise the loss by the global number of tokens (pairs), so they compute the same function; only
the float32 summation order differs (all-reduce or reduce-scatter of two partial sums versus one sum), which moves
weights by ~1e-7 (measured 1e-8 to 7e-7). A projection that edits the wrong entries moves them by ~1e-2
(round_robin_gradients before the fix: 9e-3). max_abs_cos after projection: float32 rounding leaves ~1e-6; the bug
left 0.09-0.18; the bound is 1e-3.
"""

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from helpers import (WEIGHTS_RTOL, load_weights, read_log, reference_projection, relative_error, run_script,
                     weights_relative_difference)
from test_dpo import dpo_args
from test_sft_e2e import flat_parameters, sft_args
from backends import PARTITION_KEYS, configure_deepspeed

CONFIGS = Path(__file__).resolve().parents[1] / "accelerate_configs"
# sha256 of LLaMA-Factory's examples/deepspeed/*.json (the files the reference commands pass); ds_z1 is ours, in the
# same form (stage 1 of the stock ds_z2 file).
STOCK_SHA256 = {
    "ds_z0_config.json": "e6ae99c0aea29574a996817120198a68aacb39ed8d300726dc871a6783f75696",
    "ds_z2_config.json": "86ff636c65649af30ba6f32d0c5faeb8309b3ca1cb8a4afd8d4cfd9f37996cd8",
    "ds_z3_config.json": "2ed81a7d135c5e50028f190f10c7f9a377eaedd6f1f0ffe9794e102070731adf",
    "ds_z2_offload_config.json": "fe0feb28236ba581ab44c5ece35caca085c2628a14f0db33c48ff17be0130647",
    "ds_z3_offload_config.json": "b6aa3335f4e227f02a84f5ea5770ff29db50eeab46a52a6dd88161959afa7a4a",
}
ZERO = {"zero0": "ds_z0_config.json", "zero1": "ds_z1_config.json", "zero2": "ds_z2_config.json",
        "zero3": "ds_z3_config.json", "zero2_offload": "ds_z2_offload_config.json",
        "zero3_offload": "ds_z3_offload_config.json"}
BACKENDS = {"ddp": [], **{name: ["--deepspeed", f"accelerate_configs/{file}"] for name, file in ZERO.items()}}
# How run_script launches an FSDP2 run: LLaMA-Factory's fsdp2_config.yaml (tests/test_fsdp2.py), in float32.
LAUNCH = {"fsdp2": dict(launcher="accelerate", config_file=CONFIGS / "fsdp2_config.yaml",
                        launch_args=["--mixed_precision", "no"])}
SCRIPTS = {"sft": ("train_sft_pg.py", sft_args), "dpo": ("train_dpo_pg.py", dpo_args)}
MAX_COS = 1e-3


def test_configs_are_llama_factorys_stock_files():
    for name, digest in STOCK_SHA256.items():
        assert hashlib.sha256((CONFIGS / name).read_bytes()).hexdigest() == digest, name


# Every stock file with SFT in both scopes; DPO, whose projection path is SFT's, on the files that hold a DPO
# reference model differently (DDP, ZeRO-1/2/3, both offload files), one scope each, alternating.
DPO_RUNS = [("ddp", "per_param"), ("zero1", "global"), ("zero2", "per_param"), ("zero3", "global"),
            ("zero2_offload", "global"), ("zero3_offload", "per_param")]
TWO_PROCESS_RUNS = [(backend, "sft", scope) for backend in BACKENDS for scope in ("per_param", "global")] + \
    [(backend, "dpo", scope) for backend, scope in DPO_RUNS]


@pytest.mark.parametrize("backend, script, scope", TWO_PROCESS_RUNS)
def test_two_processes_equal_one(tiny_model, tmp_path, single_runs, backend, script, scope):
    path, make_args = SCRIPTS[script]
    run_script(path, make_args(tiny_model, tmp_path, base_scope=scope, per_device_train_batch_size=2, max_steps=4)
               + BACKENDS[backend], nproc=2)
    single = single_runs(script, scope)
    assert weights_relative_difference(load_weights(single), load_weights(tmp_path)) <= WEIGHTS_RTOL
    assert read_log(tmp_path)[-1]["loss"] == pytest.approx(read_log(single)[-1]["loss"], rel=WEIGHTS_RTOL)
    assert all(record["max_abs_cos"] < MAX_COS for record in read_log(tmp_path))


# ZeRO-2 and ZeRO-3 in both scopes; stage 0 (DDP) and the offload files, whose partitions are ZeRO-2's and
# ZeRO-3's, in one scope each.
@pytest.mark.parametrize("backend, scope", [("zero2", "per_param"), ("zero2", "global"), ("zero3", "per_param"),
                                            ("zero3", "global"), ("zero0", "global"), ("zero2_offload", "per_param"),
                                            ("zero3_offload", "global")])
def test_three_processes_equal_one(tiny_model, tmp_path, single_runs, backend, scope):
    """Three ranks: the tiny model's tensor sizes are not multiples of 3, so ZeRO pads partitions and splits
    parameters across rank boundaries at odd offsets, which two ranks never do."""
    assert any(weight.numel() % 3 for weight in load_weights(tiny_model).values())
    run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path, base_scope=scope, per_device_train_batch_size=2,
                                           max_steps=4) + BACKENDS[backend], nproc=3)
    single = single_runs("sft", scope, batch_size=6)
    assert weights_relative_difference(load_weights(single), load_weights(tmp_path)) <= WEIGHTS_RTOL
    assert all(record["max_abs_cos"] < MAX_COS for record in read_log(tmp_path))


# Each zero_optimization key that moves gradient partitions, flipped from the stock file one at a time.
EXACT_SETTINGS = [
    ("zero2", {"round_robin_gradients": False}),
    ("zero2", {"overlap_comm": True}),
    ("zero2", {"contiguous_gradients": False}),
    ("zero2", {"reduce_scatter": False}),
    ("zero2", {"reduce_bucket_size": 2000}),  # many buckets
    ("zero2", {"allgather_bucket_size": 2000}),
    ("zero2", {"use_multi_rank_bucket_allreduce": False}),
    ("zero3", {"stage3_param_persistence_threshold": 0}),  # the stock "auto" keeps small parameters whole
    ("zero3", {"sub_group_size": 3000}),  # several sub-groups
    ("zero3", {"stage3_max_live_parameters": 1000}),
    ("zero3", {"overlap_comm": True}),
    ("zero3", {"contiguous_gradients": False}),
    ("zero3", {"reduce_bucket_size": 2000}),
]


def flipped_config(tmp_path, backend, zero=None, **top):
    config = json.loads((CONFIGS / ZERO[backend]).read_text())
    config["zero_optimization"].update(zero or {})
    config.update(top)
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(config))
    return ["--deepspeed", path]


@pytest.mark.parametrize("backend, zero", EXACT_SETTINGS, ids=[f"{b}-{next(iter(z))}" for b, z in EXACT_SETTINGS])
def test_each_partition_setting_is_exact(tiny_model, tmp_path, single_runs, backend, zero):
    assert set(zero) <= set(PARTITION_KEYS)
    run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path / "run", per_device_train_batch_size=2, max_steps=4)
               + flipped_config(tmp_path, backend, zero), nproc=2)
    assert weights_relative_difference(load_weights(single_runs("sft", "per_param")), load_weights(tmp_path / "run")) \
        <= WEIGHTS_RTOL
    assert all(record["max_abs_cos"] < MAX_COS for record in read_log(tmp_path / "run"))


def test_bfloat16_gradient_accumulation_projects_at_bfloat16_precision(tiny_model, tmp_path, single_runs):
    """data_types.grad_accum_dtype bf16 with float32 weights (ZeRO-3): the gradient is accumulated and projected in
    bfloat16, 8 significant bits, so max_abs_cos stays below 4 x 2^-8 (measured 2e-3 to 4e-3) and the weights
    drift from the float32 run by the rounding of 4 steps' gradients (measured 4.8e-4; bound 4e-3)."""
    run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path / "run", per_device_train_batch_size=2, max_steps=4)
               + flipped_config(tmp_path, "zero3", data_types={"grad_accum_dtype": "bf16"}), nproc=2)
    single = load_weights(single_runs("sft", "per_param"))
    assert 0 < weights_relative_difference(single, load_weights(tmp_path / "run")) <= 4e-3
    assert all(record["max_abs_cos"] < 4 * 2.0 ** -8 for record in read_log(tmp_path / "run"))


@pytest.mark.parametrize("key, value", [("zero_quantized_gradients", True), ("zero_quantized_weights", True),
                                        ("zero_hpz_partition_size", 2)])
def test_zero_plus_plus_settings_are_refused_by_name(key, value):
    with pytest.raises(SystemExit, match=f"zero_optimization.{key}"):
        configure_deepspeed(ds_config(stage=3, **{key: value}), flags(), world_size=2)


@pytest.mark.parametrize("mode, message", [
    ("hp_mapping", "but the optimizer stepped with one of norm"),  # the mapping before the fix: other memory
    ("swapped", "parameter pieces are not where the projection's coordinates put them"),  # right memory, wrong map
])
def test_guard_stops_a_wrong_slice_mapping(tiny_model, tmp_path, mode, message):
    result = run_script("tests/workers/sabotage_worker.py", [mode] + sft_args(tiny_model, tmp_path, max_steps=2,
                                                                             per_device_train_batch_size=2)
                        + BACKENDS["zero2"], nproc=2, expect_ok=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "OGPSA guard" in output and message in output
    assert "round_robin_gradients=True" in output  # names the stock file's non-default partition setting
    assert not (tmp_path / "model.safetensors").exists()


def test_update_projection_under_ddp_equals_one_process(tiny_model, tmp_path):
    """DPO (the other loop), global scope: every rank projects the same replicated update."""
    common = dict(base_scope="global", max_steps=4, base_project_update=True)
    run_script("train_dpo_pg.py", dpo_args(tiny_model, tmp_path / "single", per_device_train_batch_size=4, **common))
    run_script("train_dpo_pg.py", dpo_args(tiny_model, tmp_path / "ddp", per_device_train_batch_size=2, **common),
               nproc=2)
    difference = weights_relative_difference(load_weights(tmp_path / "single"), load_weights(tmp_path / "ddp"))
    assert difference <= WEIGHTS_RTOL
    assert read_log(tmp_path / "ddp")[-1]["update_removed_fraction"] > 0


# ZeRO-2 and ZeRO-3 with both scripts and both scopes; 3 ranks (odd partition splits), ZeRO-1 (ZeRO-2's optimizer
# step, with the gradient unpartitioned) and offload with SFT only, which shares the DPO script's update-projection
# path, in one scope each.
UPDATE_RUNS = [(backend, 2, script, scope) for backend in ("zero2", "zero3") for script in ("sft", "dpo")
               for scope in ("per_param", "global")] + \
    [("zero2", 3, "sft", "global"), ("zero3", 3, "sft", "per_param"), ("zero1", 2, "sft", "per_param"),
     ("zero2_offload", 2, "sft", "global"), ("zero3_offload", 2, "sft", "per_param")]


@pytest.mark.parametrize("backend, nproc, script, scope", UPDATE_RUNS)
def test_update_projection_under_zero_equals_one_process(tiny_model, tmp_path, single_runs, backend, nproc, script,
                                                          scope):
    """Each rank projects the change of its float32 master partition once every (sub-)group has stepped (on the CPU
    under offload); with 3 ranks parameters are split between partitions at odd offsets. The update projection
    moves the weights by ~1e-3 (checked below), 100x more than the tolerance, so a rank that skipped it, or
    projected with another rank's coordinates, would fail."""
    path, make_args = SCRIPTS[script]
    run_script(path, make_args(tiny_model, tmp_path, base_scope=scope, per_device_train_batch_size=2, max_steps=4,
                               base_project_update=True) + BACKENDS[backend], nproc=nproc)
    single = load_weights(single_runs(script, scope, 2 * nproc, project_update=True))
    assert weights_relative_difference(single, load_weights(tmp_path)) <= WEIGHTS_RTOL
    without = load_weights(single_runs(script, scope, 2 * nproc))
    assert weights_relative_difference(single, without) > 100 * WEIGHTS_RTOL
    log = read_log(tmp_path)
    assert all(record["max_abs_cos"] < MAX_COS and record["update_removed_fraction"] > 0 for record in log)


@pytest.fixture(scope="module")
def one_step_basis(tiny_model, tmp_path_factory):
    """Per scope, the basis of a one-process run's first step, in the parameters' order."""
    cache = {}

    def get(scope):
        if scope not in cache:
            out = tmp_path_factory.mktemp(f"one-step-{scope}")
            run_script("train_sft_pg.py", sft_args(tiny_model, out, save_strategy="steps", save_steps=1,
                                                   **one_step_args(scope)))
            cache[scope] = load_file(str(out / "checkpoint-1" / "ogpsa_basis_0.safetensors"))["basis"]
        return cache[scope]

    return get


def one_step_args(scope, **overrides):
    return dict(base_scope=scope, max_steps=1, learning_rate=1e-3, weight_decay=0.01, **overrides)


@pytest.mark.parametrize("backend, scope", [("zero2", "per_param"), ("zero3", "global")])  # each stage and scope once
def test_update_projection_under_zero_removes_the_basis_component(tiny_model, tmp_path, one_step_basis, backend,
                                                                  scope):
    """One AdamW step under ZeRO equals the same backend's step from the projected gradient minus its basis
    component, projected in float64 with the one-process basis (the one-process test in test_sft_e2e, extended).
    Both steps come from the same backend because Adam's first step, g / (|g| + eps), turns the float32 rounding
    in which backends differ into O(1) changes of coordinates whose gradient is near zero. Within 1e-4, as there:
    the bases differ by float32 rounding (~1e-7) and the float32 projection of a step that loses 3-4% to it
    leaves ~2e-6."""
    initial, lengths = flat_parameters(tiny_model)
    steps = {}
    for project_update in (False, True):
        out = tmp_path / str(project_update)
        run_script("train_sft_pg.py", sft_args(tiny_model, out, **one_step_args(
            scope, base_project_update=project_update, per_device_train_batch_size=2)) + BACKENDS[backend], nproc=2)
        steps[project_update] = flat_parameters(out)[0] - initial
    expected = reference_projection(steps[False], one_step_basis(scope), lengths, scope)
    assert relative_error(steps[False], expected) > 1e-2  # there is something to remove ...
    assert relative_error(steps[True], expected) <= 1e-4  # ... and exactly that is removed


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


@pytest.mark.parametrize("backend", ["single", "ddp", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload",
                                     "fsdp2"])
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
                                           **CLIP_RUN) + BACKENDS.get(backend, []), nproc=nproc,
               **LAUNCH.get(backend, {}))
    record = read_log(tmp_path)[0]
    assert record["grad_norm_projected"] == pytest.approx(0.1 * record["grad_norm"], rel=1e-4)
    plain, ogpsa = load_weights(plain_step), load_weights(tmp_path)
    step = {k: (ogpsa[k].double() - initial[k].double()) for k in initial}
    expected = {k: 0.1 * (plain[k].double() - initial[k].double()) for k in initial}
    error = sum(((step[k] - expected[k]) ** 2).sum() for k in step).sqrt()
    assert error / sum((v ** 2).sum() for v in expected.values()).sqrt() < 1e-4


@pytest.mark.parametrize("backend, script, project_update", [("zero3", "dpo", False), ("zero2", "dpo", True),
                                                             ("zero3", "sft", True)])
def test_resume_under_zero_equals_uninterrupted(tiny_model, tmp_path, backend, script, project_update):
    path, make_args = SCRIPTS[script]
    common = dict(per_device_train_batch_size=2, lr_scheduler_type="cosine", base_num_steps=4, max_steps=6,
                  base_project_update=project_update)
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
    assert weights_relative_difference(load_weights(tmp_path / "full"), load_weights(part)) <= WEIGHTS_RTOL
    if (backend, script, project_update) == ("zero2", "sft", False):  # another process count: refused, not mis-sharded
        result = run_script(path, make_args(tiny_model, part, resume_from_checkpoint=part / "checkpoint-3",
                                            **{**saving, "per_device_train_batch_size": 4}) + BACKENDS[backend],
                            nproc=1, launcher="torchrun", expect_ok=False)
        assert result.returncode != 0 and "saved by 2 processes" in result.stdout + result.stderr


def ds_config(**zero):
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": 2, **zero}}


def flags(**kw):
    return SimpleNamespace(**{"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                              "max_grad_norm": 1.0, "optim": "adamw_torch", **kw})


def test_deepspeed_auto_values_come_from_the_flags():
    config = ds_config()
    configure_deepspeed(config, flags(), world_size=8)
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"], config["gradient_clipping"]) == (4, 2, 64, 1.0)
    config = ds_config(stage=3)
    configure_deepspeed(config, flags(), world_size=1)
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_offload_moves_clipping_to_the_backend_and_keeps_sgd():
    """DeepSpeed takes the norm during backward under offload: the backend clips the projected gradient instead.
    Accelerate would swap --optim sgd for DeepSpeedCPUAdam; AdamW becomes DeepSpeedCPUAdam in AdamW mode."""
    for optim, keeps_torch_optimizer in [("adamw_torch", False), ("sgd", True)]:
        config = json.loads((CONFIGS / "ds_z2_offload_config.json").read_text())
        configure_deepspeed(config, flags(optim=optim), world_size=2)
        assert config["gradient_clipping"] == 0.0
        assert (config.get("zero_force_ds_cpu_optimizer") is False) == keeps_torch_optimizer


@pytest.mark.parametrize("config, message", [
    (ds_config(offload_optimizer={"device": "nvme"}), "zero_optimization.offload_optimizer.device nvme"),
    (ds_config(stage=3, offload_param={"device": "nvme"}), "zero_optimization.offload_param.device nvme"),
    (ds_config(stage=4), "zero_optimization.stage 4"),
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
    single = load_weights(single_runs("sft", "per_param"))
    assert weights_relative_difference(single, load_weights(tmp_path)) <= WEIGHTS_RTOL


def test_basis_memory_per_rank_is_k_times_the_partition(tiny_model, tmp_path):
    """Each ZeRO rank stores K x (its partition) basis entries, not K x P."""
    run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path, per_device_train_batch_size=2, max_steps=2,
                                           save_strategy="steps", save_steps=2) + BACKENDS["zero2"], nproc=2)
    total = sum(v.numel() for v in load_weights(tiny_model).values())
    bases = [load_file(str(tmp_path / "checkpoint-2" / f"ogpsa_basis_{r}.safetensors"))["basis"] for r in range(2)]
    assert all(b.shape[0] == 2 for b in bases)  # K = 2 reference sets
    assert sum(b.shape[1] for b in bases) == total and max(b.shape[1] for b in bases) <= total // 2 + 64
    assert torch.isfinite(torch.cat(bases, 1)).all()
