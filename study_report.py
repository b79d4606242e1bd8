"""
The report of study.py: study.json to the markdown of docs/study.md (between its two study markers)
and of study.md beside the figures, the figures themselves, and the commands for every full-scale
row of the paper. Everything here is a function of study.json alone, so `python study.py --render`
rewrites it byte for byte.
"""
import os
import posixpath
from pathlib import Path

import numpy as np

BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"
BRIEF = "<!-- study-brief:begin -->", "<!-- study-brief:end -->"  # the README's results in brief
BRIEF_ROWS = ("full", "prompt", "prompt-lr/N", "dmp", "dmp-authors", "dmp-ib0")
QUALITY = ("fd_train", "kid_train", "fd_heldout", "kid_heldout")
METRIC_NAMES = dict(heldout_loss="held-out loss", bpd="bits/dim", fd_train="FD vs train",
                    kid_train="KID vs train", fd_heldout="FD vs held-out",
                    kid_heldout="KID vs held-out")
DIGITS = dict(heldout_loss=5, bpd=4, fd_train=3, kid_train=4, fd_heldout=3, kid_heldout=4)
GATE = ("gate_dev_max", "gate_dev_mean", "gate_entropy_min", "gate_entropy_mean", "gate_tv_t")


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


def plateau(study):
    """
    What the pretraining curve says of its end, from the curve alone: the held-out loss over the
    last quarter of the run, and the step of the base.
    """
    curve = np.array(study["pretraining"], np.float64)
    last = curve[-1, 0]
    start = curve[curve[:, 0] >= 0.75 * last][0]
    best = curve[curve[:, 1].argmin()]
    return (f"over the last quarter of the run (steps {int(start[0]):,} to {int(last):,}) the "
            f"held-out loss went "
            f"from {start[1]:.5f} to {curve[-1, 1]:.5f} "
            f"({100 * (curve[-1, 1] / start[1] - 1):+.2f}%), its lowest {best[1]:.5f} at step "
            f"{int(best[0]):,}; the base is the {int(last):,}-step model")


def draw_figures(study, out):
    """pretraining_curve.png and Fig. 5 of each DMP row drawn (fig5_gate.png: the default's)."""
    draw_curve(study["pretraining"], out / "pretraining_curve.png")
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


def quality_cell(values, boot_sd, metric):
    """mean ± seed std, and in brackets the half-width of the bootstrap's 95% interval."""
    return f"{fmt(values, DIGITS[metric])} (±{1.96 * boot_sd:.{DIGITS[metric]}f})"


def label(study, key, bold=True):
    name = study["rows"][key]["label"] if key in study["rows"] else dict(
        base="base", floor="held-out digits").get(key, key)
    return name if bold else name.strip("*")


