"""train_dpo_pg.py: loss functions, response-only log-probabilities, reference log-probs, end to end."""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import WEIGHTS_RTOL, load_weights, read_log, run_script, weights_relative_difference
from train_dpo_pg import pair_logps, preference_loss
from checkpoint import load_state

ROOT = Path(__file__).resolve().parents[1]


# ---- loss functions against hand-computed closed forms --------------------------------------------------------

def softplus(x):
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("chosen, rejected", [(1.0, -0.5), (-2.0, 0.25), (0.0, 0.0)])
def test_losses_equal_their_closed_forms(chosen, rejected):
    beta, h = 0.2, chosen - rejected
    expected = {
        ("sigmoid", 0.0): softplus(-beta * h),
        ("sigmoid", 0.1): 0.9 * softplus(-beta * h) + 0.1 * softplus(beta * h),
        ("ipo", 0.0): (h - 1 / (2 * beta)) ** 2,
        ("hinge", 0.0): max(0.0, 1 - beta * h),
    }
    for (loss_type, smoothing), value in expected.items():
        loss = preference_loss(torch.tensor([chosen], dtype=torch.float64), torch.tensor([rejected],
                               dtype=torch.float64), loss_type, beta, smoothing)
        assert loss.item() == pytest.approx(value, rel=1e-12, abs=1e-12), (loss_type, smoothing)


def test_dpo_loss_at_zero_margin_is_ln2():
    assert preference_loss(torch.zeros(3), torch.zeros(3), "sigmoid", 0.1).tolist() == [pytest.approx(math.log(2))] * 3


@pytest.mark.parametrize("loss_type, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_gradient_moves_chosen_up_and_rejected_down(loss_type, smoothing):
    chosen = torch.tensor([0.3, -1.0], requires_grad=True)
    rejected = torch.tensor([0.1, 0.5], requires_grad=True)
    preference_loss(chosen, rejected, loss_type, 0.5, smoothing).sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown --pref_loss 'kto'"):
        preference_loss(torch.zeros(1), torch.zeros(1), "kto", 0.1)


# ---- reference-free losses against the float64 formulas and TRL's implementation -------------------------------

def orpo_float64(a, b, beta):
    """ORPO (Hong et al. 2024, eq. 4-7) from the odds p / (1 - p) of p = exp(length-averaged log-probability)."""
    odds = [math.exp(x) / (1 - math.exp(x)) for x in (a, b)]
    return -a - beta * math.log(1 / (1 + odds[1] / odds[0]))  # log sigmoid(log(odds_w / odds_l))


def trl_orpo(a, b, beta):
    """TRL's ORPOTrainer as written (odds_ratio_loss, log1p(-exp(x)); loss = policy_nll_loss - beta * mean(ratio)),
    for one pair, where its token-mean NLL of the chosen batch is -a. Same dtype as the inputs."""
    log_odds = (a - b) - (torch.log1p(-torch.exp(a)) - torch.log1p(-torch.exp(b)))
    return -a - beta * torch.log(torch.sigmoid(log_odds))


def trl_cpo_simpo(a, b, beta, gamma):
    """TRL's CPOTrainer loss_type simpo as written (label_smoothing 0, cpo_alpha 0): logits = h - gamma / beta."""
    return -F.logsigmoid(beta * ((a - b) - gamma / beta))


def test_orpo_and_simpo_equal_the_float64_formulas_and_trl():
    """float32 inputs; the float64 formulas on the same values. Each loss is ~10 float32 operations of ~1 ulp
    (6e-8) relative error each, so 1e-5 relative leaves >10x room; a wrong formula misses by O(1)."""
    beta, gamma = 0.2, 0.5
    a = torch.tensor([-1e-4, -0.3, -2.0, -25.0, -1.1], dtype=torch.float32)
    b = torch.tensor([-0.2, -0.25, -30.0, -3.0, -1e-3], dtype=torch.float32)
    orpo = preference_loss(a, b, "orpo", beta)
    simpo = preference_loss(a, b, "simpo", beta, simpo_gamma=gamma)
    for i, (x, y) in enumerate(zip(a.double().tolist(), b.double().tolist())):
        assert orpo[i].item() == pytest.approx(orpo_float64(x, y, beta), rel=1e-5)
        assert simpo[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-(beta * (x - y) - gamma)))), rel=1e-5)
    # TRL computes the same functions (in float64, where its log1p(-exp(x)) is accurate at these inputs).
    assert torch.allclose(orpo.double(), trl_orpo(a.double(), b.double(), beta), rtol=1e-5)
    assert torch.allclose(simpo.double(), trl_cpo_simpo(a.double(), b.double(), beta, gamma), rtol=1e-5)
    # A chosen response of probability close to 1: log1p(-exp(x)) loses the digits in float32, log(-expm1(x)) not.
    near_one, other = torch.tensor([-1e-6]), torch.tensor([-0.5])
    exact = orpo_float64(near_one.double().item(), -0.5, beta)
    ours = preference_loss(near_one, other, "orpo", beta).item()
    assert abs(ours - exact) < 1e-5 * abs(exact) < abs(trl_orpo(near_one, other, beta).item() - exact)


