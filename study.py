"""
The paper in miniature: DMP against every further-training baseline and against the control that
separates its gate from its learning rate, its ablations and its analyses, on the bundled digits and
the converged digits DiT (assets/dit_digits.pt), on CPU.

    python study.py             # the whole study: 83 minutes on 2 cores
    python study.py --quick     # the same tables from 1 seed, 200 iterations, fewer images: 7 min
    python study.py --render    # docs/study.md, the README's results and the figures again

Every run is the project's own command, `python train.py --dataset digits --init
assets/dit_digits.pt --method ...` (study.md lists them), and every evaluation is `python study.py
--evaluate CKPT`: the held-out loss, the exact variational bound in bits/dim (all 1000 steps,
heldout.evaluate) and the noise MSE per band of 100 timesteps, on fixed held-out images with fixed
noise, so every model is measured on the same draws; the sample quality of samples from noise fixed
per sample (digits_fid.py: FD and KID of a digits classifier's features against the training and
the held-out digits, at matched counts, with paired bootstrap intervals); and, for DMP, how far its
gate moved from the uniform mixture it starts at.

The control. A zero-initialised gate gives every mixture weight 1/N (N = 16 prompts here), so Eq. 3
starts as Eq. 2 with every prompt scaled by 1/N, which under Adam is prompt tuning at lr/N. DMP can
be credited with what its gate adds only where it beats prompt tuning at lr/N, so that row is in
every table, beside DMP with gates that move: the authors' 10x gate learning rate and noisy gate,
and DMP without its importance loss (Eqs. 12-13 pull every sample's mixture towards uniform; without
them the gate moves at the prompts' lr, and its mixture comes to depend on t).

When a difference counts, fixed before any number of this study was seen: row A differs from row B
on a metric only if both (1) the difference of their means over the training seeds exceeds the sum
of their standard deviations over seeds (the base and the held-out floor are not trained from a
seed and have no spread; a row trained from one seed has no spread to exceed, and none of its
differences counts), and (2) for FD and KID, whose values depend on which images were drawn, the
95% interval of that difference from the paired bootstrap (the samples and both reference sets
resampled, the same draws for every row; the difference ± 1.96 standard deviations of its
replicates) excludes zero. The held-out loss and bits/dim are computed on the same images with the
same noise for every model: their measurement noise is shared by all rows, and (1) is their test. A
method helps only where a difference that counts is an improvement; anything else is reported as no
difference.

Runs live in --runs-dir; running the study again skips what is finished and resumes what was
interrupted. Results: --out/study.json, and from it (study_report.py) the figures and study.md in
--out and, for the default --out, the section of docs/study.md between its two study markers (the
same text, its figure links relative to docs/) and the README's results in brief between theirs.
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

import digits_fid
import dmp
import heldout
import load
import training
from checkpoints import read_state_dict, write_json
from diffusion import create_diffusion
from dataset import PreparedData
from study_report import write_outputs

ROOT = Path(__file__).resolve().parent
BASE = "assets/dit_digits.pt"  # paths relative to ROOT, where every command runs
BASE_LOG = "assets/dit_digits.log.jsonl"
DATA, HOLDOUT = "assets/digits", digits_fid.HOLDOUT  # the digits presets' held-out split
OUT, DOC = "assets/study", "docs/study.md"  # the committed results, and the page that shows them
README = "README.md"  # its results in brief, between study_report.BRIEF's markers
N_PROMPTS = 16  # the digits DiT's tokens (8x8 pixels, 2x2 patches): DMP mixes 16 prompts a block

# The main table: Tables 2, 3 and 7's methods at one learning rate (dmp.py's rule), the control,
# DMP with gates that move, and LoRA at DMP's parameter budget beside the usual rank 16.
# key: (label, train.py flags).
ROWS = {
    "full": ("fine-tuning", ["--method", "full"]),
    "prompt": ("prompt tuning (Eq. 2)", ["--method", "prompt"]),
    "prompt-lr/N": (f"prompt tuning at lr/{N_PROMPTS} (the control)",
                    ["--method", "prompt", "--lr-scale", str(1 / N_PROMPTS)]),
    "dmp": ("**DMP**", ["--method", "dmp"]),
    "dmp-authors": ("DMP, the authors' gate (10x lr, noisy)",
                    ["--method", "dmp", "--gate-lr-scale", "10", "--noisy-gate"]),
    "dmp-ib0": ("DMP without the importance loss (IB 0)",
                ["--method", "dmp", "--importance-coef", "0"]),
    "lora": ("LoRA (r 16)", ["--method", "lora"]),
    "lora-dmp": ("LoRA at DMP's size (r 1)", ["--method", "lora", "--lora-rank", "dmp"]),
    "difffit": ("DiffFit", ["--method", "difffit"]),
    "bitfit": ("BitFit", ["--method", "bitfit"]),
}
MOVING = "dmp-ib0"  # the DMP row whose Fig. 5 is drawn beside the default's
# The positive controls: rows that add capacity specific to the timestep by construction (prompts
# kept separate per band of timesteps), which must beat the control by the rule before the study can
# credit or rule out DMP's mixing by timestep (study_report.verdict). None is run yet: the study
# cannot tell, and says so.
POSITIVE_CONTROLS = ()
# Table 4 (a-e), Fig. 4 and an option the paper mentions, each a DMP run differing from the default
# by its flags (seed 0). The digits DiT has 16 tokens and 4 blocks: hard selection keeps 12 of 16
# prompts (the paper's 192 of 256), prepend uses 3 prompts (the paper's 50 for 256 tokens, scaled),
# depth 1 and 2 are "first block" and "half".
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
# (IB 1, LB 2) are the default run, (IB 0, LB 0), (IB 0, LB 1) the main table's "dmp-ib0" run, to
# the last digit (the earlier version of this study ran (IB 1, LB 0) and (IB 1, LB 2) and found
# exactly that).
TABLE_4E = {"4e: IB 0, LB 0": "dmp-ib0", "4e: IB 0, LB 1": "dmp-ib0", "4e: IB 1, LB 0": "dmp",
            "4e: IB 1, LB 2": "dmp"}
LIKELIHOOD = ("heldout_loss", "bpd")
QUALITY = ("fd_train", "kid_train", "fd_heldout", "kid_heldout")
GATE_TIMESTEPS = list(range(0, 1000, 10))
# The rule as this docstring states it (one copy): study.json and docs/study.md carry it.
RULE = " ".join(__doc__.split("When a difference counts, fixed before any number of this study was "
                              "seen: ")[1].split("\n\n")[0].split())

FULL = dict(iterations=1000, eval_at=[500, 1000], seeds=[0, 1, 2], bpd_images=100, sample_sets=5,
            sample_steps=100, replicates=200, scratch_iterations=3000)
QUICK = dict(iterations=200, eval_at=[100, 200], seeds=[0], bpd_images=16, sample_sets=1,
             sample_steps=25, replicates=50, scratch_iterations=300)


def parse_args(argv=None):
    """The command line; the sizes are the full study's, or --quick's."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 200 iterations, fewer images: a check in minutes")
    p.add_argument("--render", action="store_true",
                   help="only rewrite study.md, the figures, docs/study.md and the README's results "
                        "from study.json")
    p.add_argument("--out", default=OUT, help="study.json, study.md and the figures")
    p.add_argument("--runs-dir", default="runs/study", help="the runs and their evaluations")
    p.add_argument("--doc", default=None,
                   help="the file whose study section is rewritten ('' for none; default: "
                        f"{DOC} when --out is {OUT}, none otherwise)")
    p.add_argument("--readme", default=None,
                   help="the file whose results in brief are rewritten ('' for none; default: "
                        f"{README} when --out is {OUT}, none otherwise)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="runs at a time, each a process on one thread; 1 runs everything here")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="every method's (the base was pretrained at 1e-3)")
    p.add_argument("--rows", default=",".join(ROWS), help="a comma-separated subset of ROWS")
    p.add_argument("--ablations", default="all",
                   help="'all', 'none', or a comma-separated list of Table 4 keys")
    p.add_argument("--no-scratch", action="store_true", help="skip Table 6 (DMP from scratch)")
    for k, v in FULL.items():  # sizes: the full study's, --quick's with --quick, each overridable
        kind = int_list if isinstance(v, list) else type(v)
        p.add_argument(f"--{k.replace('_', '-')}", type=kind,
                       help=f"full study: {v}; --quick: {QUICK[k]}")
    p.add_argument("--evaluate", metavar="CKPT",
                   help="only evaluate one checkpoint (what each run's evaluations do)")
    p.add_argument("--eval-out", default="eval.json", help="with --evaluate: where its JSON goes")
    p.add_argument("--keep-samples", action="store_true",
                   help="with --evaluate: store the samples (Table 5)")
    p.add_argument("--floor", action="store_true",
                   help="with --evaluate: also the held-out digits' own FD and KID")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.eval_at[-1] != args.iterations or sorted(args.eval_at) != args.eval_at:
        p.error("--eval-at must be increasing and end at --iterations")
    unknown = set(args.rows.split(",")) - set(ROWS)
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}: choose from {', '.join(ROWS)}")
    committed = Path(args.out).resolve() == (ROOT / OUT).resolve()
    if args.doc is None:  # a --quick or trial run elsewhere leaves the committed pages alone
        args.doc = str(ROOT / DOC) if committed else ""
    if args.readme is None:
        args.readme = str(ROOT / README) if committed else ""
    return args


