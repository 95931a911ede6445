"""Datasets, chat templates, tokenisation and collators (LLaMA-Factory compatible).

Datasets are named in `DATASET_DIR/dataset_info.json` exactly as in LLaMA-Factory:

    "my_set": {"file_name": "my_set.json",            # or "hf_hub_url": "org/name" (+ "subset", "split", "folder")
               "formatting": "alpaca",                 # or "sharegpt"
               "ranking": false,                       # true: preference pairs (chosen / rejected)
               "columns": {"prompt": "instruction", "query": "input", "response": "output",
                           "history": "history", "system": "system", "messages": "conversations",
                           "chosen": "chosen", "rejected": "rejected"},
               "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                        "assistant_tag": "gpt", "system_tag": "system"}}

A name that is not in dataset_info.json may be a local .json/.jsonl file or a hub dataset ("org/name"); its
formatting and ranking are then read from its columns.

Every row becomes a conversation {"system", "turns": [(user, assistant), ...]} (SFT) or
{"system", "turns", "prompt", "chosen", "rejected"} (pairs), is rendered with the tokenizer's chat template (or
--template NAME) and tokenised piece by piece so that the loss covers response tokens only.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE_INDEX = -100

TEMPLATES = {
    # ChatML, as Qwen2 / Qwen2.5 and LLaMA-Factory's `qwen` template render it.
    "qwen": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
        "{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ '<|begin_of_text|>' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # LLaMA-Factory's `default`: plain "Human:/Assistant:" turns, responses closed by the EOS token.
    "default": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\nAssistant:' }}"
        "{% else %}{{ message['content'] + eos_token + '\n' }}{% endif %}"
        "{% endfor %}"
    ),
}

DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None},
    "sharegpt": {"messages": "conversations", "system": None},
}
DEFAULT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                "system_tag": "system"}


class DataError(ValueError):
    """Bad dataset input; the message names the file (or dataset), the row and the field."""


# ---------------------------------------------------------------------------------------------------------------
# dataset_info.json
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class DatasetSpec:
    name: str
    source: str  # local file path or hub id
    from_hub: bool = False
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    subset: str = None
    split: str = "train"
    folder: str = None


def resolve_dataset(name, dataset_dir):
    """Find `name` in DATASET_DIR/dataset_info.json, else treat it as a local file or a hub dataset id."""
    info_path = Path(dataset_dir) / "dataset_info.json"
    info = {}
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{info_path}: invalid JSON ({err})") from None
    if name in info:
        entry = info[name]
        unknown = set(entry) - {"file_name", "hf_hub_url", "formatting", "ranking", "columns", "tags", "subset",
                                "split", "folder"}
        if unknown:
            raise DataError(f"{info_path}, dataset '{name}': unsupported keys {sorted(unknown)} "
                            "(supported: file_name, hf_hub_url, formatting, ranking, columns, tags, subset, split, "
                            "folder)")
        if "file_name" in entry:
            source, from_hub = str(Path(dataset_dir) / entry["file_name"]), False
        elif "hf_hub_url" in entry:
            source, from_hub = entry["hf_hub_url"], True
        else:
            raise DataError(f"{info_path}, dataset '{name}': needs 'file_name' or 'hf_hub_url'")
        formatting = entry.get("formatting", "alpaca")
        if formatting not in DEFAULT_COLUMNS:
            raise DataError(f"{info_path}, dataset '{name}', field 'formatting': expected 'alpaca' or 'sharegpt', "
                            f"got {formatting!r}")
        ranking = bool(entry.get("ranking", False))
        columns = {**DEFAULT_COLUMNS[formatting], **entry.get("columns", {})}
        if ranking:
            columns.setdefault("chosen", "chosen")
            columns.setdefault("rejected", "rejected")
        return DatasetSpec(name, source, from_hub, formatting, ranking, columns,
                           {**DEFAULT_TAGS, **entry.get("tags", {})}, entry.get("subset"), entry.get("split", "train"),
                           entry.get("folder"))
    path = Path(name)
    if path.suffix in (".json", ".jsonl") or path.exists():
        if not path.is_file():
            raise DataError(f"dataset '{name}': no such file, and not an entry of {info_path}")
        return DatasetSpec(name, str(path))
    if "/" in name:
        return DatasetSpec(name, name, from_hub=True)
    known = ", ".join(sorted(info)) or "none"
    raise DataError(f"unknown dataset '{name}': not in {info_path} (known: {known}), not a file, not a hub id")


def infer_format(spec, rows):
    """For datasets named by path or hub id: formatting, ranking and columns from the first row's keys."""
    if not rows:
        return spec
    keys = set(rows[0])
    messages = next((k for k in ("conversations", "messages") if k in keys), None)
    spec.formatting = "sharegpt" if messages else "alpaca"
    spec.ranking = {"chosen", "rejected"} <= keys
    spec.columns = dict(DEFAULT_COLUMNS[spec.formatting])
    if messages:
        spec.columns["messages"] = messages
        if isinstance(rows[0][messages], list) and rows[0][messages] and "role" in rows[0][messages][0]:
            spec.tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}
    if spec.ranking:
        spec.columns.update(chosen="chosen", rejected="rejected")
    spec.columns["system"] = "system" if "system" in keys else None
    if not spec.tags:
        spec.tags = dict(DEFAULT_TAGS)
    return spec


