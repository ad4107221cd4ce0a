#!/usr/bin/env python
"""Train and evaluate the comparison arms of docs/RESULTS.md: joint vs dedicated vs transfer.

    python scripts/experiments.py --data-root ../shared/data --out runs/arms [--stage train|evaluate|all]
        [--arms joint pretrain_without_LeftAtriumMR transfer_LeftAtriumMR ...]

Every arm uses configs/arms.yaml (same architecture, budget and seeded split). Transfer =
pre-train on the other datasets for the same budget, then fine-tune the whole network on the
target for the same budget again. Finished arms are skipped, so the script can be rerun.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

DATASETS = ["CardiacCineMR", "LeftAtriumMR", "AbdomenCT", "BrainTumorMR", "BrainStructuresMR"]
# issue 11: the contexts with enough cases for a paired test (dedicated and transfer arms for each)
TARGETS = [
    "LeftAtriumMR",
    "BrainTumorMR",
    "CardiacCineMR",
]  # small datasets first: where joint training should help most
ROOT = Path(__file__).resolve().parents[1]
MTSEG = [sys.executable, "-m", "MultiTaskSegTraining.cli"]


def arms(data_root: Path) -> list[tuple[str, list[Path], dict]]:
    d = {n: data_root / n for n in DATASETS}
    out = [("joint", [d[n] for n in DATASETS], {})]
    out += [(f"dedicated_{n}", [d[n]], {}) for n in TARGETS]
    for t in TARGETS:
        others = [d[n] for n in DATASETS if n != t]
        out.append((f"pretrain_without_{t}", others, {}))
        out.append((f"transfer_{t}", [d[t]], {"init": f"pretrain_without_{t}"}))
    return out


def run(cmd: list[str], log: Path) -> None:
    print("$", " ".join(str(c) for c in cmd), flush=True)
    with open(log, "a", encoding="utf-8") as f:
        code = subprocess.call([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if code:
        sys.exit(f"failed ({code}); see {log}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "arms")
    ap.add_argument("--stage", choices=["train", "evaluate", "all"], default="all")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "arms.yaml")
    ap.add_argument("--arms", nargs="+", metavar="NAME", help="run only these arms, in the script's order")
    args = ap.parse_args()
    all_arms = arms(args.data_root.resolve())
    unknown = sorted(set(args.arms or []) - {name for name, _, _ in all_arms})
    if unknown:
        sys.exit(f"unknown arm(s) {', '.join(unknown)}; the arms are: {', '.join(n for n, _, _ in all_arms)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data, extra in all_arms:
        if args.arms and name not in args.arms:
            continue
        bundle = args.out / name
        untrained = not (bundle / "bundle.json").exists()
        if untrained and "init" in extra and not (args.out / extra["init"] / "bundle.json").exists():
            sys.exit(f"{name} needs {extra['init']} first: add it to --arms")
        log = args.out / f"{name}.log"
        if args.stage in ("train", "all") and not (bundle / "bundle.json").exists():
            cmd = MTSEG + [
                "train",
                *data,
                "--config",
                args.config,
                "-o",
                bundle,
                "--work-dir",
                args.out / f"{name}_work",
            ]
            if (args.out / f"{name}_work" / "checkpoint.pt").exists():
                cmd.append("--resume")
            if "init" in extra:
                cmd += ["--init-bundle", args.out / extra["init"], "--finetune", "all"]
            run(cmd, log)
        if args.stage in ("evaluate", "all") and not (bundle / "bundle.json").exists():
            print(f"{name}: not trained yet, skipped", flush=True)
            continue
        if (
            args.stage in ("evaluate", "all")
            and not name.startswith("pretrain")
            and not (args.out / f"{name}_eval" / "metrics.json").exists()
        ):
            # segmentation and calibration only: the OOD comparison is made on the shipped model
            run(
                MTSEG
                + [
                    "evaluate",
                    "--bundle",
                    bundle,
                    "--data",
                    *data,
                    "--output-dir",
                    args.out / f"{name}_eval",
                    "--mc-dropout",
                    "0",
                    "--size-control-cases",
                    "0",
                    "--max-train-cases",
                    "2",
                    "--threads",
                    "1",
                    "--quiet",
                ],
                log,
            )


if __name__ == "__main__":
    main()
