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
Results: --out/study.json, and from it (study_report.py) study.md, fig5_gate.png, pretraining_curve.png and
the README section between the two study markers, which is study.md byte for byte.
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
from study_report import METHOD_NAMES, write_outputs

ROOT = Path(__file__).resolve().parent
BASE = "assets/dit_digits.pt"  # paths relative to ROOT, where every command runs
BASE_LOG = "assets/dit_digits.log.jsonl"
DATA, HOLDOUT = "assets/digits", 297  # the digits preset's held-out split (train.split)

# Table 2/3/7's methods in the paper's order, then the PEFT baselines of DiffFit's paper.
METHODS = tuple(METHOD_NAMES)
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
#                     Collecting the results into study.json                    #
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
    study["fid"] = None  # see study_report.render: no Inception weights can be fetched here
    return study


def pretraining_curve():
    """[(step, held-out loss of the EMA model)] from the base's training log."""
    with open(ROOT / BASE_LOG) as f:
        return [(e["step"], e["heldout_loss"]) for e in map(json.loads, f) if e.get("event") == "eval"]


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
        write_outputs(study, out, args.readme)
        print(f"rewrote {out / 'study.md'}" + (f" and {args.readme}" if args.readme else ""))
        return
    reused = len(list(Path(args.runs_dir).glob("*/eval-*.json")))  # finished by an earlier invocation
    start = time.time()
    jobs, results = run_all(args)
    study = collect(args, jobs, results, round((time.time() - start) / 60, 1), reused)
    tmp = out / "study.json.tmp"
    tmp.write_text(json.dumps(study, indent=1) + "\n")
    os.replace(tmp, out / "study.json")
    print(write_outputs(study, out, args.readme))


if __name__ == "__main__":
    main()
