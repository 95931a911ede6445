"""chat_templates.json and tests/parity/template_golden.json, both written by LLaMA-Factory 0.9.5 itself.

chat_templates.json: every template of LLaMA-Factory's registry (TEMPLATES in llamafactory/data/template.py) as plain
data: the user, assistant, system and prefix slots (strings with "{{content}}", {"special": "bos_token"} /
{"special": "eos_token"}, {"token": "<|user|>"}), the default system text, stop words, replace_eos, efficient_eos,
system_in_user (its Llama2Template), thought_words and empty_thought (its ReasoningTemplate, Glm47ReasoningTemplate)
and, for documentation, the multimodal plugin. Tool formatters are left out (tool-use data is refused).

template_golden.json: for every template, the input ids and labels LLaMA-Factory's own processors (supervised,
pairwise, unsupervised: `_encode_data_example`; digests as in golden.json) make of a few conversations: with and
without a system text, several turns, a response that carries a reasoning block, a small cutoff_len; reasoning
templates also with enable_thinking false. Each case is run on the tiny tokenizer of tests/parity/tokenizers (with
and without a bos token); the tokens a template names by {"token": ...} are added to it first (both sides do the
same). Text rows only: every template runs with the text ("base") multimodal plugin, which is what a row without
images, videos or audio gets.

Run it in LLaMA-Factory's virtual environment (see make_golden.py), from the repository root:

    /tmp/lf-venv/bin/python tests/parity/make_template_golden.py
"""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import ROOT, TOKENIZERS, digest, import_llamafactory  # noqa: E402

HERE = Path(__file__).resolve().parent
FINGERPRINT_TEXT = "Hello world 12345, héllo <|im_start|>user\n✓"  # a tokenizer that splits differently fails loudly
BOS_VARIANT = "<s>"  # the bos token added for the "with bos" cases (the tiny tokenizer has none)
CUTOFF_SMALL = 24


def slot_data(slots):
    out = []
    for slot in slots:
        if isinstance(slot, str):
            out.append(slot)
        elif isinstance(slot, set):  # LLaMA-Factory writes nothing for another set (phi_small's {"<|endoftext|>"})
            out += [{"special": special} for special in ("bos_token", "eos_token") if special in slot][:1]
        else:
            out.append({"token": slot["token"]})
    return out


def template_data(name, template, classes):
    """One registry entry as plain data."""
    reasoning = isinstance(template, classes.ReasoningTemplate)
    entry = {"user": slot_data(template.format_user.slots), "assistant": slot_data(template.format_assistant.slots),
             "system": slot_data(template.format_system.slots), "prefix": slot_data(template.format_prefix.slots),
             "default_system": template.default_system, "stop_words": list(template.stop_words),
             "replace_eos": template.replace_eos, "efficient_eos": template.efficient_eos,
             "system_in_user": isinstance(template, classes.Llama2Template)}
    if reasoning:
        entry["thought_words"] = list(template.thought_words)
        entry["empty_thought"] = template.add_thought()
    plugin = type(template.mm_plugin).__name__
    if plugin != "BasePlugin":
        entry["multimodal_plugin"] = plugin
    return entry


def conversations(thought_words):
    """(kind, system, messages...) cases; `thought` is a response that carries its own reasoning block."""
    open_, close = thought_words
    thought = f"{open_}plan it{close}The answer is 7."
    long_turns = ["Name a colour.", "Red.", "Why? Explain slowly in many words.", thought, "And another?",
                  "Blue, like the sky on a clear day."]
    return [
        {"name": "one turn", "system": None, "messages": ["Hi", "Hello there."]},
        {"name": "system, three turns, a reasoning block", "system": "You are terse.", "messages": long_turns},
        {"name": "empty response", "system": None, "messages": ["Say nothing.", ""]},
        {"name": "pair with history", "system": "Judge.", "messages": ["Earlier?", thought, "Which is right?"],
         "chosen": "This one.", "rejected": f"{open_}hmm{close}That one, for many reasons."},
    ]


def role_messages(texts):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(texts)]


