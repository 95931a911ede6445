"""FSDP2 (torch's fully_shard through Accelerate) with 2-3 CPU processes (gloo) against one process.

The runs use LLaMA-Factory's stock FSDP2 files (accelerate_configs/fsdp2_config.yaml, fsdp_v2_config.yaml,
fsdp_v2_offload_config.yaml) byte for byte, launched with `accelerate launch --config_file`, as users launch them.
They set mixed_precision bf16; the float32 comparisons launch them with `--mixed_precision no`, the bf16 test as
they are. Between them the runs cover every fsdp_config key that decides where a gradient entry lives: the
transformer-layer wrap and no wrap, reshard_after_forward true and false, cpu_ram_efficient_loading true and
false, FULL and SHARDED state dicts, CPU offload, activation checkpointing (FSDP's and --gradient_checkpointing). One
DPO run is padding-free (--padding_free True: the policy's and the sharded reference model's forward passes on packed
rows) against the padded one-process run: the same sums (tests/test_throughput.py), so the same tolerance.

Tolerance: weights within helpers.WEIGHTS_RTOL (1e-5) relative, as for DDP and ZeRO: both runs see the same samples
in every micro-batch and normalise the loss by the global number of tokens (pairs), so only the float32 summation
order differs (a reduce-scatter of per-rank sums instead of one sum), which moves weights by ~1e-7; a projection that
edits the wrong entries moves them by ~1e-2. max_abs_cos after projection: float32 rounding leaves ~1e-7.
"""

import hashlib
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import WEIGHTS_RTOL, load_weights, read_log, run_script, weights_relative_difference
from test_dpo import dpo_args
from test_sft_e2e import sft_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "accelerate_configs"
# sha256 of LLaMA-Factory's examples/accelerate/*.yaml (FSDP2) and of its FSDP1 file (kept with the tests: refused).
FSDP1_CONFIG = ROOT / "tests" / "configs" / "fsdp_v1_config.yaml"
STOCK_SHA256 = {
    CONFIGS / "fsdp2_config.yaml": "01f6350f26f248485e82c6ce967ddc24dc7bd2fd40c4f9f7e820110f876d2fda",
    CONFIGS / "fsdp_v2_config.yaml": "66e485b438f1937ea84aa4cd57d44b23bdf2bf382124a7a4ae884c84fd158cf5",
    CONFIGS / "fsdp_v2_offload_config.yaml": "f5ca0d71ec88bf99ea61ea3eaa71a507a71476d5a661d6a940c71e37b884fcd7",
    FSDP1_CONFIG: "5bf20ad9f83c6fce41a67eae211b89039f616c126527711cb26053d428924f97",
}
SCRIPTS = {"sft": ("train_sft_pg.py", sft_args), "dpo": ("train_dpo_pg.py", dpo_args)}
FLOAT32 = ["--mixed_precision", "no"]
MAX_COS = 1e-3


def test_configs_are_llama_factorys_stock_files():
    for path, digest in STOCK_SHA256.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path.name


def launch(script, args, config, nproc, launch_args=FLOAT32, expect_ok=True):
    return run_script(SCRIPTS[script][0], args, nproc=nproc, launcher="accelerate", config_file=CONFIGS / config,
                      launch_args=launch_args, expect_ok=expect_ok)


# (script, scope, processes, config, --base_project_update, extra flags, extra launch flags). With 3 processes the
# tiny model's sizes are not multiples of 3: the dim-0 shards are uneven, and a bias of 2 rows has an empty one.
RUNS = {
    "sft-per_param-2": ("sft", "per_param", 2, "fsdp2_config.yaml", False,
                        {"save_strategy": "steps", "save_steps": 2}, []),
    "sft-global-3": ("sft", "global", 3, "fsdp_v2_config.yaml", False, {"gradient_checkpointing": True}, []),
    "sft-per_param-3-update": ("sft", "per_param", 3, "fsdp2_config.yaml", True, {}, [
        "--fsdp_reshard_after_forward", "false", "--fsdp_cpu_ram_efficient_loading", "false"]),
    "dpo-global-2-padding-free": ("dpo", "global", 2, "fsdp2_config.yaml", False, {"padding_free": True},
                                  ["--fsdp_activation_checkpointing", "true"]),
    "dpo-per_param-2-offload": ("dpo", "per_param", 2, "fsdp_v2_offload_config.yaml", False,
                                {"precompute_ref_log_probs": True}, []),
    "dpo-global-2-update": ("dpo", "global", 2, "fsdp2_config.yaml", True, {}, []),
}


