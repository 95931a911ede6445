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

Exit codes: 0 done; 2 a mistake in flags, data or files (one line `error: ...`), or non-finite training; 143 stopped
by SIGTERM, 130 by Ctrl-C, after writing a checkpoint (resume with --resume_from_checkpoint True). See README, "When
things go wrong".
"""

import stop_on_ctrl_c  # noqa: F401  first: Ctrl-C while the modules below import stops with one line

from functools import partial
from pathlib import Path

from accelerate.utils import set_seed

from arguments import build_parser, check_args
from backends import make_backend
from checkpoint import Checkpointer, check_data_unchanged, is_save_step, prepare_output_dir, write_json
from data_utils import (StepSampler, collate_sft, describe_batching, load_tokenized, padded_length, step_micro_batches,
                        tokenized_once)
from ogpsa_core import ReferenceGradients, ReferenceSet
from run_guard import StepGuard, hold_output_dir, run_main
from train_utils import (MetricLog, build_optimizer, build_scheduler, check_padding_free, check_reference_sets, end_run,
                         input_tokens, load_policy, load_tokenizer, make_accelerator, make_projector,
                         make_update_projector, projection_scalars, report_params_without_direction, response_nll_sum,
                         router_loss_coef, router_term, to_device, forward_logps,
                         total_optimizer_steps)
from validation import Evaluator, evaluation_due, load_eval_sets, split_off, token_nll_sums


def main():
    args = build_parser(__doc__, "sft_pg").parse_args()
    hold_output_dir(args.output_dir)  # one run per output folder, before anything in it is read
    args = check_args(args, "sft_pg")
    # before the accelerator (and DeepSpeed) start: an unknown template or a token it needs that the tokenizer lacks
    # stops here. Resuming: the saved tokenizer
    tokenizer = load_tokenizer(args.resume_from_checkpoint or args.model_name_or_path, args)
    accelerator = make_accelerator(args)
    guard = StepGuard(accelerator, args)  # SIGTERM or Ctrl-C now stop the run after a step, with a checkpoint
    set_seed(args.seed)
    prepare_output_dir(args, accelerator)
    log, device = accelerator.print, accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index

    # ---- data -------------------------------------------------------------------------------------------------
    pad, padding_free = tokenizer.pad_token_id, args.padding_free
    length = padded_length if args.length_aware_micro_batches else None  # None: micro-batches in sampled order
    fingerprints = {}  # dataset -> fingerprint of its tokenized examples: a resumed run must find the same data
    with tokenized_once(accelerator, args, tokenizer, log) as cache:  # the main process tokenizes, or reads
        # --tokenized_path; the other processes read its result (a data error on it stops every process)
        examples = load_tokenized(args.dataset, args, tokenizer, ranking=False, log=log, fingerprints=fingerprints,
                                  cache=cache)
        held_out = None
        if args.val_size:  # held out of the training data, as LLaMA-Factory splits it
            examples, held_out = split_off(examples, args.val_size, args.seed, args.dataset)
            log(f"--val_size {args.val_size}: {len(held_out)} samples held out for evaluation, {len(examples)} train")
        eval_sets = load_eval_sets(args, tokenizer, False, log, cache, held_out) if args.do_eval else []
        reference_sets = []
        for name in (args.base_dataset.split(",") if args.base_method != "none" else []):
            ref = load_tokenized(name, args, tokenizer, ranking=False, log=log, fingerprints=fingerprints,
                                 cache=cache)
            if len(ref) < args.base_num_samples:
                log(f"reference set {name} has {len(ref)} samples (< --base_num_samples {args.base_num_samples}): "
                    "using all of them")
            reference_sets.append(ReferenceSet(name, ref, lambda b: collate_sft(b, pad, padding_free),
                                               response_nll_sum, lambda e: e["num_targets"]))
    check_reference_sets(reference_sets, args)
    if args.resume_from_checkpoint:
        check_data_unchanged(args.resume_from_checkpoint, fingerprints, log)
    references = ReferenceGradients(reference_sets, args.base_num_samples, args.base_directions, args.base_batch_size,
                                    length)

    # ---- model, optimizer, schedule, projection ---------------------------------------------------------------
    model = load_policy(args, len(tokenizer))  # full: every weight trains; lora: adapters on the frozen model
    router_coef = router_loss_coef(model, args, log)  # MoE: the router's load-balancing loss, or None
    optimizer = build_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    backend = make_backend(accelerator, model, optimizer)
    if padding_free:  # refuse a model that would let packed sequences attend to each other
        check_padding_free(model, accelerator)
    sampler = StepSampler(len(examples), args.per_device_train_batch_size, world, rank,
                          args.gradient_accumulation_steps, args.seed,
                          lengths=[length(e) for e in examples] if length else None, padding_free=padding_free)
    total_steps = total_optimizer_steps(args, sampler.steps_per_epoch)
    scheduler = build_scheduler(backend.scheduled_optimizer, args, total_steps)
    projector = make_projector(args, backend)
    update_projector = make_update_projector(args, backend, projector)
    checkpoints = Checkpointer(args, accelerator, model, tokenizer, backend, scheduler, projector, fingerprints)
    step, extra = 0, {}
    if args.resume_from_checkpoint:
        step, extra = checkpoints.load(args.resume_from_checkpoint, sampler.global_batch)
        log(f"resumed from {args.resume_from_checkpoint} at step {step}")
    first_step = step
    if accelerator.is_main_process:
        write_json(Path(args.output_dir, "training_args.json"), vars(args))
    log(f"{len(examples)} samples, {sampler.steps_per_epoch} steps per epoch, {total_steps} steps, global batch "
        f"{sampler.global_batch} = {args.per_device_train_batch_size} per device x {world} processes x "
        f"{args.gradient_accumulation_steps} accumulation; OGPSA: "
        + (f"{args.base_method}, {args.base_scope}, {len(reference_sets)} sets x {args.base_directions} directions"
           if projector else "off"))
    log(describe_batching(sampler, examples, padding_free))

    metrics = MetricLog(accelerator, args, total_steps, step, extra)
    evaluator = Evaluator(accelerator, args, eval_sets, lambda _, b: collate_sft(b, pad, padding_free),
                          token_nll_sums)
    refresh_seconds = None
    steps_micro_batches = step_micro_batches(sampler, examples, partial(collate_sft, pad_token_id=pad,
                                                                        padding_free=padding_free),
                                             step, total_steps, args.dataloader_num_workers)  # in step order
    model.train()
    while step < total_steps:
        # ---- refresh the reference basis --------------------------------------------------------------------
        if projector is not None and step % args.base_num_steps == 0 and projector.refreshed_at != step:
            refresh_seconds = references.refresh(projector, backend, model, step, device)
            report_params_without_direction(projector, model, accelerator, step)

        # ---- forward and backward: the loss is the mean over every response token of the global batch ---------
        step_targets = max(1, sum(examples[i]["num_targets"] for i in sampler.step_indices(step)))  # 0: all cut away
        micro_batches = next(steps_micro_batches)  # [(sample indices, batch)]: sampler.micro_batches(step)
        loss_share = 0.0  # this rank's part of the step's loss (the sum over ranks is the loss)
        for m, (indices, batch) in enumerate(micro_batches):
            batch = to_device(batch, device)
            with backend.micro_batch(sync=m == len(micro_batches) - 1):
                logps, output = forward_logps(model, batch, router_coef is not None)  # output: for extra loss terms
                nll = -logps.sum()
                loss = nll * (world / step_targets)  # DDP averages over ranks: scale back up
                if router_coef is not None:  # MoE: this forward's router loss (see train_utils.router_term)
                    loss = loss + router_term(output.aux_loss, router_coef, len(micro_batches))
                    metrics.add("router_aux_loss", output.aux_loss, 1)
                backend.backward(loss)
            loss_share = loss_share + nll.detach().double() / step_targets
            metrics.add("loss", nll, sum(examples[i]["num_targets"] for i in indices))
            if args.include_num_input_tokens_seen:
                metrics.count("num_input_tokens_seen", input_tokens(batch))

        # ---- project, clip, step ------------------------------------------------------------------------------
        log_now = (step + 1) % args.logging_steps == 0 or step + 1 == total_steps
        check_now = log_now or step == first_step  # the guard below runs on these steps
        stats = projector.project_(diagnostics=check_now) if projector is not None else None
        learning_rate = scheduler.get_last_lr()[0]
        if update_projector is not None:  # AdamW rescales coordinates: the backend projects the step too
            update_projector.snapshot(diagnostics=log_now)
        grad_norm = backend.clip_and_step(args.max_grad_norm)
        if stats is not None:  # stop if the projection did not act on the gradient the optimizer stepped with
            backend.check_projection(stats, grad_norm, projector)
        update_stats = update_projector.stats if update_projector is not None else None
        scheduler.step()
        step += 1
        metrics.bar.update(1)
        metrics.add_step_loss(guard.check(step, loss_share, grad_norm))  # stops on a non-finite loss or norm

        # ---- log and save; stop after SIGTERM -----------------------------------------------------------------
        if log_now:
            metrics.flush(step, {"epoch": step / sampler.steps_per_epoch, "learning_rate": learning_rate,
                                 "grad_norm": grad_norm}
                          | projection_scalars(stats, projector, update_stats, refresh_seconds))
        if evaluation_due(args, step, sampler.steps_per_epoch):
            evaluator.evaluate(model, step, metrics)
        stop = guard.preempted and step < total_steps
        if is_save_step(args, step, sampler.steps_per_epoch) or stop:
            checkpoints.save(step, metrics.state())
        if stop:
            end_run(accelerator)
            guard.exit_preempted(step)

    checkpoints.save_final_model()
    if args.do_eval:
        evaluator.final(model, step, metrics)
    metrics.finish(step)
    end_run(accelerator)


if __name__ == "__main__":
    run_main(main)