def int_list(text):
    """'1,2,3' -> [1, 2, 3] (--seeds, --eval-at)."""
    return [int(x) for x in text.split(",")]


#################################################################################
#                    Evaluation: one checkpoint, fixed draws                    #
#################################################################################

def evaluate_checkpoint(ckpt, bpd_images, sample_sets=0, sample_steps=100, replicates=200,
                        keep_samples=False, floor=False):
    """
    Held-out loss (all 297 held-out digits, 4 fixed draws each), bits/dim and the noise MSE per band
    of 100 timesteps (the first bpd_images of them, every timestep; heldout.evaluate); for a DMP
    model, its gate at 100 timesteps summarised (gate_statistics); with sample_sets, FD and KID of
    sample_sets x 297 samples (digits_fid.SampleQuality) and their bootstrap replicates, the samples
    themselves with keep_samples (Table 5), the held-out digits' own FD and KID with floor. A dict.
    """
    model = load.load_model(ckpt).eval()
    data = PreparedData(DATA)
    train_rows, heldout_rows = training.split(data, HOLDOUT)
    settings = argparse.Namespace(unconditional=True, bpd_images=bpd_images)
    r = heldout.evaluate(model, create_diffusion("", "cosine"), data, heldout_rows, settings,
                         torch.device("cpu"), bpd=True)
    out = dict(heldout_loss=r["heldout_loss"], bpd=r["bpd"], mse_bands=r["mse_bands"])
    mop = model.block_input
    if isinstance(mop, dmp.MixtureOfPrompts) and mop.gate_type is not None:
        out["gate"] = gate_statistics(dmp.gate_weights(model, timesteps=GATE_TIMESTEPS))
    if sample_sets:
        images = [data.batch(rows, False)[0] for rows in (train_rows, heldout_rows)]
        quality = digits_fid.SampleQuality(digits_fid.load_classifier(), *images, replicates,
                                           chunks=sample_sets)
        x = digits_fid.generate(model, sample_sets * HOLDOUT, sample_steps)
        out["quality"] = quality.of_samples(x)
        if floor:
            out["floor"] = quality.floor()
        if keep_samples:
            out["samples"] = x.reshape(len(x), -1).double().numpy().round(6).tolist()
    return out


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
#                         Runs: train.py, then evaluate                         #
#################################################################################

