"""Setup shared by train_sft_pg.py and train_dpo_pg.py: flags, model, backend, OGPSA refresh, checkpoints, logs.

The training loops themselves live in the two scripts; this module holds what they would otherwise both copy.
"""

import argparse
import json
import math
import os
import random
import shutil
import socket
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import ogpsa_core
from data_utils import IGNORE_INDEX, TEMPLATES

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")


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
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("run")
    flag(g, "--stage", default=stage, help=f"training stage; this script runs '{stage}' (projection on) or "
                                           f"'{stage[:-3]}' (plain, --base_method must be none)")
    flag(g, "--do_train", bool, default=True, help="must be True: these scripts only train")
    flag(g, "--output_dir", required=True, help="where checkpoints, logs, plots and the final model go")
    flag(g, "--overwrite_output_dir", bool, default=False,
         help="start afresh even if OUTPUT_DIR holds checkpoints (otherwise refused unless resuming)")
    flag(g, "--seed", int, default=42, help="seed for the data order and dropout")
    flag(g, "--deepspeed", default=None, help="DeepSpeed JSON config ('auto' values are filled in from these flags)")
    flag(g, "--ddp_timeout", int, default=1800, help="timeout in seconds for collective operations")

    g = parser.add_argument_group("model")
    flag(g, "--model_name_or_path", required=True, help="hub id or local folder of a causal LM")
    flag(g, "--finetuning_type", default="full", help="only 'full' is implemented")
    flag(g, "--template", default=None, help=f"chat template for tokenizers without one ({', '.join(TEMPLATES)}); "
                                             "overrides the tokenizer's own")
    flag(g, "--flash_attn", default="auto", choices=["auto", "disabled", "sdpa", "fa2"],
         help="attention kernel: auto (transformers' default), disabled (eager), sdpa, fa2 (flash_attention_2)")
    flag(g, "--trust_remote_code", bool, default=False, help="allow model/tokenizer code from the hub")
    flag(g, "--gradient_checkpointing", bool, default=False, help="recompute activations in backward to save memory")

    g = parser.add_argument_group("data")
    flag(g, "--dataset_dir", default="data", help="folder with dataset_info.json and the data files")
    flag(g, "--dataset", required=True, help="comma-separated training datasets (dataset_info.json names, files or "
                                             "hub ids)")
    flag(g, "--cutoff_len", int, default=2048, help="maximum tokens per sequence (prompt + response)")
    flag(g, "--max_samples", int, default=None, help="use at most this many rows of each dataset")
    flag(g, "--preprocessing_num_workers", int, default=None, help="processes for tokenisation (large sets only)")

    g = parser.add_argument_group("optimisation")
    flag(g, "--learning_rate", float, default=default_lr, help="peak learning rate")
    flag(g, "--num_train_epochs", float, default=3.0, help="epochs (fractions allowed)")
    flag(g, "--max_steps", int, default=-1, help="optimizer steps; overrides --num_train_epochs when > 0")
    flag(g, "--per_device_train_batch_size", int, default=8, help="samples per micro-batch per process")
    flag(g, "--gradient_accumulation_steps", int, default=1, help="micro-batches per optimizer step")
    flag(g, "--lr_scheduler_type", default="linear", choices=SCHEDULERS, help="learning-rate schedule")
    flag(g, "--warmup_steps", int, default=0, help="linear warm-up steps")
    flag(g, "--warmup_ratio", float, default=0.0, help="warm-up as a fraction of all steps (if --warmup_steps is 0)")
    flag(g, "--optim", default="adamw_torch", choices=["adamw_torch", "sgd"],
         help="adamw_torch, or sgd (plain SGD, no momentum: for checks and debugging)")
    flag(g, "--weight_decay", float, default=0.0, help="decoupled weight decay (not on biases and norms)")
    flag(g, "--adam_beta1", float, default=0.9, help="AdamW beta1")
    flag(g, "--adam_beta2", float, default=0.999, help="AdamW beta2")
    flag(g, "--adam_epsilon", float, default=1e-8, help="AdamW epsilon")
    flag(g, "--max_grad_norm", float, default=1.0, help="clip the (projected) gradient to this norm; 0 disables")
    flag(g, "--bf16", bool, default=False, help="bfloat16 mixed precision (float32 master weights)")
    flag(g, "--fp16", bool, default=False, help="not supported: use --bf16")

    g = parser.add_argument_group("saving and logging")
    flag(g, "--save_strategy", default="steps", choices=["steps", "epoch", "no"], help="when to write checkpoints")
    flag(g, "--save_steps", int, default=500, help="checkpoint every N optimizer steps (--save_strategy steps)")
    flag(g, "--save_total_limit", int, default=None, help="keep only the newest N checkpoints")
    flag(g, "--save_only_model", bool, default=False,
         help="checkpoints hold only the model (no optimizer, scheduler, RNG, OGPSA basis): cannot be resumed")
    flag(g, "--resume_from_checkpoint", default=None,
         help="checkpoint folder to resume from, or True for the newest in OUTPUT_DIR")
    flag(g, "--logging_steps", int, default=10, help="log every N optimizer steps")
    flag(g, "--report_to", default="none", choices=["none", "tensorboard", "wandb", "all"],
         help="experiment trackers (through Accelerate)")
    flag(g, "--plot_loss", bool, default=False, help="write the loss curve as a PNG into OUTPUT_DIR")
    flag(g, "--include_num_input_tokens_seen", bool, default=False, help="log the number of input tokens seen")

    g = parser.add_argument_group("OGPSA (orthogonal gradient projection)")
    flag(g, "--base_dataset", default=None, help="comma-separated general-capability reference sets")
    flag(g, "--base_num_samples", int, default=200, help="reference samples per set (a smaller set is used whole)")
    flag(g, "--base_num_steps", int, default=30, help="recompute the basis every N optimizer steps "
                                                      "(and once before training)")
    flag(g, "--base_method", default="orthogonal_projection", choices=list(ogpsa_core.METHODS),
         help="none (plain training), orthogonal_projection (g -= U U^T g), or threshold (remove only components "
              "that conflict with a reference gradient; scale g by --base_scale where none does)")
    flag(g, "--base_scale", float, default=1.0, help="threshold method: factor for gradients with no conflict")
    flag(g, "--base_threshold", float, default=0.0,
         help="drop basis directions whose singular value (svd) or residual norm (qr) is below this fraction of "
              "the largest; 0 keeps every numerically independent direction")
    flag(g, "--base_directions", int, default=1,
         help="directions per reference set: its samples are split into this many chunks, one direction each")
    flag(g, "--base_scope", default="per_param", choices=list(ogpsa_core.SCOPES),
         help="per_param: one basis per parameter tensor (reference semantics); global: one basis over all")
    flag(g, "--base_basis", default="qr", choices=list(ogpsa_core.BASES),
         help="qr: Gram-Schmidt in set order; svd: principal directions")
    flag(g, "--base_dtype", default="float32", choices=["float32", "bfloat16"], help="storage dtype of the basis")
    flag(g, "--base_project_update", bool, default=False,
         help="also project the parameter update after the optimizer step, so the step itself is orthogonal to the "
              "basis (AdamW rescales each coordinate, so a projected gradient does not give an orthogonal update); "
              "not in the paper; single process and DDP; holds a copy of the parameters")
    flag(g, "--base_batch_size", int, default=None,
         help="micro-batch size for reference gradients (default: --per_device_train_batch_size)")
    return parser


