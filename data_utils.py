"""Datasets, chat templates, tokenisation and collators, following LLaMA-Factory 0.9.5's preprocessing.

Datasets are named in `DATASET_DIR/dataset_info.json` exactly as in LLaMA-Factory:

    "my_set": {"file_name": "my_set.json",            # a file or a folder; or "hf_hub_url": "org/name"
               "formatting": "alpaca",                 # or "sharegpt"
               "ranking": false,                       # true: preference pairs (chosen / rejected)
               "subset": null, "split": "train", "folder": null, "num_samples": null,
               "columns": {"prompt": "instruction", "query": "input", "response": "output",
                           "history": "history", "system": "system", "messages": "conversations",
                           "chosen": "chosen", "rejected": "rejected"},
               "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                        "assistant_tag": "gpt", "system_tag": "system"}}

As in LLaMA-Factory, an entry with "columns" uses only the columns it names (the others are unset), and likewise
for "tags". A name that is not in dataset_info.json may be a local .json/.jsonl file or a hub dataset ("org/name");
its formatting and ranking are then read from its columns (not LLaMA-Factory's behaviour: it needs an entry).

Every row becomes a conversation {"row", "system", "turns": [(user, assistant), ...]} (SFT) or
{"row", "system", "turns", "prompt", "chosen", "rejected"} (pairs). Rows LLaMA-Factory drops (no response, broken
role order) are dropped and counted, or stop the run with --strict_data. Conversations are tokenised message by
message with a template (LLaMA-Factory's, or the tokenizer's chat template cut apart as LLaMA-Factory does), so
input ids and labels are LLaMA-Factory's; tests/test_parity.py checks this against files LLaMA-Factory wrote.
"""

import array
import difflib
import enum
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from run_guard import first_line, main_process_first

IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad dataset input; the message names the file (or dataset), the row and the field."""


# ---------------------------------------------------------------------------------------------------------------
# dataset_info.json (LLaMA-Factory's parser.py and loader.py)
# ---------------------------------------------------------------------------------------------------------------

ENTRY_KEYS = {"file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "formatting", "ranking", "columns", "tags",
              "subset", "split", "folder", "num_samples"}
OTHER_HUBS = {"ms_hub_url": "ModelScope", "om_hub_url": "Modelers (openMind)"}
COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None,
           "messages": "conversations", "system": None, "chosen": None, "rejected": None}
TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
        "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
REFUSED_COLUMNS = {"tools": "tool-use data is not supported", "images": "multimodal data is not supported",
                   "videos": "multimodal data is not supported", "audios": "multimodal data is not supported",
                   "kto_tag": "KTO data is not supported"}
FILE_TYPES = {".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
              ".txt": "text"}


@dataclass
class DatasetSpec:
    name: str
    source: str  # local file or folder, or hub id
    from_hub: bool = False
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict = None  # None: read from the first row (datasets named by path or hub id)
    tags: dict = field(default_factory=lambda: dict(TAGS))
    subset: str = None
    split: str = "train"
    folder: str = None
    num_samples: int = None


def _entry_spec(name, entry, dataset_dir, where):
    """A dataset_info.json entry, read as LLaMA-Factory's DatasetAttr reads it."""
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise DataError(f"{where}: unsupported keys {sorted(unknown)} (supported: {', '.join(sorted(ENTRY_KEYS))})")
    # LLaMA-Factory with USE_MODELSCOPE_HUB / USE_OPENMIND_HUB off: hf_hub_url wins; an entry with only ms_hub_url
    # or om_hub_url is still read from that hub, which this project does not reach
    other_hub = next((key for key in OTHER_HUBS if key in entry), None)
    if "hf_hub_url" in entry:
        source, from_hub = entry["hf_hub_url"], True
    elif other_hub:
        raise DataError(f"{where}: only on {OTHER_HUBS[other_hub]} ({other_hub} {entry[other_hub]!r}), which these "
                        "scripts do not download from: download it and name the file with 'file_name', or add its "
                        "Hugging Face copy as 'hf_hub_url'")
    elif "file_name" in entry:
        source, from_hub = str(Path(dataset_dir) / entry["file_name"]), False
    else:
        raise DataError(f"{where}: needs 'file_name' or 'hf_hub_url'")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataError(f"{where}, field 'formatting': expected 'alpaca' or 'sharegpt', got {formatting!r}")
    columns, tags = dict(COLUMNS), dict(TAGS)
    if "columns" in entry:  # as in LLaMA-Factory, a column it does not name is unset
        named = entry["columns"]
        for key in sorted(set(named) & set(REFUSED_COLUMNS)):
            raise DataError(f"{where}, columns.{key}: {REFUSED_COLUMNS[key]}")
        unknown = set(named) - set(COLUMNS)
        if unknown:
            raise DataError(f"{where}: unknown columns {sorted(unknown)} (known: {', '.join(COLUMNS)})")
        columns = {key: named.get(key) for key in COLUMNS}
    if "tags" in entry:
        unknown = set(entry["tags"]) - set(TAGS)
        if unknown:
            raise DataError(f"{where}: unknown tags {sorted(unknown)} (known: {', '.join(TAGS)})")
        tags = {key: entry["tags"].get(key) for key in TAGS}
    ranking = bool(entry.get("ranking", False))
    if ranking and "columns" not in entry:  # LLaMA-Factory fails here (it has no default); the usual names
        columns.update(chosen="chosen", rejected="rejected")
    if ranking and not (columns["chosen"] and columns["rejected"]):
        raise DataError(f"{where}: a ranking dataset needs columns.chosen and columns.rejected")
    if formatting == "alpaca" and not ranking and not columns["response"]:
        raise DataError(f"{where}: no response column: pre-training text (LLaMA-Factory's --stage pt), which these "
                        "scripts do not train on (SFT needs a response, DPO chosen and rejected)")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise DataError(f"{where}, field 'num_samples': expected a positive integer, got {num_samples!r}")
    return DatasetSpec(name, source, from_hub, formatting, ranking, columns, tags, entry.get("subset"),
                       entry.get("split", "train"), entry.get("folder"), num_samples)


def resolve_dataset(name, dataset_dir):
    """Find `name` in DATASET_DIR/dataset_info.json, else treat it as a local file or a hub dataset id."""
    info_path = Path(dataset_dir) / "dataset_info.json"
    info = {}
    if info_path.is_file():
        try:
            info = json.loads(read_utf8(info_path))
        except json.JSONDecodeError as err:
            raise DataError(f"{info_path}: invalid JSON ({err})") from None
    if name in info:
        return _entry_spec(name, info[name], dataset_dir, f"{info_path}, dataset '{name}'")
    path = Path(name)
    if path.suffix in FILE_TYPES or path.exists():
        if not path.is_file():
            raise DataError(f"dataset '{name}': no such file, and not an entry of {info_path}")
        return DatasetSpec(name, str(path))
    if "/" in name:
        return DatasetSpec(name, name, from_hub=True)
    if not Path(dataset_dir).is_dir():
        where = f"--dataset_dir {dataset_dir} does not exist"
    elif not info_path.is_file():
        where = f"--dataset_dir {dataset_dir} has no dataset_info.json"
    else:
        where = f"not in {info_path} (known: {', '.join(sorted(info)) or 'none'})"
    raise DataError(f"unknown dataset '{name}': {where}, and it is not a file or a hub id")


def infer_format(spec, rows):
    """For datasets named by path or hub id: formatting, ranking and columns from the first row's keys."""
    keys = set(rows[0])
    messages = next((k for k in ("conversations", "messages") if k in keys), None)
    spec.formatting = "sharegpt" if messages else "alpaca"
    spec.ranking = {"chosen", "rejected"} <= keys
    spec.columns = {**COLUMNS, "system": "system" if "system" in keys else None}
    if spec.ranking:
        spec.columns.update(chosen="chosen", rejected="rejected")
    if messages:
        spec.columns["messages"] = messages
        first = rows[0][messages]
        if isinstance(first, list) and first and isinstance(first[0], dict) and "role" in first[0]:
            spec.tags.update(role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant")
    return spec


def _data_files(spec):
    """The files of a local dataset (a file, or every file of a folder) and their type, as LLaMA-Factory finds them.

    LLaMA-Factory takes a folder's files in os.listdir order, which depends on the file system; we sort them.
    """
    path = Path(spec.source)
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir())
    elif path.is_file():
        files = [str(path)]
    else:
        raise DataError(f"dataset '{spec.name}': {path} does not exist")
    types = {FILE_TYPES.get(Path(f).suffix) for f in files}
    if None in types:
        raise DataError(f"dataset '{spec.name}' ({path}): file types must be {', '.join(FILE_TYPES)}")
    if len(types) > 1:
        raise DataError(f"dataset '{spec.name}' ({path}): the files must all be of one type, got {sorted(types)}")
    return files, types.pop()


