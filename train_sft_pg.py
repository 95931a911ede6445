"""Safety SFT with Orthogonal Gradient Projection (OGPSA).

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

import json
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import set_seed

from data_utils import StepSampler, collate_sft, load_tokenized
from train_utils import (ReferenceSet, build_optimizer, build_parser, build_scheduler, check_args, load_checkpoint,
                         load_model, load_tokenizer, make_accelerator, make_backend, make_projector, MetricLog,
                         plot_curves, projection_record, refresh_basis, response_nll_sum, save_checkpoint,
                         save_final_model, to_device, total_optimizer_steps, write_json)


def main():
    args = check_args(build_parser(__doc__, "sft_pg", default_lr=1e-5).parse_args(), "sft_pg")
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
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
    scheduler = build_scheduler(optimizer, args, total_steps)
    projector = make_projector(args, backend)
    step, extra = 0, None
    if args.resume_from_checkpoint:
        step, extra = load_checkpoint(args.resume_from_checkpoint, args, accelerator, backend, scheduler, projector,
                                      sampler.global_batch)
        log(f"resumed from {args.resume_from_checkpoint} at step {step}")
    tokens_seen = torch.tensor(extra["tokens_seen"] if extra else 0, dtype=torch.float64)
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
            metrics.add("loss", nll.detach(), sum(examples[i]["num_targets"] for i in indices))
            tokens_seen += batch["attention_mask"].sum().item()

        # ---- project, clip, step ------------------------------------------------------------------------------
        log_now = (step + 1) % args.logging_steps == 0 or step + 1 == total_steps
        stats = projector.project_(diagnostics=log_now) if projector is not None else None
        learning_rate = scheduler.get_last_lr()[0]
        grad_norm = backend.clip_and_step(args.max_grad_norm)
        scheduler.step()
        step += 1
        metrics.bar.update(1)

        # ---- log and save -------------------------------------------------------------------------------------
        if log_now:
            record = {"epoch": round(step / sampler.steps_per_epoch, 4), "learning_rate": learning_rate,
                      "grad_norm": round(grad_norm, 6), **projection_record(stats, projector)}
            if refresh_seconds is not None:
                record["refresh_s"] = round(refresh_seconds, 3)
            if args.include_num_input_tokens_seen:
                total = accelerator.reduce(tokens_seen.to(device), "sum") if world > 1 else tokens_seen
                record["num_input_tokens_seen"] = int(total.item())
            metrics.flush(step, record)
        if (args.save_strategy == "steps" and step % args.save_steps == 0) or \
                (args.save_strategy == "epoch" and step % sampler.steps_per_epoch == 0):
            save_checkpoint(args, accelerator, model, tokenizer, backend, scheduler, projector, step,
                            {"tokens_seen": tokens_seen})

    # ---- final model, plots, summary ----------------------------------------------------------------------------
    metrics.close()
    save_final_model(args, accelerator, model, tokenizer)
    if accelerator.is_main_process:
        if args.plot_loss:
            log(f"loss curve: {plot_curves(args.output_dir, ('loss', 'removed_fraction'))}")
        records = [json.loads(line) for line in Path(args.output_dir, "trainer_log.jsonl").read_text().splitlines()]
        write_json(Path(args.output_dir, "train_results.json"),
                   {"global_step": step, "train_loss": records[-1]["loss"] if records else None,
                    "train_runtime_s": records[-1]["elapsed_s"] if records else None})
    accelerator.end_training()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
