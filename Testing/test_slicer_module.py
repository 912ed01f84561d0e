"""E3PoseSlicer.py's logic and widget code, run without the Slicer application.

The MRML scene, nodes, storage and node references are the real ones (slicer-core). Only what the Slicer
application alone provides is stood in for, as small as the module needs: ``qt`` (settings, timer), the
ScriptedLoadableModule base classes (``getParameterNode`` as Slicer does it: one singleton
vtkMRMLScriptedModuleNode per module), the typed parameter node wrapper (defaults written for missing parameters
when wrapping, values stored as Slicer's serializers store them), ``slicer.app``, the dialogs and the .ui widgets.
The background worker is a real process: the logic is given a worker entry that runs the worker's own ``main``
with a stand-in pipeline (the only way in; the shipped code reads no environment hook).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import time
import types
import typing
import unittest
from pathlib import Path, PurePath

import numpy as np
import pytest

pytest.importorskip("slicer")
pytestmark = pytest.mark.mrml

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "E3PoseSlicer" / "E3PoseSlicer.py"

# stand-in pipeline, chosen per volume by its name: "slow" waits to be cancelled, "bad" is refused as input
FAKE_WORKER = '''
import sys, time
import numpy as np
from E3PoseLogic.errors import InputError
from E3PoseLogic.mrml.worker import main
from E3PoseLogic.result import PoseResult


class Fake:
    def run(self, array_ijk, ijk_to_ras, mask=None, source=None, progress=None, cancel=None, refine="auto",
            second_look="auto"):
        progress("segmentation", 0.1)
        if "slow" in (source or ""):
            time.sleep(120)
        if "bad" in (source or ""):
            raise InputError(source, "no head in this volume")
        brain = (array_ijk > 50).astype(np.uint8)
        com = (ijk_to_ras @ np.append(np.argwhere(brain).mean(0), 1.0))[:3]
        if refine == "off":
            refinement = {"applied": False, "reason": "switched off"}
        else:
            refinement = {"applied": True, "angle_moved_deg": 12.4, "hypothesis": "identity"}
        return PoseResult(rotation=np.eye(3), translation=com, brain_mask=brain, ijk_to_ras=ijk_to_ras,
                          confidence={"refinement": refinement, "refine_requested": refine,
                                      "second_look_requested": second_look},
                          provenance={"model": "fake"})


sys.exit(main(sys.argv[1:], pipeline_factory=lambda unet, e3cnn, device: Fake()))
'''


# ------------------------------------------------------------------------------------------- stand-ins
class FakeWidget:
    """A .ui widget: properties are plain attributes, every other method call is recorded."""

    def __init__(self, name):
        self.name = name
        self.calls = []
        self.lines = []
        self.text = ""
        self.toolTip = ""
        self.enabled = True
        self.visible = True
        self.value = 0
        self.format = ""

    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)

        def call(*args, **kw):
            self.calls.append((item, args))

        return call

    def appendPlainText(self, text):
        self.lines.append(str(text))

    def clear(self):
        self.lines = []

    def setVisible(self, on):
        self.visible = on


class FakeUi:
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        w = FakeWidget(name)
        setattr(self, name, w)
        return w


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)


def parameterNodeWrapper(cls):
    """Typed properties over a vtkMRMLScriptedModuleNode, stored as Slicer's serializers store them."""
    import slicer

    spec = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        base, meta = hint, ()
        if typing.get_origin(hint) is typing.Annotated:
            base, *meta = typing.get_args(hint)
        if isinstance(base, type) and issubclass(base, slicer.vtkMRMLNode):
            kind, default = "node", None
        elif base is bool:
            kind, default = "bool", False
        elif base is str:
            kind, default = "str", ""
        elif isinstance(base, type) and issubclass(base, PurePath):
            kind, default = "path", base()
        else:
            raise TypeError(f"{name}: {hint} not supported by the stand-in wrapper")
        choices = next((m.choices for m in meta if isinstance(m, Choice)), None)
        spec[name] = (kind, base, cls.__dict__.get(name, default), choices)

    def read(self, n):
        kind, base, _, _ = spec[n]
        node = self.parameterNode
        if kind == "node":
            return node.GetNodeReference(n)
        if kind == "bool":
            return node.GetParameter(n) == "True"
        return base(node.GetParameter(n)) if kind == "path" else node.GetParameter(n)

    def write(self, n, value):
        kind, base, _, choices = spec[n]
        node = self.parameterNode
        if choices is not None and value not in choices:
            raise ValueError(f"{n}: {value!r} not in {choices}")
        if kind == "node":
            if value is not None and not isinstance(value, base):
                raise ValueError(f"{n}: {value} is not a {base.__name__}")
            node.SetParameter(n, "")
            node.SetNodeReferenceID(n, value.GetID() if value is not None else None)
        elif kind == "bool":
            node.SetParameter(n, "True" if value else "False")
        else:
            node.SetParameter(n, str(value))

    def init(self, parameterNode):
        self.parameterNode = parameterNode
        for n, (_, _, default, _) in spec.items():
            if not parameterNode.HasParameter(n):
                write(self, n, default)

    for n in spec:
        setattr(cls, n, property(lambda self, n=n: read(self, n), lambda self, v, n=n: write(self, n, v)))
    cls.__init__ = init
    cls.allParameters = spec
    cls.connectGui = lambda self, gui: 1
    cls.disconnectGui = lambda self, tag: None
    cls.AddObserver = lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(
        event, callback, priority)
    cls.RemoveObserver = lambda self, tag: self.parameterNode.RemoveObserver(tag)
    return cls


