"""Chat templates and tokenisation, as LLaMA-Factory 0.9.5 does them (its template.py and processor/supervised.py,
pairwise.py): each message is written with a template's slots and tokenised on its own, then turns are truncated
to --cutoff_len keeping the start of prompts and responses. tests/test_parity.py checks the ids and labels against
files LLaMA-Factory wrote.
"""

import enum
import re
from dataclasses import dataclass

IGNORE_INDEX = -100


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


def tokenize_pair(conversation, tokenizer, template, cutoff_len):
    """Shared prompt + chosen / rejected responses, truncated alike (one budget for prompt + longer response).

    The prompt (system, earlier turns, last user message) keeps its start, the responses theirs.
    """
    history = [text for turn in conversation["turns"] for text in turn]
    if template.thought:  # earlier reasoning is not shown to the model (LLaMA-Factory's ReasoningTemplate)
        history = [_remove_thought(text) if i % 2 else text for i, text in enumerate(history)]
    encoded = encode_messages(template, tokenizer, conversation["system"], history + [conversation["prompt"]])
    prompt_ids = [t for ids in encoded for t in ids]
    responses = {role: _with_thought(template, tokenizer, conversation[role],
                                     _ids(tokenizer, template.assistant, conversation[role]))
                 for role in ("chosen", "rejected")}
    keep_prompt, keep_response = budget(len(prompt_ids), max(map(len, responses.values())), cutoff_len)
    out = {}
    for role, ids in responses.items():
        out[f"{role}_input_ids"] = prompt_ids[:keep_prompt] + ids[:keep_response]
        out[f"{role}_labels"] = [IGNORE_INDEX] * keep_prompt + ids[:keep_response]
    return out


def num_targets(labels):
    """Tokens the loss is taken on: labels after the first position (position t predicts token t + 1)."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)
