"""Golden files for tests/test_parity.py, written by LLaMA-Factory 0.9.5 itself.

For every case in CASES, LLaMA-Factory's own code (get_train_args, load_tokenizer, get_template_and_fix_tokenizer,
get_dataset, and its dataset processor row by row) preprocesses a dataset; which rows it drops, and digests (sha256)
of the input ids and labels it makes (chosen and rejected ones for pairs) go to tests/parity/golden.json: one per
kept row, or one for the whole case when it keeps more than 40 rows. The edge-case datasets are
written to tests/parity/data/ first, and the two tokenizers to tests/parity/tokenizers/ if they are missing.

LLaMA-Factory is not a dependency of this project: run this in a separate virtual environment, from the repository
root (torch first and pinned, so that pip does not fetch a CUDA build):

    python3.11 -m venv /tmp/lf-venv && /tmp/lf-venv/bin/pip install torch==2.13.0 && \
        /tmp/lf-venv/bin/pip install torch==2.13.0 llamafactory==0.9.5
    /tmp/lf-venv/bin/python tests/parity/make_golden.py
"""

import contextlib
import hashlib
import io
import importlib.machinery
import json
import os
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
TOKENIZERS = HERE / "tokenizers"
DEMO_SETS = [("demo_safety_sft", "sft"), ("demo_general_a_sft", "sft"), ("demo_general_b_sft", "sft"),
             ("demo_safety_dpo", "rm"), ("demo_general_dpo", "rm")]
TEMPLATES = ["default", "empty", "chatml", "qwen", "qwen3", "llama2", "llama3", "mistral", "gemma"]
ROW_DIGESTS_UP_TO = 40  # small cases store a digest of each kept row's ids and labels, larger ones one digest


# ---- the edge-case datasets ------------------------------------------------------------------------------------

def words(n, stem="word"):
    return " ".join(f"{stem}{i}" for i in range(n))


def turns(*texts, tags=("from", "value", "human", "gpt")):
    role, content, user, assistant = tags
    return [{role: user if i % 2 == 0 else assistant, content: text} for i, text in enumerate(texts)]


