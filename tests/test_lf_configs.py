"""LLaMA-Factory's config files and keys: `train_sft_pg.py CONFIG.yaml [key=value ...] [--flag ...]` as
`llamafactory-cli train` reads them, every key of LLaMA-Factory's argument classes with a fate, defaults as
LLaMA-Factory's, and five of its example YAMLs (tests/lf_examples, byte-for-byte copies) training and predicting with
only the paths and the OGPSA keys changed.

Values: LLaMA-Factory reads the file with OmegaConf's YAML loader, which (unlike plain YAML 1.1) reads `1e-5` as a
float; `key=value` overrides are parsed by the same loader and win over the file; null is the key's default.
"""

import json
import re
from pathlib import Path

import pytest
import torch

import arguments
import evaluate_alignment
import train_dpo_pg
from helpers import load_weights, read_log, run_script
from run_guard import UserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "tests" / "lf_examples"
DS3 = "accelerate_configs/ds_z3_config.json"  # LLaMA-Factory's stock ZeRO-3 file (the examples' path is theirs)


def sft_parser():
    return arguments.build_parser("", "sft_pg")


def write(folder, name, text):
    path = Path(folder, name)
    path.write_text(text)
    return str(path)


# ---- reading config files -------------------------------------------------------------------------------------------

def test_values_parse_as_llamafactory_reads_them(tmp_path):
    """Numbers with and without a dot are floats (OmegaConf's loader; PyYAML alone leaves 1e-5 a string), booleans,
    null (the default), lists for comma-separated keys, mappings for JSON flags; .yml and .json read the same."""
    config = write(tmp_path, "a.yaml", "model_name_or_path: m\noutput_dir: o\ndataset: [a, b]\nlearning_rate: 1e-5\n"
                                       "adam_epsilon: 1.0e-6\nbf16: true\nmax_samples: null\nlr_scheduler_type: "
                                       "cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr_rate: 0.1}\n"
                                       "loraplus_lr_embedding: 1e-6\n")  # LF's default: accepted only as a float
    assert arguments.yaml_value("1e-5") == 1e-5 and arguments.yaml_value("2024-01-01") == "2024-01-01"
    args = sft_parser().parse_args([config])
    assert args.learning_rate == 1e-5 and isinstance(args.learning_rate, float)
    assert args.adam_epsilon == 1e-6 and args.bf16 is True and args.max_samples is None
    assert args.dataset == "a,b" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert args.config_file == config and args.config_overrides == []
    as_json = write(tmp_path, "a.json", json.dumps({"model_name_or_path": "m", "output_dir": "o", "dataset": "a",
                                                    "learning_rate": 2e-5}))
    assert sft_parser().parse_args([as_json]).learning_rate == 2e-5
    assert sft_parser().parse_args([write(tmp_path, "a.yml", Path(config).read_text())]).learning_rate == 1e-5


def test_overrides_win_over_the_file_and_flags_over_both(tmp_path):
    config = write(tmp_path, "a.yaml", "model_name_or_path: m\noutput_dir: o\ndataset: a\nlearning_rate: 1.0e-4\n"
                                       "max_steps: 5\nlogging_steps: 3\n")
    args = sft_parser().parse_args([config, "learning_rate=2e-5", "max_steps=7", "--max_steps", "9"])
    assert (args.learning_rate, args.max_steps, args.logging_steps) == (2e-5, 9, 3)
    assert args.config_overrides == ["learning_rate=2e-5", "max_steps=7"]
    # the deepspeed launcher's --local_rank=N comes before the file
    assert sft_parser().parse_args(["--local_rank=0", config]).local_rank == 0


@pytest.mark.parametrize("text, expected", [
    ("model_name_or_path: m\ndataset: [a\n", r"a\.yaml line 3: not valid YAML"),
    ("model_name_or_path: m\nlearning_rate: 1\nlearning_rate: 2\n", r"a\.yaml line 3: learning_rate is given twice "
                                                                   r"\(also on .*a\.yaml line 2\)"),
    ("model_name_or_path: m\ntemplate: [qwen, chatml]\n", r"a\.yaml line 2: template takes one value, not a list"),
    ("model_name_or_path: m\nlearnig_rate: 1\n", r"a\.yaml line 2: unknown key learnig_rate \(nearest known key: "
                                                r"learning_rate\)"),
    ("model_name_or_path: m\ncutoff_len: 1\n", r"a\.yaml line 2: argument --cutoff_len: must be >= 2"),
    ("model_name_or_path: m\nlogging_steps: null\n", r"a\.yaml line 2: logging_steps: null is not a value"),
    ("model_name_or_path: m\npacking: true\n", r"a\.yaml line 2: packing True: the training text is fixed"),
    ("- model_name_or_path\n", r"a\.yaml line 1: a config file holds `key: value` lines"),
])
def test_a_bad_config_file_is_one_line_naming_file_and_line(tmp_path, text, expected):
    with pytest.raises(UserError, match=expected):
        sft_parser().parse_args([write(tmp_path, "a.yaml", text), "output_dir=o", "dataset=a"])