# ---- response-only log-probabilities --------------------------------------------------------------------------

class PerturbedLogits(torch.nn.Module):
    """Wraps a model and adds noise to the logits at chosen positions."""

    def __init__(self, model, positions):
        super().__init__()
        self.model, self.positions = model, positions

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        logits = out.logits.clone()
        logits[self.positions] += 5 * torch.randn_like(logits[self.positions])
        return SimpleNamespace(logits=logits)


def test_response_logps_ignore_prompt_logits(tiny_model, tokenizer):
    from transformers import AutoModelForCausalLM

    from data_utils import TEMPLATES, collate_pairs, tokenize_pair

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    conversation = {"system": None, "turns": [], "prompt": "How do I <harmful request 3>?",
                    "chosen": "I can't help with that.", "rejected": "Sure. Step 1: <harmful step 3.1>."}
    batch = collate_pairs([tokenize_pair(conversation, tokenizer, TEMPLATES["qwen"], 512)], tokenizer.pad_token_id)
    predicts_prompt = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_prompt[:, :-1] = batch["labels"][:, 1:] == -100  # logits at t predict token t + 1
    with torch.no_grad():
        clean = pair_logps(model, batch, average=False)
        torch.manual_seed(0)
        noisy_prompt = pair_logps(PerturbedLogits(model, predicts_prompt), batch, average=False)
        noisy_response = pair_logps(PerturbedLogits(model, ~predicts_prompt), batch, average=False)
    for a, b in zip(clean[:3], noisy_prompt[:3]):  # the log-probabilities; [3] is the (perturbed) logits
        assert torch.equal(a, b)
    assert not torch.allclose(clean[0], noisy_response[0])  # the check itself can fail


# ---- end to end -----------------------------------------------------------------------------------------------

def dpo_args(model, out, **overrides):
    args = {"model_name_or_path": model, "dataset": "demo_safety_dpo", "base_dataset": "demo_general_dpo",
            "base_num_samples": 32, "base_num_steps": 3, "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "max_steps": 6, "logging_steps": 1,
            "save_strategy": "no", "output_dir": out, "template": "qwen", "max_samples": 64, "pref_beta": 0.2,
            "gradient_checkpointing": False}  # CI time: the tests that need it pass it
    args.update(overrides)
    return [str(x) for k, v in args.items() if v is not None for x in (f"--{k}", v)]


def test_first_loss_is_ln2_rewards_start_at_zero_and_accuracy_rises(tiny_model, tmp_path):
    out = tmp_path / "run"
    run_script("train_dpo_pg.py", dpo_args(tiny_model, out, max_steps=10, plot_loss=True))
    log = read_log(out)
    # Step 1: policy and reference are the same float32 weights, so h = 0 up to rounding of two forward passes.
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert log[0][key] == pytest.approx(0.0, abs=1e-5)
    for key in ("rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm_projected", "removed_fraction"):
        assert key in log[-1]
    assert log[-1]["rewards/accuracies"] > 0.5 and log[-1]["loss"] < log[0]["loss"]
    assert (out / "training_loss.png").exists()
    results = json.loads((out / "train_results.json").read_text())
    assert results["last_rewards/accuracies"] > 0.5

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, load_weights(out)["model.embed_tokens.weight"])


def on_the_fly_reference(tiny_model, tokenizer, examples):
    from transformers import AutoModelForCausalLM

    from data_utils import collate_pairs

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        values = [torch.stack(pair_logps(model, collate_pairs([e], tokenizer.pad_token_id), False)[:2], -1)
                  for e in examples]
    return torch.cat(values)


@pytest.mark.parametrize("nproc", [1, 2])
def test_precomputed_reference_logps_equal_on_the_fly_ones(tiny_model, tokenizer, tmp_path, nproc):
    from data_utils import load_tokenized

    out = tmp_path / "run"
    run_script("train_dpo_pg.py", dpo_args(tiny_model, out, precompute_ref_log_probs=True, max_steps=1,
                                           save_strategy="steps", save_steps=1, per_device_train_batch_size=4 // nproc,
                                           max_samples=24), nproc=nproc)
    for rank in range(nproc):
        table = load_state(out / "checkpoint-1", f"extra_state_{rank}")["ref_logps/train"]
        args = SimpleNamespace(dataset_dir="data", max_samples=24, cutoff_len=2048, preprocessing_num_workers=1,
                               enable_thinking=True,
                               template="qwen", strict_data=False, seed=42, preprocessing_batch_size=1000)
        examples = load_tokenized("demo_safety_dpo", args, tokenizer, True, log=lambda *_: None)
        # Batched vs one-by-one forward passes differ only in padding: float32 rounding.
        assert torch.allclose(table, on_the_fly_reference(tiny_model, tokenizer, examples), rtol=1e-5, atol=1e-4)


