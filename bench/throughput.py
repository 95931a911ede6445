r"""Throughput of padded, length-aware and padding-free micro-batches, side by side in one run (issue 25).

For SFT at 4 per device x 4 accumulation and DPO at 2 x 16 (the reference commands' settings; DPO with the frozen
reference model's forward pass), each optimizer step runs through the project's own code: `StepSampler` (sampled
order, or length-aware), `collate_sft` / `collate_pairs` (padded, or padding-free), `token_logps` / `pair_logps`
and `preference_loss`, and the backend's micro-batch, backward and step (`make_accelerator`, `make_backend`).
Variants:

  padded                        sampled order, padded (--length_aware_micro_batches False)
  length-aware                  the default
  padding-free                  --padding_free True --length_aware_micro_batches False
  padding-free + length-aware   --padding_free True

Every repetition runs one step of each variant on the same samples, the order reversed every other repetition, so
a machine whose load changes slows all variants alike; speed-ups are the median over repetitions of the paired
ratio. Reported per variant: tokens/s (real tokens: padding not counted), the padded fraction of the positions
computed, and the median step time. Then the basis refresh at the seed's settings (2 sets x 200 samples, micro-
batches of 4, `ReferenceGradients.refresh`) against the 30 SFT steps between two refreshes.

Lengths (see README, "Throughput"): assumed PKU-SafeRLHF-like unless --dataset gives a real dataset.

CPU (the committed results, bench/results/throughput-cpu.json; about 3 minutes on 2 quiet cores):
    python bench/throughput.py --config cpu
GPU (Qwen2-0.5B shape, bf16; sdpa, and flash_attention_2 where flash-attn is installed):
    python bench/throughput.py --config gpu
Your own lengths (a dataset_info.json entry, tokenised by the project's loader):
    python bench/throughput.py --config cpu --dataset saferlhf2_sft --dataset_dir data --tokenizer MODEL_OR_PATH
CI smoke check (tiny model, one repetition, figures not meaningful):
    python bench/throughput.py --config smoke --output /tmp/throughput.json
"""

import argparse
import gc
import importlib.util
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from copy import deepcopy
from functools import partial
from operator import itemgetter
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project's modules live in the repository root

import ogpsa_core  # noqa: E402
import arguments  # noqa: E402
import train_utils  # noqa: E402
from backends import make_backend, prepare_reference_model  # noqa: E402
from data_utils import (IGNORE_INDEX, StepSampler, collate_pairs, collate_sft, load_tokenized, num_targets,  # noqa: E402
                        padded_length, padding_fraction, sequences_of)
from train_dpo_pg import pair_logps, preference_loss  # noqa: E402

