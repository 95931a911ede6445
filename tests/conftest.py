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
