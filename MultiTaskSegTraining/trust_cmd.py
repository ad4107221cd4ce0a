"""`mtseg trust`: the trust benchmark (OOD families, artefacts, failure detection) of a bundle.

    mtseg trust --bundle B --data DATASET... --ood ../shared/data/ood-dev -o OUT [--ci]

Records are cached under OUT/records (an interrupted run resumes); OUT/trust.json holds the
tables and OUT/*.png the ROC and risk-coverage plots. ``--ci`` runs the small subset CI uses.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .finalise_cmd import add_fit_cases_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", required=True, help="model bundle directory")
    p.add_argument("--data", nargs="+", required=True, metavar="DATASET", help="the bundle's MSD dataset folders")
    p.add_argument("--ood", nargs="*", default=[], metavar="FOLDER", help="OOD volume folders (e.g. ood-dev)")
    p.add_argument("--output-dir", "-o", required=True, help="where records/, trust.json and the plots go")
    p.add_argument("--ci", action="store_true", help="the small CI subset (2 cases per context, 2 artefacts)")
    add_fit_cases_argument(p, "; use the bundle's own (`mtseg finalise --fit-cases`) to measure it")
    p.add_argument("--records-only", action="store_true", help="compute the cached records, skip the analysis")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu"])
    p.add_argument("--threads", type=int, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    import torch

    from MultiTaskSegLib.bundle import load_bundle
    from MultiTaskSegLib.predictor import Predictor

    from .trust_bench import CI_PLAN, Plan, run_all, work_list

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    bundle = load_bundle(args.bundle)
    plan = CI_PLAN if args.ci else dataclasses.replace(Plan(), fit_cases=args.fit_cases)
    jobs = work_list(bundle, args.data, args.ood, plan)
    print(f"trust benchmark: {len(jobs)} image(s) ({'CI subset' if args.ci else 'full plan'})", file=sys.stderr)
    records = run_all(
        Predictor(bundle, args.device), jobs, out / "records", log=lambda m: print(m, file=sys.stderr, flush=True)
    )
    if args.records_only:
        return 0
    from .trust_report import write_report

    write_report(bundle, records, out)
    return 0
