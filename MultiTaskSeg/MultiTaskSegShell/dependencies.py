"""Python dependencies inside Slicer: torch through the PyTorch extension, the rest through pip.

Every install is asked for first; a declined install is a calm message, not an error.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import re
from pathlib import Path

import slicer

from MultiTaskSegLib.errors import MultiTaskSegError

REQUIREMENTS = Path(__file__).resolve().parent.parent / "Resources" / "requirements.txt"
#: The core calls torch APIs that older releases lack (same floor as pyproject.toml).
TORCH_MINIMUM = (2, 1)
TORCH_REQUIREMENT = ">=2.1"
DECLINED = "Installation declined: MultiTaskSeg needs {what} to segment. Press Apply again to install it."


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.13.0+cpu' → (2, 13)."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:2])


def _requirements() -> list[str]:
    return [
        line.strip()
        for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _importable(requirement: str) -> bool:
    name = re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0]
    return importlib.util.find_spec(name.replace("-", "_")) is not None


def ensure_torch(ask: bool) -> tuple[bool, str]:
    if importlib.util.find_spec("torch") is not None:
        import torch

        if version_tuple(torch.__version__) >= TORCH_MINIMUM:
            return True, ""
        raise MultiTaskSegError(
            f"PyTorch {torch.__version__} is too old: MultiTaskSeg needs torch{TORCH_REQUIREMENT}. "
            "Uninstall it in the PyTorch Utils module, restart Slicer and press Apply again."
        )
    try:
        import PyTorchUtils
    except ImportError:
        raise MultiTaskSegError(
            "MultiTaskSeg needs the PyTorch extension: install 'PyTorch' from the Extensions "
            "Manager and restart Slicer."
        ) from None
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=ask, torchVersionRequirement=TORCH_REQUIREMENT
    )
    if torch is None:
        return False, DECLINED.format(what="PyTorch")
    return True, ""


def ensure_packages(ask: bool) -> tuple[bool, str]:
    missing = [r for r in _requirements() if not _importable(r)]
    if not missing:
        return True, ""
    try:  # slicer.packaging is a submodule: it is not loaded by 'import slicer'
        packaging = importlib.import_module("slicer.packaging")
    except ImportError:
        packaging = None
    pip_ensure = getattr(packaging, "pip_ensure", None)
    if pip_ensure is not None:  # Slicer 5.12+: it asks, shows progress, skips in testing mode
        from packaging.requirements import Requirement

        parameters = inspect.signature(pip_ensure).parameters
        prompt = "prompt_install" if "prompt_install" in parameters else "prompt"
        try:
            pip_ensure([Requirement(r) for r in missing], requester="MultiTaskSeg", **{prompt: ask})
        except RuntimeError as exc:  # "User declined package installation"
            if "declined" not in str(exc).lower():
                raise
            return False, DECLINED.format(what=", ".join(missing))
        return True, ""
    if ask and not slicer.util.confirmOkCancelDisplay(
        f"MultiTaskSeg needs these Python packages: {', '.join(missing)}. Install them now?"
    ):
        return False, DECLINED.format(what=", ".join(missing))
    slicer.util.pip_install(missing)
    return True, ""


def ensure_dependencies(ask: bool = True) -> tuple[bool, str]:
    """(ready, message for the user when not)."""
    for step in (ensure_torch, ensure_packages):
        ok, message = step(ask)
        if not ok:
            logging.info(message)
            return False, message
    return True, ""