def read_rows(spec):
    """All rows of a dataset as dicts. Local files are parsed here so errors can name the row."""
    if spec.from_hub:
        import datasets  # imported lazily: only hub datasets need it

        data = datasets.load_dataset(spec.source, name=spec.subset, split=spec.split, data_dir=spec.folder)
        rows = list(data)
    else:
        path = Path(spec.source)
        if not path.is_file():
            raise DataError(f"dataset '{spec.name}': file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"{path}: the file is empty")
        if path.suffix == ".jsonl":
            rows = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}, line {number}: invalid JSON ({err.msg})") from None
        else:
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg})") from None
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    if not rows:
        raise DataError(f"{spec.source}: the dataset has no rows")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{spec.source}, row {index + 1}: expected a JSON object, got {type(row).__name__}")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Rows -> conversations
# ---------------------------------------------------------------------------------------------------------------

class _Row:
    """Field access for one row, with errors that say where."""

    def __init__(self, spec, index, row):
        self.spec, self.index, self.row = spec, index, row

    def error(self, column, problem):
        return DataError(f"{self.spec.source}, row {self.index + 1}, field '{column}': {problem}")

    def get(self, role, required=True, kind=str, allow_empty=False):
        column = self.spec.columns.get(role)
        if column is None:
            return None
        if column not in self.row or self.row[column] is None:
            if required:
                raise self.error(column, f"missing (the '{role}' column of dataset '{self.spec.name}')")
            return None
        value = self.row[column]
        if not isinstance(value, kind):
            raise self.error(column, f"expected {kind.__name__}, got {type(value).__name__}")
        if kind is str and not allow_empty and not value.strip():
            raise self.error(column, "is empty")
        return value


def _alpaca_conversation(r):
    prompt = r.get("prompt")
    query = r.get("query", required=False, allow_empty=True)
    if query:
        prompt = f"{prompt}\n{query}"
    turns = []
    for number, pair in enumerate(r.get("history", required=False, kind=list) or []):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise r.error(r.spec.columns["history"], f"entry {number} must be a [query, response] pair of strings")
        turns.append(tuple(pair))
    conversation = {"system": r.get("system", required=False, allow_empty=True), "turns": turns}
    if r.spec.ranking:
        conversation.update(prompt=prompt, chosen=r.get("chosen"), rejected=r.get("rejected"))
    else:
        conversation["turns"].append((prompt, r.get("response")))
    return conversation


