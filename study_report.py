"""
The report of study.py: study.json to the markdown of the README's "Reproducing the paper" section (and
study.md, the same text), its two figures, and the commands for every full-scale row of the paper. Everything
here is a function of study.json alone, so `python study.py --render` rewrites it byte for byte.
"""
from pathlib import Path

import numpy as np

import dmp

README_BEGIN, README_END = "<!-- study:begin -->", "<!-- study:end -->"
# study.py's methods, in the paper's order, as the tables name them.
METHOD_NAMES = dict(full="fine-tuning", prompt="prompt tuning (Eq. 2)", dmp="**DMP**", lora="LoRA (r 16)",
                    difffit="DiffFit", bitfit="BitFit")


def draw_curve(points, path, width=480, height=240, pad=36):
    """
    The held-out loss against the step as a PNG (PIL only): all of it on the left, and on the right the steps
    from a quarter of the run on, scaled to their own range so that the plateau can be seen; each panel's range
    is written on its axes.
    """
    from PIL import Image, ImageDraw
    points = np.array(points, dtype=np.float64)
    image = Image.new("RGB", (2 * width, height), "white")
    draw = ImageDraw.Draw(image)
    for left, (steps, losses) in ((0, points.T), (width, points[points[:, 0] >= points[-1, 0] / 4].T)):
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


def draw_figures(study, out):
    """pretraining_curve.png and fig5_gate.png, from study.json's numbers alone."""
    draw_curve(study["pretraining"], out / "pretraining_curve.png")
    if "gate" in study:
        dmp.draw_gate_heatmap(np.array(study["gate"]["weights"]), out / "fig5_gate.png", cell=4, gap=8)


