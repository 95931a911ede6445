"""Checkpoints and the output folder: safetensors for tensors, JSON for the rest, never a pickle; every file is
written under a temporary name and moved into place whole, so a run killed at any moment leaves the previous
checkpoints usable.

OUTPUT_DIR/checkpoint-STEP holds the model and tokenizer, the optimizer state (per rank under ZeRO), the schedule,
each rank's RNG state, the OGPSA basis (per rank under ZeRO) and the loop's extra state (e.g. tokens seen).
"""

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from run_guard import LOCK_FILE, UserError, is_main_rank

# Resume rules. A resumed run must compute what the uninterrupted run would have: every flag that changes the result
# must equal the checkpoint's. Flags that only decide what is logged or saved, and where, may change.
RESUME_MAY_CHANGE = {
    "export_merged",  # what is written at the end
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "ddp_timeout", "preprocessing_num_workers",
    "preprocessing_batch_size", "tokenized_path", "overwrite_cache", "dataloader_num_workers",  # the same batches
    "trust_remote_code",
    "gradient_checkpointing", "disable_gradient_checkpointing",  # recomputing activations gives the same values
    "config_file", "config_overrides", "local_rank", "run_name", "logging_dir",  # where the values came from, trackers
    "save_strategy", "save_steps", "save_total_limit", "save_only_model", "logging_steps", "report_to", "plot_loss",
    "include_num_input_tokens_seen",
    "strict_data",  # stops on the rows it would otherwise drop: a run that gets past loading uses the same rows
    "base_batch_size",  # micro-batches of the reference gradients: the same sums, grouped otherwise (its default
    # follows --per_device_train_batch_size, whose split of the global batch may change too)
    "length_aware_micro_batches", "padding_free",  # each step's samples and loss stay; only the sums' grouping
    # validation during training: what is evaluated and when (evaluation does not change training; --val_size does,
    # it removes training rows, and must match)
    "eval_dataset", "eval_on_each_dataset", "eval_general_dataset", "eval_strategy", "eval_steps",
    "per_device_eval_batch_size", "do_eval",
}
# Only their product with the number of processes (the global batch) must match: Checkpointer.load checks it.
RESUME_GLOBAL_BATCH = {"per_device_train_batch_size", "gradient_accumulation_steps"}
# The method's settings: the saved basis was built with them.
RESUME_OGPSA = {
    "base_dataset", "base_num_samples", "base_num_steps", "base_method", "base_scale", "base_threshold",
    "base_directions", "base_scope", "base_basis", "base_dtype", "base_project_update", "base_loss",
}
RESUME_MUST_MATCH = RESUME_OGPSA | {
    "stage", "do_train", "seed", "deepspeed",  # run
    "model_name_or_path", "finetuning_type", "template", "flash_attn", "resize_vocab", "enable_thinking",  # model
    "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_rslora", "adapter_name_or_path",  # LoRA
    "dataset_dir", "dataset", "cutoff_len", "max_samples", "val_size",  # data
    "learning_rate", "num_train_epochs", "max_steps", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    "warmup_ratio", "optim", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "bf16",
    "fp16",  # optimisation
    "pref_beta", "pref_loss", "dpo_label_smoothing", "pref_ftx", "ref_model", "precompute_ref_log_probs",  # DPO
    "simpo_gamma", "moe_aux_loss_coef",
}
# With an MoE router loss, which is computed per micro-batch (train_utils.router_term), these regroup the samples
# into other micro-batches and so change the result: they must match too.
RESUME_ROUTER_LOSS = {"per_device_train_batch_size", "length_aware_micro_batches", "padding_free"}


