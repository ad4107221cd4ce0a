#!/usr/bin/env python
"""Candidate combined OOD scores from `mtseg trust` records (analysis only, nothing shipped).

    python scripts/trust_combinations.py RECORDS_DIR BUNDLE

Each signal is put on a common scale from the fit records only (train/val cases: log-score minus
the fit median, over the fit spread; the spectral score uses its leave-one-case-out fit scores),
then combined by mean or max; AUROC against the test split (family ``id``).
"""

import glob
import json
import sys

import numpy as np

from MultiTaskSegLib.bundle import load_bundle
from MultiTaskSegTraining.ood_baselines import detection_metrics
from MultiTaskSegTraining.trust_fit import fit_detector, signature_rows

records_dir, bundle_dir = sys.argv[1], sys.argv[2]
recs = [json.loads(open(f).read()) for f in glob.glob(f"{records_dir}/**/*.json", recursive=True)]
b = load_bundle(bundle_dir)
fit = [r for r in recs if r["family"] == "fit"]
rest = [r for r in recs if r["family"] not in ("fit", "fit_shift")]
det, loo = fit_detector(fit, ["enc3", "enc4"], b.context_names)
spec = np.array([det.nearest(s)[0] for s in signature_rows(rest, det.layers)])


def conf(r):
    return 1 - r["context_probs"][r["recognised"]]


def ent(r):
    allowed = [str(v) for v in b.contexts[r["recognised"]]["labels"]]
    return float(np.mean([r["evidence"][v]["mean_entropy"] for v in allowed]))


c_rest = np.array([conf(r) for r in rest])
e_rest = np.array([ent(r) for r in rest])
ref_c = np.array([conf(r) for r in fit])
ref_e = np.array([ent(r) for r in fit])


def z(x, ref):  # log-ratio to the reference median / spread
    lr = np.log(np.maximum(ref, 1e-6))
    return (np.log(np.maximum(x, 1e-6)) - np.median(lr)) / (np.std(lr) + 1e-9)


zs = (np.log(spec) - np.median(np.log(loo))) / np.std(np.log(loo))
zc, ze = z(c_rest, ref_c), z(e_rest, ref_e)
fam = np.array([r["family"] for r in rest])
combos = {
    "spectral": zs,
    "conf": zc,
    "entropy": ze,
    "max(spec,conf)": np.maximum(zs, zc),
    "mean(spec,conf)": (zs + zc) / 2,
    "mean(spec,conf,ent)": (zs + zc + ze) / 3,
    "max(spec,conf,ent)": np.maximum(np.maximum(zs, zc), ze),
}
neg = fam == "id"
for name, s in combos.items():
    out = []
    for g in ("ood_far", "ood_near"):
        m = detection_metrics(s[neg], s[fam == g])
        out.append(f"{g} {m['auroc']:.3f}")
    m = detection_metrics(s[neg], s[np.isin(fam, ["ood_far", "ood_near"])])
    out.append(f"far+near {m['auroc']:.3f}")
    m = detection_metrics(s[neg], s[fam == "shift"])
    out.append(f"shift {m['auroc']:.3f}")
    print(f"{name:22s}", "  ".join(out))
