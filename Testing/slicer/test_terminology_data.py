"""Resources/terminology/meddinov3_terminology.csv: well formed, unambiguous, valid Slicer terminology."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import slicer

TABLE = Path(__file__).resolve().parents[2] / "Resources" / "terminology" / "meddinov3_terminology.csv"
COLUMNS = [
    "name", "synonyms",
    "category_scheme", "category_code", "category_meaning",
    "type_scheme", "type_code", "type_meaning",
    "modifier_scheme", "modifier_code", "modifier_meaning",
    "region_scheme", "region_code", "region_meaning",
    "color",
]
TRIPLES = ["category", "type", "modifier", "region"]


def rows() -> list[dict[str, str]]:
    with open(TABLE, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def normalise(name: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", name.lower()).split())


def test_columns_codes_and_colours():
    for row in rows():
        assert None not in row.values() and None not in row, f"wrong number of fields: {row}"
        assert row["name"] == normalise(row["name"])
        for triple in TRIPLES:
            scheme, code, meaning = (row[f"{triple}_{part}"] for part in ("scheme", "code", "meaning"))
            if triple in ("category", "type"):
                assert scheme == "SCT" and code and meaning, (row["name"], triple)
            if scheme or code or meaning:
                assert scheme == "SCT" and code.isdigit() and meaning, (row["name"], triple)
        color = [int(v) for v in row["color"].split()]
        assert len(color) == 3 and all(0 <= v <= 255 for v in color), row["name"]


def test_names_and_synonyms_are_unambiguous():
    owner: dict[str, str] = {}
    for row in rows():
        for alias in [row["name"], *filter(None, row["synonyms"].split("|"))]:
            key = normalise(alias)
            assert owner.setdefault(key, row["name"]) == row["name"], f"{alias!r} names both {owner[key]!r} and {row['name']!r}"


def test_known_codes():
    by_name = {row["name"]: row for row in rows()}
    expected = {
        "liver": ("123037004", "10200004", ""),
        "liver tumour": ("49755003", "108369006", ""),
        "spleen": ("123037004", "78961009", ""),
        "kidney right": ("123037004", "64033007", "24028007"),
        "kidney left": ("123037004", "64033007", "7771000"),
        "pancreas": ("123037004", "15776009", ""),
        "aorta": ("123037004", "15825003", ""),
        "inferior vena cava": ("123037004", "64131007", ""),
        "stomach": ("123037004", "69695003", ""),
        "gallbladder": ("123037004", "28231008", ""),
        "esophagus": ("123037004", "32849002", ""),
        "duodenum": ("123037004", "38848004", ""),
        "adrenal gland": ("123037004", "23451007", ""),
        "urinary bladder": ("123037004", "89837001", ""),
        "heart": ("123037004", "80891009", ""),
        "lung": ("123037004", "39607008", ""),
    }
    for name, (category, type_, modifier) in expected.items():
        row = by_name[name]
        assert (row["category_code"], row["type_code"], row["modifier_code"]) == (category, type_, modifier), name
    assert by_name["liver tumour"]["region_code"] == "10200004"


def test_rows_make_valid_slicer_terminology_entries():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    for row in rows():
        entry = slicer.vtkSlicerTerminologyEntry()
        entry.SetTerminologyContextName("MedDINOv3")
        objects = {
            "category": entry.GetCategoryObject(),
            "type": entry.GetTypeObject(),
            "modifier": entry.GetTypeModifierObject(),
            "region": entry.GetRegionObject(),
        }
        for triple, coded in objects.items():
            if row[f"{triple}_code"]:
                coded.SetCodingSchemeDesignator(row[f"{triple}_scheme"])
                coded.SetCodeValue(row[f"{triple}_code"])
                coded.SetCodeMeaning(row[f"{triple}_meaning"])
        serialized = logic.SerializeTerminologyEntry(entry)
        assert f"SCT^{row['type_code']}^{row['type_meaning']}" in serialized, row["name"]
        parsed = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(serialized, parsed), row["name"]
