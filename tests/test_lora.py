"""LoRA (--finetuning_type lora, on peft): OGPSA over the adapters only; one process against DDP, ZeRO-2, ZeRO-3 and
FSDP2 (LLaMA-Factory's stock DeepSpeed and FSDP2 files; FSDP2 launched in float32) with 2 processes; DPO's
disabled-adapter reference; resume; the saved adapter and the merged export; the LoRA flags.

Tolerances. Distributed runs and resumed runs compute the same function as one uninterrupted process, with float32
sums grouped differently: helpers.WEIGHTS_RTOL (1e-5), applied to the A and the B matrices separately, so that B
(zero at the start: all of it is training's change) is held to it relative to its own size. Logits are compared
relative to the adapter's effect on them (W + alpha / r x B A against W), about 5% of the logits after the 4 training
steps: float32 forward passes of the tiny model (hidden size 64, 2 layers) round at ~1e-6 of the logits, ~2e-5 of
that effect (LLaMA-Factory's merged load: 4e-6 to 6e-6 measured), so LOGITS_RTOL = 1e-4 leaves 5x; a wrong scale or
a missing module misses by O(1).
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import WEIGHTS_RTOL, read_log, run_script, weights_relative_difference
from run_guard import UserError
from test_backends import BACKENDS, LAUNCH
from test_dpo import dpo_args
from test_sft_e2e import sft_args
from arguments import build_parser, check_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"sft": ("train_sft_pg.py", sft_args), "dpo": ("train_dpo_pg.py", dpo_args)}
LOGITS_RTOL = 1e-4


def adapter(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_adapters_equal(expected, actual, rtol=WEIGHTS_RTOL):
    for kind in ("lora_A", "lora_B"):
        keys = [k for k in expected if f".{kind}." in k]
        assert keys and sorted(keys) == sorted(k for k in actual if f".{kind}." in k)
        difference = weights_relative_difference({k: expected[k] for k in keys}, {k: actual[k] for k in keys})
        assert difference <= rtol, (kind, difference)


def lora_run_args(script, model, out, **overrides):
    make_args = SCRIPTS[script][1]
    settings = dict(finetuning_type="lora", per_device_train_batch_size=4, max_steps=4, save_strategy="steps",
                    save_steps=2, logging_steps=1)
    return make_args(model, out, **(settings | overrides))


@pytest.fixture(scope="module")
def lora_runs(tiny_model, tmp_path_factory):
    """LoRA runs of 4 steps (checkpoint at step 2), one per (script, scope, update projection, method, backend),
    made on first use; "single" is one process with the global batch of the 2-process runs."""
    cache = {}

    def get(script, scope, project_update, method="orthogonal_projection", backend="single", padding_free=False):
        key = script, scope, project_update, method, backend, padding_free
        if key not in cache:
            out = tmp_path_factory.mktemp(f"lora-{'-'.join(map(str, key))}")
            single = backend == "single"
            args = lora_run_args(script, tiny_model, out, base_scope=scope, base_project_update=project_update,
                                 base_method=method, per_device_train_batch_size=4 if single else 2,
                                 export_merged=single, padding_free=padding_free)
            cache[key] = out, run_script(SCRIPTS[script][0], args + BACKENDS.get(backend, []),
                                         nproc=1 if single else 2, **LAUNCH.get(backend, {}))
        return cache[key]

    return get


PROJECTION = "orthogonal_projection"
DISTRIBUTED = [("ddp", "sft", "per_param", False, "threshold"), ("zero2", "sft", "global", True, PROJECTION),
               ("zero3", "sft", "per_param", True, PROJECTION), ("zero2", "dpo", "per_param", False, PROJECTION),
               ("zero3", "dpo", "global", True, PROJECTION), ("fsdp2", "sft", "per_param", True, PROJECTION),
               ("fsdp2", "dpo", "global", True, PROJECTION)]


@pytest.mark.parametrize("backend, script, scope, project_update, method", DISTRIBUTED)
def test_two_processes_equal_one(lora_runs, backend, script, scope, project_update, method):
    single, single_result = lora_runs(script, scope, project_update, method)
    multi, _ = lora_runs(script, scope, project_update, method, backend)
    assert_adapters_equal(adapter(single), adapter(multi))
    log = read_log(multi)
    assert method != PROJECTION or all(record["max_abs_cos"] < 1e-3 for record in log)
    if project_update:
        assert all(record["update_removed_fraction"] > 0 for record in log)
    # LoRA starts with B = 0, so every A's first reference gradient is zero; the log says so.
    assert "14 are LoRA A matrices, whose gradient is zero while B is zero" in single_result.stdout


def test_padding_free_equals_padded(lora_runs):
    """--padding_free (tests/test_throughput.py) with LoRA: DPO under DDP, where the policy, its disabled-adapter
    reference and the reference gradients all run on padding-free rows, ends with the padded one-process adapter."""
    single, _ = lora_runs("dpo", "per_param", False)
    packed, result = lora_runs("dpo", "per_param", False, backend="ddp", padding_free=True)
    assert "padding-free micro-batches" in result.stdout
    assert_adapters_equal(adapter(single), adapter(packed))


@pytest.mark.parametrize("backend, script, scope, project_update, method", [DISTRIBUTED[2], DISTRIBUTED[4]])
def test_resume_equals_uninterrupted(tiny_model, lora_runs, tmp_path, backend, script, scope, project_update, method):
    """The checkpoint holds the adapter, the optimizer state and the basis: the resumed run logs the same losses
    (its forward passes use the adapter it loaded) and ends with the same adapter."""
    full, _ = lora_runs(script, scope, project_update, method, backend)
    part = tmp_path / "part"
    shutil.copytree(full / "checkpoint-2", part / "checkpoint-2")
    assert not list((part / "checkpoint-2").glob("model*.safetensors"))  # the adapter only
    args = lora_run_args(script, tiny_model, part, base_scope=scope, base_project_update=project_update,
                         per_device_train_batch_size=2, resume_from_checkpoint="True")
    run_script(SCRIPTS[script][0], args + BACKENDS[backend], nproc=2)
    assert_adapters_equal(adapter(full), adapter(part))
    resumed, uninterrupted = read_log(part), [r for r in read_log(full) if r["step"] > 2]
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted] == [3, 4]
    for after, before in zip(resumed, uninterrupted):
        assert after["loss"] == pytest.approx(before["loss"], rel=WEIGHTS_RTOL)


@pytest.mark.parametrize("scope", ["per_param", "global"])
def test_projected_lora_step_along_its_own_reference_gradient_vanishes(tiny_model, tmp_path, scope):
    """Reference set = the training batch, SGD, one step, no clipping: the projection removes the whole gradient of
    the adapters. It starts from a trained adapter (B not zero), so that the A matrices have a gradient too."""
    start = tmp_path / "start"
    run_script("train_sft_pg.py", sft_args(tiny_model, start, finetuning_type="lora", stage="sft",
                                           base_method="none", base_dataset=None, max_steps=3, learning_rate=1e-2))
    one_step = dict(finetuning_type="lora", adapter_name_or_path=start, dataset="demo_safety_sft",
                    base_dataset="demo_safety_sft", max_samples=4, base_num_samples=4, per_device_train_batch_size=4,
                    gradient_accumulation_steps=1, max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=0)
    run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path / "plain", stage="sft", base_method="none",
                                           **(one_step | {"base_dataset": None})))
    result = run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path / "projected", base_scope=scope,
                                                    **one_step))
    assert "reference gradient is zero" not in result.stdout  # B is not zero: every tensor has a direction
    initial = adapter(start)
    plain = {k: v - initial[k] for k, v in adapter(tmp_path / "plain").items()}
    projected = {k: v - initial[k] for k, v in adapter(tmp_path / "projected").items()}
    assert step_norm(plain, "lora_A") > 0.1 * step_norm(plain, "lora_B") > 0  # both kinds move
    # float32: the gradient and its reference direction agree to ~1e-6 relative, and so does what is left
    assert step_norm(projected) < 1e-3 * step_norm(plain), step_norm(projected) / step_norm(plain)


@pytest.mark.parametrize("reference", ["ref_model", "precompute_ref_log_probs"])
def test_dpo_disabled_adapter_reference_equals_the_base_model(tiny_model, tmp_path, lora_runs, reference):
    """The default LoRA reference (the policy with its adapter off) gives the run an explicit copy of the base model
    as --ref_model gives, and so do reference log-probs precomputed with the adapter off."""
    default, _ = lora_runs("dpo", "per_param", False)
    log = read_log(default)
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # B = 0: the policy starts as its reference
    extra = {"ref_model": tiny_model} if reference == "ref_model" else {"precompute_ref_log_probs": True}
    run_script("train_dpo_pg.py", lora_run_args("dpo", tiny_model, tmp_path, base_scope="per_param", **extra))
    assert_adapters_equal(adapter(default), adapter(tmp_path))
    assert read_log(tmp_path)[-1]["loss"] == pytest.approx(log[-1]["loss"], rel=WEIGHTS_RTOL)


def step_norm(step, kind=""):
    return math.sqrt(sum(v.double().square().sum() for k, v in step.items() if kind in k))


def batch_logits(model, tokenizer):
    batch = tokenizer(["Explain <general task 3> step by step.", "How do I <harmful request 17>?"],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.double()


def test_saved_adapter_and_merged_export_give_the_trained_model(tiny_model, lora_runs):
    """The adapter loads with peft's PeftModel.from_pretrained (as LLaMA-Factory's --adapter_name_or_path does) and
    gives the logits of W + alpha / r x B A computed here from the saved tensors in float64; the merged export
    gives the same logits as a plain model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = lora_runs("sft", "per_param", False, "threshold")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0)
    assert config["base_model_name_or_path"] == str(tiny_model)
    assert {name.split(".")[-1] for name in config["target_modules"]} == \
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head
    tokenizer = AutoTokenizer.from_pretrained(out)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out).eval()
    adapter_logits = batch_logits(loaded, tokenizer)

    by_hand = AutoModelForCausalLM.from_pretrained(tiny_model).double().eval()
    saved, scale = adapter(out), config["lora_alpha"] / config["r"]
    modules = dict(by_hand.named_modules())
    for key, a in saved.items():
        if ".lora_A." not in key:
            continue
        b = saved[key.replace(".lora_A.", ".lora_B.")]
        assert b.abs().max() > 0  # trained
        module = modules[key.removeprefix("base_model.model.").split(".lora_A.")[0]]
        module.weight.data += scale * b.double() @ a.double()
    expected = batch_logits(by_hand, tokenizer)
    base_logits = batch_logits(AutoModelForCausalLM.from_pretrained(tiny_model).eval(), tokenizer)
    assert (adapter_logits - expected).norm() <= LOGITS_RTOL * (expected - base_logits).norm()

    merged_logits = batch_logits(AutoModelForCausalLM.from_pretrained(out / "merged").eval(), tokenizer)
    assert (merged_logits - adapter_logits).norm() <= LOGITS_RTOL * (expected - base_logits).norm()
    assert not list(out.glob("model*.safetensors"))  # the output folder holds the adapter, not a full model


