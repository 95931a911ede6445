"""Datasets, templates, truncation, errors and the step sampler."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

import data_utils
from data_utils import IGNORE_INDEX, TEMPLATES, DataError, StepSampler

QWEN = TEMPLATES["qwen"]  # the `tokenizer` fixture has --template qwen applied


def write_dataset(tmp_path, rows, entry=None, name="data.json"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    info = {"set": {"file_name": name, **(entry or {})}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    return tmp_path


def response_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


# ---- rendering and labels -------------------------------------------------------------------------------------

def test_alpaca_sft_labels_cover_the_response_only(tokenizer):
    conversation = {"system": None, "turns": [("What is 2 + 2?", "4")]}
    example = data_utils.tokenize_sft(conversation, tokenizer, QWEN, cutoff_len=512)
    text = tokenizer.decode(example["input_ids"])
    assert text == tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"},
                                                  {"role": "assistant", "content": "4"}], tokenize=False)
    assert response_text(tokenizer, example) == "4<|im_end|>\n"
    assert data_utils.num_targets(example["labels"]) == len(tokenizer("4<|im_end|>\n")["input_ids"])


def test_multi_turn_trains_every_assistant_turn(tokenizer):
    conversation = {"system": "Be brief.", "turns": [("Hi", "Hello"), ("Reverse 'abc'.", "cba")]}
    example = data_utils.tokenize_sft(conversation, tokenizer, QWEN, cutoff_len=512)
    assert response_text(tokenizer, example) == "Hello<|im_end|>\ncba<|im_end|>\n"
    assert "Be brief." in tokenizer.decode(example["input_ids"])


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_builtin_templates_train_responses_only_and_save_a_matching_chat_template(tokenizer, name):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    template = data_utils.apply_template(tok, name, log=lambda *_: None, resize_vocab=True)
    conversation = {"system": "S", "turns": [("q1", "a1"), ("q2", "a2")]}
    example = data_utils.tokenize_sft(conversation, tok, template, 512)
    response = response_text(tok, example)
    assert "a1" in response and "a2" in response and "q1" not in response and "q2" not in response
    messages = [{"role": "system", "content": "S"}] + [{"role": role, "content": text} for turn in
                                                       conversation["turns"] for role, text in zip(("user",
                                                                                                    "assistant"), turn)]
    ids = example["input_ids"][:-1] if template.efficient_eos else example["input_ids"]  # one eos ends the sequence
    assert tok.apply_chat_template(messages, tokenize=False) == tok.decode(ids)


def test_llama3_uses_the_tokenizers_bos_and_eot_as_eos(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)  # the tiny tokenizer has no bos token
    template = data_utils.apply_template(tok, "llama3", log=lambda *_: None, resize_vocab=True)
    example = data_utils.tokenize_sft({"system": None, "turns": [("q", "a")]}, tok, template, 512)
    assert tok.eos_token == "<|eot_id|>" and "<|begin_of_text|>" not in tok.decode(example["input_ids"])
    assert example["input_ids"][-1] == tok.convert_tokens_to_ids("<|eot_id|>")


def test_default_template_closes_user_and_system_turns_with_eos(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    template = data_utils.apply_template(tok, "default", log=lambda *_: None)
    example = data_utils.tokenize_sft({"system": "S", "turns": [("X", "Y")]}, tok, template, 512)
    eos = tok.eos_token
    assert tok.decode(example["input_ids"]) == f"System: S{eos}\nHuman: X{eos}\nAssistant:Y{eos}\n"


def test_tokenizers_own_template_is_cut_apart_as_llamafactory_does(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)  # ChatML with a default system prompt
    template = data_utils.get_template(tok, None)
    assert template.default_system == "You are a helpful assistant."
    assert template.user == ("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",)


def test_tokenizer_without_template_needs_the_flag(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = None
    with pytest.raises(ValueError, match="--template"):
        data_utils.apply_template(tok, None)
    with pytest.raises(ValueError, match="unknown --template 'nope'"):
        data_utils.apply_template(tok, "nope")


def test_budget_rule():
    assert data_utils.budget(100, 10, 50) == (40, 10)  # short response kept whole
    assert data_utils.budget(10, 100, 50) == (10, 40)  # short prompt kept whole
    assert data_utils.budget(60, 40, 50) == (30, 20)  # both cut in proportion
    assert data_utils.budget(1000, 5, 10) == (10, 0)  # the response can be cut away entirely


def test_cutoff_keeps_prompt_start_and_response_start(tokenizer):
    long_prompt = " ".join(f"word{i}" for i in range(200))
    conversation = {"system": "S", "turns": [(long_prompt + " END", "the answer")]}
    example = data_utils.tokenize_sft(conversation, tokenizer, QWEN, cutoff_len=40)
    assert len(example["input_ids"]) == 40
    assert response_text(tokenizer, example) == "the answer<|im_end|>\n"
    text = tokenizer.decode(example["input_ids"])
    assert text.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nword0") and "END" not in text


def test_samples_whose_response_is_cut_away_are_kept_fully_masked_and_counted(tokenizer):
    response = "a b c d e f g h i j k l"  # over half the budget: cut in proportion to the prompt
    conversations = [{"system": None, "turns": [("short", response)]},
                     {"system": None, "turns": [(" ".join(["long"] * 400), response)]}]
    kept, cut_away = data_utils.tokenize_dataset(conversations, tokenizer, QWEN, cutoff_len=24, ranking=False)
    assert (len(kept), cut_away) == (2, 1)
    assert set(kept[1]["labels"]) == {IGNORE_INDEX} and kept[1]["num_targets"] == 0


def test_pairs_share_the_prompt_and_truncate_alike(tokenizer):
    conversation = {"system": None, "turns": [("earlier", "reply")], "prompt": "Which is right?",
                    "chosen": "The first " * 20, "rejected": "no"}
    full = data_utils.tokenize_pair(conversation, tokenizer, QWEN, cutoff_len=512)
    cut = data_utils.tokenize_pair(conversation, tokenizer, QWEN, cutoff_len=60)
    for example in (full, cut):
        prompt_len = example["chosen_labels"].index(next(x for x in example["chosen_labels"] if x != IGNORE_INDEX))
        assert example["chosen_input_ids"][:prompt_len] == example["rejected_input_ids"][:prompt_len]
        assert all(x == IGNORE_INDEX for x in example["rejected_labels"][:prompt_len])
    assert len(cut["chosen_input_ids"]) <= 60 and len(cut["rejected_input_ids"]) <= 60
    assert tokenizer.decode([t for t in full["rejected_labels"] if t != IGNORE_INDEX]) == "no<|im_end|>\n"
    assert "reply" not in tokenizer.decode([t for t in full["chosen_labels"] if t != IGNORE_INDEX])


# ---- dataset_info.json and formats ----------------------------------------------------------------------------

def test_training_data_follows_enable_thinking(tiny_model):
    """--enable_thinking reaches the training examples (load_tokenized), as LLaMA-Factory's: with it the empty
    reasoning block before each response is trained on; without it, it ends the prompt, masked. The rows' text is
    the same, so only the labels move: the targets differ by the block's tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    data_utils.apply_template(tok, "qwen3", log=lambda *_: None, resize_vocab=True)
    block = len(tok.encode(TEMPLATES["qwen3"].empty_thought, add_special_tokens=False))
    targets = {}
    for thinking in (True, False):
        args = SimpleNamespace(dataset_dir="data", max_samples=4, cutoff_len=2048, preprocessing_num_workers=1,
                               enable_thinking=thinking, preprocessing_batch_size=1000, template="qwen3",
                               strict_data=False, seed=42)
        examples = data_utils.load_tokenized("demo_safety_sft", args, tok, False, log=lambda *_: None)
        targets[thinking] = [e["num_targets"] for e in examples]
    assert [a - b for a, b in zip(targets[True], targets[False])] == [block] * 4


