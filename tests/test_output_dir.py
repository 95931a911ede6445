"""--overwrite_output_dir (issue 30): a new run over an earlier one's folder leaves this run's outputs only. What
the project wrote goes (by the folder's record of its outputs, or without one by the names the project writes),
what it did not write stays and is listed, the lock file stays, and a run killed while removing leaves no half-removed
folder: the next start finishes the removal first."""

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import checkpoint
from checkpoint import OUTPUTS_FILE, REMOVING, clear_output_dir, resolve_resume
from helpers import run_script
from run_guard import LOCK_FILE, UserError
from test_sft_e2e import sft_args


def make_entries(folder, names):
    """Files, or folders holding one file for names ending in '/'."""
    for name in names:
        path = folder / name.rstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir()
            (path / "inside.bin").write_bytes(b"x")
        else:
            path.write_text("x")


def listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# An earlier full run's folder, as every version before the record wrote it: model, shards, tokenizer, logs, plot,
# checkpoints and their partial folders, temporary files of atomic writes, the merged export, an evaluation's files.
WRITTEN_WITHOUT_RECORD = [
    "config.json", "generation_config.json", "model.safetensors", "model-00001-of-00002.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "merged/",
    "checkpoint-2/", "checkpoint-10/", ".partial-checkpoint-12/", ".partial-final-model/", ".trainer_log.jsonl.tmp",
    "trainer_log.jsonl", "training_args.json", "train_results.json", "training_loss.png", "eval_results.json",
    "generated_predictions.jsonl", "safety_vs_utility.png",
]
USERS = ["README.md", "notes.txt", "my_data/", ".hidden", "checkpoint-best/"]


def test_without_a_record_the_names_the_project_writes_go_and_the_rest_stays_listed(tmp_path):
    out = tmp_path / "out"
    make_entries(out, [LOCK_FILE, *WRITTEN_WITHOUT_RECORD, *USERS])
    (out / "out" / "1712345678.9").mkdir(parents=True)  # Accelerate's TensorBoard folder: OUTPUT_DIR/<its name>
    (out / "out" / "events.out.tfevents.1712345678.host.1.0").write_bytes(b"")
    (out / "out" / "1712345678.9" / "events.out.tfevents.1712345679.host.1.1").write_bytes(b"")
    (out / "adapter").mkdir()  # a LoRA adapter's model card is the project's, a user's README.md is not
    (out / "adapter" / "README.md").write_text("---\nbase_model: m\nlibrary_name: peft\n---\n# Model Card\n")
    lines = []
    clear_output_dir(out, log=lines.append)
    assert listing(out) == sorted([LOCK_FILE, "README.md", "notes.txt", "my_data", ".hidden", "checkpoint-best",
                                   "adapter"])
    assert lines[-1] == (f"--overwrite_output_dir: left 6 entries in {out} that this project did not write: .hidden, "
                         "README.md, adapter, checkpoint-best, my_data, notes.txt")
    shutil.move(out / "adapter" / "README.md", out / "README.md")
    clear_output_dir(out, log=lines.append)
    assert "README.md" not in listing(out)


def test_with_a_record_what_it_lists_goes_and_other_known_names_stay(tmp_path):
    """The record is exact: a file with a name the project writes, but which it did not write here, stays."""
    out = tmp_path / "out"
    make_entries(out, [LOCK_FILE, "tokenizer.model", "modeling_custom.py", "merged/", "vocab.txt", "notes.txt",
                       "checkpoint-3/", ".partial-merged/", f".{OUTPUTS_FILE}.tmp"])
    (out / OUTPUTS_FILE).write_text(json.dumps(["tokenizer.model", "modeling_custom.py", "merged"]))
    clear_output_dir(out, log=lambda line: None)
    assert listing(out) == sorted([LOCK_FILE, "notes.txt", "vocab.txt"])


def restart(out):
    """A new run's start without --overwrite_output_dir, in the main process."""
    return resolve_resume(SimpleNamespace(output_dir=str(out), resume_from_checkpoint=None,
                                          overwrite_output_dir=False))