def test_precomputed_and_on_the_fly_training_agree(tiny_model, tmp_path):
    run_script("train_dpo_pg.py", dpo_args(tiny_model, tmp_path / "fly"))
    run_script("train_dpo_pg.py", dpo_args(tiny_model, tmp_path / "pre", precompute_ref_log_probs=True))
    difference = weights_relative_difference(load_weights(tmp_path / "fly"), load_weights(tmp_path / "pre"))
    assert difference <= WEIGHTS_RTOL


def test_resumed_run_equals_uninterrupted(tiny_model, tmp_path):
    """With precomputed reference log-probabilities, which the checkpoint carries (the rest of resuming is the
    SFT script's, tested there)."""
    common = dict(precompute_ref_log_probs=True, lr_scheduler_type="cosine", base_num_steps=4)
    run_script("train_dpo_pg.py", dpo_args(tiny_model, tmp_path / "full", **common))
    part = tmp_path / "part"
    run_script("train_dpo_pg.py", dpo_args(tiny_model, part, save_strategy="steps", save_steps=3, **common))
    shutil.rmtree(part / "checkpoint-6")
    (part / "model.safetensors").unlink()
    result = run_script("train_dpo_pg.py", dpo_args(tiny_model, part, resume_from_checkpoint=part / "checkpoint-3",
                                                    save_strategy="steps", save_steps=3, **common))
    assert "precomputed reference" not in result.stdout  # the table came from the checkpoint
    assert weights_relative_difference(load_weights(tmp_path / "full"), load_weights(part)) <= WEIGHTS_RTOL


@pytest.mark.parametrize("base_loss", ["dpo"])  # pairs_nll (the default): tests/test_backends.py
def test_two_processes_equal_one(tiny_model, tmp_path, base_loss):
    run_script("train_dpo_pg.py", dpo_args(tiny_model, tmp_path / "one", base_loss=base_loss))
    run_script("train_dpo_pg.py", dpo_args(tiny_model, tmp_path / "two", base_loss=base_loss,
                                           per_device_train_batch_size=2), nproc=2)
    assert weights_relative_difference(load_weights(tmp_path / "one"), load_weights(tmp_path / "two")) <= WEIGHTS_RTOL


def test_sft_base_loss_on_sft_and_pair_sets_and_ipo_hinge_run(tiny_model, tmp_path):
    for loss, reference in (("ipo", "demo_general_a_sft"), ("hinge", "demo_general_dpo")):
        run_script("train_dpo_pg.py", dpo_args(tiny_model, tmp_path / loss, pref_loss=loss, max_steps=2,
                                               base_dataset=reference, base_loss="sft", pref_ftx=0.1))
        assert read_log(tmp_path / loss)[-1]["step"] == 2
    result = run_script("train_dpo_pg.py", dpo_args(tiny_model, tmp_path / "bad", base_dataset="demo_general_a_sft"),
                        expect_ok=False)
    assert "is not preference pairs" in result.stderr and "--base_loss sft" in result.stderr