def render(study, figures=""):
    """
    The markdown of the study: a function of study.json alone. `figures` is the folder of the
    figures relative to the file the markdown goes into ("" beside them, "../assets/study" in docs/).
    """
    st, rows = study["settings"], study["rows"]
    last, seeds, n = st["iterations"], len(st["seeds"]), st["heldout_images"]
    L = []
    w = L.append
    w("# Reproducing the paper in miniature")
    w("")
    w(f"The paper's experiments in miniature, on the bundled digits ({st['train_images']:,} "
      f"training and {n} held-out 8×8 images) and the digits DiT of the demo (`assets/dit_digits.pt`, "
      f"{study['base']['parameters'] / 1e6:.2f}M parameters, {st['blocks']} blocks), with the "
      f"control that separates DMP's gate from its learning rate. "
      f"Produced by `{study['command']}` on {study['date']} (torch {study['torch']}, CPU); "
      f"`python study.py --render` rewrites this section and its figures from "
      f"`assets/study/study.json`, byte for byte. Every method further-trains the same base on "
      f"its own pretraining data for {last:,} iterations (batch {st['batch_size']}, AdamW, no "
      f"EMA, {seeds} seed{'s' * (seeds > 1)}) at one learning rate, {st['lr']:g} (the lr the base "
      f"was pretrained with, as the paper further-trains every method at its pretraining lr), "
      f"times only the multiplier a row names; every command is listed at the end of this "
      f"section.")
    w("")
    sets = st["sample_sets"]
    w(f"Metrics. Likelihood, on fixed held-out images with fixed noise (every model sees the same "
      f"draws): the held-out loss (the training objective, all held-out images, 4 draws each) and "
      f"the exact variational bound in bits/dim (all 1000 steps, the first {st['bpd_images']} "
      f"held-out images). Sample quality, the paper's measure, without Inception: the Fréchet "
      f"distance (FD) and the KID of the features of a small classifier trained on the training "
      f"digits only (`{st['classifier']['command']}`, held-out accuracy "
      f"{st['classifier']['heldout_accuracy']:.4f}; `digits_fid.py`), between {n} samples and the "
      f"{st['train_images']:,} training digits (\"vs train\") or the {n} held-out digits "
      f"(\"vs held-out\"): every "
      f"number at that matched count, the mean over {sets} set{'s' * (sets > 1)} of {n} samples "
      f"(DDPM, {st['sample_steps']} steps, the same noise for every model), with a bootstrap of "
      f"{st['replicates']} resamplings. \"Held-out digits\" is the floor, real digits measured the "
      f"same way. Lower is better everywhere; mean ± std over seeds.")
    w("")
    w("**When a difference counts** (fixed in `study.py` before the runs): " + study["rule"])
    w("")
    if study.get("wall_minutes") is not None:
        reused = study["reused_evaluations"]
        w(f"The whole study took {study['wall_minutes']:.0f} minutes on {study['cpus']} CPU cores "
          f"({study['jobs']} runs at a time, one thread each)" + (
              f", reusing {reused} evaluations of an interrupted earlier "
              f"invocation" if reused else "")
          + ".")
        w("")
    w("**Pretraining** (the base; `assets/dit_digits.log.jsonl`): the held-out loss of the EMA "
      "model against the step (right: from a quarter of the run on, on its own scale); "
      + plateau(study) + ".")
    w("")
    w(f"![pretraining curve]({posixpath.join(figures, 'pretraining_curve.png')})")
    w("")
    curve = dict(study["pretraining"])
    marks = [s for s in sorted(curve) if s % 2000 == 0]
    w("| step | " + " | ".join(f"{s:,}" for s in marks) + " |")
    w("| --- | " + " | ".join("---" for _ in marks) + " |")
    w("| held-out loss | " + " | ".join(f"{curve[s]:.4f}" for s in marks) + " |")
    w("")
    if rows:
        render_rows(study, w)
    if study["ablations"]:
        render_ablations(study, w)
    if study["scratch"]:
        render_scratch(study, w)
    if "table5" in study:
        w(f"**Table 5: structural bias**: off-diagonal statistics between "
          f"{study['table5']['samples']:,} generated samples (DDPM {st['sample_steps']} steps, "
          f"the same noise for both models), base against DMP (seed {st['seeds'][0]}).")
        w("")
        w("| model | metric | max | min | mean | std |")
        w("| --- | --- | --- | --- | --- | --- |")
        for model, name in (("base", "base"), ("dmp", "+ DMP")):
            for metric in ("correlation", "similarity"):
                v = study["table5"][model][metric]
                w(f"| {name} | {metric} | {v['max']:.4f} | {v['min']:.4f} | {v['mean']:.4f} | "
                  f"{v['std']:.4f} |")
        w("")
    for key in study.get("fig5", {}):
        g = rows[key]["gate"][str(st["seeds"][0])]
        w(f"**Fig. 5: the trained gate** ({label(study, key)}, seed {st['seeds'][0]}): one panel "
          f"per block, rows timesteps from 990 (top) to 0 in steps of 10, columns the "
          f"{st['n_prompts']} prompts; every panel of every Fig. 5 on one scale, "
          f"log2({st['n_prompts']} g) from −log2 {st['n_prompts']} (dark blue: a weight of "
          f"1/{st['n_prompts'] ** 2} or less) through 0 (teal: the uniform 1/{st['n_prompts']}) "
          f"to +log2 {st['n_prompts']} (yellow: one prompt takes the whole mixture).")
        w("")
        w(f"![gate weights]({posixpath.join(figures, figure_name(key))})")
        w("")
        w(f"The mixture's entropy relative to the uniform mixture's is {g['entropy_high_t']:.4f} "
          f"at t ≥ 500 and {g['entropy_low_t']:.4f} at t < 500 (1 is uniform); the weights are at "
          f"most {g['gate_dev_max']:.3f} of 1/{st['n_prompts']} away from it, and a block's "
          f"mixture differs from its mean over timesteps by {g['gate_tv_t']:.4f} in total "
          f"variation.")
        w("")
    w(commands(study))
    w("")
    w("¹ FID: not computed. An Inception FID of 8×8 digits upsampled to 299×299 measures the "
      "upsampling more than the digits, and needs pytorch-fid's weights (a download); the digits "
      "classifier's FD and KID, trained on these very images, stand in for it.")
    w("")
    w(FULL_SCALE)
    return "\n".join(L) + "\n"


