"""Build the tiny Qwen2-architecture demo model and its tokenizer, from scratch (no hub access needed).

    python scripts/make_tiny_model.py --output_dir models/tiny-qwen2

The tokenizer is a byte-level BPE trained on the demo data, with the ChatML special tokens and a chat template,
so `apply_chat_template` works as with a real Qwen2 tokenizer. The weights are random (seeded).
"""

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                  "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus(data_dir):
    """Every string in the demo data files, so BPE merges fit the demo vocabulary."""
    def strings(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)

    yield "system\nYou are a helpful assistant. You are Qwen, created by Alibaba Cloud.\nuser\nassistant\n"
    for path in sorted(Path(data_dir).glob("*.json*")):
        if path.name == "dataset_info.json":
            continue
        text = path.read_text()
        rows = [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)
        yield from strings(rows)


def build_tokenizer(data_dir, vocab_size):
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus(data_dir), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML_TEMPLATE, model_max_length=32768)


def build_model(vocab_size, hidden_size, num_layers, seed):
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=None, eos_token_id=2, pad_token_id=0,
    )
    return Qwen2ForCausalLM(config)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="models/tiny-qwen2", help="where to save model and tokenizer")
    parser.add_argument("--data_dir", default=str(Path(__file__).parents[1] / "data"), help="tokenizer corpus")
    parser.add_argument("--vocab_size", type=int, default=512, help="BPE vocabulary size (special tokens included)")
    parser.add_argument("--hidden_size", type=int, default=64, help="model width")
    parser.add_argument("--num_layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    args = parser.parse_args()

    tokenizer = build_tokenizer(args.data_dir, args.vocab_size)
    model = build_model(len(tokenizer), args.hidden_size, args.num_layers, args.seed)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == model.config.eos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"saved {sum(p.numel() for p in model.parameters()):,}-parameter Qwen2 model to {args.output_dir}")


if __name__ == "__main__":
    main()
