#!/usr/bin/env bash
# The demo, on the CPU: set up .venv, build the tiny Qwen2 model, then safety SFT with OGPSA followed by safety DPO
# with OGPSA starting from the SFT output, then safety SFT of LoRA adapters with OGPSA (adapter plus merged model)
# on padding-free batches, then the evaluation of the SFT, DPO and LoRA models against the tiny base model on held-out
# data (report and plot). Every run deals its micro-batches by length (the default). Extra arguments go to every
# training run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
PY=.venv/bin/python
[ -f models/tiny-qwen2/model.safetensors ] || $PY scripts/make_tiny_model.py --output_dir models/tiny-qwen2
start=$(date +%s)

$PY train_sft_pg.py --model_name_or_path models/tiny-qwen2 --dataset_dir data --dataset demo_safety_sft \
  --base_dataset demo_general_a_sft,demo_general_b_sft --base_num_samples 200 --base_num_steps 10 \
  --base_method orthogonal_projection --per_device_train_batch_size 8 --gradient_accumulation_steps 2 \
  --learning_rate 1e-3 --lr_scheduler_type cosine --num_train_epochs 2 --logging_steps 5 --save_strategy epoch \
  --output_dir outputs/demo-sft --overwrite_output_dir True --plot_loss True --gradient_checkpointing False "$@"

$PY train_dpo_pg.py --model_name_or_path outputs/demo-sft --dataset_dir data --dataset demo_safety_dpo \
  --base_dataset demo_general_dpo --base_num_samples 200 --base_num_steps 5 --base_method orthogonal_projection \
  --pref_beta 0.2 --pref_loss sigmoid --per_device_train_batch_size 8 --gradient_accumulation_steps 2 \
  --learning_rate 5e-4 --lr_scheduler_type cosine --num_train_epochs 1 --logging_steps 2 --save_strategy epoch \
  --eval_dataset demo_general_dpo --eval_general_dataset demo_general_a_sft --eval_strategy epoch \
  --output_dir outputs/demo-dpo --overwrite_output_dir True --plot_loss True --gradient_checkpointing False "$@"

$PY train_sft_pg.py --model_name_or_path models/tiny-qwen2 --dataset_dir data --dataset demo_safety_sft \
  --base_dataset demo_general_a_sft,demo_general_b_sft --base_num_samples 200 --base_num_steps 10 \
  --base_method orthogonal_projection --finetuning_type lora --lora_rank 8 --lora_target all --export_merged True \
  --padding_free True \
  --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --learning_rate 5e-3 --lr_scheduler_type cosine \
  --num_train_epochs 2 --logging_steps 5 --save_strategy epoch --output_dir outputs/demo-sft-lora \
  --overwrite_output_dir True --plot_loss True --gradient_checkpointing False "$@"

$PY -c "import json; r = json.load(open('outputs/demo-dpo/train_results.json')); \
print('DPO reward accuracy: first', r['first_rewards/accuracies'], 'last', r['last_rewards/accuracies'])"

# Greedy decoding (--do_sample False): the numbers are reproducible. 48 new tokens hold every demo answer (38 at most).
# One thread: the tiny model is overhead-bound, and threads competing for busy cores slow it down many times.
OMP_NUM_THREADS=1 $PY evaluate_alignment.py \
  --model_name_or_path outputs/demo-sft,outputs/demo-dpo,outputs/demo-sft-lora/merged --base_model models/tiny-qwen2 \
  --dataset_dir data --harmful_dataset demo_eval_harmful --benign_dataset demo_eval_benign \
  --general_dataset demo_eval_general --do_sample False --max_new_tokens 48 --per_device_eval_batch_size 64 \
  --output_dir outputs/demo-eval --overwrite_output_dir True --plot True

echo "demo finished in $(( $(date +%s) - start )) s: outputs/demo-sft (SFT), outputs/demo-dpo (DPO)," \
  "outputs/demo-sft-lora (LoRA adapter; merged model in merged/); loss curves in outputs/*/training_loss.png;" \
  "evaluation in outputs/demo-eval (eval_results.json, safety_vs_utility.png, */generated_predictions.jsonl)"
