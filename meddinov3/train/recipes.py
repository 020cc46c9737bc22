"""Training recipes: named, readable JSON files of `TrainConfig` options shipped in `Resources/recipes/`.

A recipe file is `{"recipe": NAME, "about": "...", "settings": {option: why}, "train": {TrainConfig options}}`;
only `train` is applied (it is also valid as `--config`). `--recipe NAME` looks in `Resources/recipes/NAME.json`,
`--recipe PATH` reads any such file (a copy to edit).
"""

from __future__ import annotations

import json
from pathlib import Path


def recipe_dir() -> Path:
    from ..resources import resources_dir

    return resources_dir() / "recipes"


def available_recipes() -> list[str]:
    folder = recipe_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def recipe_options(name_or_path: str) -> dict:
    """The `train` options of a recipe given by name or path; ValueError naming the problem and the file."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        named = recipe_dir() / f"{name_or_path}.json"
        if not named.is_file():
            raise ValueError(f"--recipe {name_or_path}: no such file or recipe (recipes: "
                             f"{', '.join(available_recipes()) or 'none'})")
        path = named
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the recipe ({e})") from None
    options = data.get("train") if isinstance(data, dict) else None
    if not isinstance(options, dict):
        raise ValueError(f"{path}: a recipe is a JSON object with a \"train\" object of training options")
    return options
