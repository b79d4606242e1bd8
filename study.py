"""
The paper's question in miniature, asked so that it can be answered: does mixing prompts by
timestep (DMP's gate, Eq. 3) add anything over prompt tuning with one shared set, when a converged
model is further trained on its own data? On the bundled digits and a 25K-parameter DiT pretrained
on them (assets/study/base.pt; the study reports whether it is converged and how much better it
fits its training digits than held-out ones), on CPU. Every image a run trains on, the base's
pretraining included, gets a fresh random transformation (train.py --augment: dataset.augment),
and every digit a model is measured on a fixed one (heldout.fixed_draws), the same for every
model: without it, a DiT of this size trained until its held-out loss is flat fits its 1,500
training digits several percent better than new ones, and further training on them can only fit
them harder.

    python study.py             # everything: 79 minutes on 2 cores with the committed base
                                # (its stage 1 passes: 120 runs); about 50 more minutes to
                                # pretrain the base when assets/study/base.pt is missing
    python study.py --quick     # the same pipeline from 2 seeds, 100 iterations, 2 learning
                                # rates: 1.5 minutes (all of it in runs/study-quick)
    python study.py --render    # study.md, docs/study.md, the README's results and the figures again

Stage 1, the positive control, comes first: prompts kept separate per band of timesteps (dmp.py's
time_bands), which add capacity specific to the timestep by construction, against the control, one
shared prompt set (prompt tuning, Eq. 2). If the positive control does not beat the control, the
setup cannot detect the kind of effect the paper claims, and the study stops there. Stage 2, the
arms that separate the mechanisms: DMP as the paper sets it; DMP with its gate free to move (no
importance loss: Eqs. 12-13, computed per sample as in the authors' code, pull every mixture
towards uniform); the same free gate blind to t (its bias and block index only, one fixed mixture
per block: what the free gate gains over it is what mixing by timestep adds, not a rescaling of
the prompts); the authors' gate (10x lr, noisy). Then, reported without a verdict, the other
further-training methods (Tables 2, 3, 7), Table 4's ablations, Table 6 (DMP from scratch), Table
5 and Fig. 5. No run averages its weights (--ema 0 for every further-training run: 1,000
iterations are too few for an average with decay 0.999, which would still hold 37% of the base).

When a difference counts, fixed before any number of this study was seen: the primary metric is
the held-out loss on the test split (149 of the 297 held-out digits, 4 fixed draws of t and noise
each, the same draws for every model); bits/dim, FD and KID are secondary. Every row's learning
rate is chosen on the validation split (the other 148 held-out digits), from lr times 1, 1/4, 1/16,
1/64 and 1/256, with one run per candidate (seed 100), as the one with the lowest validation loss.
The test runs use seeds 0 to 4, paired across rows (seed s gives every row the same batches,
timesteps and noise). Row A against row B: d_s = A_s - B_s over the seeds, and the interval
mean(d) +/- t sd(d) / sqrt(n), t Student's quantile at 1 - 0.05 / (2m), m the number of primary
comparisons of the stage (Bonferroni; stage 1 is tested first, stage 2 only if it passes, so the
familywise error stays 5%). Stage 1 (m = 1): the positive control beats the control when its
interval lies below zero; if it does not, the verdict is that this setup cannot tell, and the study
stops. If it does, the equivalence margin is half the smallest improvement its interval allows
(half the distance from zero to its upper end): a difference smaller than half of what prompts
specific to the timestep certainly gain is no difference. Stage 2 (m = 5: DMP, the free gate, the
t-blind gate and the authors' gate against the control, and the free gate against the t-blind gate)
decides each comparison: better (interval below zero), worse (above zero), equivalent (inside
plus or minus the margin), otherwise cannot tell; an interval below zero that is also inside the
margin is better, by less than the margin. Secondary metrics and the other methods get the paired
95% interval, uncorrected, and no verdict.

Runs live in --runs-dir; running the study again skips what is finished and resumes what was
interrupted. Results: --out/study.json, and from it (study_report.py) the figures and study.md in
--out and, for the default --out, the section of docs/study.md between its two study markers and
the README's results in brief between theirs.
"""
import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

import digits_fid
import dmp
import heldout
import load
import training
from checkpoints import atomic_save, file_sha256, read_state_dict, write_json
from diffusion import create_diffusion
from dataset import AUGMENT, PreparedData
from settings import parse_args as train_settings
from study_report import write_outputs

