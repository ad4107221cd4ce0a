"""A/B of the process memory tuning (process_memory.py): `Predictor.predict` with it on and off.

    python -m benchmarks.memory_ab IMAGE [--bundle B] [--threads 1] [--repeats 2]

Each setting runs in a fresh process (the tuning is process-wide and cannot be undone), predicting the
same image ``repeats`` times; prints per setting the median wall time, page faults, system CPU time, peak
RSS and the stage timings of the last run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from MultiTaskSegLib import DEFAULT_BUNDLE


def _child(image: str, bundle: str, threads: int, tuning: bool, repeats: int) -> dict:
    import torch

    from MultiTaskSegLib.bundle import load_bundle
    from MultiTaskSegLib.predictor import Predictor
    from MultiTaskSegLib.process_memory import allow_malloc_tuning
    from MultiTaskSegLib.volume_io import read_volume

    torch.set_num_threads(threads)
    allow_malloc_tuning(tuning)
    predictor = Predictor(load_bundle(bundle), "cpu")
    volume = read_volume(image)
    runs = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        prediction = predictor.predict(volume)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        runs.append(
            {
                "wall_s": wall,
                "faults": after.ru_minflt - before.ru_minflt,
                "sys_s": after.ru_stime - before.ru_stime,
                "stages": prediction.timings_s,
            }
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"runs": runs, "peak_rss_mb": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image")
    ap.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.image, args.bundle, args.threads, args.child == "on", args.repeats)))
        return
    for setting in ("off", "on"):
        cmd = [sys.executable, "-m", "benchmarks.memory_ab", args.image, "--bundle", args.bundle]
        cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats), "--child", setting]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        runs = result["runs"]
        print(
            f"tuning {setting}: wall {statistics.median(r['wall_s'] for r in runs):.2f} s, page faults "
            f"{statistics.median(r['faults'] for r in runs):.0f}, system CPU {statistics.median(r['sys_s'] for r in runs):.2f} s, "
            f"peak RSS {result['peak_rss_mb']:.0f} MB; last run's stages {runs[-1]['stages']}"
        )


if __name__ == "__main__":
    main()