def train_flags(args, seed, extra=(), init=True, iterations=None, ckpt_every=None):
    """The train.py command line of one run (the digits preset; no EMA when further-training)."""
    flags = ["--dataset", "digits", "--lr", str(args.lr), "--seed", str(seed),
             "--sample-every", "0", "--eval-every", "0", "--keep", "1000", "--log-every", "50"]
    if init:
        flags += ["--init", BASE, "--ema", "0"]
    it = iterations or args.iterations
    every = ckpt_every or np.gcd.reduce(args.eval_at)  # a checkpoint at every evaluated count
    return flags + list(extra) + ["--iterations", str(it), "--ckpt-every", str(every)]


def run_job(job, args):
    """
    One run: train.py (resumed if its folder holds checkpoints short of the end), then an evaluation
    of each checkpoint in job['eval_at'] not evaluated yet (the last one with samples). Returns
    {step: metrics} and the run's log. Everything lands in runs_dir/name.
    """
    folder = Path(args.runs_dir) / job["name"]
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    if job["flags"] is not None:
        runs = sorted(folder.glob("[0-9][0-9][0-9]-*"))
        done = load.checkpoints(runs[0]) if runs else []
        if not done or int(done[-1].stem) < job["eval_at"][-1]:
            resume = ["--resume", str(runs[0])] if done else []
            command(["train.py", *job["flags"], *resume, "--results-dir", str(folder)], args,
                    folder / "train.out")
            runs = sorted(folder.glob("[0-9][0-9][0-9]-*"))
        results["log"] = str(runs[0] / "log.jsonl")
        ckpts = {s: runs[0] / "checkpoints" / f"{s:07d}.pt" for s in job["eval_at"]}
    else:
        ckpts = {0: Path(BASE)}
    for step, ckpt in ckpts.items():
        out = folder / f"eval-{step:07d}.json"
        last = step == max(ckpts)
        if not out.exists():
            argv = ["study.py", "--evaluate", str(ckpt), "--eval-out", str(out),
                    "--bpd-images", str(args.bpd_images),
                    "--sample-sets", str(args.sample_sets if last else 0),
                    "--sample-steps", str(args.sample_steps), "--replicates", str(args.replicates)]
            argv += ["--keep-samples"] if last and job.get("keep_samples") else []
            argv += ["--floor"] if job.get("floor") else []
            command(argv, args, folder / "eval.out")
        results[step] = json.loads(out.read_text())
    return results


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