# ---- every LLaMA-Factory key has a fate ----------------------------------------------------------------------------

LF_KEYS = [line.strip() for line in (EXAMPLES / "lf_keys.txt").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
PARSERS = {"sft": sft_parser, "dpo": lambda: train_dpo_pg.add_dpo_flags(arguments.build_parser("", "dpo_pg")),
           "eval": evaluate_alignment.build_parser}


@pytest.mark.parametrize("script", PARSERS)
def test_every_llamafactory_key_is_a_flag_or_has_a_fate(script):
    """No "unrecognized arguments" for any key of LLaMA-Factory's argument classes: each is a flag or in the fate
    table, and the table names no key LLaMA-Factory does not have."""
    parser = PARSERS[script]()
    arguments.add_lf_keys(parser)
    assert [key for key in LF_KEYS if key not in parser.flag_names] == []
    assert sorted(set(arguments.LF_KEY_DEFAULTS) - set(LF_KEYS)) == []


def test_a_key_without_its_behaviour_is_accepted_at_its_default_and_refused_otherwise():
    flags = ["--model_name_or_path", "m", "--output_dir", "o", "--dataset", "a"]
    args = sft_parser().parse_args(flags + ["--packing", "False", "--use_dora", "false", "--val_size", "0.0",
                                            "--include_for_metrics", "[]", "--low_cpu_mem_usage", "False"])
    assert not hasattr(args, "packing") and not hasattr(args, "use_dora")  # accepted, and nothing to carry on
    with pytest.raises(UserError, match=r"^use_dora True: .*DoRA.* \(accepted only at false\)$"):
        sft_parser().parse_args(flags + ["--use_dora"])
    with pytest.raises(UserError, match=r"^load_best_model_at_end True: validation during training computes losses"):
        sft_parser().parse_args(flags + ["--load_best_model_at_end", "True"])
    with pytest.raises(UserError, match=r"pref_beta 0\.2: .*apply to train_dpo_pg\.py"):
        sft_parser().parse_args(flags + ["--pref_beta", "0.2"])


def test_readme_key_table_is_the_generated_one():
    """README's table is `python arguments.py --keys-table` (regenerate it there when a fate changes)."""
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- keys-table -->\n(.*)<!-- /keys-table -->", readme, re.S)
    assert table and table.group(1) == arguments.keys_table()


# ---- defaults, and the keys honoured with LLaMA-Factory's meaning ----------------------------------------------------

# Flags whose default differs from transformers' TrainingArguments (which LLaMA-Factory's extends) on purpose; the
# README ("Coming from LLaMA-Factory") says why.
DIFFERENT_ON_PURPOSE = {"do_train", "optim", "include_num_input_tokens_seen", "gradient_checkpointing"}


def test_defaults_are_llamafactorys():
    """Every flag that is a field of LLaMA-Factory's TrainingArguments (transformers' Seq2SeqTrainingArguments) has
    its default, but for the listed ones; gradient checkpointing is on (LLaMA-Factory's
    disable_gradient_checkpointing: false), and disable_gradient_checkpointing turns it off."""
    import dataclasses

    from transformers import Seq2SeqTrainingArguments

    parser = train_dpo_pg.add_dpo_flags(arguments.build_parser("", "dpo_pg"))
    fields = {f.name: f.default for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init}
    shared = sorted(parser.flag_names & fields.keys() - DIFFERENT_ON_PURPOSE - {"output_dir"})
    assert len(shared) > 25
    assert {k: parser.get_default(k) for k in shared} == {k: fields[k] for k in shared}
    assert parser.get_default("learning_rate") == 5e-5 and parser.get_default("logging_steps") == 500
    flags = ["--model_name_or_path", "m", "--output_dir", "o", "--dataset", "a", "--base_method", "none"]
    assert arguments.check_args(sft_parser().parse_args(flags), "sft_pg").gradient_checkpointing is True
    off = sft_parser().parse_args(flags + ["--disable_gradient_checkpointing", "True"])
    assert arguments.check_args(off, "sft_pg").gradient_checkpointing is False


def test_local_rank_must_agree_with_the_launchers(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    arguments.check_local_rank(1)
    with pytest.raises(UserError, match="--local_rank 0 disagrees with the launcher's LOCAL_RANK=1"):
        arguments.check_local_rank(0)


def test_adamw_torch_fused_takes_the_same_steps():
    """--optim adamw_torch_fused is torch's fused AdamW (on the CPU too): the same update as adamw_torch, to float32
    rounding of one step's arithmetic (a few ulp)."""
    from types import SimpleNamespace

    from train_utils import build_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Linear(16, 4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    settings = dict(weight_decay=0.1, learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8)
    optimizers = [build_optimizer(m, SimpleNamespace(optim=o, **settings)) for m, o in
                  zip(models, ["adamw_torch", "adamw_torch_fused"])]
    assert optimizers[1].defaults["fused"] and not optimizers[0].defaults["fused"]
    inputs = torch.randn(8, 16)
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            model(inputs).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:`log_with=")  # Accelerate: the tracker package is not installed here
def test_logging_dir_and_run_name_reach_the_trackers(tmp_path, monkeypatch):
    """TensorBoard writes into --logging_dir itself (Accelerate adds the project name: it is the folder's name);
    wandb gets --run_name."""
    import accelerate
    from accelerate.state import AcceleratorState

    import train_utils

    started = {}
    monkeypatch.setattr(accelerate.Accelerator, "init_trackers",
                        lambda self, name, config=None, init_kwargs=None: started.update(
                            name=name, folder=Path(self.logging_dir, name), init_kwargs=init_kwargs))
    args = sft_parser().parse_args(["--model_name_or_path", "m", "--output_dir", str(tmp_path / "o"), "--dataset",
                                    "a", "--logging_dir", str(tmp_path / "tb" / "run1"), "--run_name", "first"])
    args.report_to = "tensorboard"  # check_trackers would refuse it here: the package is not installed
    try:
        train_utils.make_accelerator(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert started == {"name": "run1", "folder": tmp_path / "tb" / "run1", "init_kwargs": {"wandb": {"name": "first"}}}


# ---- LLaMA-Factory's example YAMLs, run ----------------------------------------------------------------------------
# Each runs as LLaMA-Factory ships it, with key=value overrides for: the paths (model, data, output, DeepSpeed file);
# the OGPSA keys (stage and base_*); max_steps=2 and max_samples=16 (for the prediction max_samples / max_new_tokens)
# to keep it cheap.
OGPSA_SFT = ["stage=sft_pg", "base_dataset=demo_general_a_sft", "base_num_samples=8", "base_num_steps=10"]
OGPSA_DPO = ["stage=dpo_pg", "base_dataset=demo_general_dpo", "base_num_samples=8", "base_num_steps=10"]
CHEAP = ["max_steps=2", "max_samples=16"]
TRAINING = {  # example -> (script, overrides besides the model and output paths)
    "qwen3_full_sft.yaml": ("train_sft_pg.py", ["dataset=demo_safety_sft,demo_general_b_sft", f"deepspeed={DS3}",
                                                *OGPSA_SFT]),
    "qwen3_lora_sft.yaml": ("train_sft_pg.py", ["dataset=demo_safety_sft", *OGPSA_SFT]),
    "qwen3_lora_dpo.yaml": ("train_dpo_pg.py", ["dataset=demo_safety_dpo", *OGPSA_DPO]),
    "qwen3_lora_sft_ds3.yaml": ("train_sft_pg.py", ["dataset=demo_safety_sft,demo_general_b_sft",
                                                    f"deepspeed={DS3}", *OGPSA_SFT]),
}
LAUNCHERS = ["python", "accelerate"]


@pytest.fixture(scope="module")
def example_runs(tiny_model, tmp_path_factory):
    """Each example YAML trained for 2 steps under python and under `accelerate launch` (one process; the ZeRO-3
    ones too), and the prediction YAML through evaluate_alignment.py on the LoRA SFT adapter: {(example, launcher):
    output folder}."""
    root = tmp_path_factory.mktemp("lf-examples")
    runs = {}
    for launcher in LAUNCHERS:
        for example, (script, overrides) in TRAINING.items():
            out = root / f"{example}-{launcher}"
            run_script(script, [EXAMPLES / example, f"model_name_or_path={tiny_model}", f"output_dir={out}",
                                *overrides, *CHEAP],
                       launcher=None if launcher == "python" else launcher)
            runs[example, launcher] = out
        out = root / f"predict-{launcher}"
        run_script("evaluate_alignment.py", [
            EXAMPLES / "llama3_lora_predict.yaml", f"model_name_or_path={tiny_model}",
            f"adapter_name_or_path={runs['qwen3_lora_sft.yaml', launcher]}", f"output_dir={out}",
            "eval_dataset=demo_eval_harmful,demo_eval_general", "max_samples=3", "max_new_tokens=8", "do_sample=false",
            "template=qwen3_nothink"],  # the model is the tiny Qwen one: its template goes with it (llama3's tokens
            # are not in its vocabulary, and evaluation does not resize)
            launcher=None if launcher == "python" else launcher)
        runs["llama3_lora_predict.yaml", launcher] = out
    return runs


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("example", TRAINING)
def test_example_yaml_trains(example_runs, example, launcher):
    """Two steps logged, the model saved, and training_args.json holds the file's values and names the file."""
    out = example_runs[example, launcher]
    assert [r["step"] for r in read_log(out)] == [2]  # logging_steps 10: the last step is logged
    saved = json.loads((out / "training_args.json").read_text())
    assert saved["config_file"] == str(EXAMPLES / example) and "max_steps=2" in saved["config_overrides"]
    file_values = {"learning_rate": {"qwen3_full_sft.yaml": 1e-5, "qwen3_lora_dpo.yaml": 5e-6}.get(example, 1e-4),
                   "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True, "ddp_timeout": 180000000,
                   "plot_loss": True, "gradient_checkpointing": True}
    assert {k: saved[k] for k in file_values} == file_values
    assert (out / ("model.safetensors" if "full" in example else "adapter_model.safetensors")).exists()


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_predict_yaml_predicts(example_runs, launcher):
    lines = (example_runs["llama3_lora_predict.yaml", launcher] / "generated_predictions.jsonl").read_text()
    assert len(lines.splitlines()) == 6  # max_samples 3 of each of the two datasets
    assert all({"prompt", "predict", "label"} <= json.loads(line).keys() for line in lines.splitlines())


def test_yaml_run_equals_the_same_run_given_as_flags(example_runs, tiny_model, tmp_path):
    """qwen3_lora_sft.yaml with its overrides, written out by hand as flags: the same adapter, bit for bit (one
    process, the same arithmetic)."""
    run_script("train_sft_pg.py", [
        "--model_name_or_path", tiny_model, "--trust_remote_code", "True", "--stage", "sft_pg", "--do_train", "True",
        "--finetuning_type", "lora", "--lora_rank", "8", "--lora_target", "all", "--dataset", "demo_safety_sft",
        "--template", "chatml", "--cutoff_len", "2048", "--max_samples", "16", "--preprocessing_num_workers", "16",
        "--output_dir", tmp_path, "--logging_steps", "10", "--save_steps", "500", "--plot_loss", "True",
        "--overwrite_output_dir", "True", "--save_only_model", "False", "--report_to", "none",
        "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "8", "--learning_rate", "1.0e-4",
        "--num_train_epochs", "3.0", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.1", "--bf16", "True",
        "--ddp_timeout", "180000000", "--base_dataset", "demo_general_a_sft", "--base_num_samples", "8",
        "--base_num_steps", "10", "--max_steps", "2"])
    from_yaml = load_weights_any(example_runs["qwen3_lora_sft.yaml", "python"])
    from_flags = load_weights_any(tmp_path)
    assert from_yaml.keys() == from_flags.keys()
    assert all(torch.equal(from_yaml[k], from_flags[k]) for k in from_yaml)


def load_weights_any(folder):
    """The saved adapter's (or model's) tensors."""
    adapter = Path(folder, "adapter_model.safetensors")
    if adapter.exists():
        from safetensors.torch import load_file

        return load_file(str(adapter))
    return load_weights(folder)
