"""The argument layer of the training scripts: flags (names and meanings as LLaMA-Factory's), their types and the
checks that refuse what the scripts cannot honour, with a message that says what to do instead.

evaluate_alignment.py builds its own parser from the same pieces (Parser, flag, the checked types).
"""

import argparse
import importlib.util
import inspect
import json
import math
import warnings

import torch

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
    --output_dir that is or holds a model the run reads is refused here, before the scripts take its lock."""

    def error(self, message):
        raise UserError(message)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        check_output_dir_apart(parsed)
        return parsed


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


def build_parser(description, stage, default_lr):
    """The flags both scripts share; names and meanings follow the reference (LLaMA-Factory) commands."""
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
    flag(g, "--gradient_checkpointing", bool, default=False, help="recompute activations in backward to save memory")
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
    flag(g, "--optim", default="adamw_torch", choices=["adamw_torch", "sgd"],
         help="adamw_torch, or sgd (plain SGD, no momentum: for checks and debugging)")
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
    flag(g, "--logging_steps", POSITIVE_INT, default=10, help="log every N optimizer steps")
    flag(g, "--report_to", default="none", choices=["none", *TRACKERS, "all"],
         help="experiment trackers (through Accelerate); all: every installed one")
    flag(g, "--plot_loss", bool, default=False, help="write the loss curve as a PNG into OUTPUT_DIR")
    flag(g, "--include_num_input_tokens_seen", bool, default=False, help="log the number of input tokens seen")

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
    for name, default in NOT_YET_SUPPORTED.items():
        if getattr(args, name) != default:
            raise UserError(f"--{name} is not supported yet: leave it at {default}")
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
    args.resume_from_checkpoint = resolve_resume(args)
    if args.resume_from_checkpoint:
        check_resume_flags(args, args.resume_from_checkpoint)
    return args


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


# LLaMA-Factory keys that are parsed but whose behaviour is not built yet: refused unless at LLaMA-Factory's default.
NOT_YET_SUPPORTED = {}

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
