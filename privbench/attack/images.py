"""Reconstruction images: PNG grids of originals and reconstructions.

Each attack folder also stores the grid's tensors (GRID_TENSORS), so a combined grid can be drawn
from reused folders too (privbench.store.attacks.write_combined_grid)."""

from __future__ import annotations

import io

import torch
from PIL import Image, ImageDraw

GRID_IMAGES = 16  # columns in the PNG grids
GRID_SCALE = 2  # nearest-neighbour upscaling so 32px images are visible
GRID_TENSORS = "grid_images.pt"  # the grid's images as float tensors, for the combined grid


def image_grid(rows: list[torch.Tensor], *, labels: list[str] | None = None, scale: int = GRID_SCALE) -> bytes:
    """PNG bytes of image rows (each [n,C,H,W] in [0,1]), 2px gaps, optional text label per row."""

    n = max(len(r) for r in rows)
    c, h, w = rows[0].shape[1:]
    gap, label_w = 2, (8 + 6 * max(len(s) for s in labels)) if labels else 0
    canvas = torch.ones(3, len(rows) * (h + gap) + gap, n * (w + gap) + gap)
    for i, row in enumerate(rows):
        row = row.detach().float().cpu().clamp(0, 1)
        if row.shape[1] == 1:
            row = row.repeat(1, 3, 1, 1)
        for j, img in enumerate(row[:n]):
            y0, x0 = gap + i * (h + gap), gap + j * (w + gap)
            canvas[:, y0 : y0 + h, x0 : x0 + w] = img[:3]
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    if labels:
        full = Image.new("RGB", (img.width + label_w, img.height), "white")
        full.paste(img, (label_w, 0))
        draw = ImageDraw.Draw(full)
        for i, text in enumerate(labels):
            draw.text((4, (gap + i * (h + gap) + h // 2) * scale - 5), text, fill="black")
        img = full
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
