"""
What makes a train.py run durable, kept out of the loop a reader came for: the run folder (claimed
race-free, held by one process, removed if a run stops before it holds anything), --resume (the
run's own settings, what a resume may change, its data and base checked), the log that is never
cut mid-line, checkpoints (their entries, atomic saves, restore) and the one-sentence stops (a
non-finite loss, out of memory, Ctrl-C, bad input). train.py calls each in a named line.
"""
import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

import load
import training
from checkpoints import CheckpointError, atomic_save, hold, read_state_dict
from dataset import DataError


#################################################################################
#                      --resume: the run's settings and state                   #
#################################################################################

# What --resume may change: how the run is watched and where it runs, never what it computes
# (--results-dir: the resumed folder may have been moved; the run stays in it; --grad-accum and
# --checkpointing: a run moved to a smaller card).
RESUMABLE = {"resume", "results_dir", "iterations", "device", "precision", "compile", "threads",
             "log_every", "ckpt_every", "keep", "sample_every", "eval_every", "grad_accum",
             "checkpointing"}


def resumed(args):
    """
    (args, resume, run_dir): the command line's settings as they are for a new run (resume and
    run_dir None); with --resume, the run's own (resumed_args), the entries of its last checkpoint
    and its folder.
    """
    given = set(vars(args).pop("given"))
    if not args.resume:
        return args, None, None
    path = Path(args.resume)
    found = load.checkpoints(path) if path.is_dir() else [path]
    if not found:
        sys.exit(f"error: {path} holds no checkpoints to resume from")
    resume = read_state_dict(found[-1])
    if not isinstance(resume.get("args"), dict) or "step" not in resume:
        raise CheckpointError(f"{found[-1]} is not a checkpoint of a train.py run (it records "
                              f"no settings or step): to further-train it, give it to --init")
    run_dir = found[-1].parents[1]
    args = resumed_args(args, given, resume["args"], run_dir)
    if args.iterations < resume["step"]:
        sys.exit(f"error: {found[-1]} is at step {resume['step']}, past --iterations "
                 f"{args.iterations}: give more iterations to continue it")
    return args, resume, run_dir


def resumed_args(args, given, saved, run_dir):
    """
    The settings of a resumed run: its own (`saved`; flags added since it started take their
    defaults), with the command line's value for each RESUMABLE setting it gives (`given`, from
    parse_args). Another setting given with a value other than the run's is refused: the run would
    silently go on without it.
    """
    typed, saved = vars(args), dict(saved)
    if "no_flip" in saved:  # a run started when the flag was --no-flip alone keeps its flips
        saved["flip"] = not saved.pop("no_flip")
    changed = sorted(k for k in given - RESUMABLE if k in saved and saved[k] != typed[k])
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {typed[k]} (the run's: {saved[k]})"
                          for k in changed)
        sys.exit(f"error: a resumed run keeps the settings of {run_dir}, and this command changes "
                 f"them: {flags}; start a new run to change them")
    mine = {k: typed[k] for k in given & RESUMABLE}
    return argparse.Namespace(**{**typed, **saved, **mine, "resume": args.resume})


def check_resumed(resume, run_dir, args, data, base):
    """A resumed run's data (by fingerprint) and --init base (by sha256) must be what it trained
    on: else one sentence (DataError, CheckpointError)."""
    recorded = (resume or {}).get("data_sha256")
    if recorded is not None and recorded != data.fingerprint():
        raise DataError(f"{args.data} now holds other prepared data than {run_dir} was trained on "
                        f"(its fingerprint is {data.fingerprint()[:12]}..., the run recorded "
                        f"{recorded[:12]}...): put that data back, or start a new run")
    recorded = ((resume or {}).get("base") or {}).get("sha256")
    if base and recorded and base["sha256"] not in (None, recorded):
        raise CheckpointError(f"{args.init} is not the base {run_dir} was trained on (its sha256 "
                              f"is {base['sha256'][:12]}..., the run recorded {recorded[:12]}...): "
                              f"put that file back")


def restore(resume, model, ema, opt, scaler, init):
    """
    The step to go on from: 0 for a new run; with --resume, the weights, their EMA (an
    training.EMA), the optimizer and fp16's scale are put back where the checkpoint left them.
    """
    if resume is None:
        return 0
    if init:  # the raw weights train on; `state` holds their EMA if the run keeps one
        model.load_state_dict(resume.get("raw_state", resume["state"]), strict=False)
        if ema is not None:
            ema.model.load_state_dict(resume["state"], strict=False)
    else:
        model.load_state_dict(resume["model"])
        if ema is not None:
            ema.model.load_state_dict(resume["ema"])
    opt.load_state_dict(resume["opt"])
    if scaler is not None and resume.get("scaler"):  # fp16: the scale it had reached
        scaler.load_state_dict(resume["scaler"])
    return resume["step"]


#################################################################################
#                 The run folder: claimed, held, removed if empty               #
#################################################################################

