"""The argument layer of the training scripts: flags (names and meanings as LLaMA-Factory's), their types and the
checks that refuse what the scripts cannot honour, with a message that says what to do instead.

evaluate_alignment.py builds its own parser from the same pieces (Parser, flag, the checked types).
"""

import argparse
import difflib
import importlib.util
import inspect
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

import torch
import yaml

import ogpsa_core
from checkpoint import check_output_dir_apart, check_resume_flags, resolve_resume, verify_model_files
from data_utils import TEMPLATES
from run_guard import UserError, first_line

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
SCHEDULE_FROM_FLAGS = {  # arguments of transformers' schedule functions that the scripts fill from flags
    "optimizer": "the optimizer", "num_warmup_steps": "--warmup_steps or --warmup_ratio",
    "num_training_steps": "--max_steps or --num_train_epochs", "last_epoch": "the resume",
}
SCHEDULE_NEEDS = {  # what a schedule cannot run without, with an example (transformers gives it no default)
    "cosine_with_min_lr": ("min_lr or min_lr_rate", {"min_lr_rate": 0.1}),
    "warmup_stable_decay": ("num_decay_steps", {"num_decay_steps": 100}),
}
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report_to value: the package to pip install


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as UserErrors: one line `error: argument --x: ...`, exit 2, no usage dump. An
    --output_dir that is or holds a model the run reads is refused here, before the scripts take its lock.
    evaluation: the parser of evaluate_alignment.py (LLaMA-Factory's training keys have other fates there)."""

    def __init__(self, *args, evaluation=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluation = evaluation
        self.lf_fates = None  # the LLaMA-Factory keys that are not flags: added (hidden) at the first parse
        self.sources = {}  # key -> where a config file gave it ('cfg.yaml line 3', 'override k=v')

    @property
    def flag_names(self):
        """The keys this parser takes (flag names without --)."""
        return {action.dest for action in self._actions if action.option_strings and action.dest != "help"}

    def parse_args(self, args=None, namespace=None):
        """Flags, or LLaMA-Factory's form `CONFIG.yaml [key=value ...] [--flag value ...]` (see read_config_args);
        LLaMA-Factory keys that are not flags of this script must be at the value their fate allows (LF_KEY_FATES)."""
        if self.lf_fates is None:
            add_lf_keys(self)
        argv, self.sources, config = read_config_args(self, sys.argv[1:] if args is None else list(args))
        parsed = super().parse_args(argv, namespace)
        check_lf_keys(parsed, self.lf_fates, self.sources)
        parsed.config_file, parsed.config_overrides = config
        check_output_dir_apart(parsed)
        return parsed

    def error(self, message):
        """argparse's error, naming the config file and line a bad value came from."""
        flag_name = re.match(r"argument --(\w+)", message)
        source = self.sources.get(flag_name.group(1)) if flag_name else None
        raise UserError(f"{source}: {message}" if source else message)


def checked(type_, test, requirement):
    """An argparse type that also checks the value, so a bad number is refused while parsing the flags."""
    def parse(text):
        value = type_(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value

    parse.__name__ = type_.__name__  # argparse names the type in "invalid float value"
    return parse


POSITIVE_INT = checked(int, lambda v: v >= 1, ">= 1")
NON_NEGATIVE_INT = checked(int, lambda v: v >= 0, ">= 0")
POSITIVE_FLOAT = checked(float, lambda v: math.isfinite(v) and v > 0, "finite and > 0")
NON_NEGATIVE_FLOAT = checked(float, lambda v: math.isfinite(v) and v >= 0, "finite and >= 0")
FINITE_FLOAT = checked(float, math.isfinite, "finite")
FRACTION = checked(float, lambda v: 0 <= v < 1, "in [0, 1)")


def json_object(text):
    """An argparse type: a JSON object (keys sorted, so that equal settings compare equal on resume)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"min_lr_rate\": 0.1}}', got {text}")
    return dict(sorted(value.items()))


def str2bool(value):
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def flag(group, name, type_=str, **kwargs):
    """A flag; booleans accept `--x`, `--x True` and `--x False`, as LLaMA-Factory's command lines use."""
    if type_ is bool:
        group.add_argument(name, type=str2bool, nargs="?", const=True, **kwargs)
    else:
        group.add_argument(name, type=type_, **kwargs)


def build_parser(description, stage, default_lr=5e-5):
    """The flags both scripts share; names and meanings follow the reference (LLaMA-Factory) commands. The scripts
    keep LLaMA-Factory's learning rate; tests and benchmarks may pass another default_lr."""
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("run")
    flag(g, "--stage", default=stage, help=f"training stage; this script runs '{stage}' (projection on) or "
                                           f"'{stage[:-3]}' (plain, --base_method must be none)")
    flag(g, "--do_train", bool, default=True, help="must be True: these scripts only train")
    flag(g, "--output_dir", required=True, help="where checkpoints, logs, plots and the final model go")
    flag(g, "--overwrite_output_dir", bool, default=False,
         help="start afresh in an OUTPUT_DIR that holds an earlier run (otherwise refused unless resuming): first "
              "removes every output of the earlier run (model, adapter, merged/, checkpoints, logs, plots, "
              "predictions), never files this project did not write (those stay and are listed)")
    flag(g, "--seed", int, default=42, help="seed for the data order and dropout")
    flag(g, "--deepspeed", default=None, help="DeepSpeed JSON config ('auto' values are filled in from these flags)")
    flag(g, "--ddp_timeout", POSITIVE_INT, default=1800, help="timeout in seconds for collective operations")
    flag(g, "--local_rank", int, default=-1, help="set by the `deepspeed` launcher (--local_rank=N); must agree with "
                                                 "the LOCAL_RANK it exports")

    g = parser.add_argument_group("model")
    flag(g, "--model_name_or_path", required=True, help="hub id or local folder of a causal LM")
    flag(g, "--finetuning_type", default="full", choices=["full", "lora"],
         help="full: train every weight; lora: train LoRA adapters (peft) on the frozen model")
    flag(g, "--template", default=None, help=f"one of LLaMA-Factory 0.9.5's {len(TEMPLATES)} chat templates (README: "
                                             "Data), e.g. qwen3_nothink, llama3; default: the tokenizer's own")
    flag(g, "--resize_vocab", bool, default=False,
         help="let --template add the special tokens the tokenizer lacks, growing the embeddings (new rows: the mean "
              "of the others plus noise, as LLaMA-Factory does); otherwise such a template is refused")
    flag(g, "--flash_attn", default="auto", choices=["auto", "disabled", "sdpa", "fa2"],
         help="attention kernel: auto (transformers' default), disabled (eager), sdpa, fa2 (flash_attention_2)")
    flag(g, "--trust_remote_code", bool, default=False, help="allow model/tokenizer code from the hub")
    flag(g, "--gradient_checkpointing", bool, default=True,
         help="recompute activations in backward to save memory (on by default, as in LLaMA-Factory)")
    flag(g, "--disable_gradient_checkpointing", bool, default=False,
         help="LLaMA-Factory's name for --gradient_checkpointing False")
    flag(g, "--moe_aux_loss_coef", NON_NEGATIVE_FLOAT, default=None,
         help="MoE models: weight of the router's load-balancing loss added to the training loss (default: the "
              "model config's router_aux_loss_coef if it sets output_router_logits, else none; 0: none)")

    g = parser.add_argument_group("LoRA (--finetuning_type lora), as LLaMA-Factory names them")
    flag(g, "--lora_rank", POSITIVE_INT, default=None, help="rank of the adapters (default 8)")
    flag(g, "--lora_alpha", POSITIVE_FLOAT, default=None, help="scale numerator: the update is alpha / rank x B A "
                                                               "(default twice the rank)")
    flag(g, "--lora_dropout", FRACTION, default=None, help="dropout on the adapters' input (default 0)")
    flag(g, "--lora_target", default=None, help="all (default: every linear layer except the output head), or "
                                                "comma-separated module names, e.g. q_proj,v_proj")
    flag(g, "--use_rslora", bool, default=None, help="rank-stabilised scale alpha / sqrt(rank) (default False)")
    flag(g, "--adapter_name_or_path", default=None,
         help="train on from this adapter (a PEFT folder, e.g. an earlier run's OUTPUT_DIR); its own rank, alpha, "
              "dropout and targets are used")
    flag(g, "--export_merged", bool, default=False,
         help="also write the adapter merged into the model, a plain model loadable with from_pretrained, "
              "to OUTPUT_DIR/merged")

    g = parser.add_argument_group("data")
    flag(g, "--dataset_dir", default="data", help="folder with dataset_info.json and the data files")
    flag(g, "--dataset", required=True, help="comma-separated training datasets (dataset_info.json names, files or "
                                             "hub ids)")
    flag(g, "--cutoff_len", checked(int, lambda v: v >= 2, ">= 2"), default=2048,
         help="maximum tokens per sequence (prompt + response)")
    flag(g, "--max_samples", POSITIVE_INT, default=None, help="use at most this many rows of each dataset")
    flag(g, "--preprocessing_num_workers", POSITIVE_INT, default=None,
         help="processes for tokenisation (large sets only)")
    flag(g, "--preprocessing_batch_size", POSITIVE_INT, default=1000,
         help="rows per tokenisation batch in each --preprocessing_num_workers process (the result is the same)")
    flag(g, "--tokenized_path", default=None,
         help="folder that keeps the tokenized datasets: written by the first run (main process), read by later runs "
              "with the same data flags, files and tokenizer (another build is refused by name)")
    flag(g, "--overwrite_cache", bool, default=False, help="tokenize again and replace --tokenized_path")
    flag(g, "--dataloader_num_workers", NON_NEGATIVE_INT, default=0,
         help="worker processes that build micro-batches ahead of the step (the same batches; 0: in the main "
              "process)")
    flag(g, "--strict_data", bool, default=False, help="stop at the first bad row (naming file, row and field) "
                                                       "instead of dropping the rows LLaMA-Factory drops (logged)")
    flag(g, "--enable_thinking", bool, default=True,
         help="reasoning templates (qwen3, deepseekr1, ...): False removes every response's reasoning block and puts "
              "the empty one at the end of the prompt, untrained (LLaMA-Factory's enable_thinking)")

    g = parser.add_argument_group("optimisation")
    flag(g, "--learning_rate", POSITIVE_FLOAT, default=default_lr, help="peak learning rate")
    flag(g, "--num_train_epochs", NON_NEGATIVE_FLOAT, default=3.0, help="epochs (fractions allowed)")
    flag(g, "--max_steps", checked(int, lambda v: v == -1 or v >= 1, ">= 1, or -1 (use --num_train_epochs)"),
         default=-1, help="optimizer steps; overrides --num_train_epochs when > 0")
    flag(g, "--per_device_train_batch_size", POSITIVE_INT, default=8, help="samples per micro-batch per process")
    flag(g, "--gradient_accumulation_steps", POSITIVE_INT, default=1, help="micro-batches per optimizer step")
    flag(g, "--lr_scheduler_type", default="linear", choices=SCHEDULERS, help="learning-rate schedule")
    flag(g, "--lr_scheduler_kwargs", json_object, default=None,
         help="JSON object of the schedule's own settings, as Hugging Face's Trainer takes them: cosine_with_min_lr "
              "needs min_lr or min_lr_rate, warmup_stable_decay num_decay_steps (e.g. '{\"num_decay_steps\": 100}')")
    flag(g, "--warmup_steps", NON_NEGATIVE_INT, default=0, help="linear warm-up steps")
    flag(g, "--warmup_ratio", FRACTION, default=0.0, help="warm-up as a fraction of all steps (if --warmup_steps is 0)")
    flag(g, "--optim", default="adamw_torch", choices=["adamw_torch", "adamw_torch_fused", "sgd"],
         help="adamw_torch, adamw_torch_fused (the same update in one fused kernel per step), or sgd (plain SGD, no "
              "momentum: for checks and debugging)")
    flag(g, "--weight_decay", NON_NEGATIVE_FLOAT, default=0.0, help="decoupled weight decay (not on biases and norms)")
    flag(g, "--adam_beta1", FRACTION, default=0.9, help="AdamW beta1")
    flag(g, "--adam_beta2", FRACTION, default=0.999, help="AdamW beta2")
    flag(g, "--adam_epsilon", POSITIVE_FLOAT, default=1e-8, help="AdamW epsilon")
    flag(g, "--max_grad_norm", NON_NEGATIVE_FLOAT, default=1.0,
         help="clip the (projected) gradient to this norm; 0 disables")
    flag(g, "--bf16", bool, default=False, help="bfloat16 mixed precision (float32 master weights)")
    flag(g, "--fp16", bool, default=False, help="not supported: use --bf16")

    g = parser.add_argument_group("batching (speed only: each step's samples, loss and gradient stay the same)")
    flag(g, "--length_aware_micro_batches", bool, default=True,
         help="deal each optimizer step's samples to micro-batches and ranks by length, so that micro-batches hold "
              "similar lengths (little padding) and ranks similar token counts; False: in sampled order")
    flag(g, "--padding_free", bool, default=False,
         help="put each micro-batch's sequences into one row without padding (position ids restart per sequence); "
              "pays off with --flash_attn fa2 (see README, Throughput)")

    g = parser.add_argument_group("saving and logging")
    flag(g, "--save_strategy", default="steps", choices=["steps", "epoch", "no"], help="when to write checkpoints")
    flag(g, "--save_steps", POSITIVE_INT, default=500,
         help="checkpoint every N optimizer steps (--save_strategy steps)")
    flag(g, "--save_total_limit", POSITIVE_INT, default=None, help="keep only the newest N checkpoints")
    flag(g, "--save_only_model", bool, default=False,
         help="checkpoints hold only the model (no optimizer, scheduler, RNG, OGPSA basis): cannot be resumed")
    flag(g, "--resume_from_checkpoint", default=None,
         help="checkpoint folder to resume from, or True for the newest in OUTPUT_DIR")
    flag(g, "--logging_steps", POSITIVE_INT, default=500, help="log every N optimizer steps")
    flag(g, "--report_to", default="none", choices=["none", *TRACKERS, "all"],
         help="experiment trackers (through Accelerate); all: every installed one")
    flag(g, "--run_name", default=None, help="the run's name in the trackers (wandb's run name)")
    flag(g, "--logging_dir", default=None,
         help="tracker folder: TensorBoard writes its events here (default OUTPUT_DIR/<name of OUTPUT_DIR>)")
    flag(g, "--plot_loss", bool, default=False, help="write the loss curve as a PNG into OUTPUT_DIR")
    flag(g, "--include_num_input_tokens_seen", bool, default=False, help="log the number of input tokens seen")

    g = parser.add_argument_group("validation during training (README: Validation during training)")
    flag(g, "--val_size", checked(float, lambda v: v >= 0 and (v <= 1 or v == int(v)),
                                  ">= 0: a fraction up to 1, or a whole count above 1"), default=0.0,
         help="hold out this fraction (<= 1) or number (> 1) of the training samples for evaluation, split as "
              "LLaMA-Factory splits them (datasets' train_test_split with --seed)")
    flag(g, "--eval_dataset", default=None, help="comma-separated datasets to evaluate (the training data's kind)")
    flag(g, "--eval_on_each_dataset", bool, default=False,
         help="evaluate each --eval_dataset on its own: eval_<name>_loss, ...")
    flag(g, "--eval_general_dataset", default=None,
         help="comma-separated general-capability SFT datasets whose per-token NLL is logged as eval_general_loss "
              "at each evaluation (OGPSA: the alignment tax while it happens)")
    flag(g, "--eval_strategy", default="no", choices=["no", "steps", "epoch"],
         help="when to evaluate: every --eval_steps steps, at each epoch's end, or only at the end (--do_eval)")
    flag(g, "--eval_steps", POSITIVE_INT, default=None,
         help="evaluate every N optimizer steps (--eval_strategy steps; default --logging_steps)")
    flag(g, "--per_device_eval_batch_size", POSITIVE_INT, default=8,
         help="samples per evaluation batch per process (the metrics do not depend on it)")
    flag(g, "--do_eval", bool, default=False,
         help="evaluate at the end and write eval_results.json (on whenever --eval_strategy is not no)")

    g = parser.add_argument_group("OGPSA (orthogonal gradient projection)")
    flag(g, "--base_dataset", default=None, help="comma-separated general-capability reference sets")
    flag(g, "--base_num_samples", POSITIVE_INT, default=200,
         help="reference samples per set (a smaller set is used whole)")
    flag(g, "--base_num_steps", POSITIVE_INT, default=30, help="recompute the basis every N optimizer steps "
                                                              "(and once before training)")
    flag(g, "--base_method", default="orthogonal_projection", choices=list(ogpsa_core.METHODS),
         help="none (plain training), orthogonal_projection (g -= U U^T g), or threshold (remove only components "
              "that conflict with a reference gradient; scale g by --base_scale where none does)")
    flag(g, "--base_scale", FINITE_FLOAT, default=1.0, help="threshold method: factor for gradients with no conflict")
    flag(g, "--base_threshold", FRACTION, default=0.0,
         help="drop basis directions whose singular value (svd) or residual norm (qr) is below this fraction of "
              "the largest; 0 keeps every numerically independent direction")
    flag(g, "--base_directions", POSITIVE_INT, default=1,
         help="directions per reference set: its samples are split into this many chunks, one direction each")
    flag(g, "--base_scope", default="per_param", choices=list(ogpsa_core.SCOPES),
         help="per_param: one basis per parameter tensor (reference semantics); global: one basis over all")
    flag(g, "--base_basis", default="qr", choices=list(ogpsa_core.BASES),
         help="qr: Gram-Schmidt in set order; svd: principal directions")
    flag(g, "--base_dtype", default="float32", choices=["float32", "bfloat16"], help="storage dtype of the basis")
    flag(g, "--base_project_update", bool, default=False,
         help="also project the parameter update after the optimizer step, so the step itself is orthogonal to the "
              "basis (AdamW rescales each coordinate, so a projected gradient does not give an orthogonal update); "
              "not in the paper; holds a copy of the (trainable) parameters this rank updates")
    flag(g, "--base_batch_size", POSITIVE_INT, default=None,
         help="micro-batch size for reference gradients (default: --per_device_train_batch_size)")
    return parser


def check_args(args, stage):
    """Refuse flag values these scripts cannot honour, with a message that says what to do instead."""
    plain_stage = stage[:-3]
    if args.stage not in (stage, plain_stage):
        raise UserError(f"--stage {args.stage} is not run by this script: it runs '{stage}' (or '{plain_stage}' "
                        "without projection)")
    if args.stage == plain_stage and args.base_method != "none":
        raise UserError(f"--stage {plain_stage} trains without projection: pass --base_method none, or use "
                        f"--stage {stage}")
    if not args.do_train:
        raise UserError("--do_train False: these scripts only train (evaluation is not implemented)")
    if args.resize_vocab and args.finetuning_type == "lora":
        raise UserError("--resize_vocab with --finetuning_type lora is not supported: the new embedding rows would "
                        "have to train beside the adapters; use --finetuning_type full, or a template whose tokens "
                        "the tokenizer has")
    resolve_lora_flags(args)
    if args.disable_gradient_checkpointing:
        args.gradient_checkpointing = False  # LLaMA-Factory's switch, which wins as it does there
    check_local_rank(args.local_rank)
    if args.fp16:
        raise UserError("--fp16 is not supported (loss scaling is not implemented); use --bf16")
    if args.base_method != "none" and not args.base_dataset:
        raise UserError(f"--base_method {args.base_method} needs --base_dataset (the reference sets)")
    if args.base_scale != 1.0 and args.base_method != "threshold":
        raise UserError("--base_scale only applies to --base_method threshold")
    if args.base_project_update and args.base_method != "orthogonal_projection":
        raise UserError("--base_project_update needs --base_method orthogonal_projection")
    if args.base_method != "none" and args.base_directions > args.base_num_samples:
        raise UserError(f"--base_directions {args.base_directions} needs at least that many reference samples per set, "
                        f"but --base_num_samples is {args.base_num_samples}: lower --base_directions or raise "
                        "--base_num_samples")
    args.report_to = check_trackers(args.report_to)
    check_flash_attn(args.flash_attn)
    args.lr_scheduler_kwargs = args.lr_scheduler_kwargs or {}
    check_scheduler_kwargs(args)
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise UserError("set --num_train_epochs or --max_steps to a positive value")
    args.base_batch_size = args.base_batch_size or args.per_device_train_batch_size
    check_validation_flags(args)
    args.resume_from_checkpoint = resolve_resume(args)
    if args.resume_from_checkpoint:
        check_resume_flags(args, args.resume_from_checkpoint)
    return args


def check_validation_flags(args):
    """Validation flags as Hugging Face's TrainingArguments resolve them (eval_strategy implies do_eval, eval_steps
    defaults to logging_steps), refusing combinations that would evaluate nothing or ignore a flag."""
    has_data = bool(args.val_size or args.eval_dataset or args.eval_general_dataset)
    if args.eval_steps is not None and args.eval_strategy != "steps":
        raise UserError(f"--eval_steps {args.eval_steps} applies to --eval_strategy steps (the run has "
                        f"--eval_strategy {args.eval_strategy}): add --eval_strategy steps, or drop --eval_steps")
    if args.val_size and args.eval_dataset:
        raise UserError("--val_size and --eval_dataset both name evaluation data (LLaMA-Factory ignores "
                        "--eval_dataset then): pass one of them")
    if args.eval_on_each_dataset and not args.eval_dataset:
        raise UserError("--eval_on_each_dataset applies to --eval_dataset: add one, or drop the flag")
    if args.eval_strategy != "no":
        args.do_eval = True
        if args.eval_strategy == "steps" and args.eval_steps is None:
            args.eval_steps = args.logging_steps
    if args.do_eval and not has_data:
        raise UserError(f"{'--do_eval' if args.eval_strategy == 'no' else '--eval_strategy ' + args.eval_strategy} "
                        "needs evaluation data: add --val_size, --eval_dataset or --eval_general_dataset")
    if has_data and not args.do_eval:
        raise UserError("evaluation data is given (--val_size, --eval_dataset or --eval_general_dataset) but no "
                        "evaluation: add --eval_strategy steps or epoch, or --do_eval True")


def check_trackers(report_to):
    """--report_to as Accelerate's log_with list ("none" or comma-separated); a tracker whose package is not
    installed is refused, as Accelerate would only warn and report nothing. `all`: the installed ones."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}  # Accelerate's checks
    if report_to == "all":
        installed = [name for name in TRACKERS if available[name]]
        if not installed:
            raise UserError(f"--report_to all: none of {', '.join(TRACKERS)} is installed (pip install "
                            f"{' or '.join(TRACKERS.values())}), or pass --report_to none")
        return ",".join(installed)
    if report_to != "none" and not available[report_to]:
        raise UserError(f"--report_to {report_to}: the {TRACKERS[report_to]} package is not installed, so nothing "
                        f"would be reported; pip install {TRACKERS[report_to]}, or pass --report_to none")
    return report_to


def check_flash_attn(choice):
    """--flash_attn fa2 needs the flash-attn package and a GPU it runs on: refuse it here rather than when the
    model loads."""
    if choice != "fa2":
        return
    from transformers.utils import is_flash_attn_2_available

    if importlib.util.find_spec("flash_attn") is None:
        raise UserError("--flash_attn fa2 needs the flash-attn package, which is not installed (pip install "
                        "flash-attn --no-build-isolation); or use --flash_attn sdpa")
    if not is_flash_attn_2_available():
        raise UserError("--flash_attn fa2: flash-attn is installed but transformers cannot use it here (it needs a "
                        "CUDA GPU and a flash-attn version transformers supports); use --flash_attn sdpa")


def check_scheduler_kwargs(args):
    """--lr_scheduler_kwargs must hold the settings of transformers' schedule function for --lr_scheduler_type and
    no other key: an unknown key is refused by name with the accepted ones, a missing required one likewise, and a
    schedule built from them on a throwaway optimizer must build (wrong values fail here, not after the model
    loaded)."""
    name, given = args.lr_scheduler_type, args.lr_scheduler_kwargs
    if not given:  # nothing to check, unless the schedule needs a setting (and no transformers import: it is slow)
        if name in SCHEDULE_NEEDS:
            needs, example = SCHEDULE_NEEDS[name]
            raise UserError(f"--lr_scheduler_type {name} needs --lr_scheduler_kwargs with {needs}, e.g. "
                            f"'{json.dumps(example)}'")
        return
    from transformers import get_scheduler
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    parameters = inspect.signature(TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]).parameters
    accepted = [key for key in parameters if key not in SCHEDULE_FROM_FLAGS]
    for key in given:
        if key in SCHEDULE_FROM_FLAGS:
            raise UserError(f"--lr_scheduler_kwargs: {key} is set by {SCHEDULE_FROM_FLAGS[key]}, not here")
        if key not in accepted:
            raise UserError(f"--lr_scheduler_kwargs: '{key}' is not a setting of --lr_scheduler_type {name} (its "
                            f"settings: {', '.join(accepted) or 'none'})")
    missing = [key for key in accepted if parameters[key].default is inspect.Parameter.empty and key not in given]
    if missing:
        raise UserError(f"--lr_scheduler_type {name} needs --lr_scheduler_kwargs with {', '.join(missing)}, e.g. "
                        f"'{json.dumps({key: 100 for key in missing})}'")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the real schedule warns, once, when it is built
            get_scheduler(name, optimizer, num_warmup_steps=0, num_training_steps=100,
                          scheduler_specific_kwargs=given)
    except (TypeError, ValueError) as err:
        raise UserError(f"--lr_scheduler_type {name} with --lr_scheduler_kwargs {json.dumps(given)}: "
                        f"{first_line(err)}") from None


LORA_DEFAULTS = {"lora_rank": 8, "lora_dropout": 0.0, "lora_target": "all", "use_rslora": False}  # LLaMA-Factory's


def resolve_lora_flags(args):
    """Fill in the LoRA flags: LLaMA-Factory's defaults (alpha: twice the rank), or with --adapter_name_or_path the
    adapter's own values, refusing a flag that contradicts them; refuse LoRA flags without --finetuning_type lora."""
    lora_flags = [*LORA_DEFAULTS, "lora_alpha", "adapter_name_or_path", "export_merged"]
    given = [name for name in lora_flags if getattr(args, name) not in (None, False)]
    if args.finetuning_type != "lora":
        if given:
            raise UserError(f"--{given[0]} applies to LoRA: add --finetuning_type lora, or drop it")
        return
    if not args.adapter_name_or_path:
        for name, default in LORA_DEFAULTS.items():
            setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
        args.lora_alpha = args.lora_alpha or 2.0 * args.lora_rank
        return
    if "," in args.adapter_name_or_path:
        raise UserError(f"--adapter_name_or_path {args.adapter_name_or_path}: one adapter only. To build on several, "
                        "merge them first (--export_merged True writes OUTPUT_DIR/merged) and pass the merged model "
                        "as --model_name_or_path")
    from peft import PeftConfig

    try:
        saved = PeftConfig.from_pretrained(args.adapter_name_or_path)
        verify_model_files(args.adapter_name_or_path, "--adapter_name_or_path")
    except (OSError, ValueError) as err:
        raise UserError(f"--adapter_name_or_path {args.adapter_name_or_path}: not a LoRA adapter in PEFT's format "
                        f"(adapter_config.json) ({first_line(err)})") from None
    if getattr(saved, "peft_type", None) != "LORA":
        raise UserError(f"--adapter_name_or_path {args.adapter_name_or_path}: a {saved.peft_type} adapter, not LoRA")
    targets = saved.target_modules
    targets = sorted({name.split(".")[-1] for name in targets}) if not isinstance(targets, str) else [targets]
    adapter = {"lora_rank": saved.r, "lora_alpha": float(saved.lora_alpha), "lora_dropout": saved.lora_dropout,
               "use_rslora": bool(saved.use_rslora), "lora_target": ",".join(targets)}
    for name, value in adapter.items():
        given = getattr(args, name)
        agrees = given in (None, value) or (name == "lora_target" and (
            given == "all" or sorted(given.split(",")) == targets))  # LLaMA-Factory's configs pass `all` everywhere
        if not agrees:
            raise UserError(f"--{name} {given} contradicts the adapter {args.adapter_name_or_path}, which has {value}: "
                            "drop the flag (training goes on with the adapter's own settings)")
        setattr(args, name, value)


def check_local_rank(local_rank):
    """--local_rank comes from the `deepspeed` launcher, which also exports LOCAL_RANK (what Accelerate reads)."""
    exported = os.environ.get("LOCAL_RANK")
    if local_rank != -1 and exported is not None and int(exported) != local_rank:
        raise UserError(f"--local_rank {local_rank} disagrees with the launcher's LOCAL_RANK={exported}: drop the flag")


# ---- config files, as `llamafactory-cli train CONFIG.yaml [key=value ...]` reads them -------------------------------

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
COMMA_SEPARATED = {"dataset", "eval_dataset", "base_dataset", "lora_target", "harmful_dataset", "benign_dataset",
                   "general_dataset", "model_name_or_path", "report_to"}  # a YAML list is joined with commas


class ConfigLoader(yaml.SafeLoader):
    """PyYAML as LLaMA-Factory reads configs (through OmegaConf's loader): YAML 1.1, plus floats written without a dot
    (`1e-5`, which plain YAML 1.1 leaves a string) and no timestamps."""


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
     [-+]?[0-9]+(?:_[0-9]+)*\.[0-9]*(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+(?:_[0-9]+)*(?:[eE][-+]?[0-9]+)
    |\.[0-9]+(?:_[0-9]+)*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in ConfigLoader.yaml_implicit_resolvers.items()}


def yaml_value(text):
    """A value as LLaMA-Factory parses `key=value` after the config file (and this parser LLaMA-Factory-only keys)."""
    try:
        return yaml.load(text, Loader=ConfigLoader) if text.strip() else text
    except yaml.YAMLError:
        return text  # not YAML on its own (e.g. `a: b`): the text itself


def read_config(path):
    """The top-level keys of a YAML/JSON config file -> (values, {key: 'PATH line N'}); a file that cannot be read,
    is not valid YAML, is not a mapping or gives a key twice is one line naming the file and line."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UserError(f"config file {path}: cannot be read ({err.strerror})") from None
    loader = ConfigLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return {}, {}
        if not isinstance(root, yaml.MappingNode):
            raise UserError(f"{path} line {root.start_mark.line + 1}: a config file holds `key: value` lines, "
                            f"not a {root.id}")
        lines = {}
        for key_node, _ in root.value:
            where = f"{path} line {key_node.start_mark.line + 1}"
            if not isinstance(key_node, yaml.ScalarNode):
                raise UserError(f"{where}: a key must be a name")
            if key_node.value in lines:
                raise UserError(f"{where}: {key_node.value} is given twice (also on {lines[key_node.value]}): keep one")
            lines[key_node.value] = where
        return loader.construct_document(root), lines
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    finally:
        loader.dispose()


def read_config_args(parser, argv):
    """Turn LLaMA-Factory's `CONFIG [key=value ...]` into flags, in its order of precedence (file < key=value < any
    flags after them) -> (argv, {key: where it came from}, (config path, overrides)). The `deepspeed` launcher puts
    --local_rank=N before the file. Plain flags pass through unchanged."""
    leading = []
    while argv and argv[0].startswith("--local_rank"):
        leading += argv[:1] if "=" in argv[0] else argv[:2]
        argv = argv[1:] if "=" in argv[0] else argv[2:]
    if not argv or not argv[0].endswith(CONFIG_SUFFIXES) or argv[0].startswith("-"):
        return leading + argv, {}, (None, [])
    path, rest = argv[0], argv[1:]
    values, sources = read_config(path)
    overrides = []
    while rest and not rest[0].startswith("-") and "=" in rest[0]:
        overrides.append(rest.pop(0))
    for item in overrides:
        key, _, text = item.partition("=")
        values[key.strip()] = yaml_value(text)
        sources[key.strip()] = f"override {item}"
    flags = []
    for key, value in values.items():
        where = sources[key]
        if key not in parser.flag_names:
            raise UserError(f"{where}: unknown key {key}" + nearest_key(key, parser.flag_names))
        if value is None:  # LLaMA-Factory's null: the key's default (a key whose default is not null refuses it)
            default = parser.lf_fates[key][0] if key in parser.lf_fates else parser.get_default(key)
            if default is not ANY and None not in (default if isinstance(default, tuple) else (default,)):
                raise UserError(f"{where}: {key}: null is not a value of this key (default {default}): give a "
                                "value or drop the line")
            continue
        flags.append(f"--{key}={flag_text(key, value, where)}")
    return leading + flags + rest, sources, (str(path), overrides)


def flag_text(key, value, where):
    """A config value as the flag's text: booleans True/False, numbers as written by Python, mappings as JSON."""
    if isinstance(value, list) and key in COMMA_SEPARATED and all(isinstance(v, (str, int)) for v in value):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict) or (isinstance(value, list) and key in LF_KEY_DEFAULTS):
        return json.dumps(value)  # a JSON flag (lr_scheduler_kwargs), or compared with LLaMA-Factory's default
    if isinstance(value, list):
        raise UserError(f"{where}: {key} takes one value, not a list" +
                        (" (write it comma-separated)" if all(isinstance(v, str) for v in value) else ""))
    return str(value)


def nearest_key(key, known):
    """' (nearest known key: X)', or '' when nothing is close."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" (nearest known key: {close[0]})" if close else " (see README, Coming from LLaMA-Factory, for the keys)"


# ---- LLaMA-Factory's keys that are not flags here -----------------------------------------------------------------
# Every key of LLaMA-Factory's argument classes (tests/lf_examples/lf_keys.txt) is a flag above (honoured with its
# meaning) or has its fate here: (why another value is refused, and what to use instead) -> {key: LLaMA-Factory's
# default}. The default is accepted (it changes nothing here); a tuple lists several such values (packing: null is
# LLaMA-Factory's automatic choice, off for SFT and DPO); ANY marks keys whose every value changes nothing here.
# The README's key table is generated from this and the parsers (`python arguments.py --keys-table`).
ANY = "any value"
VALIDATION = ("validation during training computes losses (and the DPO rewards) only: no generation, accuracy, "
              "best-model selection or early stopping; evaluate answers with evaluate_alignment.py")
LF_KEY_FATES = {
    "multimodal inputs are not supported (text models only)": {
        "image_max_pixels": 589824, "image_min_pixels": 1024, "image_do_pan_and_scan": False, "crop_to_patches": False,
        "video_max_pixels": 65536, "video_min_pixels": 256, "video_fps": 2.0, "video_maxlen": 128,
        "use_audio_in_video": False, "audio_sampling_rate": 16000, "media_dir": None, "freeze_vision_tower": True,
        "freeze_multi_modal_projector": True, "freeze_language_model": False},
    "inference engines are LLaMA-Factory's chat/API tools; evaluate_alignment.py generates with transformers": {
        "infer_backend": "huggingface", "use_kv_cache": True, "infer_dtype": "auto", "vllm_maxlen": 4096,
        "vllm_gpu_util": 0.7, "vllm_enforce_eager": False, "vllm_max_lora_rank": 32, "vllm_config": None,
        "sglang_maxlen": 4096, "sglang_mem_fraction": 0.7, "sglang_tp_size": -1, "sglang_config": None,
        "sglang_lora_backend": "triton", "use_kt": False, "kt_optimize_rule": None, "cpu_infer": 32,
        "chunk_size": 8192, "mode": "normal", "kt_maxlen": 4096, "kt_use_cuda_graph": True, "kt_mode": "normal",
        "kt_force_think": False},
    "exporting is `llamafactory-cli export`'s; LoRA runs here write the merged model with --export_merged True": {
        "export_dir": None, "export_size": 5, "export_device": "cpu", "export_quantization_bit": None,
        "export_quantization_dataset": None, "export_quantization_nsamples": 128, "export_quantization_maxlen": 1024,
        "export_legacy_format": False, "export_hub_model_id": None},
    "quantized and FP8 training are not supported: train in bf16 (--bf16 True), full or LoRA": {
        "quantization_method": "bnb", "quantization_bit": None, "quantization_type": "nf4",
        "double_quantization": True, "quantization_device_map": None, "fp8": False, "fp8_backend": "auto",
        "fp8_enable_fsdp_float8_all_gather": False, "ref_model_quantization_bit": None, "pure_bf16": False,
        "bf16_full_eval": False, "fp16_full_eval": False, "half_precision_backend": "auto", "fp16_opt_level": "O1",
        "fp16_backend": "auto"},
    "the model and tokenizer load as saved (no added tokens beyond a template's, RoPE scaling or custom kernels); "
    "change the model folder instead": {
        "adapter_folder": None, "use_fast_tokenizer": True, "split_special_tokens": False,
        "add_tokens": None, "add_special_tokens": None, "new_special_tokens_config": None,
        "init_special_tokens": "noise_init", "model_revision": "main", "rope_scaling": None, "shift_attn": False,
        "mixture_of_depths": None, "use_unsloth": False, "use_unsloth_gc": False, "enable_liger_kernel": False,
        "use_liger_kernel": False, "liger_kernel_config": None, "upcast_layernorm": False,
        "upcast_lmhead_output": False, "train_from_scratch": False, "use_v1_kernels": False, "torch_compile": False,
        "torch_compile_backend": None, "torch_compile_mode": None, "torchdynamo": None, "use_cache": False,
        "print_param_status": False, "kt_weight_path": None, "kt_expert_checkpoint_path": None,
        "kt_use_lora_experts": None, "kt_lora_expert_num": None, "kt_lora_expert_intermediate_size": None},
    "hub access goes through the environment (HF_TOKEN, HF_HOME); ModelScope, Modelers and pushing to a hub are not "
    "supported": {
        "cache_dir": None, "hf_hub_token": None, "ms_hub_token": None, "om_hub_token": None, "push_to_hub": False,
        "hub_token": None, "hub_private_repo": None, "hub_model_id": None, "hub_strategy": "every_save",
        "hub_always_push": False, "hub_revision": None, "push_to_hub_model_id": None,
        "push_to_hub_organization": None, "push_to_hub_token": None},
    "these scripts train causal-LM SFT (train_sft_pg.py) and DPO (train_dpo_pg.py) of all weights or LoRA; freeze, "
    "OFT, DoRA, PiSSA, LoRA+, LLaMA Pro and the other optimizers are not built": {
        "freeze_trainable_layers": 2, "freeze_trainable_modules": "all", "freeze_extra_modules": None,
        "additional_target": None, "loraplus_lr_ratio": None, "loraplus_lr_embedding": 1e-6, "use_dora": False,
        "pissa_init": False, "pissa_iter": 16, "pissa_convert": False, "create_new_adapter": False,
        "module_dropout": 0.0, "oft_rank": 0, "oft_block_size": 32, "oft_target": "all", "use_galore": False,
        "galore_target": "all", "galore_rank": 16, "galore_update_interval": 200, "galore_scale": 2.0,
        "galore_proj_type": "std", "galore_layerwise": False, "use_apollo": False, "apollo_target": "all",
        "apollo_rank": 16, "apollo_update_interval": 200, "apollo_scale": 32.0, "apollo_proj": "random",
        "apollo_proj_type": "std", "apollo_scale_type": "channel", "apollo_layerwise": False,
        "apollo_scale_front": False, "use_badam": False, "badam_mode": "layer", "badam_start_block": None,
        "badam_switch_mode": "ascending", "badam_switch_interval": 50, "badam_update_ratio": 0.05,
        "badam_mask_mode": "adjacent", "badam_verbose": 0, "use_llama_pro": False, "use_adam_mini": False,
        "use_mca": False, "use_muon": False, "use_dft_loss": False, "use_asft_loss": False, "asft_alpha": 0.1,
        "use_eaft_loss": False, "eaft_alpha": 1.0, "use_hyper_parallel": False, "hyper_parallel_args": None,
        "optim_args": None, "optim_target_modules": None,
        "label_smoothing_factor": 0.0, "neftune_noise_alpha": None},
    "the PPO, KTO and reward-model stages, BCO and LD-DPO are not built: train_dpo_pg.py runs --pref_loss "
    "sigmoid, ipo, hinge, orpo or simpo": {
        "pref_bco_weight": 0.0, "kto_chosen_weight": 1.0, "kto_rejected_weight": 1.0,
        "ppo_buffer_size": 1, "ppo_epochs": 4, "ppo_score_norm": False, "ppo_target": 6.0,
        "ppo_whiten_rewards": False, "ref_model_adapters": None, "reward_model": None, "reward_model_adapters": None,
        "reward_model_quantization_bit": None, "reward_model_type": "lora", "ld_alpha": None},
    "preference-optimisation settings: they apply to train_dpo_pg.py": {
        "pref_beta": 0.1, "pref_loss": "sigmoid", "dpo_label_smoothing": 0.0, "pref_ftx": 0.0, "ref_model": None,
        "simpo_gamma": 0.5},
    "the training text is fixed: the prompt is masked, every turn's response trains, datasets are concatenated, "
    "without packing, tools or streaming (see README, Data)": {
        "train_on_prompt": False, "mask_history": False, "preserve_thinking": False, "default_system": None,
        "streaming": False, "buffer_size": 16384,
        "mix_strategy": "concat", "interleave_probs": None, "ignore_pad_token_for_loss": True, "packing": (None, False),
        "neat_packing": False, "tool_format": None, "remove_unused_columns": True, "label_names": None,
        "length_column_name": "length", "group_by_length": False, "train_sampling_strategy": "random",
        "dataloader_drop_last": False, "sortish_sampler": False, "disable_shuffling": False, "data_seed": None,
        "average_tokens_across_devices": True},
    VALIDATION: {
        "eval_delay": 0, "do_predict": False,
        "prediction_loss_only": False, "eval_on_start": False, "eval_do_concat_batches": True,
        "eval_use_gather_object": False, "eval_accumulation_steps": None, "include_for_metrics": [],
        "batch_eval_metrics": False, "load_best_model_at_end": False, "metric_for_best_model": None,
        "greater_is_better": None, "early_stopping_steps": None, "compute_accuracy": False, "eval_num_beams": None,
        "predict_with_generate": False, "generation_max_length": None, "generation_num_beams": None,
        "generation_config": None, "include_inputs_for_metrics": False, "jit_mode_eval": False,
        "use_legacy_prediction_loop": False, "past_index": -1},
    "generation settings: they apply to evaluate_alignment.py": {
        "do_sample": True, "temperature": 0.95, "top_p": 0.7, "top_k": 50, "num_beams": 1, "max_length": 1024,
        "max_new_tokens": 1024, "repetition_penalty": 1.0, "length_penalty": 1.0, "skip_special_tokens": True},
    "trackers are TensorBoard and wandb (--report_to); SwanLab, Trackio and Ray are not supported": {
        "use_swanlab": False, "swanlab_project": "llamafactory", "swanlab_workspace": None, "swanlab_run_name": None,
        "swanlab_mode": "cloud", "swanlab_api_key": None, "swanlab_logdir": None, "swanlab_lark_webhook_url": None,
        "swanlab_lark_secret": None, "project": "huggingface", "trackio_space_id": None, "trackio_bucket_id": None,
        "trackio_static_space_id": None, "ray_run_name": None, "ray_storage_path": "./saves",
        "ray_storage_filesystem": None, "ray_num_workers": 1, "resources_per_worker": {"GPU": 1},
        "placement_strategy": "PACK", "ray_init_kwargs": None, "ray_scope": "last",
        "include_effective_tokens_per_second": False, "include_tokens_per_second": False},
    "the engine comes from the launcher: --deepspeed, or `accelerate launch --config_file` with an FSDP2 file "
    "(see README, Launching); the device is the GPU when there is one": {
        "fsdp": None, "fsdp_config": None, "accelerator_config": None, "parallelism_config": None, "ddp_backend": None,
        "ddp_find_unused_parameters": None, "ddp_bucket_cap_mb": None, "ddp_broadcast_buffers": None,
        "ddp_static_graph": None, "use_cpu": False, "no_cuda": False, "use_mps_device": False, "use_ipex": False,
        "tpu_num_cores": None, "mp_parameters": "", "tf32": None, "activation_checkpointing": None,
        "activation_checkpointing_kwargs": None, "gradient_checkpointing_kwargs": None, "auto_find_batch_size": False,
        "full_determinism": False, "debug": "", "torch_empty_cache_steps": None, "master_addr": None,
        "master_port": None},
    "logging is one line per --logging_steps on the main process, with NaN/Inf kept (the guard stops on them)": {
        "logging_strategy": "steps", "logging_first_step": False, "logging_nan_inf_filter": True,
        "log_on_each_node": True},
    "checkpoints are safetensors, written by the main process, resumed exactly (README, Checkpoints and resume)": {
        "save_safetensors": True, "save_on_each_node": False, "enable_jit_checkpoint": False,
        "ignore_data_skip": False, "restore_callback_states_from_checkpoint": False},
    "the torch profiler is not built in: profile with `python -m torch.profiler` or nsys around a short run": {
        "enable_torch_profiler": False, "profiler_output_dir": None, "profiler_wait_steps": 1,
        "profiler_warmup_steps": 1, "profiler_active_steps": 1, "profiler_repeat": 1, "profiler_record_shapes": True,
        "profiler_profile_memory": True, "profiler_with_stack": True, "profile_modules": None},
    "the main process tokenizes and hands its result to the others; a rank that does not see it (no shared file "
    "system) tokenizes itself, so this changes nothing": {"data_shared_file_system": ANY},
    "no effect here: these only change LLaMA-Factory's console or loading memory": {
        "low_cpu_mem_usage": ANY, "offload_folder": ANY, "use_reentrant_gc": ANY, "log_level": ANY,
        "log_level_replica": ANY, "disable_tqdm": ANY, "skip_memory_metrics": ANY},
    "the data loader builds micro-batches in the main process: set the other loader settings only with "
    "dataloader_num_workers": {
        "dataloader_pin_memory": ANY, "dataloader_persistent_workers": False, "dataloader_prefetch_factor": None,
        "dataloader_multiprocessing_context": None, "dataloader_in_order": True},
}
LF_KEY_DEFAULTS = {key: default for keys in LF_KEY_FATES.values() for key, default in keys.items()}
LF_KEY_REASONS = {key: reason for reason, keys in LF_KEY_FATES.items() for key in keys}
# evaluate_alignment.py: keys of LLaMA-Factory's predict configs that change nothing in an evaluation here. The other
# training keys are refused there unless at the training scripts' default (evaluation does not train).
EVAL_KEY_FATES = {
    "evaluation always generates the answers and scores them; the model's training stage and method do not change "
    "that (a LoRA adapter is --adapter_name_or_path)": {
        "stage": ANY, "do_predict": ANY, "predict_with_generate": ANY, "finetuning_type": ANY, "do_train": False},
    "evaluation tokenizes in its own processes and keeps no cache: these change nothing": {
        "overwrite_cache": ANY, "preprocessing_num_workers": ANY, "preprocessing_batch_size": ANY,
        "dataloader_num_workers": ANY, "tokenized_path": ANY},
    "evaluation does not train: these change nothing": {
        "gradient_checkpointing": ANY, "disable_gradient_checkpointing": ANY},
}
TRAINING_ONLY = "a training setting: evaluate_alignment.py does not train"


def lf_key_fates(parser):
    """{key: (accepted value or ANY, reason)} for the LLaMA-Factory keys that are not flags of this parser."""
    fates = {key: (default, LF_KEY_REASONS[key]) for key, default in LF_KEY_DEFAULTS.items()}
    if parser.evaluation:
        training = build_parser("", "sft_pg")
        fates.update({key: (training.get_default(key), TRAINING_ONLY) for key in training.flag_names})
        fates.update({key: (value, reason) for reason, keys in EVAL_KEY_FATES.items() for key, value in keys.items()})
    return {key: fate for key, fate in fates.items() if key not in parser.flag_names}


def add_lf_keys(parser):
    """Hidden flags for the LLaMA-Factory keys this script does not honour, so that `--packing False` and
    `packing: false` are accepted; their values are checked by check_lf_keys. Values parse as in config files."""
    parser.lf_fates = lf_key_fates(parser)
    group = parser.add_argument_group("LLaMA-Factory keys accepted only at their default (README table)")
    for key in parser.lf_fates:
        group.add_argument(f"--{key}", type=yaml_value, nargs="?", const=True, default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)


def same_value(value, default):
    """A given value equals LLaMA-Factory's default (2 == 2.0; a list or mapping given as JSON text)."""
    if isinstance(value, str) and isinstance(default, (list, dict)):
        value = yaml_value(value)
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return float(value) == float(default)
    return value == default


def check_lf_keys(args, fates, sources):
    """Refuse a LLaMA-Factory key this script does not honour unless it is at the accepted value (fates, from
    lf_key_fates); then drop it from the arguments (it changes nothing)."""
    for key, (accepted, reason) in fates.items():
        if key not in vars(args):
            continue
        value = vars(args).pop(key)
        if accepted is not ANY and not any(same_value(value, a) for a in (
                accepted if isinstance(accepted, tuple) else (accepted,))):
            where = f"{sources[key]}: " if key in sources else ""
            raise UserError(f"{where}{key} {value}: {reason} (accepted only at {accepted_text(accepted)})")


def accepted_text(accepted):
    """The accepted value(s) of a LLaMA-Factory key as written in a config file."""
    return " or ".join(json.dumps(value) for value in (accepted if isinstance(accepted, tuple) else (accepted,)))


def keys_table():
    """The README table: every LLaMA-Factory key (tests/lf_examples/lf_keys.txt) and its fate in the training
    scripts and in evaluate_alignment.py, read from their parsers and LF_KEY_FATES."""
    import evaluate_alignment
    import train_dpo_pg

    parsers = {"train_sft_pg.py": build_parser("", "sft_pg"),
               "train_dpo_pg.py": train_dpo_pg.add_dpo_flags(build_parser("", "dpo_pg")),
               "evaluate_alignment.py": evaluate_alignment.build_parser()}
    for parser in parsers.values():
        add_lf_keys(parser)
    keys = [line.strip() for line in Path(__file__).with_name("tests").joinpath("lf_examples", "lf_keys.txt")
            .read_text().splitlines() if line.strip() and not line.startswith("#")]
    reasons = {}  # reason -> its number in the notes below the table
    rows = ["| LLaMA-Factory key | " + " | ".join(parsers) + " |", "|---" * (len(parsers) + 1) + "|"]
    for key in keys:
        cells = []
        for parser in parsers.values():
            if key not in parser.lf_fates:
                cells.append("honoured")
                continue
            accepted, reason = parser.lf_fates[key]
            number = reasons.setdefault(reason, len(reasons) + 1)
            shown = "any value" if accepted is ANY else f"`{accepted_text(accepted)}` only"
            cells.append(f"{shown} ({number})")
        rows.append(f"| `{key}` | " + " | ".join(cells) + " |")
    notes = [f"{number}. {reason}" for reason, number in reasons.items()]
    return "\n".join(rows + [""] + notes) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--keys-table"]:
        raise SystemExit("usage: python arguments.py --keys-table  (prints the README's LLaMA-Factory key table)")
    print(keys_table(), end="")
