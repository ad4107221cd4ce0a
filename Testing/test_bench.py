"""Smoke test of `mtseg bench`: the whole code path on a tiny volume, one repeat; checks the report's
structure only (timings are never asserted)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip(
    "monai",
    reason="MONAI is a benchmark-only extra (pip install 'multitaskseg[bench]'); `mtseg bench` compares against it",
)
pytest.importorskip("psutil", reason="psutil is a benchmark-only extra (pip install 'multitaskseg[bench]')")


def test_bench_smoke(tmp_path, untrained_bundle):
    from MultiTaskSegTraining.cli import build_parser

    out = tmp_path / "BENCH.md"
    args = build_parser().parse_args(
        [
            "bench",
            "--bundle",
            str(untrained_bundle.path),
            "--sizes",
            "40x40x24@4:ct",
            "--repeats",
            "1",
            "--real-cases",
            "0",
            "--train-steps",
            "1",
            "--output",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ]
    )
    assert args.run(args) == 0
    report = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert set(report) >= {"machine", "cases", "training", "targets", "command"}
    assert report["machine"]["torch"] and report["machine"]["logical_cores"]
    assert len(report["cases"]) == 1
    for case in report["cases"]:
        assert "error" not in case, case.get("error")
        stages = case["stages_median_s"]
        assert {
            "load",
            "preprocess",
            "inference",
            "ood_gram",
            "ood",
            "uncertainty",
            "resample",
            "resample_uncertainty",
            "summary",
            "write",
            "total",
        } <= set(stages)
        assert case["peak_rss_mb"] > 0 and case["n_windows"] >= 1
        assert case["sw_ours_s"] > 0 and case["sw_monai_s"] > 0
        assert 0.0 <= case["uncertainty_ood_share"] <= 1.0
        # (the smoke bundle may have no quality model: its stage then takes no measurable time)
        assert 0.0 <= case["quality_share"] < 1.0
        assert case["trust_share"] == pytest.approx(case["ood_share"] + case["quality_share"])
        agreement = case["agreement"]
        assert set(agreement) >= {"dice_mean", "dice_min", "max_abs_prob_diff"}
        assert 0.0 <= agreement["dice_mean"] <= 1.0 and agreement["max_abs_prob_diff"] >= 0.0
        if "sw_ours_bf16_s" in case:  # the opt-in CPU bf16 path, timed in the same run
            assert case["sw_ours_bf16_s"] > 0 and 0.0 <= case["agreement_bf16_vs_ours"]["dice_mean"] <= 1.0
    training = report["training"]
    assert "error" not in training, training.get("error")
    assert training["patches_per_s"] > 0 and 0.0 <= training["data_fraction"] <= 1.0
    assert training["recipe"]["patches_per_s"] > 0 and training["recipe_speedup"] > 0  # the shipped recipe, same run
    text = out.read_text(encoding="utf-8")
    for heading in ("## Machine and versions", "## Command", "## End-to-end", "## Training throughput", "## Targets"):
        assert heading in text
    assert "mtseg bench" in text
