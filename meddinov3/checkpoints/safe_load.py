"""Load `.pth` files without executing pickled code.

`torch.load(weights_only=True)` refuses anything but tensors and plain containers. Real nnU-Net checkpoints
also hold numpy scalars (logged losses, `_best_ema`), numpy dtypes, a `torch.device` and a GradScaler state, so
exactly those types are allow-listed; anything else (a class, a function, `os.system`) is refused.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def _allowed_globals() -> list:
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed: list = [
        scalar,
        (scalar, "numpy.core.multiarray.scalar"),  # files written with numpy 1.x
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        torch.device,
    ]
    # numpy >= 1.25 pickles dtypes as instances of numpy.dtypes.*DType classes.
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in dir(dtypes):
            obj = getattr(dtypes, name)
            if isinstance(obj, type) and name.endswith("DType"):
                allowed.append(obj)
    return allowed


def safe_torch_load(path: str | os.PathLike):
    """`torch.load` with weights_only=True, the allow-list above, and tensors mapped to the CPU."""
    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported global" in line), None)
        if detail is None:  # not a forbidden object but a damaged or foreign file
            reason = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
        raise CheckpointError(
            f"{path}: refused to load: the file contains objects other than weights and plain data "
            f"(loading it would execute code from the file). {detail}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