ROOT = Path(__file__).resolve().parent
OUT, DOC = "assets/study", "docs/study.md"  # the committed results, and the page that shows them
QUICK_OUT = "runs/study-quick"  # --quick's results and runs
BASE = "assets/study/base.pt"  # paths relative to ROOT, where every command runs
BASE_LOG = "assets/study/base.log.jsonl"
BASE_ENTRIES = ("ema", "config", "noise_schedule", "vae", "step")  # what the base file keeps
DATA, HOLDOUT = "assets/digits", digits_fid.HOLDOUT  # the digits presets' held-out split
VALIDATION = 148  # the first 148 held-out digits choose learning rates; the other 149 test
README = "README.md"  # its results in brief, between study_report.BRIEF's markers
N_PROMPTS = 16  # the digits DiT's tokens (8x8 pixels, 2x2 patches): DMP mixes 16 prompts a block
BANDS = 4  # the positive control's bands of timesteps: 0-249, 250-499, 500-749, 750-999
ALPHA = 0.05
# The base: the digits preset (AdamW, batch 128, EMA 0.999) with --augment at lr 1e-3 on the
# 25K-parameter digits DiT for 60K steps (the study shows its curve and its gap).
BASE_MODEL, BASE_ITERATIONS = "digits-tiny", 60000
PRETRAIN = ["--dataset", "digits", "--model", BASE_MODEL, "--augment", "--lr", "1e-3", "--iterations",
            str(BASE_ITERATIONS), "--eval-every", "1000", "--sample-every", "0", "--ckpt-every", "2000"]
# What every further-training run trains on, as the base did (tested against its log), and how
# measured_as measures every model: the digits preset, every training image freshly transformed.
DATA_FLAGS = ["--dataset", "digits", "--augment"]

# key: (label, train.py flags). Stage 1: the control and the positive control.
STAGE1 = {
    "control": ("prompt tuning (Eq. 2; the control)", ["--method", "prompt"]),
    "bands": (f"prompts per band of t ({BANDS} bands; the positive control)",
              ["--method", "prompt", "--time-bands", str(BANDS)]),
}
# Stage 2: the arms that separate mixing by timestep from amplification.
STAGE2 = {
    "dmp": ("**DMP** (as the paper sets it)", ["--method", "dmp"]),
    "dmp-free": ("DMP, gate free to move (no importance loss)",
                 ["--method", "dmp", "--importance-coef", "0"]),
    "dmp-t-blind": ("DMP, free gate blind to t", ["--method", "dmp", "--importance-coef", "0",
                                                  "--gate-cond", "none"]),
    "dmp-authors": ("DMP, the authors' gate (10x lr, noisy)",
                    ["--method", "dmp", "--gate-lr-scale", "10", "--noisy-gate"]),
}
PRIMARY = {1: [("bands", "control")],
           2: [("dmp", "control"), ("dmp-free", "control"), ("dmp-t-blind", "control"),
               ("dmp-authors", "control"), ("dmp-free", "dmp-t-blind")]}
# Reported without a verdict: the paper's other further-training methods (Tables 2, 3 and 7).
OTHERS = {
    "full": ("fine-tuning", ["--method", "full"]),
    "lora": ("LoRA (r 16)", ["--method", "lora"]),
    "lora-dmp": ("LoRA at DMP's size (r 1)", ["--method", "lora", "--lora-rank", "dmp"]),
    "difffit": ("DiffFit", ["--method", "difffit"]),
    "bitfit": ("BitFit", ["--method", "bitfit"]),
}
ROWS = {**STAGE1, **STAGE2, **OTHERS}
MOVING = "dmp-free"  # the DMP row whose Fig. 5 is drawn beside the default's
# Table 4 (a-e), Fig. 4 and an option the paper mentions, each a DMP run differing from the default
# by its flags (seed 0, DMP's learning rate). The digits DiT has 16 tokens and 4 blocks: hard
# selection keeps 12 of 16 prompts (the paper's 192 of 256), prepend uses 3 prompts (the paper's 50
# for 256 tokens, scaled), depth 1 and 2 are "first block" and "half".
ABLATIONS = {
    "4a: attention gate": ["--gate", "attention"],
    "4b: hard top-12 selection": ["--selection", "hard"],
    "4c: uniform (no block index)": ["--prompt-selection", "uniform"],
    "4d: prepend 3 prompts": ["--position", "prepend", "--num-prompts", "3"],
    "4e: IB 2, LB 1": ["--importance-coef", "2"],
    "Fig. 4: depth 1 of 4": ["--prompt-depth", "1"],
    "Fig. 4: depth 2 of 4": ["--prompt-depth", "2"],
    "random prompt init": ["--prompt-init", "random"],
}
# Table 4e's other rows are not run: Eq. 11's load counts softmax weights below zero, of which
# there are none, so under soft selection the LB coefficient multiplies zero, and (IB 1, LB 0),
# (IB 1, LB 2) are the default run, (IB 0, LB 0), (IB 0, LB 1) the "dmp-free" run, to the last digit.
TABLE_4E = {"4e: IB 0, LB 0": "dmp-free", "4e: IB 0, LB 1": "dmp-free", "4e: IB 1, LB 0": "dmp",
            "4e: IB 1, LB 2": "dmp"}
LIKELIHOOD = ("heldout_loss", "bpd")
QUALITY = ("fd_train", "kid_train", "fd_heldout", "kid_heldout")
GATE_TIMESTEPS = list(range(0, 1000, 10))
# The rule as this docstring states it (one copy): study.json and docs/study.md carry it.
RULE = " ".join(__doc__.split("When a difference counts, fixed before any number of this study was "
                              "seen: ")[1].split("\n\n")[0].split())