def render_rows(study, w):
    """The main table: likelihood across iterations, sample quality, gate movement, the verdicts."""
    st, base, rows = study["settings"], study["base"], study["rows"]
    counts, last = st["eval_at"], str(st["iterations"])
    w(f"**Tables 2, 3 and 7: further-training methods across iterations** (held-out bits/dim; "
      f"base {base['bpd']:.4f})")
    w("")
    w("| method | trained parameters | " + " | ".join(f"+{int(c):,}" for c in counts)
      + f" | Δ bits/dim at +{int(last):,} | held-out loss at +{int(last):,} (base "
      f"{base['heldout_loss']:.5f}) | FID |")
    w("| --- | --- | " + " | ".join("---" for _ in counts) + " | --- | --- | --- |")
    for e in rows.values():
        runs = list(e["runs"].values())
        w(f"| {e['label']} | {e['trained']:,} ({100 * e['trained'] / e['total']:.2f}%) | "
          + " | ".join(fmt([r[str(c)]["bpd"] for r in runs]) for c in counts)
          + f" | {fmt([r[last]['bpd'] - base['bpd'] for r in runs], 4)} | "
          f"{fmt([r[last]['heldout_loss'] for r in runs], 5)} | n/a¹ |")
    w("")
    w(f"**Sample quality** at +{int(last):,} (digits-classifier features; mean ± std over seeds, "
      f"in brackets the half-width of the bootstrap's 95% interval of the mean; KID's estimator "
      f"is unbiased, so it can fall below zero)")
    w("")
    w("| | " + " | ".join(METRIC_NAMES[m] for m in QUALITY) + " |")
    w("| --- | " + " | ".join("---" for _ in QUALITY) + " |")
    for name, e in (("held-out digits (the floor)", study["floor"]), ("base", base)):
        w(f"| {name} | " + " | ".join(quality_cell([e["quality"][m]], e["boot_sd"][m], m)
                                      for m in QUALITY) + " |")
    for e in rows.values():
        qs = list(e["quality"].values())
        w(f"| {e['label']} | " + " | ".join(quality_cell([q[m] for q in qs], e["boot_sd"][m], m)
                                            for m in QUALITY) + " |")
    w("")
    gated = [k for k, e in rows.items() if e["gate"]]
    if gated:
        w(f"**How far each DMP gate moved** from the uniform 1/{st['n_prompts']} it starts at (the "
          f"trained gate at timesteps 0, 10, ..., 990, every block; one value per seed, seeds "
          f"{' / '.join(str(x) for x in st['seeds'])}, as a mean would hide a gate that collapses "
          f"in some seeds and not in others): the "
          f"largest and the mean |{st['n_prompts']} g − 1|, the entropy relative to uniform (1: "
          f"uniform), and the total variation between a block's mixture at one timestep and its "
          f"mean over timesteps (0: the same mixture at every t).")
        w("")
        w("| | max deviation | mean deviation | min entropy | mean entropy | variation across t |")
        w("| --- | --- | --- | --- | --- | --- |")
        for key in gated:
            g = [rows[key]["gate"][str(x)] for x in st["seeds"]]
            w(f"| {rows[key]['label']} | " + " | ".join(" / ".join(f"{x[m]:.4f}" for x in g)
                                                        for m in GATE) + " |")
        w("")
    render_rule(study, w)
    w("**Stage-specific change** (the claim behind Table 3): the noise MSE of each band of "
      "timesteps after each number of iterations, as % change from the base's (base MSE in the "
      "first row).")
    w("")
    w("| method | iterations | " + " | ".join(f"t {100 * b}-{100 * b + 99}" for b in range(10))
      + " |")
    w("| --- | --- | " + " | ".join("---" for _ in range(10)) + " |")
    w("| base MSE | | " + " | ".join(f"{v:.4f}" for v in base["mse_bands"]) + " |")
    for e in rows.values():
        runs = list(e["runs"].values())
        for i, c in enumerate(counts):
            change = [fmt([100 * (r[str(c)]["mse_bands"][b] / base["mse_bands"][b] - 1)
                           for r in runs], 2) for b in range(10)]
            w(f"| {e['label'] if i == 0 else ''} | +{int(c):,} | " + " | ".join(change) + " |")
    w("")


