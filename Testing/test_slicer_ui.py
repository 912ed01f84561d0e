"""The Slicer module without the Slicer app: .ui vs code, parameter node vs .ui, packaging, light imports, and
the first-run dependency installer's decisions (with a fake environment)."""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "E3PoseSlicer" / "E3PoseSlicer.py"
UI = ROOT / "E3PoseSlicer" / "Resources" / "UI" / "E3PoseSlicer.ui"


def _ui_widgets():
    tree = ET.parse(UI)  # parses = well-formed
    root = tree.getroot()
    widgets = {w.get("name"): w for w in root.iter("widget")}
    return root, widgets


def _module_tree():
    return ast.parse(MODULE.read_text())


def test_ui_has_every_widget_the_code_uses():
    _, widgets = _ui_widgets()
    used = set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", MODULE.read_text()))
    assert used, "no self.ui.<name> found"
    assert not (used - set(widgets)), f"missing in .ui: {sorted(used - set(widgets))}"


def _parameter_fields():
    for node in ast.walk(_module_tree()):
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class")


def test_ui_parameter_bindings_match_parameter_node():
    _, widgets = _ui_widgets()
    bound = {}
    for name, w in widgets.items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    fields = _parameter_fields()
    assert set(bound.values()) == fields, (set(bound.values()) ^ fields)
    assert len(set(bound.values())) == len(bound)  # one widget per parameter


def test_refinement_choice_sits_in_the_advanced_section():
    _, widgets = _ui_widgets()
    advanced = {w.get("name") for w in widgets["advancedCollapsibleButton"].iter("widget")}
    assert "refineComboBox" in advanced and widgets["refineComboBox"].get("class") == "QComboBox"
    bound = {p.find("string").text for p in widgets["refineComboBox"].findall("property")
             if p.get("name") == "SlicerParameterName"}
    assert bound == {"refine"}
    outputs = {w.get("name") for w in widgets["outputsCollapsibleButton"].iter("widget")}
    assert "refinementLabel" in outputs  # what the refinement did, next to the pose
    src = MODULE.read_text()
    assert 'refine: Annotated[str, Choice(["auto", "on", "off"])] = "auto"' in src
    # where doubtful poses get a second look is a choice of the same section
    assert "secondLookComboBox" in advanced and widgets["secondLookComboBox"].get("class") == "QComboBox"
    assert 'secondLook: Annotated[str, Choice(["auto", "always", "off"])] = "auto"' in src


