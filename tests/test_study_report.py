"""study_report.py's figures: Fig. 5's gate heatmap (the report's text is tests/test_study.py's)."""
import numpy as np
from PIL import Image

import dmp
from study_report import draw_gate_heatmap
from test_dmp import tiny_dit


def test_fig5_heatmap_panels_gaps_and_colours(tmp_path):
    model = tiny_dit()
    dmp.patch(model, "dmp", init="random")
    w = dmp.gate_weights(model, timesteps=range(0, 1000, 100))  # 3 blocks, 10 timesteps, 16 prompts
    path = draw_gate_heatmap(w, tmp_path / "fig5.png", cell=2, gap=4)
    image = np.asarray(Image.open(path))
    assert image.shape == (10 * 2, 3 * 16 * 2 + 2 * 4, 3)
    assert (image[:, 32:36] == 255).all()  # the gap between panels 1 and 2
    panel = image[:, :32].reshape(-1, 3)  # a panel spans the colour map, smallest to largest
    assert {(68, 1, 84), (253, 231, 37)} <= set(map(tuple, panel.tolist()))
    # t = T-1 at the top: the first panel's top row is the last timestep's weights, brightest where
    # its largest weight is.
    top = image[0, :32:2].astype(int).sum(-1)
    assert top.argmax() == w[0, -1].argmax()
    uniform = draw_gate_heatmap(np.full((1, 2, 3), 1 / 3), tmp_path / "c.png", cell=1)
    assert (np.asarray(Image.open(uniform)) == (33, 145, 140)).all()  # the middle colour
    image = Image.open(draw_gate_heatmap(w, tmp_path / "fig5b.png", cell=1, gap=2, columns=2))
    assert image.size == (2 * 16 + 2, 2 * 10 + 2)
