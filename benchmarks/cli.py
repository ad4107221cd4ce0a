"""`mtseg bench` / `python -m benchmarks.cli`: options, the cases, one worker process per case, the report."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from MultiTaskSegLib import DEFAULT_BUNDLE
from MultiTaskSegLib.errors import MultiTaskSegError

from .bundles import default_architecture_bundle
from .report import render_markdown
from .summary import evaluate_targets, machine_info, shares, summarise, train_log_summary

# name → (size xyz, spacing xyz mm, kind, description)
SIZES = {
    "128": ((128, 128, 128), (1.5, 1.5, 1.5), "mr", "128³ MR head phantom, 1.5 mm"),
    "256": ((256, 256, 160), (1.0, 1.0, 1.5), "mr", "256×256×160 MR head phantom, 1×1×1.5 mm"),
    "ct": ((512, 512, 300), (0.7, 0.7, 1.0), "ct", "512×512×300 CT body phantom, 0.7×0.7×1 mm"),
}
DEFAULT_SIZES = "128,256,ct"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bundle",
        help="model bundle (default: the shipped default model, else an untrained "
        "network of the default architecture — fine for timing, not for agreement figures)",
    )
    p.add_argument(
        "--checkpoint",
        help="no bundle: use the weights of this training checkpoint (checkpoint.pt of a "
        "default-architecture `mtseg train` run, e.g. while the default model is still training)",
    )
    p.add_argument(
        "--sizes",
        default=DEFAULT_SIZES,
        help=f"comma-separated synthetic sizes: {', '.join(SIZES)} or XxYxZ[@SPACING][:ct|:mr] "
        f"(default {DEFAULT_SIZES}; 'none' for no synthetic volumes)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per case (median reported)")
    p.add_argument("--large-repeats", type=int, default=2, help="repeats for inputs of 8 M voxels or more")
    p.add_argument("--ct-repeats", type=int, default=1, help="repeats for the 512×512×300 CT")
    p.add_argument("--data", default=str(SHARED_DATA), help="MSD data root for real cases (skipped if absent)")
    p.add_argument("--real-cases", type=int, default=2, help="real cases: the first image of this many datasets")
    p.add_argument("--real-repeats", type=int, default=1, help="repeats for the real cases")
    p.add_argument("--train-steps", type=int, default=4, help="timed training steps (0 = skip training throughput)")
    p.add_argument("--no-monai", action="store_true", help="skip the MONAI comparison")
    p.add_argument("--no-bf16", action="store_true", help="skip timing the opt-in CPU bf16 sliding window")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument(
        "--output", "-o", default="BENCHMARKS.md", help="markdown report (a .json with the raw numbers beside it)"
    )
    p.add_argument("--work-dir", help="where volumes and outputs go (default: a temporary folder)")
    p.add_argument("--note", action="append", default=[], help="extra line for the report (repeatable)")
    p.add_argument(
        "--from-json", metavar="JSON", help="only re-render the markdown from the raw numbers of an earlier run"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one case spec (JSON file)


def parse_size(token: str) -> dict:
    token = token.strip()
    if token in SIZES:
        size, spacing, kind, desc = SIZES[token]
        return {"name": token, "size": list(size), "spacing": list(spacing), "kind": kind, "description": desc}
    kind = "ct"
    if ":" in token:
        token, kind = token.split(":")
    spacing = [2.0, 2.0, 2.0]
    if "@" in token:
        token, sp = token.split("@")
        spacing = [float(s) for s in sp.split(",")]
        spacing = spacing * 3 if len(spacing) == 1 else spacing
    size = [int(s) for s in token.lower().split("x")]
    if len(size) != 3 or len(spacing) != 3 or kind not in ("ct", "mr"):
        raise MultiTaskSegError(f"--sizes: cannot read {token!r} (expected e.g. 128, ct or 96x96x64@1.5:mr)")
    desc = f"{'×'.join(map(str, size))} {kind.upper()} phantom, {'×'.join(f'{s:g}' for s in spacing)} mm"
    return {"name": "x".join(map(str, size)), "size": size, "spacing": spacing, "kind": kind, "description": desc}


def write_phantom(spec: dict, folder: Path) -> Path:
    from MultiTaskSegLib.volume_io import write_volume

    from .phantoms import ct_phantom, mr_phantom

    path = folder / f"phantom_{spec['name']}_{spec['kind']}.nii.gz"
    if not path.exists():
        make = ct_phantom if spec["kind"] == "ct" else mr_phantom
        write_volume(make(spec["size"], spec["spacing"], seed=1), path)
    return path


def real_cases(root: Path, n: int) -> list[dict]:
    if n <= 0 or not root.is_dir():
        return []
    out = []
    for ds in sorted(p for p in root.iterdir() if (p / "dataset.json").is_file()):
        images = sorted((ds / "imagesTr").glob("*.nii*"))
        if images:
            out.append(
                {
                    "name": f"{ds.name}/{images[0].name.split('.')[0]}",
                    "path": str(images[0]),
                    "kind": "real",
                    "description": f"real: {ds.name} {images[0].name}",
                }
            )
        if len(out) >= n:
            break
    return out


def _spawn(spec: dict, work: Path, tag: str) -> dict:
    spec_path = work / f"spec_{tag}.json"
    spec["result"] = str(work / f"result_{tag}.json")
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    cmd = [sys.executable, "-m", "benchmarks.cli", "--worker", str(spec_path)]
    env = dict(os.environ)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root / "MultiTaskSeg"), str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"name": spec.get("name", tag), "error": "\n".join(tail)}
    return json.loads(Path(spec["result"]).read_text(encoding="utf-8"))


def run(args: argparse.Namespace) -> int:
    if args.worker:
        from .workers import worker_main

        return worker_main(args.worker)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)  # before the long run, not after it
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        for case in report["cases"]:  # shares and targets added since that run are derived from its stage times
            if "stages_median_s" in case:
                case.update(shares(case["stages_median_s"]))
        report["targets"] = evaluate_targets([c for c in report["cases"] if "error" not in c])
        Path(args.output).write_text(render_markdown(report), encoding="utf-8")
        print(f"bench: rendered {args.output} from {args.from_json}", file=sys.stderr)
        return 0
    try:
        import psutil  # noqa: F401

        if not args.no_monai:
            import monai  # noqa: F401
    except ImportError as exc:
        raise MultiTaskSegError(f"'mtseg bench' needs {exc.name}: pip install 'multitaskseg[bench]'") from None
    t_start = time.perf_counter()
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="mtseg_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        import torch

        step = torch.load(args.checkpoint, map_location="cpu", weights_only=True).get("step", "?")
        bundle_path = default_architecture_bundle(work / "checkpoint_default_arch", args.checkpoint)
        note = (
            f"default-architecture network with the weights of `{args.checkpoint}` (training step {step}, "
            "partially trained; the default model did not exist yet; OOD signatures and threshold are placeholders)"
        )
    elif args.bundle:
        bundle_path, note = Path(args.bundle), f"`{args.bundle}`"
    elif (DEFAULT_BUNDLE / "bundle.json").is_file():
        bundle_path, note = DEFAULT_BUNDLE, "the shipped default model (MultiTaskSeg/Resources/Models/default)"
    else:
        bundle_path = work / "untrained_default_arch"
        if not (bundle_path / "bundle.json").is_file():
            default_architecture_bundle(bundle_path)
        note = (
            "untrained network of the default architecture (the default model did not exist yet); "
            "timings are valid, agreement figures are for untrained weights"
        )
    from MultiTaskSegLib.bundle import load_bundle

    b = load_bundle(bundle_path)
    note += (
        f" — widths {list(b.network_config.widths)}, {b.network_config.out_channels} outputs, window "
        f"{list(b.window.patch_size)}, overlap {b.window.overlap}, {b.window.batch_size} windows per batch, "
        f"spacing {list(b.preprocessing.target_spacing)} mm, OOD taps {b.detector().layers}"
    )
    machine = machine_info()
    specs = []
    sizes = [] if args.sizes.strip().lower() == "none" else [parse_size(t) for t in args.sizes.split(",") if t.strip()]
    for s in sizes:
        print(f"bench: writing the {s['description']} …", file=sys.stderr)
        s["path"] = str(write_phantom(s, work))
        s["repeats"] = (
            args.ct_repeats if s["name"] == "ct" else args.large_repeats if np.prod(s["size"]) >= 8e6 else args.repeats
        )
        s["weightmap_check"] = not specs  # the first (smallest) synthetic case
        specs.append(s)
    skipped = []
    reals = real_cases(Path(args.data), args.real_cases)
    if args.real_cases > 0 and not reals:
        skipped.append(f"real cases: {args.data} not found")
    for s in reals:
        s["repeats"] = args.real_repeats
        specs.append(s)
    cases = []
    for i, s in enumerate(specs):
        print(f"bench: [{i + 1}/{len(specs)}] {s['description']} ({s['repeats']} repeats) …", file=sys.stderr)
        spec = {
            **s,
            "kind": "case",
            "bundle": str(bundle_path),
            "device": args.device,
            "threads": args.threads,
            "monai": not args.no_monai,
            "bf16": not args.no_bf16,
            "out_dir": str(work / f"out_{i}"),
        }
        raw = _spawn(spec, work, f"case{i}")
        if "error" not in raw and not args.no_monai:  # the MONAI pipeline, in a process of its own
            raw["monai_pipeline"] = _spawn(
                {
                    **spec,
                    "kind": "monai_pipeline",
                    "modality": raw["modality"],
                    "ours_seg": raw["seg_path"],
                    "keep": raw.get("context_labels"),
                },
                work,
                f"monai{i}",
            )
        summary = summarise(raw)
        summary["raw"] = raw
        cases.append(summary)
        if "error" in summary:
            print(f"bench: {s['name']} failed:\n{summary['error']}", file=sys.stderr)
        else:
            print(
                f"bench:   end-to-end {summary['total_s']:.1f} s (MONAI pipeline "
                f"{summary.get('monai_e2e_s', float('nan')):.1f} s); sliding window ours "
                f"{summary.get('sw_ours_s', float('nan')):.1f} s vs MONAI {summary.get('sw_monai_s', float('nan')):.1f} s; "
                f"peak RSS {summary['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
            )
    training = None
    if args.train_steps > 0:
        print("bench: training throughput …", file=sys.stderr)
        training = _spawn(
            {"kind": "train", "bundle": str(bundle_path), "steps": args.train_steps, "threads": args.threads},
            work,
            "train",
        )
    output = Path(args.output)
    report = {
        "machine": machine,
        "bundle_note": note,
        "cases": cases,
        "training": training,
        "skipped": skipped,
        "train_log": train_log_summary(),
        "command": "mtseg bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "bench"
        else "mtseg bench " + " ".join(shlex.quote(a) for a in _argv_of(args)),
        "notes": list(args.note),
        "targets": evaluate_targets(cases),
        "json": str(output.with_suffix(".json")),
        "wall_s": time.perf_counter() - t_start,
    }
    try:
        report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    output.write_text(render_markdown(report), encoding="utf-8")
    output.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    print(
        f"bench: wrote {output} and {output.with_suffix('.json')} in {report['wall_s'] / 60:.1f} min", file=sys.stderr
    )
    return 0


def _argv_of(args: argparse.Namespace) -> list[str]:
    """Reconstruct the options when called programmatically (tests)."""
    out = []
    for k, v in vars(args).items():
        if k in ("run", "command", "worker") or v in (None, False, []):
            continue
        flag = "--" + k.replace("_", "-")
        out += [flag] if v is True else [flag, str(v)]
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.cli` (what `mtseg bench` runs, and how the worker processes start)."""
    parser = argparse.ArgumentParser(prog="mtseg bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except MultiTaskSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
