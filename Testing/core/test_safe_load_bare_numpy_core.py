"""Loading `.pth` files when `numpy._core` is a bare package without `multiarray` (Slicer 5.8).

Slicer 5.8 embeds numpy 1.26.4; importing torch there leaves `numpy._core` as an empty package, so code that reaches
`np._core.multiarray` raises AttributeError and every `.pth` load fails. numpy 1.26 cannot be installed next to
this machine's Python 3.11 + numpy 2, so a child process recreates that state on numpy 2: after torch is imported,
`numpy._core` is replaced by an empty module (attribute and `sys.modules` entry), then real files are loaded. scipy
is imported before: on numpy 2 its lazy imports go through the real `numpy._core` (on numpy 1.26 they never do).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from .upstream_layouts import write_nnunet_folder

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, types
import numpy as np
import torch
import scipy.ndimage
from meddinov3.checkpoints import load_model, safe_torch_load

bare = types.ModuleType("numpy._core")  # what importing torch leaves behind with numpy 1.26: no multiarray
np._core = bare
sys.modules["numpy._core"] = bare
assert not hasattr(np._core, "multiarray")

folder, checkpoint, run_state = sys.argv[1:4]
state = safe_torch_load(checkpoint)
run = safe_torch_load(run_state, numpy_arrays=True)
model = load_model(folder)
print(json.dumps({"best_ema": float(state["_best_ema"]), "dice": [float(v) for v in state["logging"]["mean_fg_dice"]],
                  "device": str(state["init_args"]["device"]), "rng_key": run["rng"]["numpy"][1][:3].tolist(),
                  "folds": model.spec.folds, "classes": [c.name for c in model.spec.classes]}))
"""


def test_nnunet_checkpoint_loads_when_numpy_core_is_bare(tmp_path):
    folder, _ = write_nnunet_folder(tmp_path, folds=(0,))
    np.random.seed(7)
    run_state = tmp_path / "latest.pt"  # a run checkpoint of the earlier layout: numpy's RNG state holds an array
    torch.save({"step": 3, "rng": {"numpy": np.random.get_state()}}, run_state)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(folder / "fold_0" / "checkpoint_final.pth"),
                             str(run_state)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    np.random.seed(7)
    assert loaded == {"best_ema": 0.8134, "dice": [0.71, 0.74], "device": "cuda",
                      "rng_key": np.random.get_state()[1][:3].tolist(), "folds": ["0"],
                      "classes": ["background", "liver", "tumour"]}
