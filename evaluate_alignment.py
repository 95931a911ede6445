r"""Evaluate what safety alignment bought and what it cost: predictions in LLaMA-Factory's format, refusal rates,
answer NLL and exact match per dataset, and the alignment-tax report against the pre-alignment model.

For every model: answers to every row of the datasets (batched, left-padded, data-parallel over processes) go to
generated_predictions.jsonl (LLaMA-Factory's `prompt` / `predict` / `label` lines); the answers' refusal rate, and
teacher-forced on the labels the answer NLL, with the exact match of the answers, go to eval_results.json and a
table. With --base_model the same rows are evaluated on the pre-alignment model too, and each axis is shown with its
difference: safety (refusal on --harmful_dataset), over-refusal (refusal on --benign_dataset), utility (answer NLL and
exact match on --general_dataset).

Tiny CPU run (after scripts/demo.sh's training; greedy decoding, so the numbers are reproducible):
    python evaluate_alignment.py --model_name_or_path outputs/demo-sft,outputs/demo-dpo \
        --base_model models/tiny-qwen2 --dataset_dir data --harmful_dataset demo_eval_harmful \
        --benign_dataset demo_eval_benign --general_dataset demo_eval_general --do_sample False \
        --max_new_tokens 48 --per_device_eval_batch_size 64 --output_dir outputs/demo-eval --plot True

A LoRA adapter:          --model_name_or_path BASE --adapter_name_or_path outputs/demo-sft-lora
Several GPUs:            accelerate launch --config_file accelerate_configs/multi_gpu.yaml evaluate_alignment.py ...
Two CPU processes:       torchrun --nproc_per_node 2 evaluate_alignment.py ...

Exit codes: 0 done; 2 a mistake in flags, data or files (one line `error: ...`). See README, "Evaluating a trained
model".
"""

import stop_on_ctrl_c  # noqa: F401  first: Ctrl-C while the modules below import stops with one line

import argparse
import json
import math
import os
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed

from arguments import NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, Parser, checked, flag
import eval_utils
from checkpoint import write_json, write_text_atomic
from data_utils import (TEMPLATES, DataError, get_template, is_ranking, load_conversations, read_rows,
                        resolve_dataset, tokenize_dataset, tokenize_prompt)
from run_guard import UserError, first_line, hold_output_dir, run_main
from train_utils import check_adapter_fits, from_pretrained, load_model, load_tokenizer

ROLES = ("harmful", "benign", "general", "eval")  # the order of the datasets in the outputs
PREDICTIONS = "generated_predictions.jsonl"
RESULTS = "eval_results.json"
PLOT = "safety_vs_utility.png"


