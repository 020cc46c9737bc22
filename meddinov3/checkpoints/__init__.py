"""Checkpoint layouts: detection, safe loading, conversion, model packages, hub references."""

from ..catalog import load_manifest, register_model, registered_models
from .hub import ModelNotAvailable, import_file, parse_hf_ref, resolve_hf
from .loader import (FORMATS, LoadedModel, UnknownModel, convert, describe, detect_format, load_backbone, load_model,
                     network_from_state_dict, read_model, resolve)
from .package import ClassInfo, ModelSpec, read_spec, write_package
from .safe_load import CheckpointError, safe_torch_load

__all__ = [
    "CheckpointError", "ClassInfo", "FORMATS", "LoadedModel", "ModelNotAvailable", "ModelSpec", "UnknownModel",
    "convert", "describe", "detect_format", "import_file", "load_backbone", "load_manifest", "load_model",
    "network_from_state_dict", "parse_hf_ref", "read_model", "read_spec", "register_model", "registered_models",
    "resolve", "resolve_hf", "safe_torch_load", "write_package",
]
