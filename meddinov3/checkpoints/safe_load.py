"""Load `.pth` files without executing pickled code.

`torch.load(weights_only=True)` refuses anything but tensors and plain containers. Real nnU-Net checkpoints
also hold numpy scalars (logged losses, `_best_ema`), numpy dtypes, a `torch.device` and a GradScaler state, so
exactly those types are allow-listed; anything else (a class, a function, `os.system`) is refused. Training and
pretraining run checkpoints are loaded here too (a run folder may come from anyone), with numpy arrays allowed
for the ones written before their RNG states were saved as plain lists.
"""

from __future__ import annotations

import os
import pickle

import numpy as np
import torch


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def _pickled_by(obj):
    """The callable numpy's own pickling names for `obj` (its public `__reduce__`): `numpy.core.multiarray.scalar`
    for a scalar, `..._reconstruct` for an array, whatever module numpy keeps them in. Reaching them as
    `np._core.multiarray` breaks on numpy 1.26 once torch is imported (Slicer 5.8): torch creates a bare
    `numpy._core` without `multiarray`."""
    return obj.__reduce__()[0]


def _allowed_globals() -> list:
    scalar = _pickled_by(np.float64(0))
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


def _numpy_array_globals() -> list:
    """What a pickled numpy array needs: run checkpoints written before RNG states were plain data hold numpy's
    legacy RNG state, whose key is an array (an object array's items still pass through the allow-list)."""
    rebuild = _pickled_by(np.zeros(0))
    return [rebuild, (rebuild, "numpy.core.multiarray._reconstruct"), (rebuild, "numpy._core.multiarray._reconstruct"),
            np.ndarray]


def safe_torch_load(path: str | os.PathLike, numpy_arrays: bool = False, mmap: bool = False):
    """`torch.load` with weights_only=True, the allow-list above, and tensors mapped to the CPU.

    `numpy_arrays`: allow numpy arrays too (run checkpoints). `mmap`: tensors memory-mapped, not read: a cheap
    check that a file would be accepted.
    """
    path = os.fspath(path)
    allowed = _allowed_globals() + (_numpy_array_globals() if numpy_arrays else [])
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as e:  # junk bytes
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
