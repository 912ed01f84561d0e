"""E3Pose 3D Slicer module: fetal head 6-DoF pose from a 3D MRI volume, with QC and manual correction.

Thin by design: everything that computes or writes nodes lives in the ``E3PoseLogic`` package (pure Python,
tested headless with slicer-core). This file holds the Slicer glue: the module description, the parameter node,
the widget (GUI only), the logic adapter (scene = ``slicer.mrmlScene``, background process, dependencies) and the
in-app self-test.
"""
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, List, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLLinearTransformNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _addLogicPackageToPath():
    """E3PoseLogic is installed next to this file (extension build) or sits one folder up (developer mode)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(candidate, "E3PoseLogic", "__init__.py")):
            if candidate not in sys.path:
                sys.path.insert(0, candidate)
            return candidate
    return None


LOGIC_PACKAGE_PARENT = _addLogicPackageToPath()

SETTINGS_PREFIX = "E3Pose/"
# parameters also remembered across restarts (QSettings); they fill a scene's parameter node only where unset
REMEMBERED_PARAMETERS = ("modelSource", "unetPath", "e3cnnPath")


#
# Module
#
class E3PoseSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("E3Pose")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["E3Pose developers"]
        self.parent.helpText = _(
            "Estimates the 6-DoF pose of the fetal head (brain centre and canonical axes) in a 3D MRI volume with "
            "E(3)-Pose, writes a transform (canonical to world), a brain/eye segmentation and the canonical axes, "
            "and lets you check and correct the pose with interaction handles before exporting it. "
            "Not for clinical use. See the <a href='https://github.com/e3pose/SlicerE3Pose'>documentation</a>.")
        self.parent.acknowledgementText = _(
            "The method is E(3)-Pose: Ramya Muthukrishnan, Borjan Gagoski, Aryn Lee, P. Ellen Grant, Elfar "
            "Adalsteinsson, Polina Golland, Benjamin Billot, 'Equivariant Symmetry-Aware Head Pose Estimation for "
            "Fetal MRI', arXiv:2512.04890 (2025). Please cite it when you use this module. E3Pose is an independent "
            "re-implementation; the original code is at github.com/MedicalVisionGroup/E3-Pose.")


#
# Parameter node
#
@parameterNodeWrapper
class E3PoseSlicerParameterNode:
    """Saved with the scene. The model choice and file paths are also remembered across restarts (QSettings,
    widget only); a value saved with the scene wins over the remembered one."""

    inputVolume: vtkMRMLScalarVolumeNode
    modelSource: Annotated[str, Choice(["bundled", "local"])] = "bundled"
    unetPath: Path
    e3cnnPath: Path
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    refine: Annotated[str, Choice(["auto", "on", "off"])] = "auto"
    secondLook: Annotated[str, Choice(["auto", "always", "off"])] = "auto"
    poseTransform: vtkMRMLLinearTransformNode
    segmentation: vtkMRMLSegmentationNode
    showAxes: bool = True
    showHandles: bool = False
    reorient: bool = False
    exportDirectory: Path
    exportScene: bool = False


#
# Dependencies (the Slicer side of E3PoseLogic.slicer_deps.Environment)
#
class SlicerEnvironment:
    """``confirm(message, details) -> bool`` asks before anything is installed: a dialog unless the caller's code
    passes another callable (tests do). Testing mode changes nothing: nothing is ever installed unasked."""

    def __init__(self, confirm=None):
        self._confirm = confirm

    def installed_version(self, distribution):
        from E3PoseLogic.slicer_deps import installed_version

        return installed_version(distribution)

    def pytorch_utils(self):
        try:
            import PyTorchUtils
        except ImportError:
            return None
        return PyTorchUtils.PyTorchUtilsLogic()

    def pip_install(self, args):
        slicer.util.pip_install(" ".join(args))

    def is_online(self):
        from E3PoseLogic.slicer_deps import can_reach

        return can_reach()

    def confirm(self, message, details):
        if self._confirm is not None:
            return bool(self._confirm(message, details))
        return bool(slicer.util.confirmOkCancelDisplay(message, _("Install dependencies"), detailedText=details))


#
# Widget (GUI only)
#
class E3PoseSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only. ``logic`` (an E3PoseSlicerLogic or a stand-in with the same methods) and ``installer`` (an object
    with ``ensure()``, see E3PoseLogic.slicer_deps) are injected; Slicer passes neither and gets the real
    ones."""

    def __init__(self, parent=None, logic=None, installer=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = logic  # default made in setup()
        self.installer = installer
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/E3PoseSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        if self.logic is None:
            self.logic = E3PoseSlicerLogic()
        if self.installer is None:
            from E3PoseLogic.slicer_deps import DependencyInstaller

            self.installer = DependencyInstaller(SlicerEnvironment())

        from E3PoseLogic.models import default_model

        self.ui.bundledModelInfoLabel.text = _("bundled: ") + default_model().label
        self._restrictPoseSelector()

        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onPollWorker)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.showAxesCheckBox.connect("toggled(bool)", self.onShowAxes)
        self.ui.showHandlesCheckBox.connect("toggled(bool)", self.onShowHandles)
        self.ui.reorientCheckBox.connect("toggled(bool)", self.onReorient)
        self.ui.resetPoseButton.connect("clicked(bool)", self.onResetPose)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.unetPathLineEdit.connect("currentPathChanged(QString)", lambda p: self._saveSetting("unetPath", p))
        self.ui.e3cnnPathLineEdit.connect("currentPathChanged(QString)", lambda p: self._saveSetting("e3cnnPath", p))
        self.ui.progressBar.setVisible(False)
        self.initializeParameterNode()

    def _restrictPoseSelector(self):
        """Offer only the "<volume> pose" transforms E3Pose wrote (not its reorient helpers, not other modules')."""
        from E3PoseLogic.mrml.nodes import ATTR_ROLE

        self.ui.poseTransformSelector.addAttribute("vtkMRMLLinearTransformNode", ATTR_ROLE, "pose")

    def cleanup(self):
        self.removeObservers()
        self.logic.cancel()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event):
        self.logic.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -------------------------------------------------------------------------------------------- parameters
    def initializeParameterNode(self):
        # the user's remembered choices fill only what the scene's parameter node has not saved: a scene that
        # was saved with "bundled" (or its own weights files) opens as it was saved
        settings = qt.QSettings()
        remembered = {}
        for name in REMEMBERED_PARAMETERS:
            value = settings.value(SETTINGS_PREFIX + name, "")
            if value:
                remembered[name] = str(value)
        self.setParameterNode(self.logic.getParameterNode(defaults=remembered))
        p = self._parameterNode
        if not p.inputVolume:
            p.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def _saveSetting(self, name, value):
        qt.QSettings().setValue(SETTINGS_PREFIX + name, str(value))

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _updateGui(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        running = self.logic.isRunning()
        local = p.modelSource == "local"
        self.ui.unetPathLineEdit.enabled = local and not running
        self.ui.e3cnnPathLineEdit.enabled = local and not running
        problem = self.logic.inputProblem(p)
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the estimation")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Apply")
            self.ui.applyButton.toolTip = problem or _("Estimate the head pose")
            self.ui.applyButton.enabled = problem is None
        hasPose = bool(p.poseTransform)
        poseProblem = self.logic.poseProblem(p.poseTransform) if hasPose else None
        usable = hasPose and poseProblem is None
        for w in (self.ui.showAxesCheckBox, self.ui.showHandlesCheckBox, self.ui.reorientCheckBox,
                  self.ui.resetPoseButton, self.ui.exportButton):
            w.enabled = usable and not running
        if poseProblem:
            self.ui.editedLabel.text = poseProblem
        elif usable:
            self.ui.editedLabel.text = _("edited by hand") if self.logic.isEdited(p.poseTransform) \
                else _("as estimated")
        else:
            self.ui.editedLabel.text = ""
        self.ui.refinementLabel.text = self.logic.refinementText(p.poseTransform) if usable else ""

    # -------------------------------------------------------------------------------------------- actions
    def onApplyButton(self):
        if self.logic.isRunning():
            self.logic.cancel()
            self.logic.finishProcessing()  # cancelled: nothing is written, the temporary files go
            self._log(_("Cancelled."))
            self._finishRun()
            return
        p = self._parameterNode
        self._saveSetting("modelSource", p.modelSource)
        self.ui.logTextEdit.clear()
        with slicer.util.tryWithErrorDisplay(_("E3Pose could not start."), waitCursor=True):
            if not self._ensureDependencies():
                return
            unet, e3cnn = (p.unetPath, p.e3cnnPath) if p.modelSource == "local" else (None, None)
            self.logic.startProcessing(p.inputVolume, unetPath=unet, e3cnnPath=e3cnn, device=p.device,
                                       refine=p.refine, secondLook=p.secondLook)
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.value = 0
            self._timer.start()
            self._updateGui()

    def onPollWorker(self):
        for ev in self.logic.pollEvents():
            if ev["kind"] == "progress":
                self.ui.progressBar.value = int(100 * ev["fraction"])
                self.ui.progressBar.format = f"{ev['stage']} %p%"
            elif ev["kind"] == "log":
                self._log(ev["text"])
            elif ev["kind"] == "error":
                self._log(f"ERROR ({ev['error']}): {ev['message']}")
            elif ev["kind"] == "exit":
                self._onWorkerExit()
                return

    def _onWorkerExit(self):
        p = self._parameterNode
        try:
            nodes = self.logic.finishProcessing()
        except Exception as exc:  # shown with the log tail, the top complaint about DL extensions
            self._finishRun()
            if getattr(exc, "outOfMemory", False) and p.device != "cpu":
                if slicer.util.confirmYesNoDisplay(
                        _("The GPU ran out of memory. Run again on the CPU (slower)?"), detailedText=str(exc)):
                    p.device = "cpu"
                    self.onApplyButton()
                return
            slicer.util.errorDisplay(_("E3Pose failed: ") + str(exc).split("\n")[0], detailedText=str(exc))
            return
        self._finishRun()
        if nodes is None:
            return
        p.poseTransform = nodes.transform
        p.segmentation = nodes.segmentation
        self.logic.setAxesVisible(nodes.transform, p.showAxes)
        self.logic.setHandlesVisible(nodes.transform, p.showHandles)
        self.logic.observePose(nodes.transform, lambda node: self._updateGui())
        slicer.util.setSliceViewerLayers(background=p.inputVolume, fit=True)
        refinement = self.logic.refinementText(nodes.transform)
        self._log(_("Done: ") + nodes.transform.GetName() + (f" ({refinement})" if refinement else ""))
        self._updateGui()

    def _finishRun(self):
        self._timer.stop()
        self.ui.progressBar.setVisible(False)
        self._updateGui()

    def _ensureDependencies(self):
        from E3PoseLogic.slicer_deps import DependencyError

        try:
            done = self.installer.ensure()
        except DependencyError as exc:
            slicer.util.errorDisplay(str(exc))
            return False
        if done:
            self._log(_("Installed: ") + ", ".join(s.distribution for s in done))
        return True

    def onInstallDependencies(self):
        with slicer.util.tryWithErrorDisplay(_("Installing dependencies failed."), waitCursor=True):
            self._ensureDependencies()

    def _usablePose(self):
        """The pose transform of the parameter node, or None; a transform E3Pose cannot work on is reported (a
        message, not an exception out of a Qt slot)."""
        p = self._parameterNode
        if not (p and p.poseTransform):
            return None
        problem = self.logic.poseProblem(p.poseTransform)
        if problem:
            self._reportPoseProblem(problem)
            return None
        return p.poseTransform

    def _reportPoseProblem(self, message):
        self._log(message)
        slicer.util.errorDisplay(message)

    def _poseAction(self, action, *args):
        transform = self._usablePose()
        if transform is None:
            return None
        try:
            return action(transform, *args)
        except ValueError as exc:  # the pose's nodes changed under us (e.g. its volume was just removed)
            self._reportPoseProblem(str(exc))
            return None

    def onShowAxes(self, on):
        self._poseAction(self.logic.setAxesVisible, on)

    def onShowHandles(self, on):
        self._poseAction(self.logic.setHandlesVisible, on)

    def onReorient(self, on):
        self._poseAction(self.logic.setReoriented, on)

    def onResetPose(self):
        self._poseAction(self.logic.resetPose)

    def onExport(self):
        p = self._parameterNode
        if self._usablePose() is None:
            return
        outdir = str(p.exportDirectory) if str(p.exportDirectory) not in ("", ".") else ""
        if not outdir:
            outdir = qt.QFileDialog.getExistingDirectory(None, _("Export the pose to"))
            if not outdir:
                return
            p.exportDirectory = Path(outdir)
        written = self._poseAction(self._export, outdir, p.exportScene)
        if written:
            self._log(_("Exported: ") + ", ".join(str(Path(x).name) for x in written.values()))

    def _export(self, transform, outdir, mrb):
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            return self.logic.exportPose(transform, outdir, mrb=mrb)

    def _log(self, text):
        self.ui.logTextEdit.appendPlainText(str(text))


