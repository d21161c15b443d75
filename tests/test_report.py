"""The image grid: every tile lands where its row and column say, in its own colours."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffunlearn.report import image_grid


def test_each_tile_is_drawn_at_its_row_and_column(tmp_path):
    colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [-1, 1, 1], [1, -1, 1]])
    rows = {"first": colours[:3, :, None, None].expand(3, 3, 16, 16),
            "second model": colours[3:, :, None, None].expand(3, 3, 16, 16)}
    image_grid(rows, ["red", "green", "blue"], tmp_path / "grid.png", "six solid tiles")
    png = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB")).astype(int)
    # The layout report.image_grid draws: tiles 1.2 in, 3-pixel gaps (0.25 in at 16 px), 0.45 in left
    # and 0.95 in top margins, 110 dpi.
    scale, dpi, gap = 1.2 / 16, 110, 3
    assert png.shape[1] == round((0.45 + 0.1 + (3 * 16 + 2 * gap) * scale) * dpi)
    assert png.shape[0] == round((0.95 + 0.1 + (2 * 16 + gap) * scale) * dpi)
    for r in range(2):
        for c in range(3):
            x = round((0.45 + (c * (16 + gap) + 8) * scale) * dpi)
            y = round((0.95 + (r * (16 + gap) + 8) * scale) * dpi)
            want = ((colours[3 * r + c] + 1) / 2 * 255).numpy()
            assert np.abs(png[y, x] - want).max() <= 2, (r, c, png[y, x], want)
    # Between two tiles: the white gap.
    x_gap = round((0.45 + (16 + gap / 2) * scale) * dpi)
    assert (png[round((0.95 + 8 * scale) * dpi), x_gap] >= 250).all()
