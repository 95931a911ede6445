"""First-order check of OGPSA with plain SGD on the demo data (CPU, about 2 minutes).

OGPSA keeps the reference losses unchanged to first order in the step. With SGD the update is the projected
gradient itself, so at a small learning rate the reference sets' NLL (and, if they represent it, held-out general
NLL) should barely move while naive tuning raises it; at a larger rate the protection should shrink.

    python bench/first_order_check.py            # writes bench/results/first_order_check.json and prints a table

Steps: the tiny demo model is trained on the two general demo sets (80 AdamW steps, so it is partly trained),
then tuned on the safety demo set for 20 SGD steps, naive or with OGPSA (both reference sets, 100 samples each,
basis refreshed every step), at learning rates 0.005 and 0.05. Evaluation: mean response-token NLL on the
reference samples themselves (sets A and B) and on the general preference set's chosen answers (held out).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_utils import collate_sft, load_tokenized  # noqa: E402
from train_utils import response_nll_sum  # noqa: E402

RUNS = [("naive", "per_param", 0.005), ("ogpsa", "global", 0.005), ("ogpsa", "per_param", 0.005),
        ("naive", "per_param", 0.05), ("ogpsa", "global", 0.05), ("ogpsa", "per_param", 0.05)]
EVAL_SETS = [("reference set A", "demo_general_a_sft", False, 100),
             ("reference set B", "demo_general_b_sft", False, 100),
             ("held-out general", "demo_general_dpo", True, 300)]


def train(script_args, output):
    command = [sys.executable, str(ROOT / "train_sft_pg.py"), "--model_name_or_path", *script_args[:1],
               *script_args[1:], "--output_dir", str(output), "--overwrite_output_dir", "True",
               "--save_strategy", "no", "--per_device_train_batch_size", "16", "--template", "qwen"]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)


def mean_nll(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    args = SimpleNamespace(dataset_dir=str(ROOT / "data"), max_samples=None, cutoff_len=512,
                           preprocessing_num_workers=1, enable_thinking=True, preprocessing_batch_size=1000,
                           template="qwen",
                           strict_data=False, seed=42)
    result = {}
    for label, name, pairs, rows in EVAL_SETS:
        examples = load_tokenized(name, args, tokenizer, pairs, log=lambda *_: None)[:rows]
        if pairs:  # the chosen answers of general preference pairs: general tasks no reference set contains
            examples = [{"input_ids": e["chosen_input_ids"], "labels": e["chosen_labels"],
                         "num_targets": e["num_targets"]} for e in examples]
        with torch.no_grad():
            total = sum(response_nll_sum(model, collate_sft(examples[i:i + 50], tokenizer.pad_token_id)).item()
                        for i in range(0, len(examples), 50))
        result[label] = total / sum(e["num_targets"] for e in examples)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default=str(ROOT / "bench/results/first_order_check"),
                        help="models and data of the runs (ignored by git)")
    parser.add_argument("--output", default=str(ROOT / "bench/results/first_order_check.json"), help="results")
    args = parser.parse_args()
    work = Path(args.work_dir)
    subprocess.run([sys.executable, str(ROOT / "scripts/make_tiny_model.py"), "--output_dir", str(work / "init")],
                   cwd=ROOT, check=True, capture_output=True)
    train([str(work / "init"), "--dataset", "demo_general_a_sft,demo_general_b_sft", "--stage", "sft",
           "--base_method", "none", "--learning_rate", "3e-3", "--max_steps", "80"], work / "pre")
    rows = [{"run": "before safety SFT", **mean_nll(work / "pre")}]
    for method, scope, lr in RUNS:
        output = work / f"{method}-{scope}-{lr}"
        projection = ["--base_method", "orthogonal_projection", "--base_scope", scope] if method == "ogpsa" else \
            ["--stage", "sft", "--base_method", "none"]
        train([str(work / "pre"), "--dataset", "demo_safety_sft", "--base_dataset",
               "demo_general_a_sft,demo_general_b_sft", "--base_num_samples", "100", "--base_num_steps", "1",
               "--optim", "sgd", "--learning_rate", str(lr), "--max_grad_norm", "0", "--lr_scheduler_type",
               "constant", "--max_steps", "20", *projection], output)
        name = "naive" if method == "naive" else f"OGPSA {scope}"
        rows.append({"run": name, "learning_rate": lr, **mean_nll(output)})
    Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")
    print("| run | lr | " + " | ".join(label for label, *_ in EVAL_SETS) + " |")
    print("|---|---|" + "---|" * len(EVAL_SETS))
    for row in rows:
        print(f"| {row['run']} | {row.get('learning_rate', '')} | "
              + " | ".join(f"{row[label]:.3f}" for label, *_ in EVAL_SETS) + " |")


if __name__ == "__main__":
    main()
