"""Visual quality control: a picture of the volume, the mask and the canonical axes, rendered offscreen.

The picture is drawn by Slicer's own displayable managers (the C++ classes behind Slicer's slice and 3D views),
driven from Python in offscreen VTK windows: three slice views (axial, sagittal, coronal through the head
centre) and a 3D view (the three slice planes, the brain/eye surfaces and the axes). What you see is what the
Slicer module shows. Needs the ``slicer-core`` wheel (``pip install slicer-core``) or a Slicer Python, and an
OpenGL that works offscreen (EGL/OSMesa/Xvfb; Mesa's llvmpipe is enough).

Axes: x red (left-right), y green (posterior -> anterior), z blue (superior -> inferior), from the brain centre.
Views follow radiological display as Slicer shows them: patient right on screen left in axial/coronal.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

SLICER_CORE_MESSAGE = (
    "QC pictures need Slicer's MRML libraries: install them with `pip install slicer-core` "
    "(or run inside 3D Slicer's Python)."
)

VIEWS = (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal"))


def _require():
    try:
        import slicer  # noqa: F401
        import vtk  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{SLICER_CORE_MESSAGE} ({exc})") from exc
    if not hasattr(slicer, "vtkMRMLScene"):
        raise ImportError(SLICER_CORE_MESSAGE)


def _window(size):
    import vtk

    rw = vtk.vtkRenderWindow()
    rw.SetOffScreenRendering(1)
    rw.SetSize(size, size)
    ren = vtk.vtkRenderer()
    rw.AddRenderer(ren)
    iren = vtk.vtkRenderWindowInteractor()  # some displayable managers expect one
    iren.SetRenderWindow(rw)
    iren.Initialize()
    return rw, ren, iren


def _grab(rw) -> np.ndarray:
    import vtk
    from vtk.util import numpy_support

    f = vtk.vtkWindowToImageFilter()
    f.SetInput(rw)
    f.ReadFrontBufferOff()
    f.Update()
    img = f.GetOutput()
    w, h, _ = img.GetDimensions()
    a = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)
    return a[::-1, :, :3].copy()  # VTK rows start at the bottom


def _dm_group(app_logic, factory, renderer, managers, node):
    import slicer

    factory.SetMRMLApplicationLogic(app_logic)
    for m in managers:
        if not factory.IsDisplayableManagerRegistered(m):
            factory.RegisterDisplayableManager(m)
    g = slicer.vtkMRMLDisplayableManagerGroup()
    g.Initialize(factory, renderer)
    g.SetMRMLDisplayableNode(node)
    return g


def render_scene_views(happ, volume_node, nodes, centre, size=360, fov_mm=None) -> Dict[str, np.ndarray]:
    """Render the three slice views and the 3D view of a headless scene; returns {view name: RGB array}."""
    import slicer
    import vtk

    scene, app = happ.scene, happ.app_logic
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    if app.GetSliceLogics() is None:
        app.SetSliceLogics(vtk.vtkCollection())
    if app.GetViewLogics() is None:
        app.SetViewLogics(vtk.vtkCollection())
    keep = []  # windows, groups and logics must live until everything is rendered
    images = {}
    slice_nodes = []
    for layout, orientation in VIEWS:
        rw, ren, iren = _window(size)
        sl = slicer.vtkMRMLSliceLogic()
        sl.SetMRMLApplicationLogic(app)
        sl.SetMRMLScene(scene)
        app.GetSliceLogics().AddItem(sl)
        sn = sl.AddSliceNode(layout)
        sn.SetOrientation(orientation)
        sn.SetDimensions(size, size, 1)
        sl.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())
        sl.FitSliceToAll()
        if fov_mm:
            sn.SetFieldOfView(float(fov_mm), float(fov_mm), sn.GetFieldOfView()[2])
        sn.JumpSliceByCentering(*[float(c) for c in centre])
        slice_nodes.append(sn)
        g = _dm_group(app, slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance(), ren,
                      ["vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLMarkupsDisplayableManager",
                       "vtkMRMLModelSliceDisplayableManager", "vtkMRMLOrientationMarkerDisplayableManager"], sn)
        actor = vtk.vtkImageActor()
        actor.GetMapper().SetInputConnection(sl.GetImageDataConnection())
        actor.SetPosition(0, 0, -1)
        ren.AddActor(actor)
        cam = ren.GetActiveCamera()
        cam.ParallelProjectionOn()
        cam.SetFocalPoint(size / 2, size / 2, 0)
        cam.SetPosition(size / 2, size / 2, 100)
        cam.SetViewUp(0, 1, 0)
        cam.SetParallelScale(size / 2)
        ren.ResetCameraClippingRange()
        keep.append((rw, ren, iren, sl, g, actor))
    for (rw, *_), (layout, orientation) in zip(keep, VIEWS):
        rw.Render()
        images[orientation] = _grab(rw)

    rw3, ren3, iren3 = _window(size)
    rw3.SetAlphaBitPlanes(1)
    rw3.SetMultiSamples(0)
    ren3.SetUseDepthPeeling(1)
    ren3.SetMaximumNumberOfPeels(8)
    vn = scene.AddNewNodeByClass("vtkMRMLViewNode")
    vn.SetLayoutName("1")
    vn.SetBoxVisible(False)
    vn.SetAxisLabelsVisible(False)
    slice_nodes[0].SetSliceVisible(True)  # the axial plane only, see-through: opaque planes hide the axes
    for _rw, _ren, _iren, sl, _g, _a in keep:
        md = sl.GetSliceModelDisplayNode() if hasattr(sl, "GetSliceModelDisplayNode") else None
        if md is not None:
            md.SetOpacity(0.55)
    g3 = _dm_group(app, slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance(), ren3,
                   ["vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager",
                    "vtkMRMLModelDisplayableManager", "vtkMRMLThreeDReformatDisplayableManager",
                    "vtkMRMLSegmentationsDisplayableManager3D", "vtkMRMLMarkupsDisplayableManager"], vn)
    cam = ren3.GetActiveCamera()
    centre = np.asarray(centre, float)
    cam.SetFocalPoint(*centre)
    cam.SetPosition(*(centre + np.array([-250.0, 320.0, 180.0])))  # from anterior-left-superior... of the world
    cam.SetViewUp(0, 0, 1)
    if fov_mm:
        h = 0.5 * float(fov_mm)
        ren3.ResetCamera(centre[0] - h, centre[0] + h, centre[1] - h, centre[1] + h, centre[2] - h, centre[2] + h)
    else:
        ren3.ResetCamera()
    cam.Zoom(1.3)
    ren3.ResetCameraClippingRange()
    rw3.Render()
    images["3D"] = _grab(rw3)
    keep.append((rw3, ren3, iren3, g3))
    return images


def _field_of_view(result, minimum=90.0, factor=3.2):
    """Slice field of view (mm) that frames the head: ``factor`` x the brain radius around its centre."""
    mask = getattr(result, "brain_mask", None)
    if mask is None or not np.any(mask):
        return None
    ijk = np.argwhere(np.asarray(mask) > 0)
    if len(ijk) > 20000:
        ijk = ijk[:: len(ijk) // 20000 + 1]
    g = np.asarray(result.ijk_to_ras, float)
    world = ijk @ g[:3, :3].T + g[:3, 3]
    radius = float(np.max(np.linalg.norm(world - np.asarray(result.translation, float), axis=1)))
    return max(minimum, factor * radius)


def pose_note(conf) -> str:
    """The QC title's note on a result's ``confidence``: its first numbers, which axes are drawn (refined: how far
    they moved, the plane, a searched frame, the doubt flag; else the E3-CNN's, with how many turned readings
    agreed)."""
    extra = ", ".join(f"{k} {v:.3g}" for k, v in list(conf.items())[:3] if isinstance(v, (int, float)))
    ref = conf.get("refinement") if isinstance(conf.get("refinement"), dict) else {}
    if ref.get("applied"):  # the axes drawn are the refined pose: say so, and how far it moved from the E3-CNN's
        extra += f"; refined axes (moved {ref.get('angle_moved_deg', float('nan')):.0f} deg from the E3-CNN, " \
                 f"{ref.get('hypothesis', '?')} plane)"
        from .judge import search_note

        note = search_note(ref)
        if note:  # the axes may be a searched frame far from the refined one: say so
            extra += f"; {note}"
        # residual.mark_doubt: low judge logit, re-read E3-CNN disagrees, switched frame, residual still moving
        doubt = doubt_of(conf)
        if doubt is not None:
            extra += f"; DOUBTFUL, check ({doubt})"
    elif ref:
        from .turned_reading import pooled_counts

        pooled = pooled_counts(conf.get("network_turned_readings"))
        if pooled:  # the E3-CNN's pose was pooled from turned readings: how much the views agreed
            total, agreeing = pooled
            extra += f"; E3-CNN axes (not refined; {'?' if agreeing is None else agreeing} of {total} turned " \
                     f"readings agree)"
        else:
            extra += "; E3-CNN axes (not refined)"
    return extra


def render_qc(array_ijk, ijk_to_ras, result, png_path, *, title: Optional[str] = None, size: int = 360,
              axis_length: float = 40.0) -> Path:
    """Write a QC PNG (2x2: axial, sagittal, coronal, 3D) for one volume and its PoseResult; returns the path."""
    _require()
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .atomic import atomic_path
    from .mrml.nodes import volume_from_array, write_pose
    from .mrml.scene_app import create_headless_app

    t0 = time.perf_counter()
    happ = create_headless_app()
    try:
        volume = volume_from_array(happ.scene, np.asarray(array_ijk, np.float32), ijk_to_ras, title or "volume")
        dn = volume.GetDisplayNode()
        lo, hi = np.percentile(np.asarray(array_ijk, float), [1.0, 99.5])
        dn.SetAutoWindowLevel(False)
        dn.SetWindowLevel(float(max(hi - lo, 1e-6)), float((hi + lo) / 2))
        nodes = write_pose(happ.scene, volume, result, axis_length=axis_length)
        if nodes.segmentation is not None:
            nodes.segmentation.CreateClosedSurfaceRepresentation()
            sd = nodes.segmentation.GetDisplayNode()
            sd.SetOpacity2DFill(0.2)
            sd.SetOpacity2DOutline(0.9)
            sd.SetOpacity3D(0.3)
        centre = np.asarray(result.translation, float)
        images = render_scene_views(happ, volume, nodes, centre, size=size, fov_mm=_field_of_view(result))
    finally:
        happ.scene.Clear(1)
    fig, axs = plt.subplots(1, 4, figsize=(4 * size / 100, size / 100 + 0.7), dpi=100)
    for ax, (name, img) in zip(axs, images.items()):
        ax.imshow(img)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    extra = pose_note(getattr(result, "confidence", {}) or {})
    head = (title or "E3Pose QC") + (f"   [{extra}]" if extra else "")
    # wrapped to the figure's width (at most 8 px per character at 10 pt): a long title (a DOUBTFUL one) ran off
    # both edges, name and axes legend included
    import textwrap

    lines = textwrap.wrap(head + "   axes: x red (L-R), y green (P->A), z blue (S->I)", width=int(4 * size / 8))
    fig.set_figheight(fig.get_figheight() + 0.18 * (len(lines) - 1))
    fig.suptitle("\n".join(lines), fontsize=10)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    del t0
    return Path(png_path)


def doubt_of(conf) -> Optional[str]:
    """Why a result's pose is flagged doubtful (``residual.mark_doubt``), or None when it is not (or has no flag:
    an unrefined pose). For the contact sheet, which puts these first: a batch's doubtful poses are the ones a
    person must open, and a sheet in name order hid them among the rest."""
    from .residual import doubt_details, frame_choice

    ref = conf.get("refinement") if isinstance(conf, dict) else None
    choice = frame_choice(ref) if isinstance(ref, dict) and ref.get("applied") else {}
    if not choice.get("doubtful"):
        return None
    return doubt_details(choice) or "flagged"


def contact_sheet(pngs: List[Path], out_png, out_html=None, columns: int = 2, titles=None, doubts=None):
    """One PNG with all QC pictures (scaled down) and an HTML page linking the full-size ones.

    ``doubts``: per picture, why its pose is doubtful (``doubt_of``) or None. Doubtful pictures come first, their
    titles marked CHECK in red, and the page opens with their list."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    from .atomic import atomic_path

    pngs = [Path(p) for p in pngs]
    titles = list(titles or [p.stem for p in pngs])
    doubts = list(doubts) if doubts is not None else [None] * len(pngs)
    order = sorted(range(len(pngs)), key=lambda i: doubts[i] is None)  # stable: doubtful first, else as given
    pngs, titles, doubts = [pngs[i] for i in order], [titles[i] for i in order], [doubts[i] for i in order]
    columns = max(1, min(columns, len(pngs)))
    rows = max(1, int(np.ceil(len(pngs) / columns)))
    fig, axs = plt.subplots(rows, columns, figsize=(7 * columns, 2.0 * rows), dpi=110, squeeze=False)
    for ax in axs.ravel():
        ax.axis("off")
    for ax, p, t, d in zip(axs.ravel(), pngs, titles, doubts):
        ax.imshow(mpimg.imread(str(p)))
        if d is None:
            ax.set_title(t, fontsize=8)
        else:
            ax.set_title(f"CHECK  {t}", fontsize=8, color="red", fontweight="bold")
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    if out_html is not None:
        import html

        def caption(t, d):
            if d is None:
                return html.escape(t)
            return f'<b class="check">CHECK {html.escape(t)}</b>: doubtful pose ({html.escape(d)})'

        rows_html = "\n".join(
            f'<figure id="{html.escape(p.stem)}"><a href="{html.escape(p.name)}"><img src="{html.escape(p.name)}" '
            f'width="100%"></a><figcaption>{caption(t, d)}</figcaption></figure>'
            for p, t, d in zip(pngs, titles, doubts))
        flagged = [(p, t) for p, t, d in zip(pngs, titles, doubts) if d is not None]
        summary = (f"<p class='check'>{len(flagged)} of {len(pngs)} poses doubtful, shown first (check these): "
                   + ", ".join(f'<a href="#{html.escape(p.stem)}">{html.escape(t)}</a>' for p, t in flagged)
                   + "</p>") if flagged else f"<p>{len(pngs)} poses, none flagged doubtful.</p>"
        text = ("<!doctype html><html><head><meta charset='utf-8'><title>E3Pose QC</title>"
                "<style>body{font-family:sans-serif} figure{margin:0 0 1.5em 0} .check{color:#c00000}</style>"
                "</head><body><h1>E3Pose QC</h1><p>Axes: x red (left-right), y green (posterior to anterior), "
                "z blue (superior to inferior), from the brain centre. Brain mask orange, eyes cyan.</p>"
                f"{summary}{rows_html}</body></html>\n")
        with atomic_path(out_html) as tmp:
            Path(tmp).write_text(text)
    return Path(out_png)
