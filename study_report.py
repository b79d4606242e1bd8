"""
The report of study.py: study.json to the markdown of docs/study.md (between its two study markers)
and of study.md beside the figures, the figures themselves, the README's results in brief, and the
commands for every full-scale row of the paper. Everything here is a function of study.json alone,
so `python study.py --render` rewrites it byte for byte; the verdict's words are chosen by the
rule's decisions, which study.py computes from the rows' per-seed values.
"""
import os
import posixpath
from pathlib import Path

import numpy as np

BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
BRIEF = "<!-- study-brief:begin -->", "<!-- study-brief:end -->"  # the README's results in brief
QUALITY = ("fd_train", "kid_train", "fd_heldout", "kid_heldout")
METRIC_NAMES = dict(heldout_loss="held-out loss", bpd="bits/dim", fd_train="FD vs train",
                    kid_train="KID vs train", fd_heldout="FD vs held-out",
                    kid_heldout="KID vs held-out")
DIGITS = dict(heldout_loss=5, bpd=4, fd_train=3, kid_train=4, fd_heldout=3, kid_heldout=4)
GATE = ("gate_dev_max", "gate_dev_mean", "gate_entropy_min", "gate_entropy_mean", "gate_tv_t")
CONTROL, POSITIVE = "control", "bands"  # stage 1's rows (study.STAGE1)
T_BLIND, FREE = "dmp-t-blind", "dmp-free"
# How the base is described, fixed before this base was chosen: converged when its held-out loss
# moved by less than CONVERGED (relative) over the last quarter of pretraining; limited by its
# capacity rather than its data when its test loss is at most SMALL_GAP above its loss on the
# training digits with the same draws (two sets of 149 digits differ by a few percent by chance).
CONVERGED, SMALL_GAP = 0.01, 0.03
# How the verdict says each of the rule's decisions (study.decide) of a row against another.
SAYS = {"better": "better than", "worse": "worse than",
        "equivalent": "equivalent to (within the margin)",
        "cannot tell": "neither distinguishable from nor shown equivalent to",
        "better, by less than the margin": "better than, by less than the margin,",
        "worse, by less than the margin": "worse than, by less than the margin,"}


def draw_curve(points, path, width=480, height=240, pad=36):
    """
    The held-out loss against the step as a PNG (PIL only): all of it on the left, and on the right
    the steps from a quarter of the run on, scaled to their own range so that the plateau can be
    seen; each panel's range is written on its axes.
    """
    from PIL import Image, ImageDraw
    points = np.array(points, dtype=np.float64)
    image = Image.new("RGB", (2 * width, height), "white")
    draw = ImageDraw.Draw(image)
    late = points[points[:, 0] >= points[-1, 0] / 4]
    for left, (steps, losses) in ((0, points.T), (width, late.T)):
        lo, hi = losses.min(), losses.max()
        x0, x1, y0, y1 = left + pad, left + width - pad, height - pad, pad
        xy = [(x0 + (x1 - x0) * (s - steps.min()) / (steps.max() - steps.min()),
               y0 + (y1 - y0) * (v - lo) / max(hi - lo, 1e-12)) for s, v in zip(steps, losses)]
        draw.line([(x0, y1), (x0, y0), (x1, y0)], fill="black")
        draw.line(xy, fill=(200, 40, 40), width=2)
        draw.text((x0 + 4, y1 - 14), f"held-out loss {hi:.4f}", fill="black")
        draw.text((x0 + 4, y0 - 14), f"{lo:.4f}", fill="black")
        draw.text((x1 - 60, y0 + 6), f"step {int(steps.max())}", fill="black")
        draw.text((x0, y0 + 6), f"step {int(steps.min())}", fill="black")
    image.save(path)