def _sharegpt_message(r, column, message, number):
    tags = r.spec.tags
    if isinstance(message, str):
        return tags["assistant_tag"], message
    if not isinstance(message, dict):
        raise r.error(column, f"message {number} must be an object, got {type(message).__name__}")
    role, content = message.get(tags["role_tag"]), message.get(tags["content_tag"])
    if not isinstance(content, str) or not content.strip():
        raise r.error(column, f"message {number} needs a non-empty string '{tags['content_tag']}'")
    return role, content


def _sharegpt_conversation(r):
    tags = r.spec.tags
    column = r.spec.columns["messages"]
    messages = r.get("messages", kind=list)
    system = r.get("system", required=False, allow_empty=True)
    parsed = [_sharegpt_message(r, column, m, i) for i, m in enumerate(messages)]
    if parsed and parsed[0][0] == tags["system_tag"]:
        system = parsed.pop(0)[1]
    expected = [tags["user_tag"], tags["assistant_tag"]]
    for number, (role, _) in enumerate(parsed):
        if role != expected[number % 2]:
            raise r.error(column, f"message {number} has role {role!r}, expected {expected[number % 2]!r} "
                                  "(turns must alternate user, assistant)")
    contents = [content for _, content in parsed]
    if r.spec.ranking:
        if len(contents) % 2 != 1:
            raise r.error(column, "a preference row's messages must end with a user turn")
        pairs = {}
        for role in ("chosen", "rejected"):
            value = r.get(role, kind=(dict, str))
            speaker, pairs[role] = _sharegpt_message(r, r.spec.columns[role], value, 0)
            if speaker != tags["assistant_tag"]:
                raise r.error(r.spec.columns[role], f"role {speaker!r}, expected {tags['assistant_tag']!r}")
        turns = list(zip(contents[0:-1:2], contents[1:-1:2]))
        return {"system": system, "turns": turns, "prompt": contents[-1], **pairs}
    if not contents or len(contents) % 2 != 0:
        raise r.error(column, "an SFT row's messages must be user/assistant pairs ending with an assistant turn")
    return {"system": system, "turns": list(zip(contents[0::2], contents[1::2]))}


def to_conversations(spec, rows, ranking):
    """Validate rows and convert them into conversations; `ranking` is what the caller needs."""
    if spec.ranking != ranking:
        want = "preference pairs (\"ranking\": true)" if ranking else "SFT data (no \"ranking\")"
        raise DataError(f"dataset '{spec.name}' ({spec.source}) is not {want}")
    convert = _alpaca_conversation if spec.formatting == "alpaca" else _sharegpt_conversation
    return [convert(_Row(spec, index, row)) for index, row in enumerate(rows)]


# ---------------------------------------------------------------------------------------------------------------
# Chat template rendering and tokenisation
# ---------------------------------------------------------------------------------------------------------------

def apply_template(tokenizer, template):
    """Install --template NAME as the tokenizer's chat template (it is saved with the model)."""
    if template:
        if template not in TEMPLATES:
            raise ValueError(f"unknown --template {template!r}; available: {', '.join(TEMPLATES)}")
        tokenizer.chat_template = TEMPLATES[template]
    elif not tokenizer.chat_template:
        raise ValueError("the tokenizer has no chat template: pass --template "
                         f"({', '.join(TEMPLATES)})")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def _messages(system, turns, last_user=None):
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    if last_user is not None:
        messages.append({"role": "user", "content": last_user})
    return messages


def _render(tokenizer, messages, generation_prompt):
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_pieces(tokenizer, system, turns, last_user=None):
    """Split a rendered conversation into text pieces: [(source_0, target_0), ...] (+ the final prompt).

    source_i is everything between the previous response and response i (system, user turn, assistant header);
    target_i is response i with its end-of-turn marker. Found by rendering prefixes of the conversation, so it
    works with any chat template that renders a prefix of a conversation as a prefix of the text.
    """
    pieces, done = [], ""
    for i in range(len(turns)):
        prompt = _render(tokenizer, _messages(system, turns[:i], turns[i][0]), True)
        full = _render(tokenizer, _messages(system, turns[:i + 1]), False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template does not render conversation prefixes as text prefixes; "
                             "pass --template to use a built-in one")
        pieces.append((prompt[len(done):], full[len(prompt):]))
        done = full
    if last_user is not None:
        prompt = _render(tokenizer, _messages(system, turns, last_user), True)
        if not prompt.startswith(done):
            raise ValueError("the chat template does not render conversation prefixes as text prefixes")
        pieces.append((prompt[len(done):], None))
    return pieces


