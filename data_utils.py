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
import enum
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE_INDEX = -100


class DataError(ValueError):
    """Bad dataset input; the message names the file (or dataset), the row and the field."""


# ---------------------------------------------------------------------------------------------------------------
# dataset_info.json (LLaMA-Factory's parser.py and loader.py)
# ---------------------------------------------------------------------------------------------------------------

ENTRY_KEYS = {"file_name", "hf_hub_url", "formatting", "ranking", "columns", "tags", "subset", "split", "folder",
              "num_samples"}
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
    if "hf_hub_url" in entry:
        source, from_hub = entry["hf_hub_url"], True
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
            info = json.loads(info_path.read_text(encoding="utf-8-sig"))  # -sig: a byte-order mark is skipped
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


def _read_json_file(path):
    text = Path(path).read_text(encoding="utf-8-sig")  # a byte-order mark is skipped, as `datasets` does
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
# Templates (LLaMA-Factory's template.py, for the text templates shipped here)
# ---------------------------------------------------------------------------------------------------------------

class Special(enum.Enum):
    """A slot written as the tokenizer's own special token id (nothing, if the tokenizer has no such token)."""

    BOS = "bos_token"
    EOS = "eos_token"


BOS, EOS = Special.BOS, Special.EOS


@dataclass(frozen=True)
class Template:
    """How each message is written: slots (strings with "{{content}}" where the text goes, or BOS / EOS).

    Message 0 is preceded by `prefix` and the system slots (filled with the row's system text, else
    `default_system`); with `system_in_user` (llama2, mistral, gemma) the filled system slot instead opens the first
    user message. `stop_words[0]` becomes the eos token if `replace_eos`; the other stop words are added as special
    tokens. `thought` (qwen3) is an empty reasoning block put before every response that has none (and trained on).
    """

    user: tuple = ("{{content}}",)
    assistant: tuple = ("{{content}}", EOS)
    system: tuple = ("{{content}}",)
    prefix: tuple = ()
    default_system: str = ""
    stop_words: tuple = ()
    replace_eos: bool = False
    system_in_user: bool = False
    thought: str = None


CHATML = {"user": ("<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n",),
          "assistant": ("{{content}}<|im_end|>\n",), "system": ("<|im_start|>system\n{{content}}<|im_end|>\n",)}
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"
TEMPLATES = {
    "default": Template(user=("Human: {{content}}", EOS, "\nAssistant:"), assistant=("{{content}}", EOS, "\n"),
                        system=("System: {{content}}", EOS, "\n")),
    "empty": Template(assistant=("{{content}}",)),
    "chatml": Template(**CHATML, stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True),
    "qwen": Template(**CHATML, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                     stop_words=("<|im_end|>",), replace_eos=True),
    "qwen3": Template(**CHATML, stop_words=("<|im_end|>",), replace_eos=True, thought=EMPTY_THOUGHT),
    "llama2": Template(user=(BOS, "[INST] {{content}} [/INST]"), system=("<<SYS>>\n{{content}}\n<</SYS>>\n\n",),
                       system_in_user=True),
    "llama3": Template(user=("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>"
                             "<|start_header_id|>assistant<|end_header_id|>\n\n",),
                       assistant=("{{content}}<|eot_id|>",),
                       system=("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",),
                       prefix=(BOS,), stop_words=("<|eot_id|>", "<|eom_id|>"), replace_eos=True),
    "mistral": Template(user=("[INST] {{content}}[/INST]",), assistant=(" {{content}}", EOS),
                        system=("{{content}}\n\n",), prefix=(BOS,), system_in_user=True),
    "gemma": Template(user=("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",),
                      assistant=("{{content}}<end_of_turn>\n",), system=("{{content}}\n\n",), prefix=(BOS,),
                      stop_words=("<end_of_turn>",), replace_eos=True, system_in_user=True),
}


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
    thought = EMPTY_THOUGHT if "<think>" in assistant else None
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
                    default_system=default_system, thought=thought)


def get_template(tokenizer, name):
    """--template NAME, else the tokenizer's own chat template."""
    if name:
        if name not in TEMPLATES:
            raise ValueError(f"unknown --template {name!r}; available: {', '.join(TEMPLATES)}")
        return TEMPLATES[name]
    if not isinstance(tokenizer.chat_template, str):
        raise ValueError(f"the tokenizer has no chat template: pass --template ({', '.join(TEMPLATES)}); "
                         "LLaMA-Factory falls back to 'empty' here, so --template empty does what it does")
    return template_from_tokenizer(tokenizer)


