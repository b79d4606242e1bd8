"""
study_report.py on the committed study.json, without training: the README's results and the verdict
are the data's (swapping two rows' numbers, or a verdict's wording, fails here), every branch of
the verdict's rule, and Fig. 5 on one shared scale (the end-to-end report: tests/test_study.py).
"""
import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dmp
import study_report as report
from study_report import draw_gate_heatmap
from test_dmp import tiny_dit

ROOT = Path(__file__).resolve().parents[1]
STUDY = json.loads((ROOT / "assets" / "study" / "study.json").read_text())
LAST = str(STUDY["settings"]["iterations"])
SEEDS = [str(s) for s in STUDY["settings"]["seeds"]]
CONTROL = "prompt-lr/N"


def values(study, key, metric):
    """A row's values of a metric, read here from study.json's own layout (one per seed)."""
    if key in ("base", "floor"):
        e = study[key]
        return [e["quality"][metric] if metric in report.QUALITY else e[metric]]
    if key in study["ablations"]:
        a = study["ablations"][key]
        return [a["quality"][metric] if metric in report.QUALITY else a[metric]]
    row = study["rows"][key]
    return [row["quality"][s][metric] if metric in report.QUALITY else row["runs"][s][LAST][metric]
            for s in SEEDS]


def mismatches(study):
    """
    Every comparison of study.json whose numbers are not its two rows' numbers: the difference of
    the means, the seed spread (the sum of the sample standard deviations; none where a row has one
    seed), and a verdict of the rule that its numbers contradict.
    """
    bad = []
    for c in study["comparisons"]:
        for m, v in report.metric_items(c):
            a, b = values(study, c["a"], m), values(study, c["b"], m)
            diff = np.mean(a) - np.mean(b)
            spread = sum(np.std(x, ddof=1) if len(x) > 1 else 0.0 for x in (a, b))
            one_seed = c["a"] in study["ablations"]
            ok = abs(v["diff"] - diff) <= 1e-12 * max(1.0, abs(diff))
            if one_seed:
                ok &= v["seed_spread"] is None and not v["counts"]
            else:
                ok &= abs(v["seed_spread"] - spread) <= 1e-12 * max(1.0, spread)
                beats_spread = abs(diff) > spread
                if "interval" in v:  # centred on the difference; counts iff both tests pass
                    lo, hi = v["interval"]
                    ok &= abs((lo + hi) / 2 - diff) <= 1e-9 * max(1.0, abs(diff))
                    ok &= v["counts"] == (beats_spread and not lo <= 0 <= hi)
                else:
                    ok &= v["counts"] == beats_spread
            if not ok:
                bad.append((c["a"], c["b"], m))
    return bad


def swapped(study, a, b):
    """A copy of study.json with rows a and b's numbers (runs, sample quality) exchanged."""
    s = copy.deepcopy(study)
    for field in ("runs", "quality"):
        s["rows"][a][field], s["rows"][b][field] = s["rows"][b][field], s["rows"][a][field]
    return s


def brief_table(markdown):
    """The README's table: {row label: [held-out loss, bits/dim, FD vs held-out] cells}."""
    rows = re.findall(r"^\| (.+?) \| (.+?) \| (.+?) \| (.+?) \|$", markdown, flags=re.M)
    return {r[0]: list(r[1:]) for r in rows[2:]}


def cell(v, digits):
    """mean ± std (ddof 1), as the tables show them, computed here."""
    return f"{np.mean(v):.{digits}f} ± {np.std(v, ddof=1):.{digits}f}"


def test_the_readmes_results_are_the_committed_json_rendered():
    readme = report.section(ROOT / "README.md", report.BRIEF)
    assert readme == report.render_brief(STUDY)
    assert report.render_brief(swapped(STUDY, "dmp", CONTROL)) != readme  # a swap shows