def check_args(args, stage):
    """Refuse flag values these scripts cannot honour, with a message that says what to do instead."""
    plain_stage = stage[:-3]
    if args.stage not in (stage, plain_stage):
        raise SystemExit(f"--stage {args.stage} is not run by this script: it runs '{stage}' (or '{plain_stage}' "
                         "without projection)")
    if args.stage == plain_stage and args.base_method != "none":
        raise SystemExit(f"--stage {plain_stage} trains without projection: pass --base_method none, or use "
                         f"--stage {stage}")
    if not args.do_train:
        raise SystemExit("--do_train False: these scripts only train (evaluation is not implemented)")
    if args.finetuning_type != "full":
        raise SystemExit(f"--finetuning_type {args.finetuning_type} is not implemented; only 'full' is")
    if args.fp16:
        raise SystemExit("--fp16 is not supported (loss scaling is not implemented); use --bf16")
    if args.base_method != "none" and not args.base_dataset:
        raise SystemExit(f"--base_method {args.base_method} needs --base_dataset (the reference sets)")
    if args.base_num_steps < 1 or args.base_directions < 1 or args.base_num_samples < 1:
        raise SystemExit("--base_num_steps, --base_directions and --base_num_samples must be at least 1")
    if args.base_scale != 1.0 and args.base_method != "threshold":
        raise SystemExit("--base_scale only applies to --base_method threshold")
    if args.base_project_update and args.base_method != "orthogonal_projection":
        raise SystemExit("--base_project_update needs --base_method orthogonal_projection")
    if args.report_to == "all":
        args.report_to = "tensorboard,wandb"
    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise SystemExit("set --num_train_epochs or --max_steps to a positive value")
    args.base_batch_size = args.base_batch_size or args.per_device_train_batch_size
    args.resume_from_checkpoint = resolve_resume(args)
    return args


def resolve_resume(args):
    """The checkpoint to resume from, or None; refuses to silently overwrite an earlier run's checkpoints."""
    resume = args.resume_from_checkpoint
    if resume in (None, "", "False", "false"):
        if checkpoints(args.output_dir) and not args.overwrite_output_dir:
            raise SystemExit(f"{args.output_dir} already holds checkpoints: pass --resume_from_checkpoint True to "
                             "continue, or --overwrite_output_dir True to start afresh")
        return None
    if resume in ("True", "true", "latest"):
        found = checkpoints(args.output_dir)
        if not found:
            raise SystemExit(f"--resume_from_checkpoint {resume}: no checkpoint in {args.output_dir}")
        return str(found[-1])
    if not Path(resume, "trainer_state.json").is_file():
        raise SystemExit(f"--resume_from_checkpoint {resume}: not a complete checkpoint (no trainer_state.json)")
    return resume


