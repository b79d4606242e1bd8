"""
study_report.py on the committed study.json, without training: the README's results and the verdict
are the data's (swapping two rows' numbers, or a verdict's wording, fails here), every branch of
the rule and of the verdict, and Fig. 5 on one shared scale (the end-to-end study:
tests/test_study.py).
"""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

import dmp
import study
import study_report as report
from study_report import draw_gate_heatmap
from test_dmp import tiny_dit

ROOT = Path(__file__).resolve().parents[1]
STUDY = json.loads((ROOT / "assets" / "study" / "study.json").read_text())


def values(s, key, metric):
    """A row's values of a metric over the seeds, read here from study.json's own layout."""
    row = s["rows"][key]
    field = "quality" if metric in report.QUALITY else "runs"
    return [row[field][str(seed)][metric] for seed in s["settings"]["seeds"]]


def swapped(s, a, b):
    """A copy of study.json with rows a and b's numbers (runs, sample quality) exchanged."""
    s = copy.deepcopy(s)
    for field in ("runs", "quality"):
        s["rows"][a][field], s["rows"][b][field] = s["rows"][b][field], s["rows"][a][field]
    return s


def rederived(s):
    """The comparisons as this file computes them from the rows' per-seed values."""
    out = []
    for c in s["comparisons"]:
        a = np.array(values(s, c["a"], c["metric"]))
        b = (np.array(values(s, c["b"], c["metric"])) if c["b"] in s["rows"] else
             s["base"][c["metric"]] if c["metric"] in ("heldout_loss", "bpd") else
             s["base"]["quality"][c["metric"]])
        d = a - b
        t = stats.t.ppf(1 - 0.05 / (2 * c["m"]), len(d) - 1)
        half = t * d.std(ddof=1) / np.sqrt(len(d))
        out.append((c["a"], c["b"], c["metric"], d.mean(), d.mean() - half, d.mean() + half))
    return out


def consistent(s):
    """Every stored comparison equals its rederivation, and every decision follows the rule."""
    for c, (*_, diff, lo, hi) in zip(s["comparisons"], rederived(s)):
        if abs(c["diff"] - diff) > 1e-12 or np.abs(np.subtract(c["interval"], [lo, hi])).max() > 1e-12:
            return False
        if c["stage"]:
            margin = s["margin"] if c["stage"] == 2 else None
            if c["decision"] != study.decide([lo, hi], margin):
                return False
    return True


def test_every_comparison_is_its_rows_numbers():
    """study.json's comparisons are re-derived from its rows: swapping two rows' numbers breaks it."""
    assert consistent(STUDY)
    assert not consistent(swapped(STUDY, "bands", "control"))
    assert study.decisions(STUDY) == {k: STUDY[k] for k in ("margin", "stopped", "comparisons")}


def test_the_doc_and_the_readme_are_the_committed_json_rendered():
    assert report.section(ROOT / "README.md", report.BRIEF) == report.render_brief(STUDY)
    assert report.section(ROOT / "docs" / "study.md") == report.render(STUDY, "../assets/study")
    for swap in (("bands", "control"),):
        s = swapped(STUDY, *swap)
        assert report.render_brief(s) != report.render_brief(STUDY)


def test_the_rule_on_known_numbers():
    # paired: d = [1, 2, 3], mean 2, sd 1, t(0.975, 2) = 4.303: 2 +/- 4.303 / sqrt(3)
    c = study.paired_interval([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])
    assert c["diff"] == pytest.approx(2.0)
    assert c["interval"] == pytest.approx([2 - 4.302653 / 3 ** 0.5, 2 + 4.302653 / 3 ** 0.5])
    # Bonferroni over 5: t(1 - 0.005, 2) = 9.925
    assert study.paired_interval([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], m=5)["interval"][1] == (
        pytest.approx(2 + 9.924843 / 3 ** 0.5))
    assert study.paired_interval([1.0, 2.0], 0.5)["diff"] == pytest.approx(1.0)  # against one value
    assert study.decide([-3, -1]) == "better" and study.decide([1, 3]) == "worse"
    assert study.decide([-1, 1]) == "cannot tell" and study.decide([-1, 1], 2) == "equivalent"
    assert study.decide([-1, 1], 1) == "cannot tell"  # touching the margin is not inside it
    assert study.decide([-0.5, -0.1], 1) == "better, by less than the margin"
    assert study.decide([0.1, 0.5], 1) == "worse, by less than the margin"
    assert study.margin_of(dict(interval=[-3.0, -1.0])) == 0.5
    assert study.margin_of(dict(interval=[-3.0, 0.5])) is None


