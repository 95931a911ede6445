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
    assert TINY.encode(GOLDEN["fingerprint_text"]) == GOLDEN["fingerprint_ids"]  # the tokenizer splits as there


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
            prompt = data_utils.tokenize_prompt(pair, tokenizer, template, cutoff, keep_header=False)
            got.append({"pair": digest([out[k] for k in ("chosen_input_ids", "chosen_labels", "rejected_input_ids",
                                                         "rejected_labels")]),
                        "prompt": digest([prompt["prompt_ids"], prompt["label_ids"]])})
        else:
            conversation = {"system": case["system"], "turns": list(zip(texts[::2], texts[1::2]))}
            out = data_utils.tokenize_sft(conversation, tokenizer, template, cutoff)
            prompt = data_utils.tokenize_prompt(conversation, tokenizer, template, cutoff, keep_header=False)
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


# ---- LLaMA-Factory's stock dataset_info.json ---------------------------------------------------------------------

STOCK_INFO = PARITY / "llamafactory_data" / "dataset_info.json"  # data/dataset_info.json of llamafactory-0.9.5's sdist
STOCK_SHA256 = "17162e129cbfede1ef7e955dbb7819146b78cd8809fa4f39dff4f9e61308c50f"


def expected_refusal(entry):
    """Why this project cannot train on a stock entry, read from the entry alone (None: it can)."""
    columns = entry.get("columns", {})
    if "hf_hub_url" not in entry and "file_name" not in entry:
        return "only on ModelScope"
    if {"images", "videos", "audios"} & set(columns):
        return "multimodal data is not supported"
    if "tools" in columns:
        return "tool-use data is not supported"
    if "kto_tag" in columns:
        return "KTO data is not supported"
    if entry.get("formatting", "alpaca") == "alpaca" and not entry.get("ranking") and "columns" in entry \
            and not columns.get("response"):
        return "pre-training text"
    return None


def test_llamafactory_stock_dataset_info_resolves_whole():
    """Every entry resolves without network as LLaMA-Factory's DatasetAttr does with its ModelScope / Modelers hubs
    off (hf_hub_url first, else file_name), or is refused in one line that names it and says why."""
    import hashlib
    from collections import Counter

    assert hashlib.sha256(STOCK_INFO.read_bytes()).hexdigest() == STOCK_SHA256
    info = json.loads(STOCK_INFO.read_text(encoding="utf-8"))
    outcomes = Counter()
    for name, entry in info.items():
        reason = expected_refusal(entry)
        if reason:
            with pytest.raises(data_utils.DataError) as err:
                data_utils.resolve_dataset(name, STOCK_INFO.parent)
            assert f"dataset '{name}'" in str(err.value) and reason in str(err.value) and "\n" not in str(err.value)
            outcomes[reason] += 1
            continue
        spec = data_utils.resolve_dataset(name, STOCK_INFO.parent)
        expected = (entry["hf_hub_url"], True) if "hf_hub_url" in entry else \
            (str(STOCK_INFO.parent / entry["file_name"]), False)
        assert (spec.source, spec.from_hub) == expected
        assert (spec.ranking, spec.formatting) == (entry.get("ranking", False), entry.get("formatting", "alpaca"))
        outcomes["hub" if spec.from_hub else "file"] += 1
    assert len(info) == 104 and outcomes == {"hub": 60, "file": 5, "pre-training text": 17,
                                             "multimodal data is not supported": 13,
                                             "tool-use data is not supported": 5, "KTO data is not supported": 3,
                                             "only on ModelScope": 1}
    ultrafeedback = data_utils.resolve_dataset("ultrafeedback", STOCK_INFO.parent)  # the paper's DPO set
    assert (ultrafeedback.source, ultrafeedback.ranking) == ("llamafactory/ultrafeedback_binarized", True)


def test_resize_vocab_trains_with_a_template_of_another_family(tiny_model, tmp_path, monkeypatch):
    """--template gemma --resize_vocab True on the tiny Qwen-style model: <end_of_turn> is added as eos, the
    embeddings grow to 576 rows (513 padded to 64), and two steps train (before: IndexError in the first forward)."""
    import sys

    import train_sft_pg
    from test_sft_e2e import sft_args

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["train_sft_pg.py", *sft_args(
        tiny_model, out, template="gemma", resize_vocab=True, max_steps=2, max_samples=8, stage="sft",
        base_method="none", base_dataset=None, base_num_samples=None, base_num_steps=None,
        gradient_accumulation_steps=1, logging_steps=1)])
    train_sft_pg.main()
    saved = json.loads((out / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert saved["vocab_size"] == 576 and len(tokenizer) == 513 and tokenizer.eos_token == "<end_of_turn>"


def test_resize_vocab_with_lora_is_refused(tiny_model, tmp_path):
    """The new rows would stay untrained beside the adapters: refused with the flags."""
    from arguments import build_parser, check_args
    from run_guard import UserError
    from test_sft_e2e import sft_args

    args = build_parser("", "sft_pg", 1e-5).parse_args(sft_args(tiny_model, tmp_path / "out", template="gemma",
                                                                resize_vocab=True, finetuning_type="lora"))
    with pytest.raises(UserError, match="--resize_vocab with --finetuning_type lora is not supported"):
        check_args(args, "sft_pg")