def prepare_output_dir(args, accelerator):
    """Create OUTPUT_DIR; a fresh run with --overwrite_output_dir removes the checkpoints an earlier run left."""
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        if not args.resume_from_checkpoint:
            for old in checkpoints(args.output_dir):
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def checkpoints(output_dir):
    """Complete checkpoints in OUTPUT_DIR, oldest first (partial ones are never renamed into place)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


# ---------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------

def make_accelerator(args):
    """Accelerate with gloo on machines without a GPU, so the same launch configs work with CPU processes."""
    from accelerate import Accelerator, DeepSpeedPlugin, InitProcessGroupKwargs
    from accelerate.utils import DistributedType

    config, stage = deepspeed_file_config(args)
    if stage == 0:  # ZeRO stage 0 is plain data parallelism: run it as DDP (the whole reduced gradient per rank)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
    plugin = DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=stage == 3) if config and stage else None
    use_deepspeed = plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if use_deepspeed and "LOCAL_RANK" not in os.environ:  # `python script.py --deepspeed ...`: one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    distributed = use_deepspeed or int(os.environ.get("WORLD_SIZE", "1")) > 1
    process_group = ("nccl" if torch.cuda.is_available() else "gloo") if distributed else None
    handlers = [InitProcessGroupKwargs(backend=process_group, timeout=timedelta(seconds=args.ddp_timeout))]
    trackers = None if args.report_to == "none" else args.report_to.split(",")
    # cpu=True is what makes Accelerate start DDP over gloo without a GPU (DeepSpeed starts its own group).
    # Under DeepSpeed the engine, not Accelerate, accumulates gradients; it must know the accumulation steps.
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else None, log_with=trackers,
                              project_dir=args.output_dir, kwargs_handlers=handlers, deepspeed_plugin=plugin,
                              gradient_accumulation_steps=args.gradient_accumulation_steps if use_deepspeed else 1,
                              cpu=not torch.cuda.is_available() and not use_deepspeed)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, args, accelerator.num_processes)
    elif stage == 0:
        accelerator.print("DeepSpeed ZeRO stage 0 is plain data parallelism: running it as DDP")
    if trackers:
        accelerator.init_trackers(Path(args.output_dir).name, config=json_safe(vars(args)))
    return accelerator


def deepspeed_file_config(args):
    """(config, ZeRO stage) from --deepspeed or `accelerate launch`'s DeepSpeed settings; (None, None) without."""
    path = args.deepspeed
    if path is None and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
        if path == "none":  # settings written inline in the accelerate YAML: Accelerate builds the config
            return None, int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))
    if path is None:
        return None, None
    if not Path(path).is_file():
        raise SystemExit(f"--deepspeed {path}: no such file")
    try:
        config = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise SystemExit(f"DeepSpeed config {path}: not valid JSON ({err})") from None
    return config, config.get("zero_optimization", {}).get("stage", 0)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def configure_deepspeed(config, args, world_size):
    """Fill the DeepSpeed config's "auto" values from the flags; refuse settings OGPSA cannot honour."""
    def fill(key, value, flag_name):
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise SystemExit(f"DeepSpeed config sets {key}={config[key]} but {flag_name} gives {value}: make them "
                             "agree (or set it to \"auto\")")

    fill("train_micro_batch_size_per_gpu", args.per_device_train_batch_size, "--per_device_train_batch_size")
    fill("gradient_accumulation_steps", args.gradient_accumulation_steps, "--gradient_accumulation_steps")
    fill("train_batch_size", args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size,
         "per-device batch x accumulation x processes")
    fill("gradient_clipping", args.max_grad_norm, "--max_grad_norm")
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage", 0) not in (1, 2, 3):
        raise SystemExit(f"DeepSpeed zero_optimization.stage {zero.get('stage', 0)}: use 0 (run as DDP), 1, 2 or 3")
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") not in ("none", "cpu", None):
            raise SystemExit(f"DeepSpeed zero_optimization.{key}.device {zero[key]['device']} is not supported with "
                             "OGPSA: NVMe offload swaps the gradient partitions to disk, where the projection cannot "
                             "reach them; use \"cpu\"")
    for key in ("zero_quantized_gradients", "zero_quantized_weights"):
        if zero.get(key):
            raise SystemExit(f"DeepSpeed zero_optimization.{key} (ZeRO++) is not supported with OGPSA: it quantizes "
                             "what is communicated, and its kernels do not run on the CPU where the projection's "
                             "exactness is tested; remove it")
    if zero.get("zero_hpz_partition_size", 1) > 1:
        raise SystemExit("DeepSpeed zero_optimization.zero_hpz_partition_size (ZeRO++ hierarchical partitioning) is "
                         "not supported with OGPSA: untested; remove it")
    if zero.get("offload_optimizer", {}).get("device") == "cpu":
        # With optimizer offload DeepSpeed takes the clip norm during backward, before the projection runs: the
        # backend clips the projected gradient itself, so DeepSpeed must not clip again.
        config["gradient_clipping"] = 0.0
        if args.optim == "sgd":  # else Accelerate swaps any optimizer for DeepSpeedCPUAdam (AdamW: the same update)
            config["zero_force_ds_cpu_optimizer"] = False
    if config.get("fp16", {}).get("enabled") is True:
        raise SystemExit("DeepSpeed fp16.enabled is not supported: use bf16 (--bf16 True)")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise SystemExit(f"DeepSpeed config has a '{key}' section: the scripts build the optimizer and the "
                             "schedule from their flags; remove it")
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save", "auto") == "auto":
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # checkpoints hold the whole model


def json_safe(config):
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in config.items()}


