"""Setup shared by train_sft_pg.py and train_dpo_pg.py: accelerator and model, losses, logs and plots.

The training loops themselves live in the two scripts. The flags are in arguments.py, the method in ogpsa_core.py,
the backends (one process, DDP, DeepSpeed ZeRO, FSDP2) in backends.py, checkpoints in checkpoint.py, data in
data_utils.py.
"""

import copy
import json
import math
import os
import warnings
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F

import ogpsa_core
from backends import configure_deepspeed, describe_engine, enable_fsdp2
from checkpoint import (json_safe, verify_model_files,
                        write_json, write_text_atomic)
from data_utils import IGNORE_INDEX, apply_template
from run_guard import UserError, first_line


# ---------------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------------

def make_accelerator(args):
    """Accelerate with gloo on machines without a GPU, so the same launch configs work with CPU processes."""
    from accelerate import Accelerator, DeepSpeedPlugin, InitProcessGroupKwargs
    from accelerate.utils import DistributedType, ProjectConfiguration

    fsdp = launched_fsdp_version()
    if fsdp is not None and fsdp != 2:
        raise UserError("the Accelerate config asks for FSDP1 (fsdp_version 1, or none given), which OGPSA does not "
                        "support: set fsdp_version: 2 in its fsdp_config (FSDP2; the other keys carry over)")
    if fsdp and args.deepspeed:
        raise UserError(f"--deepspeed {args.deepspeed} with an FSDP Accelerate config: choose one engine")
    if fsdp and os.environ.get("FSDP_AUTO_WRAP_POLICY", "").upper() == "SIZE_BASED_WRAP":
        raise UserError("fsdp_auto_wrap_policy SIZE_BASED_WRAP is not supported: Accelerate's size-based policy wraps "
                        "the decoder's ModuleList, which fully_shard rejects; use TRANSFORMER_BASED_WRAP (or NO_WRAP)")
    check_launched_precision(args)
    config, stage = deepspeed_file_config(args)
    quiet_transformers_bars()
    if stage == 0:  # ZeRO stage 0 is plain data parallelism: run it as DDP (the whole reduced gradient per rank)
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
    plugin = DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=stage == 3) if config and stage else None
    use_deepspeed = plugin is not None or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if use_deepspeed:
        quiet_deepspeed_deprecations()
        announce_deepspeed_builds(config)
    else:
        hide_deepspeed_cpu_notice()
    if use_deepspeed and "LOCAL_RANK" not in os.environ:  # `python script.py --deepspeed ...`: one process
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    distributed = use_deepspeed or fsdp or int(os.environ.get("WORLD_SIZE", "1")) > 1
    process_group = ("nccl" if torch.cuda.is_available() else "gloo") if distributed else None
    handlers = [InitProcessGroupKwargs(backend=process_group, timeout=timedelta(seconds=args.ddp_timeout))]
    trackers = None if args.report_to == "none" else args.report_to.split(",")
    # cpu=True is what makes Accelerate start DDP over gloo without a GPU (DeepSpeed starts its own group).
    # Under DeepSpeed the engine, not Accelerate, accumulates gradients; it must know the accumulation steps.
    # TensorBoard writes to LOGGING_DIR/<project name>: with --logging_dir, exactly into --logging_dir.
    tracker_dir = Path(args.logging_dir or Path(args.output_dir, Path(args.output_dir).name))
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else None, log_with=trackers,
                              project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                                  logging_dir=str(tracker_dir.parent)),
                              kwargs_handlers=handlers, deepspeed_plugin=plugin,
                              gradient_accumulation_steps=args.gradient_accumulation_steps if use_deepspeed else 1,
                              cpu=not torch.cuda.is_available() and not use_deepspeed)
    if fsdp and accelerator.distributed_type != DistributedType.FSDP:  # CPU processes: never DDP instead
        enable_fsdp2(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, args, accelerator.num_processes)
    elif stage == 0:
        accelerator.print("DeepSpeed ZeRO stage 0 is plain data parallelism: running it as DDP")
    accelerator.print(f"engine: {describe_engine(accelerator)}")
    if trackers:
        accelerator.init_trackers(tracker_dir.name, config=json_safe(vars(args)),
                                  init_kwargs={"wandb": {"name": args.run_name}} if args.run_name else {})
    return accelerator


