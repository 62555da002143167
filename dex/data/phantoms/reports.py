"""Templated reports of the 2D phantoms: one to three English sentences per image that state the modality and view,
the anatomy and what its generator drew (``Sample.findings``), each finding with its size and position computed
from the parameters it was drawn with.

Sizes are stated at a field of view per modality (FIELD_MM): an S-pixel image has a pixel spacing of FIELD_MM / S,
so a finding keeps its size in mm whatever S. For X-ray it is the torso's own geometry; elsewhere it is a nominal
choice of ours, picked so that the drawn anatomy has about its real size. Positions are ninths of the image as
displayed ("top left", ..., "centre", ..., "bottom right"); sides follow the modality's viewing convention: a chest
radiograph is viewed facing the patient, so the patient's left is the image's right (the torso's columns run from
the patient's right to left), and a fundus photograph is viewed the same way, so a right eye has its optic disc on
the image's right. Each sentence has two or three wordings, picked by the image's own random generator; the facts
are the same whichever is picked.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dex.data.phantoms.radiology import FIELD_MM as TORSO_FIELD_MM
from dex.data.phantoms.radiology import TORSO_MM, XRAY_Z_RANGE

#: (height, width) in mm that an image spans
FIELD_MM = {
    "X-ray": (TORSO_MM * (XRAY_Z_RANGE[0] - XRAY_Z_RANGE[1]) / 2, TORSO_FIELD_MM),
    "US": (150.0, 150.0),  # a 15 cm deep sector: skulls of about 20-27 weeks' gestation
    "Fundus": (12.0, 12.0),  # optic disc 1.1-1.4 mm across, 4.5 mm from the fovea
    "OCT": (2.0, 6.0),  # a 6 mm B-scan, 2 mm deep: a central retina of about 0.35 mm
    "Pathology": (0.128, 0.128),  # 0.5 µm pixels at 256 px: nuclei of 6-10 µm
    "Endoscopy": (40.0, 40.0),  # polyps of 5-10 mm
    "Photo": (20.0, 20.0),  # pigmented lesions of 6-10 mm
}

Findings = dict[str, Any]  # a Sample's findings: what was drawn, by name


def _length(units: float, size: int, field_mm: float) -> float:
    """A length in [-1, 1] grid units (2 units span size - 1 pixels) in mm, at a pixel spacing of field_mm / size."""
    return units * (size - 1) / 2 * field_mm / size


def _number(value: float) -> str:
    """Whole numbers from 10, one decimal from 1, two below: 240, 96, 7.3, 0.14."""
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _place(y: float, x: float) -> str:
    """The ninth of the image a [-1, 1] point lies in: "top left", "top", ..., "centre", ..., "bottom right"."""
    row = "top" if y < -1 / 3 else "bottom" if y > 1 / 3 else ""
    column = "left" if x < -1 / 3 else "right" if x > 1 / 3 else ""
    return f"{row} {column}".strip() or "centre"


def _a(number: str) -> str:
    """The article before a number as spoken: "an" for 8, 8.5, 11, 18, 80, ..., else "a"."""
    whole = number.split(".")[0]
    return "an" if whole.startswith("8") or whole in ("11", "18") else "a"


def _and(items: list[str]) -> str:
    return " and ".join(items) if len(items) < 3 else f"{', '.join(items[:-1])} and {items[-1]}"


def _one(rng: np.random.Generator, *wordings: str) -> str:
    return wordings[int(rng.integers(len(wordings)))]


def chest_xray(findings: Findings, size: int, rng: np.random.Generator) -> str:
    """The report of :func:`dex.data.phantoms.radiology.chest_xray`: heart size, side and cardiothoracic ratio."""
    field = FIELD_MM["X-ray"][1]
    centre, half = findings["heart"]
    left, right = findings["thorax"]
    width = _length(2 * half, size, field)
    ratio = f"{width / _length(right - left, size, field):.2f}"
    shift = centre - (left + right) / 2
    side = "left" if shift > 0 else "right"  # the image's right is the patient's left
    offset = _number(_length(abs(shift), size, field))
    return " ".join([
        _one(rng, "Chest X-ray, PA view.", "PA chest X-ray.", "Posteroanterior chest X-ray."),
        _one(rng, f"The cardiac silhouette is {_number(width)} mm wide and centred {offset} mm to the patient's {side} "
                  f"of the midline (cardiothoracic ratio {ratio}).",
             f"Heart shadow {_number(width)} mm across, its centre {offset} mm to the patient's {side} of the midline; "
             f"cardiothoracic ratio {ratio}."),
        _one(rng, "Clear lungs; no focal finding.", "No focal finding in the lungs.",
             "The lung fields are clear, with no focal lesion."),
    ])


def fetal_head(findings: Findings, size: int, rng: np.random.Generator) -> str:
    """The report of :func:`dex.data.phantoms.ultrasound.fetal_head`: head circumference, diameters and position."""
    height, width = FIELD_MM["US"]
    cy, cx, ry, rx, _ = findings["head"]
    a, b = _length(max(ry, rx), size, width), _length(min(ry, rx), size, width)
    circumference = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))  # Ramanujan's ellipse perimeter
    hc, bpd, ofd = _number(circumference), _number(2 * b), _number(2 * a)
    depth = _number(_length(cy + 1, size, height))
    lateral = _length(cx, size, width)
    across = (f"{_number(abs(lateral))} mm {'right' if lateral > 0 else 'left'} of the sector's axis"
              if abs(lateral) >= 1 else "on the sector's axis")
    return " ".join([
        _one(rng, "Fetal head ultrasound, axial plane.", "Obstetric ultrasound, axial view of the fetal head.",
             "Ultrasound of the fetal head in an axial plane."),
        _one(rng, f"Head circumference {hc} mm, biparietal diameter {bpd} mm, occipitofrontal diameter {ofd} mm.",
             f"The skull measures {bpd} by {ofd} mm (head circumference {hc} mm)."),
        _one(rng, f"The head lies {depth} mm deep, {across}, with a midline echo.",
             f"Midline echo seen; the centre of the head is {depth} mm deep, {across}."),
    ])


def fundus(findings: Findings, size: int, rng: np.random.Generator) -> str:
    """The report of :func:`dex.data.phantoms.eye.fundus`: eye, optic disc and the hard exudates drawn."""
    field = FIELD_MM["Fundus"][1]
    eye = findings["eye"]
    dy, dx, radius, cup = findings["disc"]
    my, mx = findings["macula"]
    disc = _number(_length(2 * radius, size, field))
    distance = _number(_length(math.hypot(dy - my, dx - mx), size, field))
    side = "right" if dx > 0 else "left"
    sentences = [
        _one(rng, f"Colour fundus photograph of the {eye} eye.", f"Fundus photograph, {eye} eye.",
             f"{eye.capitalize()} eye, colour fundus photograph."),
        _one(rng, f"The optic disc, {disc} mm across with a cup-to-disc ratio of {cup:.1f}, lies on the image's "
                  f"{side}, {distance} mm nasal to the fovea.",
             f"Optic disc {disc} mm (cup-to-disc ratio {cup:.1f}) on the {side} of the image, {distance} mm from the "
             f"fovea."),
    ]
    spots = findings["exudates"]
    if spots:
        far = _number(_length(max(math.hypot(y - my, x - mx) for y, x, _, _ in spots), size, field))
        big = _number(_length(2 * max(max(ry, rx) for _, _, ry, rx in spots), size, field))
        n = len(spots)
        sentences.append(
            _one(rng, f"1 hard exudate of {big} mm, {far} mm from the fovea.",
                 f"1 hard exudate ({big} mm) near the macula, {far} mm from the fovea.") if n == 1 else
            _one(rng, f"{n} hard exudates near the macula, up to {far} mm from the fovea, the largest {big} mm.",
                 f"{n} hard exudates within {far} mm of the fovea; the largest measures {big} mm."))
    else:
        sentences.append(_one(rng, "No exudates.", "No hard exudates.", "The macula is free of exudates."))
    return " ".join(sentences)


def oct_bscan(findings: Findings, size: int, rng: np.random.Generator) -> str:
    """The report of :func:`dex.data.phantoms.eye.oct_bscan`: foveal pit position, central thickness, nasal side."""
    height, width = FIELD_MM["OCT"]
    shift = _length(findings["fovea"], size, width)
    where = (f"{abs(shift):.1f} mm {'right' if shift > 0 else 'left'} of the scan centre" if abs(shift) >= 0.05
             else "at the scan centre")
    thickness = f"{_length(findings['central_thickness'], size, height) * 1000:.0f}"
    nasal = findings["nasal"]
    return " ".join([
        _one(rng, "OCT B-scan of the retina through the fovea.", "Foveal OCT B-scan of the retina.",
             "Retinal OCT, horizontal B-scan through the fovea."),
        _one(rng, f"The foveal pit lies {where}; central retinal thickness {thickness} µm.",
             f"Foveal pit {where}, central retinal thickness {thickness} µm."),
        _one(rng, f"Regular retinal layers, the nerve fibre layer thicker on the nasal side (image {nasal}); no fluid.",
             f"No intraretinal or subretinal fluid; the nerve fibre layer thickens nasally (image {nasal})."),
    ])


def he_tile(findings: Findings, size: int, rng: np.random.Generator) -> str:
    """The report of :func:`dex.data.phantoms.optical.he_tile`: clusters, gland-like rings, nuclear size."""
    field_um = FIELD_MM["Pathology"][1] * 1000
    clusters = findings["clusters"]
    rings = [_number(_length(2 * spread, size, field_um)) + f" µm across at the {_place(y, x)}"
             for y, x, spread, ring in clusters if ring]
    long_axes = [_length(2 * max(radii), size, field_um) for radii in findings["nuclei"]]
    shortest, longest = _number(min(long_axes)), _number(max(long_axes))
    if rings:
        glands = f"gland-like ring{'s' if len(rings) > 1 else ''} {_and(rings)}"
        arrangement = _one(rng, f"{len(clusters)} clusters of nuclei, with {glands}.",
                           f"Nuclei in {len(clusters)} clusters; {glands}.")
    else:
        arrangement = _one(rng, f"{len(clusters)} clusters of nuclei, none forming gland-like rings.",
                           f"Nuclei in {len(clusters)} solid clusters, no gland-like rings.")
    return " ".join([
        _one(rng, "H&E pathology tile of breast tissue.", "Histopathology of breast tissue, H&E stain.",
             "Breast tissue pathology section, H&E-stained."),
        arrangement,
        _one(rng, f"Nuclei measure {shortest}-{longest} µm along their long axis.",
             f"Nuclear long axes range from {shortest} to {longest} µm."),
    ])


def colonoscopy(findings: Findings, size: int, rng: np.random.Generator) -> str:
    """The report of :func:`dex.data.phantoms.optical.colonoscopy`: the polyp's size and place, the lumen's place."""
    field = FIELD_MM["Endoscopy"][1]
    if findings["polyp"] is not None:
        y, x, ry, rx, _ = findings["polyp"]
        diameter, where = _number(_length(2 * max(ry, rx), size, field)), _place(y, x)
        polyp = _one(rng, f"{_a(diameter).capitalize()} {diameter} mm sessile polyp at the {where} of the frame.",
                     f"Sessile polyp, {diameter} mm, at the {where} of the frame.")
    else:
        polyp = _one(rng, "No polyp.", "No polyp or other focal lesion.", "No focal finding.")
    lumen = _place(*findings["lumen"])
    return " ".join([
        _one(rng, "Colonoscopy: endoscopic view of the colon.", "Endoscopy frame of the colon at colonoscopy.",
             "Colonoscopy frame (endoscopy) of the colon."),
        polyp,
        _one(rng, f"The lumen is at the {lumen} of the frame.", f"Lumen at the {lumen} of the view."),
    ])


def dermoscopy(findings: Findings, size: int, rng: np.random.Generator) -> str:
    """The report of :func:`dex.data.phantoms.optical.dermoscopy`: the lesion's size, place, border and colours."""
    y, x, radius = findings["lesion"]
    diameter, where = _number(_length(2 * radius, size, FIELD_MM["Photo"][1])), _place(y, x)
    if findings["irregular"]:
        shown = [name for name, key in (("a blue-grey veil", "veil"), ("dark dots", "dots")) if findings[key]]
        features = _and(["an irregular border", *shown])
    else:
        features = "a regular border and even brown pigment"
    sentences = [
        _one(rng, "Dermoscopy photograph of the skin.", "Dermoscopic photo of a skin lesion.",
             "Skin photograph under dermoscopy."),
        _one(rng, f"{_a(diameter).capitalize()} {diameter} mm pigmented lesion at the {where} of the image, with "
                  f"{features}.",
             f"Pigmented lesion, {diameter} mm across, at the {where}: {features}."),
    ]
    if findings["hairs"]:
        sentences.append("A hair crosses the field." if findings["hairs"] == 1 else
                         _one(rng, "Hairs cross the field.", "A few hairs overlie the skin."))
    return " ".join(sentences)
