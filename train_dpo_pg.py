r"""Safety DPO with Orthogonal Gradient Projection (OGPSA).

Same loop as train_sft_pg.py with a preference loss: every optimizer step runs the policy (and the frozen
reference model, unless its log-probabilities were precomputed or the loss, orpo or simpo, is reference-free) on
chosen and rejected responses, projects the reduced gradient out of the span of the reference (general-capability)
gradients, clips and steps.

Tiny CPU run (SFT first, then DPO from the SFT output; see README for the whole demo):
    python train_dpo_pg.py --model_name_or_path outputs/demo-sft --dataset_dir data --dataset demo_safety_dpo \
        --base_dataset demo_general_dpo --base_num_samples 200 --base_num_steps 5 --pref_beta 0.2 \
        --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --learning_rate 5e-4 \
        --num_train_epochs 1 --logging_steps 2 --output_dir outputs/demo-dpo --plot_loss True

One GPU:                 accelerate launch --config_file accelerate_configs/single_gpu.yaml train_dpo_pg.py ...
Several GPUs (DDP):      accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_dpo_pg.py ...
DeepSpeed ZeRO-1/2/3:    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml train_dpo_pg.py ...
Two CPU processes:       torchrun --nproc_per_node 2 train_dpo_pg.py ...

Exit codes: 0 done; 2 a mistake in flags, data or files (one line `error: ...`), or non-finite training; 143 stopped
by SIGTERM, 130 by Ctrl-C, after writing a checkpoint (resume with --resume_from_checkpoint True). See README, "When
things go wrong".
"""

import stop_on_ctrl_c  # noqa: F401  first: Ctrl-C while the modules below import stops with one line

import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from arguments import FINITE_FLOAT, NON_NEGATIVE_FLOAT, POSITIVE_FLOAT, build_parser, check_args, checked, flag
from backends import make_backend, prepare_reference_model
from checkpoint import Checkpointer, check_data_unchanged, is_save_step, prepare_output_dir, write_json
from data_utils import (DataError, StepSampler, collate_pairs, collate_sft, describe_batching, fingerprint,
                        is_ranking, load_tokenized, padded_length, step_micro_batches, tokenized_once)
from ogpsa_core import ReferenceGradients, ReferenceSet
from run_guard import StepGuard, UserError, hold_output_dir, run_main
from train_utils import (AdapterDisabled, MetricLog, build_optimizer, build_scheduler, check_padding_free,
                         check_reference_sets, end_run, input_tokens, load_model, load_policy, load_tokenizer,
                         make_accelerator, make_projector, make_update_projector, projection_scalars,
                         report_params_without_direction, response_nll_sum, response_positions, router_loss_coef,
                         router_term, to_device, forward_logps, total_optimizer_steps)
from validation import Evaluator, evaluation_due, load_eval_sets, split_off, token_nll_sums