class Dialogs:
    def __init__(self):
        self.errors = []
        self.confirms = []
        self.answer = False

    def errorDisplay(self, text, **kw):
        self.errors.append(str(text))

    def confirmOkCancelDisplay(self, text, windowTitle=None, **kw):
        self.confirms.append(str(text))
        return self.answer

    def confirmYesNoDisplay(self, text, **kw):
        self.confirms.append(str(text))
        return self.answer

    @contextlib.contextmanager
    def tryWithErrorDisplay(self, message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as exc:
            self.errors.append(f"{message} {exc}")
            raise


class App:
    def __init__(self, tmp):
        self.temporaryPath = str(tmp)
        self.testing = True
        self.onProcessEvents = None

    def applicationDirPath(self):
        return self.temporaryPath

    def processEvents(self):
        if self.onProcessEvents is not None:
            self.onProcessEvents()

    def commandOptions(self):
        return types.SimpleNamespace(testingEnabled=self.testing)


@pytest.fixture
def slicer_module(monkeypatch, tmp_path, headless_app):
    """(E3PoseSlicer module, stand-ins) with slicer.mrmlScene = a fresh headless scene."""
    import slicer
    import slicer.util

    from E3PoseLogic.mrml.nodes import load_volume

    scene = headless_app.scene
    settings = {}
    qt = types.ModuleType("qt")

    class QSettings:
        def value(self, key, default=None):
            return settings.get(key, default)

        def setValue(self, key, value):
            settings[key] = value

    class QTimer:
        def __init__(self):
            self.active, self.callback = False, None

        def setInterval(self, ms):
            pass

        def connect(self, signal, callback):
            self.callback = callback

        def start(self):
            self.active = True

        def stop(self):
            self.active = False

    qt.QSettings, qt.QTimer = QSettings, QTimer
    qt.QThread = types.SimpleNamespace(msleep=lambda ms: time.sleep(ms / 1000.0))
    qt.QFileDialog = types.SimpleNamespace(getExistingDirectory=lambda *a: "")

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent
            self.layout = FakeWidget("layout")

        def setup(self):
            pass

        def resourcePath(self, filename):
            return str(MODULE.parent / "Resources" / filename)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[:-len("Logic")]

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(self.moduleName)
                node.SetName(self.moduleName)
                node.SetAttribute("ModuleName", self.moduleName)
                node = slicer.mrmlScene.AddNode(node)
            return node

    slm.ScriptedLoadableModule = ScriptedLoadableModule
    slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (unittest.TestCase,),
                                          {"delayDisplay": lambda self, message, msec=None: None})
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.Choice, pnw.parameterNodeWrapper = Choice, parameterNodeWrapper
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    for name, mod in (("qt", qt), ("slicer.ScriptedLoadableModule", slm), ("slicer.parameterNodeWrapper", pnw),
                      ("slicer.i18n", i18n)):
        monkeypatch.setitem(sys.modules, name, mod)

    app = App(tmp_path / "slicer-tmp")
    Path(app.temporaryPath).mkdir()
    dialogs = Dialogs()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    for name in ("errorDisplay", "confirmOkCancelDisplay", "confirmYesNoDisplay", "tryWithErrorDisplay"):
        monkeypatch.setattr(slicer.util, name, getattr(dialogs, name))
    loaded = []

    def loadVolume(path):
        node = load_volume(scene, path)
        loaded.append(node.GetID())
        return node

    monkeypatch.setattr(slicer.util, "loadVolume", loadVolume)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **kw: None, raising=False)
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: FakeWidget("uiWidget"), raising=False)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda w: FakeUi(), raising=False)

    spec = importlib.util.spec_from_file_location("E3PoseSlicer", MODULE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "E3PoseSlicer", module)
    spec.loader.exec_module(module)
    entry = tmp_path / "fake_worker.py"
    entry.write_text(FAKE_WORKER)
    sm = types.SimpleNamespace(module=module, scene=scene, app=app, dialogs=dialogs, settings=settings,
                               entry=[str(entry)], loaded=loaded, tmp=tmp_path, widgets=[])
    yield sm
    for w in sm.widgets:  # as Slicer does when the module is unloaded: observers off, worker stopped
        w.cleanup()


