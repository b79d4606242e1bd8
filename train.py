"""
The one training loop: pretrain a DiT, or further-train a converged one with any method of dmp.py.

    python train.py                                      # the demo: DMP on the bundled digits, CPU
    python train.py --dataset ffhq --model DiT-L/2       # pretrain DiT-L/2 on prepared FFHQ
    python train.py --dataset ffhq --init runs/000-ffhq-pretrain --method dmp          # the paper
    torchrun --nproc_per_node 8 train.py --dataset imagenet --init DiT-XL-2-256x256.pt
    python train.py --dataset laion --model sd15 --init v1-5-pruned-emaonly.safetensors  # SD 1.5
    python train.py --dataset coco --model DiT-B/2 --text-encoder stable-diffusion-v1-5/  # text DiT

Every run writes runs/NNN-<dataset>-<method>/: log.jsonl (one JSON object per line), checkpoints/
(the last --keep, written atomically), samples/ (a grid every --sample-every steps). --resume
RUN_DIR continues a run exactly: data order and every random draw are functions of (seed, step),
so an interrupted run ends bit-identical to an uninterrupted one (on CPU; GPU kernels are not all
deterministic).

Reading order: the settings (parse_args), the data (get_batch), the step (train_step), the set-up
(build_model and the functions after it), then run(), the loop.
"""
import argparse
import contextlib
import copy
import functools
import json
import math
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import digits_fid
import distributed
import dmp
import load
import sampling
from checkpoints import CheckpointError, atomic_save, read_state_dict
from diffusion import create_diffusion
from distributed import seed_of
from load import checkpoints
from model_clip import caption_embeddings, encode_text
from model_dit import CONFIGS, DiT
from model_unet import UNet_configs
from model_vae import load_vae
from prepare_data import DataError, PreparedData

# A DiT small enough to pretrain on the 8x8 digits on a CPU (16 tokens, 0.33M parameters).
DIGITS_MODEL = dict(patch_size=2, hidden_size=64, depth=4, num_heads=4)

# Dataset presets: the paper's settings (appendix) as defaults, each overridable by its flag.
PRESETS = {
    "ffhq": dict(data="data/ffhq256", noise_schedule="cosine", unconditional=True, model="DiT-L/2"),
    "imagenet": dict(data="data/imagenet256", noise_schedule="linear", unconditional=False,
                     model="DiT-XL/2"),
    # The bundled digits (assets/README.md): pretraining the tiny DiT, and the demo that patches
    # it. No flips: a mirrored digit is another shape.
    "digits": dict(data="assets/digits", noise_schedule="cosine", unconditional=True,
                   model="digits", holdout=297, ema=0.999, no_flip=True, log_every=100,
                   ckpt_every=2000, sample_every=2000, eval_every=1000, device="cpu", threads=1),
    # Text-to-image DiT on MS-COCO (Table 2): cosine schedule (appendix), the pooled CLIP ViT-L/14
    # caption through the class-label path (model_dit.TextEmbedder), the gate on t + text (Table 9).
    "coco": dict(data="data/coco256", noise_schedule="cosine", unconditional=False, model="DiT-B/2",
                 text=True),
    # Text-to-image on captioned data (prepare_data.py --captions): SD 1.5 further-trained on its
    # own data with its own schedule (ldm's "linear" is the scaled_linear of diffusers); the gate
    # reads t + text (Table 9).
    "laion": dict(data="data/laion512", noise_schedule="scaled_linear", unconditional=False,
                  model="sd15", text=True, sample_every=0),
    "demo": dict(data="assets/digits", noise_schedule="cosine", unconditional=True,
                 init="assets/dit_digits.pt", method="dmp", holdout=297, no_flip=True,
                 iterations=1500, log_every=50, ckpt_every=500, sample_every=1500, device="cpu",
                 eval_bpd=True, bpd_images=100, threads=1, eval_fd=True),
}


#################################################################################
#                         Settings: the command line                            #
#################################################################################

