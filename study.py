"""
The paper in miniature: DMP against every further-training baseline, its ablations and its analyses, on the
bundled digits and the converged digits DiT (assets/dit_digits.pt), on CPU.

    python study.py               # the whole study: 52 minutes on 2 cores
    python study.py --quick       # the same tables from 1 seed and 300 iterations: 7 minutes
    python study.py --render      # study.md, the figures and the README section again from study.json alone

Every run is the project's own command, `python train.py --dataset digits --init assets/dit_digits.pt
--method ...` (study.md lists them), and every evaluation is `python study.py --evaluate CKPT`: the held-out
loss, the exact variational bound in bits/dim (all 1000 steps, train.evaluate) and the noise MSE per band of
100 timesteps, on fixed held-out images with fixed noise, so every model is measured on the same draws.
Runs live in --runs-dir; running the study again skips what is finished and resumes what was interrupted.
Results: --out/study.json, study.md, fig5_gate.png, pretraining_curve.png, and the README section between
the two study markers, which is study.md byte for byte.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import dmp
import train
from diffusion import create_diffusion, sample
from prepare_data import PreparedData

ROOT = Path(__file__).resolve().parent
BASE = "assets/dit_digits.pt"  # paths relative to ROOT, where every command runs
BASE_LOG = "assets/dit_digits.log.jsonl"
DATA, HOLDOUT = "assets/digits", 297  # the digits preset's held-out split (train.split)
README_BEGIN, README_END = "<!-- study:begin -->", "<!-- study:end -->"

# Table 2/3/7's methods in the paper's order, then the PEFT baselines of DiffFit's paper.
METHODS = ("full", "prompt", "dmp", "lora", "difffit", "bitfit")
METHOD_NAMES = dict(full="fine-tuning", prompt="prompt tuning (Eq. 2)", dmp="**DMP**", lora="LoRA (r 16)",
                    difffit="DiffFit", bitfit="BitFit")
# Table 4 (a-e), Fig. 4 and two of the options the paper mentions, each a DMP run differing from the default by its
# flags. The digits DiT has 16 tokens and 4 blocks: hard selection keeps 12 of 16 prompts (the paper's 192 of
# 256), prepend uses 3 prompts (the paper's 50 for 256 tokens, scaled), depth 1 and 2 are "first block" and "half".
ABLATIONS = {
    "4a: attention gate": ["--gate", "attention"],
    "4b: hard top-12 selection": ["--selection", "hard"],
    "4c: uniform (no block index)": ["--prompt-selection", "uniform"],
    "4d: prepend 3 prompts": ["--position", "prepend", "--num-prompts", "3"],
    "4e: IB 0, LB 0": ["--importance-coef", "0", "--load-coef", "0"],
    "4e: IB 0, LB 1": ["--importance-coef", "0"],
    "4e: IB 1, LB 0": ["--load-coef", "0"],
    "4e: IB 1, LB 2": ["--load-coef", "2"],
    "4e: IB 2, LB 1": ["--importance-coef", "2"],
    "Fig. 4: depth 1 of 4": ["--prompt-depth", "1"],
    "Fig. 4: depth 2 of 4": ["--prompt-depth", "2"],
    "random prompt init": ["--prompt-init", "random"],
    "authors' code (gate on t+c, scalar i, 10x gate lr, noisy gate)": ["--authors-code"],
}

FULL = dict(iterations=2000, eval_at=[250, 500, 1000, 2000], seeds=[0, 1, 2], bpd_images=100, samples=1000,
            scratch_iterations=3000, sample_steps=250)
QUICK = dict(iterations=300, eval_at=[100, 300], seeds=[0], bpd_images=32, samples=200, scratch_iterations=600,
             sample_steps=50)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 seed, 300 iterations, fewer images: a check in minutes")
    p.add_argument("--render", action="store_true",
                   help="only rewrite study.md, the figures and the README section from study.json")
    p.add_argument("--out", default="assets/study", help="study.json, study.md and the figures")
    p.add_argument("--runs-dir", default="runs/study", help="the training runs and their evaluations")
    p.add_argument("--readme", default="README.md", help="the file whose study section is rewritten ('' for none)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="runs at a time, each a process on one thread; 1 runs everything in this process")
    p.add_argument("--lr", type=float, default=1e-3, help="every method's (the base was pretrained at 1e-3)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    p.add_argument("--ablations", default="all", help="'all', 'none', or a comma-separated list of Table 4 keys")
    p.add_argument("--no-scratch", action="store_true", help="skip Table 6 (DMP from scratch)")
    for k, v in FULL.items():  # sizes: the full study's by default, --quick's with --quick, each overridable
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v) if not isinstance(v, list) else
                       (lambda s: [int(x) for x in s.split(",")]), help=f"full study: {v}; --quick: {QUICK[k]}")
    p.add_argument("--evaluate", metavar="CKPT", help="only evaluate one checkpoint (what each run's evaluations do)")
    p.add_argument("--eval-out", default="eval.json", help="with --evaluate: where its JSON goes")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.eval_at[-1] != args.iterations or sorted(args.eval_at) != args.eval_at:
        p.error("--eval-at must be increasing and end at --iterations")
    return args


#################################################################################
#                     Evaluation: one checkpoint, fixed draws                   #
#################################################################################

def evaluate_checkpoint(ckpt, bpd_images, samples=0, sample_steps=250):
    """
    Held-out loss (all 297 held-out digits, 4 fixed draws each), bits/dim and the noise MSE per band of 100
    timesteps (the first bpd_images of them, every timestep; train.evaluate), and `samples` generated images
    from fixed noise (for Table 5), as a dict.
    """
    model = dmp.load_model(ckpt).eval()
    data = PreparedData(DATA)
    _, heldout = train.split(data, HOLDOUT)
    settings = argparse.Namespace(unconditional=True, bpd_images=bpd_images)
    r = train.evaluate(model, create_diffusion("", "cosine"), data, heldout, settings, torch.device("cpu"), bpd=True)
    out = dict(heldout_loss=r["heldout_loss"], bpd=r["bpd"], mse_bands=r["mse_bands"])
    if samples:
        out["samples"] = generate(model, samples, sample_steps).tolist()
    return out


@torch.no_grad()
def generate(model, n, steps=250, seed=0):
    """n samples (n, C*H*W) by DDPM on `steps` respaced steps from noise fixed by seed: paired across models."""
    size, channels = model.config["input_size"], model.in_channels
    z = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # the noise of every step
    x = sample(model, create_diffusion(str(steps), "cosine"), z, torch.zeros(n, dtype=torch.long))
    return x.reshape(n, -1).double().numpy().round(6)


def structural_bias(x):
    """
    Table 5: max, min, mean and std of the off-diagonal Pearson correlations and cosine similarities between
    generated samples (rows of x), as the appendix computes them on 1,000 latents.
    """
    x = np.asarray(x, np.float64)
    off = ~np.eye(len(x), dtype=bool)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = {}
    for name, m in (("correlation", np.corrcoef(x)), ("similarity", unit @ unit.T)):
        v = m[off]
        out[name] = dict(max=float(v.max()), min=float(v.min()), mean=float(v.mean()), std=float(v.std()))
    return out


def gate_statistics(weights):
    """
    What Fig. 5 shows, as numbers: weights [blocks, timesteps, prompts] (dmp.gate_weights). The entropy of
    the mixture relative to the uniform one's (1: all prompts equal), at high noise (t >= 500) and low noise
    (t < 500) — the paper reads its Fig. 5 as broad mixtures at high t and specialised ones at low t — and
    the largest weight relative to uniform (1/N).
    """
    w = np.asarray(weights, np.float64)
    n = w.shape[-1]
    entropy = -(w * np.log(np.clip(w, 1e-30, None))).sum(-1) / np.log(n)  # [blocks, timesteps]
    half = w.shape[1] // 2
    return dict(entropy_high_t=float(entropy[:, half:].mean()), entropy_low_t=float(entropy[:, :half].mean()),
                max_over_uniform=float(w.max() * n), min_over_uniform=float(w.min() * n))


#################################################################################
#                          Runs: train.py, then evaluate                        #
#################################################################################

def train_flags(args, seed, method="dmp", extra=(), init=True, iterations=None, ckpt_every=None):
    """The train.py command line of one run (the digits preset; no EMA when further-training, as the paper)."""
    flags = ["--dataset", "digits", "--lr", str(args.lr), "--seed", str(seed), "--sample-every", "0",
             "--eval-every", "0", "--keep", "1000", "--log-every", "50"]
    if init:
        flags += ["--init", BASE, "--method", method, "--ema", "0"]
    elif method:
        flags += ["--method", method]
    it = iterations or args.iterations
    every = ckpt_every or np.gcd.reduce(args.eval_at)  # a checkpoint at every evaluated count
    return flags + ["--iterations", str(it), "--ckpt-every", str(every)] + list(extra)


def run_job(job, args):
    """
    One run: train.py (resumed if its folder holds checkpoints short of the end), then an evaluation of each
    checkpoint in job['eval_at'] not evaluated yet. Returns {step: metrics}. Everything lands in runs_dir/name.
    """
    folder = Path(args.runs_dir) / job["name"]
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    if job["flags"] is not None:
        runs = sorted(folder.glob("[0-9][0-9][0-9]-*"))
        done = train.checkpoints(runs[0]) if runs else []
        final = job["eval_at"][-1]
        if not done or int(done[-1].stem) < final:
            argv = job["flags"] + (["--resume", str(runs[0])] if done else []) + ["--results-dir", str(folder)]
            command(["train.py", *argv], args, folder / "train.out")
            runs = sorted(folder.glob("[0-9][0-9][0-9]-*"))
        results["log"] = str(runs[0] / "log.jsonl")
        ckpts = {s: runs[0] / "checkpoints" / f"{s:07d}.pt" for s in job["eval_at"]}
    else:
        ckpts = {0: Path(BASE)}
    for step, ckpt in ckpts.items():
        out = folder / f"eval-{step:07d}.json"
        samples = job.get("samples", 0) if step == max(ckpts) else 0
        if not out.exists():
            command(["study.py", "--evaluate", str(ckpt), "--eval-out", str(out), "--bpd-images", str(args.bpd_images),
                     "--samples", str(samples), "--sample-steps", str(args.sample_steps)], args, folder / "eval.out")
        results[step] = json.loads(out.read_text())
    return results


def command(argv, args, log):
    """Run `python argv` from the repository root: in a process of its own on one thread (--jobs > 1) or here."""
    if args.jobs > 1:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        with open(log, "a") as f:
            done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            raise RuntimeError(f"`python {' '.join(argv)}` failed (exit {done.returncode}); its output: {log}")
    elif argv[0] == "train.py":
        train.main(argv[1:])
    else:
        main(argv[1:])


def jobs_of(args):
    """Every run of the study: (group, key, seed) -> job."""
    jobs = {("base", "base", 0): dict(name="base", flags=None, eval_at=[0], samples=args.samples)}
    for method in args.methods.split(","):
        for seed in args.seeds:
            jobs[("method", method, seed)] = dict(
                name=f"{method}-s{seed}", flags=train_flags(args, seed, method), eval_at=args.eval_at,
                samples=args.samples if (method, seed) == ("dmp", args.seeds[0]) else 0)
    ablations = dict(all=list(ABLATIONS), none=[]).get(args.ablations) or args.ablations.split(",")
    for i, key in enumerate(ablations):
        jobs[("ablation", key, args.seeds[0])] = dict(name=f"ablation-{i:02d}", flags=train_flags(
            args, args.seeds[0], "dmp", ABLATIONS[key]), eval_at=[args.iterations])
    if not args.no_scratch:  # Table 6: the base's recipe, with and without DMP from step 0; EMA 0.99, not the
        # base's 0.999, whose average would still hold 37% of the initial weights at the first evaluation
        n = args.scratch_iterations
        at = [n // 3, 2 * n // 3, n]
        for key, method in (("pretraining", None), ("pretraining + DMP", "dmp")):
            flags = train_flags(args, args.seeds[0], method, ["--ema", "0.99"], init=False, iterations=n,
                                ckpt_every=n // 3)
            jobs[("scratch", key, args.seeds[0])] = dict(name=f"scratch-{method or 'plain'}", eval_at=at, flags=flags)
    return jobs


def run_all(args):
    jobs = jobs_of(args)
    results = {}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool, tqdm(total=len(jobs), desc="study runs", unit="run") as bar:
        futures = {key: pool.submit(run_job, job, args) for key, job in jobs.items()}
        for key, future in futures.items():
            results[key] = future.result()
            bar.update(1)
    return jobs, results


#################################################################################
#                         Collecting, tables, figures                           #
#################################################################################

def started(log):
    """The start event of a train.py log: trained and total parameter counts."""
    with open(log) as f:
        return json.loads(f.readline())


def collect(args, jobs, results, minutes=None, reused=0):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = lambda r: {k: r[k] for k in ("heldout_loss", "bpd", "mse_bands")}  # noqa: E731
    base = results[("base", "base", 0)][0]
    study = dict(
        date=datetime.date.today().isoformat(), command="python study.py" + (" --quick" if args.quick else ""),
        torch=torch.__version__, wall_minutes=minutes, jobs=args.jobs, cpus=os.cpu_count(), reused_evaluations=reused,
        settings=dict(iterations=args.iterations, eval_at=args.eval_at, seeds=args.seeds, lr=args.lr, batch_size=128,
                      heldout_images=HOLDOUT, bpd_images=args.bpd_images, samples=args.samples,
                      sample_steps=args.sample_steps, scratch_iterations=args.scratch_iterations),
        base=metrics(base), pretraining=pretraining_curve(), methods={}, ablations={}, scratch={})
    for (group, key, seed), r in results.items():
        job = jobs[(group, key, seed)]
        if group == "method":
            entry = study["methods"].setdefault(key, dict(command="python train.py " + " ".join(job["flags"]), runs={}))
            s = started(r["log"])
            entry.update(trained=s["trained_parameters"], total=s["total_parameters"])
            entry["runs"][str(seed)] = {str(step): metrics(r[step]) for step in job["eval_at"]}
        elif group == "ablation":
            study["ablations"][key] = dict(flags=ABLATIONS[key], **metrics(r[job["eval_at"][-1]]))
        elif group == "scratch":
            study["scratch"][key] = dict(command="python train.py " + " ".join(job["flags"]),
                                         evals={str(step): metrics(r[step]) for step in job["eval_at"]})
    dmp_key = ("method", "dmp", args.seeds[0])
    if dmp_key in results:
        samples_dmp = results[dmp_key][args.iterations]["samples"]
        study["table5"] = dict(base=structural_bias(base["samples"]), dmp=structural_bias(samples_dmp))
        ckpt = next((Path(results[dmp_key]["log"]).parent / "checkpoints").glob(f"{args.iterations:07d}.pt"))
        weights = dmp.gate_weights(dmp.load_model(ckpt), timesteps=torch.arange(0, 1000, 10))
        study["gate"] = dict(gate_statistics(weights), timesteps=list(range(0, 1000, 10)),
                             weights=weights.astype(np.float64).round(7).tolist())
    study["fid"] = None  # see render: no Inception weights can be fetched here
    return study


def pretraining_curve():
    """[(step, held-out loss of the EMA model)] from the base's training log."""
    with open(ROOT / BASE_LOG) as f:
        return [(e["step"], e["heldout_loss"]) for e in map(json.loads, f) if e.get("event") == "eval"]


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