def _logic(sm):
    return sm.module.E3PoseSlicerLogic(workerEntry=sm.entry)


def _widget(sm, logic=None):
    w = sm.module.E3PoseSlicerWidget(parent=types.SimpleNamespace(isEntered=True), logic=logic or _logic(sm),
                                     installer=types.SimpleNamespace(ensure=lambda: []))
    w.setup()
    sm.widgets.append(w)
    return w


def _head_volume(scene, name="head"):
    from E3PoseLogic.mrml.nodes import volume_from_array

    vol = np.zeros((30, 30, 20), np.float32)
    vol[10:20, 8:22, 5:15] = 100
    return volume_from_array(scene, vol, np.diag([2.0, 2.0, 3.0, 1.0]), name)


def _head_file(path):
    nib = pytest.importorskip("nibabel")
    vol = np.zeros((30, 30, 20), np.float32)
    vol[10:20, 8:22, 5:15] = 100
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))
    return path


def _e3pose_nodes(scene):
    out = []
    for i in range(scene.GetNumberOfNodes()):
        n = scene.GetNthNode(i)
        if n.GetAttribute("E3Pose.Role") or n.IsA("vtkMRMLScalarVolumeNode"):
            out.append(n.GetName())
    return out


def _run_widget_to_end(sm, w, timeout=60):
    t0 = time.monotonic()
    while w._timer.active:
        assert time.monotonic() - t0 < timeout, "worker did not finish"
        w.onPollWorker()
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------- finding: citation
def test_module_credits_the_e3pose_paper(slicer_module):
    parent = types.SimpleNamespace()
    slicer_module.module.E3PoseSlicer(parent)
    text = parent.acknowledgementText + parent.helpText
    assert "Muthukrishnan" in text and "2512.04890" in text and "Equivariant Symmetry-Aware Head Pose" in text
    assert "Moyer" not in MODULE.read_text() and "MICCAI 2021" not in MODULE.read_text()