def load_model(path, args):
    from transformers import AutoModelForCausalLM

    attention = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}[args.flash_attn]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention,
                                                 trust_remote_code=args.trust_remote_code)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_tokenizer(path, args):
    from transformers import AutoTokenizer

    from data_utils import apply_template

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    apply_template(tokenizer, args.template)
    return tokenizer


def build_optimizer(model, args):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optim == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon)


def build_scheduler(optimizer, args, total_steps):
    from transformers import get_scheduler

    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def total_optimizer_steps(args, steps_per_epoch):
    return args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)


# ---------------------------------------------------------------------------------------------------------------
# Backend: where backward runs and where the reduced gradient lives
# ---------------------------------------------------------------------------------------------------------------

# DeepSpeed zero_optimization keys that decide where each gradient entry lands on which rank, with DeepSpeed's
# defaults; the guard names those a config changes. The README's "DeepSpeed settings" says which are supported.
PARTITION_KEYS = {"round_robin_gradients": False, "overlap_comm": False, "contiguous_gradients": True,
                  "reduce_scatter": True, "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8,
                  "use_multi_rank_bucket_allreduce": True, "stage3_param_persistence_threshold": 1e5,
                  "sub_group_size": 1e9, "stage3_max_live_parameters": 1e9, "offload_optimizer": None,
                  "offload_param": None}
# Guard tolerances. Norms: both sides sum the same stored gradient values in float32 or wider, only in another
# order, which moves a norm by ~1e-6 relative; a projection that edits memory the optimizer does not read moves it
# by the share it edited (6% with the round_robin_gradients bug). Cosine after projection, by the coarser dtype of
# the basis and the gradient: float32 rounding leaves ~1e-6; bfloat16 keeps 8 significant bits, and its rounding
# left up to 2e-3 (ZeRO-3 with bfloat16 gradient accumulation; the limit is 4 x 2^-8); the round_robin_gradients
# bug left 0.09-0.18.
GUARD_NORM_RTOL = 1e-3
GUARD_MAX_COS = {torch.float32: 1e-3, torch.bfloat16: 4 * 2.0 ** -8}

