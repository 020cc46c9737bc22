"""`meddinov3 models list|import|download`: the manifest, imported and registered models."""

from __future__ import annotations

import json

from ..catalog import list_models


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list, import (offline machines) or download models")
    verbs = p.add_subparsers(dest="models_verb", required=True)
    ls = verbs.add_parser("list", help="models of the manifest, imported and registered ones")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    imp = verbs.add_parser("import", help="import a downloaded file or model folder (no network needed)")
    imp.add_argument("file")
    imp.add_argument("--name", help="name to list it under (default: from the file name); the name of a manifest "
                     "model imports a renamed download of that model's file")
    dl = verbs.add_parser("download", help="download a manifest model into the cache (sha256 checked when the manifest has one)")
    dl.add_argument("name")
    p.set_defaults(run=run)


def import_report(result) -> list[str]:
    """What `models import` prints: where the file went, the name to use, and whether a manifest match was
    verified by checksum (if not, the checksum a maintainer can add to the manifest)."""
    if result.entry is None:
        return [f"imported to {result.path}; use it as {result.name}"]
    copy = f"imported to {result.path}: the offline copy of {result.name} ({result.entry['ref']})"
    if result.matched_by == "sha256":
        return [f"{copy}, sha256 verified"]
    return [f"{copy}, matched by {result.matched_by}; it could not be verified by checksum (the manifest has none "
            "for it)", f"sha256 {result.sha256} (not yet in Resources/models.json for {result.name})"]


def run(args) -> int:
    from ..checkpoints import import_model, resolve

    if args.models_verb == "list":
        rows = list_models()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['name']:32s} {r['source']:10s} {r['ref']}")
    elif args.models_verb == "import":
        print("\n".join(import_report(import_model(args.file, name=args.name))))
    elif args.models_verb == "download":
        print(resolve(args.name))  # downloads unless HF_HUB_OFFLINE / MEDDINOV3_OFFLINE say not to
    return 0