def parse(model, out, *flags):
    return check_args(build_parser("", "sft_pg", 1e-5).parse_args(sft_args(model, out) + list(flags)), "sft_pg")


def test_lora_flags_follow_llama_factory(tiny_model, lora_runs, tmp_path):
    args = parse(tiny_model, tmp_path, "--finetuning_type", "lora", "--lora_rank", "4")
    assert (args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target, args.use_rslora) == \
        (4, 8.0, 0.0, "all", False)
    trained, _ = lora_runs("sft", "per_param", False, "threshold")
    args = parse(tiny_model, tmp_path, "--finetuning_type", "lora", "--adapter_name_or_path", str(trained),
                 "--lora_target", "all", "--lora_rank", "8")  # agree with the adapter: taken from it
    assert (args.lora_rank, args.lora_alpha) == (8, 16.0)
    assert args.lora_target == "down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj"
    refusals = [
        (["--lora_rank", "16"], "--lora_rank applies to LoRA: add --finetuning_type lora"),
        (["--export_merged", "True"], "--export_merged applies to LoRA"),
        (["--finetuning_type", "lora", "--adapter_name_or_path", str(trained), "--lora_rank", "4"],
         "--lora_rank 4 contradicts the adapter .* which has 8"),
        (["--finetuning_type", "lora", "--adapter_name_or_path", str(trained), "--lora_target", "q_proj"],
         "--lora_target q_proj contradicts"),
        (["--finetuning_type", "lora", "--adapter_name_or_path", f"{trained},{trained}"], "one adapter only"),
        (["--finetuning_type", "lora", "--adapter_name_or_path", str(tiny_model)], "not a LoRA adapter"),
        (["--finetuning_type", "freeze"], "invalid choice: 'freeze'"),
    ]
    for flags, message in refusals:
        with pytest.raises(UserError, match=message):
            parse(tiny_model, tmp_path, *flags)