def test_demo_datasets_load(tokenizer):
    args = SimpleNamespace(dataset_dir="data", max_samples=None, cutoff_len=512, preprocessing_num_workers=1,
                           enable_thinking=True,
                           template="qwen", strict_data=False, seed=42, preprocessing_batch_size=1000)
    for name, ranking in [("demo_safety_sft", False), ("demo_general_a_sft", False), ("demo_general_b_sft", False),
                          ("demo_safety_dpo", True), ("demo_general_dpo", True)]:
        examples = data_utils.load_tokenized(name, args, tokenizer, ranking, log=lambda *_: None)
        assert len(examples) == 300


def test_sharegpt_with_custom_tags_and_system(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]}]
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    entry = {"formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": {**tags, "system_tag": "system"}}
    _, conversations, _ = data_utils.load_conversations("set", write_dataset(tmp_path, rows, entry), ranking=False)
    assert conversations == [{"row": 0, "system": "S", "turns": [("q", "a")]}]
    # tags that do not name system_tag leave it unset (as in LLaMA-Factory): a system message breaks the role order
    entry["tags"] = tags
    _, conversations, notes = data_utils.load_conversations("set", write_dataset(tmp_path, rows, entry), False)
    assert conversations == [] and list(notes) == ["dropped: broken role order"]


