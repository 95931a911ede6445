"""Every chat template of LLaMA-Factory 0.9.5 against its own rendering, and the template errors.

tests/parity/template_golden.json is written by tests/parity/make_template_golden.py, which runs LLaMA-Factory's
supervised, pairwise and unsupervised processors in a separate virtual environment (see its docstring); this test
needs no LLaMA-Factory. chat_templates.json, the table data_utils reads, is written by the same script from
LLaMA-Factory's registry: the golden digests check that data_utils renders that table as LLaMA-Factory does.
"""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import data_utils
from test_parity import digest

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "tests" / "parity"
GOLDEN = json.loads((PARITY / "template_golden.json").read_text(encoding="utf-8"))
TINY = AutoTokenizer.from_pretrained(PARITY / "tokenizers" / GOLDEN["tokenizer"])


def golden_id(rendering):
    return rendering["template"] + (" bos" if rendering["bos_token"] else "") + \
        ("" if rendering["enable_thinking"] else " enable_thinking=false")


def test_every_llamafactory_template_has_goldens():
    assert GOLDEN["llamafactory"] == "0.9.5"
    assert {r["template"] for r in GOLDEN["renderings"]} == set(data_utils.TEMPLATES)
    assert len(data_utils.TEMPLATES) == 121


@pytest.mark.parametrize("rendering", GOLDEN["renderings"], ids=[golden_id(r) for r in GOLDEN["renderings"]])
def test_template_renders_as_llamafactory(rendering):
    tokenizer = TINY.__class__.from_pretrained(PARITY / "tokenizers" / GOLDEN["tokenizer"])
    if rendering["added_tokens"]:
        tokenizer.add_tokens(rendering["added_tokens"], special_tokens=True)
    if rendering["bos_token"]:
        tokenizer.add_special_tokens({"bos_token": rendering["bos_token"]})
    template = data_utils.apply_template(tokenizer, rendering["template"], log=lambda *_: None, resize_vocab=True,
                                         enable_thinking=rendering["enable_thinking"])
    cases = GOLDEN["cases_by_thought_words"]["|".join(rendering["thought_words"])]
    got = []
    for case in cases:
        texts, cutoff = case["messages"], case["cutoff_len"]
        if "chosen" in case:
            pair = {"system": case["system"], "turns": list(zip(texts[:-1:2], texts[1:-1:2])), "prompt": texts[-1],
                    "chosen": case["chosen"], "rejected": case["rejected"]}
            out = data_utils.tokenize_pair(pair, tokenizer, template, cutoff)
            prompt = data_utils.tokenize_prompt(pair, tokenizer, template, cutoff)
            got.append({"pair": digest([out[k] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                                         "rejected_labels")]),
                        "prompt": digest([prompt["prompt_ids"], prompt["label_ids"]])})
        else:
            conversation = {"system": case["system"], "turns": list(zip(texts[::2], texts[1::2]))}
            out = data_utils.tokenize_sft(conversation, tokenizer, template, cutoff)
            prompt = data_utils.tokenize_prompt(conversation, tokenizer, template, cutoff)
            got.append({"sft": digest([out["input_ids"], out["labels"]]),
                        "prompt": digest([prompt["prompt_ids"], prompt["label_ids"]])})
    assert got == rendering["cases"]


# ---- errors: an unknown name, a token the tokenizer lacks ----------------------------------------------------------

def test_unknown_template_names_the_closest_and_the_tokenizers_own():
    with pytest.raises(ValueError) as err:
        data_utils.get_template(TINY, "qwen3-nothink")
    message = str(err.value)
    assert "closest: qwen3_nothink" in message and "leave --template out" in message and "\n" not in message


@pytest.mark.parametrize("script", ["train_sft_pg", "train_dpo_pg"])
def test_template_the_tokenizer_cannot_write_stops_before_the_accelerator(tiny_model, tmp_path, monkeypatch,
                                                                          script):
    """--template gemma on the Qwen-style tiny tokenizer (no <end_of_turn>): refused by name before the accelerator
    (and so DeepSpeed) starts; before this check the run died in the first forward (IndexError)."""
    import importlib
    import sys

    from run_guard import UserError
    from test_dpo import dpo_args
    from test_sft_e2e import sft_args

    module = importlib.import_module(script)
    monkeypatch.setattr(module, "make_accelerator", lambda args: pytest.fail("the accelerator started"))
    make_args = sft_args if script == "train_sft_pg" else dpo_args
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *make_args(tiny_model, tmp_path / "out", template="gemma")])
    with pytest.raises(UserError, match="the tokenizer has no token '<end_of_turn>'.*--resize_vocab True"):
        module.main()


def test_resize_vocab_grows_the_embeddings_as_llamafactory(tiny_model):
    """New rows: the mean of the old rows plus N(0, 1/hidden) noise, padded to a multiple of 64 (LLaMA-Factory's
    _noisy_mean_initialization), old rows untouched; the reference is computed in float64."""
    import torch
    from transformers import AutoModelForCausalLM

    from train_utils import resize_embeddings

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    old = model.get_input_embeddings().weight.detach().clone().double()
    resize_embeddings(model, len(old) + 3, seed=7)
    new = model.get_input_embeddings().weight.detach().double()
    rows = -(-(len(old) + 3) // 64) * 64
    assert new.shape == (rows, old.shape[1]) and model.config.vocab_size == rows
    assert torch.equal(new[:len(old)], old)
    torch.manual_seed(7)
    expected = old.mean(dim=0) + torch.randn(rows - len(old), old.shape[1]).double() / old.shape[1] ** 0.5
    torch.testing.assert_close(new[len(old):], expected, rtol=0, atol=1e-6)  # float32 rounding of values ~1
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied: one matrix
