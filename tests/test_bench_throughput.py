"""bench/throughput.py --config smoke: every variant, both stages and the refresh run on a tiny model (untimed)."""

import json

import pytest

from helpers import run_script

VARIANTS = ["padded", "length-aware", "padding-free", "padding-free + length-aware"]


def test_smoke_run_reports_every_variant(tmp_path):
    output = tmp_path / "throughput.json"
    run_script("bench/throughput.py", ["--config", "smoke", "--output", output], timeout=300)
    results = json.loads(output.read_text())

    assert results["target"] is None  # judged on the cpu config only
    assert set(results["stages"]) == {"sft", "dpo"}
    for stage, (batch, accumulation) in (("sft", (4, 4)), ("dpo", (2, 16))):
        measured = results["stages"][stage]["sdpa"]
        assert (measured["per_device_batch"], measured["accumulation"]) == (batch, accumulation)
        expected = measured["expected_padding"]  # of the distribution, over 8192 samples
        assert expected["samples"] == 8192 and expected["padded"] > expected["length-aware"] > 0
        assert expected["positions_speedup"] == (1 - expected["length-aware"]) / (1 - expected["padded"]) > 1
        variants = measured["variants"]
        assert list(variants) == VARIANTS
        for v in variants.values():
            assert v["step_s"] > 0 and v["tokens_per_s"] > 0 and v["speedup"] > 0 and len(v["step_seconds"]) == 1
        padded = [variants[name]["padded_fraction"] for name in VARIANTS]
        assert padded[0] > padded[1] > 0 and padded[2] == padded[3] == 0  # sorting cuts padding; packing has none
        assert variants["padded"]["speedup"] == 1.0
    refresh = results["stages"]["sft"]["sdpa"]["refresh"]
    assert refresh["samples"] == 2 * 4 and refresh["every_steps"] == 30
    assert list(refresh["variants"]) == ["padded", "length-aware", "padding-free + length-aware"]
    for r in refresh["variants"].values():
        assert r["refresh_s"] > 0 and r["share_1_gpu"] == pytest.approx(r["refresh_s"] / r["steps_between_s"])
        assert r["share_8_gpus"] == pytest.approx(r["share_1_gpu"] / 8)
