"""`meddinov3 models list|import|download`: the manifest, imported and registered models."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list, import (offline machines) or download models")
    verbs = p.add_subparsers(dest="models_verb", required=True)
    ls = verbs.add_parser("list", help="models of the manifest, imported and registered ones")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    imp = verbs.add_parser("import", help="import a downloaded file or model folder (no network needed)")
    imp.add_argument("file")
    imp.add_argument("--name", help="name to list it under (default: from the file name)")
    dl = verbs.add_parser("download", help="download a manifest model into the cache (sha256 checked)")
    dl.add_argument("name")
    p.set_defaults(run=run)


def list_models() -> list[dict]:
    from ..checkpoints import load_manifest, registered_models
    from ..resources import user_dir

    rows = [{"name": e["name"], "source": "manifest", "kind": e.get("kind", "segmentation"), "ref": e["ref"],
             "license": e.get("license", "")} for e in load_manifest()]
    models_dir = user_dir() / "models"
    if models_dir.is_dir():
        rows += [{"name": p.name, "source": "imported", "ref": str(p)} for p in sorted(models_dir.iterdir())
                 if not p.name.startswith(".")]
    rows += [{"name": p.rstrip("/").split("/")[-1], "source": "registered", "ref": p} for p in registered_models()]
    return rows


def run(args) -> int:
    from ..checkpoints import import_file, resolve

    if args.models_verb == "list":
        rows = list_models()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['name']:32s} {r['source']:10s} {r['ref']}")
    elif args.models_verb == "import":
        print(f"imported to {import_file(args.file, name=args.name)}")
    elif args.models_verb == "download":
        print(resolve(args.name, offline=False))
    return 0
