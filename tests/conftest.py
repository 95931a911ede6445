import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The demo's tiny Qwen2 model and tokenizer, built by the project's own script."""
    out = tmp_path_factory.mktemp("models") / "tiny-qwen2"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_model.py"), "--output_dir", str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    from data_utils import apply_template

    tok = AutoTokenizer.from_pretrained(tiny_model)
    apply_template(tok, "qwen")
    return tok


@pytest.fixture(scope="session")
def single_runs(tiny_model, tmp_path_factory):
    """One-process reference runs of 4 steps, one per (script, scope, batch size, --base_project_update, extra
    flags), made on first use and shared by every module that compares a multi-process run with one process."""
    from helpers import run_script
    from test_dpo import dpo_args
    from test_sft_e2e import sft_args

    scripts = {"sft": ("train_sft_pg.py", sft_args), "dpo": ("train_dpo_pg.py", dpo_args)}
    cache = {}

    def get(script, scope, batch_size=4, project_update=False, **extra):
        key = script, scope, batch_size, project_update, tuple(sorted(extra.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"single-{script}-{scope}-{batch_size}-{project_update}")
            path, make_args = scripts[script]
            run_script(path, make_args(tiny_model, out, base_scope=scope, per_device_train_batch_size=batch_size,
                                       max_steps=4, base_project_update=project_update, **extra))
            cache[key] = out
        return cache[key]

    return get