class Backend:
    """Single process or DDP through Accelerate. Gradients live in one flat buffer (see ReplicatedGradSlice).

    The training loop calls, per optimizer step: `micro_batch(sync)` + `backward(loss)` for each micro-batch
    (sync=True on the last one, where DDP reduces), then projects `grad_slice`, then `clip_and_step(max_norm)`.
    """

    sharded_optimizer = False  # the optimizer state is the same on every rank: rank 0 saves it

    def __init__(self, accelerator, model, optimizer):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grad_slice = ogpsa_core.ReplicatedGradSlice(self.params)
        self.scheduled_optimizer = optimizer
        self._params_before = None

    def micro_batch(self, sync):
        """Context for one micro-batch's forward and backward; gradients are reduced across ranks only if sync."""
        return nullcontext() if sync else self.accelerator.no_sync(self.model)

    def backward(self, loss):
        self.accelerator.backward(loss)

    def clip_and_step(self, max_norm):
        """Clip (if max_norm > 0), step, zero the gradient; returns the norm before clipping (a tensor: reading it
        would wait for the device, so the loop reads it only when it logs)."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))
        self.optimizer.step()
        self.zero_grad()
        return norm

    def zero_grad(self):
        self.grad_slice.zero_()

    def stepped_norm(self, stats, clip_norm):
        """(the projected gradient's norm as the projection computed it, the norm clipping took of the gradient
        the optimizer stepped with)."""
        return stats.grad_norm_projected, float(clip_norm)

    def check_projection(self, stats, clip_norm, projector):
        """Guard against a silently wrong projection (run on the first step and on every logging step).

        Three independent checks: the gradient the projection edited has the norm the optimizer's clipping found
        (else the projection edited other memory than the optimizer read); it is orthogonal to the basis; and
        each parameter's float32 master entries, read through the projection's coordinates, equal the
        parameter's values (else the coordinates map entries to the wrong parameters).
        """
        ours, stepped = self.stepped_norm(stats, clip_norm)
        if not (math.isfinite(ours) and math.isfinite(stepped)):
            return  # a non-finite gradient is not a mapping problem
        problems = []
        if abs(ours - stepped) > GUARD_NORM_RTOL * max(ours, stepped):
            problems.append(f"the projected gradient's norm is {ours:.6g} but the optimizer stepped with one of "
                            f"norm {stepped:.6g}")
        coarsest = min(projector.dtype, self.grad_slice.dtype, key=lambda dtype: torch.finfo(dtype).bits)
        if projector.method == "orthogonal_projection" and stats.max_abs_cos > GUARD_MAX_COS[coarsest]:
            problems.append(f"after projection the gradient still has cosine {stats.max_abs_cos:.3g} with the basis")
        misplaced = self.grad_slice.misplaced_params(self.params)
        count = self.grad_slice.reduce_(torch.tensor(float(len(misplaced)), device=self.grad_slice.device))
        if count.item():
            problems.append(f"{int(count.item())} parameter pieces are not where the projection's coordinates put "
                            f"them (on this rank: parameters {misplaced[:5]})")
        if problems:
            settings = ", ".join(f"{k}={v}" for k, v in getattr(self, "partition_settings", {}).items())
            raise SystemExit("OGPSA guard: the projection does not act on the gradient the optimizer steps with: "
                             + "; ".join(problems) + ". "
                             + (f"Likely cause: the DeepSpeed zero_optimization settings that move gradient "
                                f"partitions ({settings}); set them to their defaults one at a time, and report "
                                "which one it is. " if settings else "")
                             + "Stopped so that no silently wrong model is trained.")

    @torch.no_grad()
    def snapshot_parameters(self):
        """Keep the parameters before a step, flat in the gradient buffer's layout, for `project_update_`."""
        if self._params_before is None:
            self._params_before = torch.empty_like(self.grad_slice.flat)
        torch.cat([p.reshape(-1) for p in self.params], out=self._params_before)

    @torch.no_grad()
    def project_update_(self, projector, diagnostics=False):
        """theta <- before + P(theta - before), `before` from `snapshot_parameters`: the step's parameter change is
        staged in the gradient buffer (free after the step) and projected there. Returns the projection's stats
        on diagnostic steps."""
        before, change = self._params_before, self.grad_slice.flat
        torch.cat([p.reshape(-1) for p in self.params], out=change).sub_(before)
        stats = projector.project_(diagnostics)
        before.add_(change)
        for param, segment in zip(self.params, self.grad_slice.segments):
            param.copy_(before[segment.start:segment.start + segment.length].view_as(param))
        self.zero_grad()
        return stats

    def optimizer_state(self):
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state):
        self.optimizer.load_state_dict(state)


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO-1/2/3: the engine reduces and partitions the gradient; each rank projects its partition.

    Accelerate's `backward` would also step the engine, so the engine is driven directly: boundary flag,
    `engine.backward`, (projection), `engine.step()`, which clips with the projected partition's norm. Under
    optimizer offload DeepSpeed takes that norm during backward, before the projection, so the backend clips the
    projected gradient itself and DeepSpeed's clipping is off (see `configure_deepspeed`).
    """

    sharded_optimizer = True

    def __init__(self, accelerator, engine, optimizer):
        from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

        self.accelerator, self.model, self.optimizer, self.engine = accelerator, engine, optimizer, engine
        self.zero = engine.optimizer
        self.scheduled_optimizer = self.zero.optimizer  # the torch optimizer ZeRO steps: the schedule sets its lr
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        if isinstance(self.zero, DeepSpeedZeroOptimizer_Stage3):
            self.grad_slice = ogpsa_core.Zero3GradSlice(self.zero, self.params)
        elif isinstance(self.zero, DeepSpeedZeroOptimizer):
            self.grad_slice = ogpsa_core.ZeroGradSlice(self.zero, self.params)
        else:
            raise SystemExit(f"DeepSpeed chose {type(self.zero).__name__}, whose gradient partitions OGPSA cannot "
                             "reach (ZeRO-1 with bf16 and float32 gradient accumulation does this): use ZeRO-2, or "
                             "set data_types.grad_accum_dtype to bf16")
        self.masters = [master for _, master in self.grad_slice.masters()]
        zero_config = accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
        self.partition_settings = {k: v for k, v in zero_config.items()
                                   if k in PARTITION_KEYS and v not in (PARTITION_KEYS[k], "auto")}

    def micro_batch(self, sync):
        self.engine.set_gradient_accumulation_boundary(sync)
        return nullcontext()

    def backward(self, loss):
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already normalised over the whole step

    def clip_and_step(self, max_norm):
        if not self.grad_slice.offload:
            self.engine.step()
            return torch.as_tensor(self.engine.get_global_grad_norm())
        norm = self.grad_slice.norm()
        if max_norm > 0:  # torch.nn.utils.clip_grad_norm_'s rule
            self.grad_slice.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        self.engine.step()
        return norm

    def stepped_norm(self, stats, clip_norm):
        """(the norm the guard compares, DeepSpeed's own norm of the gradient it stepped with): under offload
        DeepSpeed took its norm during backward, before the projection."""
        if self.grad_slice.offload:
            return stats.grad_norm, self.engine.get_global_grad_norm()
        return stats.grad_norm_projected, float(clip_norm)

    def zero_grad(self):
        """Forget a gradient that was read but not stepped (reference collection), as `step()` would."""
        self.zero.zero_grad(set_to_none=True)
        for cache in ("averaged_gradients", "all_grad_tensors"):
            for key in getattr(self.zero, cache, {}):
                getattr(self.zero, cache)[key] = None
        if isinstance(self.grad_slice, ogpsa_core.Zero3GradSlice):
            # The next backward overwrites the buffer only where a gradient arrives: clear it all.
            self.zero.grad_partitions_flat_buffer.zero_()
            self.zero.micro_step_id = 0
        else:
            self.zero.micro_step_id = -1  # as step() leaves it: the next backward starts a fresh accumulation
        if self.grad_slice.offload:  # the gradient step() would read, on the CPU
            for master in self.masters:
                if master.grad is not None:
                    master.grad.zero_()

    def optimizer_state(self):
        """This rank's float32 master partition and the state of the optimizer that updates it."""
        with self._base_optimizer_params():
            return {"masters": [m.detach() for m in self.masters], "base": self.zero.optimizer.state_dict()}

    def load_optimizer_state(self, state):
        for master, saved in zip(self.masters, state["masters"]):
            if master.shape != saved.shape:
                raise SystemExit("the checkpoint's ZeRO partitions do not fit this run: resume with the same "
                                 "number of processes and the same DeepSpeed config")
            master.data.copy_(saved)
        with self._base_optimizer_params():
            self.zero.optimizer.load_state_dict(state["base"])

    @contextmanager
    def _base_optimizer_params(self):
        """ZeRO-3 hands its float32 partitions to the torch optimizer only while stepping; do as its checkpoints do."""
        stage3 = isinstance(self.grad_slice, ogpsa_core.Zero3GradSlice)
        if stage3:
            self.zero._set_fp32_optimizer_param_groups()
        try:
            yield
        finally:
            if stage3:
                self.zero._clear_fp32_optimizer_param_groups()


def make_backend(accelerator, model, optimizer):
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return DeepSpeedBackend(accelerator, model, optimizer)
    return Backend(accelerator, model, optimizer)


def prepare_reference_model(accelerator, model):
    """A frozen model for DPO: like the policy under DDP; under ZeRO-3 sharded the same way (each forward
    gathers one layer at a time, never the whole model); under ZeRO-1/2 a full copy in the training precision."""
    from accelerate.utils import DistributedType

    model.requires_grad_(False).eval()
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return accelerator.prepare_model(model, evaluation_mode=True)
    import deepspeed

    config = {k: v for k, v in accelerator.state.deepspeed_plugin.deepspeed_config.items()
              if k in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "bf16",
                       "zero_optimization")}
    if config["zero_optimization"].get("stage") != 3:
        config["zero_optimization"] = {"stage": 0}
    engine = deepspeed.initialize(model=model, config=config)[0]
    engine.eval()
    return engine