def synthetic(bands_gain, dmp_gain, free_gain=0.0, seeds=5):
    """A study.json with stage 1 and 2's rows, whose held-out losses are the control's minus a gain."""
    rng = np.random.default_rng(0)
    control = 0.2 + 1e-3 * rng.normal(size=seeds)
    gains = dict(control=0.0, bands=bands_gain, dmp=dmp_gain, **{"dmp-free": free_gain,
                 "dmp-t-blind": 0.0, "dmp-authors": 0.0})
    rows = {}
    for key, g in gains.items():
        noise = 1e-5 * rng.normal(size=seeds)
        rows[key] = dict(label=key, runs={str(s): dict(heldout_loss=float(control[s] - g + noise[s]),
                                                       bpd=1.0) for s in range(seeds)},
                         quality={str(s): {m: 1.0 for m in report.QUALITY} for s in range(seeds)})
    s = dict(rows=rows, settings=dict(seeds=list(range(seeds))),
             base=dict(heldout_loss=0.2, bpd=1.0, quality={m: 1.0 for m in report.QUALITY}))
    s.update(study.decisions(s))
    return s


def test_every_branch_of_the_verdict():
    stopped = synthetic(0.0, 1e-3)
    assert stopped["stopped"] and stopped["margin"] is None
    assert [c["stage"] for c in stopped["comparisons"] if c["stage"]] == [1]  # stage 2 not decided
    assert report.headline(stopped).startswith("**Verdict: this setup cannot tell")
    passed = synthetic(1e-3, 1e-3)
    assert not passed["stopped"] and passed["margin"] == pytest.approx(5e-4, rel=0.05)
    assert "dmp is better than control" in report.headline(passed)
    equal = synthetic(1e-3, 0.0)
    c = report.comparison(equal, "dmp", "control", stage=2)
    assert c["decision"] == "equivalent" and "equivalent to (within the margin)" in report.headline(equal)
    worse = synthetic(1e-3, -1e-3)
    assert report.comparison(worse, "dmp", "control", stage=2)["decision"] == "worse"
    mixing = synthetic(1e-3, 0.0, free_gain=1e-3)
    assert report.comparison(mixing, "dmp-free", "dmp-t-blind", stage=2)["decision"] == "better"
    # study.py's run goes on to stage 2 exactly when the rule's stage 1 passes
    for s in (stopped, passed, worse):
        assert study.passes_stage1(s["rows"], s["settings"]["seeds"]) == (not s["stopped"])
    # the words follow the decisions: flipping the data flips the verdict
    assert report.headline(synthetic(1e-3, 1e-3)) != report.headline(synthetic(1e-3, -1e-3))


def test_the_base_and_its_gap_are_the_datas():
    """The base's gap (test loss over training loss, the same draws) and curve, as rendered."""
    gap = 100 * (STUDY["base"]["heldout_loss"] / STUDY["base"]["train_loss"] - 1)
    assert report.gap(STUDY) == pytest.approx(gap, abs=1e-12)
    assert f"a gap of {gap:.1f}%" in report.render(STUDY)
    s = copy.deepcopy(STUDY)
    s["base"]["train_loss"] *= 0.9
    assert f"a gap of {gap:.1f}%" not in report.render(s)


