"""A fresh 3D Slicer has no torch, timm or safetensors: the modules must still list models and create their Logic
(so that the panel can show the Install button), and the Segment self-test must say why it cannot run.

A child Python starts without site-packages (`-S`) and gets a copy of this environment's site-packages in which
torch, torchvision, timm, safetensors and the CUDA libraries are absent (links to everything else), so that both
imports and package metadata see a Python without them, as in Slicer.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ABSENT = re.compile(r"^(torch|torchvision|torchgen|functorch|timm|safetensors|triton|nvidia|__editable__)([-_.].*)?$",
                    re.IGNORECASE)

CHILD = r"""
import json, site, sys, unittest
site.addsitedir(sys.argv[1])
from Testing.slicer_headless import setup_headless_slicer
setup_headless_slicer()
import MedDINOv3Segment, MedDINOv3Train
from MedDINOv3SegmentLib.dependencies import findProblems
from MedDINOv3SegmentLib.models import listModels, modelInfo

segmentLogic = MedDINOv3Segment.MedDINOv3SegmentLogic()
segmentParameters = segmentLogic.getParameterNode()
trainLogic = MedDINOv3Train.MedDINOv3TrainLogic()
trainParameters = trainLogic.getParameterNode()
rows = listModels()
parameters = [segmentParameters.device, trainParameters.mode]
loader = unittest.defaultTestLoader
result = unittest.TestResult()
unittest.TestSuite([loader.loadTestsFromTestCase(MedDINOv3Segment.MedDINOv3SegmentTest),
                    loader.loadTestsFromTestCase(MedDINOv3Train.MedDINOv3TrainTest)]).run(result)
print(json.dumps({
    "problems": [str(p) for p in findProblems()],
    "models": [(row["name"], row["source"]) for row in rows],
    "demoClasses": modelInfo("demo-liver-ct")["classes"],
    "parameters": parameters,
    "skipped": [reason for _, reason in result.skipped],
    "failed": [text for _, text in result.failures + result.errors],
    "testsRun": result.testsRun,
    "imported": sorted({"torch", "timm", "safetensors", "torchvision"} & set(sys.modules)),
}))
"""


def _site_without_torch(folder: Path) -> Path:
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        if not ABSENT.match(entry.name) and "meddinov3" not in entry.name:
            (folder / entry.name).symlink_to(entry)
    return folder


def test_models_list_and_logic_start_without_torch_timm_safetensors(tmp_path):
    site = _site_without_torch(tmp_path / "site-packages")
    path = [str(REPO), str(REPO / "MedDINOv3Segment"), str(REPO / "MedDINOv3Train")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), MEDDINOV3_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-S", "-c", CHILD, str(site)], capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["problems"] == ["torch (not installed)", "torchvision (not installed)", "timm (not installed)",
                                  "safetensors (not installed)"]
    assert ("demo-liver-ct", "manifest") in [tuple(row) for row in report["models"]]
    assert report["demoClasses"] == ["liver", "tumour"]  # read from model.json, no weights loaded
    assert report["parameters"] == ["Auto", "Fine-tune"]
    assert report["testsRun"] == 2 and report["failed"] == []  # Train's self-test needs no torch and passes
    assert report["skipped"] == ["MedDINOv3 Segment self-test needs Python packages that are not installed: "
                                 "torch (not installed), torchvision (not installed), timm (not installed), "
                                 "safetensors (not installed)"]
    assert report["imported"] == []