def render_rule(study, w):
    """The comparisons the rule decided, and the verdict they add up to."""
    rows = study["rows"]
    w("**The rule applied.** Each DMP row against the control and against prompt tuning: the "
      "difference of the means (row minus reference), the seed spread it must exceed, the "
      "bootstrap interval it must exclude zero from (FD, KID), and whether it counts.")
    w("")
    w("| row | reference | metric | difference | seed spread | 95% interval | counts |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for c in study["comparisons"]:
        if c["b"] not in ("prompt-lr/N", "prompt"):
            continue
        for m, v in metric_items(c):
            d = DIGITS[m] + 1
            lo_hi = (f"[{v['interval'][0]:+.{d}f}, {v['interval'][1]:+.{d}f}]" if "interval" in v
                     else "—")
            spread = "one seed" if v["seed_spread"] is None else f"{v['seed_spread']:.{d}f}"
            w(f"| {label(study, c['a'])} | {label(study, c['b'])} | {METRIC_NAMES[m]} | "
              f"{v['diff']:+.{d}f} | {spread} | {lo_hi} | {'**yes**' if v['counts'] else 'no'} |")
    w("")
    w("Every row against the base (and the base against the held-out digits): the difference, in "
      "bold where it counts by the rule.")
    w("")
    w("| row | " + " | ".join(METRIC_NAMES.values()) + " |")
    w("| --- | " + " | ".join("---" for _ in METRIC_NAMES) + " |")
    for c in study["comparisons"]:
        if c["b"] == "floor" or (c["b"] == "base" and c["a"] in rows):
            cells = []
            for m in METRIC_NAMES:
                v = c.get(m)
                text = f"{v['diff']:+.{DIGITS[m] + 1}f}" if v else "—"
                cells.append(f"**{text}**" if v and v["counts"] else text)
            w(f"| {label(study, c['a'])} vs {label(study, c['b'])} | " + " | ".join(cells) + " |")
    w("")
    w(verdict(study))
    w("")


def metric_items(comparison):
    return [(m, comparison[m]) for m in METRIC_NAMES if m in comparison]


def render_ablations(study, w):
    """Table 4 and Fig. 4: one DMP run per row, seed 0, its sample quality, its gate's movement."""
    st, base, rows = study["settings"], study["base"], study["rows"]
    last, seed = str(st["iterations"]), str(st["seeds"][0])
    w(f"**Table 4 and Fig. 4: DMP ablations** (seed {seed}, +{int(last):,} iterations; the default "
      f"row is the DMP run of the same seed; Δ from the base; FD and KID with the half-width of "
      f"their bootstrap interval; the gate's largest deviation from uniform and its variation "
      f"across timesteps)")
    w("")
    w("| case | flags | held-out loss | bits/dim | Δ bits/dim | FD vs train | FD vs held-out | "
      "KID vs held-out | max deviation | variation across t |")
    w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    entries = [(key, f"`{' '.join(a['flags'])}`", a) for key, a in study["ablations"].items()]
    named = [(f"**default** (linear, soft, distinct, add, IB 1 LB 1, all {st['blocks']} blocks)",
              "dmp")]
    named += list(study["table4e"].items())  # runs that are another row's to the last digit
    for name, key in named:
        if key in rows and seed in rows[key]["runs"]:
            r = rows[key]
            run = dict(r["runs"][seed][last], quality=r["quality"][seed], gate=r["gate"].get(seed))
            entries.insert(0 if key == "dmp" and name.startswith("**") else len(entries),
                           (name, "" if name.startswith("**") else f"= {label(study, key, False)}",
                            run))
    for name, flags, a in entries:
        q, g, sd = a["quality"], a.get("gate"), a.get("boot_sd")
        cells = [f"{q[m]:.{DIGITS[m]}f}" + (f" (±{1.96 * sd[m]:.{DIGITS[m]}f})" if sd else "")
                 for m in ("fd_train", "fd_heldout", "kid_heldout")]
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
    w(f"**Table 6: DMP from the start of training** (the base's recipe, lr "
      f"{study['settings']['lr']:g}, but EMA 0.99, "
      f"seed {study['settings']['seeds'][0]}; the EMA model; held-out bits/dim, and held-out loss "
      f"in brackets; FD of the last)")
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


def commands(study):
    """Every run and evaluation of the study as the command that made it."""
    st, rows = study["settings"], study["rows"]
    others = ", ".join(str(x) for x in st["seeds"][1:])
    L = ["**The commands** (each run with its own `--results-dir`; `python study.py` runs them all "
         "and skips what is finished):", "", "```bash"]
    L.append(f"{st['classifier']['command']}   # the feature net, once")
    if rows:
        again = f", again with --seed {others}" if others else ""
        L.append("# the main table: one run per row" + again)
        L += [e["command"] for e in rows.values()]
    if study["ablations"] and "dmp" in rows:
        L.append("# Table 4, Fig. 4: the DMP command above with the row's flags added, e.g.")
        flags = " ".join(next(iter(study["ablations"].values()))["flags"])
        L.append(rows["dmp"]["command"].replace("--method dmp", f"--method dmp {flags}"))
    if study["scratch"]:
        L.append("# Table 6")
        L += [e["command"] for e in study["scratch"].values()]
    L.append("# every evaluation (CKPT: a run's checkpoints/NNNNNNN.pt, or the base; a run's "
             "last one samples)")
    L.append(f"python study.py --evaluate CKPT --eval-out eval.json --bpd-images "
             f"{st['bpd_images']} --sample-sets {st['sample_sets']} --sample-steps "
             f"{st['sample_steps']} --replicates {st['replicates']}")
    L.append("```")
    return "\n".join(L)


def comparison(study, a, b):
    """study.json's comparison of row a with row b ({} if the rule did not compare them)."""
    return next((c for c in study["comparisons"] if (c["a"], c["b"]) == (a, b)), {})


def counted(study, a, b):
    """The metrics on which row a differs from row b by the rule: {metric: difference}."""
    return {m: v["diff"] for m, v in metric_items(comparison(study, a, b)) if v["counts"]}


CONTROL = "prompt-lr/N"  # prompt tuning at lr/N: what a zero-initialised, unmoving gate amounts to
T_BLIND = "dmp-t-blind"  # the same gate blind to t: the arm that isolates mixing by timestep
VERDICT_RULE = (
    "The verdict is chosen from the rule's comparisons alone. A row beats another when at least "
    "one of its differences counts as an improvement and none counts as worse. The question, "
    "whether DMP's mixing by timestep adds anything over prompt tuning at lr/N, can be answered "
    "only when a positive control (a row given capacity specific to the timestep by construction) beats the "
    "control by the rule; without one, the verdict is that the setup cannot tell. With one, a DMP "
    "row that beats the control is credited; a DMP row that does not is reported as not beating "
    "it, which is not evidence of no effect unless the study fixes an equivalence margin.")


def beats(study, a, b):
    """Row a beats row b by the rule: a difference counts as an improvement, none as worse."""
    d = counted(study, a, b)
    return any(v < 0 for v in d.values()) and not any(v > 0 for v in d.values())


def per_seed(study, key, metric):
    """A main-table row's values of a metric, one per seed in settings' order."""
    st, row = study["settings"], study["rows"][key]
    last = str(st["iterations"])
    if metric in QUALITY:
        return [row["quality"][str(s)][metric] for s in st["seeds"]]
    return [row["runs"][str(s)][last][metric] for s in st["seeds"]]


def paired_p(study, a, b, metric):
    """The two-sided p of a paired t-test over the seeds (context only: not part of the rule)."""
    from scipy import stats
    return float(stats.ttest_rel(per_seed(study, a, metric), per_seed(study, b, metric)).pvalue)


def chance_rate(seeds, spread_b=True, draws=200_000):
    """
    How often the rule's test (1) counts a difference between two rows of `seeds` normal values
    each drawn from one distribution (spread_b False: against a fixed value, a row without seed
    spread); simulated with a fixed seed, so the report stays a function of study.json.
    """
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, draws, seeds))
    threshold = a.std(1, ddof=1) + (b.std(1, ddof=1) if spread_b else 0)
    return float((np.abs(a.mean(1) - (b.mean(1) if spread_b else 0)) > threshold).mean())