def read_utf8(path):
    """The text of a data file; a byte-order mark is skipped, as `datasets` does. Not UTF-8 (e.g. saved as Latin-1):
    a DataError naming the file and the byte offset of the first byte that is not."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at byte offset {err.start}); save it "
                        "as UTF-8") from None


def _read_json_file(path):
    text = read_utf8(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if path.endswith(".jsonl"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {number}: invalid JSON ({err.msg})") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    return rows


def read_rows(spec):
    """All rows of a dataset as dicts, and where each comes from ("FILE, row N").

    JSON files of the "train" split are parsed here so errors can name the row; other files (and other splits)
    and hub datasets are loaded with `datasets`, as LLaMA-Factory loads them.
    """
    if spec.from_hub:
        import datasets  # imported lazily: only some datasets need it

        table = datasets.load_dataset(spec.source, name=spec.subset, split=spec.split, data_dir=spec.folder)
        rows, origins = list(table), [(spec.source, i + 1) for i in range(len(table))]
    else:
        files, kind = _data_files(spec)
        if kind == "json" and spec.split == "train":
            rows, origins = [], []
            for path in files:
                file_rows = _read_json_file(path)
                rows += file_rows
                origins += [(path, i + 1) for i in range(len(file_rows))]
        else:
            import datasets

            for path in files if kind in ("csv", "json", "text") else []:  # parsed by `datasets`: check them first
                read_utf8(path)
            table = datasets.load_dataset(kind, data_files=files, split=spec.split)
            rows, origins = list(table), [(spec.source, i + 1) for i in range(len(table))]
    if not rows:
        raise DataError(f"{spec.source}: the dataset has no rows")
    for row, (path, number) in zip(rows, origins):
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {number}: expected a JSON object, got {type(row).__name__}")
    return rows, origins


def sample_rows(count, num_samples, rng):
    """Row positions for "num_samples" (LLaMA-Factory: a permutation of the rows, then draws with replacement)."""
    positions = list(rng.permutation(count)[:num_samples])
    if num_samples > count:
        positions += list(rng.choice(count, num_samples - count))
    return [int(p) for p in positions]


# ---------------------------------------------------------------------------------------------------------------
# Rows -> conversations (LLaMA-Factory's converter.py and the row checks of its processors)
# ---------------------------------------------------------------------------------------------------------------

class _Skip(Exception):
    """A row LLaMA-Factory drops: (reason, field)."""


class _Row:
    """One row: column access as LLaMA-Factory does it (an unset column reads None), errors that say where.
    answers_optional: an alpaca row without a response is kept with response None (evaluation, as LLaMA-Factory's
    predict path keeps it with an empty label), if it has a prompt."""

    def __init__(self, spec, origin, row, strict, notes, answers_optional=False):
        self.spec, self.origin, self.row, self.strict, self.notes = spec, origin, row, strict, notes
        self.answers_optional = answers_optional

    def column(self, role):
        return self.spec.columns.get(role)

    def value(self, role, kinds=(str,)):
        column = self.column(role)
        value = None if column is None else self.row.get(column)
        if value is not None and not isinstance(value, kinds):
            raise self.error(column, f"expected {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
        return value

    def error(self, column, problem):
        return DataError(f"{self.origin[0]}, row {self.origin[1]}, field '{column}': {problem}")

    def skip(self, reason, column, detail):
        raise (self.error(column, detail) if self.strict else _Skip(reason, column))

    def check_response(self, text, column):
        """An empty response is trained on its end-of-turn token only (LLaMA-Factory); counted, or an error."""
        if not text.strip():
            if self.strict:
                raise self.error(column, "is empty")
            self.notes.setdefault("empty response (trained on the end-of-turn token only)", []).append(self.origin)


def _alpaca_conversation(r):
    turns = []
    for number, pair in enumerate(r.value("history", (list,)) or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise r.error(r.column("history"), f"entry {number} must be a [query, response] pair of strings")
        turns.append(tuple(pair))
    user = "\n".join(text for text in (r.value("prompt"), r.value("query")) if text)
    conversation = {"system": r.value("system"), "turns": turns}
    if r.spec.ranking:
        for role in ("chosen", "rejected"):
            if r.value(role) is None:
                r.skip("missing chosen or rejected response", r.column(role), "missing")
        for role in ("chosen", "rejected"):
            r.check_response(r.value(role), r.column(role))
        return {**conversation, "prompt": user, "chosen": r.value("chosen"), "rejected": r.value("rejected")}
    response = r.value("response")
    if response is None and r.answers_optional and user:
        turns.append((user, None))
        return conversation
    if response is None:
        r.skip("missing response", r.column("response") or "response", "missing")
    r.check_response(response, r.column("response"))
    turns.append((user, response))
    return conversation


def _message(r, column, message, number, accepted):
    """(role, content) of a sharegpt message whose role must be one of `accepted`."""
    tags = r.spec.tags
    if not isinstance(message, dict):
        raise r.error(column, f"message {number} must be an object, got {type(message).__name__}")
    role, content = message.get(tags["role_tag"]), message.get(tags["content_tag"])
    if role not in accepted:
        if tags["role_tag"] not in message and {"role", "content"} <= set(message):  # tags left at sharegpt's
            r.skip(f"broken role order (OpenAI-style 'role' and 'content' keys: {OPENAI_TAGS_FIX})", column,
                   f"message {number} has OpenAI-style 'role' and 'content' keys, not '{tags['role_tag']}': "
                   + OPENAI_TAGS_FIX)
        r.skip("broken role order", column, f"message {number} has role {role!r}, expected {accepted[0]!r}")
    if role in (tags["observation_tag"], tags["function_tag"]):
        raise r.error(column, f"message {number} has role {role!r}: tool-use data is not supported")
    if not isinstance(content, str):
        raise r.error(column, f"message {number} needs a string '{tags['content_tag']}'")
    return content


OPENAI_TAGS_FIX = ("give the dataset's entry in dataset_info.json \"tags\": {\"role_tag\": \"role\", \"content_tag\": "
                   "\"content\", \"user_tag\": \"user\", \"assistant_tag\": \"assistant\", \"system_tag\": \"system\"}")


def _sharegpt_conversation(r):
    tags, column = r.spec.tags, r.column("messages")
    messages = r.value("messages", (list,))
    if messages is None:
        r.skip("missing messages", column, "missing")
    system = r.value("system")
    first = messages[0] if messages else None
    if tags["system_tag"] and isinstance(first, dict) and first.get(tags["role_tag"]) == tags["system_tag"]:
        system, messages = first.get(tags["content_tag"]), messages[1:]
        if not isinstance(system, str):
            raise r.error(column, f"the system message needs a string '{tags['content_tag']}'")
    roles = ((tags["user_tag"], tags["observation_tag"]), (tags["assistant_tag"], tags["function_tag"]))
    contents = [_message(r, column, m, i, roles[i % 2]) for i, m in enumerate(messages)]
    if len(contents) % 2 != (1 if r.spec.ranking else 0) or not contents:
        end = "a user" if r.spec.ranking else "an assistant"
        r.skip("wrong number of messages", column, f"{len(contents)} messages: turns must alternate user, assistant "
                                                   f"and end with {end} turn")
    turns, pair = list(zip(contents[0::2], contents[1::2])), {}
    for role in ("chosen", "rejected") if r.spec.ranking else ():
        message = r.value(role, (dict, str))
        if not isinstance(message, dict):
            r.skip("missing chosen or rejected response", r.column(role), "missing (expected a message object)")
        pair[role] = _message(r, r.column(role), message, 0, roles[1])
    for _, response in turns:
        r.check_response(response, column)
    for role, response in pair.items():
        r.check_response(response, r.column(role))
    if not r.spec.ranking:
        return {"system": system, "turns": turns}
    return {"system": system, "turns": turns, "prompt": contents[-1], **pair}


def to_conversations(spec, rows, origins, ranking, strict=False, refuse_empty=False, answers_optional=False):
    """Rows -> conversations (each with its position "row"); rows LLaMA-Factory drops are dropped and noted.

    Returns (conversations, notes): notes maps each reason (dropped rows, adjusted rows) to the rows' origins.
    With strict, the first bad row raises a DataError naming the file, the row and the field instead. With
    refuse_empty, rows of which none is left raise a DataError saying why (see why_no_samples). answers_optional:
    see _Row (an SFT row without a response has it None).
    """
    if spec.ranking != ranking:
        want = "preference pairs (\"ranking\": true)" if ranking else "SFT data (no \"ranking\")"
        raise DataError(f"dataset '{spec.name}' ({spec.source}) is not {want}")
    convert = _alpaca_conversation if spec.formatting == "alpaca" else _sharegpt_conversation
    conversations, notes, fields = [], {}, {}
    for index, (row, origin) in enumerate(zip(rows, origins)):
        try:
            conversations.append({"row": index, **convert(_Row(spec, origin, row, strict, notes, answers_optional))})
        except _Skip as skip:
            reason, column = skip.args
            notes.setdefault(f"dropped: {reason}", []).append(origin)
            fields.setdefault(reason, set()).add(column)
    if refuse_empty and rows and not conversations:
        raise DataError(f"dataset '{spec.name}' ({spec.source}): no samples left: "
                        + why_no_samples(spec, rows, notes, fields))
    return conversations, notes


def why_no_samples(spec, rows, notes, fields):
    """Why every row was dropped: the rows' keys when they match none of the columns the dataset's entry expects
    (and the "columns" setting that maps them), else each reason with its field and how many rows it dropped."""
    expected = {role: column for role, column in spec.columns.items() if column}
    found = sorted({key for row in rows if isinstance(row, dict) for key in row})
    if not set(found) & set(expected.values()):
        wanted = ", ".join(f"{role}: '{column}'" for role, column in expected.items())
        return (f"the rows' keys ({', '.join(found)}) match none of the columns it expects ({wanted}); map them "
                f"with \"columns\" in its entry of dataset_info.json, e.g. \"columns\": {{\"prompt\": \"{found[0]}\""
                + (f", \"response\": \"{found[1]}\"" if len(found) > 1 else "") + "}")
    reasons = []
    for reason, columns in fields.items():
        count = len(notes[f"dropped: {reason}"])
        where = " or ".join(f"'{column}'" for column in sorted(map(str, columns)))
        reasons.append(f"{reason}: field {where} " + ("in every row" if count == len(rows) else f"in {count} rows"))
    return "every row dropped (" + "; ".join(reasons) + ")"


# ---------------------------------------------------------------------------------------------------------------
# Templates (LLaMA-Factory's template.py: every template of its registry, as data in chat_templates.json)
# ---------------------------------------------------------------------------------------------------------------

class Special(enum.Enum):
    """A slot written as the tokenizer's own special token id (nothing, if the tokenizer has no such token)."""

    BOS = "bos_token"
    EOS = "eos_token"