def test_the_readmes_table_is_each_rows_numbers_by_name():
    for study in (STUDY, swapped(STUDY, "dmp", CONTROL)):
        table = brief_table(report.render_brief(study))
        base = study["base"]
        assert table["base (no further training)"] == [
            f"{base['heldout_loss']:.5f}", f"{base['bpd']:.4f}", f"{base['quality']['fd_heldout']:.3f}"]
        shown = [k for k in report.BRIEF_ROWS if k in study["rows"]]
        assert len(shown) == 6 and len(table) == 7
        for k in shown:
            assert table[study["rows"][k]["label"]] == [
                cell(values(study, k, "heldout_loss"), 5), cell(values(study, k, "bpd"), 4),
                cell(values(study, k, "fd_heldout"), 3)], k
    # the swap moves the numbers, not the names: the control's numbers now sit in DMP's row
    table = brief_table(report.render_brief(swapped(STUDY, "dmp", CONTROL)))
    assert table["**DMP**"][0] == cell(values(STUDY, CONTROL, "heldout_loss"), 5) != cell(
        values(STUDY, "dmp", "heldout_loss"), 5)


def test_every_comparison_is_its_rows_numbers():
    """study.json's comparisons are the differences of its rows: swapping two rows' numbers breaks it."""
    assert mismatches(STUDY) == []
    assert len(mismatches(swapped(STUDY, "dmp", "prompt"))) >= 6
    assert len(mismatches(swapped(STUDY, "dmp", CONTROL))) >= 2  # nearly equal rows, still caught


def test_the_verdict_claims_are_checked_against_the_comparisons():
    """Each "better/worse on M" the README says is a comparison that counts, with that sign."""
    brief = report.render_brief(STUDY)
    claims = re.findall(r"^- (.+?) against (.+?), by the rule: better on (.+?); worse on (.+?)\.$",
                        brief, flags=re.M)
    assert len(claims) == 2
    names = {v: k for k, v in report.METRIC_NAMES.items()}
    for row, ref, better, worse in claims:
        a = next(k for k in STUDY["rows"] if report.label(STUDY, k, False) == row)
        b = "prompt" if ref.startswith("plain prompt tuning") else "base"
        c = report.comparison(STUDY, a, b)
        for words, sign in ((better, -1), (worse, 1)):
            listed = set() if words == "no metric" else {names[x] for x in words.split(", ")}
            assert listed == {m for m, v in report.metric_items(c) if v["counts"]
                              and np.sign(v["diff"]) == sign}, (row, ref)
    # the authors' gate: its one counted difference is reported with its margin and a paired t-test
    # (2 degrees of freedom: p = 1 - |t| / sqrt(2 + t^2), worked here from the per-seed values)
    d = np.subtract(values(STUDY, "dmp-authors", "heldout_loss"), values(STUDY, CONTROL, "heldout_loss"))
    t = d.mean() / (d.std(ddof=1) / np.sqrt(3))
    p = 1 - abs(t) / np.sqrt(2 + t * t)
    c = report.comparison(STUDY, "dmp-authors", CONTROL)["heldout_loss"]
    assert (f"held-out loss counts as better (difference {c['diff']:+.2e} against a seed spread of "
            f"{c['seed_spread']:.2e}, {abs(c['diff']) / c['seed_spread']:.2f} times it; a paired "
            f"t-test over the seeds, not part of the rule, gives p = {p:.2f})") in brief
    # its gate per seed, not only a mean: the largest weight one prompt gets, seed by seed
    tops = [(g["gate_dev_max"] + 1) / 16 for g in (STUDY["rows"]["dmp-authors"]["gate"][s] for s in SEEDS)]
    assert f"the largest weight one prompt gets is {', '.join(f'{x:.3f}' for x in tops)}" in brief
    gates = [STUDY["rows"]["dmp-authors"]["gate"][s]["gate_dev_max"] for s in SEEDS]
    assert "| DMP, the authors' gate (10x lr, noisy) | " + " / ".join(f"{x:.4f}" for x in gates) in (
        report.render(STUDY))  # docs/study.md's gate table: per seed, not a mean
    flipped = copy.deepcopy(STUDY)
    report.comparison(flipped, "dmp-authors", CONTROL)["heldout_loss"]["diff"] *= -1
    assert "held-out loss counts as worse" in report.render_brief(flipped)