def headline(study):
    """The verdict's first sentence, one per branch of VERDICT_RULE (and none from one seed)."""
    st, rows = study["settings"], study["rows"]
    n = st["n_prompts"]
    if len(st["seeds"]) < 2:
        return ("**No verdict from one seed**: the rule needs the spread over seeds, which one "
                "seed does not have; `python study.py` (three seeds) gives it.")
    if CONTROL not in rows:
        return (f"**No verdict: the study has no control** (prompt tuning at lr/{n}), so nothing "
                f"separates DMP's gate from its learning rate.")
    question = f"whether mixing the prompts by timestep adds anything over prompt tuning at lr/{n}"
    positives = [k for k in study.get("positive_controls", []) if k in rows]
    if not positives:
        return (f"**Verdict: this setup cannot tell {question}.** The study has no positive "
                f"control, no row that shows the setup can detect an effect of the kind the paper "
                f"claims, so a difference that does not count is no evidence of no effect.")
    winners = [k for k in positives if beats(study, k, CONTROL)]
    names = " and ".join(label(study, k, False) for k in positives)
    if not winners:
        return (f"**Verdict: this setup cannot tell {question}.** Its positive control ({names}) "
                f"did not beat the control by the rule: the setup cannot detect even what "
                f"capacity specific to the timestep does.")
    dmps = [k for k in rows if k.startswith("dmp") and beats(study, k, CONTROL)]
    names = " and ".join(label(study, k, False) for k in winners)
    if dmps:
        return ("**Verdict: by the rule, " + " and ".join(
            f"{label(study, k, False)} beats prompt tuning at lr/{n} on "
            f"{', '.join(METRIC_NAMES[m] for m in counted(study, k, CONTROL))}" for k in dmps)
            + f", as the positive control ({names}) does.**")
    return (f"**Verdict: no DMP row beats prompt tuning at lr/{n} by the rule, where the positive "
            f"control ({names}) does.**" + ("" if "margin" in study else
                                            " The rule fixes no equivalence margin, so this is "
                                            "not evidence that the mixing adds nothing."))