def mean_std(values):
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def fmt(values, digits=4):
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def render(study):
    """The markdown of study.md and of the README section: a function of study.json alone."""
    st, base = study["settings"], study["base"]
    last = str(st["iterations"])
    seeds = len(st["seeds"])
    L = []
    w = L.append
    w("## Reproducing the paper")
    w("")
    w(f"The paper's experiments in miniature, on the bundled digits (1,500 training and {st['heldout_images']} "
      f"held-out 8×8 images) and the converged digits DiT of the demo (`assets/dit_digits.pt`, 0.33M parameters). Produced by "
      f"`{study['command']}` on {study['date']} (torch {study['torch']}, CPU); `python study.py --render` rewrites "
      f"this section and its figures from `assets/study/study.json`, byte for byte. Every method further-trains "
      f"the same base on its own pretraining data for {int(last):,} iterations (batch {st['batch_size']}, AdamW, lr {st['lr']:g} — "
      f"the lr the base was pretrained with, as the paper further-trains at its pretraining lr — no EMA, "
      f"{seeds} seed{'s' if seeds > 1 else ''}); every command is listed at the end of this section. "
      f"Metrics, on fixed held-out images with fixed noise (paired: every model sees the same draws): the held-out "
      f"loss (the training objective, all held-out images, 4 draws each), the exact variational bound in bits/dim "
      f"(all 1000 steps, the first {st['bpd_images']} held-out images), and the noise MSE per band of 100 timesteps "
      f"(the same images, every timestep). Lower is better everywhere; mean ± std over seeds.")
    w("")
    if study.get("wall_minutes") is not None:
        w(f"The whole study took {study['wall_minutes']:.0f} minutes on {study['cpus']} CPU cores ({study['jobs']} "
          f"runs at a time, one thread each)" + (f", reusing {study['reused_evaluations']} evaluations of an "
          f"interrupted earlier invocation" if study["reused_evaluations"] else "") + ".")
        w("")
    w("**Pretraining** (the base; `assets/dit_digits.log.jsonl`): the held-out loss of the EMA model against the "
      "step (right: from a quarter of the run on, on its own scale); it stops improving at about 12K steps, and "
      "the base is the 16K-step model.")
    w("")
    w("![pretraining curve](assets/study/pretraining_curve.png)")
    w("")
    curve = dict(study["pretraining"])
    marks = [s for s in sorted(curve) if s % 2000 == 0]
    w("| step | " + " | ".join(f"{s:,}" for s in marks) + " |")
    w("| --- | " + " | ".join("---" for _ in marks) + " |")
    w("| held-out loss | " + " | ".join(f"{curve[s]:.4f}" for s in marks) + " |")
    w("")
    methods = study["methods"]
    if methods:
        counts = st["eval_at"]
        w(f"**Tables 2, 3 and 7: further-training methods across iterations** (held-out bits/dim; base "
          f"{base['bpd']:.4f})")
        w("")
        w("| method | trained parameters | " + " | ".join(f"+{int(c):,}" for c in counts) + " | Δ bits/dim at "
          f"+{int(last):,} | held-out loss at +{int(last):,} (base {base['heldout_loss']:.5f}) | FID |")
        w("| --- | --- | " + " | ".join("---" for _ in counts) + " | --- | --- | --- |")
        for m in METHOD_NAMES:
            if m not in methods:
                continue
            e = methods[m]
            runs = list(e["runs"].values())
            w(f"| {METHOD_NAMES[m]} | {e['trained']:,} ({100 * e['trained'] / e['total']:.2f}%) | "
              + " | ".join(fmt([r[str(c)]["bpd"] for r in runs]) for c in counts)
              + f" | {fmt([r[last]['bpd'] - base['bpd'] for r in runs], 4)} | "
              f"{fmt([r[last]['heldout_loss'] for r in runs], 5)} | n/a¹ |")
        w("")
        w("**Stage-specific change** (the claim behind Table 3): the noise MSE of each band of timesteps after "
          "each number of iterations, as % change from the base's (base MSE in the first row).")
        w("")
        w("| method | iterations | " + " | ".join(f"t {100 * b}-{100 * b + 99}" for b in range(10)) + " |")
        w("| --- | --- | " + " | ".join("---" for _ in range(10)) + " |")
        w("| base MSE | | " + " | ".join(f"{v:.4f}" for v in base["mse_bands"]) + " |")
        for m in METHOD_NAMES:
            if m in methods:
                runs = list(methods[m]["runs"].values())
                for i, c in enumerate(counts):
                    w(f"| {METHOD_NAMES[m] if i == 0 else ''} | +{int(c):,} | " + " | ".join(
                        fmt([100 * (r[str(c)]["mse_bands"][b] / base["mse_bands"][b] - 1) for r in runs], 2)
                        for b in range(10)) + " |")
        w("")
        w(verdict(study))
        w("")
    if study["ablations"]:
        d0 = methods.get("dmp", {}).get("runs", {}).get(str(st["seeds"][0]))
        w(f"**Table 4 and Fig. 4: DMP ablations** (seed {st['seeds'][0]}, +{int(last):,} iterations; the default "
          f"row is the DMP run of the same seed; Δ from the base)")
        w("")
        w("| case | flags | held-out loss | bits/dim | Δ bits/dim |")
        w("| --- | --- | --- | --- | --- |")
        if d0:
            w(f"| **default** (linear, soft, distinct, add, IB 1 LB 1, all 4 blocks) | | "
              f"{d0[last]['heldout_loss']:.5f} | {d0[last]['bpd']:.4f} | {d0[last]['bpd'] - base['bpd']:+.4f} |")
        for key, a in study["ablations"].items():
            w(f"| {key} | `{' '.join(a['flags'])}` | {a['heldout_loss']:.5f} | {a['bpd']:.4f} | "
              f"{a['bpd'] - base['bpd']:+.4f} |")
        w("")
        same = [k for k, a in study["ablations"].items()
                if d0 and (a["heldout_loss"], a["bpd"]) == (d0[last]["heldout_loss"], d0[last]["bpd"])]
        if same:
            w(f"Identical to the default to every digit: {'; '.join(same)}. Eq. 11's load loss counts gate values "
              f"below zero, which a softmax never produces, so under soft selection it is zero and its coefficient "
              f"changes nothing (dmp.py computes it literally; hard selection uses a smooth estimator).")
            w("")
    if study["scratch"]:
        w("**Table 6: DMP from the start of training** (the base's recipe, lr 1e-3, but EMA 0.99, seed "
          f"{st['seeds'][0]}; the EMA model; held-out bits/dim, and held-out loss in brackets)")
        w("")
        steps = list(next(iter(study["scratch"].values()))["evals"])
        w("| run | " + " | ".join(f"{int(s):,} iterations" for s in steps) + " |")
        w("| --- | " + " | ".join("---" for _ in steps) + " |")
        for key, e in study["scratch"].items():
            w(f"| {key} | " + " | ".join(f"{e['evals'][s]['bpd']:.4f} ({e['evals'][s]['heldout_loss']:.5f})"
                                         for s in steps) + " |")
        w("")
    if "table5" in study:
        w(f"**Table 5: structural bias**: off-diagonal statistics between {st['samples']:,} generated samples "
          f"(DDPM {st['sample_steps']} steps, the same noise for both models), base against DMP (seed "
          f"{st['seeds'][0]}).")
        w("")
        w("| model | metric | max | min | mean | std |")
        w("| --- | --- | --- | --- | --- | --- |")
        for model, name in (("base", "base"), ("dmp", "+ DMP")):
            for metric in ("correlation", "similarity"):
                v = study["table5"][model][metric]
                w(f"| {name} | {metric} | {v['max']:.4f} | {v['min']:.4f} | {v['mean']:.4f} | {v['std']:.4f} |")
        w("")
    if "gate" in study:
        g = study["gate"]
        w("**Fig. 5: the trained gate** (DMP, seed 0): one panel per block, rows timesteps from 990 (top) to 0 "
          "in steps of 10, columns the 16 prompts, each panel coloured from its smallest weight (dark blue) to its "
          "largest (yellow).")
        w("")
        w("![gate weights](assets/study/fig5_gate.png)")
        w("")
        w(f"The mixture's entropy relative to the uniform mixture's is {g['entropy_high_t']:.4f} at t ≥ 500 and "
          f"{g['entropy_low_t']:.4f} at t < 500 (1 is uniform); weights range from {g['min_over_uniform']:.3f} to "
          f"{g['max_over_uniform']:.3f} times 1/16." + (
              " The gate has hardly left its zero initialisation: every block mixes its prompts almost uniformly at "
              "every timestep, which is why removing the block index (4c) changes little here."
              if g["max_over_uniform"] < 1.05 and g["min_over_uniform"] > 0.95 else ""))
        w("")
    w(commands(study))
    w("")
    w("¹ FID: not computed. fid.py needs pytorch-fid's Inception weights (`pt_inception-2015-12-05-6726825d.pth`, "
      "downloaded once into the cache), which could not be fetched where this study ran; and an FID between 8×8 "
      "digits upsampled to 299×299 says little. The held-out bound is this scale's likelihood metric.")
    w("")
    w(FULL_SCALE)
    return "\n".join(L) + "\n"