def render(lf, name, tokenizer_variant, enable_thinking):
    """Every case of one template through LLaMA-Factory's processors."""
    from llamafactory.data.mm_plugin import get_mm_plugin
    from llamafactory.data.processor import (PairwiseDatasetProcessor, SupervisedDatasetProcessor,
                                             UnsupervisedDatasetProcessor)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "tiny")
    template_entry = lf.templates[name]
    added = sorted({slot["token"] for formatter in (template_entry.format_user, template_entry.format_assistant,
                                                    template_entry.format_system, template_entry.format_prefix)
                    for slot in formatter.slots if isinstance(slot, dict)})
    if added:
        tokenizer.add_tokens(added, special_tokens=True)
    if tokenizer_variant == "bos":
        tokenizer.add_special_tokens({"bos_token": BOS_VARIANT})
    data_args = SimpleNamespace(template=name, train_on_prompt=False, tool_format=None, default_system=None,
                                enable_thinking=enable_thinking, preserve_thinking=False, mask_history=False,
                                cutoff_len=2048)
    template = lf.get_template(tokenizer, data_args)
    template.mm_plugin = get_mm_plugin(name="base")  # text rows: no image, video or audio
    cases = []
    for conversation in conversations(template.thought_words):
        system, messages = conversation["system"], role_messages(conversation["messages"])
        for cutoff_len in (2048, CUTOFF_SMALL):
            data_args.cutoff_len = cutoff_len
            processors = {kind: cls(template=template, tokenizer=tokenizer, processor=None, data_args=data_args)
                          for kind, cls in (("sft", SupervisedDatasetProcessor), ("pair", PairwiseDatasetProcessor),
                                            ("prompt", UnsupervisedDatasetProcessor))}
            if "chosen" in conversation:
                responses = [{"role": "assistant", "content": conversation[role]} for role in ("chosen", "rejected")]
                pair = processors["pair"]._encode_data_example(messages, responses, system, None, [], [], [])
                prompt = processors["prompt"]._encode_data_example(messages, responses[:1], system, None, [], [], [])
                cases.append({"pair": digest(list(pair)), "prompt": digest(list(prompt))})
            else:
                sft = processors["sft"]._encode_data_example(messages[:-1], messages[-1:], system, None, [], [], [])
                prompt = processors["prompt"]._encode_data_example(messages[:-1], messages[-1:], system, None, [], [],
                                                                   [])
                cases.append({"sft": digest(list(sft)), "prompt": digest(list(prompt))})
    return {"template": name, "bos_token": BOS_VARIANT if tokenizer_variant == "bos" else None,
            "added_tokens": added, "enable_thinking": enable_thinking, "thought_words": list(template.thought_words),
            "cases": cases}


def main():
    lf = import_llamafactory()
    from transformers import AutoTokenizer
    from llamafactory.data import template as template_module

    lf.templates = template_module.TEMPLATES
    classes = SimpleNamespace(ReasoningTemplate=template_module.ReasoningTemplate,
                              Llama2Template=template_module.Llama2Template)
    table = {name: template_data(name, template, classes) for name, template in template_module.TEMPLATES.items()}
    import llamafactory

    (ROOT / "chat_templates.json").write_text(json.dumps(
        {"llamafactory": llamafactory.__version__, "templates": table}, indent=1, ensure_ascii=False) + "\n")
    golden = []
    for name in table:
        for variant in ("plain", "bos"):
            golden.append(render(lf, name, variant, True))
        if "thought_words" in table[name]:
            golden.append(render(lf, name, "plain", False))
    thought_words = sorted({tuple(rendering["thought_words"]) for rendering in golden})
    cases = {"|".join(words): [{**conversation, "cutoff_len": cutoff_len} for conversation in conversations(words)
                                for cutoff_len in (2048, CUTOFF_SMALL)] for words in thought_words}
    (HERE / "template_golden.json").write_text(json.dumps(
        {"llamafactory": llamafactory.__version__, "tokenizer": "tiny", "fingerprint_text": FINGERPRINT_TEXT,
         "fingerprint_ids": AutoTokenizer.from_pretrained(TOKENIZERS / "tiny").encode(FINGERPRINT_TEXT),
         "cases_by_thought_words": cases,
         "renderings": golden}, separators=(",", ":"), ensure_ascii=False).replace('},{"template"', '},\n{"template"'))
    print(f"wrote chat_templates.json ({len(table)} templates) and template_golden.json ({len(golden)} renderings)")


if __name__ == "__main__":
    main()
