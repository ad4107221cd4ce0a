"""`mtseg predict`: segment volumes with a bundle, writing labels, uncertainty and a JSON report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from MultiTaskSegLib import DEFAULT_BUNDLE
from MultiTaskSegLib.bundle import load_bundle
from MultiTaskSegLib.errors import MultiTaskSegError
from MultiTaskSegLib.outputs import output_paths, save_prediction
from MultiTaskSegLib.predictor import PredictOptions, Predictor
from MultiTaskSegLib.process_memory import reuse_freed_memory
from MultiTaskSegLib.volume_io import case_name, is_volume_file, read_volume

from .progress import StageBar


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="volume file (NIfTI, NRRD, MHA), DICOM series folder, or folder of volume files",
    )
    p.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="model bundle directory (default: the shipped model)")
    p.add_argument(
        "--output-dir", "-o", required=True, help="where <case>_seg.nii.gz, _uncertainty.nii.gz and .json go"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu"])
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation (4× slower)")
    p.add_argument("--mc-dropout", type=int, default=0, metavar="N", help="add N MC-dropout passes to the uncertainty")
    p.add_argument("--modality", choices=["CT", "MR"], help="override modality detection from intensities")
    p.add_argument(
        "--restrict-to-context",
        dest="restrict",
        action="store_true",
        default=None,
        help="keep only the structures of the recognised context (default: the bundle's setting)",
    )
    p.add_argument("--no-restrict-to-context", dest="restrict", action="store_false")
    p.add_argument(
        "--cpu-bf16",
        action="store_true",
        help="bf16 arithmetic on CPU with PyTorch's standard layers; on the benchmark CPU (AMX-BF16) it is "
        "often faster than the default fp32 kernels (0.97-1.9x, by volume and run), but its labels differ slightly "
        "(mean Dice 0.96-0.99) and the OOD score is calibrated at full precision (see BENCHMARKS.md)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: refuse)")
    p.add_argument("--png", action="store_true", help="also write <case>_overlay.png: a slice with both overlays")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def collect_cases(inputs: list[str]) -> list[tuple[str, Path]]:
    """(case name, path) for every input; a folder is a DICOM series or holds volume files.

    In a folder, the outputs of an earlier run (``<case>_seg`` and ``<case>_uncertainty`` beside their
    ``<case>.json`` report) are skipped with a notice: segmenting a segmentation helps no one, and a
    folder predicted into once (``-o`` = the input folder) would otherwise double its cases on every run.
    """
    cases = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if is_volume_file(f))
            earlier = [f for f in files if is_earlier_output(f)]
            if earlier:
                print(
                    f"{path}: skipping {len(earlier)} file(s) written by an earlier `mtseg predict` "
                    f"(e.g. {earlier[0].name}); give such a file by its path to segment it anyway",
                    file=sys.stderr,
                )
            files = [f for f in files if f not in earlier]
            if files:
                cases += [(case_name(f), f) for f in files]
            elif earlier:
                raise MultiTaskSegError(f"{path}: holds only outputs of an earlier `mtseg predict`, no input volume")
            else:  # maybe a DICOM series; read_volume says so clearly if not
                cases.append((path.name, path))
        else:
            cases.append((case_name(path), path))
    return cases


def is_earlier_output(path: Path) -> bool:
    """``<case>_seg.*`` or ``<case>_uncertainty.*`` with the report ``<case>.json`` of that run beside it."""
    name = case_name(path)
    for suffix in ("_seg", "_uncertainty"):
        if name.endswith(suffix) and output_paths(path.parent, name[: -len(suffix)])["report"].exists():
            return True
    return False


def run(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.bundle)
    out = Path(args.output_dir)
    cases = collect_cases(args.inputs)
    names = [c for c, _ in cases]
    dupes = sorted({c for c in names if names.count(c) > 1})
    if dupes:
        raise MultiTaskSegError(
            f"several inputs share the case name(s) {', '.join(dupes)}; their outputs would collide"
        )
    if not args.overwrite:
        existing = [str(p) for c in names for p in output_paths(out, c).values() if p.exists()]
        if existing:
            raise MultiTaskSegError(
                f"{existing[0]} already exists ({len(existing)} output file(s) in total); "
                "choose another --output-dir or pass --overwrite"
            )
    predictor = Predictor(bundle, args.device)
    options = PredictOptions(
        args.device, args.tta, args.mc_dropout, args.modality, args.restrict, cpu_bf16=args.cpu_bf16
    )
    failures = []
    for i, (case, path) in enumerate(cases):
        bar = StageBar(f"[{i + 1}/{len(cases)}] {case}", disable=args.quiet)
        try:
            with reuse_freed_memory():  # the file read and writes reuse the heap too (process_memory.py)
                image = read_volume(path)
                prediction = predictor.predict(image, options, progress=bar.update)
                save_prediction(prediction, output_paths(out, case), {"input": str(path), "bundle": str(bundle.path)})
            if args.png:
                from .snapshot import write_overlay_png

                colors = {int(l["value"]): l["color"] for l in bundle.labels}
                flag = " — OUT OF DISTRIBUTION" if prediction.ood.is_ood else ""
                write_overlay_png(
                    image,
                    prediction.labels,
                    prediction.uncertainty,
                    colors,
                    prediction.label_names,
                    out / f"{case}_overlay.png",
                    f"{case}: context {prediction.context}, OOD score "
                    f"{prediction.ood.score:.3f} / threshold {prediction.ood.threshold:.3f}{flag}",
                )
            bar.close()
            flag = "OUT OF DISTRIBUTION" if prediction.ood.is_ood else "in distribution"
            print(
                f"{case}: context {prediction.context}; OOD score {prediction.ood.score:.3f} "
                f"(threshold {prediction.ood.threshold:.3f}, {flag}); {prediction.timings_s['total']:.1f} s",
                file=sys.stderr,
            )
        except MultiTaskSegError as exc:
            bar.close()
            failures.append(str(exc))
            print(f"error: {exc}", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {len(cases)} case(s) failed", file=sys.stderr)
        return 1
    return 0