class Folder:
    """
    A run's folder over one train.py call (`with Folder() as folder`): open() claims a new one
    (claim_run_dir) or takes a resumed run's, and holds it for this process (checkpoints.hold);
    kept() says it now holds something worth keeping. A run that stops, whatever the reason,
    before kept() leaves no folder behind; the lock is let go and Ctrl-C's handler restored
    however it ends.
    """
    def __enter__(self):
        self.claimed, self.held = None, None
        self.ctrl_c = signal.getsignal(signal.SIGINT)  # the loop catches Ctrl-C; restored after
        return self

    def __exit__(self, kind, error, trace):
        if kind is not None and self.claimed is not None:
            shutil.rmtree(self.claimed, ignore_errors=True)
        if self.held is not None:
            os.close(self.held)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.ctrl_c)

    def open(self, run_dir, name, results_dir, rank, world):
        """
        The run's folder: a resumed run's own (`run_dir`), else one rank 0 claims as
        results_dir/NNN-name and every process writes into; rank 0 holds it.
        """
        if run_dir is None and rank == 0:
            run_dir = self.claimed = claim_run_dir(Path(results_dir), name)
        if world > 1:
            box = [str(run_dir) if rank == 0 else None]
            dist.broadcast_object_list(box)
            run_dir = Path(box[0])
        if rank == 0:
            # One process at a time writes a run (two resumes of it at once would both log every
            # step and both write checkpoints); the OS lets go when the process ends, however.
            self.held = hold(run_dir, "a train.py run")
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "samples").mkdir(exist_ok=True)
        return run_dir

    def kept(self):
        """The folder holds a log line or a checkpoint: it stays whatever happens next."""
        self.claimed = None


def claim_run_dir(results, name):
    """
    A new, empty run folder results/NNN-name, NNN one above the highest number there, so a folder
    is never reused and deleting an older run changes no later number. mkdir fails if the folder
    exists, so two runs starting together never share one; if another run took the same number
    under another name at the same moment, whichever sees the other's folder gives the number up
    and tries again.
    """
    results.mkdir(parents=True, exist_ok=True)
    while True:
        found = [re.match(r"(\d{3,})-", p.name) for p in results.iterdir()]
        numbers = [int(m.group(1)) for m in found if m]
        number = f"{max(numbers, default=-1) + 1:03d}"
        run_dir = results / f"{number}-{name}"
        try:
            run_dir.mkdir()
        except FileExistsError:
            continue
        if not [p for p in results.glob(f"{number}-*") if p != run_dir]:
            return run_dir
        run_dir.rmdir()
        time.sleep(random.random() / 10)  # two that both gave up try again at different moments


#################################################################################
#                     The log: JSON lines, never cut mid-line                   #
#################################################################################

class RunLog:
    """
    A run's log.jsonl, one JSON object a line, written by rank 0 alone (the other processes'
    calls do nothing). A write that fails (a full disk) is undone: the log never ends mid-line. A
    line of losses makes the run's `folder` (a Folder) worth keeping.
    """
    def __init__(self, run_dir, rank, folder=None):
        self.path, self.writes, self.folder = run_dir / "log.jsonl", rank == 0, folder

    def __call__(self, **entry):
        if not self.writes:
            return
        with open(self.path, "a+b", buffering=0) as f:
            end, line = f.tell(), (json.dumps(entry) + "\n").encode()
            if end and os.pread(f.fileno(), 1, end - 1) != b"\n":  # a hand edit lost the last newline
                line = b"\n" + line  # so this entry is a line of its own, and the last one parses
            rest = memoryview(line)
            try:
                while rest:
                    rest = rest[f.write(rest):]
            except OSError as e:
                f.truncate(end)
                e.filename = str(self.path)
                raise
        if "loss" in entry and self.folder is not None:
            self.folder.kept()


class LossMeter:
    """
    The LOG_TERMS summed over the steps since the last log line, on the device (no host sync
    between logs); mean() averages them over those steps and every process, and starts again. (A
    checkpoint can come between two log lines: the mean divides by the steps it sums.)
    """
    def __init__(self, step, device):
        self.sum, self.since = torch.zeros(len(training.LOG_TERMS), device=device), step
        self.started = time.time()

    def add(self, terms):
        self.sum += terms

    def mean(self, step, world):
        """({term: mean}, steps per second) since the last call."""
        if world > 1:
            dist.all_reduce(self.sum)
        n = step - self.since
        mean = dict(zip(training.LOG_TERMS, (self.sum / (n * world)).tolist(), strict=True))
        speed = n / (time.time() - self.started)
        self.sum.zero_()
        self.since, self.started = step, time.time()
        return mean, speed


#################################################################################
#                       Checkpoints: entries, atomic saves                      #
#################################################################################

class Checkpoints:
    """
    A run's checkpoints/NNNNNNN.pt: save(step) writes one atomically (rank 0; every process waits
    for it) and deletes all but the last `keep`; `last` is the last one written.
    """
    def __init__(self, run_dir, keep, rank, world, **state):
        self.run_dir, self.keep, self.rank, self.world, self.state = run_dir, keep, rank, world, state
        self.last = None

    def save(self, step):
        path = None
        if self.rank == 0:
            path = self.run_dir / "checkpoints" / f"{step:07d}.pt"
            atomic_save(checkpoint_entries(step=step, **self.state), path)
            for old in load.checkpoints(self.run_dir)[:-self.keep]:
                old.unlink()
        if self.world > 1:
            dist.barrier()
        self.last = path
        return path