# ------------------------------------------------------------------------------------------- finding: test hooks
def test_install_is_asked_even_under_testing(slicer_module):
    """--testing used to approve installs silently; the answer comes from the dialog or an injected confirm."""
    sm = slicer_module
    assert sm.app.commandOptions().testingEnabled
    env = sm.module.SlicerEnvironment()
    sm.dialogs.answer = False
    assert env.confirm("Install torch?", "torch via PyTorch extension") is False
    assert sm.dialogs.confirms == ["Install torch?"]
    asked = []
    env = sm.module.SlicerEnvironment(confirm=lambda message, details: asked.append(message) or True)
    assert env.confirm("Install e3nn?", "") is True and asked == ["Install e3nn?"]
    assert "testingEnabled" not in MODULE.read_text()


def test_logic_takes_its_worker_entry_as_an_argument(slicer_module):
    sm = slicer_module
    logic = _logic(sm)
    volume = _head_volume(sm.scene)
    worker = logic.startProcessing(volume, device="cpu")
    assert worker.cmd[1:2] == sm.entry and "-m" not in worker.cmd[:3]
    assert logic.finishProcessing() is not None
    default = sm.module.E3PoseSlicerLogic()
    assert default.workerEntry == ["-m", "E3PoseLogic.mrml.worker"]


# ------------------------------------------------------------------------------------------- finding: widget
def test_pose_selector_lists_only_e3pose_pose_transforms(slicer_module):
    w = _widget(slicer_module)
    assert ("addAttribute", ("vtkMRMLLinearTransformNode", "E3Pose.Role", "pose")) in \
        w.ui.poseTransformSelector.calls


def test_a_foreign_transform_is_reported_not_raised(slicer_module):
    """Any transform in the pose slot (script, old scene): the checkboxes said nothing and raised ValueError."""
    sm = slicer_module
    w = _widget(sm)
    p = w._parameterNode
    foreign = sm.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "my registration")
    p.poseTransform = foreign
    w._updateGui()
    assert not w.ui.showAxesCheckBox.enabled and not w.ui.exportButton.enabled
    assert "not an E3Pose pose" in w.ui.editedLabel.text
    for handler, arg in ((w.onShowAxes, True), (w.onShowHandles, True), (w.onReorient, True)):
        handler(arg)  # used to raise ValueError out of the Qt slot
    w.onResetPose()
    p.exportDirectory = sm.tmp / "export"
    w.onExport()
    assert sm.dialogs.errors and all("my registration" in e and "not an E3Pose pose" in e
                                     for e in sm.dialogs.errors), sm.dialogs.errors
    assert not (sm.tmp / "export").exists()
    # the logic names the problem for scripts too
    with pytest.raises(ValueError, match="not an E3Pose pose"):
        w.logic.setAxesVisible(foreign, True)


def test_a_pose_whose_volume_was_removed_is_reported(slicer_module):
    sm = slicer_module
    logic = _logic(sm)
    w = _widget(sm, logic)
    volume = _head_volume(sm.scene)
    nodes = logic.process(volume, device="cpu")
    w._parameterNode.poseTransform = nodes.transform
    sm.scene.RemoveNode(volume)
    w._updateGui()
    assert "no longer in the scene" in w.ui.editedLabel.text and not w.ui.reorientCheckBox.enabled
    w.onReorient(True)
    assert any("no longer in the scene" in e for e in sm.dialogs.errors)


