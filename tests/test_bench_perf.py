"""bench/perf.py --cpu: every section of the GPU benchmark runs on a tiny model (figures untimed)."""

import json

from helpers import run_script

VARIANT_FIELDS = ("step_s", "plain_step_s", "step_ratio", "tokens_per_s", "projection_s", "overhead_s",
                  "peak_memory_bytes", "extra_memory_bytes", "expected_extra_bytes", "memory_ratio", "basis_init")


def test_cpu_check_writes_every_section(tmp_path):
    output = tmp_path / "perf.json"
    run_script("bench/perf.py", ["--cpu", "--output", output], timeout=300)
    results = json.loads(output.read_text())

    assert results["timed"] is False and "not meaningful" in results["note"]
    assert {"device", "torch", "transformers", "accelerate", "deepspeed"} <= set(results["environment"])
    assert results["copy_bandwidth"]["bytes_per_s"] > 0
    tiny = results["models"]["tiny"]
    entries = tiny["single"]["gradient_entries"]
    assert entries == tiny["num_params"] == tiny["zero2"]["gradient_entries"] == tiny["fsdp2"]["gradient_entries"]

    # Steps: every variant, single process, ZeRO-2 and FSDP2 (one process each), plus the hook baseline; no GPU
    # memory on a CPU.
    for backend in ("single", "zero2", "fsdp2"):
        variants = tiny[backend]["variants"]
        assert [(v["scope"], v["k"], v["dtype"], v["update"]) for v in variants] == \
            [("per_param", 2, "float32", False), ("global", 2, "float32", False), ("global", 8, "bfloat16", False),
             ("per_param", 2, "float32", True)]
        for v in variants:
            assert set(VARIANT_FIELDS) <= set(v) and "skipped" not in v
            assert v["step_s"] > 0 and v["plain_step_s"] > 0 and v["projection_s"] > 0
            assert v["peak_memory_bytes"] is None and v["memory_ratio"] is None
            snapshot = entries * 4 if v["update"] else 0  # float32 weights (single, FSDP2 shards) or ZeRO's masters
            assert v["expected_extra_bytes"] == v["k"] * entries * (4 if v["dtype"] == "float32" else 2) + snapshot
        assert tiny[backend]["plain_peak_memory_bytes"] is None
    hook = tiny["single"]["hook_baseline"]
    assert hook["step_s"] > 0 and hook["hook_overhead_ratio"] is not None
    assert hook["compared_with"] == {"scope": "per_param", "k": 2, "dtype": "float32"}

    # Projection alone vs the bandwidth floor, checked against float64; both ways of installing a basis ran.
    cases = {(c["scope"], c["k"], c["dtype"]): c for c in tiny["projection"]}
    assert set(cases) == {(s, k, d) for s, k in [("global", 2), ("global", 8), ("per_param", 2)]
                          for d in ("float32", "bfloat16")}
    for (_, k, dtype), case in cases.items():
        assert case["seconds"] > 0 and case["floor_s"] > 0 and case["projection_floor_ratio"] > 0
        bytes_per = 4 if dtype == "float32" else 2
        assert case["floor_bytes"] == 2 * k * entries * bytes_per + 3 * entries * 4
        assert case["relative_error"] < (1e-5 if dtype == "float32" else 1e-4)
    assert {c["basis_init"].split()[0] for c in cases.values()} == {"set_directions_", "random"}

    refresh = tiny["refresh"]
    assert refresh["micro_batches"] == 4  # 8 samples in 2 directions, micro-batches of 2
    assert refresh["refresh_s"] > 0 and refresh["training_micro_batches_s"] > 0 and refresh["refresh_ratio"] > 0

    # Targets are listed but not judged: nothing was timed.
    assert {row["target"] for row in results["targets"]} == set(results["limits"])
    assert all(row["met"] is None for row in results["targets"])
    assert results["summary"]["all_met"] is None and results["summary"]["evaluated"] == 0