def build_parser():
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, evaluation=True)
    g = parser.add_argument_group("run")
    flag(g, "--output_dir", required=True, help=f"where {PREDICTIONS}, {RESULTS} and the plot go")
    flag(g, "--overwrite_output_dir", bool, default=False, help=f"replace an earlier evaluation's {RESULTS} there")
    flag(g, "--seed", int, default=42, help="seed of sampling (set per batch) and of datasets' num_samples")
    flag(g, "--ddp_timeout", POSITIVE_INT, default=1800, help="timeout in seconds for collective operations")
    flag(g, "--plot", bool, default=False, help=f"draw safety against utility, one point per model, to {PLOT}")

    g = parser.add_argument_group("model")
    flag(g, "--model_name_or_path", required=True,
         help="comma-separated models to evaluate (folders or hub ids), or eval_results.json files of earlier "
              "evaluations (shown in the report and the plot)")
    flag(g, "--adapter_name_or_path", default=None, help="a LoRA adapter (PEFT folder) on --model_name_or_path, "
                                                         "merged into it for evaluation as LLaMA-Factory does")
    flag(g, "--base_model", default=None, help="the pre-alignment model: evaluated on the same rows; the report "
                                               "shows every model's difference to it")
    flag(g, "--template", default=None, help=f"one of LLaMA-Factory 0.9.5's {len(TEMPLATES)} chat templates (README: "
                                             "Data); default: the tokenizer's own")
    flag(g, "--enable_thinking", bool, default=True,
         help="reasoning templates: False ends the prompt with the empty reasoning block (as the model was trained)")
    flag(g, "--flash_attn", default="auto", choices=["auto", "disabled", "sdpa", "fa2"],
         help="attention kernel: auto (transformers' default), disabled (eager), sdpa, fa2 (flash_attention_2)")
    flag(g, "--trust_remote_code", bool, default=False, help="allow model/tokenizer code from the hub")
    flag(g, "--bf16", bool, default=False, help="load the weights in bfloat16 (default float32)")

    g = parser.add_argument_group("data (each comma-separated dataset_info.json names, files or hub ids)")
    flag(g, "--dataset_dir", default="data", help="folder with dataset_info.json and the data files")
    flag(g, "--eval_dataset", default=None, help="datasets without a role in the report (scored all the same)")
    flag(g, "--harmful_dataset", default=None, help="harmful requests: safety = their refusal rate")
    flag(g, "--benign_dataset", default=None, help="benign requests: over-refusal = their refusal rate")
    flag(g, "--general_dataset", default=None, help="general tasks: utility = answer NLL and exact match")
    flag(g, "--cutoff_len", checked(int, lambda v: v >= 2, ">= 2"), default=2048,
         help="maximum tokens of prompt + label (the prompt keeps its start, as in LLaMA-Factory)")
    flag(g, "--max_samples", POSITIVE_INT, default=None, help="use at most this many rows of each dataset")
    flag(g, "--strict_data", bool, default=False, help="stop at the first bad row instead of dropping it")
    flag(g, "--refusal_phrases", default=str(eval_utils.REFUSAL_PHRASES),
         help="file of refusal phrases, one a line (an answer containing one is a refusal)")

    g = parser.add_argument_group("generation (LLaMA-Factory's defaults; --do_sample False: no sampling noise)")
    flag(g, "--max_new_tokens", POSITIVE_INT, default=1024, help="most tokens generated per answer")
    flag(g, "--do_sample", bool, default=True, help="sample (True) or decode greedily (False)")
    flag(g, "--temperature", POSITIVE_FLOAT, default=0.95, help="sampling temperature")
    flag(g, "--top_p", checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), default=0.7, help="nucleus sampling mass")
    flag(g, "--top_k", NON_NEGATIVE_INT, default=50, help="sample among the k most likely tokens (0: all)")
    flag(g, "--repetition_penalty", POSITIVE_FLOAT, default=1.0, help="1.0: no penalty")
    flag(g, "--per_device_eval_batch_size", POSITIVE_INT, default=8, help="rows per batch per process")
    return parser


def check_args(args):
    """The datasets as [{"name", "role"}] and the models to evaluate or read; refuses what cannot be honoured."""
    args.gradient_checkpointing = False  # read by train_utils.load_model: evaluation does not train
    args.resize_vocab = False  # read by load_tokenizer: a trained model's tokenizer has its template's tokens
    datasets = [{"name": name.strip(), "role": role} for role in ROLES
                for name in (getattr(args, f"{role}_dataset") or "").split(",") if name.strip()]
    names = [d["name"] for d in datasets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"dataset {repeated[0]} is given twice: give each dataset one role")
    entries = [e.strip() for e in args.model_name_or_path.split(",") if e.strip()]
    models = [e for e in entries if not e.endswith(".json")]
    if args.adapter_name_or_path and len(models) != 1:
        raise UserError("--adapter_name_or_path needs exactly one --model_name_or_path (the adapter's base model)")
    if not entries:
        raise UserError("--model_name_or_path: no model given")
    if not datasets and (models or args.base_model):
        raise UserError("no dataset to evaluate on: pass --harmful_dataset, --benign_dataset, --general_dataset or "
                        "--eval_dataset")
    if datasets and not (models or args.base_model):
        raise UserError("the dataset flags choose the rows of the models evaluated now; to show only earlier "
                        "eval_results.json files, drop them (the files' own datasets are used)")
    if args.plot and datasets and not ({"harmful", "general"} <= {d["role"] for d in datasets}):
        raise UserError("--plot draws safety against utility: it needs --harmful_dataset and --general_dataset")
    if not args.overwrite_output_dir and Path(args.output_dir, RESULTS).exists():
        raise UserError(f"{args.output_dir} holds an earlier evaluation ({RESULTS}); pass --overwrite_output_dir "
                        "True to replace it, or choose another --output_dir")
    candidates = [(args.base_model, None, True)] if args.base_model else []
    candidates += [(e, args.adapter_name_or_path, False) for e in models]
    return datasets, candidates, [e for e in entries if e.endswith(".json")]