LOSSES = ("sigmoid", "ipo", "hinge", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")  # no reference model is loaded or run
LENGTH_AVERAGED = ("ipo", "orpo", "simpo")  # log-probabilities are means over response tokens, not sums


def preference_loss(chosen_logratios, rejected_logratios, loss_type, beta, label_smoothing=0.0, simpo_gamma=0.5):
    """Per-pair preference loss (LLaMA-Factory's definitions, train/dpo/trainer.py).

    With h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)):
        sigmoid (DPO, Rafailov et al. 2023), label smoothing e (conservative DPO):
            L = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)
        ipo (Azar et al. 2023), h from length-averaged log-probabilities:
            L = (h - 1 / (2 beta))^2
        hinge (SLiC, Zhao et al. 2023):
            L = max(0, 1 - beta h)
    Reference-free, from the policy's length-averaged log-probabilities a = log pi(y_w|x) / |y_w|,
    b = log pi(y_l|x) / |y_l| (the caller passes them as the log-ratios, with log pi_ref = 0):
        orpo (Hong et al. 2024), with the odds p / (1 - p) of p = exp(a), exp(b):
            L = -a - beta log sigmoid(log odds(a) - log odds(b)),  log odds(x) = x - log(1 - exp(x))
        simpo (Meng et al. 2024), target margin gamma:
            L = -log sigmoid(beta (a - b) - gamma)

    Args:
        chosen_logratios, rejected_logratios: (B,) log pi - log pi_ref of the chosen / rejected responses
            (orpo, simpo: the length-averaged log pi, which must be < 0 for orpo).
    Returns:
        (B,) losses.
    """
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "orpo":
        log_odds = h - (log1mexp(chosen_logratios) - log1mexp(rejected_logratios))
        return -chosen_logratios - beta * F.logsigmoid(log_odds)
    if loss_type == "simpo":
        return -F.logsigmoid(beta * h - simpo_gamma)
    raise ValueError(f"unknown --pref_loss {loss_type!r}, expected one of {LOSSES}")


def pair_metrics(args, chosen, rejected, chosen_mean, ref_chosen, ref_rejected):
    """Per-pair values of a batch, as the training log reports them: the loss (with --pref_ftx's SFT term), the
    rewards beta x (log pi - log pi_ref), their accuracy and margin, and the policy's log-probabilities."""
    losses = preference_loss(chosen - ref_chosen, rejected - ref_rejected, args.pref_loss, args.pref_beta,
                             args.dpo_label_smoothing, args.simpo_gamma)
    if args.pref_ftx:
        losses = losses - args.pref_ftx * chosen_mean
    chosen_rewards = args.pref_beta * (chosen - ref_chosen).detach()
    rejected_rewards = args.pref_beta * (rejected - ref_rejected).detach()
    return {"loss": losses, "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards, "logps/chosen": chosen.detach(),
            "logps/rejected": rejected.detach()}


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012): log(-expm1(x)) near 0, where
    log1p(-exp(x)) (LLaMA-Factory's and TRL's form) loses the digits of a probability close to 1."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def pair_logps(model, batch, average, router_logits=False):
    """Response log-probabilities of a collate_pairs batch (B pairs: chosen rows first, then rejected).

    Returns chosen (B,), rejected (B,), the chosen responses' mean-token log-probability (B,), and the model's
    output (its logits for any extra loss term: (2B, T, vocab), padding-free (1, N, vocab), see token_logps; with
    `router_logits`, its MoE router loss `aux_loss`). Sums over response tokens, or means when `average` (IPO, ORPO,
    SimPO). Prompt tokens never count: their labels are ignored.
    """
    logps, output = forward_logps(model, batch, router_logits)
    counts = response_positions(batch).sum(-1).clamp(min=1)  # a response cut away by --cutoff_len has none
    sums = logps.sum(-1)
    values = sums / counts if average else sums
    chosen, rejected = values.chunk(2)
    return chosen, rejected, sums.chunk(2)[0] / counts.chunk(2)[0], output