def apply_template(tokenizer, name, log=print):
    """Resolve the template and fix the tokenizer's special tokens as LLaMA-Factory does; returns the Template.

    With replace_eos the template's first stop word becomes the eos token (llama3: <|eot_id|>); a tokenizer
    without eos gets <|endoftext|>, one without pad uses eos; the other stop words become special tokens. Tokens the
    vocabulary lacks are added, as in LLaMA-Factory (which then needs --resize_vocab; these scripts do not resize).
    --template NAME is also installed as the tokenizer's chat template (saved with the model, for generation).
    """
    template = get_template(tokenizer, name)
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
    if len(tokenizer) > size:
        log(f"warning: the template added {len(tokenizer) - size} token(s) the tokenizer lacked "
            f"({', '.join(tokenizer.convert_ids_to_tokens(list(range(size, len(tokenizer)))))}): the model has no "
            "embeddings for them")
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
                continue
            parts.append(f" + {content} + ".join(_literal(piece) for piece in slot.split("{{content}}")))
        return " + ".join(parts)

    system = expression(template.system, "system")
    opening = ("{% set content = " + system + " + content %}" if template.system_in_user else "{{ " + system + " }}")
    thought = ("{% if '<think>' not in content and '</think>' not in content %}{% set content = "
               + _literal(template.thought) + " + content %}{% endif %}") if template.thought else ""
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
# Tokenisation and truncation (LLaMA-Factory's processor/supervised.py and pairwise.py)
# ---------------------------------------------------------------------------------------------------------------

def _ids(tokenizer, slots, content):
    """Token ids of slots filled with content; each string slot is tokenised on its own."""
    ids = []
    for slot in slots:
        if isinstance(slot, Special):
            special = getattr(tokenizer, f"{slot.value}_id")
            ids += [] if special is None else [special]
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