def test_ui_root_and_scene_connections():
    root, widgets = _ui_widgets()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"
    receivers = {c.find("receiver").text for c in root.iter("connection")}
    combos = {n for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert combos and combos <= receivers


def test_module_files_and_packaging():
    assert (ROOT / "E3PoseSlicer" / "Resources" / "Icons" / "E3PoseSlicer.png").is_file()
    cm = (ROOT / "E3PoseSlicer" / "CMakeLists.txt").read_text().replace("${MODULE_NAME}", "E3PoseSlicer")
    assert "set(MODULE_NAME E3PoseSlicer)" in cm
    for needed in ("slicerMacroBuildScriptedModule", "E3PoseSlicer.py", "Resources/UI/E3PoseSlicer.ui",
                   "Resources/Icons/E3PoseSlicer.png", "WITH_SUBDIR", "E3PoseLogic"):
        assert needed in cm, needed
    top = (ROOT / "CMakeLists.txt").read_text()
    for needed in ("EXTENSION_DEPENDS", "PyTorch", "add_subdirectory(E3PoseSlicer)", "EXTENSION_ICONURL",
                   "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        assert needed in top, needed
    # the module file and class names agree with the folder (Slicer finds the module by them)
    names = {n.name for n in _module_tree().body if isinstance(n, ast.ClassDef)}
    assert {"E3PoseSlicer", "E3PoseSlicerWidget", "E3PoseSlicerLogic", "E3PoseSlicerTest"} <= names


HEAVY = {"torch", "e3nn", "vtk", "qt", "slicer", "ctk", "vtkmodules"}


def _top_level_imports(tree):
    out = []
    for node in tree.body:
        stmts = [node]
        if isinstance(node, ast.Try):
            stmts = node.body + [s for h in node.handlers for s in h.body] + node.orelse
        for s in stmts:
            if isinstance(s, ast.Import):
                out += [a.name.split(".")[0] for a in s.names]
            elif isinstance(s, ast.ImportFrom) and s.level == 0 and s.module:
                out.append(s.module.split(".")[0])
    return out


# torch-only subpackages: their classes subclass torch.nn.Module, so they import torch at top; they are imported
# only from inside functions (pipeline, checkpoints, training)
TORCH_SUBPACKAGES = ("networks", "training")


def test_logic_package_has_no_heavy_imports_at_module_top():
    bad = {}
    for p in sorted((ROOT / "E3PoseLogic").rglob("*.py")):
        if p.relative_to(ROOT / "E3PoseLogic").parts[0] in TORCH_SUBPACKAGES:
            continue
        heavy = HEAVY.intersection(_top_level_imports(ast.parse(p.read_text())))
        if heavy:
            bad[str(p.relative_to(ROOT))] = sorted(heavy)
    assert not bad, bad


def test_mrml_code_never_uses_app_globals():
    for p in [*(ROOT / "E3PoseLogic" / "mrml").glob("*.py"), ROOT / "E3PoseLogic" / "qc.py"]:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "slicer":
                assert node.attr not in ("app", "modules", "mrmlScene"), f"{p.name} uses slicer.{node.attr}"


# ------------------------------------------------------------------------------------------- dependencies
class FakeEnv:
    def __init__(self, versions, online=True, confirm=True, ptu=True):
        self.versions = dict(versions)
        self.online = online
        self.answer = confirm
        self.has_ptu = ptu
        self.calls = []
        self.asked = []

    def installed_version(self, dist):
        return self.versions.get(dist)

    def pytorch_utils(self):
        if not self.has_ptu:
            return None
        env = self

        class PTU:
            def installTorch(self, askConfirmation=True, torchVersionRequirement=None, **kw):
                env.calls.append(("ptu", torchVersionRequirement))
                env.versions["torch"] = "2.5.1+cu121"

        return PTU()

    def pip_install(self, args):
        self.calls.append(("pip", tuple(args)))
        self.versions[args[-1].split(">")[0].split("<")[0].split("=")[0]] = "9.9"

    def is_online(self):
        return self.online

    def confirm(self, message, details):
        self.asked.append((message, details))
        return self.answer


SLICER_LIKE = {"numpy": "2.2.0", "scipy": "1.15.0", "SimpleITK": "2.4.0", "packaging": "24.0"}


def test_deps_nothing_to_do_when_present():
    from E3PoseLogic.slicer_deps import DependencyInstaller

    env = FakeEnv({**SLICER_LIKE, "torch": "2.4.0", "e3nn": "0.5.6", "sympy": "1.13", "mpmath": "1.3",
                   "opt_einsum": "3.4", "opt_einsum_fx": "0.1.4"})
    assert DependencyInstaller(env).ensure() == [] and env.calls == [] and env.asked == []


def test_deps_torch_first_via_pytorchutils_then_e3nn_no_deps():
    from E3PoseLogic.slicer_deps import NEVER_INSTALL, DependencyInstaller

    env = FakeEnv(SLICER_LIKE)
    done = DependencyInstaller(env).ensure()
    assert env.calls[0] == ("ptu", ">=2.2")
    assert env.calls[1][0] == "pip" and env.calls[1][1][0] == "--no-deps" and env.calls[1][1][1].startswith("e3nn")
    pips = [c[1] for c in env.calls if c[0] == "pip"]
    assert all(a[0] == "--no-deps" for a in pips)
    installed = {a[1].split(">")[0].split("<")[0] for a in pips}
    assert not {n.lower() for n in installed} & NEVER_INSTALL  # never SimpleITK/torch/numpy via pip
    assert "packaging" not in installed  # already there
    assert [s.distribution for s in done][:2] == ["torch", "e3nn"]
    assert len(env.asked) == 1


def test_deps_old_torch_is_upgraded_and_version_logic():
    from E3PoseLogic.slicer_deps import DependencyInstaller, satisfies

    assert satisfies("2.13.0+cpu", ">=2.2") and not satisfies("1.13.1", ">=2.2")
    assert satisfies("0.5.6", ">=0.5.5,<0.7") and not satisfies("0.7.0", ">=0.5.5,<0.7")
    plan = DependencyInstaller(FakeEnv({**SLICER_LIKE, "torch": "1.13.1"})).plan()
    assert plan[0].distribution == "torch" and plan[0].installed == "1.13.1"


def test_deps_install_never_skips_the_question():
    """The only way to say yes is the Environment's confirm (a dialog in Slicer, a stand-in in tests)."""
    import inspect

    from E3PoseLogic.slicer_deps import DependencyInstaller

    assert list(inspect.signature(DependencyInstaller.ensure).parameters) == ["self"]
    env = FakeEnv(SLICER_LIKE, confirm=False)
    with pytest.raises(TypeError):
        DependencyInstaller(env).ensure(ask=False)
    assert env.calls == []


def test_deps_declined_offline_and_no_pytorch_extension():
    from E3PoseLogic.slicer_deps import DependencyError, DependencyInstaller

    env = FakeEnv(SLICER_LIKE, confirm=False)
    with pytest.raises(DependencyError, match="declined"):
        DependencyInstaller(env).ensure()
    assert env.calls == []
    env = FakeEnv(SLICER_LIKE, online=False)
    with pytest.raises(DependencyError, match="cannot reach") as e:
        DependencyInstaller(env).ensure()
    assert "--no-index --find-links" in str(e.value) and env.asked == [] and env.calls == []
    env = FakeEnv(SLICER_LIKE, ptu=False)
    with pytest.raises(DependencyError, match="Extensions Manager"):
        DependencyInstaller(env).ensure()
    assert env.calls == []  # nothing pulled torch from PyPI before PyTorchUtils