# ---------------------------------------------------------------------------------------------------------------
# Losses shared by the scripts
# ---------------------------------------------------------------------------------------------------------------

def token_logps(model, batch):
    """Log-probability of every label token given its prefix: (B, T) float32, 0 where labels are ignored.

    Position t predicts token t + 1, so labels are shifted left by one instead of slicing the logits.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return -nll.view(labels.shape)


def response_nll_sum(model, batch):
    """Sum of the NLL of all response tokens in the batch (the SFT loss before normalisation)."""
    return -token_logps(model, batch).sum()


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------------
# OGPSA: reference sets and basis refresh
# ---------------------------------------------------------------------------------------------------------------

class ReferenceSet:
    """Reference samples plus how to batch them and which loss their gradient is taken of.

    loss_sum(model, batch) returns the loss summed over the batch's units (tokens or pairs); weight(example)
    is the number of units an example contributes, so every direction is the gradient of the mean over units.
    """

    def __init__(self, name, examples, collate, loss_sum, weight):
        self.name, self.examples, self.collate, self.loss_sum, self.weight = name, examples, collate, loss_sum, weight


def make_projector(args, backend):
    if args.base_method == "none":
        return None
    if args.base_project_update and backend.sharded_optimizer:
        raise SystemExit("--base_project_update is not supported under DeepSpeed: the update happens inside the "
                         "engine's step, on its float32 partitions; use one process or DDP")
    return ogpsa_core.Projector(backend.grad_slice, scope=args.base_scope, method=args.base_method,
                                basis=args.base_basis, threshold=args.base_threshold, scale=args.base_scale,
                                dtype=getattr(torch, args.base_dtype))


def refresh_basis(projector, backend, model, reference_sets, args, step, device):
    """Collect the reference directions with the training backend and rebuild the basis; leaves no trace.

    Each rank runs the same number of micro-batches (padding ones with zero weight), so collective backward
    passes stay in step. The random state is restored afterwards, and the gradient is zeroed.
    """
    accelerator = backend.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    plans = [(ref, chunk) for ref in reference_sets
             for chunk in ogpsa_core.reference_chunks(len(ref.examples), args.base_num_samples, args.base_directions)]
    directions = torch.empty(len(plans), backend.grad_slice.numel, dtype=torch.float32,
                             device=backend.grad_slice.device)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for k, (ref, chunk) in enumerate(plans):
            units = sum(ref.weight(ref.examples[i]) for i in chunk)
            batches = ogpsa_core.rank_micro_batches(chunk, rank, world, args.base_batch_size)
            for j, indices in enumerate(batches):
                scale = world / units if indices else 0.0
                batch = to_device(ref.collate([ref.examples[i] for i in (indices or chunk[:1])]), device)
                with backend.micro_batch(sync=j == len(batches) - 1):
                    backend.backward(ref.loss_sum(model, batch) * scale)
            ogpsa_core.read_gradient_(backend.grad_slice, directions[k])
            backend.zero_grad()
    projector.set_directions_(directions, step)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints (safetensors for tensors, JSON for the rest; written to a temporary folder, then renamed)
# ---------------------------------------------------------------------------------------------------------------

def _split_state(state, prefix=""):
    """Nested dict/list state -> (flat tensors for safetensors, JSON-able skeleton with tensor keys)."""
    tensors = {}

    def walk(node, key):
        if isinstance(node, torch.Tensor):
            tensors[key] = node.detach().contiguous().cpu()
            return {"__tensor__": key}
        if isinstance(node, dict):
            return {"__dict__": [[walk(k, f"{key}.k{i}"), walk(v, f"{key}.{i}")]
                                 for i, (k, v) in enumerate(node.items())]}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{key}.{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (int, float, str, bool)):
            return node
        raise TypeError(f"cannot checkpoint a {type(node).__name__} at {key}")

    return tensors, walk(state, prefix or "state")


def _join_state(skeleton, tensors):
    def walk(node):
        if isinstance(node, dict) and "__tensor__" in node:
            return tensors[node["__tensor__"]]
        if isinstance(node, dict):
            return {walk(k): walk(v) for k, v in node["__dict__"]}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(skeleton)


def save_state(state, folder, name):
    """Write a nested state as NAME.safetensors + NAME.json (never a pickle)."""
    tensors, skeleton = _split_state(state)
    save_file(tensors, str(Path(folder, f"{name}.safetensors")))
    Path(folder, f"{name}.json").write_text(json.dumps(skeleton))


def load_state(folder, name, device="cpu"):
    tensors = load_file(str(Path(folder, f"{name}.safetensors")), device=str(device))
    return _join_state(json.loads(Path(folder, f"{name}.json").read_text()), tensors)


def rng_state():
    state = {"python": list(random.getstate()), "numpy": list(np.random.get_state()),
             "torch": torch.get_rng_state()}
    state["python"][1] = list(state["python"][1])
    state["numpy"][1] = torch.from_numpy(state["numpy"][1].copy())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state((numpy[0], numpy[1].numpy(), *numpy[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(args, accelerator, model, tokenizer, backend, scheduler, projector, step, extra_state=None):
    """OUTPUT_DIR/checkpoint-STEP, written under a temporary name and renamed when complete.

    A run killed while saving leaves the previous checkpoints untouched; the newest complete one resumes.
    """
    output = Path(args.output_dir)
    final = output / f"checkpoint-{step}"
    partial = output / f".partial-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(partial, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(partial)
    if not args.save_only_model:
        if backend.sharded_optimizer or accelerator.is_main_process:
            save_state(backend.optimizer_state(), partial, optimizer_file(backend, accelerator.process_index))
        if accelerator.is_main_process:
            Path(partial, "scheduler.json").write_text(json.dumps(scheduler.state_dict()))
        save_state(rng_state(), partial, f"rng_state_{accelerator.process_index}")
        if projector is not None and (backend.grad_slice.sharded or accelerator.is_main_process):
            save_file(projector.state_dict(), str(partial / f"ogpsa_basis_{accelerator.process_index}.safetensors"))
        if extra_state:
            save_state(extra_state, partial, f"extra_state_{accelerator.process_index}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        trainer_state = {"global_step": step, "save_only_model": args.save_only_model,
                         "world_size": accelerator.num_processes, "args": json_safe(vars(args))}
        Path(partial, "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        _fsync_tree(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if args.save_total_limit:
            for old in checkpoints(output)[:-args.save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def optimizer_file(backend, rank):
    return f"optimizer_{rank}" if backend.sharded_optimizer else "optimizer"


def _fsync_tree(folder):
    for path in Path(folder).iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def load_checkpoint(folder, args, accelerator, backend, scheduler, projector, global_batch):
    """Restore optimizer, scheduler, RNG and the OGPSA basis; returns (step, extra_state)."""
    trainer_state = json.loads(Path(folder, "trainer_state.json").read_text())
    if trainer_state["save_only_model"]:
        raise SystemExit(f"{folder} was saved with --save_only_model True: it holds no optimizer, scheduler or RNG "
                         "state, so training cannot resume exactly. Start a new run from it with "
                         f"--model_name_or_path {folder} instead")
    saved = trainer_state["args"]
    saved_batch = saved["per_device_train_batch_size"] * trainer_state["world_size"] * \
        saved["gradient_accumulation_steps"]
    for name, now, then in [("global batch size (per-device batch x processes x accumulation)", global_batch,
                             saved_batch), ("--seed", args.seed, saved["seed"]),
                            ("--dataset", args.dataset, saved["dataset"])]:
        if now != then:
            raise SystemExit(f"cannot resume from {folder}: {name} was {then}, now {now}; the data order would "
                             "differ")
    if backend.sharded_optimizer and trainer_state["world_size"] != accelerator.num_processes:
        raise SystemExit(f"cannot resume from {folder}: it was saved by {trainer_state['world_size']} processes and "
                         "ZeRO shards the optimizer state and the OGPSA basis per process; resume with "
                         f"{trainer_state['world_size']} processes")
    backend.load_optimizer_state(load_state(folder, optimizer_file(backend, accelerator.process_index), "cpu"))
    scheduler.load_state_dict(json.loads(Path(folder, "scheduler.json").read_text()))
    rank = accelerator.process_index
    rng_file = Path(folder, f"rng_state_{rank}.json")
    if rng_file.is_file():
        set_rng_state(load_state(folder, f"rng_state_{rank}"))
    if projector is not None:
        basis_rank = rank if backend.grad_slice.sharded else 0
        basis_file = Path(folder, f"ogpsa_basis_{basis_rank}.safetensors")
        if not basis_file.is_file():
            raise SystemExit(f"cannot resume from {folder}: it has no OGPSA basis for rank {basis_rank} (was it "
                             "saved without projection, or with another number of processes?)")
        projector.load_state_dict(load_file(str(basis_file)))
    extra_file = Path(folder, f"extra_state_{rank}.json")
    extra = load_state(folder, f"extra_state_{rank}") if extra_file.is_file() else None
    return trainer_state["global_step"], extra


def save_final_model(args, accelerator, model, tokenizer):
    """Model (safetensors) and tokenizer into OUTPUT_DIR, each file moved into place whole."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        staging = Path(args.output_dir, ".partial-final-model")
        shutil.rmtree(staging, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(staging, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _fsync_tree(staging)
        for path in staging.iterdir():
            os.replace(path, Path(args.output_dir, path.name))
        staging.rmdir()
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------------

class MetricLog:
    """Per-interval metrics: local (sum, count) pairs kept on the device and reduced over ranks once per interval.

    Writes one line per interval (through tqdm), appends the record to OUTPUT_DIR/trainer_log.jsonl (which a
    fresh run starts anew and a resumed run cuts back to its step), and sends it to Accelerate's trackers.
    """

    def __init__(self, accelerator, args, total_steps, start_step):
        from tqdm.auto import tqdm

        self.accelerator, self.args = accelerator, args
        self.sums = {}
        self.path = Path(args.output_dir, "trainer_log.jsonl")
        if accelerator.is_main_process:
            kept = [line for line in (self.path.read_text().splitlines() if self.path.exists() else [])
                    if json.loads(line)["step"] <= start_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_main_process,
                        desc="training", dynamic_ncols=True)
        self.start = time.perf_counter()

    def add(self, name, total, count):
        """Add a local sum over `count` units (tokens, pairs) to the current interval (no device sync)."""
        old_total, old_count = self.sums.get(name, (0.0, 0))
        self.sums[name] = (old_total + total.detach().double(), old_count + count)

    def flush(self, step, extra):
        """Reduce the interval's sums, log a record with `extra` scalars, and reset."""
        names = sorted(self.sums)
        device = self.accelerator.device
        packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                              for n in names for v in self.sums[n]]) if names else torch.zeros(0, device=device)
        if self.accelerator.num_processes > 1 and len(names):
            packed = self.accelerator.reduce(packed, reduction="sum")
        record = {"step": step}
        for i, name in enumerate(names):
            total, count = packed[2 * i].item(), packed[2 * i + 1].item()
            record[name] = total / count if count else float("nan")
        record.update(extra)
        record["elapsed_s"] = round(time.perf_counter() - self.start, 2)
        self.sums = {}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items()}
            self.bar.write(" ".join(f"{k}={v}" for k, v in shown.items()))
        self.accelerator.log(record, step=step)
        return record

    def close(self):
        self.bar.close()