def resolve_resume(args):
    """The checkpoint to resume from, or None; a new run refuses a non-empty OUTPUT_DIR unless
    --overwrite_output_dir says to start afresh there (as Hugging Face's Trainer and LLaMA-Factory do), which removes
    the earlier run's outputs first (clear_output_dir). A removal that a killed run left half done is finished
    before anything else."""
    if is_main_rank():
        finish_clearing(args.output_dir)
    else:  # the main process finishes it; read the folder afterwards (a launcher ends this one if the main one fails)
        while Path(args.output_dir, REMOVING).exists():
            time.sleep(0.1)
    resume = args.resume_from_checkpoint
    if resume in (None, "", "False", "false"):
        if not args.overwrite_output_dir:
            check_output_dir_empty(args.output_dir)
        elif is_main_rank():  # the other ranks read nothing in OUTPUT_DIR before the main one has written there
            clear_output_dir(args.output_dir)
        return None
    if resume in ("True", "true", "latest"):
        found = checkpoints(args.output_dir)
        if not found:
            raise UserError(f"--resume_from_checkpoint {resume}: no checkpoint in {args.output_dir}")
        resume = str(found[-1])
    if not Path(resume).is_dir():
        raise UserError(f"--resume_from_checkpoint {resume}: no such folder")
    if not Path(resume, "trainer_state.json").is_file():
        raise UserError(f"--resume_from_checkpoint {resume}: not a complete checkpoint (no trainer_state.json)")
    verify_checkpoint(resume)
    return resume


def check_output_dir_empty(output_dir):
    """Refuse to start a new run in an OUTPUT_DIR that holds anything but the lock file and the record of outputs:
    an earlier run's model, logs or checkpoints would be written over."""
    found = checkpoints(output_dir)
    if found:
        raise UserError(f"{output_dir} already holds checkpoints (newest: {found[-1].name}): pass "
                        "--resume_from_checkpoint True to continue, or --overwrite_output_dir True to start afresh "
                        "(the earlier run's outputs are removed)")
    entries = sorted(p.name for p in Path(output_dir).iterdir() if p.name not in (LOCK_FILE, OUTPUTS_FILE, REMOVING)) \
        if Path(output_dir).is_dir() else []
    if entries:
        raise UserError(f"{output_dir} is not empty (it holds {shown(entries)}): a new run would write over an "
                        "earlier one's results. Pass --overwrite_output_dir True to remove the earlier run's outputs "
                        "first, or choose another --output_dir")