def draw_gate_heatmap(weights, path, cell=2, gap=4, columns=None):
    """
    Fig. 5 as a PNG, from dmp.gate_weights' [blocks, timesteps, prompts]: one panel per block (rows:
    timesteps from T-1 at the top to 0, columns: prompts), white gaps. Every panel, and every
    figure, on one scale of deviation from the uniform mixture: log2(N g), clipped to
    [-log2 N, log2 N], from dark blue (a weight of 1/N^2 or less) through teal (uniform, 1/N) to
    yellow (1: one prompt takes the whole mixture); so a gate near uniform looks uniform. Size:
    columns*(N*cell)+(columns-1)*gap wide, rows*(T*cell)+(rows-1)*gap high, `columns` panels per
    row (default: all blocks in one row).
    """
    from PIL import Image
    weights = np.asarray(weights, np.float64)
    L, T, N = weights.shape
    columns = columns or L
    rows = -(-L // columns)
    height, width = T * cell + gap, N * cell + gap  # a panel and the gap after it
    canvas = np.full((rows * height - gap, columns * width - gap, 3), 255, np.uint8)
    ratio = np.log2(np.clip(N * weights, 1e-300, None)) / np.log2(N)  # -1 .. 1 on the scale
    for i, w in enumerate(ratio):
        v = 0.5 + 0.5 * w[::-1]  # t = T-1 at the top: generation runs downwards
        r, col = divmod(i, columns)
        panel = colour(v).repeat(cell, 0).repeat(cell, 1)
        canvas[r * height: r * height + T * cell, col * width: col * width + N * cell] = panel
    Image.fromarray(canvas, mode="RGB").save(path)
    return path


def colour(v):
    """Values in [0, 1] to RGB uint8 along viridis' dark blue, teal and yellow, linearly between."""
    anchors = np.array([[68, 1, 84], [33, 145, 140], [253, 231, 37]], np.float64)
    x = np.clip(v, 0, 1)[..., None] * 2
    low = np.where(x < 1, anchors[0], anchors[1])
    high = np.where(x < 1, anchors[1], anchors[2])
    return np.round(low + (high - low) * (x - (x >= 1))).astype(np.uint8)


def draw_figures(study, out):
    """
    pretraining_curve.png and Fig. 5 of each DMP row drawn (fig5_gate.png: the default's); a Fig. 5
    of an earlier study that this one has no row for is removed, so no figure outlives its data.
    """
    draw_curve(study["pretraining"], out / "pretraining_curve.png")
    drawn = {figure_name(key) for key in study.get("fig5", {})}
    for old in out.glob("fig5_gate*.png"):
        if old.name not in drawn:
            old.unlink()
    for key, weights in study.get("fig5", {}).items():
        draw_gate_heatmap(np.array(weights), out / figure_name(key), cell=4, gap=8)


def figure_name(key):
    return "fig5_gate.png" if key == "dmp" else f"fig5_gate_{key}.png"


def mean_std(values):
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(values, digits=4):
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def label(study, key, bold=True):
    name = study["rows"][key]["label"] if key in study["rows"] else dict(
        base="base", floor="held-out digits").get(key, key)
    return name if bold else name.replace("**", "")


def per_seed(study, key, metric):
    """A row's values of a metric, one per seed in settings' order."""
    row, seeds = study["rows"][key], study["settings"]["seeds"]
    if metric in QUALITY:
        return [row["quality"][str(s)][metric] for s in seeds]
    return [row["runs"][str(s)][metric] for s in seeds]


def comparison(study, a, b, metric="heldout_loss", stage=None):
    """study.json's comparison of row a with row b on a metric ({} if the rule made none)."""
    return next((c for c in study["comparisons"] if (c["a"], c["b"], c["metric"]) == (a, b, metric)
                 and (stage is None or c["stage"] == stage)), {})


def interval(c, digits):
    lo, hi = c["interval"]
    return f"{c['diff']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def plateau(study):
    """What the pretraining curve says of its end: the last quarter's change, the best step."""
    curve = np.array(study["pretraining"], np.float64)
    (start, first), (last, loss) = last_quarter(study)
    best = curve[curve[:, 1].argmin()]
    return (f"over the last quarter of the run (steps {int(start):,} to {int(last):,}) the "
            f"held-out loss went from {first:.5f} to {loss:.5f} "
            f"({100 * last_quarter_change(study):+.2f}%), its lowest {best[1]:.5f} at step "
            f"{int(best[0]):,}; the base is the {int(last):,}-step model")


def gap(study):
    """The base's test-split loss over its loss on as many training digits, same draws, in %."""
    return 100 * (study["base"]["heldout_loss"] / study["base"]["train_loss"] - 1)


def last_quarter(study):
    """The pretraining curve's (step, held-out loss) where its last quarter starts, and its last."""
    curve = np.array(study["pretraining"], np.float64)
    return curve[curve[:, 0] >= 0.75 * curve[-1, 0]][0], curve[-1]


def last_quarter_change(study):
    """The held-out loss's relative change over the last quarter of pretraining."""
    start, last = last_quarter(study)
    return last[1] / start[1] - 1


def converged(study):
    """By the rule (CONVERGED): the held-out loss moved by less than 1% over the last quarter."""
    return abs(last_quarter_change(study)) < CONVERGED


def capacity_limited(study):
    """By the rule (SMALL_GAP): the test loss at most 3% above the training digits' loss."""
    return gap(study) <= 100 * SMALL_GAP


def stage1_text(study):
    """Stage 1's finding in one paragraph, with its numbers."""
    c, st = comparison(study, POSITIVE, CONTROL, stage=1), study["settings"]
    passed = c["decision"] == "better"
    text = (f"**Stage 1, the positive control.** {label(study, POSITIVE, False)} against "
            f"{label(study, CONTROL, False)}, held-out loss on the test split, seeds "
            f"{', '.join(map(str, st['seeds']))} paired: difference "
            f"{interval(c, 6)} ({100 * c['level']:.0f}% interval): **{c['decision']}**. ")
    if passed:
        return text + (f"The setup can detect capacity specific to the timestep; the "
                       f"equivalence margin is half the smallest improvement this interval allows, "
                       f"{study['margin']:.2e}.")
    return text + ("The setup cannot detect even what prompts kept separate per band of "
                   "timesteps gain, so by the rule the study stops here: it cannot tell whether "
                   "DMP's mixing by timestep helps.")


def headline(study):
    """The verdict's sentence, chosen by the rule's decisions alone (see RULE in study.py)."""
    question = "whether mixing prompts by timestep adds anything over one shared prompt set"
    if study["stopped"]:
        return (f"**Verdict: this setup cannot tell {question}.** Its positive control did not "
                f"beat the control by the rule.")
    parts = []
    for a, b in (("dmp", CONTROL), (FREE, T_BLIND)):
        c = comparison(study, a, b, stage=2)
        if c:
            parts.append(f"{label(study, a, False)} is {SAYS[c['decision']]} "
                         f"{label(study, b, False)}")
    found = "; ".join(parts) if parts else "no stage 2 row was run"
    return ("**Verdict: the setup can detect an effect specific to the timestep (its positive "
            "control beats the control); by the rule, " + found + ".**")


def limits(study):
    """What the study cannot conclude, each read from study.json."""
    st, out = study["settings"], []
    out.append(f"It is a miniature: {st['train_images']:,} training digits of 8×8 pixels, a "
               f"{study['base']['parameters'] / 1e3:.0f}K-parameter DiT, {st['iterations']:,} "
               f"iterations of further training; the paper's models have 130M to 675M parameters "
               f"and 256 tokens. A finding here says what these mechanisms do at this scale.")
    out.append("The primary metric is the held-out loss, the objective itself; sample quality is "
               "measured by a digits classifier's features, not Inception (no FID), and is "
               "secondary, as are bits/dim: their intervals are uncorrected and decide nothing.")
    change = 100 * last_quarter_change(study)
    if not converged(study):
        out.append(f"The base is not converged: its held-out loss moved {change:+.1f}% over the "
                   f"last quarter of its pretraining, so part of what a further-training row gains "
                   f"may be what more pretraining would have gained; the rows are read against "
                   f"each other, not against the base.")
    if not capacity_limited(study):
        out.append(f"The base fits its training digits better than held-out ones (test loss "
                   f"{gap(study):.1f}% above the training digits', more than the "
                   f"{100 * SMALL_GAP:.0f}% the rule calls small), so part of what further "
                   f"training on the same digits can do is fit them harder: a method that only "
                   f"memorises would look worse here, not better.")
    out.append(f"Learning rates are chosen from one validation run per candidate (seed "
               f"{st['validation_seed']}, {st['validation_images']} held-out digits); a rate "
               f"that wins there by chance is then tested on the other {st['test_images']} with "
               f"seeds it never saw.")
    if study["stopped"]:
        out.append("Stage 1 did not pass, so no DMP row was run: nothing here speaks for or "
                   "against DMP.")
    else:
        out.append(f"Equivalence means no difference larger than {study['margin']:.2e} in held-out "
                   f"loss (half of what the positive control certainly gains): a smaller effect "
                   f"would go unseen.")
    return out


def render(study, figures=""):
    """
    The markdown of the study: a function of study.json alone. `figures` is the folder of the
    figures relative to the file the markdown goes into ("" beside them, "../assets/study" in docs/).
    """
    st, rows = study["settings"], study["rows"]
    L = []
    w = L.append
    w("# The study: does mixing by timestep help?")
    w("")
    w(f"The paper's question in miniature, on the bundled digits ({st['train_images']:,} training "
      f"8×8 images; {st['heldout_images']} held out, cut into {st['validation_images']} for "
      f"validation and {st['test_images']} for test) and a small DiT pretrained on them "
      f"(`assets/study/base.pt`, {study['base']['parameters'] / 1e3:.0f}K parameters, "
      f"{st['blocks']} blocks, {st['n_prompts']} tokens). Produced by `{study['command']}` on "
      f"{study['date']} (torch {study['torch']}, CPU); `python study.py --render` rewrites this "
      f"section and its figures from `assets/study/study.json`, byte for byte. Every row "
      f"further-trains the same base on its own pretraining data for {st['iterations']:,} "
      f"iterations (batch {st['batch_size']}, AdamW, no EMA) at the learning rate, of "
      f"{st['lr']:g} × {', '.join(f'{s:g}' for s in st['lr_scales'])}, that its validation run "
      f"chose, with {len(st['seeds'])} paired seeds. " + augmentation(st))
    w("")
    w("**When a difference counts** (fixed in `study.py` before the runs): " + study["rule"])
    w("")
    w(stage1_text(study))
    w("")
    w(headline(study))
    w("")
    if study.get("wall_minutes") is not None:
        reused = study["reused_evaluations"]
        w(f"The whole study took {study['wall_minutes']:.0f} minutes on {study['cpus']} CPU cores "
          f"({study['jobs']} runs at a time, one thread each)" + (
              f", reusing {reused} evaluations of an interrupted earlier invocation"
              if reused else "") + ".")
        w("")
    render_base(study, w, figures)
    render_rates(study, w)
    render_rows(study, w)
    render_rule(study, w)
    if any(rows[k]["gate"] for k in rows):
        render_gates(study, w)
    render_bands(study, w)
    if study["ablations"]:
        render_ablations(study, w)
    if study["scratch"]:
        render_scratch(study, w)
    if "table5" in study:
        render_table5(study, w)
    for key in study.get("fig5", {}):
        render_fig5(study, key, w, figures)
    w("**What this study cannot conclude:**")
    w("")
    for x in limits(study):
        w(f"- {x}")
    w("")
    w(commands(study))
    w("")
    w(SETTLE)
    w("")
    w(FULL_SCALE)
    return "\n".join(L) + "\n"


def augmentation(st):
    """The sentence on --augment, from the ranges study.json records."""
    a = st["augment"]
    return (f"Every image a run trains on, the base's pretraining included, gets a fresh random "
            f"transformation (`train.py --augment`: turned by up to {a['rotate']:g}°, shrunk to "
            f"{100 * a['scale'][0]:g}–{100 * a['scale'][1]:g}% of its size, moved by up to "
            f"{a['shift']:g} pixel each way), and every digit a model is measured on gets a fixed "
            f"one, the same for every model, so that {st['train_images']:,} digits do not limit "
            f"the base before its size does.")


def render_base(study, w, figures):
    st, base = study["settings"], study["base"]
    w(f"**The base** (`{base['command']}`; log `assets/study/base.log.jsonl`): the held-out loss "
      f"of the EMA model against the step (right: from a quarter of the run on, on its own "
      f"scale); {plateau(study)}. Its loss on the {st['test_images']} test digits is "
      f"{base['heldout_loss']:.5f} and on {base['train_digits']:,} training digits, in groups of "
      f"{st['test_images']} given the test digits' draws, {base['train_loss']:.5f}: a gap of "
      f"{gap(study):.1f}% (standard error {100 * base['gap_se']:.1f}%, over the paired draws), "
      + ("within" if capacity_limited(study) else "more than")
      + f" the {100 * SMALL_GAP:.0f}% below which the study calls it limited by its capacity "
      f"rather than its data. By the rule (a change under {100 * CONVERGED:.0f}% over the last "
      f"quarter) it is " + ("converged" if converged(study) else "not converged")
      + "; every row starts from it and is measured with the same draws, and the study reads "
      "the rows against each other.")
    w("")
    w(f"![pretraining curve]({posixpath.join(figures, 'pretraining_curve.png')})")
    w("")


def render_rates(study, w):
    st, rows = study["settings"], study["rows"]
    w(f"**Learning rates**, chosen on the validation split (held-out loss of one run, seed "
      f"{st['validation_seed']}, per candidate; the chosen one in bold):")
    w("")
    scales = [repr(float(s)) for s in st["lr_scales"]]
    w("| row | " + " | ".join(f"lr × {float(s):g}" for s in scales) + " |")
    w("| --- | " + " | ".join("---" for _ in scales) + " |")
    for r in rows.values():
        cells = [f"{r['validation'][s]:.5f}" for s in scales]
        cells = [f"**{c}**" if float(s) == r["lr_scale"] else c for c, s in zip(cells, scales)]
        w(f"| {r['label']} | " + " | ".join(cells) + " |")
    w("")


def render_rows(study, w):
    st, base, rows = study["settings"], study["base"], study["rows"]
    w(f"**Every row on the test split** after {st['iterations']:,} iterations (mean ± std over "
      f"seeds {', '.join(map(str, st['seeds']))}; the held-out loss also seed by seed; lower is "
      f"better; FD and KID: {st['sample_sets']} sets of {st['heldout_images']} samples, DDPM "
      f"{st['sample_steps']} steps, the same noise for every model, against the training digits "
      f"and all held-out digits)")
    w("")
    w("| row | trained parameters | lr | held-out loss | per seed | bits/dim | FD vs train | "
      "FD vs held-out | KID vs held-out |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    q = base["quality"]
    w(f"| held-out digits (the floor) | | | | | | {study['floor']['quality']['fd_train']:.3f} | "
      f"{study['floor']['quality']['fd_heldout']:.3f} | "
      f"{study['floor']['quality']['kid_heldout']:.4f} |")
    w(f"| base | | | {base['heldout_loss']:.5f} | | {base['bpd']:.4f} | {q['fd_train']:.3f} | "
      f"{q['fd_heldout']:.3f} | {q['kid_heldout']:.4f} |")
    for key, r in rows.items():
        loss = per_seed(study, key, "heldout_loss")
        w(f"| {r['label']} | {r['trained']:,} | {r['lr_scale']:g} | {fmt(loss, 5)} | "
          + " / ".join(f"{v:.5f}" for v in loss) + " | "
          + " | ".join(fmt(per_seed(study, key, m), DIGITS[m])
                       for m in ("bpd", "fd_train", "fd_heldout", "kid_heldout")) + " |")
    w("")


def render_rule(study, w):
    """The comparisons the rule decided, and the secondary ones it only reports."""
    w("**The rule applied**: each primary comparison (held-out loss, row minus reference, paired "
      "over the seeds), its interval at the stage's corrected level, and the decision.")
    w("")
    w("| stage | row | reference | difference [interval] | level | decision |")
    w("| --- | --- | --- | --- | --- | --- |")
    for c in [c for c in study["comparisons"] if c["stage"]]:
        w(f"| {c['stage']} | {label(study, c['a'])} | {label(study, c['b'])} | {interval(c, 6)} | "
          f"{100 * c['level']:.0f}% | **{c['decision']}** |")
    w("")
    w("Secondary (95% intervals, uncorrected, no decision): the primary pairs on the other "
      "metrics, and every row against the base.")
    w("")
    w("| row | reference | metric | difference [interval] |")
    w("| --- | --- | --- | --- |")
    for c in [c for c in study["comparisons"] if not c["stage"]]:
        w(f"| {label(study, c['a'])} | {label(study, c['b'])} | {METRIC_NAMES[c['metric']]} | "
          f"{interval(c, DIGITS[c['metric']] + 1)} |")
    w("")


def render_gates(study, w):
    st, rows = study["settings"], study["rows"]
    n = st["n_prompts"]
    w(f"**How far each DMP gate moved** from the uniform 1/{n} it starts at (the trained gate at "
      f"timesteps 0, 10, ..., 990, every block; one value per seed, seeds "
      f"{' / '.join(str(x) for x in st['seeds'])}, as a mean would hide a gate that collapses in "
      f"some seeds and not in others): the largest and the mean |{n} g − 1|, the entropy "
      f"relative to uniform (1: uniform), and the total variation between a block's mixture at "
      f"one timestep and its mean over timesteps (0: the same mixture at every t).")
    w("")
    w("| | max deviation | mean deviation | min entropy | mean entropy | variation across t |")
    w("| --- | --- | --- | --- | --- | --- |")
    for key in [k for k in rows if rows[k]["gate"]]:
        g = [rows[key]["gate"][str(x)] for x in st["seeds"]]
        w(f"| {rows[key]['label']} | " + " | ".join(" / ".join(f"{x[m]:.4f}" for x in g)
                                                    for m in GATE) + " |")
    w("")


def render_bands(study, w):
    base, rows = study["base"], study["rows"]
    w("**Stage-specific change** (the claim behind Table 3): the noise MSE of each band of 100 "
      "timesteps, as % change from the base's (mean over seeds; the base's MSE in the first row).")
    w("")
    w("| row | " + " | ".join(f"t {100 * b}-{100 * b + 99}" for b in range(10)) + " |")
    w("| --- | " + " | ".join("---" for _ in range(10)) + " |")
    w("| base MSE | " + " | ".join(f"{v:.4f}" for v in base["mse_bands"]) + " |")
    for r in rows.values():
        runs = list(r["runs"].values())
        w(f"| {r['label']} | " + " | ".join(
            f"{np.mean([100 * (x['mse_bands'][b] / base['mse_bands'][b] - 1) for x in runs]):+.2f}"
            for b in range(10)) + " |")
    w("")


def render_ablations(study, w):
    """Table 4 and Fig. 4: one DMP run per row, seed 0, its sample quality, its gate's movement."""
    st, base, rows = study["settings"], study["base"], study["rows"]
    seed = str(st["seeds"][0])
    w(f"**Table 4 and Fig. 4: DMP ablations** (one run each, seed {seed}, DMP's learning rate; no "
      f"verdict: one seed has no spread; Δ from the base; the gate's largest deviation from "
      f"uniform and its variation across timesteps)")
    w("")
    w("| case | flags | held-out loss | bits/dim | Δ bits/dim | FD vs train | FD vs held-out | "
      "KID vs held-out | max deviation | variation across t |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    entries = [(key, f"`{' '.join(a['flags'])}`", a) for key, a in study["ablations"].items()]
    named = [(f"**default** (linear, soft, distinct, add, IB 1 LB 1, all {st['blocks']} blocks)",
              "dmp")] + list(study["table4e"].items())
    for name, key in named:  # runs that are another row's to the last digit
        if key in rows and seed in rows[key]["runs"]:
            r = rows[key]
            run = dict(r["runs"][seed], quality=r["quality"][seed], gate=r["gate"].get(seed))
            entries.insert(0 if name.startswith("**") else len(entries),
                           (name, "" if name.startswith("**") else f"= {label(study, key, False)}",
                            run))
    for name, flags, a in entries:
        q, g = a["quality"], a.get("gate")
        cells = [f"{q[m]:.{DIGITS[m]}f}" for m in ("fd_train", "fd_heldout", "kid_heldout")]
        gate = [f"{g['gate_dev_max']:.3f}", f"{g['gate_tv_t']:.4f}"] if g else ["—", "—"]
        w(f"| {name} | {flags} | {a['heldout_loss']:.5f} | {a['bpd']:.4f} | "
          f"{a['bpd'] - base['bpd']:+.4f} | " + " | ".join(cells + gate) + " |")
    w("")
    w("Table 4e's rows marked = are not run again: Eq. 11's load loss counts gate values below "
      "zero, which a softmax never produces, so under soft selection it is zero and its "
      "coefficient multiplies nothing; a run with another LB is the run with the same IB to the "
      "last digit (dmp.py computes Eq. 11 literally; hard selection uses Shazeer et al.'s smooth "
      "estimator instead).")
    w("")


def render_scratch(study, w):
    """Table 6: pretraining with and without DMP from step 0."""
    w(f"**Table 6: DMP from the start of training** (the base's recipe, but EMA 0.99, seed "
      f"{study['settings']['seeds'][0]}; the EMA model; held-out bits/dim, and held-out loss in "
      f"brackets; FD of the last)")
    w("")
    steps = list(next(iter(study["scratch"].values()))["evals"])
    w("| run | " + " | ".join(f"{int(s):,} iterations" for s in steps)
      + " | FD vs train | FD vs held-out |")
    w("| --- | " + " | ".join("---" for _ in steps) + " | --- | --- |")
    for key, e in study["scratch"].items():
        q = e["quality"]
        w(f"| {key} | " + " | ".join(f"{e['evals'][s]['bpd']:.4f} "
                                     f"({e['evals'][s]['heldout_loss']:.5f})" for s in steps)
          + f" | {q['fd_train']:.3f} | {q['fd_heldout']:.3f} |")
    w("")


def render_table5(study, w):
    st, t5 = study["settings"], study["table5"]
    w(f"**Table 5: structural bias**: off-diagonal statistics between {t5['samples']:,} generated "
      f"samples (DDPM {st['sample_steps']} steps, the same noise for both models), base against "
      f"DMP (seed {st['seeds'][0]}).")
    w("")
    w("| model | metric | max | min | mean | std |")
    w("| --- | --- | --- | --- | --- | --- |")
    for model, name in (("base", "base"), ("dmp", "+ DMP")):
        for metric in ("correlation", "similarity"):
            v = t5[model][metric]
            w(f"| {name} | {metric} | {v['max']:.4f} | {v['min']:.4f} | {v['mean']:.4f} | "
              f"{v['std']:.4f} |")
    w("")


def render_fig5(study, key, w, figures):
    st = study["settings"]
    n, g = st["n_prompts"], study["rows"][key]["gate"][str(st["seeds"][0])]
    w(f"**Fig. 5: the trained gate** ({label(study, key)}, seed {st['seeds'][0]}): one panel per "
      f"block, rows timesteps from 990 (top) to 0 in steps of 10, columns the {n} prompts; every "
      f"panel of every Fig. 5 on one scale, log2({n} g) from −log2 {n} (dark blue: a weight of "
      f"1/{n ** 2} or less) through 0 (teal: the uniform 1/{n}) to +log2 {n} (yellow: one "
      f"prompt takes the whole mixture).")
    w("")
    w(f"![gate weights]({posixpath.join(figures, figure_name(key))})")
    w("")
    w(f"The mixture's entropy relative to the uniform mixture's is {g['entropy_high_t']:.4f} at "
      f"t ≥ 500 and {g['entropy_low_t']:.4f} at t < 500 (1 is uniform); the weights are at most "
      f"{g['gate_dev_max']:.3f} of 1/{n} away from it, and a block's mixture differs from its "
      f"mean over timesteps by {g['gate_tv_t']:.4f} in total variation.")
    w("")


def commands(study):
    """Every run and evaluation of the study as the command that made it."""
    st, rows = study["settings"], study["rows"]
    seeds = ", ".join(str(x) for x in st["seeds"][1:])
    L = ["**The commands** (each run with its own `--results-dir`; `python study.py` runs them all "
         "and skips what is finished):", "", "```bash",
         f"{st['classifier']['command']}   # the feature net, once",
         f"{study['base']['command']}   # the base",
         f"# each row: one validation run per lr scale (--seed {st['validation_seed']}, "
         f"--lr-scale S), then the test runs at the chosen scale, again with --seed {seeds}"]
    L += [r["command"] for r in rows.values()]
    if study["ablations"] and "dmp" in rows:
        L.append("# Table 4, Fig. 4: the DMP command above with the row's flags added, e.g.")
        flags = " ".join(next(iter(study["ablations"].values()))["flags"])
        L.append(rows["dmp"]["command"].replace("--method dmp", f"--method dmp {flags}"))
    if study["scratch"]:
        L.append("# Table 6")
        L += [e["command"] for e in study["scratch"].values()]
    L.append("# every evaluation (CKPT: a run's last checkpoint, or the base)")
    L.append(f"python study.py --evaluate CKPT --split test --eval-out eval.json --bpd-images "
             f"{st['bpd_images']} --sample-sets {st['sample_sets']} --sample-steps "
             f"{st['sample_steps']}")
    L.append("```")
    return "\n".join(L)


SETTLE = """What would settle it at full scale is the same design in the paper's own setting.
DiT-B/2 on FFHQ 256 has 256 tokens, so N = 256 prompts per block: the control (prompt tuning, its
rate chosen on a validation split; at lr/256 it is what a gate that never moves amounts to), the
positive control (`--method prompt --time-bands 4`), DMP, DMP with its gate free to move
(`--importance-coef 0`), the same gate blind to t (`--gate-cond none`: what the free gate gains
over it is what mixing by timestep adds), each further-trained 30K steps from the same 600K-step
base (Table 2's row: the paper reports prompt tuning at lr, 6.81, and DMP, 5.87, but not the
control), five seeds each (`--seed`), FID on 50K samples, and train.py's log showing how far each
gate moved (`gate_dev_max`, `gate_tv_t` on every line):

```bash
python train.py --dataset ffhq --model DiT-B/2 --iterations 600000          # runs/000-ffhq-pretrain
BASE=runs/000-ffhq-pretrain/checkpoints/0600000.pt
python train.py --dataset ffhq --init $BASE --iterations 30000 --method prompt --lr-scale 0.00390625
python train.py --dataset ffhq --init $BASE --iterations 30000 --method prompt --time-bands 4
python train.py --dataset ffhq --init $BASE --iterations 30000 --method dmp
python train.py --dataset ffhq --init $BASE --iterations 30000 --method dmp --importance-coef 0
python train.py --dataset ffhq --init $BASE --iterations 30000 --method dmp --importance-coef 0 \\
    --gate-cond none
python sample.py --ckpt runs/001-ffhq-prompt/checkpoints/0030000.pt --num-samples 50000 \\
    --out samples/control
python fid.py data/ffhq256-ref.npz samples/control.npz          # the reference: docs/evaluation.md; same for each row
```"""


FULL_SCALE = """## At full scale: every row of the paper

Each block below is the complete path from images to the paper's number, with the project's commands (the paper's
settings are the presets' defaults: batch 128, AdamW lr 1e-4, no EMA when further-training, DDPM 250 steps,
guidance 1.5 where the model is conditional). A run folder is `runs/NNN-<dataset>-<method>`; substitute the
numbers your runs get. The reference sets, how they are built and what each FID command prints
are in `docs/evaluation.md`.

**FFHQ 256, DiT-B/2** (Tables 2, 4, 7, Fig. 4; pretrained 600K, further-trained 30K): base 6.27; fine-tuning
6.57, prompt tuning 6.81, LoRA 7.11, DMP 5.87. Table 4's rows add `--gate attention` (6.41), `--selection hard`
(5.96), `--prompt-selection uniform` (5.97), `--position prepend --num-prompts 50` (6.79), `--importance-coef 0
--load-coef 0` (6.11); Fig. 4: `--prompt-depth 1` and `--prompt-depth 6`.

```bash
python prepare_data.py ~/data/ffhq/images1024x1024 data/ffhq256
python fid.py ~/data/ffhq/images1024x1024 --resolution 256 \\
    --save-stats data/ffhq256-ref.npz --save-batch data/ffhq256-ref-batch.npz
python train.py --dataset ffhq --model DiT-B/2 --iterations 600000                    # runs/000-ffhq-pretrain
python train.py --dataset ffhq --init runs/000-ffhq-pretrain/checkpoints/0600000.pt --method dmp --iterations 30000
#                                    (--method full | prompt | lora for the other rows)
python sample.py --ckpt runs/001-ffhq-dmp/checkpoints/0030000.pt --num-samples 50000 --out samples/ffhq-b2-dmp
python fid.py data/ffhq256-ref.npz samples/ffhq-b2-dmp.npz
```

**FFHQ 256, DiT-L/2** (Table 3; pretrained 250K, then +10K ... +50K): base 6.26; at +50K fine-tuning 6.80,
prompt tuning 6.51, DMP 5.61. `--ckpt-every 10000 --keep 5` keeps every column's checkpoint.

```bash
python train.py --dataset ffhq --model DiT-L/2 --iterations 250000                    # runs/002-ffhq-pretrain
python train.py --dataset ffhq --init runs/002-ffhq-pretrain/checkpoints/0250000.pt --method dmp \\
    --iterations 50000 --ckpt-every 10000 --keep 5
python sample.py --ckpt runs/003-ffhq-dmp/checkpoints/0050000.pt --num-samples 50000 --out samples/ffhq-l2-dmp
python fid.py data/ffhq256-ref.npz samples/ffhq-l2-dmp.npz
```

**FFHQ 256, DMP from scratch, DiT-B/2** (Table 6): at 80K / 90K / 100K, 19.18 / 18.80 / 16.55 without and
15.96 / 15.21 / 13.87 with DMP.

```bash
python train.py --dataset ffhq --model DiT-B/2 --iterations 100000 --ckpt-every 10000 --keep 3
python train.py --dataset ffhq --model DiT-B/2 --iterations 100000 --ckpt-every 10000 --keep 3 --method dmp
```

**MS-COCO 256, text-to-image DiT-B/2** (Tables 2, 9; pretrained 450K, further-trained 40K): base 7.33;
fine-tuning 7.51, prompt tuning 7.37, DMP 7.12 (gate on t + text; `--gate-cond t`: 7.30).

```bash
python prepare_data.py ~/coco/train2014 data/coco256 --captions ~/coco/annotations/captions_train2014.json
python train.py --dataset coco --model DiT-B/2 --text-encoder stable-diffusion-v1-5/ --iterations 450000
python train.py --dataset coco --init runs/000-coco-pretrain/checkpoints/0450000.pt --method dmp --iterations 40000
python fid.py ~/coco/val2014 --resolution 256 --captions ~/coco/annotations/captions_val2014.json \\
    --save-stats data/coco256-val-ref.npz --save-prompts data/coco-val2014-prompts.txt
python sample.py --ckpt runs/001-coco-dmp/checkpoints/0040000.pt \\
    --prompt-file data/coco-val2014-prompts.txt --num-samples 30000 --out samples/coco-dmp
python fid.py data/coco256-val-ref.npz samples/coco-dmp.npz
```

**ImageNet 256, DiT-XL/2** (Tables 8, 9; the official 7M-step model, further-trained 20K): base 2.29 (precision
0.83, recall 0.57); fine-tuning 5.04, prompt tuning 2.77, DMP 2.25 (0.83, 0.57); `--gate-cond t+c`: 2.25.

```bash
python prepare_data.py ~/data/imagenet/train data/imagenet256 --labels folders
python train.py --dataset imagenet --init DiT-XL-2-256x256.pt --method dmp --iterations 20000
python sample.py --ckpt runs/000-imagenet-dmp/checkpoints/0020000.pt --num-samples 50000 --out samples/in-dmp
python fid.py VIRTUAL_imagenet256_labeled.npz samples/in-dmp.npz --pr
```

**Stable Diffusion 1.5 on LAION 512** (Table 2; further-trained 50K): base 47.18; fine-tuning 52.99, prompt
tuning 35.93, DMP 35.44 (PNDM 50 steps, guidance 7.5).

```bash
python prepare_data.py ~/laion/shards data/laion512 --resolution 512 --captions txt
python train.py --dataset laion --model sd15 --init v1-5-pruned-emaonly.safetensors --method dmp --iterations 50000
python fid.py ~/laion/shards --resolution 512 --captions txt --max-images 30000 \\
    --save-stats data/laion512-ref.npz --save-prompts data/laion512-prompts.txt
python sample.py --model sd15 --ckpt runs/000-laion-dmp/checkpoints/0050000.pt \\
    --prompt-file data/laion512-prompts.txt --num-samples 30000 --out samples/laion-dmp
python fid.py data/laion512-ref.npz samples/laion-dmp.npz
```"""


def render_brief(study, doc="docs/study.md"):
    """
    The README's results in brief: stage 1, the verdict's headline, the primary rows' numbers and
    the limits. A function of study.json alone, like render; doc: the study's page, relative to
    the README.
    """
    st, rows, base = study["settings"], study["rows"], study["base"]
    seeds = len(st["seeds"])
    L = []
    w = L.append
    w(f"**The study** ([{doc}]({doc}); `{study['command']}`"
      + (f", {study['wall_minutes']:.0f} minutes on {study['cpus']} CPU cores"
         if study.get("wall_minutes") is not None else "")
      + f") asks the paper's question on the digits: a {study['base']['parameters'] / 1e3:.0f}K-"
      f"parameter DiT (" + ("converged" if converged(study) else "not converged")
      + f"; its test loss {gap(study):.1f}% above its training loss), further-trained "
      f"{st['iterations']:,} iterations, every row at the learning rate a validation split chose, "
      f"{seeds} paired seeds, a rule with a corrected interval and an equivalence margin fixed "
      f"before the runs.")
    w("")
    w(stage1_text(study))
    w("")
    w(f"{headline(study)} The rule that picks this wording is stated in [{doc}]({doc}).")
    w("")
    w(f"| after {st['iterations']:,} iterations (mean ± std over {seeds} seeds) | lr × | held-out "
      f"loss | held-out bits/dim | sample FD vs held-out digits |")
    w("| --- | --- | --- | --- | --- |")
    w(f"| base (no further training) | | {base['heldout_loss']:.5f} | {base['bpd']:.4f} | "
      f"{base['quality']['fd_heldout']:.3f} |")
    for key in [k for k in rows if k in (CONTROL, POSITIVE) or k.startswith("dmp")]:
        w(f"| {rows[key]['label']} | {rows[key]['lr_scale']:g} | "
          f"{fmt(per_seed(study, key, 'heldout_loss'), 5)} | "
          f"{fmt(per_seed(study, key, 'bpd'), 4)} | {fmt(per_seed(study, key, 'fd_heldout'), 3)} |")
    w("")
    w("What it cannot conclude:")
    w("")
    for x in limits(study):
        w(f"- {x}")
    w("")
    w(f"The same design at full scale, on DiT-B/2 FFHQ, is spelled out with its commands in "
      f"[{doc}]({doc}).")
    return "\n".join(L) + "\n"


def write_outputs(study, out, doc=None, readme=None):
    """
    The figures and study.md in the folder out, the study section of doc (docs/study.md) and the
    results in brief of readme (README.md), all from study (study.json).
    """
    out = Path(out)
    draw_figures(study, out)
    markdown = render(study)
    (out / "study.md").write_text(markdown)
    if doc:
        doc = Path(doc)
        figures = Path(os.path.relpath(out.resolve(), doc.resolve().parent)).as_posix()
        write_section(doc, render(study, figures))
        if readme:
            page = Path(os.path.relpath(doc.resolve(), Path(readme).resolve().parent)).as_posix()
            write_section(Path(readme), render_brief(study, page), BRIEF)
    return markdown


def write_section(path, markdown, markers=(BEGIN, END)):
    """Replace what lies between the markers of path with the rendered markdown."""
    begin, end = markers
    text = path.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"error: {path} has no '{begin}' ... '{end}' markers for the study")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(head + begin + "\n" + markdown + end + tail)


def section(path, markers=(BEGIN, END)):
    """The study section of path as rendered (what write_section put there)."""
    begin, end = markers
    text = Path(path).read_text()
    return text.split(begin + "\n", 1)[1].split(end, 1)[0]