def row_finding(study, k):
    """One DMP row against the control: its gate per seed, and what the rule found, with numbers."""
    st, n = study["settings"], study["settings"]["n_prompts"]
    seeds = st["seeds"]
    gates = [study["rows"][k]["gate"][str(s)] for s in seeds]
    top = ", ".join(f"{(g['gate_dev_max'] + 1) / n:.3f}" for g in gates)
    tv = ", ".join(f"{g['gate_tv_t']:.4f}" for g in gates)
    c = comparison(study, k, CONTROL)
    found = []
    for m, v in metric_items(c):
        if v["counts"]:
            found.append(f"{METRIC_NAMES[m]} counts as {'better' if v['diff'] < 0 else 'worse'} "
                         f"(difference {v['diff']:+.2e} against a seed spread of "
                         f"{v['seed_spread']:.2e}, {abs(v['diff']) / v['seed_spread']:.2f} times "
                         f"it; a paired t-test over the seeds, not part of the rule, gives p = "
                         f"{paired_p(study, k, CONTROL, m):.2f})")
    rest = ", ".join(f"{METRIC_NAMES[m]} {v['diff']:+.1e}" for m, v in metric_items(c)
                     if not v["counts"])
    return (f"{label(study, k, False)}: the largest weight one prompt gets is {top} (seeds "
            f"{', '.join(map(str, seeds))}; uniform is 1/{n} = {1 / n:.4f}, and 1 means that one "
            f"prompt takes the whole mixture), and a block's mixture differs from its mean over timesteps by {tv} "
            f"in total variation. Against the control, "
            + ("; ".join(found) + "; " if found else "no difference counts; ")
            + (f"the differences that do not count: {rest}." if rest else
               "every difference counts."))