def test_alpaca_history_system_and_query(tmp_path):
    rows = [{"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be exact.",
             "history": [["Hi", "Hello"]]}]
    entry = {"columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
                         "history": "history"}}
    _, conversations, _ = data_utils.load_conversations("set", write_dataset(tmp_path, rows, entry), ranking=False)
    assert conversations == [{"row": 0, "system": "Be exact.", "turns": [("Hi", "Hello"), ("Add\n2 and 3", "5")]}]


def test_columns_not_named_are_unset(tmp_path):
    rows = [{"instruction": "Add", "input": "2 and 3", "output": "5"}]
    entry = {"columns": {"query": "input", "response": "output"}}  # LLaMA-Factory: no prompt column
    _, conversations, _ = data_utils.load_conversations("set", write_dataset(tmp_path, rows, entry), ranking=False)
    assert conversations[0]["turns"] == [("2 and 3", "5")]


def test_file_path_and_hub_style_folder_load_with_inferred_format(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    path = tmp_path / "plain.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    _, conversations, _ = data_utils.load_conversations(str(path), tmp_path, ranking=False)
    assert conversations == [{"row": 0, "system": None, "turns": [("q", "a")]}]
    # hf_hub_url goes through datasets.load_dataset, which also reads a local dataset repository folder
    repo = tmp_path / "hub_repo"
    repo.mkdir()
    (repo / "train.json").write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"hub_set": {"hf_hub_url": str(repo)}}))
    _, conversations, _ = data_utils.load_conversations("hub_set", tmp_path, ranking=False)
    assert conversations == [{"row": 0, "system": None, "turns": [("i", "o")]}]


def test_max_samples_takes_the_first_rows(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    _, conversations, _ = data_utils.load_conversations("set", write_dataset(tmp_path, rows), False, max_samples=3)
    assert [c["turns"][0][0] for c in conversations] == ["q0", "q1", "q2"]


# ---- errors name the file, the row and the field --------------------------------------------------------------

BAD_ROWS = [
    ([{"instruction": "q", "output": "a"}, {"instruction": "q"}], None, r"data\.json, row 2, field 'output': missing"),
    ([{"instruction": "q", "output": 7}], None, r"row 1, field 'output': expected str, got int"),
    ([{"instruction": "q", "output": "  "}], None, r"row 1, field 'output': is empty"),
    ([{"instruction": "q", "chosen": "a"}], {"ranking": True, "columns": {"prompt": "instruction", "chosen": "chosen",
                                                                          "rejected": "rejected"}},
     r"row 1, field 'rejected': missing"),
    ([{"conversations": [{"from": "gpt", "value": "a"}]}], {"formatting": "sharegpt"},
     r"row 1, field 'conversations': message 0 has role 'gpt', expected 'human'"),
    ([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "human"}]}],
     {"formatting": "sharegpt"}, r"row 1, field 'conversations': message 2 needs a string 'value'"),
    ([{"conversations": [{"from": "human", "value": "q"}]}], {"formatting": "sharegpt"},
     r"row 1, field 'conversations': 1 messages: turns must alternate user, assistant and end with an assistant"),
    ([{"instruction": "q", "output": "a", "history": [["only one"]]}],
     {"columns": {"prompt": "instruction", "response": "output", "history": "history"}},
     r"row 1, field 'history': entry 0 must be a \[query, response\] pair"),
    (["not an object"], None, r"row 1: expected a JSON object, got str"),
]


