"""
The device suite, `python bench.py --suite device`: every figure a GPU can give, in one command,
each row a process of its own under a timeout; and the pass/fail targets the speed rows are judged
by (bench.py prints them under its table).

bench.py runs this module's main_suite (its flags: add_flags; its preset: PRESET); each row is
`bench.py --one SPEC` (its speed rows) or one of the script rows here (train.py and sample.py end to
end, under torchrun too). bench.py's own table runs each row in a process of its own the same way
(run_rows, one_command, print_row).
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import memory
import training
from checkpoints import write_json

#################################################################################
#                        The table and the targets                              #
#################################################################################

COLUMNS = [("row", "{}"), ("model", "{}"), ("mode", "{}"), ("batch", "{}"),
           ("ms_per_step", "{:.1f}"), ("steps_per_s", "{:.3g}"), ("images_per_s", "{:.4g}"),
           ("tflop_per_step", "{:.3g}"), ("achieved_tflops", "{:.3g}"), ("mfu", "{:.1%}"),
           ("peak_mem_mb", "{:.0f}")]


def format_table(results):
    """The rows as a plain-text table (ratios are targets, not rows); a failed row, its error."""
    table = [[c for c, _ in COLUMNS]]
    for r in results:
        if r["row"] == "ratio":
            continue
        cells = ["-" if r.get(c) is None else f.format(r[c]) for c, f in COLUMNS]
        if "error" in r:  # the error where the time would be, every figure "-"
            cells = cells[:3] + ["-", r["error"]] + ["-"] * (len(COLUMNS) - 5)
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in table]
    return "\n".join(lines[:1] + ["  ".join("-" * w for w in widths)] + lines[1:])


def targets(results):
    """
    Each target with its measured figure: (description, value text, met or None when not
    measured). A measured peak fits a card as an estimate does (memory.fits: 1.05 x + 1 GiB).
    """
    def find(row, model, mode, compiled=False):
        return next((r for r in results if r["row"] == row and r["model"] == model
                     and r["mode"] == mode and bool(r.get("compiled")) == compiled
                     and "error" not in r), None)
    out = []
    for r in results:
        how = ", --compile" if r.get("compiled") else ""
        if r["row"] == "ratio" and r["mode"] == "dmp/unpatched sampling step":
            out.append((f"{r['model']}: DMP sampling step <= 1.02x unpatched{how}",
                        f"{r['value']:.3f}x", r["value"] <= 1.02))
        if r["row"] == "ratio" and r["mode"] == "dmp/full time":
            out.append((f"{r['model']}: DMP step time <= 0.75x full fine-tuning (interleaved){how}",
                        f"{r['value']:.3f}x", r["value"] <= 0.75))
    interleaved = {(r["model"], bool(r.get("compiled"))) for r in results
                   if r["row"] == "ratio" and r["mode"] == "dmp/full time"}
    for compiled in (False, True):
        how = ", --compile" if compiled else ""
        names = dict.fromkeys(r["model"] for r in results
                              if r["row"] == "train" and bool(r.get("compiled")) == compiled)
        for name in names:
            full, mop = find("train", name, "full", compiled), find("train", name, "dmp", compiled)
            if not (full and mop):
                continue
            if (name, compiled) not in interleaved:  # separate processes, one after the other
                ratio = mop["ms_per_step"] / full["ms_per_step"]
                out.append((f"{name}: DMP step time <= 0.75x full fine-tuning{how}",
                            f"{ratio:.3f}x", ratio <= 0.75))
            if full["peak_mem_mb"] and mop["peak_mem_mb"] is not None:
                ratio = mop["peak_mem_mb"] / full["peak_mem_mb"]
                out.append((f"{name}: DMP peak memory <= 0.6x full fine-tuning{how}",
                            f"{ratio:.3f}x", ratio <= 0.6))
        for name, mode, goal in (("DiT-L/2", "dmp", 0.5), ("DiT-XL/2", "pretrain", 0.4)):
            r = find("train", name, mode, compiled)
            if r is not None:
                mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
                out.append((f"{name} {mode} MFU >= {goal:.0%}{how}", mfu,
                            None if r["mfu"] is None else r["mfu"] >= goal))
    for mode, card in (("dmp", 80), ("dmp, checkpointing", 24), ("dmp, grad-accum 4", 24)):
        r = find("train", "DiT-XL/2", mode)
        if r is not None and r["peak_mem_mb"] is not None and r["batch"] == 128:
            gib = r["peak_mem_mb"] / 1024
            out.append((f"DiT-XL/2 {mode}, batch 128: fits {card} GB", f"{gib:.1f} GiB peak",
                        card in memory.fits(dict(peak_gib=gib))))
    data = next((r for r in results if r["row"] == "data"), None)
    trains = [r for r in results if r["row"] == "train" and "error" not in r]
    if data and trains:
        ratio = data["images_per_s"] / max(r["images_per_s"] for r in trains)
        out.append(("stored latents read >= 10x faster than training consumes them (fastest row)",
                    f"{ratio:.1f}x", ratio >= 10))
    return out


def describe(device, precision, compile):
    """The device (GPU name, or CPU model and threads), torch, precision and date of a table."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        model = "unknown CPU"
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                names = [line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")]
            model = (names or [model])[0]
        what = f"{model}, {torch.get_num_threads()} threads"
    compiled = ", compiled" if compile else ""
    return f"{what}; torch {torch.__version__}; {precision}{compiled}; {time.strftime('%Y-%m-%d')}"


#################################################################################
#        The device suite: every figure a GPU can give, in one command          #
#################################################################################
# `python bench.py --suite device --json bench-gpu.json` measures, on one CUDA GPU, what the speed
# table of docs/speed-and-memory.md and the first run on CUDA need: training steps/s, MFU and peak
# memory (DiT-L/2 and XL/2, DMP with --checkpointing, hard selection, the text DiT with CLIP
# ViT-L/14, pretraining and sd-tiny compiled); DDPM-250 sampling with and without a patch; VAE
# encoding; train.py and sample.py end to end on the digits (the demo preset; train, SIGKILL,
# --resume, a grid, an FID set) and under torchrun with 2 processes (DDP built; NCCL with a GPU
# each, else gloo on the CPU, saying why). It runs on whatever torch the machine has and prints it.
# The "device" preset times 2 warm-up steps (3 compiled) and 3 rounds of 2 steps where "gpu" times
# 5 and 5 x 4, on 1,024 rows of latents; the models are built on the GPU; --compile compiles each
# block (training.compile_blocks), not the whole model; every row runs in a process of its own
# under a timeout (twice its estimate + 30 s, never past the budget), in the order below, so a row
# that hangs or fails (no CUDA, no NCCL, a compile error) ends in one sentence and the rows after
# it still run; a row the remaining budget cannot hold is skipped, saying so. `--dry-run` lists the
# rows, commands and estimates.

# What a row may take in all: the suite stops starting rows past it, and it ends within a 10-minute
# call of the lent GPU machine; the rows' estimates (process starts and cold compiles included, each
# row a process of its own) add up to at most SUITE_ESTIMATE_S, so the budget holds a third more.
SUITE_BUDGET_S = 540
SUITE_ESTIMATE_S = 360
# bench.py's "device" preset: the gpu preset's rows with fewer timed steps (the suite's 6
# minutes), DDPM sampling timed on 10 steps of a 250-step chain, the digits runs.
PRESET = dict(models=["DiT-L/2", "DiT-XL/2"], input_size=32, batch=128, warmup=2, compile_warmup=3,
              rounds=3, steps=2, sample_models=["DiT-XL/2"], sample_batch=64, sampler="ddpm",
              sample_steps=10, chain=250, sample_rounds=3, vae_size=256, vae_batch=16,
              fid_batch=100, fid_images=500, data_rows=1024, digits_iterations=150,
              digits_samples=256, torchrun_samples=64, demo_iterations=100, demo_bpd_images=20)
STARTED = time.monotonic()  # the budget counts from the start of the process
# (id, what it measures, spec for --one, compiled, estimated seconds on one H100)
DEVICE_SUITE = [
    ("train-L2-dmp", "DiT-L/2 DMP further-training, batch 128, bf16",
     ["train", "DiT-L/2", "dmp"], False, 15),
    ("train-L2-full", "DiT-L/2 full fine-tuning, batch 128, bf16",
     ["train", "DiT-L/2", "full"], False, 15),
    ("train-XL2-dmp", "DiT-XL/2 DMP, batch 128, bf16",
     ["train", "DiT-XL/2", "dmp"], False, 15),
    ("train-XL2-dmp-ckpt", "DiT-XL/2 DMP with --checkpointing",
     ["train", "DiT-XL/2", "dmp", dict(checkpointing=True)], False, 15),
    ("train-L2-dmp-hard", "DiT-L/2 DMP with --selection hard (Table 4b), bf16",
     ["train", "DiT-L/2", "dmp", dict(selection="hard")], False, 15),
    ("train-B2-text", "text DiT-B/2 DMP on captions through CLIP ViT-L/14 (COCO's), bf16",
     ["train", "DiT-B/2", "dmp", dict(text=True)], False, 20),
    ("sample-XL2", "DDPM-250 sampling, DiT-XL/2, batch 64, with and without a DMP patch",
     ["sample", "DiT-XL/2"], False, 20),
    ("vae", "VAE encoding (and decoding), 256x256, batch 16", ["vae"], False, 12),
    ("demo", "train.py's demo preset on CUDA: DMP on the digits, held-out bits/dim and sample FD "
     "before and after", ["demo"], False, 30),
    ("digits-train", "train.py on the digits: 150 steps, SIGKILL, --resume, against an "
     "uninterrupted run", ["digits-train"], False, 30),
    ("digits-sample", "sample.py: a grid and an FID set of 256 from the resumed run",
     ["digits-sample"], False, 20),
    ("torchrun-train", "train.py under torchrun, 2 processes: DDP, its all-reduce, the held-out "
     "evaluation shared", ["torchrun-train"], False, 25),
    ("torchrun-sample", "sample.py under torchrun, 2 processes: 64 images against the FID set's",
     ["torchrun-sample"], False, 20),
    ("train-XL2-pretrain-compiled", "DiT-XL/2 pretraining, --compile",
     ["train", "DiT-XL/2", "pretrain"], True, 45),
    ("train-sdtiny-compiled", "sd-tiny (SD's UNet, small) DMP on captions, --compile: every "
     "block", ["train", "sd-tiny", "dmp"], True, 50),
]
ROOT = Path(__file__).resolve().parent
NO_CUDA = "CUDA is not available here (torch.cuda.is_available() is False)"


class RowError(RuntimeError):
    """A row that could not run; its message is the one sentence the suite records."""


def run_script(cmd, what, timeout=300, env=None):
    """
    One of the project's scripts in a process of its own (`env`: added to the environment); at
    the timeout it and every process it started are killed. Returns (seconds, stdout); a failure
    raises RowError with the last line of what it printed to stderr.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        raise RowError(f"{what} did not finish within {timeout} s") from None
    if proc.returncode:
        raise RowError(f"{what} exited with status {proc.returncode}: {last_line(err)}")
    return time.perf_counter() - started, out


def kill_tree(pid):
    """
    SIGKILL a process and every process it started, by their ids (/proc's parent links): torchrun
    starts its workers in sessions of their own, which a process group would miss.
    """
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a process that ended meanwhile
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [pid], [pid]
    while todo:
        found = children.get(todo.pop(), [])
        tree += found
        todo += found
    for p in tree:
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass


def last_line(text):
    """The last line of a process's output that says something (progress bars left out)."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines()]
    lines = [line for line in lines if line and "it/s]" not in line and "s/it]" not in line]
    return (lines or ["(nothing printed)"])[-1][:400]


def read_log(run_dir):
    """A run's log.jsonl as a list of dicts."""
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def only_run(folder):
    """The one run folder train.py made under `folder`."""
    runs = sorted(p for p in Path(folder).glob("*") if p.is_dir())
    if len(runs) != 1:
        raise RowError(f"{folder} should hold one run folder and holds {len(runs)}")
    return runs[0]


def script(name, *argv):
    """The command line of one of the project's scripts."""
    return [sys.executable, str(ROOT / name), *map(str, argv)]


def torchrun(name, *argv, processes=2):
    """The command line of one of the project's scripts under torchrun, 2 processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(processes), str(ROOT / name), *map(str, argv)]


def two_ranks(device):
    """
    (device, environment, note) for the torchrun rows' 2 processes: NCCL, a GPU each, where there
    are 2 GPUs; with one GPU, gloo on the CPU (CUDA hidden), since NCCL refuses two processes on
    one GPU, so DDP is still built and its all-reduce runs, and the note says so.
    """
    if device.type != "cuda" or torch.cuda.device_count() >= 2:
        return device, {}, None
    note = ("one GPU here: NCCL needs a GPU per process, so the 2 processes ran DDP on gloo on the "
            "CPU; NCCL with 2 ranks needs a machine with 2 GPUs")
    return torch.device("cpu"), {"CUDA_VISIBLE_DEVICES": ""}, note


def row_torchrun_train(preset, device, work):
    """
    Four steps of train.py on the digits under torchrun with 2 processes (two_ranks: DDP built, its
    all-reduce run), the held-out loss evaluated after step 2 by both (heldout.evaluate's shares).
    """
    folder = work / "torchrun-train"
    device, env, note = two_ranks(device)
    command = torchrun("train.py", "--dataset", "digits", "--device", device.type,
                       "--init", "assets/dit_digits.pt", "--method", "dmp", "--iterations", 4,
                       "--ckpt-every", 4, "--log-every", 1, "--sample-every", 0, "--eval-every", 2,
                       "--results-dir", folder)
    seconds, _ = run_script(command, "torchrun train.py", env=env)
    log = read_log(only_run(folder))
    start = next(e for e in log if e.get("event") == "start")
    return dict(row="check", model="digits DiT", mode="torchrun train.py, 2 processes",
                seconds=seconds, world=start["world"], backend=start.get("backend"),
                precision=start.get("precision"), steps=[e["step"] for e in log if "loss" in e],
                heldout_loss=[e["heldout_loss"] for e in log if e.get("event") == "eval"],
                device=str(device), note=note)


def row_demo(preset, device, work):
    """
    train.py's demo preset on `device` (--iterations and --bpd-images shortened): DMP on the
    digits with the held-out bits/dim and the sample FD (digits_fid) before and after.
    """
    n, images = preset["demo_iterations"], preset["demo_bpd_images"]
    command = script("train.py", "--dataset", "demo", "--device", device.type, "--iterations", n,
                     "--bpd-images", images, "--sample-every", n, "--ckpt-every", n,
                     "--results-dir", work / "demo")
    seconds, _ = run_script(command, "train.py --dataset demo")
    log = read_log(only_run(work / "demo"))
    evals = [e for e in log if e.get("event") == "eval"]
    if len(evals) != 2:
        raise RowError(f"the demo logged {len(evals)} evaluations, not 2 (before and after)")
    return dict(row="check", model="digits DiT", mode=f"demo preset, {n} steps", seconds=seconds,
                bpd=[e["bpd"] for e in evals], fd_heldout=[e["fd_heldout"] for e in evals],
                last_loss=[e["loss"] for e in log if "loss" in e][-1])


def row_digits_train(preset, device, work):
    """
    train.py on the digits preset end to end on `device`: an uninterrupted run, and one killed
    with SIGKILL once its first checkpoint is written, then resumed (--resume) to the same step;
    the two final checkpoints compared weight by weight (bit-identical on CPU; on CUDA the kernels
    need not be deterministic).
    """
    n = preset["digits_iterations"]
    every = max(1, n // 3)
    common = script("train.py", "--dataset", "digits", "--device", device.type, "--iterations", n,
                    "--ckpt-every", every, "--log-every", max(1, n // 6), "--eval-every", every,
                    "--keep", 10)
    seconds, _ = run_script(common + ["--results-dir", str(work / "digits-whole")], "train.py")
    whole = only_run(work / "digits-whole")
    proc = subprocess.Popen(common + ["--results-dir", str(work / "digits")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((work / "digits").glob(f"*/checkpoints/{every:07d}.pt")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RowError(f"train.py wrote no checkpoint {every} to kill it after: "
                           f"{last_line(proc.communicate()[1])}")
        time.sleep(0.02)
    proc.send_signal(9)  # SIGKILL
    proc.communicate()
    killed = only_run(work / "digits")
    kept = [int(p.stem) for p in sorted((killed / "checkpoints").glob("[0-9]*.pt"))]
    resume_seconds, _ = run_script(script("train.py", "--resume", killed), "train.py --resume")
    a, b = (torch.load(sorted((d / "checkpoints").glob("[0-9]*.pt"))[-1], weights_only=True)
            for d in (whole, killed))
    if a["step"] != n or b["step"] != n:
        raise RowError(f"the runs ended at steps {a['step']} and {b['step']}, not {n}")
    diff = max(float((a[k][name].float() - b[k][name].float()).abs().max())
               for k in ("model", "ema") for name in a[k])
    log = read_log(whole)
    losses = [e["loss"] for e in log if "loss" in e]
    return dict(row="check", model="digits DiT", mode=f"train {n}, SIGKILL, resume",
                seconds=seconds, steps_per_s=n / seconds, killed_with_checkpoints=kept,
                resume_seconds=resume_seconds, max_abs_weight_diff=diff, bit_identical=diff == 0.0,
                first_loss=losses[0], last_loss=losses[-1],
                heldout_loss=[e["heldout_loss"] for e in log if e.get("event") == "eval"],
                run=str(killed))


def digits_checkpoint(work):
    """The last checkpoint of the digits-train row's resumed run."""
    found = sorted((work / "digits").glob("*/checkpoints/[0-9]*.pt"))
    if not found:
        raise RowError(f"no digits run in {work / 'digits'}: the digits-train row failed or did "
                       f"not run")
    return found[-1]


def row_digits_sample(preset, device, work):
    """sample.py on the digits run: a grid of 16 and an FID set (DDPM 250, the paper's)."""
    ckpt, n = digits_checkpoint(work), preset["digits_samples"]
    grid_seconds, _ = run_script(script("sample.py", "--ckpt", ckpt, "--grid", 16, "--out",
                                        work / "digits-grid.png"), "sample.py --grid")
    seconds, _ = run_script(script("sample.py", "--ckpt", ckpt, "--num-samples", n, "--batch-size",
                                   n, "--out", work / "digits-set"), "sample.py --num-samples")
    images = np.load(work / "digits-set.npz")["arr_0"]
    return dict(row="check", model="digits DiT", mode=f"sample.py grid 16, FID set {n}",
                seconds=seconds, grid_seconds=grid_seconds, images_per_s=n / seconds,
                shape=list(images.shape), mean=float(images.mean()), std=float(images.std()))


def row_torchrun_sample(preset, device, work):
    """
    sample.py under torchrun (2 processes, two_ranks): its images against the same images of the
    FID set (the same bytes on one device type; across CPU and GPU, kernels' rounding).
    """
    ckpt, n = digits_checkpoint(work), preset["torchrun_samples"]
    device, env, note = two_ranks(device)
    seconds, _ = run_script(torchrun("sample.py", "--ckpt", ckpt, "--num-samples", n,
                                     "--out", work / "digits-set-torchrun"), "torchrun sample.py",
                            env=env)
    ours = np.load(work / "digits-set-torchrun.npz")["arr_0"].astype(int)
    reference = work / "digits-set.npz"
    row = dict(row="check", model="digits DiT", mode=f"torchrun sample.py, 2 processes, {n} images",
               seconds=seconds, shape=list(ours.shape), device=str(device), note=note)
    if reference.exists():  # image k has its own seed: the same images whatever the processes
        theirs = np.load(reference)["arr_0"][:n].astype(int)
        row.update(identical_to_fid_set=bool(np.array_equal(ours, theirs)),
                   max_abs_pixel_diff=int(np.abs(ours - theirs).max()))
    return row


SCRIPT_ROWS = {"torchrun-train": row_torchrun_train, "demo": row_demo,
               "digits-train": row_digits_train, "digits-sample": row_digits_sample,
               "torchrun-sample": row_torchrun_sample}


def one_command(spec, preset, device, precision, compile=False, peak=None, threads=None,
                work=None):
    """The command line that runs one row in a process of its own (bench.py --one SPEC)."""
    command = script("bench.py", "--one", json.dumps(spec), "--preset", preset, "--device", device,
                     "--precision", precision)
    command += ["--threads", str(threads)] if threads else []
    command += ["--work", str(work)] if work else []
    command += ["--compile"] if compile else []
    return command + (["--peak-tflops", str(peak)] if peak else [])


def print_row(spec, run, *args):
    """
    bench.py --one SPEC, a row in a process of its own: run(spec, *args)'s results (bench.run_row's)
    printed as one JSON line; any failure (no CUDA, out of memory, a compile error) as a result
    whose error is one sentence.
    """
    try:
        results = run(spec, *args)
    except Exception as e:
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        error = f"{type(e).__name__}: {first}"
        if isinstance(e, RowError):  # its message is the sentence
            error = str(e)
        elif isinstance(e, torch.OutOfMemoryError):
            error = "out of memory"
        padded = [*spec, "", ""]  # ['vae'] has no model or mode
        results = [dict(row=spec[0], model=padded[1], mode=padded[2], error=error)]
    print(json.dumps(results))


def run_rows(specs, *command):
    """
    bench.py's table: each row (bench.run_row's spec) in a process of its own (one_command's, with
    `command`'s arguments), one after the other; their results. A row that fails stops bench.py
    with the end of what it printed to stderr.
    """
    results = []
    for spec in specs:
        done = subprocess.run(one_command(spec, *command), capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"error: {' '.join(spec)} failed:\n{done.stderr[-3000:]}")
        results += json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {' '.join(spec)}: done", file=sys.stderr)
    return results


def suite_rows(device, precision, work, peak=None, only=None):
    """The device suite as commands: [{id, what, command, estimate_s}], in the order they run."""
    rows = []
    for key, what, spec, compiled, estimate in DEVICE_SUITE:
        if only and key not in only:
            continue
        command = one_command(spec, "device", device, precision, compiled, peak, work=work)
        rows.append(dict(id=key, what=what, command=command, estimate_s=estimate))
    return rows


def run_suite(rows, json_path=None, budget=SUITE_BUDGET_S, setup="", missing=None, slack=30):
    """
    Run each row's command under a timeout (twice its estimate + slack seconds, at most what is
    left of `budget`); after every row the JSON (if given) is rewritten atomically, so a suite
    that is stopped keeps what it measured. missing: a sentence saying why no row can run here (no
    CUDA): each row records it, none runs. Returns the rows, each with its status (ok, failed,
    timeout, skipped, not run), seconds, error (one sentence) and results.
    """
    deadline = time.monotonic() + budget
    done = []
    for row in rows:
        row = dict(row, status="ok", seconds=0.0, error=None, results=[])
        left = deadline - time.monotonic()
        if missing:
            row.update(status="not run", error=missing)
        elif left < row["estimate_s"]:
            row.update(status="skipped",
                       error=f"skipped: {left:.0f} s of the suite's {budget:.0f} s were left, and "
                             f"the row needs about {row['estimate_s']} s")
        else:
            row["timeout_s"] = timeout = max(1, int(min(2 * row["estimate_s"] + slack, left)))
            started = time.perf_counter()
            try:
                _, out = run_script(row["command"], row["id"], timeout)
                row["results"] = json.loads(out.strip().splitlines()[-1])
                errors = [r["error"] for r in row["results"] if r.get("error")]
                if errors:
                    row.update(status="failed", error=errors[0])
            except RowError as e:
                status = "timeout" if "did not finish" in str(e) else "failed"
                row.update(status=status, error=str(e))
            except (ValueError, IndexError):
                row.update(status="failed", error=f"{row['id']} printed no result")
            row["seconds"] = time.perf_counter() - started
        done.append(row)
        print(f"  {row['id']}: {row['status']} ({row['seconds']:.0f} s)"
              + (f": {row['error']}" if row["error"] else ""), file=sys.stderr)
        if json_path:
            write_json(json_path, suite_report(done, setup, budget))
    return done


def suite_report(rows, setup, budget):
    """What --suite --json writes: the setup, each row, every result and the targets."""
    results = [r for row in rows for r in row["results"]]
    return dict(setup=setup, budget_s=budget, seconds=sum(r["seconds"] for r in rows), rows=rows,
                results=results, targets=target_records(results))


def target_records(results):
    """targets(results) as the JSON records bench.py and the suite write."""
    return [dict(target=what, value=value, met=met) for what, value, met in targets(results)]


def setup_line(device, precision):
    """The GPU (or CPU), torch, CUDA and NCCL versions and the date: what each row cites."""
    line = describe(device, precision, False)
    if device.type == "cuda":
        try:
            version = torch.cuda.nccl.version()
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception as e:  # a broken NCCL is for the torchrun rows to report
            nccl = f"unknown ({type(e).__name__})"
        line += f"; CUDA {torch.version.cuda}; NCCL {nccl}"
    return line


def print_results(results):
    """The table, the end-to-end checks of the device suite, and the targets."""
    print(format_table([r for r in results if r["row"] != "check"]))
    checks = [r for r in results if r["row"] == "check"]
    if checks:
        print("\nchecks")
    for r in checks:
        facts = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in r.items() if k not in ("row", "model", "mode", "run"))
        print(f"  {r['model']}, {r['mode']}: {facts}")
    print("\ntargets")
    for what, value, met in targets(results):
        verdict = "(met)" if met else "(missed)" if met is False else "(not measured)"
        print(f"  {what}: {value} {verdict}")


def add_flags(p):
    """bench.py's flags for the suite (`p`: its argparse parser)."""
    p.add_argument("--suite", choices=["device"], help="device: every GPU figure in one command, "
                   f"about {SUITE_ESTIMATE_S // 60} minutes on one H100, at most "
                   f"{SUITE_BUDGET_S // 60} (docs/speed-and-memory.md)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --suite: list its rows, commands and estimates")
    p.add_argument("--only", nargs="+", metavar="ROW",
                   help="with --suite: these rows only (the ids --dry-run lists; --device cpu "
                   "--only digits-train digits-sample rehearses those on a CPU)")
    p.add_argument("--work", help="with --suite: the folder for its runs and samples (default: a "
                   "temporary one)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one row (a JSON spec), print_row


def main_suite(args):
    """--suite device: list it (--dry-run) or run it; the JSON is written as it goes."""
    device = torch.device(args.device or "cuda")
    cuda = device.type != "cuda" or torch.cuda.is_available()
    precision = args.precision or "bf16"
    if cuda and not args.precision:
        precision = training.choose_precision(None, device)
    unknown = sorted(set(args.only or []) - {key for key, *_ in DEVICE_SUITE})
    if unknown:
        sys.exit(f"error: --only {' '.join(unknown)}: no such row (bench.py --suite device "
                 f"--dry-run lists them)")
    temporary = not args.work and not args.dry_run
    work = args.work or ("WORK" if args.dry_run else tempfile.mkdtemp(prefix="dmp-suite-"))
    rows = suite_rows(device, precision, work, args.peak_tflops, args.only)
    if args.dry_run:
        total = sum(r["estimate_s"] for r in rows)
        print(f"bench.py --suite device (torch {torch.__version__}): {len(rows)} rows, about "
              f"{total} s on one H100 with process starts and cold compiles (at most "
              f"{SUITE_ESTIMATE_S} s), within a budget of {SUITE_BUDGET_S} s "
              f"({SUITE_BUDGET_S - total} s of slack), each in its own process under a timeout; "
              f"WORK: {args.work or 'a temporary folder'}")
        for r in rows:
            print(f"  {r['id']} (~{r['estimate_s']} s): {r['what']}\n"
                  f"    {shlex.join(r['command'])}")
        return rows
    setup = setup_line(device, precision) if cuda else "no CUDA device"
    print(f"bench.py --suite device: {setup}; work folder {work}")
    missing = None
    if not cuda:
        missing = f"not run: {NO_CUDA}"
    budget = SUITE_BUDGET_S - (time.monotonic() - STARTED)
    try:
        done = run_suite(rows, args.json, budget=budget, setup=setup, missing=missing)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
    print_results(suite_report(done, setup, budget)["results"])
    failed = [r["id"] for r in done if r["status"] != "ok"]
    if failed:
        sys.exit(f"error: {len(failed)} of {len(done)} rows did not finish: {', '.join(failed)}"
                 + (f" (the JSON, {args.json}, says why for each)" if args.json else ""))
    return done