def test_entering_the_module_keeps_the_scenes_model_choice(slicer_module):
    sm = slicer_module
    sm.settings.update({"E3Pose/modelSource": "local", "E3Pose/unetPath": "/remembered/unet.pt",
                        "E3Pose/e3cnnPath": "/remembered/e3cnn.pt"})
    # a scene saved with the bundled model and its own U-Net path (as read back from a .mrml file)
    raw = sm.module.E3PoseSlicerLogic().getParameterNode().parameterNode
    raw.SetParameter("modelSource", "bundled")
    raw.SetParameter("unetPath", "/scene/unet.pt")
    raw.UnsetParameter("e3cnnPath")
    w = _widget(sm)
    w.enter()
    p = w._parameterNode
    assert p.modelSource == "bundled"
    assert str(p.unetPath) == "/scene/unet.pt"
    assert str(p.e3cnnPath) == "/remembered/e3cnn.pt"  # not saved in the scene: the user's setting fills it


def test_a_new_scene_takes_the_users_remembered_choice(slicer_module):
    sm = slicer_module
    sm.settings.update({"E3Pose/modelSource": "local", "E3Pose/unetPath": "/remembered/unet.pt"})
    w = _widget(sm)
    p = w._parameterNode
    assert p.modelSource == "local" and str(p.unetPath) == "/remembered/unet.pt"
    assert p.refine == "auto"
    # a remembered value this version does not offer is ignored, not an error on entering the module
    sm.scene.RemoveNode(p.parameterNode)  # as in a new scene
    sm.settings["E3Pose/modelSource"] = "cloud"
    w.initializeParameterNode()
    assert w._parameterNode.modelSource == "bundled"


def test_process_files_cancelled_stops_cleanly_and_removes_what_it_loaded(slicer_module):
    sm = slicer_module
    logic = _logic(sm)
    paths = [_head_file(sm.tmp / "a_slow.nii.gz"), _head_file(sm.tmp / "b.nii.gz")]

    def cancel_when_started():
        if logic.isRunning() and logic._worker.fraction >= 0.05:
            logic.cancel()

    sm.app.onProcessEvents = cancel_when_started
    nodes_before = sm.scene.GetNumberOfNodes()
    t0 = time.monotonic()
    out = logic.processFiles(paths, sm.tmp / "out", device="cpu")  # used to raise AttributeError
    assert time.monotonic() - t0 < 60
    assert out == {} and len(sm.loaded) == 1  # stopped: the second file was never loaded
    assert _e3pose_nodes(sm.scene) == []
    assert sm.scene.GetNumberOfNodes() == nodes_before  # display and storage nodes too
    assert not list(Path(sm.app.temporaryPath).iterdir())  # the worker's temporary folder is gone


def test_process_files_exports_each_and_keeps_the_scene_lean(slicer_module):
    sm = slicer_module
    logic = _logic(sm)
    paths = [_head_file(sm.tmp / "a.nii.gz"), _head_file(sm.tmp / "b_slow.nii.gz")]
    sm.app.onProcessEvents = lambda: (logic.isRunning() and "slow" in " ".join(logic._worker.cmd)
                                      and logic._worker.fraction >= 0.05 and logic.cancel())
    out = logic.processFiles(paths, sm.tmp / "out", device="cpu", refine="off")
    assert list(out) == [str(paths[0])] and Path(out[str(paths[0])]["json"]).is_file()
    rec = json.loads(Path(out[str(paths[0])]["json"]).read_text())
    assert rec["confidence"]["refine_requested"] == "off"
    assert _e3pose_nodes(sm.scene) == [] and len(sm.loaded) == 2
    # keepInScene: the finished ones stay for a look; the cancelled one still goes
    out = logic.processFiles(paths, sm.tmp / "out2", device="cpu", keepInScene=True)
    assert list(out) == [str(paths[0])]
    assert sorted(_e3pose_nodes(sm.scene)) == ["a", "a axis x", "a axis y", "a axis z", "a mask", "a pose"]


def test_process_files_failure_removes_the_volume_and_says_why(slicer_module):
    sm = slicer_module
    logic = _logic(sm)
    with pytest.raises(RuntimeError, match="no head in this volume"):
        logic.processFiles([_head_file(sm.tmp / "bad.nii.gz")], sm.tmp / "out", device="cpu")
    assert _e3pose_nodes(sm.scene) == []