def limits(study):
    """What the committed data cannot support, each read from study.json."""
    st, rows = study["settings"], study["rows"]
    k, out = len(st["seeds"]), []
    if not [c for c in study.get("positive_controls", []) if c in rows]:
        out.append("No positive control: no row is given capacity specific to the timestep "
                   "(prompts kept separate per band of timesteps), so nothing shows that the setup could "
                   "detect an effect of mixing by timestep.")
    out.append(f"The base's pretraining: {plateau(study)}. Whether further training is limited "
               f"by the model or by its {st['train_images']:,} training digits is not measured (study.json holds no "
               f"training-set loss of the base).")
    if T_BLIND not in rows:
        out.append("No arm isolates mixing by timestep: the same gate blind to t (its bias and the "
                   "block index only) is not run, so a gate that moves cannot be told apart from "
                   "one that only rescales the prompts.")
    decisions = sum(1 for c in study["comparisons"] for _ in metric_items(c))
    if k > 1:
        out.append(f"{k} seeds per row, compared as unpaired means (the seeds' pairing is not "
                   f"used), and no correction for the number of decisions: with {k} seeds "
                   f"per row, test (1) of the rule counts a difference between two rows of one "
                   f"distribution {100 * chance_rate(k):.0f}% of the time, and against a row "
                   f"without seed spread {100 * chance_rate(k, False):.0f}% (chance_rate); the rule made {decisions} "
                   f"decisions here.")
    if "margin" not in study:
        out.append("No equivalence margin was fixed before the runs: a difference that does not "
                   "count is absence of evidence, and \"no difference\" cannot be claimed.")
    return out


def verdict(study):
    """
    The plain answer, worded by VERDICT_RULE from the comparisons the rule decided (headline): then
    each DMP row against the control, with its gate per seed; which rows changed sample quality;
    and the study's limits.
    """
    st, rows = study["settings"], study["rows"]
    text = VERDICT_RULE + "\n\n" + headline(study)
    if len(st["seeds"]) > 1 and CONTROL in rows:
        items = [row_finding(study, k) for k in rows if k.startswith("dmp")]
        text += "\n\n" + "\n".join(f"- {x}" for x in items)
    changed = {k: counted(study, k, "base") for k in rows}
    better = [label(study, k, False) for k, d in changed.items()
              if any(v < 0 for m, v in d.items() if m in QUALITY)]
    worse = [label(study, k, False) for k, d in changed.items()
             if any(v > 0 for m, v in d.items() if m in QUALITY)]
    text += (f"\n\nSample quality against the base, by the rule: better on some FD or KID for "
             f"{', '.join(better) or 'no row'}; worse for {', '.join(worse) or 'no row'}.")
    text += ("\n\n**What this study cannot conclude**, from the limits of its data:\n\n"
             + "\n".join(f"- {x}" for x in limits(study)))
    return text + "\n\n" + SETTLE