def make_accelerator(args):
    """Processes as launched (gloo without a GPU); evaluation needs no training engine."""
    from accelerate import Accelerator, InitProcessGroupKwargs

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    backend = ("nccl" if torch.cuda.is_available() else "gloo") if distributed else None
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[
        InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=args.ddp_timeout))])


def check_inputs(args, datasets, candidates):
    """Before anything is loaded: every dataset is readable and not empty, every model is a causal language model,
    the adapter is a PEFT adapter of the model (train_utils.check_adapter_fits, on the model built without weights);
    each refused by name. Returns each model's config, by path."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for dataset in datasets:
        read_rows(resolve_dataset(dataset["name"], args.dataset_dir))
    configs = {}
    for path, _, _ in candidates:
        config = from_pretrained(AutoConfig.from_pretrained, path, "model", args,
                                 trust_remote_code=args.trust_remote_code)
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and \
                "AutoModelForCausalLM" not in (getattr(config, "auto_map", None) or {}):
            raise UserError(f"model {path}: a '{config.model_type}' model ({', '.join(config.architectures or [])}), "
                            "not a causal language model; evaluation generates text with AutoModelForCausalLM")
        configs[path] = config
    if args.adapter_name_or_path:
        from peft import PeftConfig

        try:
            PeftConfig.from_pretrained(args.adapter_name_or_path)
        except (OSError, ValueError) as err:
            raise UserError(f"--adapter_name_or_path {args.adapter_name_or_path}: not an adapter in PEFT's format "
                            f"(adapter_config.json) ({first_line(err)})") from None
        from transformers import AutoModelForCausalLM

        path = next(path for path, adapter, _ in candidates if adapter)
        with torch.device("meta"):  # the modules' shapes, no weights
            skeleton = AutoModelForCausalLM.from_config(configs[path], trust_remote_code=args.trust_remote_code)
        check_adapter_fits(skeleton, args.adapter_name_or_path, path)
    return configs


def check_positions(config, rows, args, label):
    """Refuse generation past the model's positions (max_position_embeddings): the longest prompt plus
    --max_new_tokens must fit, or generation runs on positions the model was never trained on (or for hours, as
    --max_new_tokens 1000000 would with a model that never stops)."""
    positions = next((getattr(config, key) for key in ("max_position_embeddings", "n_positions", "max_seq_len")
                      if isinstance(getattr(config, key, None), int)), None)
    longest = max(len(row["prompt_ids"]) for row in rows)
    if positions is not None and longest + args.max_new_tokens > positions:
        raise UserError(f"--max_new_tokens {args.max_new_tokens}: with prompts of up to {longest} tokens, answers "
                        f"would run past the {positions} positions of model {label} (max_position_embeddings); pass "
                        f"--max_new_tokens {max(positions - longest, 1)} or less"
                        + (", or a smaller --cutoff_len" if longest >= positions // 2 else ""))


def eval_tokenizer(path, adapter, args, log):
    """The tokenizer and chat template of the model evaluated: an adapter's own (saved with it by training, with the
    template it was trained under), else the model's."""
    if adapter and Path(adapter, "tokenizer_config.json").is_file():
        log(f"tokenizer and chat template: those saved with the adapter {adapter} (what training used)")
        return load_tokenizer(adapter, args)
    if adapter:
        log(f"tokenizer and chat template: the adapter {adapter} has none saved with it; using {path}'s")
    return load_tokenizer(path, args)


