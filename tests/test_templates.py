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