def fmt(values, digits=4, scale=1.0):
    m, s = mean_std(np.asarray(values) * scale)
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
      f"held-out 8×8 images) and the converged digits DiT of the demo (`{BASE}`, 0.33M parameters). Produced by "
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
        for m in METHODS:
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
        for m in METHODS:
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
        L.append(f"# Tables 2, 3 and 7: one run per method" + (f", again with --seed {others}" if others else ""))
        L += [methods[m]["command"] for m in METHODS if m in methods]
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
numbers your runs get. FID reference statistics: the paper does not say which set it used; these take the
training images (FFHQ, ImageNet's ADM reference batch) or the validation images (COCO) as fid.py reads them.

**FFHQ 256, DiT-B/2** (Tables 2, 4, 7, Fig. 4; pretrained 600K, further-trained 30K): base 6.27; fine-tuning
6.57, prompt tuning 6.81, LoRA 7.11, DMP 5.87. Table 4's rows add `--gate attention` (6.41), `--selection hard`
(5.96), `--prompt-selection uniform` (5.97), `--position prepend --num-prompts 50` (6.79), `--importance-coef 0
--load-coef 0` (6.11); Fig. 4: `--prompt-depth 1` and `--prompt-depth 6`.

```bash
python prepare_data.py ~/data/ffhq/images1024x1024 data/ffhq256
python fid.py ~/data/ffhq/images1024x1024 --save-stats data/ffhq-fid-stats.npz
python train.py --dataset ffhq --model DiT-B/2 --iterations 600000                    # runs/000-ffhq-pretrain
python train.py --dataset ffhq --init runs/000-ffhq-pretrain/checkpoints/0600000.pt --method dmp --iterations 30000
#                                    (--method full | prompt | lora for the other rows)
python sample.py --ckpt runs/001-ffhq-dmp/checkpoints/0030000.pt --num-samples 50000 --out samples/ffhq-b2-dmp
python fid.py data/ffhq-fid-stats.npz samples/ffhq-b2-dmp.npz
```

**FFHQ 256, DiT-L/2** (Table 3; pretrained 250K, then +10K ... +50K): base 6.26; at +50K fine-tuning 6.80,
prompt tuning 6.51, DMP 5.61. `--ckpt-every 10000 --keep 5` keeps every column's checkpoint.

```bash
python train.py --dataset ffhq --model DiT-L/2 --iterations 250000                    # runs/002-ffhq-pretrain
python train.py --dataset ffhq --init runs/002-ffhq-pretrain/checkpoints/0250000.pt --method dmp \\
    --iterations 50000 --ckpt-every 10000 --keep 5
python sample.py --ckpt runs/003-ffhq-dmp/checkpoints/0050000.pt --num-samples 50000 --out samples/ffhq-l2-dmp
python fid.py data/ffhq-fid-stats.npz samples/ffhq-l2-dmp.npz
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
python sample.py --ckpt runs/001-coco-dmp/checkpoints/0040000.pt --prompt-file coco_val2014_captions.txt \\
    --num-samples 30000 --out samples/coco-dmp
python fid.py coco_val2014_256.npz samples/coco-dmp.npz       # val2014 images centre-cropped to 256, as arr_0
```

**ImageNet 256, DiT-XL/2** (Tables 8, 9; the official 7M-step model, further-trained 20K): base 2.29 (precision
0.83, recall 0.57); fine-tuning 5.04, prompt tuning 2.77, DMP 2.25 (0.83, 0.57); `--gate-cond t+c`: 2.25.

```bash
python prepare_data.py ~/data/imagenet/train data/imagenet256 --labels folders
python train.py --dataset imagenet --init DiT-XL-2-256x256.pt --method dmp --iterations 20000
python sample.py --ckpt runs/000-imagenet-dmp/checkpoints/0020000.pt --num-samples 50000 --out samples/in-dmp
python fid.py VIRTUAL_imagenet256_labeled.npz samples/in-dmp.npz --pr     # ADM's reference batch
```

**Stable Diffusion 1.5 on LAION 512** (Table 2; further-trained 50K): base 47.18; fine-tuning 52.99, prompt
tuning 35.93, DMP 35.44 (PNDM 50 steps, guidance 7.5).

```bash
python prepare_data.py ~/laion/shards data/laion512 --resolution 512 --captions txt
python train.py --dataset laion --model sd15 --init v1-5-pruned-emaonly.safetensors --method dmp --iterations 50000
python sample.py --model sd15 --ckpt runs/000-laion-dmp/checkpoints/0050000.pt --prompt-file laion_captions.txt \\
    --num-samples 30000 --out samples/laion-dmp
python fid.py laion_ref_512.npz samples/laion-dmp.npz
```"""


def write_outputs(study, args):
    """study.md, the figures and the README section, all from the study dict (study.json)."""
    out = Path(args.out)
    draw_figures(study, out)
    markdown = render(study)
    (out / "study.md").write_text(markdown)
    if args.readme:
        write_readme_section(Path(args.readme), markdown)
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


def main(argv=None):
    args = parse_args(argv)
    if args.evaluate:
        result = evaluate_checkpoint(args.evaluate, args.bpd_images, args.samples, args.sample_steps)
        tmp = Path(f"{args.eval_out}.tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, args.eval_out)
        return
    out = Path(args.out)
    if args.render:
        study = json.loads((out / "study.json").read_text())
        write_outputs(study, args)
        print(f"rewrote {out / 'study.md'}" + (f" and {args.readme}" if args.readme else ""))
        return
    reused = len(list(Path(args.runs_dir).glob("*/eval-*.json")))  # finished by an earlier invocation
    start = time.time()
    jobs, results = run_all(args)
    study = collect(args, jobs, results, round((time.time() - start) / 60, 1), reused)
    tmp = out / "study.json.tmp"
    tmp.write_text(json.dumps(study, indent=1) + "\n")
    os.replace(tmp, out / "study.json")
    print(write_outputs(study, args))


if __name__ == "__main__":
    main()