def parse_args(argv=None):
    """The command line over the --dataset preset; `given`: the settings the command line names."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="demo", choices=list(PRESETS),
                   help="a preset of the settings below")
    p.add_argument("--data", help="a folder written by prepare_data.py")
    p.add_argument("--model", help="a DiT config (DiT-XL/2, ...; 'digits' for the tiny one) when "
                   "pretraining; sd15 (or sd-tiny) for Stable Diffusion with --init")
    p.add_argument("--init", help="none: pretrain from scratch; an official name, a checkpoint or "
                   "a run folder to further-train")
    p.add_argument("--method", choices=dmp.METHODS, help="further-training method (default dmp "
                   "with --init; with no --init, dmp trains backbone and prompts together: Table "
                   "6)")
    p.add_argument("--noise-schedule", choices=["linear", "cosine", "scaled_linear"],
                   help="ffhq, coco: cosine; imagenet: linear; laion (SD): scaled_linear")
    p.add_argument("--unconditional", action=argparse.BooleanOptionalAction,
                   help="every label 0, num_classes 1")
    p.add_argument("--class-dropout", type=float, default=0.1,
                   help="label dropout for guidance (conditional)")
    p.add_argument("--caption-dropout", type=float, default=0.1,
                   help="text data: empty caption, for guidance")
    p.add_argument("--text-encoder", help="a DiT on text data: the CLIP ViT-L/14 text encoder (a "
                   "diffusers folder, its text_encoder/ or an SD 1.x checkpoint); SD uses its own")
    p.add_argument("--holdout", type=int, default=0,
                   help="images kept out of training for the held-out metrics")
    # optimisation (DMP appendix: AdamW, lr 1e-4 constant, no weight decay, batch 128, flips, no
    # EMA)
    p.add_argument("--iterations", type=int,
                   help="default 50000 with --init (paper), 400000 from scratch")
    p.add_argument("--batch-size", type=int, default=128,
                   help="global batch, split over the processes")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--lr-scale", type=float, default=1.0,
                   help="the method's multiplier of --lr: the DMP paper trains every method at "
                   "the same lr (1); DiffFit's paper: 10 for DiffFit and BitFit")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema", type=float,
                   help="EMA decay; default 0.9999 when pretraining, none when further-training")
    p.add_argument("--no-flip", action="store_true", help="turn off random horizontal flips")
    p.add_argument("--importance-coef", type=float, default=1.0,
                   help="Table 4e: importance balancing (Eqs. 12-13)")
    p.add_argument("--load-coef", type=float, default=1.0, help="Table 4e: load balancing (Eq. 11)")
    # method options (dmp.patch)
    g = p.add_argument_group("DMP options (dmp.MixtureOfPrompts)")
    g.add_argument("--gate", choices=["linear", "attention"], default="linear", help="Table 4a")
    g.add_argument("--selection", choices=["soft", "hard"], default="soft", help="Table 4b")
    g.add_argument("--top-k", type=float, default=0.75,
                   help="fraction kept by hard selection (192 of 256)")
    g.add_argument("--hard-weights", choices=["softmax", "one"], default="softmax",
                   help="hard selection: a softmax over the kept logits (authors' code) or "
                   "weight 1 (the paper's text)")
    g.add_argument("--prompt-selection", choices=["distinct", "uniform"], default="distinct",
                   help="Table 4c")
    g.add_argument("--position", choices=["add", "prepend"], default="add", help="Table 4d")
    g.add_argument("--num-prompts", type=int,
                   help="prepend: how many (50); add: always one per token")
    g.add_argument("--prompt-depth", type=int, help="prompts in the first k blocks only (Fig. 4)")
    g.add_argument("--prompt-init", choices=["zero", "random"], default="zero")
    g.add_argument("--gate-cond", choices=["t", "t+c"], help="Table 9: t+c for text data, else t")
    g.add_argument("--prompt-grid", type=int, default=16,
                   help="SD UNet: prompts per block, grid x grid")
    g.add_argument("--block-index", choices=["onehot", "scalar"], default="onehot")
    g.add_argument("--noisy-gate", action="store_true", help="learned gate noise (authors' code)")
    g.add_argument("--gate-lr-scale", type=float, default=1.0, help="10 in the authors' code")
    g.add_argument("--authors-code", action="store_true",
                   help="all four of the authors' deviations (dmp.AUTHORS_CODE)")
    g.add_argument("--lora-rank", type=lora_rank, default=16, help="an integer, or 'dmp': the rank "
                   "whose parameter count is nearest DMP's on this model (dmp.lora_rank_matching)")
    g.add_argument("--gamma-fraction", type=float, default=0.5,
                   help="DiffFit: the first half of the blocks get scale factors (its Table 4b)")
    g.add_argument("--pos-scale", type=float, default=1.0,
                   help="DiffFit: 0.5 fine-tunes a 256 model at 512")
    # machinery
    p.add_argument("--results-dir", default="runs")
    p.add_argument("--resume", help="a run folder (or one of its checkpoints) to continue")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="default: bf16 autocast on a GPU that computes in bf16 (A100, H100, ...), "
                   "fp16 autocast with a gradient scaler on one that does not (V100, T4), fp32 on "
                   "CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile each block of the model")
    # memory (README, "Memory: what fits your card"); neither changes what a step computes
    p.add_argument("--grad-accum", type=int, default=1,
                   help="each step's batch in K micro-batches whose gradients add up before the "
                   "optimizer's step: the activations of 1/K of the batch")
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing: each block keeps only its input and runs again "
                   "in the backward pass (about 1/3 more compute)")
    p.add_argument("--threads", type=int, help="torch's CPU threads (default torch's choice; the "
                   "digits presets use 1: their matrices are too small to share, and idle threads "
                   "spin while other jobs hold the cores)")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=5000)
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (older ones are deleted)")
    p.add_argument("--sample-every", type=int, default=10000,
                   help="a sample grid every K steps (0: never)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="held-out loss every K steps (needs --holdout)")
    p.add_argument("--eval-bpd", action=argparse.BooleanOptionalAction, default=False,
                   help="held-out bits/dim before and after training")
    p.add_argument("--eval-fd", action=argparse.BooleanOptionalAction, default=False,
                   help="with --eval-bpd, on the bundled digits: the sample quality too "
                   "(digits_fid: FD and KID of 297 samples against the held-out digits)")
    p.add_argument("--bpd-images", type=int, help="bits/dim on this many held-out images (default "
                   "all; the bound costs 1000 forward passes of them)")
    p.error = usage_error
    p.set_defaults(text=False)
    p.set_defaults(**PRESETS[p.parse_known_args(argv)[0].dataset])  # the preset, then the flags
    args = p.parse_args(argv)
    # The settings the command line itself gives (--resume keeps the run's other settings): parsed
    # again into a namespace that already holds every setting, so argparse fills in no default.
    unset = object()
    typed = p.parse_args(argv, argparse.Namespace(**{k: unset for k in vars(args)}))
    args.given = sorted(k for k, v in vars(typed).items() if v is not unset)
    if args.init == "none":
        args.init = None
    if args.method is None and args.init:
        args.method = "dmp"
    if args.iterations is None:
        args.iterations = 50_000 if args.init else 400_000
    if args.ema is None:
        args.ema = 0.0 if args.init else 0.9999
    bad = range_errors(args)
    if bad:
        p.error(f"out of range: {', '.join(bad)}")
    return args


def usage_error(message):
    """argparse's errors as one line (exit status 2, argparse's), with no usage text burying it."""
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(2)


# The range of every number a flag takes: a number outside it is refused before anything is made.
AT_LEAST_ONE = ("iterations", "batch_size", "log_every", "ckpt_every", "keep", "threads",
                "bpd_images", "num_prompts", "prompt_depth", "prompt_grid", "grad_accum")
AT_LEAST_ZERO = ("lr", "weight_decay", "holdout", "sample_every", "eval_every", "importance_coef",
                 "load_coef", "gate_lr_scale", "lr_scale", "seed")


def range_errors(args):
    """Each flag whose number is out of its range, as '--flag value (must be ...)' (NaN: none)."""
    v = vars(args)
    bad = [(k, "at least 1") for k in AT_LEAST_ONE if v[k] is not None and not v[k] >= 1]
    bad += [(k, "at least 0") for k in AT_LEAST_ZERO if v[k] is not None and not v[k] >= 0]
    bad += [(k, "from 0 to 1") for k in ("class_dropout", "caption_dropout") if not 0 <= v[k] <= 1]
    ranges = [("ema", 0 <= args.ema < 1, "from 0, below 1"),
              ("top_k", 0 < args.top_k <= 1, "above 0, at most 1"),
              ("pos_scale", args.pos_scale > 0, "above 0"),
              ("gamma_fraction", 0 <= args.gamma_fraction <= 1, "from 0 to 1")]
    bad += [(k, why) for k, ok, why in ranges if not ok]
    return [f"--{k.replace('_', '-')} {v[k]} (must be {why})" for k, why in bad]


# What --resume may change: how the run is watched and where it runs, never what it computes
# (--results-dir: the resumed folder may have been moved; the run stays in it; --grad-accum and
# --checkpointing: a run moved to a smaller card).
RESUMABLE = {"resume", "results_dir", "iterations", "device", "precision", "compile", "threads",
             "log_every", "ckpt_every", "keep", "sample_every", "eval_every", "grad_accum",
             "checkpointing"}


def resumed_args(args, given, saved, run_dir):
    """
    The settings of a resumed run: its own (`saved`; flags added since it started take their
    defaults), with the command line's value for each RESUMABLE setting it gives (`given`, from
    parse_args). Another setting given with a value other than the run's is refused: the run would
    silently go on without it.
    """
    typed = vars(args)
    changed = sorted(k for k in given - RESUMABLE if k in saved and saved[k] != typed[k])
    if changed:
        flags = ", ".join(f"--{k.replace('_', '-')} {typed[k]} (the run's: {saved[k]})"
                          for k in changed)
        sys.exit(f"error: a resumed run keeps the settings of {run_dir}, and this command changes "
                 f"them: {flags}; start a new run to change them")
    mine = {k: typed[k] for k in given & RESUMABLE}
    return argparse.Namespace(**{**typed, **saved, **mine, "resume": args.resume})


def method_options(args):
    """The command line's options for dmp.patch(model, args.method, **options)."""
    if args.method not in ("dmp", "prompt"):
        options = dict(lora=dict(rank=args.lora_rank),
                       difffit=dict(gamma_fraction=args.gamma_fraction, pos_scale=args.pos_scale))
        return dict(options.get(args.method, {}), lr_scale=args.lr_scale)
    options = dict(gate=args.gate, selection=args.selection, top_k=args.top_k,
                   prompt_selection=args.prompt_selection, position=args.position,
                   num_prompts=args.num_prompts, depth=args.prompt_depth, init=args.prompt_init,
                   gate_cond=args.gate_cond, block_index=args.block_index,
                   noisy_gate=args.noisy_gate, gate_lr_scale=args.gate_lr_scale,
                   hard_weights=args.hard_weights, lr_scale=args.lr_scale)
    if options["gate_cond"] is None:  # Table 9: the gate reads the text too
        options["gate_cond"] = "t+c" if args.text else "t"
    if args.authors_code:
        options.update(dmp.AUTHORS_CODE)
    if args.model in UNet_configs:
        options["grid"] = args.prompt_grid
    return {k: v for k, v in options.items() if v is not None}