FULL = dict(iterations=1000, seeds=[0, 1, 2, 3, 4], lr_scales=[1, 1 / 4, 1 / 16, 1 / 64, 1 / 256],
            bpd_images=100, sample_sets=3, sample_steps=100, scratch_iterations=3000)
QUICK = dict(iterations=100, seeds=[0, 1], lr_scales=[1, 1 / 16], bpd_images=8, sample_sets=1,
             sample_steps=10, scratch_iterations=150)
VALIDATION_SEED = 100
# What a run or an evaluation depends on besides its row, seed and learning rate (bind_runs_dir)
RUN_SETTINGS = ("iterations", "lr", "bpd_images", "sample_sets", "sample_steps", "scratch_iterations")


def parse_args(argv=None):
    """The command line; the sizes are the full study's, or --quick's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="2 seeds, 100 iterations, 2 learning rates: a check in minutes")
    p.add_argument("--render", action="store_true",
                   help="only rewrite study.md, the figures, docs/study.md and the README's results "
                        "from study.json")
    p.add_argument("--out", help=f"study.json, study.md and the figures (default {OUT}, the "
                   f"committed results; with --quick {QUICK_OUT}, so a check never overwrites them)")
    p.add_argument("--runs-dir", help="the runs and their evaluations (default runs/study, with "
                   f"--quick {QUICK_OUT}/runs), bound to one base and one RUN_SETTINGS")
    p.add_argument("--doc", default=None,
                   help="the file whose study section is rewritten ('' for none; default: "
                        f"{DOC} when --out is {OUT}, none otherwise)")
    p.add_argument("--readme", default=None,
                   help="the file whose results in brief are rewritten ('' for none; default: "
                        f"{README} when --out is {OUT}, none otherwise)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="runs at a time, each a process on one thread; 1 runs everything here")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="the learning rate the scales multiply (the base was pretrained at 1e-3)")
    p.add_argument("--rows", default=",".join(ROWS),
                   help="a comma-separated subset of the rows (stage 1's two are always run)")
    p.add_argument("--ablations", default="all",
                   help="'all', 'none', or a comma-separated list of Table 4 keys")
    p.add_argument("--no-scratch", action="store_true", help="skip Table 6 (DMP from scratch)")
    for k, v in FULL.items():  # sizes: the full study's, --quick's with --quick, each overridable
        kind = float_list if k == "lr_scales" else int_list if isinstance(v, list) else type(v)
        p.add_argument(f"--{k.replace('_', '-')}", type=kind,
                       help=f"full study: {v}; --quick: {QUICK[k]}")
    p.add_argument("--evaluate", metavar="CKPT",
                   help="only evaluate one checkpoint (what each run's evaluations do)")
    p.add_argument("--split", choices=["validation", "test"], default="test",
                   help="with --evaluate: the held-out digits it is measured on")
    p.add_argument("--eval-out", default="eval.json", help="with --evaluate: where its JSON goes")
    p.add_argument("--keep-samples", action="store_true",
                   help="with --evaluate: store the samples (Table 5)")
    p.add_argument("--floor", action="store_true",
                   help="with --evaluate: also the held-out digits' own FD and KID, and the loss "
                        "on training digits with the test split's draws (the base's gap)")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}: choose from {', '.join(ROWS)}")
    if len(args.seeds) < 2:
        p.error("--seeds needs at least two: the rule's interval is over paired seeds")
    if VALIDATION_SEED in args.seeds:
        p.error(f"seed {VALIDATION_SEED} chooses the learning rates: test with others")
    args.out = args.out or (QUICK_OUT if args.quick else OUT)
    args.runs_dir = args.runs_dir or (f"{QUICK_OUT}/runs" if args.quick else "runs/study")
    committed = Path(args.out).resolve() == (ROOT / OUT).resolve()
    if args.doc is None:  # a --quick or trial run elsewhere leaves the committed pages alone
        args.doc = str(ROOT / DOC) if committed else ""
    if args.readme is None:
        args.readme = str(ROOT / README) if committed else ""
    return args


def int_list(text):
    """'1,2,3' -> [1, 2, 3] (--seeds)."""
    return [int(x) for x in text.split(",")]


def float_list(text):
    """'1,0.25' -> [1.0, 0.25] (--lr-scales)."""
    return [float(x) for x in text.split(",")]


#################################################################################
#                    Evaluation: one checkpoint, fixed draws                    #
#################################################################################

def splits(data):
    """The training rows, and the held-out rows cut into validation and test."""
    train_rows, heldout_rows = training.split(data, HOLDOUT)
    return train_rows, heldout_rows[:VALIDATION], heldout_rows[VALIDATION:]


def measured_as(bpd_images=0):
    """The settings heldout.evaluate reads (unconditional; with --augment, fixed draws on every
    digit measured): train.py's for DATA_FLAGS, what the base and every run train with."""
    return argparse.Namespace(**{**vars(train_settings(DATA_FLAGS)), "bpd_images": bpd_images})