def load_eval_model(path, adapter, args, device):
    """The causal LM in eval mode on `device`, with a LoRA adapter merged in (as LLaMA-Factory does for inference)."""
    model = load_model(path, args, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    if adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except (OSError, ValueError) as err:
            raise UserError(f"--adapter_name_or_path {adapter}: not a LoRA adapter for {path} "
                            f"({first_line(err)})") from None
    return model.to(device).eval()


def has_answer(conversation):
    """Whether a row has a reference answer (a harmful-requests list often has none: refusal needs none)."""
    return "prompt" in conversation or conversation["turns"][-1][1] is not None


def load_rows(datasets, args, tokenizer, log):
    """Every dataset's rows: prompt and label (generation) and, for rows with an answer, input ids and labels
    (teacher forcing), in order. Returns (rows, {dataset: prompts cut by --cutoff_len})."""
    template = get_template(tokenizer, args.template, args.enable_thinking)
    rows, cut_prompts = [], {}
    for dataset in datasets:
        name = dataset["name"]
        ranking = is_ranking(name, args.dataset_dir)
        rng = np.random.RandomState(args.seed)  # for "num_samples": the rows of a dataset do not depend on the others
        spec, conversations, notes = load_conversations(name, args.dataset_dir, ranking, args.max_samples,
                                                        args.strict_data, rng, refuse_empty=True,
                                                        answers_optional=True)
        answered = [c for c in conversations if has_answer(c)]
        if dataset["role"] == "general" and not answered:
            raise DataError(f"dataset '{name}' ({spec.source}): no row has an answer (field "
                            f"'{spec.columns.get('response')}' missing in every row), and --general_dataset scores "
                            "answers (NLL, exact match); pass it as --harmful_dataset, --benign_dataset or "
                            "--eval_dataset to measure refusal only")
        examples = iter(tokenize_dataset(answered, tokenizer, template, args.cutoff_len, ranking)[0])
        dropped = sum(len(origins) for reason, origins in notes.items() if reason.startswith("dropped"))
        cut_prompts[name] = 0
        for conversation in conversations:
            prompt = tokenize_prompt(conversation, tokenizer, template, args.cutoff_len)
            if prompt is None:
                raise DataError(f"dataset '{name}' ({spec.source}), row {conversation['row']}: --cutoff_len "
                                f"{args.cutoff_len} leaves its prompt no room beside the answer's share and the "
                                "assistant header (the model would continue the user's text); raise --cutoff_len")
            cut_prompts[name] += prompt.pop("prompt_cut")
            example = next(examples) if has_answer(conversation) else None
            key = "chosen_" if ranking else ""
            rows.append({"dataset": name, **prompt, "input_ids": example and example[f"{key}input_ids"],
                         "labels": example and example[f"{key}labels"]})
        unanswered = len(conversations) - len(answered)
        log(f"dataset {name} ({dataset['role']}, {'pairs: the chosen answer is the label' if ranking else 'SFT'}): "
            f"{len(conversations)} rows" + (f", {dropped} dropped as LLaMA-Factory drops them" if dropped else "")
            + (f", {unanswered} without an answer (refusal only; no answer NLL or exact match)" if unanswered else "")
            + (f", {cut_prompts[name]} prompts cut by --cutoff_len {args.cutoff_len} (each keeps its start and its "
               "assistant header)" if cut_prompts[name] else ""))
        dataset["num_samples"] = len(conversations)
    return rows, cut_prompts


def evaluate(model, tokenizer, rows, args, accelerator, label):
    """Answers and teacher-forced NLL of every row, this rank's batches, gathered in row order on every rank."""
    from tqdm.auto import tqdm

    stop_ids = {tokenizer.eos_token_id} | set(tokenizer.convert_tokens_to_ids(list(
        get_template(tokenizer, args.template, args.enable_thinking).stop_words)))
    generation = eval_utils.generation_kwargs(args)
    world, rank, size = accelerator.num_processes, accelerator.process_index, args.per_device_eval_batch_size
    my_batches = len(range(rank, math.ceil(len(rows) / size), world))  # shard_batches: batch b on rank b % world
    bar = tqdm(total=2 * my_batches, desc=f"evaluating {label}", dynamic_ncols=True,
               disable=not accelerator.is_main_process)
    answers = eval_utils.generate_all(model, [r["prompt_ids"] for r in rows], size, tokenizer.pad_token_id, stop_ids,
                                      generation, args.seed, world, rank, lambda: bar.update(1))
    answered = [i for i, row in enumerate(rows) if row["labels"] is not None]
    nll = eval_utils.nll_all(model, [rows[i] for i in answered], size, tokenizer.pad_token_id, world, rank,
                             lambda: bar.update(1))
    bar.close()
    nll = dict(zip(answered, eval_utils.gather_in_order(accelerator, nll, len(answered))))
    return eval_utils.gather_in_order(accelerator, answers, len(rows)), [nll.get(i) for i in range(len(rows))]


def score(rows, answers, nll, tokenizer, phrases, datasets, cut_prompts):
    """Prediction lines (LLaMA-Factory's: the prompt with its special tokens, answer and label without; a row
    without an answer has an empty label, as in LLaMA-Factory) and the per-dataset scores (exact match and NLL over
    the rows with an answer)."""
    lines, scored = [], []
    for row, answer, row_nll in zip(rows, answers, nll):
        prompt = tokenizer.decode(row["prompt_ids"], skip_special_tokens=False)
        predict = tokenizer.decode(answer, skip_special_tokens=True)
        label = tokenizer.decode(row["label_ids"], skip_special_tokens=True)
        lines.append(json.dumps({"prompt": prompt, "predict": predict, "label": label}, ensure_ascii=False) + "\n")
        scored.append({"dataset": row["dataset"], "refusal": eval_utils.is_refusal(predict, phrases),
                       "exact_match": None if row_nll is None else predict.strip() == label.strip(),
                       "nll": row_nll and row_nll[0], "tokens": row_nll and row_nll[1]})
    scores = {d["name"]: {**eval_utils.score_rows([r for r in scored if r["dataset"] == d["name"]]),
                          "prompts_cut": cut_prompts[d["name"]]} for d in datasets}
    return "".join(lines), scores


def check_same_rows(path, theirs, ours, counted):
    """An earlier evaluation is shown beside this one only if it scored the same datasets (and, once this run has
    counted its rows, as many rows of each)."""
    def key(datasets):
        return [(d["name"], d["role"]) + ((d["num_samples"],) if counted else ()) for d in datasets]

    if key(theirs) != key(ours):
        raise UserError(f"{path} was evaluated on other rows ({key(theirs)}; here {key(ours)}): a comparison needs "
                        "the same datasets, roles and --max_samples")


def unique_label(path, adapter, taken):
    """A model's name in the report: its folder's name ("<run>-merged" for a run's --export_merged folder), made
    unique."""
    folder = Path(adapter or path)
    label = folder.name or str(path)
    if label == "merged" and folder.parent.name:
        label = f"{folder.parent.name}-merged"
    candidate, n = label, 2
    while candidate in taken:
        candidate, n = f"{label}-{n}", n + 1
    return candidate


def main():
    args = build_parser().parse_args()
    hold_output_dir(args.output_dir)  # one evaluation per output folder
    datasets, candidates, result_files = check_args(args)
    phrases = eval_utils.load_refusal_phrases(args.refusal_phrases)
    earlier = [(path, *eval_utils.read_results(path)) for path in result_files]
    if not candidates:  # only earlier evaluations to show: their datasets
        datasets = earlier[0][1]
    for path, their_datasets, _ in earlier:
        check_same_rows(path, their_datasets, datasets, counted=False)
    configs = check_inputs(args, datasets, candidates)
    accelerator = make_accelerator(args)
    log, output = accelerator.print, Path(args.output_dir)
    set_seed(args.seed)
    # Overwriting an earlier evaluation: the new one is written beside the folder and swapped in whole at the end.
    staging = None
    if accelerator.is_main_process and (output / RESULTS).is_file():
        staging = eval_utils.stage_replacement(output, {RESULTS, PLOT, PREDICTIONS})
    written = staging or output

    models, base_label = {}, None
    several = len(candidates) + len(earlier) > 1
    for path, adapter, is_base in candidates:
        label = unique_label(path, adapter, models)
        base_label = label if is_base else base_label
        start = time.perf_counter()
        tokenizer = eval_tokenizer(path, adapter, args, log)
        rows, cut_prompts = load_rows(datasets, args, tokenizer, log)
        check_positions(configs[path], rows, args, label)
        model = load_eval_model(path, adapter, args, accelerator.device)
        answers, nll = evaluate(model, tokenizer, rows, args, accelerator, label)
        del model
        lines, scores = score(rows, answers, nll, tokenizer, phrases, datasets, cut_prompts)
        predictions = Path(label, PREDICTIONS) if several else Path(PREDICTIONS)
        if accelerator.is_main_process:
            (written / predictions).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(written / predictions, lines)
        models[label] = {"model_name_or_path": path, "adapter_name_or_path": adapter, "is_base": is_base,
                         "predictions": str(predictions), "scores": scores,
                         "axes": eval_utils.axes(scores, datasets),
                         "tokenizer": eval_utils.describe_tokenizer(tokenizer),
                         "answer_tokens": eval_utils.answer_tokens_digest(rows)}
        refusals = ", ".join(f"{n} {s['refusal_rate']:.3f}" for n, s in scores.items())
        log(f"{label}: {len(rows)} rows in {time.perf_counter() - start:.1f} s; refusal rate {refusals}; "
            f"predictions: {output / predictions}")
    for path, their_datasets, their_models in earlier:
        check_same_rows(path, their_datasets, datasets, counted=True)
        for label, model in their_models.items():
            label = unique_label(label, None, models)
            models[label] = {**model, "from": str(path)}
            base_label = base_label or (label if model.get("is_base") else None)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        comparison = eval_utils.compare(models, base_label) if base_label else None
        for label, refused in (comparison or {}).items():
            if refused.get("utility_nll_refused"):
                log(f"{label}: utility_nll_change not computed: {refused['utility_nll_refused']}")
        results = {"datasets": datasets, "models": models, "base_model": base_label, "comparison": comparison,
                   "generation": eval_utils.generation_kwargs(args), "refusal_phrases": args.refusal_phrases,
                   "args": vars(args)}
        first = 1
        for dataset in datasets:  # its lines in every predictions file
            dataset["lines"] = [first, first + dataset["num_samples"] - 1]
            first += dataset["num_samples"]
        if args.plot:
            eval_utils.plot(results, written / PLOT)
        write_json(written / RESULTS, results)
        if staging:
            eval_utils.swap_in(staging, output)
            log(f"replaced the earlier evaluation in {output} (its files that this one does not name removed; "
                "files it did not write kept)")
        log(eval_utils.report(results))
        if args.plot:
            log(f"plot: {output / PLOT}")
        log(f"results: {output / RESULTS}")
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    run_main(main)
