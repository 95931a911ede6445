"""data_utils against LLaMA-Factory 0.9.5: the rows it drops, input ids and labels, from golden files it wrote.

tests/parity/golden.json is written by tests/parity/make_golden.py, which runs LLaMA-Factory's own preprocessing in a
separate virtual environment (see its docstring); this test needs no LLaMA-Factory.
"""

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from transformers import AutoTokenizer

import data_utils

ROOT = Path(__file__).resolve().parents[1]
PARITY = ROOT / "tests" / "parity"
GOLDEN = json.loads((PARITY / "golden.json").read_text())


@lru_cache(maxsize=None)
def tokenizer_and_template(tokenizer, template):
    tok = AutoTokenizer.from_pretrained(PARITY / "tokenizers" / tokenizer)
    return tok, data_utils.apply_template(tok, template, log=lambda *_: None, resize_vocab=True)


def digest(ids_and_labels):
    return hashlib.sha256(json.dumps(ids_and_labels, separators=(",", ":")).encode()).hexdigest()[:12]


def preprocess(case):
    """What load_tokenized does, keeping each row's position: (positions kept, examples)."""
    tokenizer, template = tokenizer_and_template(case["tokenizer"], case["template"])
    ranking = case["stage"] == "rm"
    keys = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"] if ranking else \
        ["input_ids", "labels"]
    rng = np.random.RandomState(case["seed"])
    dropped, examples, offset = [], [], 0
    for name in case["dataset"].split(","):
        _, conversations, notes = data_utils.load_conversations(name, ROOT / case["dataset_dir"], ranking,
                                                                case["max_samples"], rng=rng)
        tokenized, _ = data_utils.tokenize_dataset(conversations, tokenizer, template, case["cutoff_len"], ranking)
        rows = len(conversations) + sum(len(rows) for reason, rows in notes.items() if reason.startswith("dropped"))
        dropped += [offset + i for i in sorted(set(range(rows)) - {c["row"] for c in conversations})]
        examples += [[e[k] for k in keys] for e in tokenized]
        offset += rows
    return offset, dropped, examples


def test_golden_files_are_llamafactory_0_9_5():
    assert GOLDEN["llamafactory"] == "0.9.5" and len(GOLDEN["cases"]) > 100


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_same_rows_ids_and_labels_as_llamafactory(case):
    rows, dropped, examples = preprocess(case)
    assert (rows, dropped) == (case["rows"], case["dropped"])
    if "row_digests" in case:
        assert [digest(e) for e in examples] == case["row_digests"]
    else:
        assert digest(examples) == case["digest"]


def test_load_tokenized_is_what_the_parity_cases_check():
    case = next(c for c in GOLDEN["cases"] if c["name"] == "num_samples, two datasets in one run")
    tokenizer, _ = tokenizer_and_template(case["tokenizer"], case["template"])
    args = SimpleNamespace(dataset_dir=ROOT / case["dataset_dir"], max_samples=None, cutoff_len=case["cutoff_len"],
                           preprocessing_num_workers=1, enable_thinking=True, template=case["template"],
                           strict_data=False,
                           seed=case["seed"], preprocessing_batch_size=1000)
    logged = []
    examples = data_utils.load_tokenized(case["dataset"], args, tokenizer, False, log=logged.append)
    assert [[e["input_ids"], e["labels"]] for e in examples] == preprocess(case)[2]
    assert "1 empty response" in logged[0] and "dropped: missing response" in logged[1]