def _with_thought(template, tokenizer, response, ids):
    """qwen3: a response without a reasoning block is trained with an empty one before it."""
    if template.thought and "<think>" not in response and "</think>" not in response:
        return tokenizer.encode(template.thought, add_special_tokens=False) + ids
    return ids


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
    cut away entirely: its labels are then all IGNORE_INDEX (the row is kept, as in LLaMA-Factory).
    """
    messages = [text for turn in conversation["turns"] for text in turn]
    encoded = encode_messages(template, tokenizer, conversation["system"], messages)
    input_ids, labels = [], []
    for i in range(0, len(encoded), 2):
        if len(input_ids) >= cutoff_len:
            break
        source, target = encoded[i], _with_thought(template, tokenizer, messages[i + 1], encoded[i + 1])
        keep_source, keep_target = budget(len(source), len(target), cutoff_len - len(input_ids))
        input_ids += source[:keep_source] + target[:keep_target]
        labels += [IGNORE_INDEX] * keep_source + target[:keep_target]
    return {"input_ids": input_ids, "labels": labels}


def _remove_thought(text):
    return re.sub(r"<think>\n(.*?)\n</think>\n\n", "", text, flags=re.DOTALL).lstrip("\n")


def _prompt_ids(template, tokenizer, system, turns, prompt):
    """Token ids of the system text, the earlier turns and the last user message, as one prompt."""
    history = [text for turn in turns for text in turn]
    if template.thought:  # earlier reasoning is not shown to the model (LLaMA-Factory's ReasoningTemplate)
        history = [_remove_thought(text) if i % 2 else text for i, text in enumerate(history)]
    return [t for ids in encode_messages(template, tokenizer, system, history + [prompt]) for t in ids]


def _response_ids(template, tokenizer, response):
    return _with_thought(template, tokenizer, response, _ids(tokenizer, template.assistant, response))


def tokenize_pair(conversation, tokenizer, template, cutoff_len):
    """Shared prompt + chosen / rejected responses, truncated alike (one budget for prompt + longer response).

    The prompt (system, earlier turns, last user message) keeps its start, the responses theirs.
    """
    prompt_ids = _prompt_ids(template, tokenizer, conversation["system"], conversation["turns"], conversation["prompt"])
    responses = {role: _response_ids(template, tokenizer, conversation[role]) for role in ("chosen", "rejected")}
    keep_prompt, keep_response = budget(len(prompt_ids), max(map(len, responses.values())), cutoff_len)
    out = {}
    for role, ids in responses.items():
        out[f"{role}_input_ids"] = prompt_ids[:keep_prompt] + ids[:keep_response]
        out[f"{role}_labels"] = [IGNORE_INDEX] * keep_prompt + ids[:keep_response]
    return out


def generation_header_ids(template, tokenizer):
    """Token ids that close a user message and open the assistant's answer (what the user slot writes after the
    text: "<|im_end|>\\n<|im_start|>assistant\\n" in ChatML)."""
    user = template.user
    slot = next(i for i, s in enumerate(user) if isinstance(s, str) and "{{content}}" in s)
    return _ids(tokenizer, (user[slot].split("{{content}}", 1)[1], *user[slot + 1:]), "")


def tokenize_prompt(conversation, tokenizer, template, cutoff_len):
    """The prompt to generate from and the reference response, as LLaMA-Factory's unsupervised processor builds them
    for --predict_with_generate: the system text, every earlier turn and the last user message form the prompt; the
    last response (SFT rows) or the chosen one (pairs; LLaMA-Factory leaves it empty) is the label (none for a row
    without a response: label_ids empty). One budget (LLaMA-Factory's infer_seqlen) cuts both, the label keeping its
    start. A cut prompt keeps its start and its generation header (generation_header_ids): LLaMA-Factory keeps the
    start only (input_ids[:source_len]), so the model would continue the user's text instead of answering it.

    Returns {"prompt_ids", "label_ids", "prompt_cut"}; None when the budget cannot hold the header and one token
    before it (the caller refuses the row).
    """
    if "prompt" in conversation:  # a preference pair
        turns, prompt, response = conversation["turns"], conversation["prompt"], conversation["chosen"]
    else:
        turns, (prompt, response) = conversation["turns"][:-1], conversation["turns"][-1]
    prompt_ids = _prompt_ids(template, tokenizer, conversation["system"], turns, prompt)
    label_ids = [] if response is None else _response_ids(template, tokenizer, response)
    keep_prompt, keep_label = budget(len(prompt_ids), len(label_ids), cutoff_len)
    cut = keep_prompt < len(prompt_ids)
    if cut:
        header = len(generation_header_ids(template, tokenizer))
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


def tokenize_dataset(conversations, tokenizer, template, cutoff_len, ranking, num_workers=1, desc="tokenizing"):
    """Tokenise conversations (in `num_workers` processes when there are many).

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

    # Worker processes only pay off for large sets: at least ~1000 rows each.
    workers = max(1, min(num_workers or 1, len(conversations) // 1000))
    if workers > 1:
        table = datasets.Dataset.from_list(conversations)
        examples = list(table.map(encode, num_proc=workers, remove_columns=table.column_names, desc=desc))
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


def load_tokenized(names, args, tokenizer, ranking, log=print, fingerprints=None):
    """Load, check, tokenise and concatenate the datasets in `names` (a comma-separated string or a list).

    Uses args.dataset_dir, max_samples, cutoff_len, preprocessing_num_workers, template, strict_data and seed (the
    seed of "num_samples": one numpy RandomState for the datasets in `names`, in order, as LLaMA-Factory's global
    numpy state after set_seed). Logs one line per dataset: samples, dropped and adjusted rows, cut-away responses.
    Refuses a dataset with no sample left or no token to learn. `fingerprints`, a dict, gets each dataset's
    `fingerprint` under its name (what a resumed run must find unchanged).
    """
    import numpy as np

    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    template = get_template(tokenizer, args.template)
    rng = np.random.RandomState(args.seed)
    examples = []
    for name in names:
        spec, conversations, notes = load_conversations(name, args.dataset_dir, ranking, args.max_samples,
                                                        args.strict_data, rng, refuse_empty=True)
        kept, cut_away = tokenize_dataset(conversations, tokenizer, template, args.cutoff_len, ranking,
                                          args.preprocessing_num_workers, desc=f"tokenizing {name}")
        single_file = len({f for origins in notes.values() for f, _ in origins}) <= 1
        parts = [f"{len(origins)} {reason} ({_rows_text(origins, single_file)})" for reason, origins in notes.items()]
        if cut_away:
            parts.append(f"{cut_away} with a response cut away entirely by --cutoff_len {args.cutoff_len} (kept, "
                         "every label masked)")
        note = "; " + "; ".join(parts) + (" (as LLaMA-Factory; --strict_data True stops at the first bad row)"
                                          if notes else "") if parts else ""
        log(f"dataset {name} ({spec.source}): {len(kept)} samples{note}")
        check_trainable(name, spec, kept, ranking, args.cutoff_len)
        if fingerprints is not None:
            fingerprints[name] = fingerprint(kept)
        examples += kept
    return examples


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