@pytest.mark.parametrize("rows, entry, message", BAD_ROWS)
def test_strict_data_stops_at_a_bad_row_with_file_row_and_field(tmp_path, rows, entry, message):
    ranking = bool(entry and entry.get("ranking"))
    with pytest.raises(DataError, match=message):
        data_utils.load_conversations("set", write_dataset(tmp_path, rows, entry), ranking=ranking, strict=True)


def test_rows_llamafactory_drops_are_dropped_and_logged_per_dataset(tmp_path, tokenizer):
    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q"}, {"instruction": "q", "output": ""},
            {"instruction": "q", "output": None}]
    args = SimpleNamespace(dataset_dir=write_dataset(tmp_path, rows), max_samples=None, cutoff_len=512,
                           preprocessing_num_workers=1, enable_thinking=True, preprocessing_batch_size=1000,
                           template="qwen",
                           strict_data=False, seed=42)
    logged = []
    examples = data_utils.load_tokenized("set", args, tokenizer, False, log=logged.append)
    assert len(examples) == 2 and response_text(tokenizer, examples[1]) == "<|im_end|>\n"  # empty: eos only
    assert "2 samples; 2 dropped: missing response (rows 2, 4); 1 empty response" in logged[0]
    assert "(row 3)" in logged[0] and "--strict_data True" in logged[0]


REFUSED = [
    ({"columns": {"prompt": "instruction", "response": "output", "tools": "tools"}}, r"columns\.tools: tool-use"),
    ({"columns": {"prompt": "instruction", "response": "output", "images": "images"}}, r"columns\.images: multimodal"),
    ({"columns": {"prompt": "instruction", "response": "output", "kto_tag": "tag"}}, r"columns\.kto_tag: KTO"),
    ({"formatting": "openai"}, r"field 'formatting': expected 'alpaca' or 'sharegpt', got 'openai'"),
    ({"ranking": True, "columns": {"prompt": "instruction"}}, r"a ranking dataset needs columns\.chosen and columns"),
    ({"num_samples": 0}, r"field 'num_samples': expected a positive integer"),
]


@pytest.mark.parametrize("entry, message", REFUSED)
def test_refused_dataset_info_entries(tmp_path, entry, message):
    with pytest.raises(DataError, match=message):
        data_utils.load_conversations("set", write_dataset(tmp_path, [{"instruction": "q", "output": "a"}], entry),
                                      ranking=bool(entry.get("ranking")))


def test_tool_use_turns_are_refused(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]}]
    with pytest.raises(DataError, match=r"row 1, field 'conversations': .*tool-use data is not supported"):
        data_utils.load_conversations("set", write_dataset(tmp_path, rows, {"formatting": "sharegpt"}), False)


def test_folder_of_files_and_num_samples(tmp_path):
    (tmp_path / "folder").mkdir()
    for name, rows in {"b.jsonl": [{"instruction": "b", "output": "B"}],
                       "a.jsonl": [{"instruction": "a", "output": "A"}]}.items():
        (tmp_path / "folder" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"set": {"file_name": "folder", "num_samples": 3}}))
    rng = np.random.RandomState(0)
    _, conversations, _ = data_utils.load_conversations("set", tmp_path, ranking=False, rng=rng)
    order = np.random.RandomState(0).permutation(2).tolist()  # every row once, then draws with replacement
    assert [c["turns"][0][0] for c in conversations[:2]] == [["a", "b"][i] for i in order]
    assert len(conversations) == 3


def test_unknown_dataset_name(tmp_path):
    write_dataset(tmp_path, [{"instruction": "q", "output": "a"}])
    with pytest.raises(DataError, match=r"unknown dataset 'nope': not in .*dataset_info\.json \(known: set\)"):
        data_utils.load_conversations("nope", tmp_path, ranking=False)


def test_empty_file_and_invalid_json(tmp_path):
    (tmp_path / "data.json").write_text("")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"set": {"file_name": "data.json"}}))
    with pytest.raises(DataError, match=r"data\.json: the file is empty"):
        data_utils.load_conversations("set", tmp_path, ranking=False)
    (tmp_path / "data.json").write_text("[]")
    with pytest.raises(DataError, match=r"data\.json: the dataset has no rows"):
        data_utils.load_conversations("set", tmp_path, ranking=False)
    write_dataset(tmp_path, [], name="data.jsonl").joinpath("data.jsonl").write_text('{"instruction": "q"}\n{oops\n')
    with pytest.raises(DataError, match=r"data\.jsonl, line 2: invalid JSON"):
        data_utils.load_conversations("set", tmp_path, ranking=False)