def evaluate_checkpoint(ckpt, split="test", bpd_images=0, sample_sets=0, sample_steps=100,
                        keep_samples=False, floor=False):
    """
    The held-out loss on `split` (every digit of it, 4 fixed draws each); on the test split also
    bits/dim and the noise MSE per band of 100 timesteps (its first bpd_images digits, every
    timestep; heldout.evaluate), for a DMP model its gate at 100 timesteps (gate_statistics), and
    with sample_sets FD and KID of sample_sets x 297 samples (digits_fid.SampleQuality: against
    the training digits and all 297 held-out digits; no learning rate is chosen by them), the
    samples themselves with keep_samples (Table 5); with floor, the held-out digits' own FD and KID
    and the loss of as many training digits with the test split's draws. A dict.
    """
    model = load.load_model(ckpt).eval()
    data = PreparedData(DATA)
    train_rows, validation_rows, test_rows = splits(data)
    rows = validation_rows if split == "validation" else test_rows
    settings = measured_as(bpd_images)
    diffusion = create_diffusion("", "cosine")
    test = split == "test"
    r = heldout.evaluate(model, diffusion, data, rows, settings, torch.device("cpu"),
                         bpd=test and bpd_images > 0, per_image=floor)
    out = {k: r[k] for k in ("heldout_loss", "bpd", "mse_bands") if k in r}
    if not test:
        return out
    mop = model.block_input
    if isinstance(mop, dmp.MixtureOfPrompts) and mop.gate_type is not None:
        out["gate"] = gate_statistics(dmp.gate_weights(model, timesteps=GATE_TIMESTEPS))
    if floor:
        out.update(gap(model, diffusion, data, train_rows, r["losses"], settings))
    if sample_sets:
        images = [heldout.fixed_draws(data.batch(rows, False)[0], settings, 0) for rows in (
            train_rows, np.sort(np.concatenate([validation_rows, test_rows])))]
        quality = digits_fid.SampleQuality(digits_fid.load_classifier(), *images, replicates=0,
                                           chunks=sample_sets)
        x = digits_fid.generate(model, sample_sets * HOLDOUT, sample_steps)
        out["quality"] = point(quality.of_samples(x))
        if floor:
            out["floor"] = point(quality.floor())
        if keep_samples:
            out["samples"] = x.reshape(len(x), -1).double().numpy().round(6).tolist()
    return out


