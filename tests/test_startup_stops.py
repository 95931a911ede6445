"""Issue 30's last tracebacks: Ctrl-C while the scripts' modules import, a data file that is not UTF-8, and an
FSDP config that wraps a class the model does not have. Each is one line and a set exit code."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_utils import DataError, load_conversations
from helpers import run_script
from test_sft_e2e import sft_args

ROOT = Path(__file__).resolve().parents[1]


def torch_is_loading(pid):
    """Whether the process has mapped libtorch, i.e. is inside `import torch` or past it."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("script", ["train_sft_pg.py", "train_dpo_pg.py", "evaluate_alignment.py"])
def test_ctrl_c_while_the_modules_import_stops_with_one_line(script, tmp_path):
    """SIGINT as soon as torch starts loading (seconds before the imports end, at any machine speed): exit 130 with
    one line. main() never ran, or it would have created OUTPUT_DIR (its first act), so this is the import phase."""
    out = tmp_path / "out"
    args = sft_args("models/none", out) if script != "evaluate_alignment.py" else [
        "--model_name_or_path", "models/none", "--harmful_dataset", "demo_eval_harmful", "--output_dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not torch_is_loading(run.pid):
        assert run.poll() is None and time.time() < deadline, run.communicate()
        time.sleep(0.002)
    run.send_signal(signal.SIGINT)
    stdout, stderr = run.communicate(timeout=60)
    assert (run.returncode, stderr, stdout) == (130, "\nstopped by Ctrl-C\n", "")
    assert not out.exists()


def test_only_the_main_rank_says_it_stopped():
    """Under a launcher every rank gets Ctrl-C: one line in all, from rank 0."""
    stop = "import stop_on_ctrl_c; stop_on_ctrl_c.stop_at_once(2, None)"
    for rank, said in (("0", "\nstopped by Ctrl-C\n"), ("1", "")):
        done = subprocess.run([sys.executable, "-c", stop], cwd=ROOT, env={**os.environ, "RANK": rank},
                              capture_output=True, text=True)
        assert (done.returncode, done.stderr) == (130, said)


LATIN_1 = {  # a file in each text format, with "café" saved as Latin-1 (é is the byte 0xe9, never valid UTF-8 here)
    ".json": b'[{"instruction": "caf\xe9", "output": "a"}]',
    ".jsonl": b'{"instruction": "q", "output": "a"}\n{"instruction": "caf\xe9", "output": "b"}\n',
    ".csv": b"instruction,output\ncaf\xe9,a\n",
}


def not_utf8(path):
    return f"{path}: not UTF-8 text (byte 0xe9 at byte offset {path.read_bytes().index(0xe9)}); save it as UTF-8"


@pytest.mark.parametrize("suffix", sorted(LATIN_1))
def test_a_data_file_that_is_not_utf8_is_named_with_the_byte_offset(tmp_path, suffix):
    """The read path that training and evaluation share (read_rows), and dataset_info.json. Parquet and Arrow files
    hold UTF-8 strings by their format, so they cannot fail this way."""
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(LATIN_1[suffix])
    with pytest.raises(DataError) as refused:
        load_conversations(str(path), tmp_path, ranking=False)
    assert str(refused.value) == not_utf8(path)
    info = tmp_path / "dataset_info.json"
    info.write_bytes(b'{"caf\xe9": {"file_name": "rows%s"}}' % suffix.encode())
    with pytest.raises(DataError) as refused:
        load_conversations("set", tmp_path, ranking=False)
    assert str(refused.value) == not_utf8(info)


def test_training_on_a_file_that_is_not_utf8_stops_with_one_line(tiny_model, tmp_path):
    data = tmp_path / "rows.json"
    data.write_bytes(LATIN_1[".json"])
    result = run_script("train_sft_pg.py", sft_args(tiny_model, tmp_path / "out", dataset=data), expect_ok=False)
    assert (result.returncode, result.stderr) == (2, f"error: {not_utf8(data)}\n")


@pytest.mark.parametrize("names", ["Qwen2DecoderLayer", "Qwen2DecoderLayer,Qwen2RMSNorm", "LlamaDecoderLayer",
                                   "Qwen2DecoderLayer, Qwen2RMSNorm"])
def test_an_fsdp_config_that_wraps_no_class_of_the_model_is_refused_when_it_loads(tiny_model, monkeypatch, names):
    """The variables `accelerate launch` sets from an FSDP2 config with fsdp_transformer_layer_cls_to_wrap. What is
    refused must be what Accelerate's own lookup (get_module_class_from_name, run when it shards) would fail on: the
    names split at commas as written (a space stays part of a name)."""
    from types import SimpleNamespace

    from accelerate.utils.dataclasses import get_module_class_from_name
    from transformers import AutoModelForCausalLM

    from run_guard import UserError
    from train_utils import load_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    accelerate_fails_on = [repr(name) for name in names.split(",") if get_module_class_from_name(model, name) is None]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", names)
    args = SimpleNamespace(flash_attn="auto", trust_remote_code=False, gradient_checkpointing=False,
                           model_name_or_path=str(tiny_model))
    if not accelerate_fails_on:
        load_model(tiny_model, args)
        return
    with pytest.raises(UserError) as stopped:
        load_model(tiny_model, args)
    assert str(stopped.value) == (
        f"the Accelerate config's fsdp_transformer_layer_cls_to_wrap names {', '.join(accelerate_fails_on)}, which is "
        "no class of the model (Qwen2ForCausalLM); its decoder layer is Qwen2DecoderLayer: set "
        "fsdp_transformer_layer_cls_to_wrap: Qwen2DecoderLayer (or leave it out, and Accelerate wraps that)")