@pytest.fixture(scope="module")
def fsdp2_runs(tiny_model, tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            script, scope, nproc, config, update, extra, launch_args = RUNS[name]
            out = tmp_path_factory.mktemp(f"fsdp2-{name}")
            result = launch(script, SCRIPTS[script][1](tiny_model, out, base_scope=scope, per_device_train_batch_size=2,
                                              max_steps=4, base_project_update=update, **extra), config, nproc,
                   FLOAT32 + launch_args)
            cache[name] = out, result.stdout
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(RUNS))
def test_fsdp2_equals_one_process(single_runs, fsdp2_runs, name):
    script, scope, nproc, _, update, extra, _ = RUNS[name]
    out, stdout = fsdp2_runs(name)
    assert f"engine: FSDP2 (fully_shard), {nproc} processes on cpu" in stdout
    single = single_runs(script, scope, 2 * nproc, update, **{k: v for k, v in extra.items()
                                                              if k == "precompute_ref_log_probs"})
    assert weights_relative_difference(load_weights(single), load_weights(out)) <= WEIGHTS_RTOL
    log = read_log(out)
    assert log[-1]["loss"] == pytest.approx(read_log(single)[-1]["loss"], rel=WEIGHTS_RTOL)
    assert all(record["max_abs_cos"] < MAX_COS for record in log)
    if update:
        assert all(record["update_removed_fraction"] > 0 for record in log)
        without = load_weights(single_runs(script, scope, 2 * nproc))  # the flag itself moves the weights
        assert weights_relative_difference(load_weights(single), without) > 100 * WEIGHTS_RTOL


def test_checkpoints_hold_one_basis_shard_per_rank(tiny_model, fsdp2_runs):
    folder = fsdp2_runs("sft-per_param-2")[0] / "checkpoint-2"
    shards = [load_file(str(folder / f"ogpsa_basis_{rank}.safetensors"))["basis"] for rank in range(2)]
    trainable = sum(weight.numel() for weight in load_weights(tiny_model).values())  # the tied head saved once
    assert [shard.shape[0] for shard in shards] == [2, 2]  # two reference sets x one direction
    assert sum(shard.shape[1] for shard in shards) == trainable  # each rank holds K x its own rows, no more


@pytest.fixture(scope="module")
def resumed(tiny_model, fsdp2_runs, tmp_path_factory):
    """The 2-process SFT run resumed from its step-2 checkpoint in another folder."""
    full = fsdp2_runs("sft-per_param-2")[0]
    out = tmp_path_factory.mktemp("fsdp2-resumed")
    shutil.copytree(full / "checkpoint-2", out / "checkpoint-2")
    launch("sft", sft_args(tiny_model, out, per_device_train_batch_size=2, max_steps=4, save_strategy="steps",
                           save_steps=2, resume_from_checkpoint=True), "fsdp2_config.yaml", 2)
    return full, out


def test_resume_is_exact(resumed):
    full, out = resumed
    assert weights_relative_difference(load_weights(full), load_weights(out)) == 0.0
    assert [r["loss"] for r in read_log(full) if r["step"] > 2] == [r["loss"] for r in read_log(out)]


@pytest.mark.parametrize("nproc, launcher, message", [
    (3, "accelerate", "it was saved by 2 processes and FSDP2 shards the optimizer state"),
    (1, None, "it was saved under FSDP2 and this run uses one process or DDP"),
])
def test_resume_with_another_layout_is_refused(tiny_model, tmp_path, fsdp2_runs, nproc, launcher, message):
    checkpoint = fsdp2_runs("sft-per_param-2")[0] / "checkpoint-2"
    args = sft_args(tiny_model, tmp_path, per_device_train_batch_size=2, max_steps=4, resume_from_checkpoint=checkpoint)
    result = run_script("train_sft_pg.py", args, nproc=nproc, launcher=launcher, expect_ok=False,
                        config_file=CONFIGS / "fsdp2_config.yaml" if launcher else None, launch_args=FLOAT32)
    assert result.returncode != 0 and message in result.stderr