@torch.no_grad()
def reference_logps(ref_model, examples, pad, batch_size, average, device, accelerator, padding_free=False,
                    length=None):
    """Reference log-probabilities (chosen, rejected) of every example, computed once: (N, 2) on every rank.

    Ranks take every world_size-th example (of the examples sorted longest first, with `length`: micro-batches of
    similar lengths); an all-reduce of the zero-filled table assembles it.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    table = torch.zeros(len(examples), 2, dtype=torch.float32, device=device)
    order = sorted(range(len(examples)), key=lambda i: -length(examples[i])) if length else range(len(examples))
    mine = list(order)[rank::world]
    # Every rank runs the same number of batches: a ZeRO-3 forward pass is collective.
    for start in range(0, math.ceil(len(examples) / world), batch_size):
        indices = mine[start:start + batch_size]
        batch = collate_pairs([examples[i] for i in (indices or [0])], pad, padding_free)
        chosen, rejected, _, _ = pair_logps(ref_model, to_device(batch, device), average)
        if indices:
            table[indices] = torch.stack([chosen, rejected], -1).float()
    if world > 1:
        table = accelerator.reduce(table, "sum")
    return table


def add_dpo_flags(parser):
    g = parser.add_argument_group("preference optimisation")
    flag(g, "--pref_beta", POSITIVE_FLOAT, default=0.1,
         help="beta: strength of the KL regularisation towards the reference")
    flag(g, "--pref_loss", default="sigmoid", choices=list(LOSSES),
         help="sigmoid (DPO), ipo, hinge; orpo or simpo: reference-free (no reference model is loaded or run)")
    flag(g, "--dpo_label_smoothing", checked(float, lambda v: 0 <= v <= 0.5, "in [0, 0.5]"), default=0.0,
         help="sigmoid loss: label smoothing (conservative DPO)")
    flag(g, "--simpo_gamma", FINITE_FLOAT, default=0.5, help="simpo loss: target reward margin gamma")
    flag(g, "--pref_ftx", NON_NEGATIVE_FLOAT, default=0.0,
         help="weight of an added SFT loss (mean-token NLL of the chosen; with orpo, on top of its own)")
    flag(g, "--ref_model", default=None, help="reference model (default: a frozen copy of the initial policy; LoRA: "
                                            "the policy with its adapter disabled, i.e. the base model)")
    flag(g, "--precompute_ref_log_probs", bool, default=False,
         help="compute reference log-probabilities once before training, so no reference model is held")
    flag(g, "--base_loss", default="pairs_nll", choices=["pairs_nll", "sft", "dpo"],
         help="OGPSA reference gradient: pairs_nll = NLL of chosen and rejected responses (the reference "
              "implementation's, the default), sft = NLL of the chosen ones (or of an SFT reference set), "
              "dpo = the preference loss on the reference pairs")
    return parser


def check_preference_flags(args):
    """Refuse preference-loss flags that the chosen --pref_loss would ignore, or contradict."""
    if args.dpo_label_smoothing and args.pref_loss != "sigmoid":
        raise UserError("--dpo_label_smoothing applies to --pref_loss sigmoid only")
    if args.simpo_gamma != 0.5 and args.pref_loss != "simpo":
        raise UserError(f"--simpo_gamma applies to --pref_loss simpo only (the run uses {args.pref_loss}): drop it")
    if args.pref_loss in REFERENCE_FREE:
        for name in ("ref_model", "precompute_ref_log_probs"):
            if getattr(args, name):
                raise UserError(f"--{name} with --pref_loss {args.pref_loss}: {args.pref_loss} is reference-free (no "
                                "reference model is loaded or run); drop --" + name + ", or use a loss with a "
                                "reference (sigmoid, ipo, hinge)")


def check_orpo_pairs(name, pairs, cutoff_len):
    """orpo: refuse pairs with a response cut away entirely by --cutoff_len (kept with every label masked, as in
    LLaMA-Factory): the odds p / (1 - p) of an empty response, p = exp(0) = 1, are infinite and the loss NaN."""
    cut = sum(1 for e in pairs if not e["num_targets"] or not e["num_targets_rejected"])
    if cut:
        raise DataError(f"dataset '{name}': --cutoff_len {cutoff_len} cuts a response of {cut} of its {len(pairs)} "
                        "pairs away entirely, and orpo's odds ratio of an empty response is undefined; raise "
                        "--cutoff_len (or use another --pref_loss)")


def main():
    parser = add_dpo_flags(build_parser(__doc__, "dpo_pg"))
    args = parser.parse_args()
    hold_output_dir(args.output_dir)  # one run per output folder, before anything in it is read
    args = check_args(args, "dpo_pg")
    check_preference_flags(args)
    # before the accelerator (and DeepSpeed) start: an unknown template or a token it needs that the tokenizer lacks
    # stops here. Resuming: the saved tokenizer
    tokenizer = load_tokenizer(args.resume_from_checkpoint or args.model_name_or_path, args)
    accelerator = make_accelerator(args)
    guard = StepGuard(accelerator, args)  # SIGTERM or Ctrl-C now stop the run after a step, with a checkpoint
    set_seed(args.seed)
    prepare_output_dir(args, accelerator)
    log, device = accelerator.print, accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    average = args.pref_loss in LENGTH_AVERAGED
    reference_free = args.pref_loss in REFERENCE_FREE

    # ---- data -------------------------------------------------------------------------------------------------
    pad, padding_free = tokenizer.pad_token_id, args.padding_free
    length = padded_length if args.length_aware_micro_batches else None  # None: micro-batches in sampled order
    fingerprints = {}  # dataset -> fingerprint of its tokenized examples: a resumed run must find the same data
    with tokenized_once(accelerator, args, tokenizer, log) as cache:  # the main process tokenizes, or reads
        # --tokenized_path; the other processes read its result (a data error on it stops every process)
        examples = load_tokenized(args.dataset, args, tokenizer, ranking=True, log=log, fingerprints=fingerprints,
                                  cache=cache)
        if args.pref_loss == "orpo":
            check_orpo_pairs(args.dataset, examples, args.cutoff_len)
        held_out = None
        if args.val_size:  # held out of the training data, as LLaMA-Factory splits it
            examples, held_out = split_off(examples, args.val_size, args.seed, args.dataset)
            log(f"--val_size {args.val_size}: {len(held_out)} pairs held out for evaluation, {len(examples)} train")
        eval_sets = load_eval_sets(args, tokenizer, True, log, cache, held_out) if args.do_eval else []
        for eval_set in eval_sets:
            if args.pref_loss == "orpo" and not eval_set.general:
                check_orpo_pairs(eval_set.name, eval_set.examples, args.cutoff_len)
        reference_pairs = {}  # name -> pair examples whose reference log-probs the dpo base loss needs
        reference_sets = []
        for name in (args.base_dataset.split(",") if args.base_method != "none" else []):
            if not is_ranking(name, args.dataset_dir):  # SFT data: its likelihood is the only loss it has
                if args.base_loss != "sft":
                    raise DataError(f"reference set '{name}' is not preference pairs: --base_loss {args.base_loss} "
                                    "needs pairs; pass --base_loss sft to take the gradient of an SFT reference set")
                ref = load_tokenized(name, args, tokenizer, ranking=False, log=log, fingerprints=fingerprints,
                                     cache=cache)
                reference_sets.append(ReferenceSet(name, ref, lambda b: collate_sft(b, pad, padding_free),
                                                   response_nll_sum, lambda e: e["num_targets"]))
                continue
            ref = load_tokenized(name, args, tokenizer, ranking=True, log=log, fingerprints=fingerprints, cache=cache)
            if len(ref) < args.base_num_samples:
                log(f"reference set {name} has {len(ref)} pairs (< --base_num_samples {args.base_num_samples}): "
                    "using all of them")
            if args.base_loss == "sft":
                reference_sets.append(ReferenceSet(name, ref, lambda b: collate_sft(
                    [{"input_ids": e["chosen_input_ids"], "labels": e["chosen_labels"]} for e in b], pad,
                    padding_free), response_nll_sum, lambda e: e["num_targets"]))
            elif args.base_loss == "pairs_nll":
                reference_sets.append(ReferenceSet(name, ref, lambda b: collate_pairs(b, pad, padding_free),
                                                   response_nll_sum,
                                                   lambda e: e["num_targets"] + e["num_targets_rejected"]))
            else:
                if args.pref_loss == "orpo":
                    check_orpo_pairs(name, ref, args.cutoff_len)
                reference_pairs[name] = ref
    check_reference_sets(reference_sets + [ReferenceSet(name, pairs, None, None, lambda e: e["num_targets"] + e[
        "num_targets_rejected"]) for name, pairs in reference_pairs.items()], args)  # --base_loss dpo's sets too
    if args.resume_from_checkpoint:
        check_data_unchanged(args.resume_from_checkpoint, fingerprints, log)

    # ---- policy, reference model, optimizer, schedule, projection ---------------------------------------------
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
    ref_model, ref_table = None, {}
    if reference_free:
        log(f"--pref_loss {args.pref_loss} is reference-free: no reference model is loaded or run")
    elif "ref_logps" in extra:  # precomputed before the interruption: nothing to reload
        ref_table = {name[len("ref_logps/"):]: table for name, table in extra.items()
                     if name.startswith("ref_logps/")}  # training, --base_loss dpo and evaluation pairs
        changed = [s.name for s in eval_sets if not s.general  # their tables are of other pairs, or none
                   and extra.get(f"ref_logps_data/{s.prefix}") != fingerprint(s.examples)]
        if changed:
            raise UserError(f"--precompute_ref_log_probs: the checkpoint holds no reference log-probabilities of "
                            f"the evaluation pairs {', '.join(changed)} (no reference model is loaded on resume): "
                            "resume with the evaluation data the run started with")
    else:  # the initial policy (--model_name_or_path, also when resuming), unless --ref_model names another
        if args.finetuning_type == "lora" and not args.ref_model:  # the base model: the policy, adapter off
            ref_model = AdapterDisabled(model, accelerator)
        else:
            ref_model = prepare_reference_model(accelerator, load_model(args.ref_model or args.model_name_or_path,
                                                                        args, vocab_size=len(tokenizer)))
            if padding_free:
                check_padding_free(ref_model, accelerator, "reference model")
        if args.precompute_ref_log_probs:
            for name, pairs in [("train", examples), *reference_pairs.items(),
                                *[(e.prefix, e.examples) for e in eval_sets if not e.general]]:
                ref_table[name] = reference_logps(ref_model, pairs, pad, args.per_device_train_batch_size, average,
                                                  device, accelerator, padding_free, length)
            ref_model = None  # not held during training
            log("precomputed reference log-probabilities; the reference model is released")

    def reference_for(name, pairs, indices, batch):
        """Reference (chosen, rejected) log-probs: from the precomputed table, or the reference model; 0 for a
        reference-free loss (whose log-ratios are the policy's log-probabilities)."""
        if reference_free:
            return 0.0, 0.0
        if name in ref_table:
            values = ref_table[name][torch.tensor(indices, device=ref_table[name].device)].to(device)
            return values[:, 0], values[:, 1]
        with torch.no_grad():
            chosen, rejected, _, _ = pair_logps(ref_model, batch, average)
        return chosen, rejected

    for name, pairs in reference_pairs.items():  # --base_loss dpo: the preference loss on reference pairs
        def dpo_sum(model_, batch, name=name, pairs=pairs):
            chosen, rejected, _, _ = pair_logps(model_, batch, average)
            ref_chosen, ref_rejected = reference_for(name, pairs, batch["indices"].tolist(), batch)
            return preference_loss(chosen - ref_chosen, rejected - ref_rejected, args.pref_loss, args.pref_beta,
                                   args.dpo_label_smoothing, args.simpo_gamma).sum()

        indexed = [{**e, "index": i} for i, e in enumerate(pairs)]
        reference_sets.append(ReferenceSet(name, indexed, lambda b: {**collate_pairs(b, pad, padding_free),
                                                                     "indices": torch.tensor([e["index"] for e in b])},
                                           dpo_sum, lambda e: 1))
    if accelerator.is_main_process:
        write_json(Path(args.output_dir, "training_args.json"), vars(args))
    log(f"{len(examples)} pairs, {sampler.steps_per_epoch} steps per epoch, {total_steps} steps, global batch "
        f"{sampler.global_batch} = {args.per_device_train_batch_size} per device x {world} processes x "
        f"{args.gradient_accumulation_steps} accumulation; {args.pref_loss} loss, beta {args.pref_beta}; OGPSA: "
        + (f"{args.base_method}, {args.base_scope}, base loss {args.base_loss}, {len(reference_sets)} sets x "
           f"{args.base_directions} directions" if projector else "off"))
    log(describe_batching(sampler, examples, padding_free))

    references = ReferenceGradients(reference_sets, args.base_num_samples, args.base_directions, args.base_batch_size,
                                    length)
    metrics = MetricLog(accelerator, args, total_steps, step, extra)

    def pair_eval_sums(model_, eval_set, indices, batch):
        """Evaluation of a pairs batch: the training log's loss, rewards and logps, summed over its pairs."""
        if eval_set.general:
            return token_nll_sums(model_, eval_set, indices, batch)
        chosen, rejected, chosen_mean, _ = pair_logps(model_, batch, average)
        ref_chosen, ref_rejected = reference_for(eval_set.prefix, eval_set.examples, indices, batch)
        return {key: (value.sum(), len(indices)) for key, value in pair_metrics(
            args, chosen, rejected, chosen_mean, ref_chosen, ref_rejected).items()}

    evaluator = Evaluator(accelerator, args, eval_sets, lambda eval_set, b: (
        collate_sft if eval_set.general else collate_pairs)(b, pad, padding_free), pair_eval_sums)
    refresh_seconds = None
    steps_micro_batches = step_micro_batches(sampler, examples, partial(collate_pairs, pad_token_id=pad,
                                                                        padding_free=padding_free),
                                             step, total_steps, args.dataloader_num_workers)  # in step order
    model.train()
    while step < total_steps:
        # ---- refresh the reference basis --------------------------------------------------------------------
        if projector is not None and step % args.base_num_steps == 0 and projector.refreshed_at != step:
            refresh_seconds = references.refresh(projector, backend, model, step, device)
            report_params_without_direction(projector, model, accelerator, step)

        # ---- forward and backward: the loss is the mean over the pairs of the global batch --------------------
        micro_batches = next(steps_micro_batches)  # [(sample indices, batch)]: sampler.micro_batches(step)
        loss_share = 0.0  # this rank's part of the step's loss (the sum over ranks is the loss)
        for m, (indices, batch) in enumerate(micro_batches):
            batch = to_device(batch, device)
            with backend.micro_batch(sync=m == len(micro_batches) - 1):
                chosen, rejected, chosen_mean, output = pair_logps(model, batch, average, router_coef is not None)
                ref_chosen, ref_rejected = reference_for("train", examples, indices, batch)
                logged = pair_metrics(args, chosen, rejected, chosen_mean, ref_chosen, ref_rejected)
                losses = logged["loss"]
                loss = losses.sum() * (world / sampler.global_batch)
                if router_coef is not None:  # MoE: the policy forward's router loss (see train_utils.router_term)
                    loss = loss + router_term(output.aux_loss, router_coef, len(micro_batches))
                    metrics.add("router_aux_loss", output.aux_loss, 1)
                backend.backward(loss)
            loss_share = loss_share + losses.detach().double().sum() / sampler.global_batch
            for key, value in logged.items():
                metrics.add(key, value.detach().sum(), len(indices))
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
            state = metrics.state()
            if ref_table and ref_model is None:
                state["ref_logps"] = True
                state.update({f"ref_logps/{name}": table for name, table in ref_table.items()})
                state.update({f"ref_logps_data/{e.prefix}": fingerprint(e.examples) for e in eval_sets
                              if not e.general})  # which evaluation pairs the tables are of
            checkpoints.save(step, state)
        if stop:
            end_run(accelerator)
            guard.exit_preempted(step)

    checkpoints.save_final_model()
    if args.do_eval:
        evaluator.final(model, step, metrics)
    metrics.finish(step, summary_keys=("rewards/accuracies",), log_scale=("loss",))
    end_run(accelerator)


if __name__ == "__main__":
    run_main(main)
