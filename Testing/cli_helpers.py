"""`mtseg predict` run as a user runs it: a fresh interpreter in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from MultiTaskSegLib.worker_process import PACKAGE_PARENT

ROOT = PACKAGE_PARENT.parent


def run_mtseg_predict(bundle: Path, volume: Path, out: Path) -> float:
    """Predict ``volume`` into ``out`` on the CPU; returns the wall time in seconds."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(PACKAGE_PARENT), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "MultiTaskSegTraining.cli",
            "predict",
            "--bundle",
            str(bundle),
            str(volume),
            "--output-dir",
            str(out),
            "--device",
            "cpu",
            "--quiet",
        ],
        check=True,
        env=env,
        cwd=str(ROOT),
        capture_output=True,
    )
    return time.perf_counter() - start