MODELS = {  # Qwen2 shapes, random weights
    "cpu": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
REFRESH_VARIANTS = ["padded", "length-aware", "padding-free + length-aware"]
CONFIGS = {  # length_scale shrinks every length (the smoke check's only); refresh: the variants it is timed with
    "cpu": dict(model="cpu", bf16=False, attention=["sdpa"], warmup=1, repetitions=8, refresh_samples=200,
                refresh_variants=REFRESH_VARIANTS[:2], length_scale=1.0),
    "gpu": dict(model="0.5b", bf16=True, attention=["sdpa", "flash_attention_2"], warmup=2, repetitions=10,
                refresh_samples=200, refresh_variants=REFRESH_VARIANTS, length_scale=1.0),
    "smoke": dict(model="tiny", bf16=False, attention=["sdpa"], warmup=0, repetitions=1, refresh_samples=4,
                  refresh_variants=REFRESH_VARIANTS, length_scale=0.1),
}
STAGES = {"sft": (4, 4), "dpo": (2, 16)}  # per device x accumulation, as the reference commands
VARIANTS = {"padded": (False, False), "length-aware": (True, False), "padding-free": (False, True),
            "padding-free + length-aware": (True, True)}  # name: (length-aware, padding-free)
# Assumed PKU-SafeRLHF-like lengths in tokens (README, "Throughput"): prompt = template + lognormal question,
# responses lognormal, cut at RESPONSE_CUT; a pair's two responses independent.
TEMPLATE_TOKENS, QUESTION, RESPONSE, RESPONSE_CUT = 20, (20, 0.5), (100, 0.75), 1024  # (median, sigma)
REFRESH_SETS, REFRESH_EVERY, REFRESH_BATCH = 2, 30, 4  # the seed's settings: 2 x 200 samples every 30 steps
TARGET_PADDING_CUT, TARGET_SPEEDUP = 0.5, 1.3  # length-aware vs padded, SFT 4 x 4 and DPO 2 x 16 (CPU)
EXPECTED_SAMPLES = 8192  # samples (pairs) over which the padded fractions of the distribution are computed


def log(message):
    print(f"[throughput] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Data: the assumed length distribution with placeholder tokens, or the lengths of a real dataset
# ---------------------------------------------------------------------------------------------------------------

def lognormal(median, sigma, generator):
    return median * math.exp(sigma * torch.randn((), generator=generator).item())


def draw_lengths(count, pairs, generator, scale=1.0):
    """(prompt, response) or (prompt, chosen, rejected) token counts of `count` samples, times `scale`."""
    def tokens(length):
        return max(1, round(scale * length))

    return [(tokens(TEMPLATE_TOKENS + lognormal(*QUESTION, generator)),
             *(tokens(min(RESPONSE_CUT, lognormal(*RESPONSE, generator))) for _ in range(2 if pairs else 1)))
            for _ in range(count)]


def synthetic_examples(lengths, vocab, generator):
    """Examples as the project's loader makes them, of the given lengths, with random token ids."""
    def tokens(length):
        return torch.randint(vocab, (length,), generator=generator).tolist()

    examples = []
    for prompt_length, *response_lengths in lengths:
        prompt = tokens(prompt_length)
        sequences = [{"input_ids": prompt + a, "labels": [IGNORE_INDEX] * len(prompt) + a}
                     for a in map(tokens, response_lengths)]
        if len(sequences) == 2:
            examples.append({f"{role}_{key}": s[key] for role, s in zip(("chosen", "rejected"), sequences)
                             for key in ("input_ids", "labels")})
            examples[-1].update(num_targets=num_targets(sequences[0]["labels"]),
                                num_targets_rejected=num_targets(sequences[1]["labels"]))
        else:
            examples.append({**sequences[0], "num_targets": num_targets(sequences[0]["labels"])})
    return examples


def expected_padding(stage, settings, generator, examples=None):
    """The padded fraction of padded micro-batches in sampled order and length-aware, over EXPECTED_SAMPLES samples
    of the assumed distribution (or over a real dataset's first epoch): a property of the lengths and the
    assignment, exact and free of timing noise."""
    batch, accumulation = STAGES[stage]
    if examples is None:
        keys = ["chosen_input_ids", "rejected_input_ids"] if stage == "dpo" else ["input_ids"]
        examples = [{key: range(prompt + response) for key, response in zip(keys, responses)}
                    for prompt, *responses in draw_lengths(EXPECTED_SAMPLES, stage == "dpo", generator,
                                                           settings.length_scale)]
    lengths = [padded_length(e) for e in examples]
    fractions = {}
    for aware in (False, True):
        sampler = StepSampler(len(examples), batch, 1, 0, accumulation, settings.seed,
                              lengths=lengths if aware else None)
        fractions[aware] = padding_fraction(sampler, examples, range(sampler.steps_per_epoch))
    return {"samples": len(examples), "padded": fractions[False], "length-aware": fractions[True],
            "padding_cut": 1 - fractions[True] / fractions[False],
            "positions_speedup": (1 - fractions[True]) / (1 - fractions[False])}


def dataset_examples(settings, pairs, vocab):
    """A real dataset through the project's loader; token ids folded into the random model's vocabulary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(settings.tokenizer)
    loader_args = SimpleNamespace(dataset_dir=settings.dataset_dir, max_samples=None, cutoff_len=settings.cutoff_len,
                                  preprocessing_num_workers=None, enable_thinking=True, preprocessing_batch_size=1000,
                                  template=settings.template, strict_data=False, seed=0)
    examples = load_tokenized(settings.dataset, loader_args, tokenizer, ranking=pairs, log=log)
    fold = {key for key in examples[0] if key.endswith(("input_ids", "labels"))}
    return [{key: [t % vocab if t != IGNORE_INDEX else t for t in value] if key in fold else value
             for key, value in e.items()} for e in examples]


def real_tokens(examples, indices):
    return sum(len(s) for i in indices for s in sequences_of(examples[i]))


# ---------------------------------------------------------------------------------------------------------------
# One optimizer step as the training scripts run it
# ---------------------------------------------------------------------------------------------------------------

def build_model(settings, attention):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(settings.seed)
    config = Qwen2Config(**MODELS[settings.model], use_cache=False, attn_implementation=attention)
    return Qwen2ForCausalLM(config).train()


def training_args(settings, stage, output_dir):
    """The training scripts' own flags (arguments.build_parser), at the stage's batch settings."""
    batch, accumulation = STAGES[stage]
    argv = ["--output_dir", output_dir, "--model_name_or_path", "random", "--dataset", "random",
            "--per_device_train_batch_size", batch, "--gradient_accumulation_steps", accumulation,
            "--bf16", settings.bf16, "--learning_rate", 1e-6]
    return arguments.build_parser(__doc__, f"{stage}_pg", 1e-6).parse_args([str(a) for a in argv])


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(run, micro_batches, padding_free):
    """Seconds of one optimizer step: forward and backward of each micro-batch (DPO: and the reference model's
    forward), then clip and step; the loss normalised as train_sft_pg.py / train_dpo_pg.py normalise it."""
    examples, device, backend = run.examples, run.device, run.backend
    step_indices = [i for indices in micro_batches for i in indices]
    synchronize(device)
    start = time.perf_counter()
    targets = sum(examples[i]["num_targets"] for i in step_indices)
    for m, indices in enumerate(micro_batches):
        chunk = [examples[i] for i in indices]
        with backend.micro_batch(sync=m == len(micro_batches) - 1):
            if run.stage == "sft":
                batch = train_utils.to_device(collate_sft(chunk, 0, padding_free), device)
                loss = -train_utils.token_logps(run.model, batch)[0].sum() / targets
            else:
                batch = train_utils.to_device(collate_pairs(chunk, 0, padding_free), device)
                chosen, rejected, _, _ = pair_logps(run.model, batch, average=False)
                with torch.no_grad():
                    ref_chosen, ref_rejected, _, _ = pair_logps(run.reference, batch, average=False)
                loss = preference_loss(chosen - ref_chosen, rejected - ref_rejected, "sigmoid", 0.1).sum() / \
                    len(step_indices)
            backend.backward(loss)
    backend.clip_and_step(1.0)
    synchronize(device)
    return time.perf_counter() - start


def measure_stage(stage, attention, settings, accelerator, output_dir):
    """Every variant's steps, interleaved, and for SFT the refresh."""
    batch, accumulation = STAGES[stage]
    pairs = stage == "dpo"
    model = build_model(settings, attention)
    vocab = model.config.vocab_size
    steps = settings.warmup + settings.repetitions
    generator = torch.Generator().manual_seed(settings.seed)
    if settings.dataset:
        examples = dataset_examples(settings, pairs, vocab)
        expected = expected_padding(stage, settings, generator, examples)
    else:
        expected = expected_padding(stage, settings, generator)
        examples = synthetic_examples(draw_lengths(steps * batch * accumulation, pairs, generator,
                                                   settings.length_scale), vocab, generator)
    args = training_args(settings, stage, output_dir)
    reference = deepcopy(model).eval().requires_grad_(False) if pairs else None
    optimizer = train_utils.build_optimizer(model, args)
    model, optimizer = accelerator.prepare(model, optimizer)
    run = SimpleNamespace(stage=stage, examples=examples, device=accelerator.device, model=model,
                          backend=make_backend(accelerator, model, optimizer),
                          reference=prepare_reference_model(accelerator, reference) if pairs else None)
    lengths = [padded_length(e) for e in examples]
    samplers = {variant: StepSampler(len(examples), batch, 1, 0, accumulation, settings.seed,
                                     lengths=lengths if variant[0] else None, padding_free=variant[1])
                for variant in VARIANTS.values()}
    seconds = {name: [] for name in VARIANTS}
    for repetition in range(steps):
        order = list(VARIANTS) if repetition % 2 == 0 else list(VARIANTS)[::-1]
        for name in order:
            aware, padding_free = VARIANTS[name]
            elapsed = train_step(run, samplers[aware, padding_free].micro_batches(repetition), padding_free)
            if repetition >= settings.warmup:
                seconds[name].append(elapsed)
        log(f"{stage} {attention}: repetition {repetition + 1}/{steps}: "
            + ", ".join(f"{name} {seconds[name][-1]:.2f} s" for name in VARIANTS if seconds[name]))
    measured = range(settings.warmup, steps)
    tokens = [real_tokens(examples, samplers[False, False].step_indices(step)) for step in measured]
    variants = {}
    for name, (aware, padding_free) in VARIANTS.items():
        times = seconds[name]
        positions = [computed_positions(examples, samplers[aware, padding_free].micro_batches(step), padding_free)
                     for step in measured]
        variants[name] = {
            "step_s": statistics.median(times), "tokens_per_s": sum(tokens) / sum(times),
            "padded_fraction": 1 - sum(tokens) / sum(positions), "positions_per_step": statistics.mean(positions),
            "speedup": statistics.median(a / b for a, b in zip(seconds["padded"], times)),
            "step_seconds": times}
    result = {"per_device_batch": batch, "accumulation": accumulation, "tokens_per_step": statistics.mean(tokens),
              "expected_padding": expected, "variants": variants}
    if stage == "sft":
        result["refresh"] = measure_refresh(run, settings, generator, vocab, variants)
    return result


def computed_positions(examples, micro_batches, padding_free):
    """Positions the model computes for these micro-batches: every token, plus the padding unless padding-free."""
    total = 0
    for indices in micro_batches:
        lengths = [len(s) for i in indices for s in sequences_of(examples[i])]
        total += sum(lengths) if padding_free else len(lengths) * max(lengths)
    return total


def measure_refresh(run, settings, generator, vocab, variants):
    """`ReferenceGradients.refresh` of REFRESH_SETS sets x refresh_samples (same length distribution), batched as
    each variant batches, against the REFRESH_EVERY steps between two refreshes on one GPU; on N GPUs the reference
    samples are divided over the ranks and the training samples are not, so the share is 1/N of it. Timed, and
    counted in computed positions (forward and backward of a position cost the same in both; the count does not
    depend on the machine's load, which changes between the refresh and the steps it is compared with)."""
    shares = {}
    reference_examples = [synthetic_examples(draw_lengths(settings.refresh_samples, False, generator,
                                                          settings.length_scale), vocab, generator)
                          for _ in range(REFRESH_SETS)]
    for name in settings.refresh_variants:
        aware, padding_free = VARIANTS[name]
        sets = [ogpsa_core.ReferenceSet(f"reference-{k}", examples, partial(collate_sft, pad_token_id=0,
                                                                            padding_free=padding_free),
                                        train_utils.response_nll_sum, itemgetter("num_targets"))
                for k, examples in enumerate(reference_examples)]
        references = ogpsa_core.ReferenceGradients(sets, settings.refresh_samples, 1, REFRESH_BATCH,
                                                   padded_length if aware else None)
        projector = ogpsa_core.Projector(run.backend.grad_slice, scope="per_param", method="orthogonal_projection",
                                         basis="qr")
        seconds = references.refresh(projector, run.backend, run.model, 0, run.device)
        positions = 0
        for examples in reference_examples:
            order = sorted(range(len(examples)), key=lambda i: -padded_length(examples[i])) if aware else \
                range(len(examples))
            positions += computed_positions(examples, ogpsa_core.rank_micro_batches(list(order), 0, 1, REFRESH_BATCH),
                                            padding_free)
        between_s = REFRESH_EVERY * variants[name]["step_s"]
        between_positions = REFRESH_EVERY * variants[name]["positions_per_step"]
        shares[name] = {"refresh_s": seconds, "steps_between_s": between_s, "share_1_gpu": seconds / between_s,
                        "share_8_gpus": seconds / between_s / 8, "refresh_positions": positions,
                        "steps_between_positions": between_positions,
                        "positions_share_1_gpu": positions / between_positions,
                        "positions_share_8_gpus": positions / between_positions / 8}
        log(f"refresh ({name}): {seconds:.1f} s against {between_s:.1f} s of training, {seconds / between_s:.0%} "
            f"extra on one GPU ({positions / between_positions:.0%} in computed positions)")
    return {"samples": REFRESH_SETS * settings.refresh_samples, "every_steps": REFRESH_EVERY,
            "micro_batch": REFRESH_BATCH, "variants": shares}


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def evaluate_target(results):
    """The CPU target: length-aware at least halves the padded fraction (of the distribution: expected_padding) and
    gives >= 1.3x the tokens/s of padded micro-batches in sampled order (the median paired ratio), SFT and DPO."""
    rows = []
    for stage, section in results["stages"].items():
        for attention, measured in section.items():
            cut, speedup = measured["expected_padding"]["padding_cut"], measured["variants"]["length-aware"]["speedup"]
            rows.append({"stage": stage, "attention": attention, "padding_cut": cut, "speedup": speedup,
                         "met": cut >= TARGET_PADDING_CUT and speedup >= TARGET_SPEEDUP})
    return rows


def markdown(results):
    lines = ["| stage | padded fraction of the distribution: sampled order | length-aware | cut | positions "
             "computed, sampled order / length-aware |", "|---|---|---|---|---|"]
    for stage, section in results["stages"].items():
        expected = next(iter(section.values()))["expected_padding"]
        lines.append(f"| {stage} | {expected['padded']:.0%} | {expected['length-aware']:.0%} "
                     f"| {expected['padding_cut']:.0%} | {expected['positions_speedup']:.2f}x |")
    lines += ["", "| stage | attention | variant | tokens/s | padded (measured steps) | step s | speed-up vs padded "
                  "(median; quartiles over the repetitions) |", "|---|---|---|---|---|---|---|"]
    for stage, section in results["stages"].items():
        for attention, measured in section.items():
            padded_seconds = measured["variants"]["padded"]["step_seconds"]
            for name, v in measured["variants"].items():
                ratios = [a / b for a, b in zip(padded_seconds, v["step_seconds"])]
                spread = "" if len(ratios) < 4 else \
                    " ({:.2f}-{:.2f})".format(*statistics.quantiles(ratios, n=4)[::2])
                lines.append(f"| {stage} {measured['per_device_batch']} x {measured['accumulation']} | {attention} "
                             f"| {name} | {v['tokens_per_s']:.0f} | {v['padded_fraction']:.0%} | {v['step_s']:.2f} "
                             f"| {v['speedup']:.2f}x{spread} |")
    refresh = next((m["refresh"] for m in results["stages"].get("sft", {}).values() if "refresh" in m), None)
    if refresh:
        lines += ["", f"| refresh ({refresh['samples']} samples every {refresh['every_steps']} SFT steps) | refresh s "
                      f"| {refresh['every_steps']} steps s | extra time, 1 GPU | 8 GPUs | extra positions, 1 GPU "
                      "| 8 GPUs |", "|---|---|---|---|---|---|---|"]
        for name, r in refresh["variants"].items():
            lines.append(f"| {name} | {r['refresh_s']:.1f} | {r['steps_between_s']:.1f} | {r['share_1_gpu']:.0%} "
                         f"| {r['share_8_gpus']:.0%} | {r['positions_share_1_gpu']:.0%} "
                         f"| {r['positions_share_8_gpus']:.0%} |")
    return "\n".join(lines)


def parse_settings(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=list(CONFIGS), default="cpu")
    parser.add_argument("--stages", default="sft,dpo", help="comma-separated: sft, dpo")
    parser.add_argument("--repetitions", type=int, default=None, help="measured steps per variant (after warm-up)")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/throughput-<config>.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); on a shared machine 1 keeps the variants' "
                             "ratios free of thread contention")
    parser.add_argument("--dataset", default=None, help="take the lengths of this dataset instead of the assumed "
                                                        "distribution (a dataset_info.json entry, file or hub id)")
    parser.add_argument("--dataset_dir", default="data")
    parser.add_argument("--tokenizer", default=None, help="tokenizer for --dataset")
    parser.add_argument("--template", default=None, help="chat template for --dataset (see the training scripts)")
    parser.add_argument("--cutoff_len", type=int, default=2048)
    settings = parser.parse_args(argv)
    if settings.dataset and not settings.tokenizer:
        parser.error("--dataset needs --tokenizer")
    for key, value in CONFIGS[settings.config].items():
        if getattr(settings, key, None) is None:
            setattr(settings, key, value)
    settings.output = settings.output or str(ROOT / "bench" / "results" / f"throughput-{settings.config}.json")
    return settings


