"""The user's model store: `meddinov3 models import` copies downloaded files and model folders into it.

A file that is the offline copy of a manifest model goes where `hub.resolve_hf` finds it (by checksum, or by the
reference whose file it is named after while the manifest has no checksum); anything else is stored under
`models/<name>` and resolved by that name. Above `hub` and `loader`: an import is checked by reading it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..catalog import imported_model_path, load_manifest, manifest_entry
from ..files import atomic_path
from ..resources import user_dir
from .hub import imports_dir, parse_hf_ref, sha256_of, unverified_import_path
from .loader import read_model
from .safe_load import CheckpointError


@dataclass(frozen=True)
class ImportResult:
    """Where an import went and how the file was recognised, so the command line can say whether it was verified."""

    path: Path
    name: str  # what `resolve` finds it by: the manifest entry's or the imported model's name
    sha256: str | None = None  # of a single file
    entry: dict | None = None  # the manifest entry whose offline copy the file became
    matched_by: str | None = None  # "sha256" (verified), "file name" or "name" (the entry has no checksum)


def _manifest_match(src: Path, digest: str, name: str | None) -> tuple[dict, str] | None:
    """(entry, matched by) of the manifest entry a downloaded file is a copy of: by sha256, else by name: the file is
    named like the file of the entry's hf: reference, or `name` is the entry's name (a renamed download). Any other
    `name` means the user's own model, which a common file name such as model.pth must not turn into an entry's."""
    entries = [e for e in load_manifest() if e["ref"].startswith("hf:")]
    for entry in entries:
        if entry.get("sha256") == digest:
            return entry, "sha256"
    files = [e for e in entries if parse_hf_ref(e["ref"]).filename]
    if name is None:
        named = [e for e in files if Path(parse_hf_ref(e["ref"]).filename).name == src.name]
    else:
        named = [e for e in files if e["name"] == name]
    if len(named) > 1:
        raise CheckpointError(f"{src}: its name matches the files of several manifest models "
                              f"({', '.join(e['name'] for e in named)}); pass --name with the one it is")
    if not named:
        return None
    entry = named[0]
    if entry.get("sha256"):
        raise CheckpointError(f"{src}: named as the file of manifest model {entry['name']} ({entry['ref']}) but its "
                              f"sha256 {digest} is not the published one; the file is corrupt or a different one")
    return entry, "file name" if name is None else "name"


def _check_import_name(name: str) -> None:
    """An imported model's name is one folder of the store, and must not hide a manifest model of that name."""
    if not name or name.startswith(".") or "/" in name or "\\" in name or name != name.strip():
        raise CheckpointError(f"--name {name!r}: not usable as a model name (no path separators, no leading dot)")
    entry = manifest_entry(name)
    if entry is not None and not entry["ref"].startswith("hf:"):
        raise CheckpointError(f"{name}: the name of a model of the manifest ({entry['ref']}); choose another --name")


def _check_importable(src: Path) -> None:
    """A file or folder that no command could load is refused before anything is copied."""
    read_model(src.resolve(), offline=True)  # its errors name the file and the problem


def import_model(path: str | os.PathLike, name: str | None = None) -> ImportResult:
    """Copy a downloaded file or model folder into the user's store.

    A file that matches a manifest entry (by sha256, or by name while the entry has no checksum: see
    `_manifest_match`) becomes that entry's offline copy: its hf: reference then resolves without network. Anything
    else is stored under `models/<name>` and listed as imported; a single file is then the model, not its folder.
    """
    src = Path(path)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or folder")
    if name is not None:
        _check_import_name(name)
    _check_importable(src)
    digest = None
    if src.is_file():
        digest = sha256_of(src)
        match = _manifest_match(src, digest, name)
        if match is not None:
            entry, matched_by = match
            hub = parse_hf_ref(entry["ref"])
            if matched_by == "sha256":
                dest = imports_dir() / digest / Path(hub.filename or src.name).name
            else:
                dest = unverified_import_path(hub)
            with atomic_path(dest) as tmp:
                shutil.copyfile(src, tmp)
            return ImportResult(dest, entry["name"], digest, entry, matched_by)
    dest = user_dir() / "models" / (name or src.name.split(".")[0])
    if name is None:
        _check_import_name(dest.name)
    if dest.exists():
        raise FileExistsError(f"{dest}: a model with this name was already imported; choose another --name")
    tmp = dest.with_name(f".{dest.name}.importing")
    shutil.rmtree(tmp, ignore_errors=True)
    if src.is_dir():
        shutil.copytree(src, tmp)
    else:
        tmp.mkdir(parents=True)
        shutil.copyfile(src, tmp / src.name)
    os.replace(tmp, dest)
    return ImportResult(imported_model_path(dest), dest.name, digest)


def import_file(path: str | os.PathLike, name: str | None = None) -> Path:
    """Where `import_model` stored the file or folder (the model reference callers list and load)."""
    return import_model(path, name).path