def shown(names, most=4):
    """`names` for a message: the first `most`, and how many more."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_output_dir_apart(args):
    """Refuse an OUTPUT_DIR that is, lies inside or holds a model folder the run reads (--model_name_or_path,
    --ref_model, --adapter_name_or_path): the run would write over that model. --overwrite_output_dir cannot
    allow it. Hub ids that are not local folders have nothing local to overwrite."""
    output = Path(args.output_dir).expanduser().resolve()
    for flag in ("model_name_or_path", "ref_model", "adapter_name_or_path"):
        value = getattr(args, flag, None)
        if not value or not Path(value).expanduser().exists():
            continue
        source = Path(value).expanduser().resolve()
        where = ("is" if output == source else "lies inside" if source in output.parents
                 else "holds" if output in source.parents else None)
        if where:
            raise UserError(f"--output_dir {args.output_dir} {where} the folder of --{flag} {value}: the run would "
                            "write over what it reads. Choose an --output_dir apart from it")


def check_resume_flags(args, folder):
    """Refuse to resume with a flag that changes the result; the message lists each change (old -> new)."""
    saved = read_json(Path(folder, "trainer_state.json"), folder).get("args", {})
    now = json_safe(vars(args))
    may_change = RESUME_MAY_CHANGE | RESUME_GLOBAL_BATCH
    if has_router_loss(saved):
        may_change = may_change - RESUME_ROUTER_LOSS
    changed = [name for name in sorted(now) if name in saved and name not in may_change
               and now[name] != saved[name]]  # a flag in neither list counts as one that must match
    if not changed:
        return
    listed = "; ".join(f"--{name} {saved[name]} -> {now[name]}" for name in changed)
    ogpsa = [f"--{name}" for name in changed if name in RESUME_OGPSA]
    raise UserError(
        f"cannot resume from {folder} with other settings: {listed}. These change the result, so the run would not "
        "be the one the checkpoint belongs to"
        + (f" ({', '.join(ogpsa)}: the saved basis was built with the old value)" if ogpsa else "")
        + f". Resume with the checkpoint's values (in {Path(folder, 'trainer_state.json')}), or start a new run from "
        f"{start_from(folder, saved)} with a new --output_dir and no --resume_from_checkpoint (the optimizer, "
        "schedule and basis then start afresh)")


def has_router_loss(saved_args):
    """Whether the run of `saved_args` trained with an MoE router loss: --moe_aux_loss_coef, or (without it) a local
    model config that asks for the router logits (see train_utils.router_loss_coef)."""
    if saved_args.get("moe_aux_loss_coef") is not None:
        return saved_args["moe_aux_loss_coef"] != 0
    config = Path(str(saved_args.get("model_name_or_path")), "config.json")
    try:
        return config.is_file() and bool(json.loads(config.read_text()).get("output_router_logits", False))
    except (json.JSONDecodeError, UnicodeDecodeError):  # a damaged config: loading the model names it
        return False


def start_from(folder, saved_args):
    """The flags that start a new run from checkpoint `folder`'s weights: its model, or with LoRA its adapter on the
    same base model (a LoRA checkpoint holds only the adapter)."""
    if saved_args.get("finetuning_type") == "lora":
        return (f"the checkpoint's adapter: --adapter_name_or_path {folder} with --model_name_or_path "
                f"{saved_args.get('model_name_or_path')}")
    return f"the checkpoint's model: --model_name_or_path {folder}"


def check_data_unchanged(folder, fingerprints, log):
    """Resuming from `folder`: refuse if a dataset's tokenized examples differ from those the checkpoint was trained
    on (an edited, reordered or re-sampled file, another tokenizer or template), naming the dataset. A checkpoint
    written before fingerprints were kept gets a warning: its data cannot be checked."""
    state = read_json(Path(folder, "trainer_state.json"), folder)
    saved = state.get("data_fingerprints")
    if saved is None:
        log(f"warning: {folder} holds no fingerprint of its data (written by an older version): the data cannot be "
            "checked against it; resuming as if it were unchanged")
        return
    changed = [name for name in sorted(fingerprints) if saved.get(name) not in (None, fingerprints[name])]
    if changed:
        named = ("dataset " if len(changed) == 1 else "datasets ") + ", ".join(repr(n) for n in changed)
        raise UserError(
            f"cannot resume from {folder}: {named} changed since the checkpoint was written (the tokenized examples "
            "differ: edited, reordered or re-sampled rows, or another tokenizer or template), so the resumed run "
            "would train on other samples than the interrupted one. Resume with the original data, or start a new "
            f"run from {start_from(folder, state.get('args', {}))} and a new --output_dir")


def verify_checkpoint(folder):
    """Open every file of a checkpoint (safetensors headers and sizes, JSON): a damaged one is named, with the
    checkpoint to use instead, before any training starts."""
    for path in sorted(Path(folder).iterdir()):
        problem = damage(path)
        if problem:
            raise UserError(f"checkpoint file {path} is damaged ({problem}); {use_instead(folder)}")


def verify_model_files(folder, flag):
    """Open the header of every .safetensors file of a model or adapter folder (its sizes must match the file's):
    a truncated or damaged one is named before anything loads."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        problem = damage(path)
        if problem:
            raise UserError(f"{flag} {folder}: the weights file {path} is damaged ({problem}); copy or save the "
                            "model again")


def damage(path):
    """What is wrong with a .safetensors (header and sizes) or .json file, or None."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt"):
                pass
        elif path.suffix == ".json":
            json.loads(path.read_text())
    except (SafetensorError, ValueError, OSError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def use_instead(folder):
    """What to resume from when checkpoint `folder` is damaged: the newest complete one before it."""
    name = Path(folder).name
    earlier = [c for c in checkpoints(Path(folder).parent)
               if name.split("-")[-1].isdigit() and int(c.name.split("-")[-1]) < int(name.split("-")[-1])]
    if earlier:
        return f"use the previous checkpoint {earlier[-1]}"
    return "there is no earlier checkpoint: start afresh with --overwrite_output_dir True"


def read_json(path, folder):
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, OSError) as err:
        raise UserError(f"checkpoint file {path} is unreadable ({err}); {use_instead(folder)}") from None


def prepare_output_dir(args, accelerator):
    """Create OUTPUT_DIR and record there the outputs this run will write (see OUTPUTS_FILE): a fresh run starts
    the record anew (an earlier run's outputs were removed by resolve_resume), a resumed one adds to it."""
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        record_outputs(args.output_dir, planned_outputs(args), fresh=not args.resume_from_checkpoint)
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------
# What this project wrote into an output folder, and starting afresh there (--overwrite_output_dir)
# ---------------------------------------------------------------------------------------------------------------

OUTPUTS_FILE = ".ogpsa_outputs.json"  # the names of the entries this project wrote into OUTPUT_DIR
REMOVING = ".removing-earlier-run"  # an earlier run's outputs on their way out (clear_output_dir)
# What this project writes into OUTPUT_DIR, for folders without OUTPUTS_FILE (written before it was kept): the
# model or adapter with its tokenizer (save_pretrained), the merged export, the scripts' logs, results and plot
# (MetricLog, training_args.json), and an evaluation's files (evaluate_alignment.py).
KNOWN_OUTPUTS = {
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "merged", "training_args.json", "trainer_log.jsonl",
    "train_results.json", "training_loss.png", "generated_predictions.jsonl", "eval_results.json",
    "safety_vs_utility.png",
}
# Written by every version: checkpoints, the partial folders they and the final model are written in, the shards of
# a large model, TensorBoard's files (Accelerate's tracker, when OUTPUT_DIR is its own logging folder), the tokenized
# datasets the main process hands to the others (data_utils.tokenized_once; left behind by a killed run).
ALWAYS_OURS = re.compile(r"checkpoint-\d+|\.partial-.+|model-\d+-of-\d+\.safetensors|events\.out\.tfevents\..+|"
                         r"tokenized-for-other-ranks")


def planned_outputs(args):
    """The entries of OUTPUT_DIR a training run writes besides its checkpoints and its model's files (recorded when
    the model is saved)."""
    names = ["training_args.json", "trainer_log.jsonl", "train_results.json"]
    names += ["training_loss.png"] * bool(args.plot_loss) + ["merged"] * bool(args.export_merged)
    names += ["eval_results.json"] * bool(args.do_eval)  # validation during training
    if "tensorboard" in args.report_to:  # Accelerate's TensorBoard folder: OUTPUT_DIR/<its name>
        names.append(Path(args.output_dir).resolve().name)
    return names


def record_outputs(output_dir, names, fresh=False):
    """Add `names` (entries of OUTPUT_DIR this run writes, recorded before they are written) to OUTPUTS_FILE,
    atomically; `fresh`: start the record anew. A record that does not exist yet starts with what an earlier version
    wrote there (a resumed run of a folder without one). Main process only."""
    recorded = set() if fresh else _recorded_outputs(output_dir)
    if recorded is None:
        recorded = set(earlier_outputs(output_dir)[0])
    if fresh or not set(names) <= recorded:
        write_json(Path(output_dir, OUTPUTS_FILE), sorted(recorded | set(names)))


def _recorded_outputs(output_dir):
    """The names OUTPUTS_FILE lists, or None without a readable one."""
    try:
        recorded = json.loads(Path(output_dir, OUTPUTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return set(recorded) if isinstance(recorded, list) else None


def earlier_outputs(output_dir):
    """(the entries of OUTPUT_DIR this project wrote, the others), names sorted. This project's: what OUTPUTS_FILE
    lists, or without one the names it writes (KNOWN_OUTPUTS, a LoRA adapter's model card, a TensorBoard folder);
    with or without, checkpoints, partial folders, model shards, the temporary files of atomic writes and
    OUTPUTS_FILE itself. The lock file and a removal in progress are neither."""
    recorded = _recorded_outputs(output_dir)
    ours, others = [], []
    for path in sorted(Path(output_dir).iterdir()):
        if path.name not in (LOCK_FILE, REMOVING):
            (ours if _is_ours(path, recorded) else others).append(path.name)
    return ours, others


def _is_ours(path, recorded):
    name = path.name
    if name.startswith(".") and name.endswith(".tmp"):  # write_text_atomic's temporary file of `name`
        name = name[1:-len(".tmp")]
    if name == OUTPUTS_FILE or ALWAYS_OURS.fullmatch(name):
        return True
    if recorded is not None:
        return name in recorded
    return name in KNOWN_OUTPUTS or _is_adapter_card(path) or _is_tensorboard_folder(path)


def _is_adapter_card(path):
    """Whether `path` is the README.md that PEFT writes beside an adapter (its front matter names the library)."""
    if path.name != "README.md" or not path.is_file():
        return False
    head = path.read_bytes()[:2000].decode(errors="replace")
    return head.startswith("---") and "library_name: peft" in head


def _is_tensorboard_folder(path):
    """Whether `path` is a folder of TensorBoard event files only (Accelerate's tracker writes OUTPUT_DIR/<name>)."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() and not path.is_symlink() else []
    return bool(files) and all(p.name.startswith("events.out.tfevents.") for p in files)


def clear_output_dir(output_dir, log=print):
    """--overwrite_output_dir on a new run: remove every output of the earlier run(s) from OUTPUT_DIR before
    anything is written, so that the folder ends up holding this run's outputs only. Entries this project did not
    write (earlier_outputs) stay and are listed; the lock file stays.

    A run killed meanwhile leaves no half-removed folder: the names to remove are written into the folder REMOVING
    first, then each entry moves into it (REMOVING/entries) with a single rename, then it is deleted;
    finish_clearing completes what a killed run left (at the next start, whatever its flags)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return
    ours, others = earlier_outputs(folder)
    if ours:
        (folder / REMOVING / "entries").mkdir(parents=True)
        write_json(folder / REMOVING / "plan.json", ours)
        _finish_removal(folder, ours)
        visible_first = sorted(ours, key=lambda name: (name.startswith("."), name))
        log(f"--overwrite_output_dir: removed the earlier outputs from {output_dir} ({shown(visible_first)})")
    if others:
        log(f"--overwrite_output_dir: left {len(others)} {'entry' if len(others) == 1 else 'entries'} in {output_dir} "
            f"that this project did not write: {', '.join(others)}")


def finish_clearing(output_dir):
    """Complete a removal of earlier outputs (clear_output_dir) that a killed run left in OUTPUT_DIR."""
    removing = Path(output_dir, REMOVING)
    if not removing.is_dir():
        return
    try:
        names = json.loads(Path(removing, "plan.json").read_text())
    except (OSError, ValueError):  # killed before the list was complete: nothing was moved yet
        names = []
    _finish_removal(Path(output_dir), names)


def _finish_removal(folder, names):
    """Move each entry of `names` still in `folder` into REMOVING/entries (one rename each), then delete REMOVING."""
    removing = folder / REMOVING
    try:
        for name in names:
            if os.path.lexists(folder / name):
                os.replace(folder / name, removing / "entries" / name)
        shutil.rmtree(removing)
    except OSError as err:
        raise UserError(f"--overwrite_output_dir: cannot remove the earlier outputs from {folder} ({err}); fix the "
                        f"permissions, or choose another --output_dir") from None


def checkpoints(output_dir):
    """Complete checkpoints in OUTPUT_DIR, oldest first (partial ones are never renamed into place)."""
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


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


class Checkpointer:
    """Writes and restores a run's checkpoints and its final model.

    OUTPUT_DIR/checkpoint-STEP is written under a temporary name and renamed when complete: a run killed while
    saving leaves the previous checkpoints untouched; the newest complete one resumes.
    """

    def __init__(self, args, accelerator, model, tokenizer, backend, scheduler, projector, data_fingerprints=None):
        """`data_fingerprints`: {dataset: fingerprint of its tokenized examples} (data_utils.load_tokenized), kept in
        each checkpoint so that a resume can check it reads the same data (check_data_unchanged)."""
        self.args, self.accelerator, self.model, self.tokenizer = args, accelerator, model, tokenizer
        self.backend, self.scheduler, self.projector = backend, scheduler, projector
        self.data_fingerprints = data_fingerprints or {}

    def save(self, step, extra_state=None):
        """Write OUTPUT_DIR/checkpoint-STEP; `extra_state` is the loop's own (nested tensors and scalars).

        A write error (a full disk) removes the partial folder and stops with a UserError naming the folder; the
        previous checkpoints are untouched.
        """
        args, accelerator = self.args, self.accelerator
        output = Path(args.output_dir)
        final = output / f"checkpoint-{step}"
        partial = output / f".partial-checkpoint-{step}"
        try:
            if accelerator.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            accelerator.wait_for_everyone()
            self._write_state(partial, extra_state)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                trainer_state = {"global_step": step, "save_only_model": args.save_only_model,
                                 "world_size": accelerator.num_processes, "engine": self.backend.engine_name,
                                 "args": json_safe(vars(args)), "data_fingerprints": self.data_fingerprints}
                Path(partial, "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
                _settle_files(partial)
        except KeyboardInterrupt:  # a second Ctrl-C while saving: stop at once, leave no partial folder
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except (OSError, SafetensorError) as err:
            shutil.rmtree(partial, ignore_errors=True)  # give the space back
            found = checkpoints(output)
            raise UserError(f"writing checkpoint {final} failed ({type(err).__name__}: {err}); its partial files "
                            "were removed and the previous checkpoints are untouched"
                            + (f" (newest: {found[-1]})" if found else "")) from None
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            if args.save_total_limit:
                for old in checkpoints(output)[:-args.save_total_limit]:
                    shutil.rmtree(old)
        accelerator.wait_for_everyone()

    def _write_state(self, folder, extra_state):
        """This rank's files of a checkpoint: model and tokenizer (main process), optimizer state, schedule, RNG
        state, OGPSA basis and the loop's extra state."""
        args, accelerator, backend, projector = self.args, self.accelerator, self.backend, self.projector
        self._save_model(folder)
        if args.save_only_model:
            return
        if backend.grad_slice.sharded or accelerator.is_main_process:
            save_state(backend.optimizer_state(), folder, self.optimizer_file(accelerator.process_index))
        if accelerator.is_main_process:
            Path(folder, "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))
        save_state(rng_state(), folder, f"rng_state_{accelerator.process_index}")
        if projector is not None and (backend.grad_slice.sharded or accelerator.is_main_process):
            save_file(projector.state_dict(), str(folder / f"ogpsa_basis_{accelerator.process_index}.safetensors"))
        if extra_state:
            save_state(extra_state, folder, f"extra_state_{accelerator.process_index}")

    def optimizer_file(self, rank):
        return f"optimizer_{rank}" if self.backend.grad_slice.sharded else "optimizer"

    def load(self, folder, global_batch):
        """Restore optimizer, scheduler, RNG and the OGPSA basis; returns (step, extra_state or {})."""
        accelerator, backend, projector = self.accelerator, self.backend, self.projector
        trainer_state = json.loads(Path(folder, "trainer_state.json").read_text())
        saved = trainer_state["args"]  # the other flags were compared in check_args (check_resume_flags)
        if trainer_state["save_only_model"]:
            raise UserError(f"{folder} was saved with --save_only_model True: it holds no optimizer, scheduler or RNG "
                            "state, so training cannot resume exactly. Start a new run from "
                            f"{start_from(folder, saved)} instead")
        engine = trainer_state.get("engine", backend.engine_name)  # checkpoints written before engines were recorded
        if engine != backend.engine_name:
            raise UserError(f"cannot resume from {folder}: it was saved under {engine} and this run uses "
                            f"{backend.engine_name}, which lays out the optimizer state and the OGPSA basis otherwise; "
                            "resume with the launch config that wrote it")
        if backend.grad_slice.sharded and trainer_state["world_size"] != accelerator.num_processes:
            raise UserError(f"cannot resume from {folder}: it was saved by {trainer_state['world_size']} processes "
                            f"and {engine} shards the optimizer state and the OGPSA basis per process; resume with "
                            f"{trainer_state['world_size']} processes")
        saved_batch = saved["per_device_train_batch_size"] * trainer_state["world_size"] * \
            saved["gradient_accumulation_steps"]
        if global_batch != saved_batch:
            raise UserError(f"cannot resume from {folder}: the global batch size (per-device batch x processes x "
                            f"accumulation) was {saved_batch}, now {global_batch}; the data order would differ")
        backend.load_optimizer_state(load_state(folder, self.optimizer_file(accelerator.process_index), "cpu"))
        self.scheduler.load_state_dict(json.loads(Path(folder, "scheduler.json").read_text()))
        rank = accelerator.process_index
        rng_file = Path(folder, f"rng_state_{rank}.json")
        if rng_file.is_file():
            set_rng_state(load_state(folder, f"rng_state_{rank}"))
        if projector is not None:
            basis_rank = rank if backend.grad_slice.sharded else 0
            basis_file = Path(folder, f"ogpsa_basis_{basis_rank}.safetensors")
            if not basis_file.is_file():
                raise UserError(f"cannot resume from {folder}: it has no OGPSA basis for rank {basis_rank} (was it "
                                "saved without projection, or with another number of processes?)")
            projector.load_state_dict(load_file(str(basis_file)))
        extra_file = Path(folder, f"extra_state_{rank}.json")
        extra = load_state(folder, f"extra_state_{rank}") if extra_file.is_file() else {}
        return trainer_state["global_step"], extra

    def save_final_model(self):
        """Model (safetensors) and tokenizer into OUTPUT_DIR, each file moved into place whole."""
        args, accelerator = self.args, self.accelerator
        staging = Path(args.output_dir, ".partial-final-model")
        try:
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            self._save_model(staging)
            if accelerator.is_main_process:
                _settle_files(staging)
        except (OSError, SafetensorError) as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise UserError(f"writing the final model into {args.output_dir} failed ({type(err).__name__}: {err}); "
                            "the checkpoints are untouched") from None
        if accelerator.is_main_process:
            record_outputs(args.output_dir, [path.name for path in staging.iterdir()])
            for path in staging.iterdir():
                os.replace(path, Path(args.output_dir, path.name))
            staging.rmdir()
        accelerator.wait_for_everyone()
        if args.export_merged:
            self.export_merged()

    def _save_model(self, folder):
        """Model (safetensors; gathered from every rank under ZeRO-3) and tokenizer into `folder`; with LoRA the
        adapter only, in PEFT's format (adapter_model.safetensors, adapter_config.json)."""
        state_dict = self.accelerator.get_state_dict(self.model)
        lora = {"save_embedding_layers": False} if self.args.finetuning_type == "lora" else {}  # no hub lookup
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self.model)
            model.save_pretrained(folder, state_dict=tie_gathered_copies(model, state_dict),
                                  safe_serialization=True, **lora)
            self.tokenizer.save_pretrained(folder)

    def export_merged(self):
        """OUTPUT_DIR/merged: the final adapter merged into a float32 copy of the base model, plus the tokenizer,
        built on the main process's CPU from the saved adapter and moved into place whole."""
        args, accelerator = self.args, self.accelerator
        if accelerator.is_main_process:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()  # training is over: load whole on the CPU, not partitioned as under ZeRO-3
            staging, final = Path(args.output_dir, ".partial-merged"), Path(args.output_dir, "merged")
            try:
                shutil.rmtree(staging, ignore_errors=True)
                base = AutoModelForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32,
                                                            trust_remote_code=args.trust_remote_code)
                merged = PeftModel.from_pretrained(base, args.output_dir).merge_and_unload()
                merged.save_pretrained(staging, safe_serialization=True)
                self.tokenizer.save_pretrained(staging)
                _settle_files(staging)
            except (OSError, SafetensorError) as err:
                shutil.rmtree(staging, ignore_errors=True)
                raise UserError(f"writing the merged model into {final} failed ({type(err).__name__}: {err}); the "
                                "adapter in the output folder is complete") from None
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
        accelerator.wait_for_everyone()


def tie_gathered_copies(model, state_dict):
    """A state dict gathered from shards (ZeRO-3, FSDP2) holds a separate copy of each name of a tied parameter (an
    output head sharing the input embedding); make them one tensor again, so that save_pretrained writes it once,
    under the name it writes for an unsharded model."""
    first_name = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in state_dict:
            state_dict[name] = state_dict[first_name.setdefault(id(param), name)]
    return state_dict


def _current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_current_umask()  # what a plain open() gives a new file, read at start-up (single-threaded)


def _settle_files(folder):
    """Flush every file of `folder` to disk and give it the mode a plain write would (FILE_MODE): safetensors
    writes through a private temporary file (mode 0600), which would keep colleagues on a shared cluster from
    reading the model."""
    for path in Path(folder).iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(path, FILE_MODE)


def is_save_step(args, step, steps_per_epoch):
    return (args.save_strategy == "steps" and step % args.save_steps == 0) or \
        (args.save_strategy == "epoch" and step % steps_per_epoch == 0)


def json_safe(config):
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for k, v in config.items()}


def write_json(path, obj):
    """Write JSON atomically (temporary file, then rename)."""
    write_text_atomic(path, json.dumps(obj, indent=2))


def write_text_atomic(path, text):
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
