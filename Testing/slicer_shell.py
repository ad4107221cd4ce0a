"""Import MultiTaskSeg/MultiTaskSeg.py under pytest with slicer-core.

Only the Qt GUI and the application shell are replaced by stand-ins: the ``qt`` / ``ctk``
modules, ``slicer.ScriptedLoadableModule`` base classes, ``slicer.parameterNodeWrapper``
and ``slicer.i18n`` (all of which need the Slicer application). The scene, the MRML nodes,
the segmentation logic, the module's Logic class and the self-test body are the real ones.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import unittest
from pathlib import Path
from unittest import mock

MODULE_FILE = Path(__file__).resolve().parents[1] / "MultiTaskSeg" / "MultiTaskSeg.py"


def _gui_module(name: str) -> types.ModuleType:
    """A module whose classes can be subclassed and whose other attributes are mocks."""
    module = types.ModuleType(name)
    module.QWidget = type("QWidget", (), {"__init__": lambda self, *a, **k: None})
    module.__getattr__ = lambda attr: mock.MagicMock(name=f"{name}.{attr}")
    return module


def _scripted_loadable_module() -> types.ModuleType:
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            print(message)

    for cls in (
        ScriptedLoadableModule,
        ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
    ):
        setattr(module, cls.__name__, cls)
    return module


def _parameter_node_wrapper() -> types.ModuleType:
    module = types.ModuleType("slicer.parameterNodeWrapper")
    module.parameterNodeWrapper = lambda cls: cls
    module.Choice = lambda choices: ("Choice", tuple(choices))
    module.WithinRange = lambda low, high: ("WithinRange", low, high)
    return module


def _i18n() -> types.ModuleType:
    module = types.ModuleType("slicer.i18n")
    module.tr = lambda text: text
    module.translate = lambda context, text: text
    return module


def import_shell(monkeypatch, scene) -> types.ModuleType:
    """The module file, imported with the GUI stand-ins and ``slicer.mrmlScene`` = ``scene``.

    ``slicer.app`` stays absent, as under PythonSlicer: the Logic then runs the worker with this
    interpreter instead of looking for the PythonSlicer launcher.
    """
    import slicer

    for name, module in (
        ("qt", _gui_module("qt")),
        ("ctk", _gui_module("ctk")),
        ("slicer.ScriptedLoadableModule", _scripted_loadable_module()),
        ("slicer.parameterNodeWrapper", _parameter_node_wrapper()),
        ("slicer.i18n", _i18n()),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    for name in [n for n in sys.modules if n.split(".")[0] == "MultiTaskSegShell"]:
        monkeypatch.delitem(sys.modules, name)  # re-import the Logic over these stand-ins
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    spec = importlib.util.spec_from_file_location("MultiTaskSeg", MODULE_FILE)
    shell = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "MultiTaskSeg", shell)
    spec.loader.exec_module(shell)
    return shell