def commands(study):
    """Every run and evaluation of the study as the command that made it."""
    st, methods = study["settings"], study["methods"]
    others = ", ".join(str(x) for x in st["seeds"][1:])
    L = ["**The commands** (each run with its own `--results-dir`; `python study.py` runs them all and skips what "
         "is finished):", "",
         "```bash"]
    if methods:
        L.append("# Tables 2, 3 and 7: one run per method" + (f", again with --seed {others}" if others else ""))
        L += [methods[m]["command"] for m in METHOD_NAMES if m in methods]
    if study["ablations"] and "dmp" in methods:
        L.append("# Table 4, Fig. 4: the DMP command above with the row's flags appended, e.g.")
        key = next(iter(study["ablations"]))
        L.append(methods["dmp"]["command"] + " " + " ".join(study["ablations"][key]["flags"]))
    if study["scratch"]:
        L.append("# Table 6")
        L += [e["command"] for e in study["scratch"].values()]
    L.append("# every evaluation (CKPT: a run's checkpoints/NNNNNNN.pt, or the base)")
    L.append(f"python study.py --evaluate CKPT --eval-out eval.json --bpd-images {st['bpd_images']} "
             f"[--samples {st['samples']} --sample-steps {st['sample_steps']}]")
    L.append("```")
    return "\n".join(L)


def verdict(study):
    """The honest sentence: did DMP beat the baselines and the base on held-out bits/dim at this scale?"""
    st, base, methods = study["settings"], study["base"], study["methods"]
    last = str(st["iterations"])
    final = {m: mean_std([r[last]["bpd"] for r in e["runs"].values()]) for m, e in methods.items()}
    ranked = sorted(final, key=lambda m: final[m][0])
    order = ", ".join(f"{METHOD_NAMES[m].strip('*')} {final[m][0]:.4f}" for m in ranked)
    better_than_base = [m for m in ranked if final[m][0] + final[m][1] < base["bpd"]]
    if "dmp" not in final:
        return f"Final held-out bits/dim, best first: {order} (base {base['bpd']:.4f})."
    d, s = final["dmp"]
    where = ranked.index("dmp") + 1
    head = (f"**At this scale DMP {'beat' if where == 1 else 'did not beat'} every baseline**: ranked {where} of "
            f"{len(ranked)} on final held-out bits/dim ({order}; base {base['bpd']:.4f}). ")
    if len(st["seeds"]) > 1:
        moved = (f"It {'improved on' if d + s < base['bpd'] else 'did not improve on'} the base by more than its "
                 f"seed-to-seed spread ({d - base['bpd']:+.4f} ± {s:.4f} bits/dim). ")
    else:
        moved = f"Its change from the base: {d - base['bpd']:+.4f} bits/dim (one seed, no spread). "
    others = ("Methods below the base by more than their spread: "
              + (", ".join(METHOD_NAMES[m].strip("*") for m in better_than_base) or "none") + ".")
    return head + moved + others


FULL_SCALE = """### At full scale: every row of the paper

Each block below is the complete path from images to the paper's number, with the project's commands (the paper's
settings are the presets' defaults: batch 128, AdamW lr 1e-4, no EMA when further-training, DDPM 250 steps,
guidance 1.5 where the model is conditional). A run folder is `runs/NNN-<dataset>-<method>`; substitute the
numbers your runs get. The reference sets, how they are built and what each FID command prints
are in "Evaluation" below.

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


def write_outputs(study, out, readme=None):
    """study.md and the figures in the folder out, and the README section in readme, all from study (study.json)."""
    out = Path(out)
    draw_figures(study, out)
    markdown = render(study)
    (out / "study.md").write_text(markdown)
    if readme:
        write_readme_section(Path(readme), markdown)
    return markdown


def write_readme_section(path, markdown):
    """Replace what lies between the study markers of the README with the rendered markdown."""
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"error: {path} has no '{README_BEGIN}' ... '{README_END}' markers for the study section")
    head, rest = text.split(README_BEGIN, 1)
    path.write_text(head + README_BEGIN + "\n" + markdown + README_END + rest.split(README_END, 1)[1])


def readme_section(path):
    """The README's study section as rendered (what write_readme_section put there)."""
    text = Path(path).read_text()
    return text.split(README_BEGIN + "\n", 1)[1].split(README_END, 1)[0]