def with_positive_control(beats_control, dmp_beats):
    """The committed study with a positive control row, which beats the control or not, and DMP."""
    s = copy.deepcopy(STUDY)
    s["rows"]["bands"] = dict(copy.deepcopy(s["rows"]["prompt"]), label="prompts per band of t")
    s["positive_controls"] = ["bands"]
    c = copy.deepcopy(report.comparison(s, "dmp", CONTROL))
    for v in report.metric_items(c):
        v[1]["counts"] = False
    c["a"] = "bands"
    if beats_control:
        c["heldout_loss"].update(diff=-1.0, counts=True)
    s["comparisons"].append(c)
    report.comparison(s, "dmp-authors", CONTROL)["heldout_loss"]["counts"] = False
    if dmp_beats:
        report.comparison(s, "dmp", CONTROL)["bpd"].update(diff=-1.0, counts=True)
    return s


def test_every_branch_of_the_verdicts_rule():
    one = copy.deepcopy(STUDY)
    one["settings"]["seeds"] = [0]
    assert report.headline(one).startswith("**No verdict from one seed**")
    none = copy.deepcopy(STUDY)
    del none["rows"][CONTROL]
    assert report.headline(none).startswith("**No verdict: the study has no control**")
    # the committed data: no positive control, so the setup cannot tell (and never "adds nothing")
    committed = report.headline(STUDY)
    assert committed.startswith("**Verdict: this setup cannot tell whether mixing the prompts by "
                                "timestep adds anything over prompt tuning at lr/16.**")
    assert "no positive control" in committed
    assert "adds nothing" not in report.verdict(STUDY) + report.render_brief(STUDY)
    # the authors' gate counts on held-out loss, yet no verdict credits it: no positive control
    assert report.beats(STUDY, "dmp-authors", CONTROL) and "beats" not in committed
    failed = report.headline(with_positive_control(False, True))
    assert failed.startswith("**Verdict: this setup cannot tell") and "did not beat" in failed
    credited = report.headline(with_positive_control(True, True))
    assert credited == ("**Verdict: by the rule, DMP beats prompt tuning at lr/16 on bits/dim, as "
                        "the positive control (prompts per band of t) does.**")
    missed = with_positive_control(True, False)
    assert report.headline(missed) == (
        "**Verdict: no DMP row beats prompt tuning at lr/16 by the rule, where the positive control "
        "(prompts per band of t) does.** The rule fixes no equivalence margin, so this is not "
        "evidence that the mixing adds nothing.")
    missed["margin"] = {"heldout_loss": 1e-4}
    assert report.headline(missed).endswith("does.**")
    # mixed: better on one metric, worse on another, beats nothing
    mixed = with_positive_control(True, True)
    report.comparison(mixed, "dmp", CONTROL)["fd_train"].update(diff=1.0, counts=True)
    assert not report.beats(mixed, "dmp", CONTROL)
    assert report.headline(mixed).startswith("**Verdict: no DMP row beats")


def test_the_rules_chance_rate_and_the_pretraining_plateau():
    # Against a fixed value, |mean| > sd of 3 normal values is |t| > sqrt(3) with 2 degrees of
    # freedom: 1 - sqrt(3/5); the simulation's standard error at 200,000 draws is 0.001.
    assert report.chance_rate(3, spread_b=False) == pytest.approx(1 - np.sqrt(3 / 5), abs=0.005)
    assert 0.06 < report.chance_rate(3) < 0.10  # two rows with spread: less often
    curve = dict(pretraining=[(1000, 1.0), (2000, 0.5), (3000, 0.4), (3500, 0.38), (4000, 0.41)])
    assert report.plateau(curve) == (
        "over the last quarter of the run (steps 3,000 to 4,000) the held-out loss went from "
        "0.40000 to 0.41000 (+2.50%), its lowest 0.38000 at step 3,500; the base is the 4,000-step "
        "model")


def test_fig5_is_drawn_on_one_scale_of_deviation_from_uniform(tmp_path):
    model = tiny_dit()
    dmp.patch(model, "dmp", prompt_init="random")
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