SETTLE = """What would settle it at full scale is the same control in the paper's own setting.
DiT-B/2 on FFHQ 256 has 256 tokens, so N = 256 prompts per block and the control is prompt tuning
at lr/256, beside DMP, DMP with the authors' gate, and DMP with its gate blind to t (`--gate-cond
none`: the bias and block index only, one fixed mixture per block, so what DMP gains over it is
what mixing by timestep adds), each further-trained 30K steps from the same 600K-step base (Table
2's row: the paper reports prompt tuning at lr, 6.81, and DMP, 5.87, but not the control), three
seeds each (`--seed`), FID on 50K samples, and train.py's log showing how far each gate moved
(`gate_dev_max`, `gate_tv_t` on every line). DMP's gate earns credit only where DMP beats the
control by more than the seed spread and FID's own interval; its mixing by timestep, only where
it also beats the t-blind gate:

```bash
python train.py --dataset ffhq --model DiT-B/2 --iterations 600000          # runs/000-ffhq-pretrain
BASE=runs/000-ffhq-pretrain/checkpoints/0600000.pt
python train.py --dataset ffhq --init $BASE --iterations 30000 --method prompt --lr-scale 0.00390625
python train.py --dataset ffhq --init $BASE --iterations 30000 --method dmp
python train.py --dataset ffhq --init $BASE --iterations 30000 --method dmp \\
    --gate-lr-scale 10 --noisy-gate
python train.py --dataset ffhq --init $BASE --iterations 30000 --method dmp --gate-cond none
python sample.py --ckpt runs/001-ffhq-prompt/checkpoints/0030000.pt --num-samples 50000 \\
    --out samples/control
python fid.py data/ffhq256-ref.npz samples/control.npz          # the reference: docs/evaluation.md; same for DMP
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
    The README's results in brief: the main rows' numbers, the verdict's headline and each DMP row's
    finding against the control (verdict's own sentences), other findings of the rule, and the
    limits. A function of study.json alone, like render; doc: the study's page, relative to the
    README.
    """
    st, rows, base = study["settings"], study["rows"], study["base"]
    last, seeds, n = st["iterations"], len(st["seeds"]), st["n_prompts"]
    L = []
    w = L.append
    w(f"**The study** ([{doc}]({doc}); `{study['command']}`"
      + (f", {study['wall_minutes']:.0f} minutes on {study['cpus']} CPU cores"
         if study.get("wall_minutes") is not None else "")
      + f") runs the paper's experiments in miniature on the digits DiT: every method "
      f"further-trained from the same base for {last:,} iterations, {seeds} seed"
      f"{'s' * (seeds > 1)}, with the control that separates the gate from its learning rate, "
      f"prompt tuning at lr/{n} (N = {n} prompts). The rule for a difference that counts was fixed "
      f"before the runs: the difference of the means must exceed the sum of the seed spreads and, "
      f"for FD and KID, its paired-bootstrap 95% interval must exclude zero.")
    w("")
    w(f"| after {last:,} iterations (mean ± std over {seeds} seeds) | held-out loss | held-out "
      f"bits/dim | sample FD vs held-out digits |")
    w("| --- | --- | --- | --- |")
    w(f"| base (no further training) | {base['heldout_loss']:.5f} | {base['bpd']:.4f} | "
      f"{base['quality']['fd_heldout']:.3f} |")
    for k in [k for k in BRIEF_ROWS if k in rows]:
        w(f"| {rows[k]['label']} | {fmt(per_seed(study, k, 'heldout_loss'), 5)} | "
          f"{fmt(per_seed(study, k, 'bpd'), 4)} | {fmt(per_seed(study, k, 'fd_heldout'), 3)} |")
    w("")
    w(f"{headline(study)} The rule that picks this wording is stated with the verdict in "
      f"[{doc}]({doc}).")
    w("")
    if len(st["seeds"]) > 1 and CONTROL in rows:
        for k in [k for k in BRIEF_ROWS if k in rows and k.startswith("dmp")]:
            w(f"- {row_finding(study, k)}")
    for a, b, name in (("dmp", "prompt", "plain prompt tuning (Eq. 2)"),
                       ("full", "base", "the base")):
        d = counted(study, a, b)
        if a in rows and comparison(study, a, b):
            better = [METRIC_NAMES[m] for m, v in d.items() if v < 0]
            worse = [METRIC_NAMES[m] for m, v in d.items() if v > 0]
            w(f"- {label(study, a, False)} against {name}, by the rule: better on "
              f"{', '.join(better) or 'no metric'}; worse on {', '.join(worse) or 'no metric'}.")
    w("")
    w("What the committed data cannot support:")
    w("")
    for x in limits(study):
        w(f"- {x}")
    w("")
    w(f"What would settle it at full scale, the same control on DiT-B/2 FFHQ, is spelled out with "
      f"its commands at the end of the verdict in [{doc}]({doc}).")
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