BOS, EOS = Special.BOS, Special.EOS


@dataclass(frozen=True)
class Token:
    """A slot written as the id of one vocabulary entry (chatglm3's <|user|>), however its text would tokenise."""

    text: str


@dataclass(frozen=True)
class Template:
    """How each message is written: slots (strings with "{{content}}" where the text goes, BOS / EOS, or Token).

    Message 0 is preceded by `prefix` and the system slots (filled with the row's system text, else
    `default_system`); with `system_in_user` (LLaMA-Factory's Llama2Template: llama2, mistral, gemma) the first
    system slot, filled, instead opens the first user message. `stop_words[0]` becomes the eos token if
    `replace_eos`; the other stop words are added as special tokens. With `efficient_eos` the assistant slots end
    without eos: one eos closes the whole sequence, and the eos after each earlier response is trained as the label of
    the next prompt's first token. `thought_words` (reasoning templates: qwen3, deepseekr1, ...) open and close a
    reasoning block: a response without one gets `empty_thought` before it (trained on, or with `enable_thinking`
    false put at the end of the prompt instead, every response's own block then removed), and earlier responses of a
    preference prompt lose theirs. `multimodal_plugin` names LLaMA-Factory's plugin for images etc. (text rows only
    here).
    """

    user: tuple = ("{{content}}",)
    assistant: tuple = ("{{content}}", EOS)
    system: tuple = ("{{content}}",)
    prefix: tuple = ()
    default_system: str = ""
    stop_words: tuple = ()
    replace_eos: bool = False
    efficient_eos: bool = False
    system_in_user: bool = False
    thought_words: tuple = None
    empty_thought: str = None
    enable_thinking: bool = True
    multimodal_plugin: str = None

    def tokens(self):
        """The vocabulary entries this template writes as single tokens: stop words and Token slots."""
        slots = self.user + self.assistant + self.system + self.prefix
        return list(dict.fromkeys([*self.stop_words, *(slot.text for slot in slots if isinstance(slot, Token))]))


def _slot(data):
    if isinstance(data, str):
        return data
    return Special(data["special"]) if "special" in data else Token(data["token"])


def load_templates(path):
    """chat_templates.json (written from LLaMA-Factory's registry by tests/parity/make_template_golden.py)."""
    table = json.loads(Path(path).read_text(encoding="utf-8"))["templates"]
    return {name: Template(**{key: tuple(_slot(s) for s in value) if key in ("user", "assistant", "system", "prefix")
                              else tuple(value) if isinstance(value, list) else value
                              for key, value in entry.items()})
            for name, entry in table.items()}


TEMPLATES = load_templates(Path(__file__).with_name("chat_templates.json"))
THOUGHT_WORDS = ("<think>\n", "\n</think>\n\n")  # LLaMA-Factory's default, and a tokenizer template's with <think>


def template_from_tokenizer(tokenizer):
    """The tokenizer's chat template as a Template, cut apart as LLaMA-Factory does (parse_template).

    Renders a system message, a user message (alone, and after an empty system message) and an exchange, with
    "{{content}}" as the text. The default system text is what the lone user rendering has in addition (found by
    a greedy character match), and the user slot is what follows the system slot filled with it.
    """
    prefix = tokenizer.decode(tokenizer.encode(""))

    def render(messages, generation_prompt):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        return text[len(prefix):]

    system = render([{"role": "system", "content": "{{content}}"}], False)
    user_after_empty_system = render([{"role": "system", "content": ""}, {"role": "user", "content": "{{content}}"}],
                                     True)
    user = render([{"role": "user", "content": "{{content}}"}], True)
    assistant = render([{"role": "user", "content": "{{content}}"}, {"role": "assistant", "content": "{{content}}"}],
                       False)[len(user):]
    reasoning = "<think>" in assistant
    assistant = assistant.replace("<think>", "").replace("</think>", "").lstrip("\n")
    default_system = ""
    if len(user) > len(user_after_empty_system):
        extra, i = "", 0
        for char in user:
            if i < len(user_after_empty_system) and char == user_after_empty_system[i]:
                i += 1
            elif i < len(user_after_empty_system):
                extra += char
        default_system = extra
        user = user[len(system.replace("{{content}}", default_system, 1)):]
    return Template(user=(user,), assistant=(assistant,), system=(system,), prefix=(prefix,) if prefix else (),
                    default_system=default_system, thought_words=THOUGHT_WORDS if reasoning else None,
                    empty_thought="".join(THOUGHT_WORDS) if reasoning else None)


