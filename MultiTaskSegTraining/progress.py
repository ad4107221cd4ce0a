"""Progress display on stderr (tqdm when installed, plain lines otherwise)."""

from __future__ import annotations

import sys


class StageBar:
    """A progress bar fed by the core's ``progress(stage, fraction)`` callbacks."""

    def __init__(self, title: str, disable: bool = False):
        self.title = title
        self.disable = disable or not sys.stderr.isatty()
        self.stage = None
        self.bar = None
        self._last_plain = None

    def update(self, stage: str, fraction: float) -> None:
        if self.disable:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            if stage != self._last_plain:
                print(f"{self.title}: {stage}", file=sys.stderr)
                self._last_plain = stage
            return
        if stage != self.stage:
            if self.bar is not None:
                self.bar.close()
            self.stage = stage
            self.bar = tqdm(
                total=100,
                desc=f"{self.title} {stage}",
                leave=False,
                file=sys.stderr,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}",
            )
        self.bar.n = int(round(100 * fraction))
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