# ------------------------------------------------------------------------------------------- refinement option
def test_scripted_api_passes_the_refinement_choice(slicer_module):
    sm = slicer_module
    logic = _logic(sm)
    volume = _head_volume(sm.scene)
    nodes = logic.process(volume, device="cpu", refine="off")
    conf = json.loads(nodes.transform.GetAttribute("E3Pose.Confidence"))
    assert conf["refine_requested"] == "off"
    assert logic.refinementText(nodes.transform) == "refinement off: switched off"
    nodes = logic.process(volume, device="cpu")
    assert json.loads(nodes.transform.GetAttribute("E3Pose.Confidence"))["refine_requested"] == "auto"
    assert logic.refinementText(nodes.transform).startswith("refined: moved 12°")
    assert json.loads(nodes.transform.GetAttribute("E3Pose.Confidence"))["second_look_requested"] == "auto"
    nodes = logic.process(volume, device="cpu", secondLook="off")  # the second-look choice reaches the pipeline
    assert json.loads(nodes.transform.GetAttribute("E3Pose.Confidence"))["second_look_requested"] == "off"
    with pytest.raises(ValueError, match="refine"):
        logic.process(volume, refine="yes")
    foreign = sm.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "other")
    assert logic.refinementText(foreign) == ""
    foreign.SetAttribute("E3Pose.Confidence", "{not json")
    assert logic.refinementText(foreign) == ""


@pytest.mark.parametrize("choice, expected", [("auto", "refined: moved 12°"), ("off", "refinement off")])
def test_widget_apply_uses_the_refinement_choice_and_says_what_it_did(slicer_module, choice, expected):
    sm = slicer_module
    w = _widget(sm)
    p = w._parameterNode
    p.inputVolume = _head_volume(sm.scene)
    p.device = "cpu"
    p.refine = choice
    p.secondLook = "off" if choice == "off" else "always"  # the Second look choice reaches the worker too
    w.onApplyButton()
    assert "--refine" in w.logic._worker.cmd and w.logic._worker.cmd[w.logic._worker.cmd.index("--refine") + 1] \
        == choice
    assert w.logic._worker.cmd[w.logic._worker.cmd.index("--second-look") + 1] == p.secondLook
    _run_widget_to_end(sm, w)
    assert not sm.dialogs.errors, sm.dialogs.errors
    assert p.poseTransform is not None
    assert any(expected in line for line in w.ui.logTextEdit.lines), w.ui.logTextEdit.lines
    assert expected in w.ui.refinementLabel.text


def test_widget_cancel_cleans_up_the_run(slicer_module):
    sm = slicer_module
    w = _widget(sm)
    p = w._parameterNode
    p.inputVolume = _head_volume(sm.scene, "slow head")
    w.onApplyButton()
    t0 = time.monotonic()
    while w.logic._worker.fraction < 0.05 and time.monotonic() - t0 < 30:
        w.onPollWorker()
        time.sleep(0.05)
    w.onApplyButton()  # Cancel
    assert not w.logic.isRunning() and not w._timer.active
    assert not list(Path(sm.app.temporaryPath).iterdir())
    assert any("Cancelled" in line for line in w.ui.logTextEdit.lines)


def test_in_app_worker_test_runs_with_its_own_worker_entry(slicer_module):
    """The ctest E3PoseSlicerWorkerTest.py (run in a Slicer build) checks the packaging and process plumbing with
    a stand-in pipeline given through the logic's constructor; here it runs against the stand-ins above."""
    path = ROOT / "E3PoseSlicer" / "Testing" / "Python" / "E3PoseSlicerWorkerTest.py"
    assert "E3POSE_WORKER_PIPELINE" not in path.read_text() and "os.environ" not in path.read_text()
    spec = importlib.util.spec_from_file_location("E3PoseSlicerWorkerTest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.E3PoseSlicerWorkerTest("test_WorkerRoundTrip").test_WorkerRoundTrip()