def get_template(tokenizer, name, enable_thinking=True):
    """--template NAME, else the tokenizer's own chat template; `enable_thinking` applies to reasoning templates."""
    if name:
        if name not in TEMPLATES:
            close = difflib.get_close_matches(name, TEMPLATES, n=4, cutoff=0.6)
            raise ValueError(f"unknown --template {name!r}" + (f"; closest: {', '.join(close)}" if close else "")
                             + f" ({len(TEMPLATES)} templates of LLaMA-Factory 0.9.5 are known, see README); leave "
                             "--template out to use the tokenizer's own chat template")
        template = TEMPLATES[name]
    elif isinstance(tokenizer.chat_template, str):
        template = template_from_tokenizer(tokenizer)
    else:
        raise ValueError("the tokenizer has no chat template: pass --template (e.g. chatml, llama3, qwen3); "
                         "LLaMA-Factory falls back to 'empty' here, so --template empty does what it does")
    return replace(template, enable_thinking=enable_thinking) if template.thought_words else template


def missing_tokens(tokenizer, template):
    """The template's single-token entries (stop words, Token slots; <|endoftext|> when there is no eos) that the
    tokenizer's vocabulary lacks: apply_template would add them, and the model has no embedding for them."""
    needed = template.tokens() + ([] if tokenizer.eos_token_id is not None or template.replace_eos else
                                  ["<|endoftext|>"])
    vocabulary = tokenizer.get_vocab()
    return [token for token in needed if token not in vocabulary]


def apply_template(tokenizer, name, log=print, resize_vocab=False, enable_thinking=True):
    """Resolve the template and fix the tokenizer's special tokens as LLaMA-Factory does; returns the Template.

    With replace_eos the template's first stop word becomes the eos token (llama3: <|eot_id|>); a tokenizer
    without eos gets <|endoftext|>, one without pad uses eos; the other stop words become special tokens. A token the
    vocabulary lacks is refused (ValueError naming it) unless `resize_vocab`: it is then added, and the model's
    embeddings must grow (train_utils.resize_embeddings, LLaMA-Factory's --resize_vocab).
    --template NAME is also installed as the tokenizer's chat template (saved with the model, for generation).
    """
    template = get_template(tokenizer, name, enable_thinking)
    missing = missing_tokens(tokenizer, template)
    if missing and not resize_vocab:
        raise ValueError(f"--template {name}: the tokenizer has no token {missing[0]!r}"
                         + (f" (nor {', '.join(map(repr, missing[1:]))})" if missing[1:] else "")
                         + ": this template is for another model family; leave --template out to use the "
                           "tokenizer's own chat template, or (training) pass --resize_vocab True to add the token(s) "
                           "with new embedding rows, as LLaMA-Factory does")
    size = len(tokenizer)
    stop_words = list(template.stop_words)
    if template.replace_eos and tokenizer.eos_token != stop_words[0]:
        tokenizer.add_special_tokens({"eos_token": stop_words[0]})
    stop_words = stop_words[1:] if template.replace_eos else stop_words
    if tokenizer.eos_token_id is None:
        tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if stop_words:
        tokenizer.add_special_tokens({"additional_special_tokens": stop_words})
    named = [token for token in template.tokens() if token not in tokenizer.get_vocab()]
    if named:  # Token slots LLaMA-Factory looks up without adding (it would write an unknown id)
        tokenizer.add_tokens(named, special_tokens=True)
    if len(tokenizer) > size:
        log(f"--resize_vocab: the template added {len(tokenizer) - size} token(s) "
            f"({', '.join(tokenizer.convert_ids_to_tokens(list(range(size, len(tokenizer)))))}); the model's "
            "embeddings grow to match")
    if name:
        tokenizer.chat_template = jinja_template(template)
    return template


