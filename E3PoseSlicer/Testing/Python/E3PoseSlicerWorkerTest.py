"""In-app test: the background worker starts with PythonSlicer, finds the shipped E3PoseLogic package, reports
progress, and its result lands in the scene. Uses a fake pipeline (no torch/e3nn, no weights): what is tested
is the Slicer packaging and process plumbing. Run from the Python console
(``import E3PoseSlicerWorkerTest; E3PoseSlicerWorkerTest.E3PoseSlicerWorkerTest().runTest()``) or with ctest.
"""
import os
import sys
import unittest

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

FAKE = '''
import numpy as np
from E3PoseLogic.result import PoseResult

class _Fake:
    def run(self, array_ijk, ijk_to_ras, mask=None, source=None, progress=None, cancel=None):
        for i, s in enumerate(("segment", "crop", "pose")):
            progress(s, (i + 1) / 3)
        brain = (array_ijk > 50).astype(np.uint8)
        com = (ijk_to_ras @ np.append(np.argwhere(brain).mean(0), 1.0))[:3]
        return PoseResult(rotation=np.eye(3), translation=com, brain_mask=brain, ijk_to_ras=ijk_to_ras,
                          provenance={"device": "cpu", "model": "fake"})

def factory(unet, e3cnn, device):
    return _Fake()
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

        fakeDir = os.path.join(slicer.app.temporaryPath, "E3PoseFakePipeline")
        os.makedirs(fakeDir, exist_ok=True)
        with open(os.path.join(fakeDir, "e3pose_fake_pipeline.py"), "w") as f:
            f.write(FAKE)
        os.environ["E3POSE_WORKER_PIPELINE"] = "e3pose_fake_pipeline:factory"
        os.environ["PYTHONPATH"] = fakeDir + os.pathsep + os.environ.get("PYTHONPATH", "")
        try:
            vol = np.zeros((30, 30, 20), np.float32)
            vol[10:20, 8:22, 5:15] = 100
            g = np.diag([2.0, 2.0, 3.0, 1.0])
            volume = volume_from_array(slicer.mrmlScene, vol, g, "box")
            logic = E3PoseSlicer.E3PoseSlicerLogic()
            nodes = logic.process(volume, device="cpu")
            self.assertIsNotNone(nodes)
            np.testing.assert_allclose(to_parent(nodes.transform)[:3, 3], [29.0, 29.0, 28.5], atol=1e-6)
            self.assertEqual(nodes.segmentation.GetSegmentation().GetNumberOfSegments(), 1)
        finally:
            os.environ.pop("E3POSE_WORKER_PIPELINE", None)
        self.delayDisplay("Worker test passed")


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1])
