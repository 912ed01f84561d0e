"""A headless Slicer "application": scene, application logic and the module logics MRML code relies on.

Inside 3D Slicer use ``slicer.mrmlScene`` instead; this is for tests, the QC renderer and batch scripts that run
with the ``slicer-core`` wheel and no Qt. Recipe: vtkMRMLScene + vtkSlicerApplicationLogic, then each module logic
gets the application logic *before* the scene (some look it up when the scene is set).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from . import require_slicer


@dataclass
class HeadlessApp:
    scene: object
    app_logic: object
    logics: Dict[str, object] = field(default_factory=dict)

    @property
    def volumes(self):
        return self.logics["Volumes"]

    @property
    def markups(self):
        return self.logics["Markups"]

    def clear(self):
        self.scene.Clear(0)


def register_segmentation_converters():
    """Make sure the segmentation converter rules exist (Slicer's Segmentations module does this at start-up).

    A segmentation node copies the rules when it is created: nodes created before the rules exist cannot make a
    closed surface. Idempotent.
    """
    slicer = require_slicer()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {r.GetName() for r in factory.GetConverterRules()}
    for cls in (
        slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
        slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
        slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
        slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule,
    ):
        rule = cls()
        if rule.GetName() not in have:
            factory.RegisterConverterRule(rule)


def create_headless_app() -> HeadlessApp:
    """Scene + application logic + Colors/Volumes/Segmentations/Markups/Transforms/SubjectHierarchy logics."""
    slicer = require_slicer()
    register_segmentation_converters()
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    happ = HeadlessApp(scene, app)

    def register(logic, name):
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        happ.logics[name] = logic
        return logic

    colors = register(slicer.vtkMRMLColorLogic(), "Colors")
    app.SetColorLogic(colors)
    register(slicer.vtkSlicerVolumesLogic(), "Volumes")
    register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
    register(slicer.vtkSlicerMarkupsLogic(), "Markups")
    register(slicer.vtkSlicerTransformLogic(), "Transforms")
    if hasattr(slicer, "vtkSlicerSubjectHierarchyModuleLogic"):
        register(slicer.vtkSlicerSubjectHierarchyModuleLogic(), "SubjectHierarchy")
    return happ