def _literal(text):
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def jinja_template(template):
    """A Jinja chat template that renders text as `template` writes it (the generation prompt is in the user slot)."""
    def expression(slots, content):
        parts = []
        for slot in slots:
            if isinstance(slot, Special):
                parts.append(f"({slot.value} or '')")
            elif isinstance(slot, Token):
                parts.append(_literal(slot.text))
            else:
                parts.append(f" + {content} + ".join(_literal(piece) for piece in slot.split("{{content}}")))
        return " + ".join(parts)

    system = expression(template.system[:1] if template.system_in_user else template.system, "system")
    opening = ("{% set content = " + system + " + content %}" if template.system_in_user else "{{ " + system + " }}")
    thought = ""
    if template.thought_words:
        opens, closes = (_literal(word.strip()) for word in template.thought_words)
        thought = ("{% if " + opens + " not in content and " + closes + " not in content %}{{ "
                   + _literal(template.empty_thought) + " }}{% endif %}")  # before the slot, as in training
    return (
        "{{ " + expression(template.prefix, "''") + " }}" if template.prefix else ""
    ) + (
        "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system = " + _literal(template.default_system) + " %}"
        "{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}{% set content = message['content'] %}"
        "{% if loop.first and system %}" + opening + "{% endif %}"
        "{% if message['role'] == 'user' %}{{ " + expression(template.user, "content") + " }}"
        "{% else %}" + thought + "{{ " + expression(template.assistant, "content") + " }}{% endif %}{% endfor %}"
    )


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation and truncation (LLaMA-Factory's Template.encode_* and processor/supervised.py, pairwise.py)
# ---------------------------------------------------------------------------------------------------------------

def _ids(tokenizer, slots, content):
    """Token ids of slots filled with content; each string slot is tokenised on its own."""
    ids = []
    for slot in slots:
        if isinstance(slot, Special):
            special = getattr(tokenizer, f"{slot.value}_id")
            ids += [] if special is None else [special]
        elif isinstance(slot, Token):
            ids.append(tokenizer.convert_tokens_to_ids(slot.text))
        elif slot:
            text = slot.replace("{{content}}", content, 1)
            ids += tokenizer.encode(text, add_special_tokens=False) if text else []
    return ids


def encode_messages(template, tokenizer, system, messages):
    """Token ids of each message of [user, assistant, user, ...] (LLaMA-Factory's Template._encode)."""
    system = system or template.default_system
    encoded = []
    for i, content in enumerate(messages):
        ids = []
        if i == 0:
            ids = _ids(tokenizer, template.prefix, "")
            if system and template.system_in_user:
                content = template.system[0].replace("{{content}}", system, 1) + content
            elif system:
                ids += _ids(tokenizer, template.system, system)
        ids += _ids(tokenizer, template.user if i % 2 == 0 else template.assistant, content)
        encoded.append(ids)
    return encoded


def _remove_thought(template, text):
    opens, closes = (re.escape(word) for word in template.thought_words)
    return re.sub(f"{opens}(.*?){closes}", "", text, flags=re.DOTALL).lstrip("\n")


def _lacks_thought(template, response):
    return all(word.strip() not in response for word in template.thought_words)


def encode_multiturn(template, tokenizer, system, messages):
    """[(prompt ids, response ids)] of every turn (LLaMA-Factory's encode_multiturn, ReasoningTemplate's included):
    a response without a reasoning block gets an empty one, trained on (or, with enable_thinking false, every block
    is removed and the empty one ends the prompt)."""
    if template.thought_words and not template.enable_thinking:
        messages = [_remove_thought(template, text) if i % 2 else text for i, text in enumerate(messages)]
    encoded = encode_messages(template, tokenizer, system, messages)
    if template.thought_words:
        thought = tokenizer.encode(template.empty_thought, add_special_tokens=False)
        for i in range(0, len(messages), 2):
            if _lacks_thought(template, messages[i + 1]):
                if template.enable_thinking:
                    encoded[i + 1] = thought + encoded[i + 1]
                else:
                    encoded[i] = encoded[i] + thought
    return [(encoded[i], encoded[i + 1]) for i in range(0, len(encoded), 2)]


def encode_oneturn(template, tokenizer, system, messages):
    """(prompt ids, response ids) of the last response after every earlier message (LLaMA-Factory's
    encode_oneturn): a reasoning template removes the earlier responses' reasoning blocks, then treats the last
    response as encode_multiturn does."""
    if template.thought_words:
        messages = [_remove_thought(template, text) if i % 2 and i < len(messages) - 1 else text
                    for i, text in enumerate(messages)]
        if not template.enable_thinking:
            messages[-1] = _remove_thought(template, messages[-1])
    encoded = encode_messages(template, tokenizer, system, messages)
    prompt, response = [t for ids in encoded[:-1] for t in ids], encoded[-1]
    if template.thought_words and _lacks_thought(template, messages[-1]):
        thought = tokenizer.encode(template.empty_thought, add_special_tokens=False)
        prompt, response = (prompt, thought + response) if template.enable_thinking else (prompt + thought, response)
    return prompt, response


def budget(source_len, target_len, cutoff_len):
    """Lengths (source, target) that fit in cutoff_len (LLaMA-Factory's infer_seqlen).

    The response is kept whole if it takes less than half the budget; else the prompt is kept whole if it
    does; else both are cut in proportion to their lengths.
    """
    if 2 * target_len < cutoff_len:
        target_cap = cutoff_len
    elif 2 * source_len < cutoff_len:
        target_cap = cutoff_len - source_len
    else:
        target_cap = int(cutoff_len * (target_len / (source_len + target_len)))
    target = min(target_cap, target_len)
    return min(max(cutoff_len - target, 0), source_len), target


def tokenize_sft(conversation, tokenizer, template, cutoff_len):
    """input_ids / labels for every response of a conversation; each turn keeps the start of its prompt and response.

    Turns are added while the sequence is shorter than cutoff_len, each cut to the budget left. A response can be
    cut away entirely: its labels are then all IGNORE_INDEX (the row is kept, as in LLaMA-Factory). With
    efficient_eos one eos (trained on) ends the sequence and counts against cutoff_len from the start.
    """
    messages = [text for turn in conversation["turns"] for text in turn]
    eos = [tokenizer.eos_token_id] if template.efficient_eos else []
    input_ids, labels = [], []
    for turn, (source, target) in enumerate(encode_multiturn(template, tokenizer, conversation["system"], messages)):
        if len(input_ids) + len(eos) >= cutoff_len:
            break
        keep_source, keep_target = budget(len(source), len(target), cutoff_len - len(input_ids) - len(eos))
        input_ids += source[:keep_source] + target[:keep_target]
        # efficient_eos: the eos the previous response lacks is the label of this prompt's first token
        source_labels = eos + [IGNORE_INDEX] * (keep_source - 1) if eos and turn else [IGNORE_INDEX] * keep_source
        labels += source_labels + target[:keep_target]
    return {"input_ids": input_ids + eos, "labels": labels + eos}


def _prompt_and_responses(template, tokenizer, system, turns, prompt, responses):
    """Prompt ids (from the first response's encoding, as LLaMA-Factory takes them) and each response's ids."""
    history = [text for turn in turns for text in turn] + [prompt]
    eos = [tokenizer.eos_token_id] if template.efficient_eos else []
    encoded = [encode_oneturn(template, tokenizer, system, history + [response]) for response in responses]
    return encoded[0][0], [response_ids + eos for _, response_ids in encoded]


def tokenize_pair(conversation, tokenizer, template, cutoff_len):
    """Shared prompt + chosen / rejected responses, truncated alike (one budget for prompt + longer response).

    The prompt (system, earlier turns, last user message) keeps its start, the responses theirs.
    """
    prompt_ids, responses = _prompt_and_responses(template, tokenizer, conversation["system"], conversation["turns"],
                                                  conversation["prompt"],
                                                  [conversation["chosen"], conversation["rejected"]])
    keep_prompt, keep_response = budget(len(prompt_ids), max(map(len, responses)), cutoff_len)
    out = {}
    for role, ids in zip(("chosen", "rejected"), responses):
        out[f"{role}_input_ids"] = prompt_ids[:keep_prompt] + ids[:keep_response]
        out[f"{role}_labels"] = [IGNORE_INDEX] * keep_prompt + ids[:keep_response]
    return out


def generation_header_ids(template, tokenizer):
    """Token ids that close a user message and open the assistant's answer (what the user slot writes after the
    text: "<|im_end|>\\n<|im_start|>assistant\\n" in ChatML)."""
    user = template.user
    slot = next(i for i, s in enumerate(user) if isinstance(s, str) and "{{content}}" in s)
    return _ids(tokenizer, (user[slot].split("{{content}}", 1)[1], *user[slot + 1:]), "")


def tokenize_prompt(conversation, tokenizer, template, cutoff_len, keep_header=True):
    """The prompt to generate from and the reference response, as LLaMA-Factory's unsupervised processor builds them
    for --predict_with_generate: the system text, every earlier turn and the last user message form the prompt; the
    last response (SFT rows) or the chosen one (pairs; LLaMA-Factory leaves it empty) is the label (none for a row
    without a response: label_ids empty). One budget (LLaMA-Factory's infer_seqlen) cuts both, the label keeping its
    start. A cut prompt keeps its start and its generation header (generation_header_ids): LLaMA-Factory keeps the
    start only (input_ids[:source_len]), so the model would continue the user's text instead of answering it.

    Returns {"prompt_ids", "label_ids", "prompt_cut"}; None when the budget cannot hold the header and one token
    before it (the caller refuses the row). keep_header=False cuts as LLaMA-Factory does (its goldens test that).
    """
    if "prompt" in conversation:  # a preference pair
        turns, prompt, response = conversation["turns"], conversation["prompt"], conversation["chosen"]
    else:
        turns, (prompt, response) = conversation["turns"][:-1], conversation["turns"][-1]
    prompt_ids, (label_ids,) = _prompt_and_responses(template, tokenizer, conversation["system"], turns, prompt,
                                                     ["" if response is None else response])
    label_ids = [] if response is None else label_ids
    keep_prompt, keep_label = budget(len(prompt_ids), len(label_ids), cutoff_len)
    cut = keep_prompt < len(prompt_ids)
    if cut and not keep_header:
        prompt_ids = prompt_ids[:keep_prompt]
    elif cut:
        header = len(generation_header_ids(template, tokenizer))
        if template.thought_words and not template.enable_thinking:  # encode_oneturn ended it with the empty block
            header += len(tokenizer.encode(template.empty_thought, add_special_tokens=False))
        if keep_prompt <= header:
            return None
        prompt_ids = prompt_ids[:keep_prompt - header] + prompt_ids[-header:]
    return {"prompt_ids": prompt_ids, "label_ids": label_ids[:keep_label], "prompt_cut": cut}


def num_targets(labels):
    """Tokens the loss is taken on: labels after the first position (position t predicts token t + 1)."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

def is_ranking(name, dataset_dir):
    """Whether dataset `name` holds preference pairs (dataset_info.json's "ranking", else chosen/rejected columns)."""
    spec = resolve_dataset(name, dataset_dir)
    if spec.columns is None:
        spec = infer_format(spec, read_rows(spec)[0])
    return spec.ranking


def load_conversations(name, dataset_dir, ranking, max_samples=None, strict=False, rng=None, refuse_empty=False,
                       answers_optional=False):
    """Read, sample ("num_samples", with numpy RandomState `rng`), cut to max_samples and convert a dataset.

    Returns (spec, conversations, notes); see to_conversations (refuse_empty, answers_optional).
    """
    spec = resolve_dataset(name, dataset_dir)
    rows, origins = read_rows(spec)
    if spec.columns is None:
        spec = infer_format(spec, rows)
    if spec.num_samples is not None:
        positions = sample_rows(len(rows), spec.num_samples, rng)
        rows, origins = [rows[p] for p in positions], [origins[p] for p in positions]
    if max_samples:
        rows, origins = rows[:max_samples], origins[:max_samples]
    return (spec, *to_conversations(spec, rows, origins, ranking, strict, refuse_empty, answers_optional))


def tokenize_dataset(conversations, tokenizer, template, cutoff_len, ranking, num_workers=1, desc="tokenizing",
                     batch_size=1000):
    """Tokenise conversations (in `num_workers` processes when there are many, `batch_size` rows at a time, as
    LLaMA-Factory's --preprocessing_batch_size; the examples do not depend on either).

    SFT examples hold input_ids, labels, num_targets; pair examples hold chosen_/rejected_ input_ids and labels,
    num_targets (of the chosen response) and num_targets_rejected. Returns (examples, how many have a response cut
    away entirely by cutoff_len: they are kept with every label masked, as in LLaMA-Factory).
    """
    import datasets  # imported lazily: tokenisation in several processes uses datasets.map

    def encode(conversation):
        if ranking:
            example = tokenize_pair(conversation, tokenizer, template, cutoff_len)
            example["num_targets_rejected"] = num_targets(example["rejected_labels"])
        else:
            example = tokenize_sft(conversation, tokenizer, template, cutoff_len)
        example["num_targets"] = num_targets(example["chosen_labels" if ranking else "labels"])
        return example

    def encode_batch(columns):
        encoded = [encode(dict(zip(columns, row))) for row in zip(*columns.values())]
        return {key: [example[key] for example in encoded] for key in encoded[0]}

    # Worker processes only pay off for large sets: at least ~1000 rows each.
    workers = max(1, min(num_workers or 1, len(conversations) // 1000))
    if workers > 1:
        table = datasets.Dataset.from_list(conversations)
        examples = table.map(encode_batch, batched=True, batch_size=batch_size, num_proc=workers,
                             remove_columns=table.column_names, desc=desc).to_list()
    else:
        examples = [encode(c) for c in conversations]
    labels = ("chosen_labels", "rejected_labels") if ranking else ("labels",)
    cut_away = sum(1 for e in examples if any(all(x == IGNORE_INDEX for x in e[key]) for key in labels))
    return examples, cut_away


def _rows_text(origins, single_file, shown=5):
    names = [str(n) if single_file else f"{Path(f).name}:{n}" for f, n in origins[:shown]]
    return ("row " if len(origins) == 1 else "rows ") + ", ".join(names) + (", ..." if len(origins) > shown else "")


def fingerprint(examples):
    """SHA-256 of a dataset's tokenized examples in order: the token ids and labels of every sequence (SFT:
    input_ids, labels; pairs: those of the chosen and the rejected response). Equal fingerprints mean the same
    samples at the same positions, whatever the file looks like."""
    digest = hashlib.sha256()
    for example in examples:
        for key in sorted(k for k in example if k.endswith(("input_ids", "labels"))):
            values = array.array("q", example[key])
            digest.update(len(values).to_bytes(8, "little") + values.tobytes())
    return digest.hexdigest()


def check_trainable(name, spec, examples, ranking, cutoff_len):
    """Refuse a dataset in which no example has a token to learn (the loss would be 0/0)."""
    if any(e["num_targets"] + e.get("num_targets_rejected", 0) for e in examples):
        return
    ids = "chosen_input_ids" if ranking else "input_ids"
    why = (f"--cutoff_len {cutoff_len} cuts every response away (the prompts fill it); raise --cutoff_len"
           if all(len(e[ids]) >= cutoff_len for e in examples) else "every response is empty")
    raise DataError(f"dataset '{name}' ({spec.source}) has no trainable token: {why}")


def load_tokenized(names, args, tokenizer, ranking, log=print, fingerprints=None, cache=None):
    """Load, check, tokenise and concatenate the datasets in `names` (a comma-separated string or a list).

    Uses args.dataset_dir, max_samples, cutoff_len, preprocessing_num_workers, preprocessing_batch_size, template,
    strict_data and seed (the seed of "num_samples": one numpy RandomState for the datasets in `names`, in order, as
    LLaMA-Factory's global numpy state after set_seed). Logs one line per dataset: samples, dropped and adjusted
    rows, cut-away responses. Refuses a dataset with no sample left or no token to learn. `fingerprints`, a dict,
    gets each dataset's `fingerprint` under its name (what a resumed run must find unchanged). With a
    `TokenizedCache`, each dataset is read from it when it holds it, else tokenised and added to it.
    """
    import numpy as np

    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    template = get_template(tokenizer, args.template, args.enable_thinking)
    rng = np.random.RandomState(args.seed)
    examples = []
    for position, name in enumerate(names):
        key = f"{'pairs' if ranking else 'sft'}:{','.join(names)}:{position}"  # num_samples draws follow the order
        cached = cache.read(key) if cache is not None else None
        if cached is not None:
            kept, line, digest = cached
            log(f"{line} [read from --tokenized_path {cache.path}]")
        else:
            kept, line = _tokenize_one(name, args, tokenizer, template, ranking, rng)
            digest = fingerprint(kept)
            log(line)
            if cache is not None:
                cache.add(key, kept, line, digest)
        if fingerprints is not None:
            fingerprints[name] = digest
        examples += kept
    return examples


def _tokenize_one(name, args, tokenizer, template, ranking, rng):
    """One dataset of load_tokenized: its checked examples and its log line."""
    spec, conversations, notes = load_conversations(name, args.dataset_dir, ranking, args.max_samples,
                                                    args.strict_data, rng, refuse_empty=True)
    kept, cut_away = tokenize_dataset(conversations, tokenizer, template, args.cutoff_len, ranking,
                                      args.preprocessing_num_workers, desc=f"tokenizing {name}",
                                      batch_size=args.preprocessing_batch_size)
    single_file = len({f for origins in notes.values() for f, _ in origins}) <= 1
    parts = [f"{len(origins)} {reason} ({_rows_text(origins, single_file)})" for reason, origins in notes.items()]
    if cut_away:
        parts.append(f"{cut_away} with a response cut away entirely by --cutoff_len {args.cutoff_len} (kept, "
                     "every label masked)")
    note = "; " + "; ".join(parts) + (" (as LLaMA-Factory; --strict_data True stops at the first bad row)"
                                      if notes else "") if parts else ""
    check_trainable(name, spec, kept, ranking, args.cutoff_len)
    return kept, f"dataset {name} ({spec.source}): {len(kept)} samples{note}"


# ---------------------------------------------------------------------------------------------------------------
# Tokenized datasets kept on disk (LLaMA-Factory's --tokenized_path / --overwrite_cache)
# ---------------------------------------------------------------------------------------------------------------

CACHE_FORMAT = 1
CACHE_INDEX = "tokenized_cache.json"


def _file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_digest(tokenizer):
    """SHA-256 of what tokenisation depends on in a tokenizer: its vocabulary, merges, normalisation and added
    tokens (the fast tokenizer's JSON), its special tokens and its chat template."""
    vocabulary = (tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False)
                  else json.dumps(sorted(tokenizer.get_vocab().items())))
    rest = json.dumps([tokenizer.special_tokens_map, getattr(tokenizer, "chat_template", None)], sort_keys=True,
                      default=str)
    return hashlib.sha256((vocabulary + rest).encode()).hexdigest()


def cache_description(args, tokenizer):
    """What a run's tokenized datasets are built from: the data flags (the seed only where a dataset draws rows
    with "num_samples"), the training and reference datasets, each data file's SHA-256 (hub datasets: their id),
    dataset_info.json's, and the tokenizer's (`tokenizer_digest`)."""
    training = [n.strip() for n in args.dataset.split(",")]
    reference = [n.strip() for n in args.base_dataset.split(",")] if args.base_method != "none" else []
    files, sampled = {}, False
    info = Path(args.dataset_dir) / "dataset_info.json"
    if info.is_file():
        files[str(info)] = _file_digest(info)
    for name in training + reference:
        spec = resolve_dataset(name, args.dataset_dir)
        sampled = sampled or spec.num_samples is not None
        if spec.from_hub:
            files[spec.source] = f"hub dataset (subset {spec.subset}, split {spec.split}, folder {spec.folder})"
        else:
            files.update({path: _file_digest(path) for path in _data_files(spec)[0]})
    return {"stage": args.stage.removesuffix("_pg"), "dataset": ",".join(training),
            "base_dataset": ",".join(reference) or None, "dataset_dir": str(args.dataset_dir),
            "template": args.template, "enable_thinking": args.enable_thinking, "cutoff_len": args.cutoff_len,
            "max_samples": args.max_samples,
            "seed": args.seed if sampled else None, "strict_data": args.strict_data,
            "tokenizer": tokenizer_digest(tokenizer), "data files": files}


class TokenizedCache:
    """Tokenized datasets in a folder: TOKENIZED_CACHE.json (what they were built from, and per dataset its log line,
    sample count and fingerprint) and one Arrow folder per dataset (datasets' save_to_disk: no pickle).

    `open` reads a cache that matches `description`, refuses one built from anything else (naming what differs),
    or, on the main process, starts a new one (--overwrite_cache True always does): its datasets are written to
    a temporary folder and moved into place whole by `commit`, so a run stopped while tokenizing leaves the old
    cache (or none), never half of one.
    """

    def __init__(self, path, description, entries, building):
        self.path, self.description, self.entries, self.building = Path(path), description, entries, building
        self.staging = self.path.with_name(f".{self.path.name}.building-{os.getpid()}") if building else None

    @classmethod
    def open(cls, path, description, rebuild, may_build):
        """The cache at `path` for a run described by `description` (`cache_description`). `rebuild`: start anew
        even if one matches; `may_build`: this process may write one (the main process)."""
        path = Path(path)
        index = path / CACHE_INDEX
        if path.exists() and not index.is_file() and any(path.iterdir()):
            written_by = (", it looks like LLaMA-Factory's, which does not record what it was built from" if
                          (path / "dataset_dict.json").is_file() else "")
            raise DataError(f"--tokenized_path {path} is a folder that holds no tokenized datasets of these scripts "
                            f"({CACHE_INDEX} is missing{written_by}): name a new or empty folder")
        if index.is_file() and not (rebuild and may_build):
            try:
                saved = json.loads(index.read_text())
                built_from, entries = saved["built_from"], saved["datasets"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"--tokenized_path {path} is damaged ({CACHE_INDEX}: {err}); pass --overwrite_cache "
                                "True to tokenize again and replace it") from None
            differences = [f"{key} {built_from.get(key)!r} (now {value!r})" for key, value in description.items()
                           if key != "data files" and built_from.get(key) != value]
            old_files = built_from.get("data files", {})
            differences += [f"data file {name} with SHA-256 {old_files.get(name, 'none')[:12]} (now {digest[:12]})"
                            for name, digest in description["data files"].items() if old_files.get(name) != digest]
            if differences:
                raise DataError(f"--tokenized_path {path} was built from {'; '.join(differences)}; pass "
                                "--overwrite_cache True to tokenize again and replace it, or name another folder")
            return cls(path, description, entries, building=False)
        if not may_build:
            raise DataError(f"--tokenized_path {path}: the main process wrote no tokenized datasets there that this "
                            "process can read; every process must see the same folder")
        return cls(path, description, {}, building=True)

    def read(self, key):
        """(examples, log line, fingerprint) of dataset `key`, or None when this cache is being built."""
        if self.building:
            return None
        entry = self.entries.get(key)
        if entry is None:
            raise DataError(f"--tokenized_path {self.path} is damaged (it holds no {key}); pass --overwrite_cache "
                            "True to tokenize again and replace it")
        import datasets
        import pyarrow

        try:
            examples = datasets.load_from_disk(str(self.path / entry["folder"])).to_list()
        except (OSError, ValueError, pyarrow.ArrowException) as err:
            raise DataError(f"--tokenized_path {self.path} is damaged ({entry['folder']}: {first_line(err)}); pass "
                            "--overwrite_cache True to tokenize again and replace it") from None
        digest = fingerprint(examples)
        if len(examples) != entry["samples"] or digest != entry["fingerprint"]:
            raise DataError(f"--tokenized_path {self.path} is damaged ({entry['folder']} does not hold the examples "
                            "it was written with); pass --overwrite_cache True to tokenize again and replace it")
        return examples, entry["log"], digest

    def add(self, key, examples, line, digest):
        """Write dataset `key`'s examples (whose `fingerprint` is `digest`) into the cache being built."""
        import datasets

        folder = f"{len(self.entries):02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', key)[:80]}"
        bars = datasets.utils.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # the run logs one line per dataset instead
        try:
            datasets.Dataset.from_list(examples).save_to_disk(str(self.staging / folder))
        finally:
            if bars:
                datasets.enable_progress_bars()
        self.entries[key] = {"folder": folder, "samples": len(examples), "fingerprint": digest, "log": line}

    def commit(self):
        """Move a newly built cache into place whole, replacing the old one."""
        from checkpoint import write_json

        self.staging.mkdir(parents=True, exist_ok=True)
        write_json(self.staging / CACHE_INDEX, {"format": CACHE_FORMAT, "built_from": self.description,
                                               "datasets": self.entries})
        old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
        if self.path.exists():
            os.rename(self.path, old)
        os.rename(self.staging, self.path)
        shutil.rmtree(old, ignore_errors=True)
        self.building = False

    def discard(self):
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


@contextmanager
def tokenized_once(accelerator, args, tokenizer, log=print):
    """The block that loads a run's datasets (load_tokenized with the `TokenizedCache` this yields, or None): the
    main process tokenises them, or reads them from --tokenized_path, and the other processes read its result
    instead of tokenising again. Without --tokenized_path and with several processes the result goes through a
    temporary folder in OUTPUT_DIR, removed once every process has read it; one process alone keeps nothing."""
    temporary = args.tokenized_path is None and accelerator.num_processes > 1
    path = Path(args.output_dir, "tokenized-for-other-ranks") if temporary else args.tokenized_path
    with main_process_first(accelerator):  # a data error on the main process stops every process with it
        cache = None
        if temporary and not accelerator.is_main_process and not Path(path, CACHE_INDEX).is_file():
            print(f"warning: rank {accelerator.process_index}: {path} is not visible here (OUTPUT_DIR is not on a "
                  "file system shared with the main process): tokenizing on this process too", file=sys.stderr)
        elif path is not None:
            cache = TokenizedCache.open(path, cache_description(args, tokenizer),
                                        rebuild=temporary or args.overwrite_cache,
                                        may_build=accelerator.is_main_process)
        try:
            yield cache
        except BaseException:
            if cache is not None:
                cache.discard()
            raise
        if cache is not None and cache.building:
            cache.commit()
            if not temporary:
                log(f"tokenized datasets saved to --tokenized_path {path}; later runs read them from there")
    if temporary:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------

def pad_batch(sequences, value):
    width = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def sequences_of(example):
    """The token sequences an example puts into a batch: its input ids, or a pair's chosen and rejected ones."""
    return [example["input_ids"]] if "input_ids" in example else [example["chosen_input_ids"],
                                                                  example["rejected_input_ids"]]


def padded_length(example):
    """Positions each of an example's sequences takes in a padded batch: collate_pairs pads a pair's chosen and
    rejected sequences to one width, so a pair is as long as the longer of the two."""
    return max(len(s) for s in sequences_of(example))


def collate(sequences, labels, pad_token_id, padding_free):
    """A batch of B sequences: padded to the longest, (B, T) with an attention mask; or padding-free, all of them
    in one row (1, N) with position ids restarting at 0 per sequence and no attention mask.

    In the padding-free row transformers keeps the sequences apart from the position ids alone: a block-diagonal
    causal mask for sdpa and eager, FlashAttention-2's variable-length kernel for flash_attention_2 (see
    train_utils.check_padding_free). Each sequence's first label is ignored there (the position before it ends the
    previous sequence); num_targets never counts it either. `sequence_lengths` (B,) lets train_utils.token_logps
    put per-token values back into the padded (B, T) layout.
    """
    if not padding_free:
        return {"input_ids": pad_batch(sequences, pad_token_id),
                "attention_mask": pad_batch([[1] * len(s) for s in sequences], 0),
                "labels": pad_batch(labels, IGNORE_INDEX)}
    return {"input_ids": torch.tensor([[t for s in sequences for t in s]], dtype=torch.long),
            "position_ids": torch.tensor([[p for s in sequences for p in range(len(s))]], dtype=torch.long),
            "labels": torch.tensor([[x for row in labels for x in [IGNORE_INDEX, *row[1:]]]], dtype=torch.long),
            "sequence_lengths": torch.tensor([len(s) for s in sequences], dtype=torch.long)}


def collate_sft(examples, pad_token_id, padding_free=False):
    return collate([e["input_ids"] for e in examples], [e["labels"] for e in examples], pad_token_id, padding_free)


def collate_pairs(examples, pad_token_id, padding_free=False):
    """Chosen sequences first, then rejected ones, in one batch of 2B sequences (one forward pass)."""
    return collate([e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples],
                   [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples], pad_token_id,
                   padding_free)


def least_padding_runs(lengths, count, budget):
    """Sizes of `count` consecutive runs of `lengths` (sorted longest first) that compute the fewest padded
    positions, none more than `budget`: a run of n samples whose first (longest) has length L computes n x L.

    Dynamic programming over runs: after k runs, least[j] is the fewest positions that cover the first j samples,
    least[j] = min over i of least[i] + cost(i, j); each of the `count` rounds is one (n + 1, n) tensor operation.
    Integer arithmetic, and ties go to the first start (torch.min's documented choice), so every rank computes the
    same runs."""
    n = len(lengths)
    never = torch.iinfo(torch.int64).max // 4  # infeasible; two of them still add up without overflow
    ends, starts = torch.arange(n + 1).unsqueeze(1), torch.arange(n).unsqueeze(0)
    cost = (ends - starts) * torch.tensor(lengths, dtype=torch.int64)  # [j, i]: the run of samples i..j-1
    cost = cost.masked_fill((ends <= starts) | (cost > budget), never)
    least = torch.full((n + 1,), never, dtype=torch.int64)
    least[0] = 0
    starts_chosen = []
    for _ in range(count):
        least, chosen = (cost + least[:n]).min(1)
        least = least.clamp(max=never)
        starts_chosen.append(chosen)
    sizes, end = [], n
    for chosen in reversed(starts_chosen):
        start = int(chosen[end])
        sizes.append(end - start)
        end = start
    return sizes[::-1]


class StepSampler:
    """Which samples each rank sees in each optimizer step; deterministic, so resuming needs only the step.

    Each epoch is a seeded permutation (seed + epoch). Optimizer step s of an epoch takes the next
    global_batch = per_device_batch x world_size x grad_accum samples (the last step of an epoch is completed
    with samples from the start of the permutation, as DistributedSampler pads). Micro-batch m of rank r takes
    positions [(m x world_size + r) x per_device_batch, ...) of the step, so without `lengths` a run on N
    processes with batch B sees, micro-batch by micro-batch, the same samples as one process with batch N x B.

    With `lengths` (each sample's padded length), the step's samples are sorted by length and cut into runs, one
    per micro-batch (`length_aware`): each micro-batch then holds samples of similar length, so little of it is
    padding, and the ranks get similar token counts. The step keeps its samples, and the loss is normalised over
    the whole step, so the step's loss and gradient are the same sum in another order. The assignment is a
    function of (seed, step, lengths): every rank computes the same one, and resuming needs only the step.
    """

    def __init__(self, num_samples, per_device_batch, world_size, rank, grad_accum, seed, lengths=None,
                 padding_free=False):
        self.num_samples, self.per_device_batch = num_samples, per_device_batch
        self.world_size, self.rank, self.grad_accum = world_size, rank, grad_accum
        self.seed, self.lengths, self.padding_free = seed, lengths, padding_free
        self.global_batch = per_device_batch * world_size * grad_accum
        self.steps_per_epoch = math.ceil(num_samples / self.global_batch)
        self._order = (None, None)  # (epoch, permutation): made once per epoch, not once per call

    def order(self, epoch):
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(self.num_samples, generator=generator))
        return self._order[1]

    def step_indices(self, step):
        """All samples of global optimizer step `step` (counted from 0 over epochs)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        positions = torch.arange(within * self.global_batch, (within + 1) * self.global_batch) % self.num_samples
        return order[positions].tolist()

    def length_aware(self, indices):
        """The step's samples as [micro-batch m][rank r] -> indices, in runs of similar length.

        Sorted longest first (ties keep the step's order) and cut into world_size x grad_accum consecutive runs.
        Padded micro-batches take the runs with the fewest padded positions (`least_padding_runs`): their sizes
        vary, short samples going many to a micro-batch, but none computes more positions than the step's longest
        sample times per_device_batch, the largest micro-batch of equal sizes, so memory stays what it was.
        Padding-free micro-batches have no padding to save and keep per_device_batch samples each. The runs, the
        costliest first, go to the rounds world_size at a time (round m: micro-batch m of every rank), so ranks
        that wait for each other after every micro-batch run similar work side by side; within a round they go
        to the ranks in snake order (rank 0 gets the costliest run of rounds 0, 2, ... and the cheapest of rounds
        1, 3, ...), which evens out each rank's total. Every rank starts with its costliest micro-batch, so a
        step that does not fit in memory fails at once.
        """
        b, w = self.per_device_batch, self.world_size
        ordered = sorted(indices, key=lambda i: -self.lengths[i])
        lengths = [self.lengths[i] for i in ordered]
        sizes = ([b] * (w * self.grad_accum) if self.padding_free
                 else least_padding_runs(lengths, w * self.grad_accum, budget=b * lengths[0]))
        starts = itertools.accumulate(sizes[:-1], initial=0)
        runs = sorted(zip(starts, sizes), key=lambda run: -run[1] * lengths[run[0]])  # stable: ties keep order
        assignment = []
        for m in range(self.grad_accum):
            round_runs = [ordered[start:start + size] for start, size in runs[m * w:(m + 1) * w]]
            assignment.append(round_runs if m % 2 == 0 else round_runs[::-1])
        return assignment

    def assignment(self, step):
        """Every rank's micro-batches of step `step`: [micro-batch m][rank r] -> sample indices."""
        indices = self.step_indices(step)
        if self.lengths is not None:
            return self.length_aware(indices)
        b, w = self.per_device_batch, self.world_size
        return [[indices[(m * w + r) * b:(m * w + r + 1) * b] for r in range(w)] for m in range(self.grad_accum)]

    def micro_batches(self, step):
        """This rank's micro-batches (lists of sample indices) for optimizer step `step`."""
        return [ranks[self.rank] for ranks in self.assignment(step)]


def padding_fraction(sampler, examples, steps):
    """The share of the positions that padded micro-batches compute (every rank's, over `steps`) that is padding."""
    computed = real = 0
    for step in steps:
        for ranks in sampler.assignment(step):
            for indices in ranks:
                lengths = [len(s) for i in indices for s in sequences_of(examples[i])]
                computed += len(lengths) * max(lengths)
                real += sum(lengths)
    return 1 - real / computed


def describe_batching(sampler, examples, padding_free):
    """One log line: how micro-batches are formed and what share of the computed positions is padding over the
    first epoch, against the positional assignment with padding."""
    steps = range(sampler.steps_per_epoch)
    positional = StepSampler(sampler.num_samples, sampler.per_device_batch, sampler.world_size, sampler.rank,
                             sampler.grad_accum, sampler.seed)
    before = f"{padding_fraction(positional, examples, steps):.0%}"
    aware = sampler.lengths is not None
    if padding_free:
        return (f"padding-free micro-batches{', length-aware' if aware else ''}: no padding (padded micro-batches "
                f"in sampled order: {before} of the positions in the first epoch)")
    if aware:
        return (f"length-aware micro-batches: padding {before} -> {padding_fraction(sampler, examples, steps):.0%} "
                "of the positions in the first epoch")
    return f"micro-batches in sampled order: padding {before} of the positions in the first epoch"


class _StepMicroBatches(torch.utils.data.Dataset):
    """Item k: this rank's micro-batches of optimizer step first_step + k, as [(sample indices, collated batch)]."""

    def __init__(self, sampler, examples, collate_fn, first_step, total_steps):
        self.sampler, self.examples, self.collate_fn = sampler, examples, collate_fn
        self.first_step, self.total_steps = first_step, total_steps

    def __len__(self):
        return self.total_steps - self.first_step

    def __getitem__(self, k):
        return [(indices, self.collate_fn([self.examples[i] for i in indices]))
                for indices in self.sampler.micro_batches(self.first_step + k)]


def _ignore_stop_signals(worker_id):
    """A data worker leaves Ctrl-C and SIGTERM to the main process, which stops after the step (run_guard); the
    worker ends with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def step_micro_batches(sampler, examples, collate_fn, first_step, total_steps, num_workers=0):
    """Yield, for each optimizer step from first_step to total_steps, this rank's micro-batches as a list of
    (sample indices, batch from `collate_fn`): those of `sampler.micro_batches(step)`, so the same with any
    number of workers. num_workers 0 builds them in this process when the step needs them; N > 0 builds them
    ahead of the step in N worker processes (a DataLoader, steps in order), which hold only the examples.
    `collate_fn` must be picklable (e.g. a functools.partial, not a lambda) when workers start by spawning."""
    steps = _StepMicroBatches(sampler, examples, collate_fn, first_step, total_steps)
    if num_workers == 0:
        yield from (steps[k] for k in range(len(steps)))
        return
    yield from torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=num_workers,
                                           worker_init_fn=_ignore_stop_signals)
