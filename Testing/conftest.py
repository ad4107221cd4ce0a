import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))
# the module folder, as Slicer puts it on the path: the MRML adapter and the shell's packages live
# there only (they are not in the pip package)
sys.path.insert(0, str(ROOT / "MultiTaskSeg"))

requires_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(),
    reason="../shared/data (the development datasets) is not present beside this clone; "
    "these tests run in CI where it is",
)


@pytest.fixture(scope="session")
def untrained_bundle(tmp_path_factory):
    from bundle_factory import make_untrained_bundle

    return make_untrained_bundle(tmp_path_factory.mktemp("bundle") / "untrained")


@pytest.fixture
def scene():
    """A real, empty MRML scene (slicer-core)."""
    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
    return slicer.vtkMRMLScene()


@pytest.fixture
def shell(monkeypatch, scene):
    """The Slicer module file imported with only its Qt GUI mocked, on ``scene`` (slicer_shell.py)."""
    from slicer_shell import import_shell

    return import_shell(monkeypatch, scene)