#
# Logic (Slicer adapter over E3PoseLogic; usable from scripts without the GUI)
#
class E3PoseSlicerLogic(ScriptedLoadableModuleLogic):
    """Scripted API. Examples (Slicer Python console)::

        logic = slicer.util.getModuleLogic("E3PoseSlicer")
        nodes = logic.process(volumeNode)                            # waits; returns PoseNodes (None if cancelled)
        nodes = logic.process(volumeNode, refine="off")              # network only (refine: auto | on | off)
        nodes = logic.process(volumeNode, secondLook="off")          # no second look at doubtful poses (~1 s)
        logic.processFiles(["a.nii.gz", "b.nii.gz"], "/out", device="cpu")   # batch, exports each
        logic.startProcessing(volumeNode); ...; logic.pollEvents(); logic.finishProcessing()   # no waiting

    ``workerEntry`` is what follows the Python executable to start the background worker (default
    ``-m E3PoseLogic.mrml.worker``). Only code that constructs the logic can change it: tests pass a script that
    runs the worker's ``main`` with a stand-in pipeline.
    """

    def __init__(self, workerEntry=None):
        ScriptedLoadableModuleLogic.__init__(self)
        from E3PoseLogic.mrml.worker import MODULE_ENTRY

        self.workerEntry = list(MODULE_ENTRY if workerEntry is None else workerEntry)
        self._worker = None
        self._job = None
        self._observers = {}
        self._cancelRequested = False

    def getParameterNode(self, defaults=None):
        """The module's parameter node in the scene. ``defaults`` ({name: value}) fill the parameters the scene's
        node has not saved (new scene, or saved empty); a value saved with the scene is kept."""
        raw = super().getParameterNode()
        unset = [n for n in (defaults or {}) if not raw.HasParameter(n) or raw.GetParameter(n) in ("", ".")]
        p = E3PoseSlicerParameterNode(raw)
        for name in unset:
            try:
                setattr(p, name, type(getattr(p, name))(defaults[name]))
            except (TypeError, ValueError) as exc:  # e.g. a remembered choice this version no longer offers
                logging.warning("E3Pose: ignoring the remembered %s=%r (%s)", name, defaults[name], exc)
        return p

    # -------------------------------------------------------------------------------------------- checks
    @staticmethod
    def inputProblem(p) -> Optional[str]:
        if not p.inputVolume:
            return _("Select an input volume.")
        if p.modelSource == "local":
            for name, path in (("U-Net", p.unetPath), ("E3-CNN", p.e3cnnPath)):
                if str(path) in ("", ".") or not Path(path).is_file():
                    return _("Choose the {name} weights file (.ckpt, .pth or .pt).").format(name=name)
        return None

    @staticmethod
    def poseProblem(transformNode) -> Optional[str]:
        """Why E3Pose cannot show, edit or export ``transformNode`` as a pose (None = it can)."""
        from E3PoseLogic.mrml import nodes as N

        if transformNode is None:
            return _("No pose transform selected.")
        name = transformNode.GetName()
        if transformNode.GetAttribute(N.ATTR_ROLE) != "pose":
            return _("'{t}' is not an E3Pose pose transform: choose a '<volume> pose' transform written by "
                     "Apply.").format(t=name)
        scene = transformNode.GetScene() or slicer.mrmlScene
        if scene.GetNodeByID(transformNode.GetAttribute(N.ATTR_VOLUME) or "") is None:
            return _("The volume of '{t}' is no longer in the scene.").format(t=name)
        return None

    # -------------------------------------------------------------------------------------------- running
    @staticmethod
    def pythonExecutable():
        exe = shutil.which("PythonSlicer", path=slicer.app.applicationDirPath())
        return exe or shutil.which("PythonSlicer") or sys.executable

    def isRunning(self):
        return self._worker is not None and self._worker.running

    def startProcessing(self, volumeNode, unetPath=None, e3cnnPath=None, device="auto", refine="auto",
                        secondLook="auto"):
        """Start the background process for one volume (returns at once; see pollEvents/finishProcessing).

        ``refine``: the refinement after the network, ``auto`` (when the model has one), ``on`` or ``off``.
        ``secondLook``: where a pose that looks wrong gets a second look, ``auto`` (navigator-like volumes),
        ``always`` or ``off`` (about a second per volume on 2 CPU cores; README, Second look)."""
        from E3PoseLogic.mrml.nodes import array_from_volume
        from E3PoseLogic.mrml.worker import (
            REFINE_CHOICES, WorkerProcess, build_command, save_volume_npz, worker_env,
        )

        if self.isRunning():
            raise RuntimeError(_("E3Pose is already running."))
        if refine not in REFINE_CHOICES:
            raise ValueError(_("refine must be one of {c}, not {r!r}").format(c=", ".join(REFINE_CHOICES), r=refine))
        if volumeNode is None:
            raise ValueError(_("No input volume."))
        tmp = Path(tempfile.mkdtemp(prefix="E3Pose-", dir=slicer.app.temporaryPath))
        try:
            arr, ijkToRas = array_from_volume(volumeNode)
            save_volume_npz(tmp / "input.npz", arr, ijkToRas)
            cmd = build_command(self.pythonExecutable(), tmp / "input.npz", tmp / "result.npz", device=device,
                                unet=str(unetPath) if unetPath else None,
                                e3cnn=str(e3cnnPath) if e3cnnPath else None,
                                source=volumeNode.GetName(), refine=refine, second_look=secondLook,
                                entry=self.workerEntry)
            logging.info("E3Pose: %s", " ".join(cmd))
            self._worker = WorkerProcess(cmd, env=worker_env(LOGIC_PACKAGE_PARENT))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._job = {"volumeID": volumeNode.GetID(), "volumeName": volumeNode.GetName(), "tmp": tmp,
                     "device": device}
        return self._worker

    def pollEvents(self):
        return self._worker.poll() if self._worker is not None else []

    def cancel(self):
        """Stop the running worker (and a running processFiles batch)."""
        self._cancelRequested = True
        if self._worker is not None:
            self._worker.cancel()

    def finishProcessing(self):
        """After the worker ended: write its result into the scene; returns PoseNodes (None when cancelled)."""
        from E3PoseLogic.mrml.worker import EXIT_OOM, load_result_npz

        w, job = self._worker, self._job
        self._worker, self._job = None, None
        if w is None:
            return None
        w.wait()
        try:
            if w.cancelled:
                return None
            if w.returncode != 0 or not w.done_path:
                msg = (w.error or {}).get("message") or _("the worker stopped with code {c}").format(c=w.returncode)
                exc = RuntimeError(f"{msg}\n\n{w.tail(40)}")
                exc.outOfMemory = w.returncode == EXIT_OOM
                raise exc
            result = load_result_npz(w.done_path)
            result.provenance.setdefault("device", job["device"])
            volume = slicer.mrmlScene.GetNodeByID(job["volumeID"])
            if volume is None:
                raise RuntimeError(_("The volume '{v}' was removed from the scene while E3Pose ran.").format(
                    v=job["volumeName"]))
            return self.writeResult(volume, result)
        finally:
            shutil.rmtree(job["tmp"], ignore_errors=True)

    def process(self, volumeNode, unetPath=None, e3cnnPath=None, device="auto", waitForCompletion=True,
                refine="auto", secondLook="auto"):
        """Estimate the pose of ``volumeNode``; with waitForCompletion returns PoseNodes (None when cancelled),
        else the worker. ``refine``: auto | on | off; ``secondLook``: auto | always | off (``startProcessing``)."""
        worker = self.startProcessing(volumeNode, unetPath, e3cnnPath, device, refine=refine,
                                      secondLook=secondLook)
        if not waitForCompletion:
            return worker
        while worker.running:
            worker.poll()
            slicer.app.processEvents()
            qt.QThread.msleep(50)
        return self.finishProcessing()

    def processFiles(self, paths: List[str], outputDirectory, unetPath=None, e3cnnPath=None, device="auto",
                     exportScene=False, refine="auto", keepInScene=False,
                     secondLook="auto"):
        """Batch: load each volume file, estimate, export into ``outputDirectory``; returns {path: written}.

        Each volume and its pose nodes are removed from the scene once exported, unless ``keepInScene``. On
        ``cancel()`` the batch stops: the volume in progress is removed and the files not in the result were not
        processed. On an error the volume in progress is removed and the error raised.
        """
        out = {}
        self._cancelRequested = False
        for path in paths:
            if self._cancelRequested:
                break
            volume = slicer.util.loadVolume(str(path))
            try:
                nodes = self.process(volume, unetPath, e3cnnPath, device, refine=refine, secondLook=secondLook)
                if nodes is not None:
                    out[str(path)] = self.exportPose(nodes.transform, outputDirectory, mrb=exportScene)
            except BaseException:
                self.removeVolumeAndResults(volume)
                raise
            if nodes is None or not keepInScene:
                self.removeVolumeAndResults(volume)
            if nodes is None:
                self._cancelRequested = True
        if len(out) < len(paths):
            logging.warning("E3Pose: batch cancelled; %d of %d files done", len(out), len(paths))
        return out

    # -------------------------------------------------------------------------------------------- scene
    def writeResult(self, volumeNode, result):
        from E3PoseLogic.mrml import nodes as N

        poseNodes = N.write_pose(slicer.mrmlScene, volumeNode, result)
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parent = shNode.GetItemParent(shNode.GetItemByDataNode(volumeNode))
        for n in [poseNodes.transform, poseNodes.segmentation] + poseNodes.axes:
            if n is not None:
                shNode.SetItemParent(shNode.GetItemByDataNode(n), parent)
        self.observePose(poseNodes.transform)
        return poseNodes

    def removeVolumeAndResults(self, volumeNode):
        """Remove ``volumeNode``, the pose nodes E3Pose wrote for it, and their display and storage nodes."""
        from E3PoseLogic.mrml import nodes as N

        scene = slicer.mrmlScene
        removed = [volumeNode]
        pn = N.find_pose_nodes(scene, volumeNode)
        if pn is not None:
            observer = self._observers.pop(pn.transform.GetID(), None)
            if observer is not None:
                observer.remove()
            reorient = scene.GetNodeByID(pn.transform.GetAttribute(N.ATTR_REORIENT) or "")
            removed = [volumeNode, pn.segmentation, *pn.axes, reorient, pn.transform]
        for node in removed:
            if node is None or node.GetScene() is None:
                continue
            helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
                if node.IsA("vtkMRMLDisplayableNode") else []
            if node.IsA("vtkMRMLStorableNode"):
                helpers.append(node.GetStorageNode())
            scene.RemoveNode(node)
            for helper in helpers:
                if helper is not None and helper.GetScene() is not None:
                    scene.RemoveNode(helper)

    def _checkPose(self, transformNode):
        problem = self.poseProblem(transformNode)
        if problem:
            raise ValueError(problem)

    def _nodes(self, transformNode):
        from E3PoseLogic.mrml import nodes as N

        self._checkPose(transformNode)
        volume = slicer.mrmlScene.GetNodeByID(transformNode.GetAttribute(N.ATTR_VOLUME))
        return N.find_pose_nodes(slicer.mrmlScene, volume)

    def refinementText(self, transformNode):
        """What the refinement did for this pose, e.g. "refined: moved 12°" ('' when not recorded)."""
        from E3PoseLogic.mrml import nodes as N
        from E3PoseLogic.mrml.worker import refinement_summary

        try:
            confidence = json.loads(transformNode.GetAttribute(N.ATTR_CONFIDENCE) or "{}")
        except (AttributeError, ValueError):
            return ""
        return refinement_summary(confidence)

    def observePose(self, transformNode, onChange=None):
        from E3PoseLogic.mrml import nodes as N

        old = self._observers.pop(transformNode.GetID(), None)
        if old is not None:
            old.remove()
        self._observers[transformNode.GetID()] = N.observe(transformNode, onChange)

    def isEdited(self, transformNode):
        from E3PoseLogic.mrml import nodes as N

        return N.is_edited(transformNode)

    def setAxesVisible(self, transformNode, on):
        from E3PoseLogic.mrml import nodes as N

        N.set_axes_visible(self._nodes(transformNode), on)

    def setHandlesVisible(self, transformNode, on):
        from E3PoseLogic.mrml import nodes as N

        self._checkPose(transformNode)
        if transformNode.GetID() not in self._observers:
            self.observePose(transformNode)  # e.g. after loading a saved scene
        N.set_handles_visible(transformNode, on)

    def setReoriented(self, transformNode, on):
        from E3PoseLogic.mrml import nodes as N

        self._checkPose(transformNode)
        if transformNode.GetID() not in self._observers:
            self.observePose(transformNode)
        N.set_reoriented(self._nodes(transformNode), on)

    def resetPose(self, transformNode):
        from E3PoseLogic.mrml import nodes as N

        self._checkPose(transformNode)
        N.reset_to_estimate(transformNode)

    def exportPose(self, transformNode, outputDirectory, mrb=False):
        from E3PoseLogic.mrml.export import export_pose

        return export_pose(self._nodes(transformNode), outputDirectory, mask_formats=(".nii.gz", ".seg.nrrd"),
                           mrb=mrb)