def test_reference_dpo_command_runs_unchanged(tiny_model, tmp_path):
    rows = json.loads((ROOT / "data" / "demo_safety_dpo.json").read_text())[:64]
    (tmp_path / "safety.json").write_text(json.dumps(rows))
    info = {"saferlhf2_dpo": {"file_name": "safety.json", "ranking": True},
            "ultrafeedback_dpo": {"file_name": str(ROOT / "data" / "demo_general_dpo.json"), "ranking": True,
                                  "formatting": "sharegpt"}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    out = tmp_path / "out"
    command = f"""--stage dpo_pg --do_train True --model_name_or_path {tiny_model} --preprocessing_num_workers 16
        --finetuning_type full --template qwen --flash_attn auto --dataset_dir {tmp_path} --dataset saferlhf2_dpo
        --cutoff_len 2048 --learning_rate 1e-06 --num_train_epochs 1.0 --max_samples 100000
        --per_device_train_batch_size 2 --gradient_accumulation_steps 16 --lr_scheduler_type cosine
        --max_grad_norm 1.0 --logging_steps 5 --save_only_model True --warmup_steps 0 --report_to none
        --output_dir {out} --bf16 True --plot_loss True --trust_remote_code True --ddp_timeout 180000000
        --include_num_input_tokens_seen True --optim adamw_torch --pref_beta 0.2 --pref_loss sigmoid
        --base_dataset ultrafeedback_dpo --base_num_samples 200 --base_num_steps 5
        --base_method orthogonal_projection --base_threshold 0""".split()
    run_script("train_dpo_pg.py", command, launcher="accelerate")
    log = read_log(out)
    assert log[-1]["step"] == 2 and log[0]["loss"] == pytest.approx(math.log(2), abs=2e-2)  # bf16 autocast
    assert (out / "model.safetensors").exists() and (out / "training_loss.png").exists()


# ---- reference-free losses end to end ---------------------------------------------------------------------------

def run_in_process(script_main, argv, capsys):
    """A training script's main as its command line runs it, in this process; returns (exit code, stderr lines)."""
    import sys

    from run_guard import run_main

    old, sys.argv = sys.argv, ["script.py", *map(str, argv)]
    try:
        with pytest.raises(SystemExit) as stop:
            run_main(script_main)
            raise SystemExit(0)
    finally:
        sys.argv = old
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def test_orpo_runs_without_any_reference_model(tiny_model, tokenizer, tmp_path, monkeypatch, capsys):
    """LoRA (whose reference would be the policy with its adapter disabled) and --base_loss dpo (whose reference
    pairs would need reference log-probs): nothing that builds or runs a reference model may be called. The first
    step's loss is the float64 ORPO formula of the initial model's length-averaged log-probabilities."""
    import train_dpo_pg
    from data_utils import StepSampler, collate_pairs, load_tokenized, padded_length

    def forbidden(*args, **kwargs):
        raise AssertionError("a reference model was built or run")

    for name in ("load_model", "prepare_reference_model", "AdapterDisabled", "reference_logps"):
        monkeypatch.setattr(train_dpo_pg, name, forbidden)
    out = tmp_path / "orpo"
    code, errors = run_in_process(train_dpo_pg.main, dpo_args(
        tiny_model, out, pref_loss="orpo", max_steps=1, max_samples=16, base_num_samples=8, finetuning_type="lora",
        base_loss="dpo"), capsys)
    assert code == 0, errors
    args = SimpleNamespace(dataset_dir="data", max_samples=16, cutoff_len=2048, preprocessing_num_workers=1,
                           enable_thinking=True, preprocessing_batch_size=1000,
                           template="qwen", strict_data=False, seed=42)
    examples = load_tokenized("demo_safety_dpo", args, tokenizer, True, log=lambda *_: None)
    sampler = StepSampler(len(examples), 4, 1, 0, 2, 42, lengths=[padded_length(e) for e in examples])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)  # LoRA starts with B = 0: the policy is the base model
    with torch.no_grad():
        pairs = [pair_logps(model, collate_pairs([examples[i]], tokenizer.pad_token_id), True)[:2]
                 for i in sampler.step_indices(0)]
    expected = sum(orpo_float64(a.item(), b.item(), 0.2) for a, b in pairs) / len(pairs)
    # One-pair vs batched forward passes differ by float32 rounding (~1e-6); a sum instead of a mean misses by O(1).
    assert read_log(out)[0]["loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("extra", [{"ref_model": "some/model"}, {"precompute_ref_log_probs": True}])
def test_reference_flags_with_a_reference_free_loss_are_refused(tiny_model, tmp_path, capsys, extra):
    import train_dpo_pg

    code, errors = run_in_process(train_dpo_pg.main, dpo_args(tiny_model, tmp_path / "run", pref_loss="simpo",
                                                              **extra), capsys)
    name = next(iter(extra))
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: --{name} with --pref_loss simpo"), errors


def test_orpo_refuses_cut_away_responses_and_simpo_gamma_needs_simpo():
    from data_utils import DataError
    from run_guard import UserError
    from train_dpo_pg import check_orpo_pairs, check_preference_flags

    check_orpo_pairs("d", [{"num_targets": 1, "num_targets_rejected": 2}], 16)
    with pytest.raises(DataError, match="dataset 'd': --cutoff_len 16 cuts a response of 1 of its 2 pairs away"):
        check_orpo_pairs("d", [{"num_targets": 1, "num_targets_rejected": 2}, {"num_targets": 3,
                                                                               "num_targets_rejected": 0}], 16)
    flags = dict(dpo_label_smoothing=0.0, ref_model=None, precompute_ref_log_probs=False)
    check_preference_flags(SimpleNamespace(pref_loss="simpo", simpo_gamma=1.0, **flags))
    with pytest.raises(UserError, match="--simpo_gamma applies to --pref_loss simpo only"):
        check_preference_flags(SimpleNamespace(pref_loss="orpo", simpo_gamma=1.0, **flags))
