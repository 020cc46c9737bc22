"""Class names -> SNOMED CT terminology and display colours, for `.seg.nrrd` output and the Slicer module.

Precedence: what a model's `model.json` says about a class (`terminology`, `color`) wins; then the shared
table `Resources/terminology/meddinov3_terminology.{json,csv}` when present; then the small built-in table
below; unknown names get distinct colours from a fixed palette (stable: same class index -> same colour).
"""

from __future__ import annotations

import csv
import functools
import json
import re
from dataclasses import dataclass

CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
ANATOMY = ("SCT", "123037004", "Anatomical Structure")
ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")
TISSUE = ("SCT", "85756007", "Tissue")
LEFT = ("SCT", "7771000", "Left")
RIGHT = ("SCT", "24028007", "Right")
REGION_CONTEXT = "Anatomic codes - DICOM master list"

# name -> (category, type code, type meaning, colour)
_BUILTIN: dict[str, tuple[tuple[str, str, str], str, str, tuple[int, int, int]]] = {
    "liver": (ANATOMY, "10200004", "Liver", (221, 130, 101)),
    "kidney": (ANATOMY, "64033007", "Kidney", (185, 102, 83)),
    "spleen": (ANATOMY, "78961009", "Spleen", (157, 108, 162)),
    "pancreas": (ANATOMY, "15776009", "Pancreas", (249, 180, 111)),
    "aorta": (ANATOMY, "15825003", "Aorta", (224, 97, 76)),
    "inferior vena cava": (ANATOMY, "64131007", "Inferior vena cava", (0, 151, 206)),
    "stomach": (ANATOMY, "69695003", "Stomach", (216, 132, 105)),
    "gallbladder": (ANATOMY, "28231008", "Gallbladder", (139, 150, 98)),
    "esophagus": (ANATOMY, "32849002", "Esophagus", (211, 171, 143)),
    "duodenum": (ANATOMY, "38848004", "Duodenum", (255, 253, 229)),
    "adrenal gland": (ANATOMY, "23451007", "Adrenal gland", (249, 186, 150)),
    "urinary bladder": (ANATOMY, "89837001", "Urinary bladder", (222, 154, 132)),
    "prostate": (ANATOMY, "41216001", "Prostate", (230, 158, 140)),
    "heart": (ANATOMY, "80891009", "Heart", (206, 110, 84)),
    "lung": (ANATOMY, "39607008", "Lung", (197, 165, 145)),
    "vertebral column": (ANATOMY, "421060004", "Vertebral column", (241, 213, 144)),
    "bone": (TISSUE, "272673000", "Bone", (241, 214, 145)),
    "tumour": (ALTERED, "4147007", "Mass", (144, 238, 144)),
}
_ALIASES = {
    "tumor": "tumour", "liver tumour": "tumour", "liver tumor": "tumour", "lesion": "tumour", "mass": "tumour",
    "ivc": "inferior vena cava", "postcava": "inferior vena cava", "gall bladder": "gallbladder",
    "oesophagus": "esophagus", "bladder": "urinary bladder", "adrenal": "adrenal gland", "spine": "vertebral column",
    "vertebrae": "vertebral column", "kidneys": "kidney", "lungs": "lung",
}

# Distinct, fixed colours for names nobody knows (tab20-like, background-safe).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
    (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
    (219, 219, 141), (158, 218, 229),
)


@dataclass(frozen=True)
class Entry:
    name: str
    color: tuple[int, int, int]
    terminology: dict | None  # {"category": [scheme, code, meaning], "type": [...], "typeModifier": [...]?}


def normalize_name(name: str) -> tuple[str, tuple[str, str, str] | None]:
    """'Kidney_L' / 'left kidney' -> ('kidney', LEFT); 'Tumor' -> ('tumour', None)."""
    words = re.sub(r"[_\-/.]+", " ", name.strip().lower()).split()
    side = None
    for token, mod in (("left", LEFT), ("l", LEFT), ("right", RIGHT), ("r", RIGHT)):
        if token in words and len(words) > 1:
            words.remove(token)
            side = mod
            break
    base = " ".join(words)
    return _ALIASES.get(base, base), side


def _code(value) -> list[str] | None:
    """Accept ['SCT', code, meaning], {'CodingSchemeDesignator', 'CodeValue', 'CodeMeaning'} or 'SCT^code^meaning'."""
    if not value:
        return None
    if isinstance(value, str):
        parts = value.split("^")
        return parts if len(parts) == 3 else None
    if isinstance(value, dict):
        get = lambda *keys: next((str(value[k]) for k in keys if k in value), "")
        return [get("CodingSchemeDesignator", "scheme", "codingScheme") or "SCT",
                get("CodeValue", "code", "value"), get("CodeMeaning", "meaning", "name")]
    return [str(v) for v in value]


