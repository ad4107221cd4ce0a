"""Static checks of the Slicer module where the Qt GUI cannot run: .ui ↔ Python names,
CMake packaging completeness, and the import layering of DESIGN.md."""
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
UI = MODULE / "Resources" / "UI" / "MultiTaskSeg.ui"
CMAKE = MODULE / "CMakeLists.txt"
LIB = MODULE / "MultiTaskSegLib"
# the adapter layer: takes a vtkMRMLScene, so it may import slicer/vtk (never qt/ctk)
ADAPTER_MODULES = {"mrml_adapter.py", "mrml_selftest.py"}
GUI_MODULES = ("slicer", "qt", "ctk", "vtk", "vtkmodules", "MRMLCore", "slicer_core")


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
    tree = ast.parse(SHELL.read_text(encoding="utf-8"))
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
    resources = {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")}
    missing = (python | resources) - listed
    assert not missing, f"not packaged by {CMAKE}: {sorted(missing)}"
    # the default model ships with the extension even before it is trained here
    for name in ("bundle.json", "model.safetensors", "signatures.npz", "MODEL_CARD.md"):
        assert f"Resources/Models/default/{name}" in listed
    assert "Resources/SampleData/totalseg_ct01.nii.gz" in listed
    assert "slicer_add_python_unittest(SCRIPT MultiTaskSeg.py)" in text


def test_top_level_cmake_declares_the_extension():
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("project(MultiTaskSeg)", "EXTENSION_HOMEPAGE", 'EXTENSION_CATEGORY "Segmentation"',
                "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS",
                'EXTENSION_DEPENDS "PyTorch"', "find_package(Slicer", "add_subdirectory(MultiTaskSeg)",
                "Slicer_EXTENSION_CPACK"):
        assert key in text, key
    assert (ROOT / "Resources" / "MultiTaskSeg.png").is_file()


@pytest.mark.parametrize("path", sorted(p.name for p in LIB.glob("*.py") if p.name not in ADAPTER_MODULES))
def test_core_imports_no_slicer_qt_vtk(path):
    bad = imported_modules(LIB / path) & set(GUI_MODULES)
    assert not bad, f"core module {path} imports {bad}"


def test_core_package_import_pulls_in_no_gui_modules():
    """Transitively: importing every core module loads no slicer / qt / ctk / vtk."""
    modules = [f"MultiTaskSegLib.{p.stem}" for p in LIB.glob("*.py") if p.name not in ADAPTER_MODULES]
    code = ("import sys, importlib\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {GUI_MODULES!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_adapter_layer_imports_no_qt():
    for name in ADAPTER_MODULES:
        assert not imported_modules(LIB / name) & {"qt", "ctk"}, name
        # the scene comes in as an argument: no application globals (show_results only probes for the
        # application with getattr, to reset the views when there is one)
        used = {n.attr for n in ast.walk(ast.parse((LIB / name).read_text(encoding="utf-8")))
                if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "slicer"}
        assert not used & {"mrmlScene", "app", "modules"}, (name, used & {"mrmlScene", "app", "modules"})


def test_training_package_imports_neither_shell_nor_adapter():
    for path in (ROOT / "MultiTaskSegTraining").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        modules = imported_modules(path)
        assert not modules & {"MultiTaskSeg", "slicer", "qt", "ctk", "vtk"}, path
        assert not re.search(r"\b(mrml_adapter|mrml_selftest)\b", text), path


def test_shell_imports_torch_lazily():
    """The module must load in a Slicer without torch, to offer installing it."""
    tree = ast.parse(SHELL.read_text(encoding="utf-8"))
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module)
    assert "torch" not in top
    heavy = {"MultiTaskSegLib.predictor", "MultiTaskSegLib.bundle", "MultiTaskSegLib.mrml_adapter",
             "MultiTaskSegLib.background", "MultiTaskSegLib.inference"}
    assert not top & heavy, top & heavy
