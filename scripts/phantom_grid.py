"""Draw docs/images/phantoms.png: four pretraining images of every phantom modality, read back from the files
``make_phantoms`` writes (through dex's readers and the Table 2 normalisations), and one task image with its
ground truth outlined.

    python scripts/phantom_grid.py [--size 128] [--out docs/images/phantoms.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from dex.data.normalize import VOLUME_NORMALIZERS, scale_255
from dex.data.phantoms import RAW_SOURCES, make_phantoms
from dex.data.readers import read_label_map, read_picture, read_video_frames
from dex.data.recipe import Recipe
from dex.data.volumes import read_dicom_volume, read_nifti

ROWS = [  # (modality label, source, task)
    ("CT", "ct-dicom", "ct-organs"), ("MR", "mr-nifti", "mr-organs"), ("PET", "pet-suv-nifti", "pet-organs"),
    ("X-ray", "xray-png16", "xray-lungs"), ("US", "us-png", "us-fetal-head"), ("Fundus", "fundus-jpeg", "fundus-vessels"),
    ("OCT", "oct-png", "oct-layers"), ("Pathology", "pathology-tiff", "pathology-nuclei"),
    ("Endoscopy", "endoscopy-jpeg", "endoscopy-polyp"), ("Photo", "photo-jpeg", "photo-lesion"),
]


def _rgb(image: np.ndarray, size: int) -> np.ndarray:
    image = np.clip(image, 0, 1)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    pil = Image.fromarray((image * 255).round().astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(pil)


def source_images(recipe: Recipe, name: str, count: int) -> list[np.ndarray]:
    source = next(s for s in recipe.sources if s.name == name)
    root = recipe.root_of(source)
    files = sorted(root.glob(source.pattern))
    if source.format == "dicom":
        volume = read_dicom_volume(sorted(files[0].parent.glob("*.dcm")))
        return _spread(VOLUME_NORMALIZERS[source.normalization](volume.values), count)
    if source.format == "nifti":
        volume = read_nifti(files[0])[0]
        return _spread(VOLUME_NORMALIZERS[source.normalization](volume.values), count)
    if source.format == "video":
        return [frame / 255.0 for _, frame in read_video_frames(files[0], source.frame_stride)][:count]
    pictures = [read_picture(path) for path in files[:count]]
    return [scale_255(p.pixels, p.max_value) for p in pictures]


def _spread(volume: np.ndarray, count: int) -> list[np.ndarray]:
    depth = volume.shape[0]
    return [volume[int(depth * f)] for f in np.linspace(0.2, 0.75, count)]


def task_overlay(folder: Path, size: int) -> np.ndarray:
    image_path = sorted((folder / "images").iterdir())[0]
    picture = read_picture(image_path)
    rgb = _rgb(scale_255(picture.pixels, picture.max_value), size).copy()
    mask = np.asarray(Image.fromarray(read_label_map(folder / "masks" / f"{image_path.stem}.png").astype(np.uint8))
                      .resize((size, size), Image.Resampling.NEAREST))
    edges = mask != ndimage.grey_erosion(mask, size=3)
    rgb[edges] = (255, 220, 0)
    return rgb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--out", default="docs/images/phantoms.png")
    args = parser.parse_args()
    assert {row[1] for row in ROWS} <= {raw.source.name for raw in RAW_SOURCES}
    tile, label_width, columns = args.size, 96, 5
    with tempfile.TemporaryDirectory() as tmp:
        recipe = make_phantoms(tmp, per_modality=8, size=args.size, seed=0, task_images=5, workers=2)
        canvas = Image.new("RGB", (label_width + columns * tile, len(ROWS) * tile + 20), "white")
        draw = ImageDraw.Draw(canvas)
        draw.text((label_width, 4), "four pretraining images (read back from the written files)", fill="black")
        draw.text((label_width + 4 * tile + 4, 4), "task + ground truth", fill="black")
        for row, (label, source, task) in enumerate(ROWS):
            y = 20 + row * tile
            draw.text((6, y + tile // 2 - 6), label, fill="black")
            tiles = [_rgb(image, tile) for image in source_images(recipe, source, 4)]
            tiles.append(task_overlay(Path(tmp) / "tasks" / task, tile))
            for col, image in enumerate(tiles):
                canvas.paste(Image.fromarray(image), (label_width + col * tile, y))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
