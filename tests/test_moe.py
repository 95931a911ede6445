"""MoE router loss (--moe_aux_loss_coef, or a model config with output_router_logits): on tiny random Qwen3-MoE and
Mixtral models with the tiny model's tokenizer.

The router loss of a step is coef x the mean of the model's aux_loss over the step's micro-batches (see
train_utils.router_term); the checks rebuild it from direct forward passes of the same micro-batches.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from helpers import WEIGHTS_RTOL, load_weights, read_log, run_script, weights_relative_difference
from test_backends import BACKENDS, LAUNCH, MAX_COS
import train_dpo_pg
import train_sft_pg
from test_dpo import dpo_args, run_in_process
from test_sft_e2e import sft_args

COMMON = dict(vocab_size=None, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=None, eos_token_id=2, pad_token_id=0)


@pytest.fixture(scope="module")
def moe_models(tiny_model, tmp_path_factory):
    """{"qwen3_moe": a Qwen3-MoE whose config leaves the router logits off (as Qwen3-MoE's does), "mixtral": a
    Mixtral whose config asks for them (output_router_logits true, router_aux_loss_coef 0.5)}; 4 experts, top 2."""
    from transformers import (AutoTokenizer, MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    common = {**COMMON, "vocab_size": len(tokenizer)}
    torch.manual_seed(0)
    models = {
        "qwen3_moe": Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, head_dim=8, intermediate_size=64,
                                                        moe_intermediate_size=32, num_experts=4,
                                                        num_experts_per_tok=2, decoder_sparse_step=1)),
        "mixtral": MixtralForCausalLM(MixtralConfig(**common, intermediate_size=32, num_local_experts=4,
                                                    num_experts_per_tok=2, output_router_logits=True,
                                                    router_aux_loss_coef=0.5)),
    }
    folders = {}
    for name, model in models.items():
        folders[name] = tmp_path_factory.mktemp("moe") / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def step_micro_batches(tokenizer, dataset, ranking, per_device, grad_accum, max_samples):
    """The first step's micro-batches as the scripts build them (one process, length-aware), collated."""
    from data_utils import StepSampler, collate_pairs, collate_sft, load_tokenized, padded_length

    args = SimpleNamespace(dataset_dir="data", max_samples=max_samples, cutoff_len=2048, preprocessing_num_workers=1,
                           enable_thinking=True, preprocessing_batch_size=1000,
                           template="qwen", strict_data=False, seed=42)
    examples = load_tokenized(dataset, args, tokenizer, ranking, log=lambda *_: None)
    sampler = StepSampler(len(examples), per_device, 1, 0, grad_accum, 42,
                          lengths=[padded_length(e) for e in examples])
    collate = collate_pairs if ranking else collate_sft
    return [collate([examples[i] for i in indices], tokenizer.pad_token_id) for indices in sampler.micro_batches(0)]


def response_logps(logits, batch):
    """Per-sequence sums of the response tokens' log-probabilities, from plain shifted cross-entropy."""
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return -nll.view(labels.shape).sum(-1), (labels != -100).sum()


def sgd_update(folder, loss_of_model):
    """-grad of loss_of_model(model) at the model in `folder`, per parameter name (an SGD step with lr 1)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    loss_of_model(model).backward()
    return {name: -p.grad for name, p in model.named_parameters()}


def flat(tensors, names):
    return torch.cat([tensors[n].reshape(-1).double() for n in names])


ONE_SGD_STEP = dict(stage=None, base_method="none", optim="sgd", learning_rate=1.0, max_grad_norm=0, max_steps=1,
                    per_device_train_batch_size=4, gradient_accumulation_steps=2, max_samples=8, logging_steps=1)


@pytest.mark.parametrize("script", ["sft", "dpo"])
def test_router_loss_is_coef_times_the_direct_forward_aux_loss(moe_models, tokenizer, tmp_path, capsys, script):
    """One SGD step (lr 1, no clipping, no projection) over two micro-batches: the update equals minus the gradient of
    the token (SFT) or sigmoid (DPO) loss plus coef x the mean aux_loss of direct forward passes of the same
    micro-batches; without the router term it does not. SFT on Qwen3-MoE with --moe_aux_loss_coef 1; DPO on the
    Mixtral whose config asks for the router loss with coefficient 0.5 (no flag: the config is honoured). The runs
    go in this process (no interpreter start-up: CI time).

    Tolerance: the run and this rebuild sum the same float32 terms in another order (measured 6e-8 and 3e-7
    relative); 1e-5 leaves 30x room. The router term moves the update by 1e-2 (DPO) to 2e-1 (SFT) of its norm."""
    model = moe_models["qwen3_moe" if script == "sft" else "mixtral"]
    coef = 1.0 if script == "sft" else 0.5
    out = tmp_path / "run"
    if script == "sft":
        code, errors = run_in_process(train_sft_pg.main, sft_args(model, out, **{**ONE_SGD_STEP, "stage": "sft"},
                                                                  moe_aux_loss_coef=coef), capsys)
    else:
        code, errors = run_in_process(train_dpo_pg.main, dpo_args(model, out, **{**ONE_SGD_STEP, "stage": "dpo"}),
                                      capsys)
    assert code == 0, errors
    batches = step_micro_batches(tokenizer, "demo_safety_sft" if script == "sft" else "demo_safety_dpo",
                                 script == "dpo", 4, 2, 8)

    def outputs(model_):
        return [model_(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_router_logits=True)
                for b in batches]

    def task_loss(model_, results):
        if script == "sft":
            sums = [response_logps(r.logits, b) for r, b in zip(results, batches)]
            return -sum(s.sum() for s, _ in sums) / sum(n for _, n in sums)
        with torch.no_grad():  # the reference model: the initial policy
            reference = [response_logps(r.logits, b)[0] for r, b in zip(outputs(model_), batches)]
        losses = []
        for r, b, ref in zip(results, batches, reference):
            logps = response_logps(r.logits, b)[0] - ref
            chosen, rejected = logps.chunk(2)
            losses.append(-F.logsigmoid(0.2 * (chosen - rejected)))
        return torch.cat(losses).mean()

    def with_router(model_):
        results = outputs(model_)
        return task_loss(model_, results) + coef * sum(r.aux_loss for r in results) / len(results)

    def without_router(model_):
        return task_loss(model_, outputs(model_))

    from transformers import AutoModelForCausalLM

    initial = dict(AutoModelForCausalLM.from_pretrained(model).named_parameters())
    trained = load_weights(out)
    names = [n for n in initial if n in trained]
    update = torch.cat([(trained[n] - initial[n].detach()).reshape(-1).double() for n in names])
    expected, plain = flat(sgd_update(model, with_router), names), flat(sgd_update(model, without_router), names)
    error = ((update - expected).norm() / expected.norm()).item()
    router_share = ((expected - plain).norm() / expected.norm()).item()
    assert error < 1e-5 and router_share > 100 * 1e-5, (error, router_share)
    with torch.no_grad():
        aux = [r.aux_loss.item() for r in outputs(AutoModelForCausalLM.from_pretrained(model))]
    assert read_log(out)[0]["router_aux_loss"] == pytest.approx(sum(aux) / len(aux), rel=1e-5)


@pytest.fixture(scope="module")
def single_moe_run(moe_models, tmp_path_factory):
    """One process (this one), 2 steps with OGPSA: the run that two processes must equal."""
    import sys

    out = tmp_path_factory.mktemp("moe-single")
    old, sys.argv = sys.argv, ["train_sft_pg.py", *sft_args(moe_models["qwen3_moe"], out, moe_aux_loss_coef=0.5,
                                                           max_steps=2, max_samples=8, base_num_samples=4,
                                                           logging_steps=1)]
    try:
        train_sft_pg.main()
    finally:
        sys.argv = old
    return out


@pytest.mark.parametrize("backend", ["ddp", "zero3", "fsdp2"])
def test_two_processes_equal_one_with_the_router_loss(moe_models, single_moe_run, tmp_path, backend):
    """Two processes with grad_accum 1 run the one-process run's micro-batches (grad_accum 2), so the mean router
    loss over them is the same; tolerance as tests/test_backends.py (WEIGHTS_RTOL). The router loss's gradient is
    projected with the rest: the stepped gradient stays orthogonal to the basis (max_abs_cos, as there)."""
    args = sft_args(moe_models["qwen3_moe"], tmp_path, moe_aux_loss_coef=0.5, max_steps=2, max_samples=8,
                    base_num_samples=4, logging_steps=1, gradient_accumulation_steps=1) + BACKENDS.get(backend, [])
    run_script("train_sft_pg.py", args, nproc=2, **LAUNCH.get(backend, {}))
    assert weights_relative_difference(load_weights(single_moe_run), load_weights(tmp_path)) <= WEIGHTS_RTOL
    assert read_log(tmp_path)[-1]["router_aux_loss"] == pytest.approx(read_log(single_moe_run)[-1]["router_aux_loss"],
                                                                     rel=WEIGHTS_RTOL)
    assert all(record["max_abs_cos"] < MAX_COS for record in read_log(tmp_path) + read_log(single_moe_run))


def test_moe_aux_loss_coef_on_a_dense_model_is_refused(tiny_model, tmp_path, capsys):
    code, errors = run_in_process(train_sft_pg.main, sft_args(tiny_model, tmp_path / "run", moe_aux_loss_coef=0.01,
                                                              max_samples=8, base_num_samples=8), capsys)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: --moe_aux_loss_coef 0.01: the model"), errors


def test_resume_may_not_regroup_micro_batches_under_a_router_loss(moe_models, tmp_path):
    """Another per-device batch (same global batch) may resume a run without a router loss, not one with it: the
    router loss is per micro-batch. The Mixtral's config asks for the router loss by itself."""
    import json

    from checkpoint import check_resume_flags
    from run_guard import UserError

    def resume(model, coef, batch_size):
        saved = {"model_name_or_path": str(model), "moe_aux_loss_coef": coef, "per_device_train_batch_size": 4}
        (tmp_path / "trainer_state.json").write_text(json.dumps({"args": saved}))
        check_resume_flags(SimpleNamespace(**{**saved, "per_device_train_batch_size": batch_size}), tmp_path)

    resume(moe_models["qwen3_moe"], None, 2)  # no router loss: the global batch alone must match
    resume(moe_models["qwen3_moe"], 0.5, 4)
    for model, coef in ((moe_models["qwen3_moe"], 0.5), (moe_models["mixtral"], None)):
        with pytest.raises(UserError, match="--per_device_train_batch_size 4 -> 2"):
            resume(model, coef, 2)