def test_the_base_is_described_by_the_rule():
    """Converged and capacity-limited are said when the data say so, and only then."""
    def study(curve, heldout, train):
        s = copy.deepcopy(STUDY)
        s["pretraining"], s["base"]["heldout_loss"], s["base"]["train_loss"] = curve, heldout, train
        return s
    flat = [(1000, 0.5), (3000, 0.200), (4000, 0.1990)]  # -0.5% over the last quarter
    falling = [(1000, 0.5), (3000, 0.200), (4000, 0.1970)]  # -1.5%
    rising = [(1000, 0.5), (3000, 0.200), (4000, 0.2030)]  # +1.5%: past its best
    assert report.converged(study(flat, 1, 1))
    assert not report.converged(study(falling, 1, 1)) and not report.converged(study(rising, 1, 1))
    assert report.capacity_limited(study(flat, 1.029, 1)) and not report.capacity_limited(
        study(flat, 1.031, 1))
    good, bad = study(flat, 1.02, 1), study(falling, 1.05, 1)
    assert "it is converged" in report.render(good) and "it is not converged" in report.render(bad)
    assert "(converged;" in report.render_brief(good)
    assert "(not converged;" in report.render_brief(bad)
    said = " ".join(report.limits(bad))
    assert "The base is not converged: its held-out loss moved -1.5%" in said
    assert "test loss 5.0% above" in said
    assert "not converged" not in " ".join(report.limits(good))
    assert "better than held-out" not in " ".join(report.limits(good))


def test_fig5_is_drawn_on_one_scale_of_deviation_from_uniform(tmp_path):
    model = tiny_dit()
    dmp.patch(model, "dmp", init="random")
    w = dmp.gate_weights(model, timesteps=range(0, 1000, 100))  # 3 blocks, 10 timesteps, 16 prompts
    path = draw_gate_heatmap(w, tmp_path / "fig5.png", cell=2, gap=4)
    image = np.asarray(Image.open(path))
    assert image.shape == (10 * 2, 3 * 16 * 2 + 2 * 4, 3)
    assert (image[:, 32:36] == 255).all()  # the gap between panels 1 and 2
    # t = T-1 at the top: the first panel's top row is the last timestep's weights, brightest where
    # its largest weight is.
    top = image[0, :32:2].astype(int).sum(-1)
    assert top.argmax() == w[0, -1].argmax()
    # One scale, whatever a panel's range: uniform (1/4) is the middle colour, 1 (one prompt takes
    # all) yellow, 1/16 = 1/N^2 and below dark blue, and a weight of 1/2 (log2(4 g) = 1, half the
    # scale) the same colour in a panel that spans [0, 1] and in one that spans [1/6, 1/2].
    panels = np.array([[[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]],
                       [[0.25, 0.25, 0.25, 0.25], [0.5, 1 / 6, 1 / 6, 1 / 6]]])
    image = np.asarray(Image.open(draw_gate_heatmap(panels, tmp_path / "s.png", cell=1, gap=1)))
    assert tuple(image[1, 0]) == (253, 231, 37) and tuple(image[1, 3]) == (68, 1, 84)
    assert (image[1, 5:9] == (33, 145, 140)).all()
    assert tuple(image[0, 0]) == tuple(image[0, 5]) == tuple(report.colour(np.array(0.75)))
    # a gate within 4% of uniform looks uniform: 0.5 + 0.5 log2(1.04) / log2(16) = 0.507 of the map
    near = np.zeros((1, 1, 16))
    near[0, 0, 0] = 1.04 / 16  # 1.04 x uniform, the rest renormalised: 0.997 x uniform
    near[0, 0, 1:] = (1 - 1.04 / 16) / 15
    image = np.asarray(Image.open(draw_gate_heatmap(near, tmp_path / "n.png", cell=1)))
    assert np.abs(image.astype(int) - (33, 145, 140)).max() <= 4


def test_the_pretraining_plateau():
    curve = dict(pretraining=[(1000, 1.0), (2000, 0.5), (3000, 0.4), (3500, 0.38), (4000, 0.41)])
    assert report.plateau(curve) == (
        "over the last quarter of the run (steps 3,000 to 4,000) the held-out loss went from "
        "0.40000 to 0.41000 (+2.50%), its lowest 0.38000 at step 3,500; the base is the 4,000-step "
        "model")
