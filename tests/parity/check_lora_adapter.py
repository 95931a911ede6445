"""Check that LLaMA-Factory 0.9.5 loads an adapter these scripts wrote (--finetuning_type lora), as its
--adapter_name_or_path does, and that the model it builds gives the logits peft's PeftModel gives.

LLaMA-Factory is not a dependency of this project: run this in the separate environment of make_golden.py (see
there), from the repository root, on any LoRA run's OUTPUT_DIR and its base model:

    /tmp/lf-venv/bin/python tests/parity/check_lora_adapter.py --model_name_or_path models/tiny-qwen2 \
        --adapter_name_or_path outputs/demo-sft-lora

Prints the difference of the logits relative to the adapter's own effect on them; exits 1 above 1e-4 (float32:
LLaMA-Factory merges the adapter into the weights for inference, which rounds at ~1e-6 of that effect).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import import_llamafactory  # noqa: E402  (the torchaudio and torchvision stand-ins first)

TOLERANCE = 1e-4


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--adapter_name_or_path", required=True)
    parser.add_argument("--template", default="qwen")
    args = parser.parse_args()
    import_llamafactory()
    from llamafactory.hparams import get_infer_args
    from llamafactory.model import load_model, load_tokenizer
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_args, _, finetuning_args, _ = get_infer_args(dict(
        model_name_or_path=args.model_name_or_path, adapter_name_or_path=args.adapter_name_or_path,
        template=args.template, finetuning_type="lora", infer_dtype="float32"))
    tokenizer = load_tokenizer(model_args)["tokenizer"]
    llama_factory = load_model(tokenizer, model_args, finetuning_args, is_trainable=False)
    base = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32).eval()
    batch = tokenizer(["Explain <general task 3> step by step.", "How do I <harmful request 17>?"],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        base_logits = base(**batch).logits.double()
        peft_logits = PeftModel.from_pretrained(base, args.adapter_name_or_path).eval()(**batch).logits.double()
        llama_factory_logits = llama_factory(**batch).logits.double()
    difference = ((llama_factory_logits - peft_logits).norm() / (peft_logits - base_logits).norm()).item()
    print(f"LLaMA-Factory ({type(llama_factory).__name__}) vs PeftModel: logits differ by {difference:.2e} of the "
          f"adapter's effect (tolerance {TOLERANCE:g})")
    sys.exit(0 if difference <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