def launched_fsdp_version():
    """The FSDP version an `accelerate launch` config (distributed_type FSDP) asks for; None without FSDP."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    return int(os.environ.get("FSDP_VERSION", "1"))


def check_fsdp_wrap_classes(model):
    """Refuse an FSDP config whose fsdp_transformer_layer_cls_to_wrap names a class that is not one of the model's
    modules, naming the model's decoder-layer class: Accelerate looks the names up only when it shards the model
    (after loading, on every rank) and stops with a traceback. As Accelerate reads it: FSDP_TRANSFORMER_CLS_TO_WRAP,
    set by `accelerate launch` from the config, split at commas as written, used under TRANSFORMER_BASED_WRAP only
    (without it Accelerate wraps the model's `_no_split_modules`, which transformers names)."""
    names = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")
    if launched_fsdp_version() is None or names is None or \
            os.environ.get("FSDP_AUTO_WRAP_POLICY", "").upper() != "TRANSFORMER_BASED_WRAP":
        return
    classes = {type(module).__name__ for module in model.modules()}
    missing = [name for name in names.split(",") if name not in classes]
    if not missing:
        return
    layers = ",".join(getattr(model, "_no_split_modules", None) or [])
    fix = (f"its decoder layer is {layers}: set fsdp_transformer_layer_cls_to_wrap: {layers} (or leave it out, and "
           "Accelerate wraps that)") if layers else \
        "name one of its module classes, or use fsdp_auto_wrap_policy NO_WRAP"
    raise UserError(f"the Accelerate config's fsdp_transformer_layer_cls_to_wrap names "
                    f"{', '.join(repr(name) for name in missing)}, which is no class of the model "
                    f"({type(model).__name__}); {fix}")


def check_launched_precision(args):
    """--bf16 decides the precision; refuse an Accelerate config (or `accelerate launch --mixed_precision`) that
    asks for another, which Accelerate would otherwise apply while the run records --bf16 False."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launched == "no" or (launched == "bf16" and args.bf16):
        return
    if launched == "bf16":
        raise UserError("the Accelerate config sets mixed_precision: bf16 but --bf16 is not set: pass --bf16 True "
                        "(or launch with --mixed_precision no for float32)")
    raise UserError(f"the Accelerate config sets mixed_precision: {launched}, which is not supported: use "
                    "mixed_precision bf16 with --bf16 True, or no")


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
        raise UserError(f"--deepspeed {path}: no such file")
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise UserError(f"DeepSpeed config {path}: not valid JSON ({err})") from None
    # Refuse what the config gets wrong now, on a copy, rather than once DeepSpeed has started (half a minute or
    # more); the same function fills the real config once Accelerate has read it.
    configure_deepspeed(copy.deepcopy(config), args, int(os.environ.get("WORLD_SIZE", "1")))
    return config, config.get("zero_optimization", {}).get("stage", 0)


def quiet_transformers_bars():
    """transformers draws a progress bar each time it loads or writes a model (every checkpoint): they fill a log.
    Turn off transformers' own bars only; downloads from the hub keep theirs."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))


def hide_deepspeed_cpu_notice():
    """Without DeepSpeed, Accelerate still imports it when it unwraps a model (to test for DeepSpeed's engine), and
    DeepSpeed then warns "Setting accelerator to CPU" on a machine without a GPU, in the middle of the progress bar.
    Hide exactly that warning (a filter on DeepSpeed's logger, which keeps it when DeepSpeed sets it up)."""
    import logging

    logging.getLogger("DeepSpeed").addFilter(
        lambda record: not record.getMessage().startswith("Setting accelerator to CPU"))


def quiet_deepspeed_deprecations():
    """DeepSpeed's ZeRO-3 calls torch.distributed's reduce_scatter_tensor and all_gather_into_tensor, which torch
    2.13 deprecates with a FutureWarning on every call (about 2000 in 3 steps of the tiny model); hide exactly
    those two."""

    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` "
                                              r"is deprecated", category=FutureWarning)


def announce_deepspeed_builds(config):
    """Say so before DeepSpeed compiles an op on first use (about a minute, silent): its shared-memory
    communication op on machines without a GPU, its CPU Adam under optimizer offload. Main process only."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from deepspeed.git_version_info import installed_ops  # ops compiled when DeepSpeed was installed
    from torch.utils.cpp_extension import _get_build_directory

    offload = (config or {}).get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu" or \
        os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE") == "cpu"
    ops = (["deepspeed_shm_comm"] if not torch.cuda.is_available() else []) + (["cpu_adam"] if offload else [])
    for op in ops:
        if not installed_ops.get(op) and not Path(_get_build_directory(op, verbose=False), f"{op}.so").is_file():
            print(f"building DeepSpeed's {op} op once (about a minute; cached for later runs)", flush=True)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_model_path(path, flag, tokenizer=False, training=True):
    """Refuse a local folder without a model or with a damaged weights file (checked when the tokenizer loads from it,
    before the data), and say plainly when a path is neither a folder nor a hub id; `flag` names it in messages. The
    tokenizer of a LoRA checkpoint or adapter folder needs no model weights there. training: the messages name the
    training scripts' flags, else evaluate_alignment.py's."""
    folder = Path(path)
    is_adapter = (folder / "adapter_config.json").is_file()
    if folder.is_dir():
        if is_adapter and tokenizer:
            return
        if not (folder / "config.json").is_file() and is_adapter:
            raise UserError(f"{flag} {path}: a LoRA adapter, not a model; " + (
                f"pass its base model as --model_name_or_path and --finetuning_type lora --adapter_name_or_path {path} "
                "(or its merged export, --export_merged True)" if training else
                f"pass its base model as --model_name_or_path and --adapter_name_or_path {path} (or the training run's "
                f"merged export, {folder / 'merged'}, where it wrote one, as --model_name_or_path)"))
        if not (folder / "config.json").is_file():
            raise UserError(f"{flag} {path}: the folder has no config.json; is it a model folder?")
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise UserError(f"{flag} {path}: the folder has a config.json but no weights (*.safetensors or "
                            "*.bin); was the model saved completely?")
        verify_model_files(folder, flag)
    elif folder.exists():
        raise UserError(f"{flag} {path}: a file, not a model folder")
    elif str(path).startswith((".", "/", "~")) or str(path).count("/") > 1:  # not a hub id either
        raise UserError(f"{flag} {path}: no such folder")


def model_flag(path, args):
    """The flag that names the model folder `path` (for messages)."""
    return next((f"--{name}" for name in ("model_name_or_path", "ref_model", "resume_from_checkpoint", "base_model")
                 if str(getattr(args, name, None)) == str(path)), "model")


def from_pretrained(load, path, what, args, **kwargs):
    """`load(path)` (a transformers from_pretrained of the `what`, model or tokenizer), with a missing or unreachable
    model as a UserError."""
    check_model_path(path, model_flag(path, args), tokenizer=what == "tokenizer",
                     training=getattr(args, "finetuning_type", None) is not None)  # evaluate_alignment.py has none
    try:
        return load(path, **kwargs)
    except (OSError, ValueError) as err:  # not on the hub, no network, not a valid hub id
        if Path(path).is_dir():
            raise
        raise UserError(f"cannot load the {what} {path}: no such local folder, and not loadable from the hub "
                        f"({first_line(err)})") from None


def resize_embeddings(model, vocab_size, seed):
    """Grow the embeddings (and an untied output layer) to `vocab_size` rows, padded to a multiple of 64, as
    LLaMA-Factory's --resize_vocab does: each new row is the mean of the old rows plus Gaussian noise of standard
    deviation 1/sqrt(hidden size), drawn from `seed` (the policy and the DPO reference get the same rows)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # the weights are already partitioned across ranks
        raise UserError("--resize_vocab under ZeRO-3 is not supported: use ZeRO-2, or a template whose tokens the "
                        "tokenizer has")
    old_size = model.get_input_embeddings().weight.size(0)
    model.resize_token_embeddings(vocab_size, pad_to_multiple_of=64, mean_resizing=False)
    new_size = model.get_input_embeddings().weight.size(0)
    weights = [model.get_input_embeddings().weight]
    if not model.config.tie_word_embeddings:
        weights.append(model.get_output_embeddings().weight)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for weight in weights:
            noise = torch.randn(new_size - old_size, weight.size(1), dtype=torch.float32) / math.sqrt(weight.size(1))
            weight[old_size:] = (weight[:old_size].float().mean(dim=0, keepdim=True) + noise).to(weight.dtype)
    model.config.vocab_size = new_size


def load_model(path, args, dtype=torch.float32, vocab_size=None):
    """The causal LM at `path`; with --resize_vocab, its embeddings grown to `vocab_size` (the tokenizer's length)."""
    from transformers import AutoModelForCausalLM

    attention = {"auto": None, "disabled": "eager", "sdpa": "sdpa", "fa2": "flash_attention_2"}[args.flash_attn]
    model = from_pretrained(AutoModelForCausalLM.from_pretrained, path, "model", args, dtype=dtype,
                            attn_implementation=attention, trust_remote_code=args.trust_remote_code)
    check_fsdp_wrap_classes(model)  # before Accelerate shards it
    if vocab_size and args.resize_vocab and vocab_size > model.get_input_embeddings().weight.size(0):
        resize_embeddings(model, vocab_size, args.seed)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def load_policy(args, vocab_size):
    """The model to train. full: --model_name_or_path, or the checkpoint's weights when resuming. lora: the frozen
    --model_name_or_path with a new adapter, or --adapter_name_or_path's, or the checkpoint's when resuming.
    `vocab_size`: the tokenizer's length, which --resize_vocab grows the embeddings to."""
    if args.finetuning_type == "full":
        return load_model(args.resume_from_checkpoint or args.model_name_or_path, args, vocab_size=vocab_size)
    from peft import LoraConfig, PeftModel, get_peft_model

    model = load_model(args.model_name_or_path, args)
    adapter = args.resume_from_checkpoint or args.adapter_name_or_path
    if adapter:
        check_adapter_fits(model, adapter, args.model_name_or_path)
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    config = LoraConfig(task_type="CAUSAL_LM", r=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, use_rslora=args.use_rslora,
                        target_modules="all-linear" if args.lora_target == "all" else args.lora_target.split(","))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # the adapters start the same whatever drew random numbers before
        try:
            return get_peft_model(model, config)
        except ValueError as err:  # a target that names no module
            raise UserError(f"--lora_target {args.lora_target}: {first_line(err)}") from None


def adapter_shapes(adapter):
    """{tensor name: shape} of a PEFT adapter's weights, read from the safetensors header (nothing loaded); {} for
    an adapter saved otherwise (adapter_model.bin)."""
    path = Path(adapter, "adapter_model.safetensors")
    if not path.is_file():
        return {}
    with path.open("rb") as file:
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def check_adapter_fits(model, adapter, model_path):
    """Refuse, in one line naming both, a LoRA adapter trained on another model: every lora_A (rank x inputs) and
    lora_B (outputs x rank) must sit on a module of `model` with that many inputs and outputs. adapter_config.json's
    base_model_name_or_path is only a hint (a moved or renamed folder); the shapes decide."""
    modules = dict(model.named_modules())
    for name, shape in adapter_shapes(adapter).items():
        kind = next((k for k in ("lora_A", "lora_B") if f".{k}." in name), None)
        if kind is None or len(shape) != 2:
            continue
        module_name = name.removeprefix("base_model.model.").split(f".{kind}.")[0]
        weight = getattr(modules.get(module_name), "weight", None)
        full_shape = getattr(weight, "ds_shape", None) or getattr(weight, "shape", ())  # ZeRO-3: the whole weight's
        wanted = None if len(full_shape) != 2 else (full_shape[1] if kind == "lora_A" else full_shape[0])
        got = shape[1] if kind == "lora_A" else shape[0]
        if wanted != got:
            try:
                hint = json.loads(Path(adapter, "adapter_config.json").read_text())["base_model_name_or_path"]
            except (OSError, ValueError, KeyError, TypeError):
                hint = None
            side = "inputs" if kind == "lora_A" else "outputs"
            found = "has no such module" if wanted is None else f"has {wanted} {side} there"
            hint = hint or "a model its adapter_config.json does not name"
            raise UserError(f"--adapter_name_or_path {adapter}: a LoRA adapter of another model (trained on {hint}): "
                            f"its {module_name} takes {got} {side}, but --model_name_or_path {model_path} {found}; "
                            "pass the model the adapter was trained on as --model_name_or_path")


class AdapterDisabled:
    """DPO's reference for a LoRA policy: the policy itself with its adapter switched off, i.e. the frozen base
    model (no second copy of the weights), in eval mode; as LLaMA-Factory and TRL do. Called like a model."""

    def __init__(self, model, accelerator):
        self.model, self.peft_model = model, accelerator.unwrap_model(model)

    def __call__(self, **inputs):
        training = self.model.training
        self.model.eval()
        try:
            with self.peft_model.disable_adapter():
                return self.model(**inputs)
        finally:
            self.model.train(training)


def report_params_without_direction(projector, model, accelerator, step):
    """After a basis refresh, say which trainable tensors got no reference direction (their gradient is not
    projected until a refresh finds one): with LoRA, every A matrix while its B is still zero."""
    missing = projector.params_without_direction
    if not missing:
        return
    names = [name for name, param in accelerator.unwrap_model(model).named_parameters() if param.requires_grad]
    lora_a = sum(".lora_A." in names[i] for i in missing)
    accelerator.print(f"basis at step {step}: the reference gradient is zero for {len(missing)} of {len(names)} "
                      f"trainable tensors (e.g. {names[missing[0]]}), so the basis has no direction for them and "
                      "their gradient is left as it is until a refresh finds one"
                      + (f"; {lora_a} are LoRA A matrices, whose gradient is zero while B is zero (as LoRA starts)"
                         if lora_a else ""))


def load_tokenizer(path, args):
    from transformers import AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, path, "tokenizer", args,
                                trust_remote_code=args.trust_remote_code)
    try:
        apply_template(tokenizer, args.template, resize_vocab=args.resize_vocab, enable_thinking=args.enable_thinking)
    except ValueError as err:  # an unknown --template, a token the tokenizer lacks, or no chat template
        raise UserError(str(err)) from None
    return tokenizer


def build_optimizer(model, args):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": params, "weight_decay": weight_decay}
              for params, weight_decay in ((decay, args.weight_decay), (no_decay, 0.0)) if params]  # LoRA: no biases
    if args.optim == "sgd":
        return torch.optim.SGD(groups, lr=args.learning_rate)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, fused=args.optim == "adamw_torch_fused" or None)


def build_scheduler(optimizer, args, total_steps):
    from transformers import get_scheduler

    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    settings = args.lr_scheduler_kwargs or {}
    if args.lr_scheduler_type == "warmup_stable_decay" and "num_stable_steps" not in settings and \
            warmup + settings["num_decay_steps"] > total_steps:
        raise UserError(f"--lr_scheduler_kwargs num_decay_steps {settings['num_decay_steps']} and {warmup} warm-up "
                        f"steps exceed the run's {total_steps} steps: lower num_decay_steps")
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                         scheduler_specific_kwargs=settings)


def total_optimizer_steps(args, steps_per_epoch):
    return args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)


def check_reference_sets(sets, args):
    """Before the model loads: refuse reference sets (ogpsa_core.ReferenceSet) that cannot give --base_directions
    directions: fewer samples than directions, or a direction whose samples have no trainable unit (every response
    cut away by --cutoff_len), whose gradient would be 0/0."""
    for ref in sets:
        try:
            chunks = ogpsa_core.reference_chunks(len(ref.examples), args.base_num_samples, args.base_directions)
        except ValueError as err:
            raise UserError(f"reference set '{ref.name}': {err}") from None
        for k, chunk in enumerate(chunks):
            if not sum(ref.weight(ref.examples[i]) for i in chunk):
                raise UserError(f"reference set '{ref.name}' has no trainable token in direction {k + 1} of "
                                f"{len(chunks)} (samples {chunk[0] + 1}-{chunk[-1] + 1}): --cutoff_len "
                                f"{args.cutoff_len} cuts all their responses away; raise --cutoff_len")


def make_projector(args, backend):
    if args.base_method == "none":
        return None
    return ogpsa_core.Projector(backend.grad_slice, scope=args.base_scope, method=args.base_method,
                                basis=args.base_basis, threshold=args.base_threshold, scale=args.base_scale,
                                dtype=getattr(torch, args.base_dtype))


def make_update_projector(args, backend, projector):
    """--base_project_update: the backend projects every optimizer step's change (see Backend.project_steps)."""
    if not args.base_project_update:
        return None
    update_projector = ogpsa_core.UpdateProjector(projector, backend.params)
    backend.project_steps(update_projector)
    return update_projector


# ---------------------------------------------------------------------------------------------------------------
# Losses shared by the scripts
# ---------------------------------------------------------------------------------------------------------------

def token_logps(model, batch):
    """Forward pass: (log-probability of every label token given its prefix, logits).

    Returns logps (B, T) float32, 0 where labels are ignored, and the logits for extra loss terms: (B, T, vocab)
    for a padded batch; for a padding-free one (data_utils.collate), the model's single row, (1, N, vocab), whose
    logps are put back into the padded (B, T) layout (`per_sequence`), so what follows is the same for both.
    Position t predicts token t + 1, so labels are shifted left by one instead of slicing the logits: logps[:, t]
    and logits[:, t] belong to the same position.
    """
    logps, output = forward_logps(model, batch)
    return logps, output.logits


def forward_logps(model, batch, router_logits=False):
    """token_logps, returning the model's whole output instead of its logits; with `router_logits` (an MoE model,
    see router_loss_coef) the output holds `aux_loss`, the router's load-balancing loss of this forward."""
    if "position_ids" in batch:  # padding-free: positions restart per sequence; no mask (see check_padding_free)
        inputs = {"position_ids": batch["position_ids"]}
    else:
        inputs = {"attention_mask": batch["attention_mask"]}
    if router_logits:
        inputs["output_router_logits"] = True
    output = model(input_ids=batch["input_ids"], **inputs, use_cache=False)
    labels = next_token_labels(batch)
    nll = F.cross_entropy(output.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return per_sequence(batch, -nll.view(labels.shape)), output


def router_loss_coef(model, args, log):
    """The weight of the MoE router's auxiliary (load-balancing) loss in the training loss, or None without one.

    As LLaMA-Factory's configure_moe: --moe_aux_loss_coef turns the router logits on with that coefficient (0: off);
    without it, a model config that asks for them (output_router_logits: true) is honoured with its
    router_aux_loss_coef, the loss Hugging Face's Trainer would add. The model config itself is left as it is (the
    saved model's config.json is the input's): the policy's training forward passes ask for the router logits. A
    model whose config has no output_router_logits (a dense model) has no router loss: the flag is refused.
    """
    config = model.config
    if args.moe_aux_loss_coef is not None:
        if not hasattr(config, "output_router_logits"):
            raise UserError(f"--moe_aux_loss_coef {args.moe_aux_loss_coef}: the model {args.model_name_or_path} "
                            f"({config.model_type}) is not a mixture of experts with a router loss (its config has "
                            "no output_router_logits); drop the flag")
        coef = args.moe_aux_loss_coef
        if coef == 0:
            log("--moe_aux_loss_coef 0: no MoE router loss")
            return None
    elif getattr(config, "output_router_logits", False):
        coef = config.router_aux_loss_coef
    else:
        return None
    log(f"MoE router loss is in: {coef} x the router's load-balancing loss (aux_loss) of each forward pass of the "
        "policy, added to the training loss"
        + ("" if args.moe_aux_loss_coef is not None else " (the model config's output_router_logits and "
           "router_aux_loss_coef)") + "; the reference gradients leave it out")
    return coef


def next_token_labels(batch):
    """The token each position of the batch's rows predicts (labels shifted left by one), IGNORE_INDEX where none
    counts. In a padding-free row the position before a sequence predicts its first label, which is ignored."""
    return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)


def per_sequence(batch, values, fill=0):
    """Per-position values of the batch's rows in the padded (B, T) layout: unchanged for a padded batch; from a
    padding-free row of N, sequence b's positions go to row b and the rest is `fill`."""
    if "sequence_lengths" not in batch:
        return values
    lengths = batch["sequence_lengths"]
    inside = torch.arange(int(lengths.max()), device=lengths.device) < lengths[:, None]
    return values.new_full(inside.shape, fill).masked_scatter(inside, values.reshape(-1))


def response_positions(batch):
    """(B, T) bool: the positions whose predicted token is a response token (where token_logps counts)."""
    return per_sequence(batch, next_token_labels(batch) != IGNORE_INDEX, False)


def input_tokens(batch):
    """Tokens the batch holds, padding not counted (for --include_num_input_tokens_seen)."""
    return batch["sequence_lengths"].sum() if "sequence_lengths" in batch else batch["attention_mask"].sum()


@torch.no_grad()
def check_padding_free(model, accelerator, what="model"):
    """--padding_free: refuse a model that does not keep the sequences of a padding-free row apart.

    transformers 5.23 keeps them apart from the position ids alone, when no attention mask and no cache are
    passed: masking_utils.find_packed_sequence_indices turns the restarts into a block-diagonal causal mask for
    sdpa and eager, and modeling_flash_attention_utils runs FlashAttention-2's variable-length kernel on the
    sequences of a single row. A model class that builds its mask in its own way (remote code, older ports), or an
    attention implementation outside those, would let each sequence attend to the ones before it in the row, with
    no error. So this runs two sequences of random tokens packed in one row and compares the second one's logits
    with the ones it gets alone. Kept apart, they differ by rounding: ~1e-6 of the logits in float32, ~1e-2 under
    bf16 autocast. Attending across, they differ by what the first sequence changes, measured here too (the same
    row with an all-ones mask: restarting positions, one causal sequence). The check asks for under a tenth of that
    change: on the tiny test model rounding gave 2e-7 of it in float32 and 4e-3 in bf16, and mixing gives all.
    """
    unwrapped = accelerator.unwrap_model(model)
    device, generator = accelerator.device, torch.Generator().manual_seed(0)
    first, second = (torch.randint(unwrapped.config.vocab_size, (n,), generator=generator) for n in (24, 8))
    row = torch.cat([first, second])[None].to(device)
    positions = torch.cat([torch.arange(24), torch.arange(8)])[None].to(device)
    training = model.training
    model.eval()  # no dropout
    try:
        alone = model(input_ids=second[None].to(device), use_cache=False).logits[0].float()
        packed = model(input_ids=row, position_ids=positions, use_cache=False).logits[0, 24:].float()
        mixed = model(input_ids=row, position_ids=positions, attention_mask=torch.ones_like(row),
                      use_cache=False).logits[0, 24:].float()
    finally:
        model.train(training)
    error, crossing = (packed - alone).norm().item(), (mixed - alone).norm().item()
    if not error <= 0.1 * crossing:
        raise UserError(f"--padding_free True: the {what} ({type(unwrapped).__name__}, attention "
                        f"{unwrapped.config._attn_implementation}) does not keep the sequences of a "
                        f"padding-free row apart: a sequence packed after another got logits {error:.3g} away from "
                        f"its own (attending to the other one moves them {crossing:.3g}); use --padding_free False")


def router_term(aux_loss, coef, micro_batches):
    """What one micro-batch adds to the value each rank backpropagates for the MoE router loss.

    Hugging Face's models compute the router loss per forward pass: aux_loss is the load balance of that
    micro-batch's tokens (a product of two token means, not a sum over tokens), and its Trainer adds coef x aux_loss
    to each micro-batch's loss, averaged over accumulation and DDP ranks. So here a step's router loss is coef x the
    mean of aux_loss over the step's world x grad_accum micro-batches: this rank's `micro_batches` (grad_accum)
    each add coef x aux_loss / grad_accum, which the ranks' average (the scripts' backward convention) turns into
    that mean. Invariant, to float rounding: the split of the step's micro-batches over processes and accumulation
    (StepSampler builds the same micro-batches for N processes x grad_accum g as for one process x N g, at the same
    per-device batch), so two processes equal one. Not invariant, as in Hugging Face: anything that regroups the
    samples into other micro-batches (another per_device_train_batch_size, length-aware or padding-free batching),
    since the load balance of a larger batch is not the mean of its parts'.
    """
    return coef * aux_loss / micro_batches


def response_nll_sum(model, batch):
    """Sum of the NLL of all response tokens in the batch (the SFT loss before normalisation)."""
    return -token_logps(model, batch)[0].sum()


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------------

class MetricLog:
    """Per-interval metrics, one line and one JSON record per interval, and the run's plot and summary.

    `add(name, total, count)` adds a local sum over `count` units (tokens, pairs) to the interval's mean of `name`,
    kept on the device and reduced over ranks once per interval; `count(name, value)` adds to a running total over
    the whole run (e.g. tokens seen); `flush(step, scalars)` logs both with any scalars the loop passes. Records
    go to OUTPUT_DIR/trainer_log.jsonl (which a fresh run starts anew and a resumed run cuts back to its step), to
    the console (through tqdm) and to Accelerate's trackers; `finish` plots every logged metric. `add_step_loss`
    sums each step's loss for train_results.json's train_loss (the mean over all steps, as Hugging Face's Trainer
    reports it). `state()` goes into checkpoints, so a resumed run logs and sums exactly what an uninterrupted one
    would.
    """

    NOT_PLOTTED = ("step", "epoch", "elapsed_s", "refresh_s", "basis_rank", "eval_runtime_s")

    def __init__(self, accelerator, args, total_steps, start_step, state=None):
        """`state`: a checkpoint's extra state (with the `state()` of the run that wrote it), or None."""
        from tqdm.auto import tqdm

        self.accelerator, self.args = accelerator, args
        state = state or {}
        device = accelerator.device  # checkpoints load onto the CPU; the loop adds device tensors
        self.sums = {name: (torch.as_tensor(total, dtype=torch.float64, device=device), count)
                     for name, (total, count) in state.get("metric_sums", {}).items()}
        self.totals = {name: torch.as_tensor(total, dtype=torch.float64, device=device)
                       for name, total in state.get("metric_totals", {}).items()}
        self.loss_sum = state.get("train_loss_sum", 0.0)
        self.path = Path(args.output_dir, "trainer_log.jsonl")
        if accelerator.is_main_process:
            kept = [line for line in (self.path.read_text().splitlines() if self.path.exists() else [])
                    if json.loads(line)["step"] <= start_step]
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not accelerator.is_main_process,
                        desc="training", dynamic_ncols=True)
        self.start = time.perf_counter()
        self.eval_seconds = 0.0  # time spent evaluating: left out of elapsed_s (and so of train_runtime_s)

    def add(self, name, total, count):
        """Add a local sum over `count` units to the current interval's mean of `name` (no device sync)."""
        old_total, old_count = self.sums.get(name, (0.0, 0))
        self.sums[name] = (old_total + total.detach().double(), old_count + count)

    def add_step_loss(self, loss):
        """Add a step's loss (a float, the same on every rank) to the run's sum."""
        self.loss_sum += loss

    def state(self):
        """What a checkpoint keeps (this rank's): the open interval's sums, the running totals, the loss sum."""
        return {"metric_sums": self.sums, "metric_totals": self.totals, "train_loss_sum": self.loss_sum}

    def count(self, name, value):
        """Add to the running total `name` (this rank's share; summed over ranks when logged)."""
        self.totals[name] = self.totals.get(name, 0.0) + value.detach().double()

    def flush(self, step, scalars):
        """Reduce the interval's sums and the running totals, log them with `scalars` (a dict), reset the sums."""
        names, totals = sorted(self.sums), sorted(self.totals)
        device = self.accelerator.device
        values = [v for n in names for v in self.sums[n]] + [self.totals[n] for n in totals]
        packed = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values]) \
            if values else torch.zeros(0, device=device)
        if self.accelerator.num_processes > 1 and len(values):
            packed = self.accelerator.reduce(packed, reduction="sum")
        packed = packed.tolist()
        record = {"step": step}
        for i, name in enumerate(names):
            total, count = packed[2 * i], packed[2 * i + 1]
            record[name] = total / count if count else float("nan")
        for i, name in enumerate(totals):
            record[name] = int(packed[2 * len(names) + i])
        record.update({k: v if isinstance(v, int) else float(v) for k, v in scalars.items()})
        record["elapsed_s"] = round(time.perf_counter() - self.start - self.eval_seconds, 2)
        self.sums = {}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items()}
            self.bar.write(" ".join(f"{k}={v}" for k, v in shown.items()))
        self.accelerator.log(record, step=step)
        return record

    def log_evaluation(self, step, record, seconds):
        """Log an evaluation's metrics (already reduced over ranks) as their own record at `step`; its `seconds` are
        not training time."""
        self.eval_seconds += seconds
        record = {"step": step, **record}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in record.items()))
        self.accelerator.log(record, step=step)

    def finish(self, step, summary_keys=(), log_scale=()):
        """Close the bar; write the plot (--plot_loss; `log_scale`: keys plotted on a log scale) and
        train_results.json: the step, the mean loss over all steps, the runtime, and the first and last logged value
        of each of `summary_keys`; end with one line that says where the model (or adapter, and the merged model)
        and the plot are."""
        self.bar.close()
        if not self.accelerator.is_main_process:
            return
        records = [json.loads(line) for line in self.path.read_text().splitlines()]
        plot = None
        if self.args.plot_loss and records:
            logged = {k: None for r in records for k in r}  # training and evaluation records' keys, in order
            keys = sorted((k for k in logged if k not in self.NOT_PLOTTED), key=lambda k: k != "loss")
            plot = plot_curves(self.args.output_dir, keys, log_scale)
        records = [r for r in records if "elapsed_s" in r]  # the training records (not the evaluations')
        first, last = (records[0], records[-1]) if records else ({}, {})
        summary = {"global_step": step, "train_loss": self.loss_sum / step if step else None,
                   "train_runtime_s": last.get("elapsed_s")}
        for key in summary_keys:
            summary[f"first_{key}"], summary[f"last_{key}"] = first.get(key), last.get(key)
        write_json(Path(self.args.output_dir, "train_results.json"), summary)
        lora = self.args.finetuning_type == "lora"
        self.accelerator.print(
            f"done: the {'adapter' if lora else 'model'} is in {self.args.output_dir}"
            + (f", merged into the model in {Path(self.args.output_dir, 'merged')}" if self.args.export_merged else "")
            + (f"; loss curve: {plot}" if plot else ""))


def projection_scalars(stats, projector, update_stats=None, refresh_seconds=None):
    """The OGPSA diagnostics of a logging step: grad_norm (before projection; clipping saw grad_norm_projected),
    removed_fraction, max_abs_cos, basis_rank; update_removed_fraction with --base_project_update (1 - |projected
    step| / |optimizer step|); refresh_s, the last basis refresh's seconds."""
    scalars = {}
    if stats is not None:
        scalars.update({k: v for k, v in vars(stats).items()})
        scalars["basis_rank"] = int(projector.rank_per_unit.max())
    if update_stats is not None:
        scalars["update_removed_fraction"] = update_stats.removed_fraction
    if refresh_seconds is not None:
        scalars["refresh_s"] = refresh_seconds
    return scalars


def end_run(accelerator):
    """Close the trackers and the process group (without the latter, runs sometimes abort after finishing)."""
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def plot_curves(output_dir, keys, log_scale=()):
    """PNG of the logged curves (one panel per key; the keys in `log_scale` on a log scale) from
    trainer_log.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    records = [json.loads(line) for line in Path(output_dir, "trainer_log.jsonl").read_text().splitlines()]
    keys = [k for k in keys if any(k in r for r in records)]
    columns = min(4, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for axis, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        axis.plot(*zip(*points), marker=".")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(key + (" (log scale)" if key in log_scale else ""))
        if key in log_scale and all(v > 0 for _, v in points):
            axis.set_yscale("log")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(keys):]:
        axis.set_visible(False)
    fig.tight_layout()
    path = Path(output_dir, "training_loss.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