def gap(model, diffusion, data, train_rows, test_losses, settings):
    """
    The base's loss on the training digits with the test split's draws: every training digit, in
    groups as large as the test split, each group given the test split's draws (seeded by
    position), so test digit i and training digit i of each group share t and noise. train_loss:
    their mean; gap_se: the standard error of the test-minus-training difference over the paired
    positions, relative to train_loss (what the gap's percentage is uncertain by).
    """
    n = len(test_losses)
    groups = [heldout.evaluate(model, diffusion, data, train_rows[k * n:(k + 1) * n], settings,
                               torch.device("cpu"), per_image=True)["losses"]
              for k in range(len(train_rows) // n)]
    train = np.mean(groups, axis=0)
    d = np.asarray(test_losses) - train
    return dict(train_loss=float(train.mean()), train_digits=len(groups) * n,
                gap_se=float(d.std(ddof=1) / np.sqrt(n) / train.mean()))


def point(measured):
    """FD and KID, without the (empty) bootstrap replicates."""
    return {m: measured[m] for m in QUALITY if m in measured}


def structural_bias(x):
    """
    Table 5: max, min, mean and std of the off-diagonal Pearson correlations and cosine similarities
    between generated samples (rows of x), as the appendix computes them on 1,000 latents.
    """
    x = np.asarray(x, np.float64)
    off = ~np.eye(len(x), dtype=bool)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = {}
    for name, m in (("correlation", np.corrcoef(x)), ("similarity", unit @ unit.T)):
        v = m[off]
        out[name] = dict(max=float(v.max()), min=float(v.min()), mean=float(v.mean()),
                         std=float(v.std()))
    return out


def gate_statistics(weights):
    """
    What Fig. 5 shows, as numbers: weights [blocks, timesteps, prompts] (dmp.gate_weights). How far
    the gate moved from uniform (dmp.gate_movement: max and mean |N g - 1|, entropy relative to
    uniform, total variation across timesteps), and the entropy at high noise (t >= 500) and low
    noise (t < 500): the paper reads its Fig. 5 as broad mixtures at high t, specialised at low t.
    """
    w = np.asarray(weights, np.float64)
    entropy = -(w * np.log(np.clip(w, 1e-30, None))).sum(-1) / np.log(w.shape[-1])  # [L, T]
    half = w.shape[1] // 2
    return dict(dmp.gate_movement(torch.from_numpy(w), time_axis=1),
                entropy_high_t=float(entropy[:, half:].mean()),
                entropy_low_t=float(entropy[:, :half].mean()))


#################################################################################
#                       The rule: paired intervals, verdicts                    #
#################################################################################

def paired_interval(a, b, m=1, alpha=ALPHA):
    """
    Row a against row b over paired seeds (b may be one value, a row without seeds): the mean of
    d = a - b, and its interval mean +/- t sd(d) / sqrt(n) with t Student's quantile at
    1 - alpha / (2m) (Bonferroni over m comparisons).
    """
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mean = float(d.mean())
    half = float(stats.t.ppf(1 - alpha / (2 * m), len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return dict(diff=mean, interval=[mean - half, mean + half], level=1 - alpha / m)


def decide(interval, margin=None):
    """The rule's word for an interval of a - b (lower is better), given the margin (or none)."""
    lo, hi = interval
    inside = margin is not None and -margin < lo and hi < margin
    if hi < 0:
        return "better, by less than the margin" if inside else "better"
    if lo > 0:
        return "worse, by less than the margin" if inside else "worse"
    return "equivalent" if inside else "cannot tell"


def margin_of(stage1):
    """Half the smallest improvement stage 1's interval allows; None when it did not pass."""
    hi = stage1["interval"][1]
    return 0.5 * -hi if hi < 0 else None


def passes_stage1(rows, seeds):
    """Whether the positive control beats the control by the rule (what decisions finds)."""
    (a, b), = PRIMARY[1]
    return margin_of(paired_interval(per_seed(rows[a], "heldout_loss", seeds),
                                     per_seed(rows[b], "heldout_loss", seeds))) is not None


def per_seed(row, metric, seeds):
    """A row's values of a metric over the seeds, in order."""
    if metric in QUALITY:
        return [row["quality"][str(s)][metric] for s in seeds]
    return [row["runs"][str(s)][metric] for s in seeds]


def decisions(study):
    """
    Every comparison the rule makes, from the rows' per-seed values alone: the primary ones (held-out
    loss, corrected, decided) and the secondary ones (every metric of the primary pairs and every
    row against the base: 95%, uncorrected, no verdict).
    """
    rows, seeds = study["rows"], study["settings"]["seeds"]
    out, margin = [], None
    for stage in (1, 2):
        pairs = [(a, b) for a, b in PRIMARY[stage] if a in rows and b in rows]
        if stage == 2 and margin is None:
            break
        for a, b in pairs:
            c = dict(stage=stage, a=a, b=b, metric="heldout_loss", m=len(PRIMARY[stage]),
                     **paired_interval(per_seed(rows[a], "heldout_loss", seeds),
                                       per_seed(rows[b], "heldout_loss", seeds),
                                       len(PRIMARY[stage])))
            c["decision"] = decide(c["interval"], margin)
            out.append(c)
            if stage == 1:
                margin = margin_of(c)
    secondary = [dict(stage=0, a=c["a"], b=c["b"], metric=metric, m=1,
                      **paired_interval(per_seed(rows[c["a"]], metric, seeds),
                                        per_seed(rows[c["b"]], metric, seeds)))
                 for c in out for metric in ("bpd", *QUALITY)]
    for key, row in rows.items():
        for metric in ("heldout_loss", "bpd", "fd_heldout"):
            base = study["base"][metric] if metric in LIKELIHOOD else study["base"]["quality"][
                metric]
            secondary.append(dict(stage=0, a=key, b="base", metric=metric, m=1,
                                  **paired_interval(per_seed(row, metric, seeds), base)))
    return dict(margin=margin, stopped=margin is None, comparisons=out + secondary)


#################################################################################
#                         Runs: train.py, then evaluate                         #
#################################################################################

def train_flags(args, seed, extra=(), lr_scale=1.0, init=True, iterations=None, ckpt_every=None):
    """The train.py command line of one run (the digits preset; no EMA when further-training)."""
    flags = [*DATA_FLAGS, "--lr", str(args.lr), "--seed", str(seed),
             "--sample-every", "0", "--eval-every", "0", "--keep", "1000", "--log-every", "50"]
    if init:
        flags += ["--init", BASE, "--ema", "0", "--lr-scale", repr(lr_scale)]
    it = iterations or args.iterations
    every = ckpt_every or max(1, it // 2)  # a checkpoint halfway: an interrupted run resumes
    return flags + list(extra) + ["--iterations", str(it), "--ckpt-every", str(every)]


def run_job(job, args):
    """
    One run: train.py (resumed if its folder holds checkpoints short of the end), then an evaluation
    of each checkpoint in job['eval_at'] not evaluated yet. Returns {step: evaluation} and the run's
    log. Everything lands in runs_dir/name.
    """
    folder = Path(args.runs_dir) / job["name"]
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    if job["flags"] is not None:
        run = train(folder, job["flags"], job["eval_at"][-1], args)
        results["log"] = str(run / "log.jsonl")
        ckpts = {s: run / "checkpoints" / f"{s:07d}.pt" for s in job["eval_at"]}
    else:
        ckpts = {0: Path(BASE)}
    for step, ckpt in ckpts.items():
        out = folder / f"eval-{job['split']}-{step:07d}.json"
        if not out.exists():
            argv = ["study.py", "--evaluate", str(ckpt), "--eval-out", str(out), "--split",
                    job["split"], "--bpd-images", str(args.bpd_images), "--sample-sets",
                    str(args.sample_sets if job["split"] == "test" else 0),
                    "--sample-steps", str(args.sample_steps)]
            argv += ["--keep-samples"] if job.get("keep_samples") else []
            argv += ["--floor"] if job.get("floor") else []
            command(argv, args, folder / "eval.out")
        results[step] = json.loads(out.read_text())
    return results


def train(folder, flags, until, args):
    """
    train.py with `flags` in `folder` until step `until`: the newest run there resumed when it
    stopped short, a new one when there is none. Returns the run's folder.
    """
    runs = sorted(folder.glob("[0-9][0-9][0-9]-*"))  # the newest is the one to go on with
    done = load.checkpoints(runs[-1]) if runs else []
    if not done or int(done[-1].stem) < until:
        resume = ["--resume", str(runs[-1])] if done else []
        command(["train.py", *flags, *resume, "--results-dir", str(folder)], args,
                folder / "train.out")
        runs = sorted(folder.glob("[0-9][0-9][0-9]-*"))
    return runs[-1]


def command(argv, args, log):
    """
    `python argv` from the repository root. train.py is always a process of its own (the scripts do
    not import each other): alone (--jobs 1) with its progress on the terminal, side by side on
    one thread each with its output appended to `log`. study.py's own evaluation runs here when
    alone.
    """
    if args.jobs == 1 and argv[0] == "study.py":
        main(argv[1:])
        return
    if args.jobs == 1:
        done, output = subprocess.run([sys.executable, *argv], cwd=ROOT), "above"
    else:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        with open(log, "a") as f:
            done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, stdout=f,
                                  stderr=subprocess.STDOUT)
        output = f"in {log}"
    if done.returncode:
        raise RuntimeError(f"`python {' '.join(argv)}` failed (exit {done.returncode}); its "
                           f"output is {output}")


def pretrain_base(args):
    """
    The base, when assets/study/base.pt is missing: PRETRAIN in runs_dir/pretrain (resumed if
    interrupted); its log copied to BASE_LOG and of its last checkpoint what a base needs (the EMA
    weights and the config, as assets/dit_digits.pt keeps them) to BASE.
    """
    if (ROOT / BASE).exists():
        return
    folder = Path(args.runs_dir) / "pretrain"
    folder.mkdir(parents=True, exist_ok=True)
    run = train(folder, PRETRAIN, BASE_ITERATIONS, args)
    shutil.copyfile(run / "log.jsonl", ROOT / BASE_LOG)
    last = read_state_dict(load.checkpoints(run)[-1])
    atomic_save({k: last[k] for k in BASE_ENTRIES}, ROOT / BASE)


def bind_runs_dir(args):
    """
    A runs folder belongs to one base and one RUN_SETTINGS: its runs.json records them (the base's
    SHA-256), and a study with another base or settings is refused, since it would take runs and
    evaluations made under those for its own (a run's folder name says which row, seed and
    learning rate it is, not from what it started or how it was measured). Seeds, rows and
    learning-rate candidates only add runs.
    """
    folder = Path(args.runs_dir)
    folder.mkdir(parents=True, exist_ok=True)
    want = dict(base_sha256=file_sha256(ROOT / BASE), **{k: getattr(args, k) for k in RUN_SETTINGS})
    stamp = folder / "runs.json"
    if stamp.exists():
        have = json.loads(stamp.read_text())
        differ = [k for k in want if have.get(k) != want[k]]
        if differ:
            sys.exit(f"error: {folder} holds runs made with another {', '.join(differ)} "
                     f"({', '.join(f'{have.get(k)} here, {want[k]} now' for k in differ)}); "
                     f"give another --runs-dir, or remove it to start over")
    elif any(p.name != "pretrain" for p in folder.iterdir()):
        sys.exit(f"error: {folder} holds runs that do not record their base and settings "
                 f"(no runs.json); give another --runs-dir, or remove it to start over")
    else:
        write_json(stamp, want)


def run_jobs(jobs, args, desc):
    """Jobs {key: job}, --jobs at a time: {key: run_job's results}."""
    results = {}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool, \
            tqdm(total=len(jobs), desc=desc, unit="run") as bar:
        futures = {key: pool.submit(run_job, job, args) for key, job in jobs.items()}
        for key, future in futures.items():
            results[key] = future.result()
            bar.update(1)
    return results


def slug(key):
    return key.replace("/", "-")


def choose_rates(keys, args):
    """
    Each row's learning-rate scale, chosen on the validation split: one run per candidate (seed
    100), the lowest validation loss. ({key: scale}, {key: {scale: validation loss}}).
    """
    jobs = {(key, s): dict(name=f"val-{slug(key)}-lr{s:g}", split="validation",
                           eval_at=[args.iterations],
                           flags=train_flags(args, VALIDATION_SEED, ROWS[key][1], s))
            for key in keys for s in args.lr_scales}
    results = run_jobs(jobs, args, "validation runs")
    losses = {key: {repr(float(s)): results[(key, s)][args.iterations]["heldout_loss"]
                    for s in args.lr_scales} for key in keys}
    chosen = {key: float(min(v, key=v.get)) for key, v in losses.items()}
    return chosen, losses


def test_rows(keys, chosen, args):
    """The test runs of rows at their chosen rates, every seed: {key: {seed: results}}."""
    first = args.seeds[0]
    jobs = {(key, seed): dict(name=f"{slug(key)}-s{seed}", split="test",
                              eval_at=[args.iterations],
                              flags=train_flags(args, seed, ROWS[key][1], chosen[key]),
                              keep_samples=(key, seed) == ("dmp", first))
            for key in keys for seed in args.seeds}
    results = run_jobs(jobs, args, "test runs")
    return {key: {seed: results[(key, seed)] for seed in args.seeds} for key in keys}


def extra_jobs(args, dmp_rate):
    """Table 4's ablations (seed 0, DMP's rate), Table 6's runs from scratch, and the base."""
    jobs, first = {}, args.seeds[0]
    named = dict(all=list(ABLATIONS), none=[])
    ablations = named[args.ablations] if args.ablations in named else args.ablations.split(",")
    for i, key in enumerate(ablations):
        flags = train_flags(args, first, ["--method", "dmp"] + ABLATIONS[key], dmp_rate)
        jobs[("ablation", key)] = dict(name=f"ablation-{i:02d}", flags=flags, split="test",
                                       eval_at=[args.iterations])
    if not args.no_scratch:  # Table 6: the base's recipe, with and without DMP from step 0; EMA
        # 0.99, not the base's 0.999, whose average would still hold 37% of the initial weights at
        # the first evaluation
        n = args.scratch_iterations
        for key, method in (("pretraining", []), ("pretraining + DMP", ["--method", "dmp"])):
            flags = train_flags(args, first, method + ["--model", BASE_MODEL, "--ema", "0.99"],
                                init=False, iterations=n, ckpt_every=n // 3)
            jobs[("scratch", key)] = dict(name=f"scratch-{'dmp' if method else 'plain'}",
                                          split="test", eval_at=[n // 3, 2 * n // 3, n],
                                          flags=flags)
    return jobs


#################################################################################
#              Collecting the results into study.json, and the rule             #
#################################################################################

def started(log):
    """The start event of a train.py log: trained and total parameter counts."""
    with open(log) as f:
        return json.loads(f.readline())


def row_entry(key, chosen, losses, runs, args):
    """study.json's entry of a row: its rate, its validation losses and its test runs per seed."""
    first = next(iter(runs.values()))
    s = started(first["log"])
    entry = dict(label=ROWS[key][0], flags=ROWS[key][1], lr_scale=chosen, validation=losses,
                 command="python train.py " + " ".join(train_flags(args, args.seeds[0],
                                                                   ROWS[key][1], chosen)),
                 trained=s["trained_parameters"], total=s["total_parameters"], runs={},
                 quality={}, gate={})
    for seed, r in runs.items():
        final = r[args.iterations]
        entry["runs"][str(seed)] = metrics(final)
        entry["quality"][str(seed)] = final["quality"]
        if "gate" in final:
            entry["gate"][str(seed)] = final["gate"]
    return entry


def settings_of(args):
    return dict(iterations=args.iterations, seeds=args.seeds, lr=args.lr,
                lr_scales=args.lr_scales, validation_seed=VALIDATION_SEED, batch_size=128,
                heldout_images=HOLDOUT, validation_images=VALIDATION,
                test_images=HOLDOUT - VALIDATION, bpd_images=args.bpd_images,
                sample_sets=args.sample_sets, sample_steps=args.sample_steps, n_prompts=N_PROMPTS,
                bands=BANDS, alpha=ALPHA, scratch_iterations=args.scratch_iterations,
                classifier=classifier_info(), augment=AUGMENT, **base_facts()["settings"])


def study_of(args, base_eval, rows, extra, minutes=None, reused=0):
    """study.json: every number the report shows, and the comparisons the rule decided."""
    study = dict(date=datetime.date.today().isoformat(),
                 command="python study.py" + " --quick" * args.quick, torch=torch.__version__,
                 wall_minutes=minutes, jobs=args.jobs, cpus=os.cpu_count(),
                 reused_evaluations=reused, settings=settings_of(args), rule=RULE,
                 primary={str(k): v for k, v in PRIMARY.items()}, table4e=TABLE_4E,
                 base=dict(metrics(base_eval), quality=base_eval["quality"],
                           **{k: base_eval[k] for k in ("train_loss", "train_digits", "gap_se")},
                           **base_facts()["base"]),
                 floor=dict(quality=base_eval["floor"]), pretraining=pretraining_curve(),
                 rows=rows, ablations={}, scratch={})
    study.update(decisions(study))
    scratch_flags = {k: j["flags"] for k, j in extra_jobs(args, 1.0).items()}  # lr-free: init=False
    for (group, key), r in extra.items():
        final = r[max(k for k in r if k != "log")]
        if group == "ablation":
            study["ablations"][key] = dict(flags=ABLATIONS[key], **metrics(final),
                                           quality=final["quality"], gate=final.get("gate"))
        elif group == "scratch":
            cmd = "python train.py " + " ".join(scratch_flags[(group, key)])
            study["scratch"][key] = dict(command=cmd, quality=final["quality"],
                                         evals={str(s): metrics(v) for s, v in r.items()
                                                if s != "log"})
    study["fid"] = None  # see study_report.render: no Inception weights can be fetched here
    return study


def metrics(r):
    """The held-out numbers of an evaluation: loss, bits/dim and the MSE per band of t."""
    return {k: r[k] for k in ("heldout_loss", "bpd", "mse_bands")}


def classifier_info():
    """The feature net's record: its command and its accuracy on the held-out digits."""
    c = read_state_dict(digits_fid.CLASSIFIER)
    return dict(command=c["command"], heldout_accuracy=c["heldout_accuracy"],
                train_accuracy=c["train_accuracy"])


def base_facts():
    """
    What the report says of the base and its data, read from the committed files: the training
    digits (all but the held-out split), the blocks of the base (DMP's prompt depth), its
    parameters and its pretraining command (the start event of its training log).
    """
    train_rows, _ = training.split(PreparedData(ROOT / DATA), HOLDOUT)
    blocks = len(load.load_model(str(ROOT / BASE)).blocks)
    start = started(ROOT / BASE_LOG)
    return dict(settings=dict(train_images=len(train_rows), blocks=blocks),
                base=dict(parameters=start["total_parameters"],
                          command="python train.py " + " ".join(PRETRAIN)))


def pretraining_curve():
    """[(step, held-out loss of the EMA model)] from the base's training log."""
    with open(ROOT / BASE_LOG) as f:  # a resumed run logs the steps after its checkpoint again
        curve = {e["step"]: e["heldout_loss"] for e in map(json.loads, f) if e.get("event") == "eval"}
    return sorted(curve.items())


def run_study(args):
    """Stage 1, then (if it passes) stage 2, the other rows and the extras: study.json's dict."""
    pretrain_base(args)
    bind_runs_dir(args)
    base = run_jobs({"base": dict(name="base", flags=None, split="test", eval_at=[0],
                                  keep_samples=True, floor=True)}, args, "base")["base"][0]
    wanted = [k for k in ROWS if k in args.rows.split(",") or k in STAGE1]
    rows = {}

    def add(keys):
        chosen, losses = choose_rates(keys, args)
        for key, runs in test_rows(keys, chosen, args).items():
            rows[key] = row_entry(key, chosen[key], losses[key], runs, args)

    add(list(STAGE1))
    extra, figures = {}, {}
    if passes_stage1(rows, args.seeds):  # the rest of the study
        add([k for k in wanted if k not in STAGE1])
        if "dmp" in rows:
            extra = run_jobs(extra_jobs(args, rows["dmp"]["lr_scale"]), args, "extras")
            figures["fig5"] = {key: fig5(args, key) for key in ("dmp", MOVING) if key in rows}
            samples = json.loads((Path(args.runs_dir) / f"dmp-s{args.seeds[0]}" / (
                f"eval-test-{args.iterations:07d}.json")).read_text())["samples"]
            figures["table5"] = dict(base=structural_bias(base["samples"]),
                                     dmp=structural_bias(samples), samples=len(samples))
    return base, rows, extra, figures


def fig5(args, key):
    """The trained gate of a row's first seed at GATE_TIMESTEPS: [blocks, timesteps, prompts]."""
    run = sorted((Path(args.runs_dir) / f"{slug(key)}-s{args.seeds[0]}").glob("[0-9]*-*"))[-1]
    model = load.load_model(run / "checkpoints" / f"{args.iterations:07d}.pt")
    weights = dmp.gate_weights(model, timesteps=GATE_TIMESTEPS)
    return weights.astype(np.float64).round(7).tolist()


def main(argv=None):
    """The study (the module docstring); --evaluate: one checkpoint; --render: the outputs again."""
    args = parse_args(argv)
    if args.evaluate:
        torch.set_num_threads(1)  # the digits DiT's matrices are too small to share (train.py)
        result = evaluate_checkpoint(args.evaluate, args.split, args.bpd_images, args.sample_sets,
                                     args.sample_steps, args.keep_samples, args.floor)
        write_json(args.eval_out, result, indent=None)
        return
    out = Path(args.out)
    if args.render:
        study = json.loads((out / "study.json").read_text())
        write_outputs(study, out, args.doc, args.readme)
        print(f"rewrote {out / 'study.md'}" + "".join(f" and {f}" for f in (args.doc, args.readme)
                                                      if f))
        return
    reused = len(list(Path(args.runs_dir).glob("*/eval-*.json")))  # done by an earlier invocation
    start = time.time()
    base, rows, extra, figures = run_study(args)
    study = study_of(args, base, rows, extra, round((time.time() - start) / 60, 1), reused)
    study.update(figures)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study.json", study)
    print(write_outputs(study, out, args.doc, args.readme))


if __name__ == "__main__":
    main()
