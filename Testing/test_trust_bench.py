"""The trust benchmark's CI subset and `mtseg finalise` on real data (the shipped bundle, ../shared/data).

Two small contexts (CardiacCineMR, LeftAtriumMR), two fit cases each (clean, one artefact, one other
field of view), two test cases (clean, one other field of view), one corrupted test case per artefact
type, one far and one near OOD volume.
The full run is `mtseg trust` without --ci (docs/RESULTS.md, *Trust*).
"""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, SHARED_DATA, requires_shared_data
from MultiTaskSegTraining.trust_report import RECORDED, SHIPPED

pytestmark = requires_shared_data

BUNDLE = ROOT / "MultiTaskSeg" / "Resources" / "Models" / "default"
DATA = [str(SHARED_DATA / d) for d in ("CardiacCineMR", "LeftAtriumMR")]
OOD = [
    str(SHARED_DATA / "ood-dev" / f)
    for f in ("pyradiomics_prostate-phantom_image.nii.gz", "tcgalgg_tcga-du-7294-t2_image.nii.gz")
]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from MultiTaskSegTraining.cli import main

    out = tmp_path_factory.mktemp("trust")
    assert (
        main(
            [
                "trust",
                "--bundle",
                str(BUNDLE),
                "--data",
                *DATA,
                "--ood",
                *OOD,
                "-o",
                str(out),
                "--ci",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    return out


@pytest.mark.slow
def test_ci_benchmark_writes_every_table(bench):
    t = json.loads((bench / "trust.json").read_text())
    assert t["families"]["id"] == 4 and t["families"]["ood_far"] == 1 and t["families"]["ood_near"] == 1
    assert t["families"]["shift"] == 4 and t["families"]["fit"] == 4 and t["families"]["fit_shift"] == 4
    assert t["families"]["fit_fov"] == 4 and t["families"]["id_fov"] == 4  # field-of-view variants
    assert set(t["false_alarms"]["id_fov"]) == {"CardiacCineMR", "LeftAtriumMR"}
    far = t["ood_vs_test"]["far"]
    assert set(t["ood_vs_test_and_reframed"]["far"]) == set(far)
    assert set(far) >= {RECORDED, SHIPPED, "1-context_confidence", "1-expected_dice", "size_control"}
    assert all(0.0 <= v["auroc"] <= 1.0 for v in far.values())
    f = t["failure"]
    assert f["n_cases"] == 8 and f["aurc_oracle"] <= f["aurc_random"]
    assert all(f["aurc_oracle"] - 1e-9 <= s["aurc"] for s in f["signals"].values())
    assert set(t["false_alarms"]["id"]) == {"CardiacCineMR", "LeftAtriumMR"}
    assert (bench / "trust_roc.png").is_file() and (bench / "trust_risk_coverage.png").is_file()
    # a rerun reads every record from the cache
    assert len(list((bench / "records").rglob("*.json"))) == 26


@pytest.mark.slow
def test_finalise_refits_the_shipped_weights_and_predict_reports_quality(bench, tmp_path):
    import SimpleITK as sitk

    from MultiTaskSegLib.bundle import load_bundle, sha256_file
    from MultiTaskSegLib.predictor import Predictor
    from MultiTaskSegTraining.trust_finalise import refit_trust

    out = refit_trust(
        BUNDLE, DATA, tmp_path / "refit", bench / "records", fit_cases=2, device="cpu", log=lambda m: None
    )
    new, old = load_bundle(out), load_bundle(BUNDLE)
    assert sha256_file(out / "model.safetensors") == sha256_file(BUNDLE / "model.safetensors")
    assert new.meta["calibration"] == old.meta["calibration"]
    assert new.meta["ood"]["detector"] == "spectral-ctx-recognised+confidence" and new.quality_model() is not None
    assert set(new.meta["ood"]["combination"]) == {"spectral", "confidence"}
    assert (out / "MODEL_CARD.md").is_file()
    assert new.window.foreground_threshold == old.window.foreground_threshold  # not given: the bundle's own
    case = SHARED_DATA / "LeftAtriumMR" / "imagesTr" / "la_VDOF02M8ZHEAADFMS6NP.nii.gz"
    report = Predictor(new, "cpu").predict(sitk.ReadImage(str(case))).report()
    assert 0.0 <= report["quality"]["expected_dice"] <= 1.0
    assert report["ood"]["detector"].startswith("spectral-ctx-recognised+confidence:")
    with pytest.raises(Exception, match="already holds a bundle"):
        refit_trust(BUNDLE, DATA, out, bench / "records", fit_cases=2, device="cpu", log=lambda m: None)


def test_a_fit_case_gets_the_same_corrupted_variant_in_every_plan():
    # the 12-case fit at the end of `mtseg train` and `mtseg finalise --fit-cases all` share a record cache:
    # a case's variant must not depend on how many cases the plan picked
    from MultiTaskSegLib.bundle import load_bundle
    from MultiTaskSegTraining.trust_bench import Plan, work_list

    bundle = load_bundle(BUNDLE)
    keys = {n: {j.key for j in work_list(bundle, DATA, (), Plan(fit_cases=n, fit_only=True))} for n in (12, None)}
    shifted = {k for k in keys[12] if k.startswith("fit_shift/")}
    assert len(shifted) == 24 and shifted <= keys[None]
