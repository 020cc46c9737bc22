"""Model references that live elsewhere: `hf:ORG/REPO[/FILE][@REVISION]` and the model manifest.

Downloads go through huggingface_hub (its cache, revision pinning, offline mode); every file named in the
manifest is checked against its sha256. Machines without internet import files with `meddinov3 models import`
(`store.py`), which stores them under the user's model store where the resolver finds them by checksum, or by the
reference whose file they are named after while the manifest has no checksum for it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..catalog import manifest_entry
from ..files import read_json, write_json
from ..resources import user_dir
from .safe_load import CheckpointError


class ModelNotAvailable(CheckpointError):
    """The model is not on this machine and cannot be downloaded (offline, or no network)."""


@dataclass(frozen=True)
class HubRef:
    """A parsed `hf:ORG/REPO[/FILE][@REVISION]`: a whole repository when `filename` is None."""

    repo_id: str
    filename: str | None
    revision: str | None

    def __str__(self) -> str:
        s = f"hf:{self.repo_id}" + (f"/{self.filename}" if self.filename else "")
        return s + (f"@{self.revision}" if self.revision else "")


def parse_hf_ref(ref: str) -> HubRef:
    """`hf:ORG/REPO[/FILE][@REVISION]` -> HubRef. ValueError for a string that is no hf: reference, CheckpointError
    for one without ORG/REPO."""
    if not ref.startswith("hf:"):
        raise ValueError(f"{ref!r} is not an hf: reference")
    body, _, revision = ref[3:].partition("@")
    parts = [p for p in body.split("/") if p]
    if len(parts) < 2:
        raise CheckpointError(f"{ref}: expected hf:ORG/REPO[/FILE][@REVISION]")
    return HubRef("/".join(parts[:2]), "/".join(parts[2:]) or None, revision or None)


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in `chunk`-byte blocks (weights files are large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def is_offline(offline: bool | None = None) -> bool:
    """`offline` when given, else whether HF_HUB_OFFLINE or MEDDINOV3_OFFLINE is set (1, true, yes)."""
    if offline is not None:
        return offline
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
        os.environ.get("MEDDINOV3_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub opens: when it does not (no network, no DNS), huggingface_hub would
    spend many seconds retrying before it fails. Behind a proxy (HTTPS_PROXY...) the direct probe says nothing:
    assume reachable."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or (80 if url.scheme == "http" else 443)), timeout).close()
    except OSError:
        return False
    return True


def imports_dir() -> Path:
    """Where imported offline copies of manifest files live, by checksum (`store.import_model` writes them)."""
    return user_dir() / "imports"


def unverified_import_path(hub: HubRef) -> Path:
    """Where an imported file recognised only by its name lives: keyed by the reference, since there is no
    checksum to key it by."""
    repo = hub.repo_id.replace("/", "--") + (f"@{hub.revision}" if hub.revision else "")
    return imports_dir() / "unverified" / repo / hub.filename


def _verified_ok(path: Path, sha256: str) -> bool:
    """Hash a large file once; remember the result keyed by size and mtime."""
    record_path = user_dir() / "verified.json"
    records = read_json(record_path) if record_path.exists() else {}
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}"
    if records.get(key) == sha256:
        return True
    actual = sha256_of(path)
    if actual != sha256:
        return False
    records[key] = sha256
    write_json(record_path, records)
    return True


def resolve_hf(ref: str, offline: bool | None = None, cache_dir: str | os.PathLike | None = None,
               progress: bool = True) -> Path:
    """Local path of an hf: reference: the imported copy, the huggingface_hub cache, or a download.

    A file named in the manifest is checked against its sha256 (CheckpointError when it does not match; a file
    downloaded just now is then deleted). `offline` (default: `is_offline()`): never download; ModelNotAvailable
    when the file is not here. `cache_dir`: huggingface_hub's cache (default HF_HUB_CACHE). Returns the file, or
    the snapshot folder of a reference without a file name."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub = parse_hf_ref(ref)
    entry = manifest_entry(ref) or {}
    expected = entry.get("sha256")
    offline = is_offline(offline)
    cache_dir = cache_dir or os.environ.get("HF_HUB_CACHE")  # read now: huggingface_hub reads it at import

    if expected and hub.filename:
        imported = imports_dir() / expected / Path(hub.filename).name
        if imported.is_file():
            return imported
    unverified = unverified_import_path(hub) if hub.filename else None
    if unverified is not None and unverified.is_file():
        if expected and not _verified_ok(unverified, expected):
            raise CheckpointError(f"{unverified}: sha256 does not match the manifest entry for {ref}; the imported "
                                  "file is corrupt or not the published one. Import the published file again.")
        return unverified
    unreachable = not offline and not hub_reachable()
    cached_before = None
    try:
        if hub.filename:
            from huggingface_hub import try_to_load_from_cache

            cached_before = try_to_load_from_cache(hub.repo_id, hub.filename, cache_dir=cache_dir,
                                                   revision=hub.revision)
            path = Path(hf_hub_download(hub.repo_id, hub.filename, revision=hub.revision, cache_dir=cache_dir,
                                        local_files_only=offline or unreachable))
        else:  # a model package stored as a whole repository
            path = Path(snapshot_download(hub.repo_id, revision=hub.revision, cache_dir=cache_dir,
                                          local_files_only=offline or unreachable))
    except LocalEntryNotFoundError:
        why = ("offline mode is on" if offline else "the Hub cannot be reached (no network?)" if unreachable
               else "it could not be downloaded (no connection to the Hub?)")
        raise ModelNotAvailable(
            f"{ref}: not in the local cache and {why}. On a machine with internet, download "
            f"{hub.filename or 'the repository'} from https://huggingface.co/{hub.repo_id} and run "
            f"`meddinov3 models import FILE` here.") from None
    except Exception as e:  # network errors, missing repo or file, authentication
        raise ModelNotAvailable(f"{ref}: download failed ({type(e).__name__}: {e})") from None
    if expected and path.is_file() and not _verified_ok(path, expected):
        if not isinstance(cached_before, str):  # downloaded just now: refused, so not kept in the cache either
            blob = path.resolve()
            path.unlink()
            blob.unlink(missing_ok=True)
            raise CheckpointError(f"{ref}: the downloaded file's sha256 does not match the manifest entry (the file "
                                  "is corrupt or not the published one); it was deleted")
        raise CheckpointError(f"{path}: sha256 does not match the manifest entry for {ref}; the file is corrupt "
                              "or not the published one. Delete it and download again.")
    return path