def checkpoint_entries(model, ema, opt, args, data, base, scaler, step, sd):
    """
    A further-training run stores a patch (load.patch_entries, `base` its load.base_record)
    plus the optimizer (and fp16's gradient scaler); pretraining the model. `weights` says which
    weights load: with --ema the EMA, what the run's grids and held-out numbers measured; the raw
    ones are kept too (raw_state, model) so --resume is exact. `ema` always holds the whole model
    that loads (the raw weights without --ema; --method full on a DiT too, not on SD's UNet, `sd`):
    the official DiT's find_model returns checkpoint["ema"] where there is one, else the whole
    dict, which no DiT loads. It shares its tensors with model/state: torch.save writes them once.
    """
    averaged = ema.model if ema is not None else None
    entries = dict(step=step, args=vars(args), opt=opt.state_dict(), config=model.config,
                   scaler=scaler.state_dict() if scaler is not None else None,
                   noise_schedule=args.noise_schedule, vae=data.vae,
                   weights="ema" if ema is not None else "raw", data_sha256=data.fingerprint())
    if args.text_encoder:  # sample.py reads a text DiT's encoder from here
        entries["text_encoder"] = str(Path(args.text_encoder).resolve())
    if args.init:
        entries.update(load.patch_entries(model, base))
        state = entries["state"]
        whole = (averaged or model).state_dict()
        if ema is not None:
            entries.update(state={k: whole[k] for k in state}, raw_state=state)
        if args.method == "full" and not sd:
            entries.update(state={k: whole[k] for k in state}, ema=whole)
    else:
        weights = model.state_dict()
        entries.update(model=weights, ema=averaged.state_dict() if ema is not None else weights,
                       method=args.method, options=getattr(model, "patch_options", None))
    return entries


#################################################################################
#                        Stops, each one sentence                               #
#################################################################################

def stop_if_not_finite(mean, trained, step, last_ckpt, bar):
    """A NaN or inf stops the run here, before any checkpoint could store it: the last one stays."""
    if math.isfinite(mean["loss"]) and all(bool(p.isfinite().all()) for p in trained):
        return
    bar.close()
    sys.exit(f"error: the loss (mean {mean['loss']:.4g}) or the weights are no longer finite at "
             f"step {step}, so the run stopped without saving, its last good checkpoint being "
             f"{last_ckpt or 'none (none was written yet)'}")


@contextlib.contextmanager
def out_of_memory(args, step, rank, world, device, bar):
    """An out-of-memory error in the step becomes one sentence: the batch that failed and what
    would help."""
    try:
        yield
    except torch.OutOfMemoryError:
        bar.close()
        share = args.batch_size // world
        micro = share // args.grad_accum
        helps = []
        if micro > 1:
            helps.append(f"--grad-accum {2 * args.grad_accum} (micro-batches of {micro // 2})")
        if not args.checkpointing:
            helps.append("--checkpointing (each block recomputed in the backward pass)")
        helps.append("a smaller --batch-size")
        where = f"process {rank} of {world} ({device})" if world > 1 else str(device)
        sys.exit(f"error: out of memory on {where} at step {step + 1}: a global batch of "
                 f"{args.batch_size} ({share} on this process in {args.grad_accum} micro-batch"
                 f"{'es' if args.grad_accum > 1 else ''} of {micro}) did not fit; "
                 f"{', '.join(helps[:-1])} or {helps[-1]} would help "
                 f"(python bench.py --estimate-memory estimates each)")


def catch_ctrl_c(world):
    """
    A list that Ctrl-C (SIGINT) appends to instead of raising KeyboardInterrupt mid-step (an
    optimizer half-way through its update, a checkpoint missing); a second Ctrl-C raises as usual.
    One process only: under torchrun the processes would stop at different steps.
    """
    caught = []
    if world > 1 or threading.current_thread() is not threading.main_thread():
        return caught

    def handler(signum, frame):
        caught.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, handler)
    return caught


def stop_interrupted(checkpoints, folder, step, bar):
    """Ctrl-C came in the last step, which is complete: save it, so that --resume goes on."""
    bar.close()
    path = checkpoints.save(step)
    folder.kept()
    sys.exit(f"error: interrupted (Ctrl-C) at step {step}; the run is saved in {path}, and "
             f"--resume {checkpoints.run_dir} continues it")


@contextlib.contextmanager
def one_sentence():
    """The command line: bad input and faults (a full disk) end in one sentence, not a traceback."""
    try:
        yield
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a write that failed (disk full, permissions): what was written is kept
        sys.exit(f"error: {e.filename or 'writing the run'}: {e.strerror or e}")
    except KeyboardInterrupt:  # before the loop (in it, the loop saves and says so): nothing kept
        sys.exit("error: interrupted (Ctrl-C) before the first step; a new run leaves no folder")
