"""Class names -> SNOMED CT codes and colours: spec wins over the shared table, which wins over the built-ins."""

from meddinov3.checkpoints import ClassInfo
from meddinov3.terminology import PALETTE, describe_classes, lookup, slicer_terminology


def test_known_names_and_laterality():
    liver = lookup("Liver")
    assert liver.terminology["type"][:2] == ["SCT", "10200004"] and liver.color == (221, 130, 101)
    left = lookup("kidney_L")
    assert left.terminology["type"][1] == "64033007" and left.terminology["typeModifier"][1] == "7771000"
    assert lookup("right kidney").terminology["typeModifier"][1] == "24028007"
    assert lookup("liver tumor").terminology["category"][1] == "49755003"


def test_spec_wins_and_unknown_names_get_distinct_colours():
    term = {"category": {"CodingSchemeDesignator": "SCT", "CodeValue": "123037004", "CodeMeaning": "Anatomical Structure"},
            "type": {"CodingSchemeDesignator": "SCT", "CodeValue": "78961009", "CodeMeaning": "Spleen"}}
    classes = [ClassInfo(0, "background"), ClassInfo(1, "liver", color=(1, 2, 3), terminology=term),
               ClassInfo(2, "blob a"), ClassInfo(3, "blob b")]
    entries = describe_classes(classes)
    assert entries[1].color == (1, 2, 3) and entries[1].terminology["type"][1] == "78961009"
    assert entries[2].terminology is None and entries[2].color in PALETTE and entries[2].color != entries[3].color
    assert slicer_terminology({"category": "SCT^1^a", "type": "SCT^2^b"})["type"] == ["SCT", "2", "b"]