def step_record(args, accelerator, step, steps_per_epoch, learning_rate, grad_norm, stats, projector,
                refresh_seconds, tokens_seen, update_stats=None):
    """The scalars logged with an interval's metrics: schedule, gradient norms, projection diagnostics."""
    record = {"epoch": round(step / steps_per_epoch, 4), "learning_rate": learning_rate,
              "grad_norm": round(float(grad_norm), 6)}
    if stats is not None:  # grad_norm becomes the norm before projection; clipping saw grad_norm_projected
        record.update({k: round(v, 6) for k, v in asdict(stats).items()})
        record["basis_rank"] = int(projector.rank_per_unit.max())
    if update_stats is not None:  # --base_project_update: 1 - |projected step| / |optimizer step|
        record["update_removed_fraction"] = round(update_stats.removed_fraction, 6)
    if refresh_seconds is not None:
        record["refresh_s"] = round(refresh_seconds, 3)
    if args.include_num_input_tokens_seen:
        total = accelerator.reduce(tokens_seen.to(accelerator.device), "sum") if accelerator.num_processes > 1 \
            else tokens_seen
        record["num_input_tokens_seen"] = int(total.item())
    return record


def is_save_step(args, step, steps_per_epoch):
    return (args.save_strategy == "steps" and step % args.save_steps == 0) or \
        (args.save_strategy == "epoch" and step % steps_per_epoch == 0)