def jobs_of(args):
    """Every run of the study: (group, key, seed) -> job, the longest first."""
    jobs, first = {}, args.seeds[0]
    for key in args.rows.split(","):
        for seed in args.seeds:
            jobs[("row", key, seed)] = dict(
                name=f"{key.replace('/', '-')}-s{seed}", eval_at=args.eval_at,
                flags=train_flags(args, seed, ROWS[key][1]),
                keep_samples=(key, seed) == ("dmp", first))
    named = dict(all=list(ABLATIONS), none=[])
    ablations = named[args.ablations] if args.ablations in named else args.ablations.split(",")
    for i, key in enumerate(ablations):
        flags = train_flags(args, first, ["--method", "dmp"] + ABLATIONS[key])
        jobs[("ablation", key, first)] = dict(name=f"ablation-{i:02d}", flags=flags,
                                              eval_at=[args.iterations])
    if not args.no_scratch:  # Table 6: the base's recipe, with and without DMP from step 0; EMA
        # 0.99, not the base's 0.999, whose average would still hold 37% of the initial weights at
        # the first evaluation
        n = args.scratch_iterations
        for key, method in (("pretraining", []), ("pretraining + DMP", ["--method", "dmp"])):
            flags = train_flags(args, first, method + ["--ema", "0.99"], init=False, iterations=n,
                                ckpt_every=n // 3)
            jobs[("scratch", key, first)] = dict(name=f"scratch-{'dmp' if method else 'plain'}",
                                                 eval_at=[n // 3, 2 * n // 3, n], flags=flags)
    jobs[("base", "base", 0)] = dict(name="base", flags=None, eval_at=[0], keep_samples=True,
                                     floor=True)
    return jobs


def run_all(args):
    """Every job of the study (jobs_of), --jobs at a time: (jobs, {key: run_job's results})."""
    jobs = jobs_of(args)
    results = {}
    with ThreadPoolExecutor(max(1, args.jobs)) as pool, \
            tqdm(total=len(jobs), desc="study runs", unit="run") as bar:
        futures = {key: pool.submit(run_job, job, args) for key, job in jobs.items()}
        for key, future in futures.items():
            results[key] = future.result()
            bar.update(1)
    return jobs, results


#################################################################################
#              Collecting the results into study.json, and the rule             #
#################################################################################

def started(log):
    """The start event of a train.py log: trained and total parameter counts."""
    with open(log) as f:
        return json.loads(f.readline())


def row_of(evals, label=None, seeded=True):
    """
    One row from its runs' final evaluations (one per seed): each metric's values over seeds and,
    for FD and KID, the bootstrap replicates of their mean over seeds (`boot`, not in study.json).
    seeded: trained from a seed, so its spread over seeds is part of the rule (the base and the
    floor are not).
    """
    row = dict(values={m: [e[m] for e in evals] for m in LIKELIHOOD if m in evals[0]}, boot={},
               seeded=seeded, label=label)
    if "quality" in evals[0]:
        for m in QUALITY:
            row["values"][m] = [e["quality"][m] for e in evals]
            row["boot"][m] = np.mean([e["quality"][m + "_boot"] for e in evals], axis=0)
            row.setdefault("boot_sd", {})[m] = float(np.std(row["boot"][m], ddof=1))
    return row


def spread(values):
    """The standard deviation over seeds (0 for a single value)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def compare(a, b):
    """
    The rule of this file's docstring, for row a against row b (row_of's dicts), per metric: the
    difference of the means, the seed spread it must exceed (None where a seeded row has one
    seed), for FD and KID the paired bootstrap's 95% interval of the difference, and whether the
    difference counts.
    """
    out = {}
    one_seed = any(r["seeded"] and len(next(iter(r["values"].values()))) < 2 for r in (a, b))
    for m in a["values"]:
        if m not in b["values"]:
            continue
        diff = float(np.mean(a["values"][m]) - np.mean(b["values"][m]))
        seeds = spread(a["values"][m]) + spread(b["values"][m])
        entry = dict(diff=diff, seed_spread=None if one_seed else seeds,
                     counts=not one_seed and abs(diff) > seeds)
        if m in QUALITY:
            half = digits_fid.half_width(a["boot"][m] - b["boot"][m])
            entry.update(interval=[diff - half, diff + half],
                         counts=entry["counts"] and abs(diff) > half)
        out[m] = entry
    return out


def comparisons(rows):
    """
    The pairs the rule decides: every DMP row against the control and against prompt tuning, every
    row against the base, and the base against the held-out digits themselves.
    """
    pairs = [(k, c) for k in rows if k.startswith("dmp") for c in ("prompt-lr/N", "prompt")
             if c in rows]
    pairs += [(k, "base") for k in [*ROWS, *ABLATIONS] if k in rows]
    return pairs + [("base", "floor")]


def collect(args, jobs, results, minutes=None, reused=0):
    """study.json: every number the report shows, and the comparisons the rule decided."""
    Path(args.out).mkdir(parents=True, exist_ok=True)
    last, first = args.iterations, args.seeds[0]
    base_eval = results[("base", "base", 0)][0]
    settings = dict(iterations=last, eval_at=args.eval_at, seeds=args.seeds, lr=args.lr,
                    batch_size=128, heldout_images=HOLDOUT, bpd_images=args.bpd_images,
                    sample_sets=args.sample_sets, sample_steps=args.sample_steps,
                    replicates=args.replicates, n_prompts=N_PROMPTS,
                    scratch_iterations=args.scratch_iterations, classifier=classifier_info(),
                    **base_facts()["settings"])
    study = dict(date=datetime.date.today().isoformat(),
                 command="python study.py" + " --quick" * args.quick, torch=torch.__version__,
                 wall_minutes=minutes, jobs=args.jobs, cpus=os.cpu_count(),
                 reused_evaluations=reused, settings=settings, rule=RULE, table4e=TABLE_4E,
                 base=dict(metrics(base_eval), quality=point(base_eval),
                           **base_facts()["base"]),
                 floor=dict(quality=point(dict(quality=base_eval["floor"]))),
                 pretraining=pretraining_curve(), rows={}, ablations={}, scratch={})
    rows = dict(base=row_of([base_eval], "base", seeded=False),
                floor=row_of([dict(quality=base_eval["floor"])], "held-out digits", seeded=False))
    for (group, key, seed), r in results.items():
        job = jobs[(group, key, seed)]
        final = r.get(job["eval_at"][-1])
        cmd = "python train.py " + " ".join(job["flags"] or [])
        if group == "row":
            entry = study["rows"].setdefault(key, dict(label=ROWS[key][0], flags=ROWS[key][1],
                                                       command=cmd, runs={}, quality={}, gate={}))
            s = started(r["log"])
            entry.update(trained=s["trained_parameters"], total=s["total_parameters"])
            entry["runs"][str(seed)] = {str(step): metrics(r[step]) for step in job["eval_at"]}
            entry["quality"][str(seed)] = point(final)
            if "gate" in final:
                entry["gate"][str(seed)] = final["gate"]
        elif group == "ablation":
            study["ablations"][key] = dict(flags=ABLATIONS[key], **metrics(final),
                                           quality=point(final), gate=final.get("gate"))
            rows[key] = row_of([final], key)
        elif group == "scratch":
            study["scratch"][key] = dict(command=cmd, quality=point(final),
                                         evals={str(s): metrics(r[s]) for s in job["eval_at"]})
    for key in study["rows"]:
        rows[key] = row_of([results[("row", key, seed)][last] for seed in args.seeds], key)
    for name, row in rows.items():  # each row's bootstrap spread, for the intervals shown
        target = study["rows"].get(name) or study["ablations"].get(name) or study[name]
        target["boot_sd"] = row.get("boot_sd", {})
    study["comparisons"] = [dict(a=a, b=b, **compare(rows[a], rows[b]))
                            for a, b in comparisons(rows)]
    if ("row", "dmp", first) in results:
        samples = results[("row", "dmp", first)][last]["samples"]
        study["table5"] = dict(base=structural_bias(base_eval["samples"]),
                               dmp=structural_bias(samples), samples=len(samples))
    for key in ("dmp", MOVING):  # Fig. 5: the default gate and one that moves
        if ("row", key, first) in results:
            run = Path(results[("row", key, first)]["log"]).parent
            model = load.load_model(run / "checkpoints" / f"{last:07d}.pt")
            weights = dmp.gate_weights(model, timesteps=GATE_TIMESTEPS)
            study.setdefault("fig5", {})[key] = weights.astype(np.float64).round(7).tolist()
    study["fid"] = None  # see study_report.render: no Inception weights can be fetched here
    study["positive_controls"] = [k for k in POSITIVE_CONTROLS if k in study["rows"]]
    return study


def metrics(r):
    """The held-out numbers of an evaluation: loss, bits/dim and the MSE per band of t."""
    return {k: r[k] for k in ("heldout_loss", "bpd", "mse_bands")}


def point(r):
    """FD and KID of an evaluation, without their replicates."""
    return {m: r["quality"][m] for m in QUALITY} if "quality" in r else None


def classifier_info():
    """The feature net's record: its command and its accuracy on the held-out digits."""
    c = read_state_dict(digits_fid.CLASSIFIER)
    return dict(command=c["command"], heldout_accuracy=c["heldout_accuracy"],
                train_accuracy=c["train_accuracy"])


def base_facts():
    """
    What the report says of the base and its data, read from the committed assets: the training
    digits (all but the held-out split), the blocks of the digits DiT (DMP's prompt depth) and its
    parameters (the start event of its training log).
    """
    train_rows, _ = training.split(PreparedData(ROOT / DATA), HOLDOUT)
    blocks = len(load.load_model(str(ROOT / BASE)).blocks)
    return dict(settings=dict(train_images=len(train_rows), blocks=blocks),
                base=dict(parameters=started(ROOT / BASE_LOG)["total_parameters"]))


def pretraining_curve():
    """[(step, held-out loss of the EMA model)] from the base's training log."""
    with open(ROOT / BASE_LOG) as f:
        return [(e["step"], e["heldout_loss"]) for e in map(json.loads, f)
                if e.get("event") == "eval"]


def main(argv=None):
    """The study (the module docstring); --evaluate: one checkpoint; --render: the outputs again."""
    args = parse_args(argv)
    if args.evaluate:
        torch.set_num_threads(1)  # the digits DiT's matrices are too small to share (train.py)
        result = evaluate_checkpoint(args.evaluate, args.bpd_images, args.sample_sets,
                                     args.sample_steps, args.replicates, args.keep_samples,
                                     args.floor)
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
    jobs, results = run_all(args)
    study = collect(args, jobs, results, round((time.time() - start) / 60, 1), reused)
    write_json(out / "study.json", study)
    print(write_outputs(study, out, args.doc, args.readme))


if __name__ == "__main__":
    main()
