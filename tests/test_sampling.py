"""sampling.py's grids: small images enlarged by nearest neighbour (train.py's grids), or as they are."""
import numpy as np
from PIL import Image

import sampling


def test_a_grid_enlarges_small_images_by_nearest_neighbour(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    sampling.save_grid(images, tmp_path / "big.png", min_side=64)
    grid = np.asarray(Image.open(tmp_path / "big.png"))
    assert grid.shape == (2 * (64 + 2) + 2, 3 * (64 + 2) + 2, 3)  # 3 columns, 2 rows, 2-pixel borders
    for i, image in enumerate(images):
        r, c = divmod(i, 3)
        cell = grid[2 + 66 * r: 66 + 66 * r, 2 + 66 * c: 66 + 66 * c]
        assert np.array_equal(cell[::8, ::8], image)  # each pixel an 8x8 square of its own value
        assert np.array_equal(cell, image.repeat(8, 0).repeat(8, 1))
    assert grid[:2].max() == 0 and grid[-66:, -66:].max() == 0  # the border and the empty cell
    sampling.save_grid(images, tmp_path / "same.png", min_side=8)  # large enough: as they are
    assert np.asarray(Image.open(tmp_path / "same.png")).shape == (2 * 10 + 2, 3 * 10 + 2, 3)
    sampling.save_grid(images[:, :, :6], tmp_path / "wide.png", min_side=20)  # 6 px up to 24: x4
    assert np.asarray(Image.open(tmp_path / "wide.png")).shape == (2 * 34 + 2, 3 * 26 + 2, 3)