@pytest.mark.parametrize("killed_at", ["the first move", "the third move", "deleting"])
def test_a_run_killed_while_removing_leaves_nothing_half_removed(tmp_path, monkeypatch, killed_at):
    """The kill is an exception in the middle of the removal; the next start, whatever its flags, finishes it before
    it reads the folder."""
    out = tmp_path / "out"
    make_entries(out, [LOCK_FILE, *WRITTEN_WITHOUT_RECORD, "notes.txt"])
    moves, replace = [], os.replace

    def killed_replace(source, target):
        if Path(source).parent == out:  # an entry's move (not the plan's atomic write)
            moves.append(source)
            if killed_at.endswith("move") and len(moves) == (1 if killed_at == "the first move" else 3):
                raise KeyboardInterrupt
        replace(source, target)

    def killed_rmtree(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "replace", killed_replace)
    if killed_at == "deleting":
        monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        clear_output_dir(out, log=lambda line: None)
    monkeypatch.undo()
    moved = len(moves) - 1 if killed_at.endswith("move") else len(WRITTEN_WITHOUT_RECORD)  # the killed one stays
    assert len(listing(out / REMOVING / "entries")) == moved
    assert len(listing(out)) == len([LOCK_FILE, "notes.txt", REMOVING]) + len(WRITTEN_WITHOUT_RECORD) - moved
    with pytest.raises(UserError, match="is not empty \\(it holds notes.txt\\)"):
        restart(out)
    assert listing(out) == sorted([LOCK_FILE, "notes.txt"])


def lora_run_folder(tiny_model, out):
    """An earlier LoRA run's folder as a LoRA run writes it (adapter with PEFT's model card, tokenizer, merged
    export, a checkpoint, logs), with an adapter that changes the model (B not zero), plus a user's files."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    lora.merge_and_unload().save_pretrained(out / "merged")
    make_entries(out, ["checkpoint-2/", "training_loss.png", "notes.txt", "my_data/"])
    for name, text in (("trainer_log.jsonl", '{"step": 2, "loss": 3.5}\n'), ("training_args.json", "{}"),
                       ("train_results.json", "{}")):
        (out / name).write_text(text)


def test_a_full_run_over_a_lora_runs_folder_loads_as_the_same_run_in_a_clean_folder(tiny_model, single_runs,
                                                                                       tmp_path):
    """The issue's case: the old adapter_config.json made from_pretrained(OUTPUT_DIR) load the new model with the old
    adapter on it. The reference is the same run in a clean folder (shared with the backend tests)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    lora_run_folder(tiny_model, out)
    run = run_script("train_sft_pg.py", sft_args(tiny_model, out, base_scope="per_param", per_device_train_batch_size=4,
                                                 max_steps=4, base_project_update=False, overwrite_output_dir=True))
    clean = single_runs("sft", "per_param")
    assert listing(out) == sorted(listing(clean) + ["notes.txt", "my_data"])
    assert f"left 2 entries in {out} that this project did not write: my_data, notes.txt" in run.stdout
    recorded = json.loads((out / OUTPUTS_FILE).read_text())
    assert set(listing(out)) - {LOCK_FILE, OUTPUTS_FILE, "notes.txt", "my_data"} <= set(recorded)
    loaded, expected = (AutoModelForCausalLM.from_pretrained(folder).state_dict() for folder in (out, clean))
    assert sorted(loaded) == sorted(expected)  # no adapter on it
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)  # the same run, bit for bit


def test_the_other_ranks_read_the_folder_after_the_main_one_finished_a_removal(tmp_path, monkeypatch):
    """A resume with several processes after a killed removal: rank 1 must not find a checkpoint on its way out."""
    import threading

    out = tmp_path / "out"
    make_entries(out, ["checkpoint-2/", f"{REMOVING}/entries/checkpoint-4/"])
    (out / REMOVING / "plan.json").write_text(json.dumps(["checkpoint-2", "checkpoint-4"]))
    monkeypatch.setenv("RANK", "1")
    threading.Timer(0.3, checkpoint.finish_clearing, [out]).start()  # the main process, meanwhile
    with pytest.raises(UserError, match="no checkpoint in"):
        resolve_resume(SimpleNamespace(output_dir=str(out), resume_from_checkpoint="True", overwrite_output_dir=False))