def test_bf16_mixed_precision_is_within_bf16_precision(tiny_model, tmp_path, single_runs):
    """The stock file as it is (mixed_precision bf16: bf16 compute and gradient reduction, float32 sharded
    parameters) with --bf16 True, against one process with --bf16 True (bf16 autocast). The two round differently
    (bf16 parameter copies and a bf16 reduce-scatter against autocast), so they differ by bf16 rounding, whose size
    this run measures itself: the one-process bf16 run's distance from the float32 one (3.3% of the training's change
    here). The FSDP2 run must stay within twice that of the bf16 run (measured 1.0x), and the projection stays exact
    in float32 on the float32 gradient shards (max_abs_cos ~1e-7)."""
    result = launch("sft", sft_args(tiny_model, tmp_path, per_device_train_batch_size=2, max_steps=4, bf16=True),
                    "fsdp2_config.yaml", 2, launch_args=[])
    assert "mixed precision: bfloat16 compute, bfloat16 gradient reduction, float32 sharded parameters" in \
        result.stdout
    initial = load_weights(tiny_model)
    bf16, float32, fsdp2 = (load_weights(single_runs("sft", "per_param", bf16=True)),
                            load_weights(single_runs("sft", "per_param")), load_weights(tmp_path))

    def distance(a, b):
        return sum(((a[k].double() - b[k].double()) ** 2).sum() for k in a).sqrt().item()

    assert distance(fsdp2, bf16) <= 2 * distance(bf16, float32)
    assert distance(bf16, float32) < 0.1 * distance(float32, initial)  # bf16 rounding, not another computation
    assert all(record["max_abs_cos"] < MAX_COS for record in read_log(tmp_path))


def test_guard_stops_a_wrong_shard_mapping(tiny_model, tmp_path):
    """Two equal-size parameters swapped in the coordinate map: the projection still edits the memory the optimizer
    reads (the norm check passes), so only the check of the map against the gradient views can see it."""
    result = run_script("tests/workers/sabotage_worker.py", ["fsdp2_swapped"] + sft_args(
        tiny_model, tmp_path, per_device_train_batch_size=2, max_steps=2), nproc=2, launcher="accelerate",
        config_file=CONFIGS / "fsdp2_config.yaml", launch_args=FLOAT32, expect_ok=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "OGPSA guard" in output
    assert "parameter pieces are not where the projection's coordinates put them" in output
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("config, launch_args, flags, message", [
    ("tests/configs/fsdp_v1_config.yaml", FLOAT32, [], "set fsdp_version: 2"),
    ("accelerate_configs/fsdp2_config.yaml", [], [], "sets mixed_precision: bf16 but --bf16 is not set"),
    ("accelerate_configs/fsdp2_config.yaml", FLOAT32 + ["--fsdp_auto_wrap_policy", "SIZE_BASED_WRAP"], [],
     "fsdp_auto_wrap_policy SIZE_BASED_WRAP"),
    ("accelerate_configs/fsdp2_config.yaml", FLOAT32, ["--deepspeed", "accelerate_configs/ds_z2_config.json"],
     "choose one engine"),
])
def test_what_fsdp2_cannot_honour_is_refused_by_name(tiny_model, tmp_path, config, launch_args, flags, message):
    result = run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path) + flags, nproc=2, launcher="accelerate",
                        config_file=ROOT / config, launch_args=launch_args, expect_ok=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and message in errors[0], result.stderr[-2000:]


@pytest.fixture
def one_process_group():
    import torch.distributed as dist

    from train_utils import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_slice_refuses_parameters_fsdp2_does_not_shard_on_dim_0(one_process_group):
    """What the slice's all-reduce of partial sums over all ranks assumes: every trainable parameter is a dim-0
    shard over all processes. A parameter FSDP2 leaves alone (fsdp_ignored_modules: its gradient is never reduced)
    and an HSDP-style 2-D layout (replicated across one mesh dimension: the all-reduce would count it twice) are
    refused by name."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from backends import Fsdp2GradSlice

    ignored = torch.nn.Parameter(torch.zeros(4, 2))
    with pytest.raises(SystemExit, match="does not shard the trainable parameter head.weight"):
        Fsdp2GradSlice([ignored], ["head.weight"])
    mesh = init_device_mesh("cpu", (1, 1))
    hybrid = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 2), mesh, [Replicate(), Shard(0)]))
    with pytest.raises(SystemExit, match="only plain FSDP"):
        Fsdp2GradSlice([hybrid], ["layer.weight"])
    plain = torch.nn.Parameter(distribute_tensor(torch.zeros(4, 2), init_device_mesh("cpu", (1,)), [Shard(0)]))
    assert Fsdp2GradSlice([plain], ["layer.weight"]).numel == 8