def budget(source_len, target_len, cutoff_len):
    """Lengths (source, target) that fit in cutoff_len (LLaMA-Factory's rule).

    The response is kept whole if it takes less than half the budget; else the prompt is kept whole if it
    does; else both are cut in proportion to their lengths.
    """
    if 2 * target_len < cutoff_len:
        target_cap = cutoff_len
    elif 2 * source_len < cutoff_len:
        target_cap = cutoff_len - source_len
    else:
        target_cap = int(cutoff_len * target_len / (source_len + target_len))
    target = min(target_cap, target_len)
    return min(max(cutoff_len - target, 0), source_len), target


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_sft(conversation, tokenizer, cutoff_len):
    """input_ids / labels for every response of a conversation; prompts keep their end, responses their start."""
    input_ids, labels = [], []
    for source, target in render_pieces(tokenizer, conversation["system"], conversation["turns"]):
        remaining = cutoff_len - len(input_ids)
        if remaining <= 0:
            break
        source_ids, target_ids = _ids(tokenizer, source), _ids(tokenizer, target)
        keep_source, keep_target = budget(len(source_ids), len(target_ids), remaining)
        source_ids = source_ids[len(source_ids) - keep_source:]
        target_ids = target_ids[:keep_target]
        input_ids += source_ids + target_ids
        labels += [IGNORE_INDEX] * len(source_ids) + target_ids
    return {"input_ids": input_ids, "labels": labels}


def tokenize_pair(conversation, tokenizer, cutoff_len):
    """Shared prompt + chosen / rejected responses, truncated alike (one budget for prompt + longer response)."""
    history = render_pieces(tokenizer, conversation["system"], conversation["turns"], conversation["prompt"])
    prompt_ids = [t for source, target in history for t in _ids(tokenizer, source) + _ids(tokenizer, target or "")]
    responses = {}
    for role in ("chosen", "rejected"):
        full = _render(tokenizer, _messages(conversation["system"],
                                            conversation["turns"] + [(conversation["prompt"], conversation[role])]),
                       False)
        prompt_text = "".join(source + (target or "") for source, target in history)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template does not render conversation prefixes as text prefixes")
        responses[role] = _ids(tokenizer, full[len(prompt_text):])
    keep_prompt, keep_response = budget(len(prompt_ids), max(map(len, responses.values())), cutoff_len)
    prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
    out = {}
    for role, ids in responses.items():
        ids = ids[:keep_response]
        out[f"{role}_input_ids"] = prompt_ids + ids
        out[f"{role}_labels"] = [IGNORE_INDEX] * len(prompt_ids) + ids
    return out


