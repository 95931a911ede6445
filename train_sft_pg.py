r"""Safety SFT with Orthogonal Gradient Projection (OGPSA).

Every optimizer step: forward and backward over the step's micro-batches, then remove from the reduced gradient
its component in the span of reference (general-capability) gradients, then clip and step. The basis is
recomputed every --base_num_steps steps and once before training.

Tiny CPU run (the demo; builds the tiny model first):
    python scripts/make_tiny_model.py --output_dir models/tiny-qwen2
    python train_sft_pg.py --model_name_or_path models/tiny-qwen2 --dataset_dir data --dataset demo_safety_sft \
        --base_dataset demo_general_a_sft,demo_general_b_sft --base_num_samples 200 --base_num_steps 10 \
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --learning_rate 1e-3 \
        --num_train_epochs 2 --logging_steps 5 --output_dir outputs/demo-sft --plot_loss True

One GPU:                 accelerate launch --config_file accelerate_configs/single_gpu.yaml train_sft_pg.py ...
Several GPUs (DDP):      accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_sft_pg.py ...
DeepSpeed ZeRO-1/2/3:    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml train_sft_pg.py ...
Two CPU processes:       torchrun --nproc_per_node 2 train_sft_pg.py ...
"""

from pathlib import Path

import torch
from accelerate.utils import set_seed

from data_utils import StepSampler, collate_sft, load_tokenized
from train_utils import (MetricLog, ReferenceSet, build_optimizer, build_parser, build_scheduler, check_args,
                         finish_run, is_save_step, load_checkpoint, load_model, load_tokenizer, make_accelerator,
                         make_backend, make_projector, prepare_output_dir, refresh_basis, response_nll_sum,
                         save_checkpoint, step_record, to_device, total_optimizer_steps, write_json)


def main():
    args = check_args(build_parser(__doc__, "sft_pg", default_lr=1e-5).parse_args(), "sft_pg")
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    prepare_output_dir(args, accelerator)
    log, device = accelerator.print, accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index

    # ---- data -------------------------------------------------------------------------------------------------
    weights_from = args.resume_from_checkpoint or args.model_name_or_path
    tokenizer = load_tokenizer(weights_from, args)
    pad = tokenizer.pad_token_id
    with accelerator.main_process_first():
        examples = load_tokenized(args.dataset, args, tokenizer, ranking=False, log=log)
        reference_sets = []
        for name in (args.base_dataset.split(",") if args.base_method != "none" else []):
            ref = load_tokenized(name, args, tokenizer, ranking=False, log=log)
            if len(ref) < args.base_num_samples:
                log(f"reference set {name} has {len(ref)} samples (< --base_num_samples {args.base_num_samples}): "
                    "using all of them")
            reference_sets.append(ReferenceSet(name, ref, lambda b: collate_sft(b, pad), response_nll_sum,
                                               lambda e: e["num_targets"]))

    # ---- model, optimizer, schedule, projection ---------------------------------------------------------------
    model = load_model(weights_from, args)
    optimizer = build_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    backend = make_backend(accelerator, model, optimizer)
    sampler = StepSampler(len(examples), args.per_device_train_batch_size, world, rank,
                          args.gradient_accumulation_steps, args.seed)
    total_steps = total_optimizer_steps(args, sampler.steps_per_epoch)
    scheduler = build_scheduler(backend.scheduled_optimizer, args, total_steps)
    projector = make_projector(args, backend)
    step, extra = 0, None
    if args.resume_from_checkpoint:
        step, extra = load_checkpoint(args.resume_from_checkpoint, args, accelerator, backend, scheduler, projector,
                                      sampler.global_batch)
        log(f"resumed from {args.resume_from_checkpoint} at step {step}")
    first_step = step
    tokens_seen = torch.as_tensor(extra["tokens_seen"] if extra else 0, dtype=torch.float64).to(device)
    if accelerator.is_main_process:
        write_json(Path(args.output_dir, "training_args.json"), vars(args))
    log(f"{len(examples)} samples, {sampler.steps_per_epoch} steps per epoch, {total_steps} steps, global batch "
        f"{sampler.global_batch} = {args.per_device_train_batch_size} per device x {world} processes x "
        f"{args.gradient_accumulation_steps} accumulation; OGPSA: "
        + (f"{args.base_method}, {args.base_scope}, {len(reference_sets)} sets x {args.base_directions} directions"
           if projector else "off"))

    metrics = MetricLog(accelerator, args, total_steps, step)
    refresh_seconds = None
    model.train()
    while step < total_steps:
        # ---- refresh the reference basis --------------------------------------------------------------------
        if projector is not None and step % args.base_num_steps == 0 and projector.refreshed_at != step:
            refresh_seconds = refresh_basis(projector, backend, model, reference_sets, args, step, device)

        # ---- forward and backward: the loss is the mean over every response token of the global batch ---------
        step_targets = sum(examples[i]["num_targets"] for i in sampler.step_indices(step))
        micro_batches = sampler.micro_batches(step)
        for m, indices in enumerate(micro_batches):
            batch = to_device(collate_sft([examples[i] for i in indices], pad), device)
            with backend.micro_batch(sync=m == len(micro_batches) - 1):
                nll = response_nll_sum(model, batch)
                backend.backward(nll * (world / step_targets))  # DDP averages over ranks: scale back up
            metrics.add("loss", nll, sum(examples[i]["num_targets"] for i in indices))
            tokens_seen += batch["attention_mask"].sum()

        # ---- project, clip, step ------------------------------------------------------------------------------
        log_now = (step + 1) % args.logging_steps == 0 or step + 1 == total_steps
        check_now = log_now or step == first_step  # the guard below runs on these steps
        stats = projector.project_(diagnostics=check_now) if projector is not None else None
        learning_rate = scheduler.get_last_lr()[0]
        if args.base_project_update:  # AdamW rescales coordinates: project the step itself too
            backend.snapshot_parameters()
        grad_norm = backend.clip_and_step(args.max_grad_norm)
        if stats is not None:  # stop if the projection did not act on the gradient the optimizer stepped with
            backend.check_projection(stats, grad_norm, projector)
        update_stats = backend.project_update_(projector, log_now) if args.base_project_update else None
        scheduler.step()
        step += 1
        metrics.bar.update(1)

        # ---- log and save -------------------------------------------------------------------------------------
        if log_now:
            metrics.flush(step, step_record(args, accelerator, step, sampler.steps_per_epoch, learning_rate, grad_norm,
                                            stats, projector, refresh_seconds, tokens_seen, update_stats))
        if is_save_step(args, step, sampler.steps_per_epoch):
            save_checkpoint(args, accelerator, model, tokenizer, backend, scheduler, projector, step,
                            {"tokens_seen": tokens_seen})

    finish_run(args, accelerator, model, tokenizer, metrics, step, ("loss", "removed_fraction"))


if __name__ == "__main__":
    main()