def main(argv=None):
    settings = parse_settings(argv)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    accelerator_args = arguments.build_parser(__doc__, "sft_pg", 1e-6).parse_args(
        ["--output_dir", tempfile.mkdtemp(prefix="throughput-"), "--model_name_or_path", "random", "--dataset",
         "random", "--bf16", str(settings.bf16)])
    accelerator = train_utils.make_accelerator(accelerator_args)
    device = accelerator.device
    results = {"config": settings.config, "model": MODELS[settings.model], "bf16": settings.bf16,
               "lengths": (f"dataset {settings.dataset}" if settings.dataset else
                           {"template_tokens": TEMPLATE_TOKENS, "question_median_sigma": QUESTION,
                            "response_median_sigma": RESPONSE, "response_cut": RESPONSE_CUT,
                            "source": "assumed PKU-SafeRLHF-like (README, Throughput)"}),
               "warmup": settings.warmup, "repetitions": settings.repetitions,
               "environment": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                               platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                               "torch": torch.__version__},
               "stages": {}}
    for stage in settings.stages.split(","):
        results["stages"][stage] = {}
        for attention in settings.attention:
            if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
                log(f"{stage} {attention}: skipped (flash-attn is not installed)")
                continue
            results["stages"][stage][attention] = measure_stage(stage, attention, settings, accelerator,
                                                                accelerator_args.output_dir)
            accelerator.free_memory()  # drop the prepared models before the next measurement builds its own
            gc.collect()
    results["target"] = evaluate_target(results) if settings.config == "cpu" else None
    Path(settings.output).parent.mkdir(parents=True, exist_ok=True)
    Path(settings.output).write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    log(f"results: {settings.output}")
    return results


if __name__ == "__main__":
    main()
