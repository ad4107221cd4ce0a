"""SNOMED CT codes and display colours for the structures the project knows by name.

The codes are those of Slicer's terminology tables ("Segmentation category and type - DICOM
master list"), as SlicerTotalSegmentator uses them: a paired organ is one type with a
laterality modifier (Kidney + Right), not a "Right kidney" type. Structures from a user's own
dataset whose name is not listed get a generic "Anatomical Structure" code and a colour from a
fixed palette, so nothing breaks.
"""

from __future__ import annotations

ANATOMY = ("SCT", "123037004", "Anatomical Structure")
ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")
RIGHT = ("SCT", "24028007", "Right")
LEFT = ("SCT", "7771000", "Left")

# name (lower case) → (category, type code, type meaning, RGB[, type modifier])
KNOWN: dict[str, tuple] = {
    "liver": (ANATOMY, "10200004", "Liver", (221, 130, 101)),
    "spleen": (ANATOMY, "78961009", "Spleen", (157, 108, 162)),
    "right kidney": (ANATOMY, "64033007", "Kidney", (185, 102, 83), RIGHT),
    "left kidney": (ANATOMY, "64033007", "Kidney", (212, 126, 151), LEFT),
    "right ventricle": (ANATOMY, "53085002", "Right ventricle", (117, 175, 205)),
    "myocardium": (ANATOMY, "74281007", "Myocardium", (206, 110, 84)),
    "left ventricle": (ANATOMY, "87878005", "Left ventricle", (255, 225, 110)),
    "left atrium": (ANATOMY, "82471001", "Left atrium", (230, 140, 180)),
    "whole tumour": (ALTERED, "108369006", "Neoplasm", (255, 60, 60)),
    "cerebral white matter": (ANATOMY, "68523003", "Cerebral white matter", (245, 245, 245)),
    "cerebral cortex": (ANATOMY, "40146001", "Cerebral cortex", (205, 62, 78)),
    "lateral ventricles": (ANATOMY, "66720007", "Lateral ventricle", (120, 18, 134)),
    "thalamus": (ANATOMY, "42695009", "Thalamus", (0, 118, 14)),
}

PALETTE = [
    (128, 174, 128),
    (241, 214, 145),
    (177, 122, 101),
    (111, 184, 210),
    (216, 101, 79),
    (221, 130, 101),
    (144, 238, 144),
    (192, 104, 88),
    (220, 245, 20),
    (78, 63, 0),
]


def _code(triple: tuple[str, str, str]) -> dict:
    return {"scheme": triple[0], "code": triple[1], "meaning": triple[2]}


def known_terminology(name: str) -> dict | None:
    """The terminology entry of a structure the project knows by name, or None."""
    entry = KNOWN.get(name.strip().lower())
    if entry is None:
        return None
    category, code, meaning, _rgb, *modifier = entry
    terminology = {"category": _code(category), "type": {"scheme": "SCT", "code": code, "meaning": meaning}}
    if modifier:
        terminology["modifier"] = _code(modifier[0])
    return terminology


def describe(name: str, index: int) -> dict:
    """Colour and terminology entry for a structure name."""
    entry = KNOWN.get(name.strip().lower())
    if entry is None:
        generic = {
            "category": _code(ANATOMY),
            "type": {"scheme": "SCT", "code": "91723000", "meaning": "Anatomical structure"},
        }
        return {"color": list(PALETTE[index % len(PALETTE)]), "terminology": generic}
    return {"color": list(entry[3]), "terminology": known_terminology(name)}