def finish_run(args, accelerator, model, tokenizer, metrics, step, plot_keys, summary_keys=()):
    """Save the final model, plot, write train_results.json, close trackers and the process group."""
    metrics.close()
    save_final_model(args, accelerator, model, tokenizer)
    if accelerator.is_main_process:
        if args.plot_loss:
            accelerator.print(f"loss curve: {plot_curves(args.output_dir, plot_keys)}")
        records = [json.loads(line) for line in Path(args.output_dir, "trainer_log.jsonl").read_text().splitlines()]
        first, last = (records[0], records[-1]) if records else ({}, {})
        summary = {"global_step": step, "train_loss": last.get("loss"), "train_runtime_s": last.get("elapsed_s")}
        for key in summary_keys:
            summary[f"first_{key}"], summary[f"last_{key}"] = first.get(key), last.get(key)
        write_json(Path(args.output_dir, "train_results.json"), summary)
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def plot_curves(output_dir, keys=("loss",)):
    """PNG of the logged curves (one panel per key) from trainer_log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(output_dir, "trainer_log.jsonl").read_text().splitlines()]
    keys = [k for k in keys if any(k in r for r in records)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        axis.plot(*zip(*points), marker=".")
        axis.set_xlabel("step")
        axis.set_title(key)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(output_dir, "training_loss.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(path, obj):
    """Write JSON atomically (temporary file, then rename)."""
    write_text_atomic(path, json.dumps(obj, indent=2))


def write_text_atomic(path, text):
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
