"""Dice of a training checkpoint on the validation cases, clean and with the trust benchmark's artefact,
against the cached records of the bundle it was fine-tuned from (no test case is read).

Run 4 of the default model (docs/training_runs.md) ships only if its validation Dice holds and its
corrupted validation cases lose less Dice; this is that check, for any checkpoint on the way:

    PYTHONPATH=MultiTaskSeg:. python scripts/val_shift_check.py --bundle MultiTaskSeg/Resources/Models/default \
        --checkpoint runs/default_v6_work/checkpoint.pt --records runs/trust_v5/records \
        --data ../shared/data/{CardiacCineMR,LeftAtriumMR,AbdomenCT,BrainTumorMR}

The checkpoint's weights go into a copy of the bundle (its temperature, post-processing and trust fit
stay the bundle's: they do not change the argmax Dice); every job is the one the trust benchmark ran,
with the same seeded artefact, so the two Dice values of a case are paired.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from MultiTaskSegLib.bundle import load_bundle, save_bundle
from MultiTaskSegLib.predictor import Predictor
from MultiTaskSegTraining.trust_bench import Plan, run_job, work_list
from MultiTaskSegTraining.trust_fit import case_dice


def with_weights(bundle_dir: Path, state: dict, out: Path) -> Path:
    """A copy of the bundle at ``out`` with the network weights ``state``."""
    bundle = load_bundle(bundle_dir)
    with np.load(bundle.path / "signatures.npz", allow_pickle=False) as d:
        sig, ctx, ids = d["signatures"], d["context_index"], list(d["case_ids"])
    save_bundle(out, bundle.meta, state, sig, ctx, ids)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="the bundle the run was fine-tuned from")
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--records", type=Path, required=True, help="that bundle's trust records (mtseg trust)")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    step = checkpoint.get("step", "?")
    with tempfile.TemporaryDirectory() as tmp:
        predictor = Predictor(load_bundle(with_weights(args.bundle, checkpoint["model"], Path(tmp) / "b")), "cpu")
        bundle = predictor.bundle
        val = {c for name, part in bundle.meta["training"]["split"].items() for c in part["val"]}
        jobs = [
            j
            for j in work_list(bundle, args.data, [], Plan(fit_cases=None, fit_only=True, field_of_view=False))
            if j.key.split("__")[1] in val
        ]
        rows: dict[str, list[tuple[float, float]]] = {"fit": [], "fit_shift": []}
        for i, job in enumerate(jobs, 1):
            old_path = args.records / f"{job.key}.json"
            if not old_path.is_file():
                print(f"[{i}/{len(jobs)}] {job.key}: no record of the bundle, skipped")
                continue
            old = case_dice(json.loads(old_path.read_text(encoding="utf-8")))
            new = case_dice(run_job(predictor, job))
            if old is None or new is None:
                continue
            rows[job.family].append((old, new))
            print(f"[{i}/{len(jobs)}] {job.key}: Dice {old:.3f} → {new:.3f}", flush=True)
    print(f"\ncheckpoint step {step} against the bundle, validation cases (mean case Dice):")
    print("| family | n | bundle | checkpoint | checkpoint better on |\n|---|---|---|---|---|")
    for family, pairs in rows.items():
        if pairs:
            a = np.asarray(pairs)
            print(
                f"| {'clean' if family == 'fit' else 'one artefact each'} | {len(a)} | {a[:, 0].mean():.3f} | "
                f"{a[:, 1].mean():.3f} | {int((a[:, 1] > a[:, 0]).sum())} of {len(a)} |"
            )


if __name__ == "__main__":
    main()