def slicer_terminology(t: dict | None) -> dict | None:
    """A terminology dict in any accepted form -> slicerio's form (category/type/typeModifier lists)."""
    if not t:
        return None
    out = {"contextName": t.get("contextName", CONTEXT)}
    for key, alias in (("category", "category"), ("type", "type"), ("typeModifier", "modifier")):
        code = _code(t.get(key) or t.get(alias))
        if code:
            out[key] = code
    if "category" not in out or "type" not in out:
        return None
    return out


def _parse_color(value) -> tuple[int, int, int] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        v = value.strip()
        if v.startswith("#") and len(v) == 7:
            return tuple(int(v[i:i + 2], 16) for i in (1, 3, 5))
        parts = [p for p in re.split(r"[,\s;]+", v) if p]
        value = [float(p) for p in parts]
    c = [float(x) for x in value]
    if len(c) != 3:
        return None
    if all(x <= 1.0 for x in c):
        c = [x * 255 for x in c]
    return tuple(int(round(x)) for x in c)


@functools.lru_cache(maxsize=1)
def shared_table() -> dict[str, Entry]:
    """The project's shared table (Resources/terminology/meddinov3_terminology.{json,csv}), keyed by normalised name."""
    try:
        from .resources import resources_dir

        folder = resources_dir() / "terminology"
    except FileNotFoundError:
        return {}
    table: dict[str, Entry] = {}
    rows: list[dict] = []
    jpath, cpath = folder / "meddinov3_terminology.json", folder / "meddinov3_terminology.csv"
    try:
        if jpath.is_file():
            data = json.loads(jpath.read_text())
            if isinstance(data, dict):
                data = data.get("entries") or data.get("classes") or [dict(v, name=k) for k, v in data.items()
                                                                     if isinstance(v, dict)]
            rows = [r for r in data if isinstance(r, dict)]
        elif cpath.is_file():
            with open(cpath, newline="") as f:
                rows = list(csv.DictReader(f))
    except (OSError, ValueError):
        return {}
    for r in rows:
        name = r.get("name") or r.get("Name")
        if not name:
            continue
        term = r.get("terminology") or {
            "category": r.get("category") or _join(r, "category"),
            "type": r.get("type") or _join(r, "type"),
            "typeModifier": r.get("modifier") or r.get("typeModifier") or _join(r, "modifier"),
        }
        term = slicer_terminology(term)
        region = r.get("anatomicRegion") or _join(r, "region")
        if term is not None and region:
            term["anatomicContextName"] = REGION_CONTEXT
            term["anatomicRegion"] = _code(region)
        entry = Entry(str(name), _parse_color(r.get("color") or r.get("colour")) or (128, 128, 128), term)
        synonyms = r.get("synonyms") or []
        if isinstance(synonyms, str):
            synonyms = synonyms.split("|")
        for key in [str(name), *synonyms]:
            if key.strip():
                table.setdefault(simple_name(key), entry)
    return table


def simple_name(name: str) -> str:
    """The shared table's matching rule: lower case, '_' and '-' and repeated spaces -> one space."""
    return " ".join(re.sub(r"[_\-]+", " ", name.strip().lower()).split())


def _join(row: dict, prefix: str) -> list[str] | None:
    code = row.get(f"{prefix}_code") or row.get(f"{prefix}_value")
    if not code:
        return None
    return [row.get(f"{prefix}_scheme") or "SCT", str(code), row.get(f"{prefix}_meaning") or ""]


def lookup(name: str, index: int = 0, color=None, terminology: dict | None = None) -> Entry:
    """Colour and terminology of class `name` (the `index`-th class picks the fallback palette colour)."""
    given_color = _parse_color(color) if color is not None else None
    given_term = slicer_terminology(terminology)
    base, side = normalize_name(name)
    entry = shared_table().get(simple_name(name))
    if entry is None and side is not None and base not in _BUILTIN:
        entry = shared_table().get(base)
    if entry is None and base in _BUILTIN:
        category, code, meaning, rgb = _BUILTIN[base]
        term = {"contextName": CONTEXT, "category": list(category), "type": ["SCT", code, meaning]}
        if side:
            term["typeModifier"] = list(side)
        entry = Entry(name, rgb, term)
    if entry is None:
        entry = Entry(name, PALETTE[index % len(PALETTE)], None)
    return Entry(name, given_color or entry.color, given_term or entry.terminology)


def describe_classes(classes) -> list[Entry]:
    """Entries for a model's ClassInfo list (background included, in channel order)."""
    return [lookup(c.name, i, c.color, c.terminology) for i, c in enumerate(classes)]