def num_targets(labels):
    """Tokens the loss is taken on: labels after the first position (position t predicts token t + 1)."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------

def is_ranking(name, dataset_dir):
    """Whether dataset `name` holds preference pairs (dataset_info.json's "ranking", else chosen/rejected columns)."""
    spec = resolve_dataset(name, dataset_dir)
    if spec.columns == {}:
        spec = infer_format(spec, read_rows(spec))
    return spec.ranking


def load_conversations(name, dataset_dir, ranking, max_samples=None):
    spec = resolve_dataset(name, dataset_dir)
    rows = read_rows(spec)
    if spec.columns == {}:
        spec = infer_format(spec, rows)
    if max_samples:
        rows = rows[:max_samples]
    return spec, to_conversations(spec, rows, ranking)


def tokenize_dataset(conversations, tokenizer, cutoff_len, ranking, num_workers=1, desc="tokenizing"):
    """Tokenise conversations (in `num_workers` processes when there are many); drop samples with no response.

    Returns (list of examples, number dropped). SFT examples hold input_ids, labels, num_targets; pair examples
    hold chosen_/rejected_ input_ids and labels and num_targets (of the chosen response).
    """
    import datasets  # imported lazily: tokenisation in several processes uses datasets.map

    tokenize = tokenize_pair if ranking else tokenize_sft

    def encode(conversation):
        example = tokenize(conversation, tokenizer, cutoff_len)
        labels = example["chosen_labels" if ranking else "labels"]
        example["num_targets"] = num_targets(labels)
        if ranking:
            example["num_targets_rejected"] = num_targets(example["rejected_labels"])
        return example

    # Worker processes only pay off for large sets: at least ~1000 rows each.
    workers = max(1, min(num_workers or 1, len(conversations) // 1000))
    if workers > 1:
        table = datasets.Dataset.from_list(conversations)
        examples = list(table.map(encode, num_proc=workers, remove_columns=table.column_names, desc=desc))
    else:
        examples = [encode(c) for c in conversations]
    kept = [e for e in examples if e["num_targets"] > 0 and e.get("num_targets_rejected", 1) > 0]
    return kept, len(examples) - len(kept)


def load_tokenized(names, args, tokenizer, ranking, log=print):
    """Load, validate, tokenise and concatenate the datasets in `names` (a comma-separated string or a list)."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    examples = []
    for name in names:
        spec, conversations = load_conversations(name, args.dataset_dir, ranking, args.max_samples)
        kept, dropped = tokenize_dataset(conversations, tokenizer, args.cutoff_len, ranking,
                                         args.preprocessing_num_workers, desc=f"tokenizing {name}")
        note = f", dropped {dropped} whose response was cut away entirely by --cutoff_len {args.cutoff_len}" \
            if dropped else ""
        log(f"dataset {name} ({spec.source}): {len(kept)} samples{note}")
        if not kept:
            raise DataError(f"dataset '{name}' ({spec.source}): no samples left after tokenisation")
        examples += kept
    return examples


# ---------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------

def pad_batch(sequences, value):
    width = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in sequences], dtype=torch.long)


def collate_sft(examples, pad_token_id):
    return {
        "input_ids": pad_batch([e["input_ids"] for e in examples], pad_token_id),
        "attention_mask": pad_batch([[1] * len(e["input_ids"]) for e in examples], 0),
        "labels": pad_batch([e["labels"] for e in examples], IGNORE_INDEX),
    }


def collate_pairs(examples, pad_token_id):
    """Chosen rows first, then rejected rows, in one padded batch of 2B sequences (one forward pass)."""
    sequences = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
    labels = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
    return {
        "input_ids": pad_batch(sequences, pad_token_id),
        "attention_mask": pad_batch([[1] * len(s) for s in sequences], 0),
        "labels": pad_batch(labels, IGNORE_INDEX),
    }


class StepSampler:
    """Which samples each rank sees in each optimizer step; deterministic, so resuming needs only the step.

    Each epoch is a seeded permutation (seed + epoch). Optimizer step s of an epoch takes the next
    global_batch = per_device_batch x world_size x grad_accum samples (the last step of an epoch is completed
    with samples from the start of the permutation, as DistributedSampler pads). Micro-batch m of rank r takes
    positions [(m x world_size + r) x per_device_batch, ...) of the step, so a run on N processes with batch B
    sees, micro-batch by micro-batch, the same samples as one process with batch N x B.
    """

    def __init__(self, num_samples, per_device_batch, world_size, rank, grad_accum, seed):
        self.num_samples, self.per_device_batch = num_samples, per_device_batch
        self.world_size, self.rank, self.grad_accum = world_size, rank, grad_accum
        self.seed = seed
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

    def micro_batches(self, step):
        """This rank's micro-batches (lists of sample indices) for optimizer step `step`."""
        indices = self.step_indices(step)
        b = self.per_device_batch
        return [indices[(m * self.world_size + self.rank) * b:(m * self.world_size + self.rank + 1) * b]
                for m in range(self.grad_accum)]
