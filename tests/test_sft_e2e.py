"""train_sft_pg.py end to end on the tiny model (CPU)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (WEIGHTS_RTOL, load_weights, read_log, reference_projection, relative_error, run_script,
                     weights_relative_difference)
from run_guard import UserError
from arguments import build_parser, check_args

SAFETY = "demo_safety_sft"
REFERENCE = "demo_general_a_sft,demo_general_b_sft"


def sft_args(model, out, **overrides):
    args = {"model_name_or_path": model, "dataset": SAFETY, "base_dataset": REFERENCE, "base_num_samples": 40,
            "base_num_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
            "learning_rate": 1e-3, "max_steps": 6, "logging_steps": 2, "save_strategy": "no", "output_dir": out,
            "template": "qwen", "max_samples": 64,
            "gradient_checkpointing": False}  # CI time: the tests that need it pass it
    args.update(overrides)
    return [str(x) for k, v in args.items() if v is not None for x in (f"--{k}", v)]


def test_loss_decreases_logs_plot_and_saved_model_loads(tiny_model, tmp_path):
    out = tmp_path / "run"
    run_script("train_sft_pg.py", sft_args(tiny_model, out, max_steps=30, logging_steps=5, max_samples=None,
                                           per_device_train_batch_size=8, plot_loss=True,
                                           include_num_input_tokens_seen=True))
    log = read_log(out)
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    for key in ("step", "epoch", "loss", "learning_rate", "grad_norm", "grad_norm_projected", "removed_fraction",
                "max_abs_cos", "num_input_tokens_seen"):
        assert key in log[-1]
    assert all(r["max_abs_cos"] < 1e-4 for r in log)
    assert all(0 <= r["removed_fraction"] < 1 and r["grad_norm_projected"] <= r["grad_norm"] for r in log)
    assert (out / "training_loss.png").stat().st_size > 1000
    assert json.loads((out / "training_args.json").read_text())["base_method"] == "orthogonal_projection"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert torch.equal(model.model.embed_tokens.weight, load_weights(out)["model.embed_tokens.weight"])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "How do I <harmful request 5>?"}],
                                           tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are Qwen")  # --template qwen was saved with the model
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


@pytest.mark.parametrize("scope", ["per_param", "global"])
def test_resumed_run_equals_uninterrupted(tiny_model, tmp_path, scope):
    common = dict(base_scope=scope, lr_scheduler_type="cosine", warmup_steps=2, base_num_steps=4)
    run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path / "full", **common))
    interrupted = tmp_path / "interrupted"
    run_script("train_sft_pg.py", sft_args(tiny_model, interrupted, save_strategy="steps", save_steps=3, **common))
    shutil.rmtree(interrupted / "checkpoint-6")
    (interrupted / "model.safetensors").unlink()
    run_script("train_sft_pg.py", sft_args(tiny_model, interrupted, save_strategy="steps", save_steps=3,
                                           resume_from_checkpoint="True", **common))
    difference = weights_relative_difference(load_weights(tmp_path / "full"), load_weights(interrupted))
    assert difference <= WEIGHTS_RTOL, difference


@pytest.mark.parametrize("scope", ["per_param", "global"])
def test_reference_set_equal_to_the_training_batch_blocks_the_update(tiny_model, tmp_path, scope):
    """One direction, SGD, one full-batch step: the training gradient IS the reference gradient."""
    initial = load_weights(tiny_model)
    updates = {}
    for method in ("none", "orthogonal_projection"):
        out = tmp_path / method
        run_script("train_sft_pg.py", sft_args(
            tiny_model, out, dataset="demo_general_a_sft", base_dataset="demo_general_a_sft", max_samples=16,
            base_num_samples=16, per_device_train_batch_size=16, gradient_accumulation_steps=1, optim="sgd",
            max_steps=1, learning_rate=0.1, max_grad_norm=0, base_method=method, base_scope=scope,
            lr_scheduler_type="constant"))
        weights = load_weights(out)
        updates[method] = torch.cat([(weights[k].double() - initial[k].double()).flatten() for k in initial])
    ratio = (updates["orthogonal_projection"].norm() / updates["none"].norm()).item()
    assert updates["none"].norm() > 0 and ratio <= 1e-3, ratio


def flat_parameters(folder):
    """A saved model's trainable parameters, flat in the training scripts' order (float64), and their sizes."""
    from transformers import AutoModelForCausalLM

    params = [p.detach().double().flatten() for p in AutoModelForCausalLM.from_pretrained(folder).parameters()]
    return torch.cat(params), [p.numel() for p in params]


@pytest.mark.parametrize("scope", ["per_param", "global"])
def test_update_projection_removes_the_basis_component_of_the_adamw_step(tiny_model, tmp_path, scope):
    """AdamW rescales each coordinate, so the step it takes from a projected gradient keeps a component in the
    basis; --base_project_update makes the step that step minus its basis component (float64 reference)."""
    initial, lengths = flat_parameters(tiny_model)
    common = dict(base_scope=scope, max_steps=1, learning_rate=1e-3, weight_decay=0.01, save_strategy="steps",
                  save_steps=1)
    run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path / "gradient", **common))
    run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path / "update", base_project_update=True, **common))
    step_from_gradient = flat_parameters(tmp_path / "gradient")[0] - initial
    step_projected = flat_parameters(tmp_path / "update")[0] - initial
    basis = load_file(str(tmp_path / "update" / "checkpoint-1" / "ogpsa_basis_0.safetensors"))["basis"]
    expected = reference_projection(step_from_gradient, basis, lengths, scope)
    removed = ((step_from_gradient - expected).norm() / step_from_gradient.norm()).item()
    assert removed > 1e-2, removed  # there is something to remove (observed 3-4%) ...
    assert relative_error(step_projected, expected) <= 1e-4  # ... and exactly that is removed (~1.6e-6)
    assert read_log(tmp_path / "update")[-1]["update_removed_fraction"] > 0


def reference_dataset_dir(tmp_path):
    """The reference command's dataset names, pointing at the demo files (64 safety rows keep the test short)."""
    data = Path(__file__).resolve().parents[1] / "data"
    rows = json.loads((data / "demo_safety_sft.json").read_text())[:64]
    (tmp_path / "safety.json").write_text(json.dumps(rows))
    info = {"saferlhf2_sft": {"file_name": "safety.json"},
            "ultrafeedback_sft_200": {"file_name": str(data / "demo_general_a_sft.json")},
            "halueval_sft_200": {"file_name": str(data / "demo_general_b_sft.jsonl"), "formatting": "sharegpt"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path


def test_reference_command_runs_unchanged_and_save_only_model_refuses_resume(tiny_model, tmp_path):
    out = tmp_path / "out"
    command = f"""--stage sft_pg --do_train True --model_name_or_path {tiny_model} --preprocessing_num_workers 16
        --finetuning_type full --template qwen --flash_attn auto --dataset_dir {reference_dataset_dir(tmp_path)}
        --dataset saferlhf2_sft --cutoff_len 2048 --learning_rate 1e-06 --num_train_epochs 3.0 --max_samples 100000
        --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --lr_scheduler_type cosine
        --max_grad_norm 1.0 --logging_steps 5 --save_only_model True --save_strategy epoch --warmup_steps 0
        --report_to none --output_dir {out} --bf16 True --plot_loss True --trust_remote_code True
        --ddp_timeout 180000000 --include_num_input_tokens_seen True --optim adamw_torch
        --base_dataset ultrafeedback_sft_200,halueval_sft_200 --base_num_samples 200 --base_num_steps 30
        --base_method orthogonal_projection --base_threshold 0""".split()
    run_script("train_sft_pg.py", command, launcher="accelerate")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    assert read_log(out)[-1]["step"] == 12 and (out / "training_loss.png").exists()
    assert not (out / "checkpoint-4" / "optimizer.safetensors").exists()
    result = run_script("train_sft_pg.py", command + ["--resume_from_checkpoint", str(out / "checkpoint-8")],
                        expect_ok=False)
    assert result.returncode != 0 and "was saved with --save_only_model True" in result.stderr


def test_an_interrupted_save_leaves_the_previous_checkpoint_usable(tiny_model, tmp_path):
    out = tmp_path / "run"
    run_script("train_sft_pg.py", sft_args(tiny_model, out, save_strategy="steps", save_steps=2,
                                           save_total_limit=2))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    # A save killed midway leaves only a partial folder behind; it is never taken for a checkpoint.
    shutil.rmtree(out / "checkpoint-6")
    (out / ".partial-checkpoint-6").mkdir()
    (out / ".partial-checkpoint-6" / "model.safetensors").write_bytes(b"truncated")
    result = run_script("train_sft_pg.py", sft_args(tiny_model, out, save_strategy="steps", save_steps=2,
                                                    resume_from_checkpoint="True"))
    assert "resumed from" in result.stdout + result.stderr and "checkpoint-4 at step 4" in result.stdout
    assert (out / "checkpoint-6" / "trainer_state.json").exists()


def test_a_new_run_refuses_to_overwrite_checkpoints(tiny_model, tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    with pytest.raises(UserError, match="already holds checkpoints"):
        check_args(build_parser("", "sft_pg", 1e-5).parse_args(sft_args(tiny_model, tmp_path)), "sft_pg")


@pytest.mark.parametrize("flags, message", [
    (["--stage", "dpo_pg"], "--stage dpo_pg is not run by this script"),
    (["--fp16", "True"], "--fp16 is not supported"),
    (["--do_train", "False"], "only train"),
    (["--stage", "sft"], "--stage sft trains without projection: pass --base_method none"),
    (["--base_dataset", ""], "needs --base_dataset"),
    (["--base_scale", "0.5"], "--base_scale only applies to --base_method threshold"),
    (["--base_project_update", "True", "--base_method", "threshold"], "needs --base_method orthogonal_projection"),
])
def test_flags_that_make_no_sense_are_refused(tiny_model, tmp_path, flags, message):
    args = build_parser("", "sft_pg", 1e-5).parse_args(sft_args(tiny_model, tmp_path) + flags)
    with pytest.raises(UserError, match=message):
        check_args(args, "sft_pg")
