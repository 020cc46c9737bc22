"""Checkpoint layouts: detection, safe loading, conversion, model packages, hub references."""

from ..catalog import load_manifest, register_model, registered_models
from .hub import ModelNotAvailable, parse_hf_ref, resolve_hf
from .loader import (FORMATS, LoadedModel, UnknownModel, convert, describe, detect_format, load_backbone, load_model,
                     network_from_state_dict, read_model, resolve, run_package)
from .package import ClassInfo, ModelSpec, read_spec, write_package
from .safe_load import CheckpointError, safe_torch_load
from .store import ImportResult, import_file, import_model

__all__ = [
    "CheckpointError", "ClassInfo", "FORMATS", "ImportResult", "LoadedModel", "ModelNotAvailable", "ModelSpec",
    "UnknownModel", "convert", "describe", "detect_format", "import_file", "import_model", "load_backbone",
    "load_manifest", "load_model", "network_from_state_dict", "parse_hf_ref", "read_model", "read_spec", "register_model", "registered_models",
    "resolve", "resolve_hf", "run_package", "safe_torch_load", "write_package",
]
