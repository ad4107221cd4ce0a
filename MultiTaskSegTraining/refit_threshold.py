"""Recompute a bundle's OOD threshold from its stored training signatures (no inference).

    python -m MultiTaskSegTraining.refit_threshold BUNDLE [--k 2.5]

Used when the threshold rule changes after a bundle was trained: the rule is recorded in
bundle.json together with the previous value, so the change stays visible.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from MultiTaskSegLib.bundle import META_FILE, load_bundle
from MultiTaskSegLib.ood import case_groups, loo_threshold


def refit(path: Path, k_std: float = 2.5) -> float:
    bundle = load_bundle(path)
    det = bundle.detector()
    threshold = loo_threshold(det.signatures.astype(float), k_std, case_groups(det.case_ids))
    meta = dict(bundle.meta)
    ood = dict(meta["ood"])
    ood.setdefault("history", []).append({"threshold": ood["threshold"], "rule": ood.get("threshold_rule")})
    ood["threshold"] = threshold
    ood["threshold_rule"] = f"mean + {k_std}·std of leave-one-case-out nearest-neighbour distances among training signatures"
    meta["ood"] = ood
    tmp = path / f".{META_FILE}.partial"
    tmp.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    os.replace(tmp, path / META_FILE)
    return threshold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--k", type=float, default=2.5)
    args = ap.parse_args()
    print(f"threshold {refit(args.bundle, args.k):.4f}")


if __name__ == "__main__":
    main()