def lora_rank(value):
    """--lora-rank: a positive integer or 'dmp'."""
    if value == "dmp":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a positive integer nor 'dmp'")
    return int(value)


#################################################################################
#                     Data: every draw a function of (seed, step)               #
#################################################################################

def split(data, holdout):
    """Training and held-out indices: a fixed random `holdout` images (seed 0, whatever --seed)."""
    perm = np.random.default_rng(0).permutation(len(data))
    return np.sort(perm[holdout:]), np.sort(perm[:holdout])


@functools.lru_cache(maxsize=2)
def epoch_order(seed, epoch, n):
    """The order of the training images in an epoch: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def get_batch(data, train_rows, step, args, device, rank=0, world=1):
    """
    This process's share of step `step`'s global batch: images (epoch after epoch, each a fresh
    permutation), flips, timesteps and noise. The global draws are the same on every process and
    each takes its slice, so the data a step sees does not depend on the number of processes.
    """
    G, start = args.batch_size, step * args.batch_size
    epochs, positions = divmod(np.arange(start, start + G), len(train_rows))
    idx = np.array([epoch_order(args.seed, e, len(train_rows))[i]
                    for e, i in zip(epochs, positions, strict=True)])
    rng = np.random.default_rng(seed_of(args.seed, step, 1))
    flip = np.zeros(G, bool)
    if not args.no_flip:
        flip = rng.random(G) < 0.5
    gen = torch.Generator(device).manual_seed(seed_of(args.seed, step))
    t = torch.randint(0, 1000, (G,), generator=gen, device=device)
    noise = torch.randn((G, *data.shape), generator=gen, device=device)
    # latents: z = mean + std * posterior_noise
    posterior_noise = torch.randn((G, *data.shape), generator=gen, device=device)
    local = slice(rank * G // world, (rank + 1) * G // world)
    x, y = data.batch(train_rows[idx[local]], flip[local], device=device,
                      noise=posterior_noise[local])
    if args.unconditional:
        y = torch.zeros_like(y)
    if args.text:  # one of the image's captions (COCO has five), or "" (caption dropout)
        captions = [data.captions[train_rows[i]] for i in idx]
        pick = [int(rng.integers(len(c))) for c in captions]
        drop = rng.random(G) < args.caption_dropout
        y = ["" if d else c[j] for c, j, d in zip(captions, pick, drop, strict=True)][local]
    return x, y, t[local], noise[local]


#################################################################################
#            The training step: micro-batches, precision and memory             #
#################################################################################

LOG_TERMS = ("loss", "mse", "vb", "importance", "load")


def compute_loss(model, raw, diffusion, batch, args):
    """
    The hybrid diffusion loss plus DMP's balancing losses (zero for other methods); y in the batch
    is the model's condition (a tensor, or a dict of the model's keyword arguments). Returns the
    loss and the LOG_TERMS.
    """
    x, y, t, noise = batch
    if not isinstance(y, dict):
        y = dict(y=y)
    terms = diffusion.training_losses(model, x, t, y, noise=noise)
    importance, balance = dmp.balancing_losses(raw)  # Eqs. 12-13 and Eq. 11 ("load")
    loss = terms["loss"].mean() + args.importance_coef * importance + args.load_coef * balance
    vb = terms.get("vb", terms["mse"] * 0)
    return loss, torch.stack([loss, terms["mse"].mean(), vb.mean(), importance, balance])


def class_labels(y):
    """Class labels (or the model's inputs, as a dict) condition the model as they are."""
    return y


def train_step(model, raw, diffusion, opt, batch, args, autocast, scaler=None,
               condition=class_labels, ema=None):
    """
    One optimisation step, what train.py's loop and bench.py run: this process's share of the
    step's global batch (get_batch's) in args.grad_accum micro-batches whose gradients add up
    before the optimizer's step, then the EMA (`ema`: ema_pairs). `condition` turns the batch's
    y into the model's condition (conditioning's choice; class labels by default). Returns the
    step's LOG_TERMS, means over the share, on the device (no host sync).

    Each micro-batch's loss is divided by K, so the summed gradients are the whole share's to float
    rounding. Every term is a mean over samples, hence additive: the diffusion loss, the importance
    loss (the CV^2 across prompts of each sample's gate weights, averaged over the batch: Eqs.
    12-13) and Eq. 11's load (a count per sample). Hard selection's load is the exception: Shazeer
    et al.'s smooth estimator is, per block, the CV^2 of S, the sum over the batch of each sample's
    probabilities of keeping each prompt. Each micro-batch (and under DDP each process, as before)
    takes it of its own sum S_k, and the step's load is the mean over k of CV^2(S_k), where the
    whole batch's is CV^2(sum_k S_k). With w_k = mean(S_k) / mean(S), CV^2(S) <= sum_k w_k
    CV^2(S_k) (a standard deviation is a seminorm, and squaring is convex), and w_k is 1/K to
    within how far each sample's probabilities are from summing to top_k: to that tolerance the
    step's load is at least the batch's and pushes toward balance at least as hard
    (tests/test_train.py checks the inequality; there w_k is 1/K to 4%). The draws inside the
    forward pass (label dropout, the gate's noise) come from torch's generator, seeded per step
    and process by the loop: like their split over processes, their split over micro-batches
    changes which numbers are drawn, not their distribution; the data, timesteps and noise
    (get_batch) are the same whatever the split.
    """
    K, size = args.grad_accum, len(batch[0])
    # Before the forward: the last step's gradients are freed before the activations build up.
    opt.zero_grad(set_to_none=True)
    terms_sum = 0
    for m in range(K):
        micro = micro_batch(batch, slice(m * size // K, (m + 1) * size // K), condition)
        # DDP: gradients are averaged over processes once, after the last micro-batch
        last = m == K - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if last else model.no_sync():
            with autocast:
                loss, terms = compute_loss(model, raw, diffusion, micro, args)
            loss = loss / K
            if scaler is not None:  # fp16: the loss multiplied, so small gradients stay above zero
                loss = scaler.scale(loss)
            loss.backward()
        terms_sum = terms_sum + terms.detach().float() / K
    if scaler is None:
        opt.step()
    else:  # fp16: skips the step if a gradient overflowed (the scale then halves), else unscales
        scaler.step(opt)
        scaler.update()
    if ema is not None:
        torch._foreach_lerp_(*ema, 1 - args.ema)  # ema += (1 - decay) (param - ema)
    return terms_sum


def micro_batch(batch, part, condition=class_labels):
    """Slice `part` of a batch, its y made the model's condition (conditioning's function)."""
    x, y, t, noise = batch
    if isinstance(y, dict):
        y = {k: v[part] for k, v in y.items()}
    else:
        y = y[part]
    return x[part], condition(y), t[part], noise[part]


def conditioning(model_name, text_encoder):
    """
    What turns a batch's y into the model's condition, chosen once before the loop: class labels
    as they are; captions through the frozen text encoder on the fly, giving SD's UNet its context
    or a DiT its pooled embedding ("": the null one).
    """
    if text_encoder is None:
        return class_labels
    if model_name in UNet_configs:
        return functools.partial(unet_context, text_encoder)
    return functools.partial(caption_embeddings, text_encoder)


def unet_context(text_encoder, captions):
    """SD's UNet's condition: the text encoder's last hidden states of the captions."""
    return dict(context=encode_text(text_encoder, captions)[0])


def ema_pairs(ema, raw):
    """(EMA weights, live weights) of the trained weights: train_step's update (official DiT's)."""
    return tuple(zip(*[(e, p) for e, p in zip(ema.parameters(), raw.parameters(), strict=True)
                       if p.requires_grad], strict=True))


# --precision: what each choice runs, as printed at the start of a run.
PRECISIONS = dict(fp32="fp32, no autocast", bf16="bf16 autocast",
                  fp16="fp16 autocast with a gradient scaler")


def device_and_precision(args):
    """This process's device (TF32 matmuls on CUDA, as the official DiT) and its precision."""
    device = distributed.local_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device, choose_precision(args.precision, device)


def choose_precision(requested, device):
    """
    --precision, or the device's default: bf16 autocast on a GPU that computes in bf16 (Ampere and
    later), fp16 autocast on one that does not (V100, T4: bf16 would be emulated, slowly), fp32 on
    CPU.
    """
    if requested:
        return requested
    if device.type != "cuda":
        return "fp32"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "fp16"


def mixed_precision(precision, device):
    """
    (autocast context, gradient scaler or None). fp16 needs the scaler: the loss is multiplied
    before the backward pass so that small gradients do not flush to zero in fp16, and a step whose
    gradients overflow is skipped with the scale halved; bf16 has fp32's range and needs none.
    """
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    autocast = torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")
    if precision == "fp16":
        return autocast, torch.amp.GradScaler(device.type)
    return autocast, None


def compile_blocks(model, **options):
    """
    --compile: torch.compile each block (regional compilation). Identical blocks share one compiled
    graph, so a DiT compiles one block, not 28, in seconds rather than minutes; what runs between
    blocks (DMP's prompts and gate, checkpointing) stays eager.
    """
    if hasattr(model, "blocks"):
        blocks = model.blocks
    else:  # SD's UNet
        blocks = [*model.input_blocks, model.middle_block, *model.output_blocks]
    for block in blocks:
        block.compile(**options)
    return model


def out_of_memory(args, step, rank, world, device):
    """The sentence an out-of-memory error becomes: the batch that failed and what would help."""
    share = args.batch_size // world
    micro = share // args.grad_accum
    helps = []
    if micro > 1:
        helps.append(f"--grad-accum {2 * args.grad_accum} (micro-batches of {micro // 2})")
    if not args.checkpointing:
        helps.append("--checkpointing (each block recomputed in the backward pass)")
    helps.append("a smaller --batch-size")
    where = f"process {rank} of {world} ({device})" if world > 1 else str(device)
    return (f"error: out of memory on {where} at step {step + 1}: a global batch of "
            f"{args.batch_size} ({share} on this process in {args.grad_accum} micro-batch"
            f"{'es' if args.grad_accum > 1 else ''} of {micro}) did not fit; "
            f"{', '.join(helps[:-1])} or {helps[-1]} would help "
            f"(python bench.py --estimate-memory estimates each)")


#################################################################################
#                       Held-out metrics and sample quality                     #
#################################################################################

@torch.no_grad()
def evaluate(model, diffusion, data, rows, args, device, bpd=False, batch_size=512):
    """
    Held-out metrics, with fixed noise: the training loss (4 draws of t and noise per image) and,
    with bpd, on the first --bpd-images of them, the variational bound in bits/dim over all 1000
    steps (calc_bpd_loop) and the noise MSE averaged over each band of 100 timesteps. (A respaced
    chain would be cheaper, but with the cosine schedule its last step, beta near 1, amplifies
    every error of the noise prediction: its bound is dominated by that one term.)
    """
    was_training = model.training
    model.eval()
    out, mse_t, total = dict(heldout_loss=0.0), 0.0, 0.0
    bpd_rows = rows[:args.bpd_images]
    for start in range(0, len(rows), batch_size):
        gen = torch.Generator(device).manual_seed(start)
        x, y = data.batch(rows[start: start + batch_size], False, gen, device)
        if args.unconditional:
            y = torch.zeros_like(y)
        for draw in range(4):
            gen = torch.Generator(device).manual_seed(10_000 * draw + start)
            t = torch.randint(0, 1000, (len(x),), generator=gen, device=device)
            noise = torch.randn(x.shape, generator=gen, device=device)
            terms = diffusion.training_losses(model, x, t, dict(y=y), noise=noise)
            out["heldout_loss"] += terms["loss"].sum().item() / (4 * len(rows))
        n = max(0, min(len(x), len(bpd_rows) - start))
        if bpd and n:
            torch.manual_seed(start)  # the same noise before and after training: paired
            r = diffusion.calc_bpd_loop(model, x[:n], clip_denoised=False,
                                        model_kwargs=dict(y=y[:n]))
            total += r["total_bpd"].sum().item()
            mse_t = mse_t + r["mse"].sum(0).cpu()
    if bpd:
        out["bpd"] = total / len(bpd_rows)
        # t in [0, 100), [100, 200), ...
        out["mse_bands"] = (mse_t / len(bpd_rows)).view(10, 100).mean(1).tolist()
    model.train(was_training)
    return out


def sample_quality(model, data, train_rows, heldout_rows, args, steps=100):
    """
    With --eval-fd: FD and KID (digits_fid) of 297 samples (DDPM, `steps` steps, fixed noise: the
    same before and after) against the held-out digits, and the held-out digits' own (297 training
    digits against them).
    """
    if not args.eval_fd:
        return {}
    if Path(args.data).resolve() != digits_fid.DATA:
        raise DataError(f"--eval-fd measures the bundled digits ({digits_fid.DATA}), "
                        f"not {args.data}")
    images = [data.batch(rows, False)[0] for rows in (train_rows, heldout_rows)]
    net = digits_fid.load_classifier()
    quality = digits_fid.SampleQuality(net, *images, replicates=0, chunks=1)
    samples = quality.of_samples(digits_fid.generate(model, quality.n, steps))
    floor = quality.measure(quality.train_sets, refs=("heldout",))
    return dict(fd_heldout=samples["fd_heldout"], kid_heldout=samples["kid_heldout"],
                floor_fd=floor["fd_heldout"], floor_kid=floor["kid_heldout"])


def measure(model, diffusion, data, train_rows, heldout_rows, args, device):
    """--eval-bpd's numbers, before and after training: held-out bits/dim and sample quality."""
    return dict(evaluate(model, diffusion, data, heldout_rows, args, device, bpd=True),
                **sample_quality(model, data, train_rows, heldout_rows, args))


def before_message(before, args, images):
    """The line the demo prints before training: bits/dim (and sample FD/KID with --eval-fd)."""
    line = f"held-out bits/dim ({images} images) before: {before['bpd']:.4f}"
    if args.eval_fd:
        line += (f"; sample FD {before['fd_heldout']:.3f}, KID {before['kid_heldout']:.4f} against "
                 f"the held-out digits (297 training digits: FD {before['floor_fd']:.3f}, KID "
                 f"{before['floor_kid']:.4f})")
    return line


def after_message(before, after, args, images, ema):
    """What the demo prints after training: each number before and after."""
    weights = " (EMA weights)" if ema else ""
    lines = [f"held-out bits/dim ({images} images): {before['bpd']:.4f} before, "
             f"{after['bpd']:.4f} after {args.method or 'training'}{weights}"]
    if args.eval_fd:
        lines.append(f"sample FD against the held-out digits: {before['fd_heldout']:.3f} before, "
                     f"{after['fd_heldout']:.3f} after; KID {before['kid_heldout']:.4f} before, "
                     f"{after['kid_heldout']:.4f} after")
    return "\n".join(lines)


#################################################################################
#              Set-up: settings, data, model, optimizer, run folder             #
#################################################################################

def settings(argv):
    """
    (args, resume, run_dir): the command line's settings; with --resume, the run's own
    (resumed_args), the entries of its last checkpoint and its folder (else None, None).
    """
    args = parse_args(argv)
    given = set(vars(args).pop("given"))
    if not args.resume:
        return args, None, None
    path = Path(args.resume)
    found = [path]
    if path.is_dir():
        found = checkpoints(path)
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


def training_data(args, world):
    """(data, training rows, held-out rows) of --data, refused if the batch does not split."""
    if args.batch_size % (world * args.grad_accum):
        sys.exit(f"error: --batch-size {args.batch_size} does not split over {world} process"
                 f"{'es' if world > 1 else ''} x {args.grad_accum} micro-batch"
                 f"{'es' if args.grad_accum > 1 else ''}")
    data = PreparedData(args.data)
    if args.holdout >= len(data):
        raise DataError(f"--holdout {args.holdout} leaves no training images: {args.data} holds "
                        f"{len(data)}")
    return (data, *split(data, args.holdout))


def text_encoder_of(args, data, device):
    """
    The frozen CLIP text encoder of a run on captions (None on labels): SD's own, from the
    checkpoint the UNet came from; a DiT's from --text-encoder, by default the one the --init
    checkpoint recorded (it is recorded again in this run's).
    """
    if not args.text:
        return None
    if data.captions is None:
        raise DataError(f"{args.data} has no captions: prepare it with prepare_data.py --captions")
    if args.eval_every or args.eval_bpd:
        raise DataError("held-out evaluation (--eval-every, --eval-bpd) reads labels, not "
                        "captions; sample an FID set instead")
    if args.model in UNet_configs:
        return load.load_sd_text_encoder(args.init, args.model, device)
    if not args.text_encoder and args.init:
        args.text_encoder = load.recorded_settings(args.init).get("text_encoder")
    return load.load_text_encoder(args.text_encoder, device)


def text_width(args, text_encoder):
    """A text DiT's embedding width (the encoder's), None for labels and for SD's UNet."""
    if text_encoder is None or args.model in UNet_configs:
        return None
    return text_encoder.config["hidden_size"]


def takes(text_dim):
    """What a DiT is conditioned on, in words."""
    if text_dim:
        return f"text embeddings of width {text_dim}"
    return "class labels"


def build_model(args, data, text_dim=None):
    """
    (model, parameter groups): a DiT from --init (load.load_model: an official name, a checkpoint
    or a run folder) or a fresh one of --model (text_dim: a text-to-image one), patched by
    --method; or SD's UNet.
    """
    if args.model in UNet_configs:
        if not args.init:
            raise CheckpointError(f"--model {args.model} further-trains Stable Diffusion: name its "
                                  f"checkpoint with --init")
        model = load.load_model(args.init, unet_config=UNet_configs[args.model])
        if model.config["in_channels"] != data.shape[0]:
            raise DataError(f"{args.data} holds {list(data.shape)} latents; the UNet takes "
                            f"{model.config['in_channels']} channels")
        return model, dmp.patch(model, args.method, **method_options(args))
    if args.init:
        model = load.load_model(args.init)
        if getattr(model, "patch_method", None):
            raise CheckpointError(f"{args.init} is already patched ({model.patch_method}): "
                                  f"further-train its base")
        if model.text_dim != text_dim:
            raise CheckpointError(f"{args.init} takes {takes(model.text_dim)} but this run gives "
                                  f"{takes(text_dim)}")
    else:
        arch = DIGITS_MODEL if args.model == "digits" else CONFIGS[args.model]
        labels = not (args.unconditional or text_dim)
        model = DiT(input_size=data.shape[-1], in_channels=data.shape[0], learn_sigma=True,
                    num_classes=data.num_classes if labels else 1,
                    class_dropout_prob=args.class_dropout if labels else 0.0,
                    text_dim=text_dim, **arch)
    if model.config["in_channels"] != data.shape[0] or model.config["input_size"] != data.shape[-1]:
        raise DataError(f"{args.data} holds {list(data.shape)} inputs; the model takes "
                        f"{model.config['in_channels']} x {model.config['input_size']}^2")
    if not args.method:
        params = [p for n, p in model.named_parameters() if n != "pos_embed"]
        return model, [dict(params=params, lr_scale=1.0, name="all")]
    groups = dmp.patch(model, args.method, **method_options(args))
    if not args.init:  # DMP from scratch (Table 6): the backbone trains too
        backbone = [p for n, p in model.named_parameters()
                    if not n.startswith("block_input.") and n != "pos_embed"]
        groups.append(dict(params=backbone, lr_scale=1.0, name="backbone"))
        for p in backbone:
            p.requires_grad_(True)
    return model, groups


def optimizer(groups, args):
    """AdamW over the method's parameter groups, each at --lr times its lr_scale."""
    return torch.optim.AdamW([dict(params=g["params"], lr=args.lr * g["lr_scale"]) for g in groups],
                             lr=args.lr, weight_decay=args.weight_decay)


def base_of(args, resume, run_dir, rank):
    """
    What the run's checkpoints record of --init (load.base_record: name, path, sha256; rank 0's).
    A resumed run's base must be the file it was trained on.
    """
    if not args.init or rank != 0:
        return None
    base = load.base_record(args.init)
    recorded = None
    if resume is not None:
        recorded = (resume.get("base") or {}).get("sha256")
    if recorded and base["sha256"] not in (None, recorded):
        raise CheckpointError(f"{args.init} is not the base {run_dir} was trained on (its sha256 "
                              f"is {base['sha256'][:12]}..., the run recorded {recorded[:12]}...): "
                              f"put that file back")
    return base


def restore(resume, model, ema, opt, scaler, args):
    """
    The step to go on from: 0 for a new run; with --resume, the weights, their EMA, the optimizer
    and fp16's scale are put back where the checkpoint left them.
    """
    if resume is None:
        return 0
    if args.init:  # the raw weights train on; `state` holds their EMA if the run keeps one
        model.load_state_dict(resume.get("raw_state", resume["state"]), strict=False)
        if ema is not None:
            ema.load_state_dict(resume["state"], strict=False)
    else:
        model.load_state_dict(resume["model"])
        if ema is not None:
            ema.load_state_dict(resume["ema"])
    opt.load_state_dict(resume["opt"])
    if scaler is not None and resume.get("scaler"):  # fp16: the scale it had reached
        scaler.load_state_dict(resume["scaler"])
    return resume["step"]


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


def run_folder(args, run_dir, rank, world, claimed):
    """
    The run's folder: a resumed run's own (`run_dir`), else one rank 0 claims (claim_run_dir; it
    joins `claimed`) and every process writes into.
    """
    if run_dir is None and rank == 0:
        name = f"{args.dataset}-{args.method or 'pretrain'}"
        run_dir = claim_run_dir(Path(args.results_dir), name)
        claimed.append(run_dir)
    if world > 1:
        box = [str(run_dir) if rank == 0 else None]
        dist.broadcast_object_list(box)
        run_dir = Path(box[0])
    if rank == 0:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
    return run_dir


def data_parallel(raw, world, device):
    """The model the loop calls: under torchrun with several processes, DDP around it."""
    if world == 1:
        return raw
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(raw, device_ids=ids)


def start_message(args, data, train_rows, heldout_rows, raw, trained, run_dir):
    """(the line a new run prints: data, what trains, the folder; the parameter counts it logs)."""
    n_trained, n_total = sum(p.numel() for p in trained), sum(p.numel() for p in raw.parameters())
    what = "pretraining"
    if args.init:
        what = f"further-training {args.init} with {args.method}"
    message = (f"{args.dataset}: {len(train_rows)} training images {list(data.shape)}, "
               f"{len(heldout_rows)} held out; {what}: {n_trained:,} of {n_total:,} parameters "
               f"train ({100 * n_trained / n_total:.2f}%); run folder {run_dir}")
    return message, dict(trained_parameters=n_trained, total_parameters=n_total)


def end_message(args, run_dir, step):
    """What a run prints at its end: where its last grid and checkpoint are."""
    lines = []
    if args.sample_every:
        lines.append(f"sample grid: {run_dir / 'samples' / f'{step:07d}.png'}")
    lines.append(f"checkpoint: {checkpoints(run_dir)[-1]}")
    return "\n".join(lines)


class RunLog:
    """
    A run's log.jsonl, one JSON object a line, written by rank 0 alone (the other processes'
    calls do nothing). A write that fails (a full disk) is undone: the log never ends mid-line.
    """
    def __init__(self, run_dir, rank):
        self.path, self.writes = run_dir / "log.jsonl", rank == 0

    def __call__(self, **entry):
        if not self.writes:
            return
        with open(self.path, "ab", buffering=0) as f:
            end, rest = f.tell(), memoryview((json.dumps(entry) + "\n").encode())
            try:
                while rest:
                    rest = rest[f.write(rest):]
            except OSError as e:
                f.truncate(end)
                e.filename = str(self.path)
                raise


class LossMeter:
    """
    The LOG_TERMS summed over the steps since the last log line, on the device (no host sync
    between logs); mean() averages them over those steps and every process, and starts again. (A
    checkpoint can come between two log lines: the mean divides by the steps it sums.)
    """
    def __init__(self, step, device):
        self.sum, self.since = torch.zeros(len(LOG_TERMS), device=device), step
        self.started = time.time()

    def add(self, terms):
        self.sum += terms

    def mean(self, step, world):
        """({term: mean}, steps per second) since the last call."""
        if world > 1:
            dist.all_reduce(self.sum)
        n = step - self.since
        mean = dict(zip(LOG_TERMS, (self.sum / (n * world)).tolist(), strict=True))
        speed = n / (time.time() - self.started)
        self.sum.zero_()
        self.since, self.started = step, time.time()
        return mean, speed


def stop_if_not_finite(mean, trained, step, last_ckpt, bar):
    """A NaN or inf stops the run here, before any checkpoint could store it: the last one stays."""
    if math.isfinite(mean["loss"]) and all(bool(p.isfinite().all()) for p in trained):
        return
    bar.close()
    sys.exit(f"error: the loss (mean {mean['loss']:.4g}) or the weights are no longer finite at "
             f"step {step}; stopped without saving. The last good checkpoint: "
             f"{last_ckpt or 'none written yet'}")


def checkpoint_entries(raw, ema, opt, step, args, data, base, scaler=None):
    """
    A further-training run stores a patch (dmp.save_patch's entries, `base` its load.base_record)
    plus the optimizer (and fp16's gradient scaler); pretraining the model. `weights` says which
    weights load: with --ema the EMA, what the run's grids and held-out numbers measured; the raw
    ones are kept too (raw_state, model) so --resume is exact.
    """
    entries = dict(step=step, args=vars(args), opt=opt.state_dict(), config=raw.config,
                   scaler=scaler.state_dict() if scaler is not None else None,
                   noise_schedule=args.noise_schedule, vae=data.vae,
                   weights="ema" if ema is not None else "raw")
    if args.text_encoder:  # sample.py reads a text DiT's encoder from here
        entries["text_encoder"] = str(Path(args.text_encoder).resolve())
    if args.init:
        state = dmp.trainable_state_dict(raw)
        entries.update(method=raw.patch_method, options=raw.patch_options, state=state, base=base)
        if ema is not None:
            averaged = ema.state_dict()
            entries.update(state={k: averaged[k] for k in state}, raw_state=state)
    else:
        entries.update(model=raw.state_dict(), ema=ema.state_dict() if ema is not None else None,
                       method=args.method, options=getattr(raw, "patch_options", None))
    return entries


def save_checkpoint(run_dir, step, entries, keep):
    """checkpoints/NNNNNNN.pt, written atomically; all but the last `keep` deleted. Its path."""
    path = run_dir / "checkpoints" / f"{step:07d}.pt"
    atomic_save(entries, path)
    for old in checkpoints(run_dir)[:-keep]:
        old.unlink()
    return path


# The grid's images are shown at least this many pixels wide: the digits' 8x8 become 64x64.
GRID_MIN_SIDE = 64


def grid_writer(args, data, text_encoder, device):
    """
    writer(model, path): the sample grid the loop draws every --sample-every steps, chosen once.
    Fixed seeds, so successive grids are comparable; small images enlarged by nearest neighbour
    to GRID_MIN_SIDE. A DiT: 16 images, DDIM 50 (a text DiT draws image k from the first caption
    of image k); SD: the first 4 captions, PNDM 50 with guidance 7.5 (sampling.sd_batch's).
    """
    if args.model in UNet_configs:
        return functools.partial(write_sd_grid, text_encoder=text_encoder, vae=data.vae,
                                 prompts=[c[0] for c in data.captions[:4]], num=4,
                                 latent_size=data.shape[-1], device=device)
    text = {}
    if text_encoder is not None:
        text = dict(prompts=[c[0] for c in data.captions[:16]], text_encoder=text_encoder)
    return functools.partial(sampling.write_grid, noise_schedule=args.noise_schedule, vae=data.vae,
                             num=16, seed=0, steps=50, sampler="ddim", device=device,
                             min_side=GRID_MIN_SIDE, **text)


def write_sd_grid(unet, path, text_encoder, vae, prompts, num, latent_size, device):
    """SD's grid of `prompts` at the data's resolution (the VAE's factor times the latents')."""
    vae = load_vae(vae, device)
    resolution = latent_size * 2 ** (len(vae.config["ch_mult"]) - 1)
    return sampling.write_sd_grid(unet, text_encoder, vae, path, prompts, num=num,
                                  resolution=resolution, min_side=GRID_MIN_SIDE)


#################################################################################
#                                 Training Loop                                 #
#################################################################################

def main(argv=None):
    """
    Train (the module docstring). A run that stops, whatever the reason, before it logged a
    training step or wrote a checkpoint leaves no folder behind: there is nothing in it to keep or
    to resume.
    """
    claimed = []  # the run folder this call made, until it holds something worth keeping
    try:
        run(argv, claimed)
    except BaseException:
        for run_dir in claimed:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def cli(argv=None):
    """The command line: bad input and faults (a full disk) end in one sentence, not a traceback."""
    try:
        main(argv)
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a write that failed (disk full, permissions): what was written is kept
        sys.exit(f"error: {e.filename or 'writing the run'}: {e.strerror or e}")


def run(argv, claimed):
    """main's body: `claimed` gets the new run folder, and is emptied once the run wrote to it."""
    args, resume, run_dir = settings(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, backend = distributed.setup()
    device, precision = device_and_precision(args)
    data, train_rows, heldout_rows = training_data(args, world)
    text_encoder = text_encoder_of(args, data, device)
    torch.manual_seed(args.seed)  # the initial weights (new models, DiffFit/LoRA factors, prompts)
    raw, groups = build_model(args, data, text_width(args, text_encoder))
    raw.set_checkpointing(args.checkpointing).to(device).train()
    base = base_of(args, resume, run_dir, rank)
    opt = optimizer(groups, args)
    ema = copy.deepcopy(raw).requires_grad_(False) if args.ema else None
    # Held-out numbers and grids measure the EMA if the run keeps one; losses the raw weights.
    measured, weights = (raw, "raw") if ema is None else (ema, "ema")
    autocast, scaler = mixed_precision(precision, device)
    step = restore(resume, raw, ema, opt, scaler, args)
    run_dir = run_folder(args, run_dir, rank, world, claimed)
    log = RunLog(run_dir, rank)
    # The model says whether it learns the variance (DiT's hybrid loss) or predicts the noise only.
    diffusion = create_diffusion("", args.noise_schedule, learn_sigma=getattr(raw, "learn_sigma", False))
    model = data_parallel(raw, world, device)
    if args.compile:
        compile_blocks(raw)
    trained = [p for g in groups for p in g["params"]]
    pairs = ema_pairs(ema, raw) if ema is not None else None  # EMA of the trained weights
    condition = conditioning(args.model, text_encoder)
    write_grid = grid_writer(args, data, text_encoder, device)
    if rank == 0 and step == 0:
        message, counts = start_message(args, data, train_rows, heldout_rows, raw, trained, run_dir)
        print(message)
        log(event="start", args=vars(args), **counts, world=world, backend=backend,
            precision=precision)
    if rank == 0:
        print(f"precision: {PRECISIONS[precision]} ({device})")
    if rank == 0 and step:
        log(event="resume", step=step, world=world, precision=precision)
    bpd = args.eval_bpd and len(heldout_rows) and rank == 0
    before, bpd_images = None, len(heldout_rows[:args.bpd_images])
    if bpd and step == 0:
        before = measure(raw, diffusion, data, train_rows, heldout_rows, args, device)
        log(event="eval", step=0, weights="raw", **before)
        print(before_message(before, args, bpd_images))

    losses, last_ckpt = LossMeter(step, device), None
    bar = tqdm(total=args.iterations, initial=step, disable=rank != 0, desc=run_dir.name,
               dynamic_ncols=True)
    while step < args.iterations:
        # Everything random in this step (label dropout, gate noise) is drawn after seeding with
        # (seed, step, rank): a resumed run redraws exactly what the uninterrupted one drew.
        torch.manual_seed(seed_of(args.seed, step, rank))
        batch = get_batch(data, train_rows, step, args, device, rank, world)
        try:
            losses.add(train_step(model, raw, diffusion, opt, batch, args, autocast, scaler,
                                  condition, pairs))
        except torch.OutOfMemoryError:
            bar.close()
            sys.exit(out_of_memory(args, step, rank, world, device))
        step += 1
        bar.update(1)
        last = step == args.iterations
        if step % args.log_every == 0 or step % args.ckpt_every == 0 or last:
            mean, speed = losses.mean(step, world)
            stop_if_not_finite(mean, trained, step, last_ckpt, bar)
            # DMP: how far the gate has moved from uniform (a uniform gate is prompt tuning at lr/N)
            log(step=step, weights="raw", **mean, **dmp.logged_gate_movement(raw),
                steps_per_sec=speed, images_per_sec=speed * args.batch_size)
            claimed.clear()  # the run folder now holds a record worth keeping
            bar.set_postfix(loss=f"{mean['loss']:.4f}", imp=f"{mean['importance']:.3g}",
                            load=f"{mean['load']:.3g}", it_s=f"{speed:.2f}")
        if args.eval_every and step % args.eval_every == 0 and len(heldout_rows) and rank == 0:
            log(event="eval", step=step, weights=weights,
                **evaluate(measured, diffusion, data, heldout_rows, args, device))
        if (step % args.ckpt_every == 0 or last) and rank == 0:
            entries = checkpoint_entries(raw, ema, opt, step, args, data, base, scaler)
            last_ckpt = save_checkpoint(run_dir, step, entries, args.keep)
        if (step % args.ckpt_every == 0 or last) and world > 1:
            dist.barrier()
        if args.sample_every and (step % args.sample_every == 0 or last) and rank == 0:
            path = write_grid(measured, run_dir / "samples" / f"{step:07d}.png")
            log(event="samples", step=step, weights=weights, path=str(path))
    bar.close()

    if bpd:
        after = measure(measured, diffusion, data, train_rows, heldout_rows, args, device)
        log(event="eval", step=step, weights=weights, **after)
        if before is not None:
            print(after_message(before, after, args, bpd_images, ema is not None))
    if rank == 0:
        print(end_message(args, run_dir, step))
    distributed.teardown()  # torchrun, even with one process


if __name__ == "__main__":
    cli()
