"""scripts/make_results.py keeps the numbers behind docs/RESULTS.md: the archive in results/ and the rows
it keeps from the page when the run behind them is gone (constructed pages with known answers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
make_results = pytest.importorskip("make_results")

PAGE = """# Results

## 1. Joint vs dedicated

| context | structure | joint | dedicated | transfer | joint HD95 | dedicated HD95 | transfer HD95 | p |
|---|---|---|---|---|---|---|---|---|
| CardiacCineMR | right ventricle | 0.6 | 0.7 | not run | 49 | 75 | – | 0.03 |
| LeftAtriumMR | left atrium | 0.8 | 0.9 | not run | 8 | 3 | – | 0.007 |

| context | arm | last validation points (step: Dice) |
|---|---|---|
| CardiacCineMR | joint | 3000: 0.584 |

## 2. Calibration

| model | context | ECE T=1 | ECE T=fit | MCE T=1 | MCE T=fit | bECE T=1 | bECE T=fit | T |
|---|---|---|---|---|---|---|---|---|
| dedicated arm | CardiacCineMR | 0.1 | 0.1 | 0.1 | 0.1 | 0.1 | 0.1 | 1.4 |

## 3. OOD

text of section 3
"""


def test_archive_copies_matching_files_with_their_paths(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (runs / "joint_eval").mkdir(parents=True)
    (runs / "joint_eval" / "metrics.json").write_text("{}")
    (runs / "joint_eval" / "case.nii.gz").write_text("not archived")
    (runs / "joint_work").mkdir()
    (runs / "joint_work" / "validation.jsonl").write_text("{}\n")
    dst = make_results.archive(runs, tmp_path / "results", ["*_eval/metrics.json", "*_work/validation.jsonl"])
    files = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
    assert files == ["joint_eval/metrics.json", "joint_work/validation.jsonl"]
    # a run directory that is gone leaves the archive as it is
    assert make_results.archive(tmp_path / "gone", dst, ["*_eval/metrics.json"]) == dst
    assert (dst / "joint_eval" / "metrics.json").exists()


def test_page_rows_pick_one_table_and_mark_once(tmp_path: Path) -> None:
    page = tmp_path / "RESULTS.md"
    page.write_text(PAGE, encoding="utf-8")
    rows = make_results.page_rows(page, "## 1.", ["CardiacCineMR"], 9)
    assert rows == ["| CardiacCineMR † | right ventricle | 0.6 | 0.7 | not run | 49 | 75 | – | 0.03 |"]
    assert make_results.page_rows(page, "## 1.", ["CardiacCineMR"], 3) == ["| CardiacCineMR † | joint | 3000: 0.584 |"]
    assert make_results.page_rows(page, "## 2.", ["dedicated arm", "CardiacCineMR"], 9)[0].startswith(
        "| dedicated arm † | CardiacCineMR |"
    )
    assert make_results.page_rows(page, "## 2.", ["dedicated arm", "LeftAtriumMR"], 9) == []
    # a page that already carries the mark keeps one mark
    page.write_text(PAGE.replace("| CardiacCineMR | right", "| CardiacCineMR † | right"), encoding="utf-8")
    assert make_results.page_rows(page, "## 1.", ["CardiacCineMR"], 9)[0].startswith("| CardiacCineMR † | right")
    assert make_results.kept_footnote(rows)[1].startswith("† kept")
    assert make_results.kept_footnote(["| LeftAtriumMR | left atrium |"]) == []


def test_page_section_is_kept_with_one_note(tmp_path: Path) -> None:
    page = tmp_path / "RESULTS.md"
    page.write_text(PAGE, encoding="utf-8")
    first = make_results.page_section(page, "## 3.")
    assert first[0] == "## 3. OOD" and "text of section 3" in first and first[2].startswith("*Kept")
    page.write_text("\n".join(first) + "\n", encoding="utf-8")
    assert make_results.page_section(page, "## 3.") == first
    assert make_results.page_section(page, "## 9.") == []


def test_paired_test_takes_one_pair_per_patient():
    from scipy.stats import wilcoxon

    # 7 patients, two frames each: the frames' differences are averaged into one pair per patient
    a = {f"p{i}_frame0{f}": 0.80 + 0.01 * i + 0.02 * f for i in range(7) for f in (1, 2)}
    b = {k: v - (0.03 if k.endswith("1") else 0.01) - 0.001 * int(k[1]) for k, v in a.items()}
    p, n = make_results.paired_p({"cases": a}, {"cases": b})
    per_patient = [0.02 + 0.001 * i for i in range(7)]
    assert n == "7 patients, 14 cases"
    assert p == f"{wilcoxon(per_patient).pvalue:.2g}" != f"{wilcoxon(list(a.values()), list(b.values())).pvalue:.2g}"
    # under 6 patients no test is run, and the count still says why
    few = {k: v for k, v in a.items() if int(k[1]) < 5}
    assert make_results.paired_p({"cases": few}, {"cases": b}) == ("–", "5 patients, 10 cases")
