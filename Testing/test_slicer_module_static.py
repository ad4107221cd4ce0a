"""Static checks of the Slicer module where the Qt GUI cannot run: .ui ↔ Python names,
CMake packaging completeness, the import layering of DESIGN.md, no inference thread, and the
Slicer calls against the list of what Slicer 5.8 defines (slicer_api.txt)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "MultiTaskSeg"
SHELL = MODULE / "MultiTaskSeg.py"
SHELL_PACKAGE = MODULE / "MultiTaskSegShell"
UI = MODULE / "Resources" / "UI" / "MultiTaskSeg.ui"
CMAKE = MODULE / "CMakeLists.txt"
LIB = MODULE / "MultiTaskSegLib"
MRML = MODULE / "MultiTaskSegMRML"  # the adapter layer: takes a vtkMRMLScene, may import slicer/vtk (never qt/ctk)
GUI_MODULES = ("slicer", "qt", "ctk", "vtk", "vtkmodules", "MRMLCore", "slicer_core")
SLICER_SIDE = [SHELL, *sorted(SHELL_PACKAGE.glob("*.py")), *sorted(MRML.glob("*.py"))]


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI).getroot().iter("widget")}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_ui_name_used_in_python_exists_in_ui():
    used = set(re.findall(r"self\.ui\.(\w+)", SHELL.read_text(encoding="utf-8")))
    assert used, "the shell should use widgets from the .ui"
    missing = used - set(ui_widgets())
    assert not missing, f"self.ui names missing from {UI.name}: {sorted(missing)}"


def test_bound_widgets_name_real_parameters():
    tree = ast.parse((SHELL_PACKAGE / "logic.py").read_text(encoding="utf-8"))
    wrapper = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MultiTaskSegParameterNode")
    parameters = {n.target.id for n in wrapper.body if isinstance(n, ast.AnnAssign)}
    bound = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    assert set(bound.values()) == parameters, "every parameter has one widget and every binding a parameter"


def test_cmake_lists_every_python_file_and_resource():
    text = CMAKE.read_text(encoding="utf-8").replace("${MODULE_NAME}", "MultiTaskSeg")
    listed = set(re.findall(r"^\s+([\w./-]+\.\w+)\s*$", text, re.M))
    python = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    resources = {
        str(p.relative_to(MODULE))
        for p in (MODULE / "Resources").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    }
    missing = (python | resources) - listed
    assert not missing, f"not packaged by {CMAKE}: {sorted(missing)}"
    # the default model ships with the extension even before it is trained here
    for name in ("bundle.json", "model.safetensors", "signatures.npz", "MODEL_CARD.md"):
        assert f"Resources/Models/default/{name}" in listed
    assert "Resources/SampleData/totalseg_ct01.nii.gz" in listed
    assert "slicer_add_python_unittest(SCRIPT MultiTaskSeg.py)" in text


def test_top_level_cmake_declares_the_extension():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in (
        "project(MultiTaskSeg)",
        "EXTENSION_HOMEPAGE",
        'EXTENSION_CATEGORY "Segmentation"',
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        'EXTENSION_DEPENDS "PyTorch"',
        "find_package(Slicer",
        "add_subdirectory(MultiTaskSeg)",
        "Slicer_EXTENSION_CPACK",
    ):
        assert key in text, key
    # the icon and screenshot URLs name files of this repository's main branch: they must exist
    for url in re.findall(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/([^\s\"]+)", text):
        assert (ROOT / url).is_file(), f"{url} named in CMakeLists.txt does not exist"
    assert (ROOT / "Resources" / "MultiTaskSeg.png").is_file()


@pytest.mark.parametrize("path", sorted(p.name for p in LIB.glob("*.py")))
def test_core_imports_no_slicer_qt_vtk(path):
    bad = imported_modules(LIB / path) & set(GUI_MODULES)
    assert not bad, f"core module {path} imports {bad}"


def test_core_imports_with_slicer_and_vtk_blocked():
    """Every core module imports with slicer / qt / ctk / vtk made unimportable: no allow-list."""
    modules = [f"MultiTaskSegLib.{p.stem}" for p in LIB.glob("*.py") if p.stem != "__init__"]
    code = (
        "import sys, importlib\n"
        f"for name in {GUI_MODULES!r}: sys.modules[name] = None  # import raises ImportError\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(MODULE))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_adapter_is_not_in_the_pip_package_and_core_never_imports_it():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "MultiTaskSegMRML" not in text and "MultiTaskSegShell" not in text
    for path in LIB.glob("*.py"):
        assert not imported_modules(path) & {"MultiTaskSegMRML", "MultiTaskSegShell", "MultiTaskSeg"}, path


def test_adapter_layer_imports_no_qt_and_no_application_globals():
    for path in MRML.glob("*.py"):
        assert not imported_modules(path) & {"qt", "ctk", "MultiTaskSegShell"}, path.name
        # the scene comes in as an argument: no application globals
        used = {
            n.attr
            for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "slicer"
        }
        assert not used & {"mrmlScene", "app", "modules"}, (path.name, used & {"mrmlScene", "app", "modules"})


def test_training_package_imports_neither_shell_nor_adapter():
    for path in (ROOT / "MultiTaskSegTraining").rglob("*.py"):
        modules = imported_modules(path)
        assert not modules & {"MultiTaskSeg", "MultiTaskSegMRML", "MultiTaskSegShell", "slicer", "qt", "ctk", "vtk"}, (
            path
        )


def test_shell_loads_without_torch():
    """The module must load in a Slicer without torch, to offer installing it: its import-time
    dependencies below the shell (adapter, gauge, errors) pull in no torch."""
    for path in SLICER_SIDE:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
        assert "torch" not in top, path
    code = (
        "import sys, importlib\n"
        "for m in ['MultiTaskSegMRML.adapter', 'MultiTaskSegMRML.selftest', 'MultiTaskSegLib.ood_gauge', "
        "'MultiTaskSegLib.errors']: importlib.import_module(m)\n"
        "print('torch' in sys.modules)"
    )
    pytest.importorskip("slicer")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(MODULE))
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_no_thread_runs_inference():
    """Inference runs in the worker process: no thread, executor or Qt thread on the Slicer side
    or in the worker (Slicer's main thread holds the GIL while its event loop idles)."""
    for path in [*SLICER_SIDE, LIB / "worker.py", LIB / "worker_process.py"]:
        text = path.read_text(encoding="utf-8")
        assert not imported_modules(path) & {"threading", "concurrent", "multiprocessing", "_thread"}, path
        assert not re.search(r"\b(QThread|Thread\(|ThreadPool|run_in_executor)", text), path
    logic = (SHELL_PACKAGE / "logic.py").read_text(encoding="utf-8")
    assert "WorkerProcess(" in logic and "QTimer" in logic


def _slicer_calls(path: Path) -> set[str]:
    """UpperCamel method calls (VTK/MRML style) and slicer.util / slicer.app attributes used in a file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr[:1].isupper()
            and not node.func.attr.startswith("Q")
        ):
            names.add(node.func.attr)
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "slicer"
            and node.value.attr in ("util", "app")
        ):
            names.add(f"slicer.{node.value.attr}.{node.attr}")
        if isinstance(node, ast.Attribute) and node.attr in (
            "connectParametersToGui",
            "disconnectGui",
            "registerCustomSampleDataSource",
            "installTorch",
        ):
            names.add(node.attr)
    return names


#: Calls that do not exist on Slicer 5.8 (added in 5.10, Slicer commit 49a2510): never to be made.
NEW_IN_5_10 = {"SetTerminology", "GetTerminology"}
#: UpperCamel calls in the scanned files that are not Slicer's: VTK core, SimpleITK, the PyTorch extension.
NOT_SLICER = {
    "GetElement",
    "SetElement",
    "GetPointData",
    "GetScalars",
    "SetScalars",
    "SetDimensions",
    "SetExtent",
    "GetDimensions",
    "GetNumberOfScalarComponents",
    "ShallowCopy",
    "SetRange",
    "GetArrayFromImage",
    "GetImageFromArray",
    "GetSpacing",
    "SetSpacing",
    "GetOrigin",
    "SetOrigin",
    "GetDirection",
    "SetDirection",
    "GetNumberOfComponentsPerPixel",
    "PyTorchUtilsLogic",
}


def slicer_api() -> dict[str, tuple[str, str, str]]:
    """Testing/slicer_api.txt: call → (class checked in slicer-core or '-', Slicer source file, defining line)."""
    api = {}
    for line in (ROOT / "Testing" / "slicer_api.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, cls, source, declaration, *_note = [field.strip() for field in line.split(" | ")]
            assert source and declaration, line
            api[name] = (cls, source, declaration)
    return api


def test_every_slicer_call_is_listed_with_its_source_and_none_is_new_in_5_10():
    used = set().union(*(_slicer_calls(p) for p in SLICER_SIDE))
    assert not used & NEW_IN_5_10, f"Slicer 5.10+ only: {used & NEW_IN_5_10}"
    text = "\n".join(p.read_text(encoding="utf-8") for p in SLICER_SIDE)
    assert not re.search(r"\.(SetTerminology|GetTerminology)\(", text)
    unlisted = used - set(slicer_api()) - NOT_SLICER
    assert not unlisted, f"Slicer calls missing from Testing/slicer_api.txt: {sorted(unlisted)}"


def test_listed_slicer_calls_exist_in_slicer_core():
    pytest.importorskip("slicer")
    import slicer.util

    api = slicer_api()
    missing = [
        f"{cls}.{name}"
        for name, (cls, _source, _line) in api.items()
        if cls != "-" and not hasattr(getattr(slicer, cls, None), name)
    ]
    missing += [name for name in api if name.startswith("slicer.util.") and not hasattr(slicer.util, name[12:])]
    assert not missing, missing


def test_sample_data_checksum_matches_the_shipped_file():
    import hashlib

    text = SHELL.read_text(encoding="utf-8")
    declared = re.search(r'SAMPLE_SHA256 = "([0-9a-f]{64})"', text).group(1)
    sample = MODULE / "Resources" / "SampleData" / "totalseg_ct01.nii.gz"
    assert hashlib.sha256(sample.read_bytes()).hexdigest() == declared
    assert "registerCustomSampleDataSource(" in text and 'checksums=f"SHA256:{SAMPLE_SHA256}"' in text
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in text