def test_sft_data_where_pairs_are_needed_and_back(tmp_path):
    write_dataset(tmp_path, [{"instruction": "q", "output": "a"}])
    with pytest.raises(DataError, match=r"dataset 'set' .* is not preference pairs"):
        data_utils.load_conversations("set", tmp_path, ranking=True)


def test_unsupported_dataset_info_keys(tmp_path):
    write_dataset(tmp_path, [{"instruction": "q", "output": "a"}], {"cloud_file_name": "x"})
    with pytest.raises(DataError, match=r"dataset 'set': unsupported keys \['cloud_file_name'\]"):
        data_utils.load_conversations("set", tmp_path, ranking=False)


def test_modelscope_entries_resolve_as_llamafactory_with_its_hubs_off(tmp_path):
    """hf_hub_url wins over ms_hub_url; without it LLaMA-Factory reads ModelScope even beside a file_name: refused."""
    write_dataset(tmp_path, [{"instruction": "q", "output": "a"}], {"ms_hub_url": "org/x", "hf_hub_url": "org/y"})
    assert data_utils.resolve_dataset("set", tmp_path).source == "org/y"
    write_dataset(tmp_path, [{"instruction": "q", "output": "a"}], {"ms_hub_url": "org/x"})
    with pytest.raises(DataError, match=r"dataset 'set': only on ModelScope \(ms_hub_url 'org/x'\)"):
        data_utils.load_conversations("set", tmp_path, ranking=False)


# ---- step sampler ----------------------------------------------------------------------------------------------

def test_n_ranks_see_the_samples_of_one_process_with_n_times_the_batch():
    single = StepSampler(50, per_device_batch=4, world_size=1, rank=0, grad_accum=3, seed=7)
    ranks = [StepSampler(50, per_device_batch=2, world_size=2, rank=r, grad_accum=3, seed=7) for r in range(2)]
    for step in range(10):
        for m, batch in enumerate(single.micro_batches(step)):
            assert sorted(batch) == sorted(ranks[0].micro_batches(step)[m] + ranks[1].micro_batches(step)[m])


def test_every_sample_once_per_epoch_then_padding_from_the_start():
    sampler = StepSampler(10, per_device_batch=2, world_size=1, rank=0, grad_accum=2, seed=0)
    assert sampler.steps_per_epoch == 3
    epoch = [i for step in range(3) for i in sampler.step_indices(step)]
    assert sorted(epoch[:10]) == list(range(10)) and epoch[10:] == epoch[:2]
    assert sampler.step_indices(3) != sampler.step_indices(0)  # a new permutation each epoch


def test_a_dataset_with_no_row_left_says_why(tmp_path, tokenizer):
    """Rows dropped wholesale are explained: rows whose keys match none of the expected columns name the keys and
    the "columns" setting (AdvBench's goal / target); a missing field names it ("in every row"), in training
    (load_tokenized) as in evaluation. For evaluation (answers_optional) rows without an answer are kept."""
    from types import SimpleNamespace

    with pytest.raises(data_utils.DataError, match=r"the rows' keys \(goal, target\) match none of the columns it "
                                                   r"expects \(prompt: 'instruction', .*\); map them with \"columns\""):
        data_utils.load_conversations("set", write_dataset(tmp_path, [{"goal": "g", "target": "t"}]), False,
                                      refuse_empty=True)
    data = write_dataset(tmp_path, [{"instruction": "a"}, {"instruction": "b"}])
    args = SimpleNamespace(dataset_dir=data, max_samples=None, strict_data=False, seed=0, cutoff_len=64,
                           preprocessing_num_workers=1, enable_thinking=True, preprocessing_batch_size=1000,
                           template="qwen")
    with pytest.raises(data_utils.DataError, match="no samples left: every row dropped \\(missing response: field "
                                                   "'output' in every row\\)"):
        data_utils.load_tokenized("set", args, tokenizer, False, log=lambda *_: None)
    _, conversations, notes = data_utils.load_conversations("set", data, False, refuse_empty=True,
                                                            answers_optional=True)
    assert [c["turns"] for c in conversations] == [[("a", None)], [("b", None)]] and not notes
