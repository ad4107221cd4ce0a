"""SNOMED CT codes and display colours for the structures the project knows by name.

Structures from a user's own dataset whose name is not listed get a generic
"Anatomical Structure" code and a colour from a fixed palette, so nothing breaks.
"""
from __future__ import annotations

ANATOMY = ("SCT", "123037004", "Anatomical Structure")
ALTERED = ("SCT", "49755003", "Morphologically Altered Structure")

# name (lower case) → (category, type code, type meaning, RGB)
KNOWN: dict[str, tuple[tuple[str, str, str], str, str, tuple[int, int, int]]] = {
    "liver": (ANATOMY, "10200004", "Liver", (221, 130, 101)),
    "spleen": (ANATOMY, "78961009", "Spleen", (157, 108, 162)),
    "right kidney": (ANATOMY, "9846003", "Right kidney", (185, 102, 83)),
    "left kidney": (ANATOMY, "18639004", "Left kidney", (212, 126, 151)),
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

PALETTE = [(128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79),
           (221, 130, 101), (144, 238, 144), (192, 104, 88), (220, 245, 20), (78, 63, 0)]


def describe(name: str, index: int) -> dict:
    """Colour and terminology entry for a structure name."""
    entry = KNOWN.get(name.strip().lower())
    if entry is None:
        category, code, meaning, rgb = ANATOMY, "91723000", "Anatomical structure", PALETTE[index % len(PALETTE)]
    else:
        category, code, meaning, rgb = entry
    return {"color": list(rgb),
            "terminology": {"category": {"scheme": category[0], "code": category[1], "meaning": category[2]},
                            "type": {"scheme": "SCT", "code": code, "meaning": meaning}}}