def test_an_adapter_passed_as_the_model_and_a_target_that_names_nothing_are_refused(tiny_model, lora_runs, tmp_path):
    trained, _ = lora_runs("sft", "per_param", False, "threshold")
    result = run_script("train_sft_pg.py", sft_args(trained, tmp_path / "a", finetuning_type="lora"),
                        expect_ok=False)
    assert result.returncode == 2 and "a LoRA adapter, not a model" in result.stderr
    result = run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path / "b", finetuning_type="lora",
                                                    lora_target="query_key_value"), expect_ok=False)
    assert result.returncode == 2 and "--lora_target query_key_value" in result.stderr


def test_adapter_on_its_base_evaluates_as_its_merged_export(tiny_model, lora_runs, tmp_path):
    """The run was trained under --template qwen (default system "You are Qwen, ..."), unlike the base tokenizer's
    own ChatML template ("You are a helpful assistant."). Evaluated on its base (--adapter_name_or_path), the adapter
    uses the tokenizer and template saved with it: its predictions and scores are its merged export's, byte for byte,
    and its prompts are the qwen template's."""
    trained, _ = lora_runs("sft", "per_param", False, "threshold")
    common = ["--dataset_dir", ROOT / "data", "--harmful_dataset", "demo_eval_harmful", "--general_dataset",
              "demo_eval_general", "--max_samples", 3, "--max_new_tokens", 6, "--do_sample", "False"]
    run_script("evaluate_alignment.py", ["--model_name_or_path", tiny_model, "--adapter_name_or_path", trained,
                                         *common, "--output_dir", tmp_path / "adapter"])
    run_script("evaluate_alignment.py", ["--model_name_or_path", trained / "merged", *common,
                                         "--output_dir", tmp_path / "merged"])
    adapter, merged = (tmp_path / "adapter", tmp_path / "merged")
    predictions = (adapter / "generated_predictions.jsonl").read_bytes()
    assert predictions == (merged / "generated_predictions.jsonl").read_bytes()
    assert "You are Qwen, created by Alibaba Cloud" in json.loads(predictions.splitlines()[0])["prompt"]
    scores = [next(iter(json.loads((folder / "eval_results.json").read_text())["models"].values()))["scores"]
              for folder in (adapter, merged)]
    assert scores[0] == scores[1]