#
# In-app self-test (Reload & Test, or ctest with a Slicer build)
#
class E3PoseSlicerTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_PoseNodesEditReorientExport()
        self.setUp()
        self.test_DependencyPlanIsHarmless()

    def _synthetic(self):
        import numpy as np

        from E3PoseLogic.result import PoseResult

        shape = (40, 40, 32)
        g = np.diag([2.5, 2.5, 3.0, 1.0])
        g[:3, 3] = [-50.0, -50.0, -48.0]
        c = np.cos(np.deg2rad(30)), np.sin(np.deg2rad(30))
        r = np.array([[c[0], -c[1], 0], [c[1], c[0], 0], [0, 0, 1.0]])
        t = np.array([2.0, -3.0, 1.0])
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
        world = ijk @ g[:3, :3].T + g[:3, 3]
        can = (world - t) @ r
        brain = (((can / [30.0, 36.0, 28.0]) ** 2).sum(1) <= 1).reshape(shape).astype(np.uint8)
        vol = (10 + 90 * brain).astype(np.float32)
        return vol, g, PoseResult(rotation=r, translation=t, brain_mask=brain, ijk_to_ras=g,
                                  rotation_voxel=r, provenance={"device": "cpu"})

    def test_PoseNodesEditReorientExport(self):
        import numpy as np

        from E3PoseLogic.mrml import nodes as N

        self.delayDisplay("Pose nodes, manual edit, reorient, export")
        vol, g, result = self._synthetic()
        volume = N.volume_from_array(slicer.mrmlScene, vol, g, "synthetic")
        logic = E3PoseSlicerLogic()
        pn = logic.writeResult(volume, result)
        self.assertEqual(pn.transform.GetName(), "synthetic pose")
        self.assertIsNone(logic.poseProblem(pn.transform))
        other = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "not a pose")
        self.assertIn("not an E3Pose pose", logic.poseProblem(other))
        with self.assertRaises(ValueError):
            logic.setReoriented(other, True)
        self.assertFalse(logic.isEdited(pn.transform))
        edited = N.to_parent(pn.transform)
        edited[:3, 3] += 4.0
        N.set_to_parent(pn.transform, edited)
        self.assertTrue(logic.isEdited(pn.transform))
        logic.setReoriented(pn.transform, True)
        self.assertIsNotNone(volume.GetTransformNodeID())
        logic.setReoriented(pn.transform, False)
        self.assertIsNone(volume.GetTransformNodeID())
        outdir = Path(slicer.app.temporaryPath) / "E3PoseSelfTest"
        written = logic.exportPose(pn.transform, outdir)
        rec = json.loads(Path(written["json"]).read_text())
        self.assertTrue(rec["edited"])
        np.testing.assert_allclose(rec["canonical_to_world_ras"], edited, atol=1e-9)
        t2 = slicer.util.loadTransform(str(written["transform.h5"]))
        np.testing.assert_allclose(slicer.util.arrayFromTransformMatrix(t2), edited, atol=1e-9)
        shutil.rmtree(outdir, ignore_errors=True)
        self.delayDisplay("Test passed")

    def test_DependencyPlanIsHarmless(self):
        from E3PoseLogic.slicer_deps import NEVER_INSTALL, DependencyInstaller

        steps = DependencyInstaller(SlicerEnvironment()).plan()
        for s in steps:
            self.assertTrue(s.method == "pytorchutils" or s.distribution.lower() not in NEVER_INSTALL)
            if s.method == "pip":
                self.assertIn("--no-deps", s.pip_args)
        self.delayDisplay("Dependency plan: " + (", ".join(s.distribution for s in steps) or "nothing to install"))