ALPACA_ROWS = [
    {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
    {"instruction": "Add the numbers.", "input": "3 and 5", "output": "8", "system": "Be exact."},
    {"instruction": "Say nothing.", "input": "", "output": ""},  # empty response: trained on eos only
    {"instruction": "No answer here.", "input": ""},  # missing response: dropped
    {"instruction": "Null answer.", "input": "", "output": None},  # missing response: dropped
    {"instruction": "", "input": "only the input", "output": "ok"},
    {"instruction": words(120), "input": "", "output": "the end", "history": [["Hi", "Hello"]]},
    {"instruction": "Tell a long story.", "input": "", "output": words(120, "story")},
    {"instruction": words(60, "ask"), "input": words(20, "ctx"), "output": words(80, "tell"), "system": "Be long."},
    {"instruction": "Continue.", "input": "", "output": "Done.", "system": "S2",
     "history": [["First?", "One."], ["Second?", words(30, "two")]]},
    {"instruction": "Whitespace answer.", "input": "", "output": "  "},
    {"instruction": "Unicode: héllo wörld ✓", "input": "", "output": "naïve café ✓"},
]
SHAREGPT_ROWS = [
    {"conversations": turns("Hi", "Hello there.")},
    {"conversations": [{"from": "system", "value": "You are terse."}] + turns("Name a colour.", "Red.", "Another.",
                                                                                "Blue.")},
    {"conversations": turns("a1", "b1", "a2", "b2", "a3", "b3")},  # three assistant turns
    {"conversations": turns("x", "y")[::-1]},  # starts with the assistant: dropped
    {"conversations": turns("a", "b", "c")},  # ends with the user: dropped
    {"conversations": []},  # no messages: dropped
    {"conversations": turns("Empty reply please.", "")},
    {"conversations": turns("Use the column system.", "Fine."), "system": "Column system."},
    {"conversations": turns(words(50, "q"), words(40, "r"), words(30, "s"), words(60, "t")), "system": "Long."},
]
TAG_ROWS = [
    {"messages": [{"role": "system", "content": "S"}] + turns("q", "a", tags=("role", "content", "user",
                                                                             "assistant"))},
    {"messages": turns("q2", "a2", tags=("role", "content", "user", "assistant"))},
]
PAIR_ALPACA_ROWS = [
    {"instruction": "Which is right?", "input": "", "chosen": "This one.", "rejected": "That one."},
    {"instruction": "With history.", "input": "ctx", "chosen": "Yes.", "rejected": "No.",
     "history": [["Earlier?", "Earlier answer."]], "system": "Judge."},
    {"instruction": "Empty chosen.", "input": "", "chosen": "", "rejected": "Something."},
    {"instruction": "Missing rejected.", "input": "", "chosen": "Only this."},  # dropped
    {"instruction": words(80, "p"), "input": "", "chosen": words(70, "c"), "rejected": "short"},
]
PAIR_SHAREGPT_ROWS = [
    {"conversations": turns("Pick one."), "chosen": {"from": "gpt", "value": "Good."},
     "rejected": {"from": "gpt", "value": "Bad."}},
    {"conversations": [{"from": "system", "value": "Sys."}] + turns("h1", "g1", "h2"),
     "chosen": {"from": "gpt", "value": "Better answer."}, "rejected": {"from": "gpt", "value": "Worse."}},
    {"conversations": turns("No chosen."), "rejected": {"from": "gpt", "value": "r"}},  # dropped
    {"conversations": turns("h", "g"), "chosen": {"from": "gpt", "value": "c"},
     "rejected": {"from": "gpt", "value": "r"}},  # even number of messages: dropped
    {"conversations": turns(words(40, "u")), "chosen": {"from": "gpt", "value": words(50, "c")},
     "rejected": {"from": "gpt", "value": words(10, "r")}},
]
FOLDER_FILES = {"part_b.jsonl": [ALPACA_ROWS[0], ALPACA_ROWS[5]], "part_a.jsonl": [ALPACA_ROWS[7], ALPACA_ROWS[11]]}
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                  "history": "history"}
DATASET_INFO = {
    "alpaca_edge": {"file_name": "alpaca_edge.json"},
    "alpaca_edge_full": {"file_name": "alpaca_edge.json", "columns": ALPACA_COLUMNS},
    "alpaca_partial": {"file_name": "alpaca_edge.json", "columns": {"query": "input", "response": "output"}},
    "alpaca_no_query": {"file_name": "alpaca_edge.json", "columns": {"prompt": "instruction", "response": "output"}},
    "sharegpt_edge": {"file_name": "sharegpt_edge.jsonl", "formatting": "sharegpt",
                      "columns": {"messages": "conversations", "system": "system"}},
    "sharegpt_edge_nosys": {"file_name": "sharegpt_edge.jsonl", "formatting": "sharegpt"},
    "sharegpt_tags": {"file_name": "sharegpt_tags.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                               "assistant_tag": "assistant", "system_tag": "system"}},
    "sharegpt_tags_nosystag": {"file_name": "sharegpt_tags.json", "formatting": "sharegpt",
                               "columns": {"messages": "messages"},
                               "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                        "assistant_tag": "assistant"}},
    "pairs_alpaca": {"file_name": "pairs_alpaca.json", "ranking": True,
                     "columns": {**ALPACA_COLUMNS, "response": None, "chosen": "chosen", "rejected": "rejected"}},
    "pairs_sharegpt": {"file_name": "pairs_sharegpt.json", "formatting": "sharegpt", "ranking": True,
                       "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "sampled_5": {"file_name": "alpaca_edge.json", "num_samples": 5},
    "sampled_25": {"file_name": "alpaca_edge.json", "num_samples": 25},
    "folder_set": {"file_name": "folder"},
    "csv_set": {"file_name": "alpaca.csv"},
    "parquet_set": {"file_name": "alpaca.parquet"},
    "split_set": {"file_name": "alpaca_edge.json", "split": "train[:4]"},
}


def write_data():
    DATA.mkdir(exist_ok=True)
    (DATA / "folder").mkdir(exist_ok=True)
    dump = lambda rows: json.dumps(rows, ensure_ascii=False, indent=1)  # noqa: E731
    (DATA / "alpaca_edge.json").write_text(dump(ALPACA_ROWS))
    (DATA / "sharegpt_edge.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in SHAREGPT_ROWS))
    (DATA / "sharegpt_tags.json").write_text(dump(TAG_ROWS))
    (DATA / "pairs_alpaca.json").write_text(dump(PAIR_ALPACA_ROWS))
    (DATA / "pairs_sharegpt.json").write_text(dump(PAIR_SHAREGPT_ROWS))
    for name, rows in FOLDER_FILES.items():
        (DATA / "folder" / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    flat = [{k: r.get(k) or "" for k in ("instruction", "input", "output")} for r in ALPACA_ROWS[:3] + ALPACA_ROWS[5:8]]
    import pandas

    pandas.DataFrame(flat).to_csv(DATA / "alpaca.csv", index=False)
    pandas.DataFrame(flat).to_parquet(DATA / "alpaca.parquet", index=False)
    (DATA / "dataset_info.json").write_text(json.dumps(DATASET_INFO, indent=1))


def write_tokenizers():
    """The demo's tiny tokenizer (ChatML template, no bos) and a plain one: no chat template, no bos, eos </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sys.path.insert(0, str(ROOT / "scripts"))
    import make_tiny_model

    make_tiny_model.build_tokenizer(ROOT / "data", 512).save_pretrained(TOKENIZERS / "tiny")
    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    plain.train_from_iterator(make_tiny_model.corpus(ROOT / "data"), trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=plain, eos_token="</s>").save_pretrained(TOKENIZERS / "plain")


# ---- the cases -------------------------------------------------------------------------------------------------

def case(name, tokenizer, template, dataset_dir, dataset, stage, cutoff_len=2048, max_samples=None):
    return {"name": name, "tokenizer": tokenizer, "template": template, "dataset_dir": dataset_dir,
            "dataset": dataset, "stage": stage, "cutoff_len": cutoff_len, "max_samples": max_samples, "seed": 42}


def cases():
    out = []
    for dataset, stage in DEMO_SETS:
        for tokenizer, template in [("tiny", None), ("tiny", "qwen"), ("tiny", "llama3"), ("plain", "default"),
                                    ("plain", "llama3")]:
            out.append(case(f"demo {dataset} {tokenizer} {template}", tokenizer, template, "data", dataset, stage))
        for cutoff in (16, 32, 64):
            out.append(case(f"demo {dataset} cutoff {cutoff}", "tiny", None, "data", dataset, stage, cutoff))
    edge = "tests/parity/data"
    for template in TEMPLATES:
        for tokenizer in ("tiny", "plain"):
            out.append(case(f"template {template} {tokenizer} sft", tokenizer, template, edge, "sharegpt_edge", "sft"))
            out.append(case(f"template {template} {tokenizer} pairs", tokenizer, template, edge, "pairs_sharegpt",
                            "rm"))
            out.append(case(f"template {template} {tokenizer} alpaca", tokenizer, template, edge, "alpaca_edge_full",
                            "sft"))
    for dataset, stage in [("alpaca_edge", "sft"), ("alpaca_edge_full", "sft"), ("alpaca_partial", "sft"),
                           ("alpaca_no_query", "sft"), ("sharegpt_edge", "sft"), ("sharegpt_edge_nosys", "sft"),
                           ("sharegpt_tags", "sft"), ("sharegpt_tags_nosystag", "sft"), ("pairs_alpaca", "rm"),
                           ("pairs_sharegpt", "rm")]:
        for cutoff in (16, 32, 64, 2048):
            out.append(case(f"{dataset} cutoff {cutoff}", "tiny", None, edge, dataset, stage, cutoff))
    out.append(case("num_samples, two datasets in one run", "tiny", None, edge, "sampled_5,sampled_25", "sft"))
    out.append(case("folder of jsonl files", "tiny", None, edge, "folder_set", "sft"))
    out.append(case("csv file", "tiny", None, edge, "csv_set", "sft"))
    out.append(case("parquet file", "tiny", None, edge, "parquet_set", "sft"))
    out.append(case("split train[:4]", "tiny", None, edge, "split_set", "sft"))
    out.append(case("max_samples 3", "tiny", None, edge, "alpaca_edge", "sft", max_samples=3))
    return out


# ---- LLaMA-Factory ---------------------------------------------------------------------------------------------

def import_llamafactory():
    """llamafactory imports torchaudio (for audio data) and transformers imports torchvision when it finds it; no
    build of either matches torch 2.13 here. Text data needs neither: an empty torchaudio, and no torchvision."""
    stand_in = types.ModuleType("torchaudio")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    sys.modules["torchaudio"] = stand_in
    sys.modules["torchvision"] = None
    import llamafactory.data.loader as loader
    import transformers
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    return types.SimpleNamespace(loader=loader, set_seed=transformers.set_seed, get_train_args=get_train_args,
                                 get_template=get_template_and_fix_tokenizer, load_tokenizer=load_tokenizer)


def digest(ids_and_labels):
    return hashlib.sha256(json.dumps(ids_and_labels, separators=(",", ":")).encode()).hexdigest()[:12]


def folder_order(dataset_dir, dataset):
    """Positions, in LLaMA-Factory's row order (os.listdir's file order), of the rows in sorted file order."""
    folder = ROOT / dataset_dir / DATASET_INFO[dataset]["file_name"]
    counts = {name: len(FOLDER_FILES[name]) for name in os.listdir(folder)}
    starts, position = {}, 0
    for name in os.listdir(folder):
        starts[name], position = position, position + counts[name]
    return [starts[name] + i for name in sorted(counts) for i in range(counts[name])]


def run_case(lf, spec, output_dir):
    stage = spec["stage"]
    args = {"model_name_or_path": str(TOKENIZERS / spec["tokenizer"]), "stage": "sft", "do_train": True,
            "finetuning_type": "full", "dataset": spec["dataset"], "dataset_dir": str(ROOT / spec["dataset_dir"]),
            "template": spec["template"], "cutoff_len": spec["cutoff_len"], "max_samples": spec["max_samples"],
            "seed": spec["seed"], "output_dir": output_dir, "overwrite_output_dir": True, "overwrite_cache": True,
            "report_to": "none"}
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the first example
        model_args, data_args, training_args, _, _ = lf.get_train_args({k: v for k, v in args.items() if v is not None})
        tokenizer_module = lf.load_tokenizer(model_args)
        tokenizer = tokenizer_module["tokenizer"]
        template = lf.get_template(tokenizer, data_args)
        whole = lf.loader.get_dataset(template, model_args, data_args, training_args, stage, **tokenizer_module)
    keys = ["input_ids", "labels"] if stage == "sft" else ["chosen_input_ids", "chosen_labels",
                                                           "rejected_input_ids", "rejected_labels"]
    expected = [[row[k] for k in keys] for row in whole["train_dataset"]]

    # Which rows survive: the same rows, aligned as LLaMA-Factory aligns them, through its processor one at a time.
    lf.set_seed(spec["seed"])  # num_samples draws from numpy's global state, seeded by get_train_args
    aligned = lf.loader._get_merged_dataset(data_args.dataset, model_args, data_args, training_args, stage)
    processor = lf.loader._get_dataset_processor(data_args, stage, template, tokenizer, None)
    kept, examples = [], []
    for i in range(len(aligned)):
        out = processor.preprocess_dataset(aligned[i:i + 1])
        if out.get(keys[0]):
            kept.append(i)
            examples.append([out[k][0] for k in keys])
    assert examples == expected, f"{spec['name']}: row-by-row and whole-dataset preprocessing differ"
    if spec["dataset"] == "folder_set":
        order = folder_order(spec["dataset_dir"], spec["dataset"])
        assert kept == list(range(len(aligned))), "the folder case must keep every row"
        examples = [examples[p] for p in order]
    result = {**spec, "rows": len(aligned), "dropped": sorted(set(range(len(aligned))) - set(kept))}
    if len(examples) <= ROW_DIGESTS_UP_TO:
        result["row_digests"] = [digest(e) for e in examples]
    else:
        result["digest"] = digest(examples)
    return result


def main():
    os.chdir(ROOT)
    write_data()
    if not (TOKENIZERS / "tiny").is_dir() or not (TOKENIZERS / "plain").is_dir():
        write_tokenizers()
    lf = import_llamafactory()
    results = []
    with tempfile.TemporaryDirectory() as output_dir:
        for spec in cases():
            results.append(run_case(lf, spec, output_dir))
            print(f"{spec['name']}: {len(results[-1]['dropped'])} of {results[-1]['rows']} rows dropped", flush=True)
    import llamafactory

    golden = {"llamafactory": llamafactory.__version__, "cases": results}
    (HERE / "golden.json").write_text(json.dumps(golden, separators=(",", ":")).replace('},{"name"', '},\n{"name"'))
    print(f"wrote {HERE / 'golden.json'}: {len(results)} cases")


if __name__ == "__main__":
    main()
