"""In-app test: the background worker starts with PythonSlicer, finds the shipped E3PoseLogic package, reports
progress, and its result lands in the scene. Uses a fake pipeline (no torch/e3nn, no weights): what is tested
is the Slicer packaging and process plumbing. Run from the Python console
(``import E3PoseSlicerWorkerTest; E3PoseSlicerWorkerTest.E3PoseSlicerWorkerTest().runTest()``) or with ctest.
"""
import os
import shutil
import sys
import tempfile
import unittest

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

# The worker entry this test gives the logic: the shipped worker's main() with a stand-in pipeline. The logic takes
# it as a constructor argument; nothing in the environment or on a command line can swap the pipeline.
WORKER_ENTRY = '''
import sys

import numpy as np

from E3PoseLogic.mrml.worker import main
from E3PoseLogic.result import PoseResult


class _Fake:
    def run(self, array_ijk, ijk_to_ras, mask=None, source=None, progress=None, cancel=None, refine="auto",
            second_look="auto"):
        for i, s in enumerate(("segment", "crop", "pose")):
            progress(s, (i + 1) / 3)
        brain = (array_ijk > 50).astype(np.uint8)
        com = (ijk_to_ras @ np.append(np.argwhere(brain).mean(0), 1.0))[:3]
        return PoseResult(rotation=np.eye(3), translation=com, brain_mask=brain, ijk_to_ras=ijk_to_ras,
                          confidence={"refinement": {"applied": False, "reason": "refine=" + refine}},
                          provenance={"device": "cpu", "model": "fake"})


sys.exit(main(sys.argv[1:], pipeline_factory=lambda unet, e3cnn, device: _Fake()))
'''


class E3PoseSlicerWorkerTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_WorkerRoundTrip()

    def test_WorkerRoundTrip(self):
        import numpy as np

        import E3PoseSlicer  # noqa: F401  (puts E3PoseLogic on sys.path)
        from E3PoseLogic.mrml.nodes import to_parent, volume_from_array

        fakeDir = tempfile.mkdtemp(prefix="E3PoseWorkerTest-", dir=slicer.app.temporaryPath)
        entry = os.path.join(fakeDir, "e3pose_stand_in_worker.py")
        with open(entry, "w") as f:
            f.write(WORKER_ENTRY)
        try:
            vol = np.zeros((30, 30, 20), np.float32)
            vol[10:20, 8:22, 5:15] = 100
            g = np.diag([2.0, 2.0, 3.0, 1.0])
            volume = volume_from_array(slicer.mrmlScene, vol, g, "box")
            logic = E3PoseSlicer.E3PoseSlicerLogic(workerEntry=[entry])
            nodes = logic.process(volume, device="cpu", refine="off")
            self.assertIsNotNone(nodes)
            np.testing.assert_allclose(to_parent(nodes.transform)[:3, 3], [29.0, 29.0, 28.5], atol=1e-6)
            self.assertEqual(nodes.segmentation.GetSegmentation().GetNumberOfSegments(), 1)
            self.assertEqual(logic.refinementText(nodes.transform), "refinement off: refine=off")
        finally:
            shutil.rmtree(fakeDir, ignore_errors=True)
        self.delayDisplay("Worker test passed")


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1])
