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

Reading order: the settings (parse_args), the set-up (settings() and the functions after it: data,
model, optimizer, resume, run folder), what a run says and writes, then run(), the loop. One
training step is training.py's (bench.py times the same function); the held-out numbers are
heldout.py's.
"""
import argparse
import functools
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
from tqdm import tqdm

import digits_fid
import distributed
import dmp
import heldout
import load
import sampling
import training
from checkpoints import CheckpointError, atomic_save, hold, read_state_dict
from dataset import DataError, PreparedData
from diffusion import create_diffusion
from distributed import seed_of
from load import checkpoints
from model_dit import CONFIGS, DIGITS_MODEL, DiT
from model_unet import UNet_configs
from model_vae import load_vae

# Dataset presets: the paper's settings (appendix) as defaults, each overridable by its flag.
PRESETS = {
    "ffhq": dict(data="data/ffhq256", noise_schedule="cosine", unconditional=True, model="DiT-L/2"),
    "imagenet": dict(data="data/imagenet256", noise_schedule="linear", unconditional=False,
                     model="DiT-XL/2"),
    # The bundled digits (assets/README.md): pretraining the tiny DiT, and the demo that patches
    # it. No flips: a mirrored digit is another shape.
    "digits": dict(data="assets/digits", noise_schedule="cosine", unconditional=True,
                   model="digits", holdout=digits_fid.HOLDOUT, ema=0.999, flip=False, log_every=100,
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
                 init="assets/dit_digits.pt", method="dmp", holdout=digits_fid.HOLDOUT, flip=False,
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
    p.add_argument("--num-heads", type=int, help="the head count of an --init DiT state dict "
                   "that records no config and has no official width")
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
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips (--no-flip: none, the digits presets' default)")
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
    g.add_argument("--gate-cond", choices=["t", "t+c", "none"], help="Table 9: t+c for text data, "
                   "else t; none: the gate blind to t (bias and block index), the study's control")
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
    # memory (docs/speed-and-memory.md); neither changes what a step computes
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
    if args.gate == "attention" and (args.noisy_gate or args.selection == "hard"):
        p.error("--gate attention (Table 4a) has no gate logits to add noise to or select the top "
                "k of: --noisy-gate and --selection hard take --gate linear")
    if args.selection == "hard" and args.hard_weights == "one" and args.top_k == 1:
        p.error("--selection hard --hard-weights one --top-k 1 keeps every prompt at weight one: "
                "the gate would take no part (naive prompt tuning); keep fewer or take --hard-weights "
                "softmax")
    if args.selection == "hard" and args.hard_weights == "one" and args.load_coef == 0:
        p.error("--hard-weights one passes the task loss no gradient to the gate, and --load-coef 0 "
                "leaves it none either: the gate would not train")
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
        # The authors' noisy gating perturbs a linear gate's logits; the attention gate has none.
        options["noisy_gate"] = args.noisy_gate or args.gate == "linear"
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
    return (data, *training.split(data, args.holdout))


def device_and_precision(args):
    """
    This process's device (TF32 matmuls on CUDA, as the official DiT) and its precision; torch's
    CPU threads set to --threads.
    """
    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.local_device(args.device)
    cuda_settings(device, args.model)
    return device, training.choose_precision(args.precision, device)


def cuda_settings(device, model):
    """
    On CUDA: TF32 matmuls (as the official DiT), and for SD's UNet cuDNN's benchmark mode, which
    times the convolution kernels once per input shape and keeps the fastest (the shapes of a run
    are fixed). Nothing on other devices.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = model in UNet_configs


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
    --method; or SD's UNet. Its initial weights (a new model, DiffFit's and LoRA's factors, the
    prompts and gate) are drawn after seeding with --seed.
    """
    torch.manual_seed(args.seed)
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
        model = load.load_model(args.init, num_heads=args.num_heads)
        if getattr(model, "patch_method", None):
            raise CheckpointError(f"{args.init} is already patched ({model.patch_method}): "
                                  f"further-train its base")
        if model.text_dim != text_dim:
            raise CheckpointError(f"{args.init} takes {takes(model.text_dim)} but this run gives "
                                  f"{takes(text_dim)}")
        classes = getattr(model.y_embedder, "num_classes", 0)  # (a text DiT: a TextEmbedder)
        if not (args.unconditional or text_dim) and data.num_classes > classes:
            # Label `classes` is the model's guidance "null" class: a real class there is wrong.
            raise DataError(f"{args.data} has {data.num_classes} classes and {args.init} knows "
                            f"{classes} (label {classes} is its guidance null class): further-train "
                            f"on data of at most {classes} classes, or with --unconditional")
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


def run_folder(args, run_dir, rank, world, claimed, held):
    """
    The run's folder: a resumed run's own (`run_dir`), else one rank 0 claims (claim_run_dir; it
    joins `claimed`) and every process writes into; rank 0 holds it (its lock joins `held`).
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
        # One process at a time writes a run (two resumes of it at once would both log every step
        # and both write checkpoints); the OS lets go when the process ends, however it ends.
        held.append(hold(run_dir, "a train.py run"))
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
    return run_dir


def data_parallel(raw, args, world, device):
    """
    The model the loop calls: its blocks compiled with --compile (training.compile_blocks); under
    torchrun with several processes, DDP around it.
    """
    if args.compile:
        training.compile_blocks(raw)
    if world == 1:
        return raw
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(raw, device_ids=ids)


#################################################################################
#           What a run says and writes: log, checkpoints, grids, errors          #
#################################################################################

def start(log, args, step, data, rows, raw, trained, run_dir, device, **setting):
    """
    What rank 0 says at the start: a new run prints its data, what trains and its folder, and logs
    its settings and parameter counts; a resumed one logs where it resumes (`setting`: world,
    backend, precision). Both print the precision and the device.
    """
    n_trained, n_total = sum(p.numel() for p in trained), sum(p.numel() for p in raw.parameters())
    what = "pretraining"
    if args.init:
        what = f"further-training {args.init} with {args.method}"
    if step == 0:
        print(f"{args.dataset}: {len(rows[0])} training images {list(data.shape)}, "
              f"{len(rows[1])} held out; {what}: {n_trained:,} of {n_total:,} parameters "
              f"train ({100 * n_trained / n_total:.2f}%); run folder {run_dir}")
        log(event="start", args=vars(args), trained_parameters=n_trained,
            total_parameters=n_total, **setting)
    else:
        log(event="resume", step=step, world=setting["world"], precision=setting["precision"])
    print(f"precision: {training.PRECISIONS[setting['precision']]} ({device})")


def measure_bpd(args, log, model, weights, step, diffusion, data, rows, device, rank, world,
                before=None):
    """
    --eval-bpd: the held-out numbers (heldout.measure, every process its share) of `model` (its
    `weights`, raw or EMA), logged, and printed by rank 0 with those measured `before` training
    when there are some. Returns them.
    """
    numbers = heldout.measure(model, diffusion, data, *rows, args, device, rank, world)
    log(event="eval", step=step, weights=weights, **numbers)
    if rank != 0:
        return numbers
    if step == 0:
        print(heldout.before_message(numbers, args, rows[1]))
    elif before is not None:
        print(heldout.after_message(before, numbers, args, rows[1], weights == "ema"))
    return numbers


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


def stop_if_not_finite(mean, trained, step, last_ckpt, bar):
    """A NaN or inf stops the run here, before any checkpoint could store it: the last one stays."""
    if math.isfinite(mean["loss"]) and all(bool(p.isfinite().all()) for p in trained):
        return
    bar.close()
    sys.exit(f"error: the loss (mean {mean['loss']:.4g}) or the weights are no longer finite at "
             f"step {step}, so the run stopped without saving, its last good checkpoint being "
             f"{last_ckpt or 'none (none was written yet)'}")


def checkpoint_entries(raw, ema, opt, args, data, base, scaler, step):
    """
    A further-training run stores a patch (load.patch_entries, `base` its load.base_record)
    plus the optimizer (and fp16's gradient scaler); pretraining the model. `weights` says which
    weights load: with --ema the EMA, what the run's grids and held-out numbers measured; the raw
    ones are kept too (raw_state, model) so --resume is exact. `ema` always holds the whole model
    that loads (the raw weights without --ema; --method full on a DiT too): the official DiT's
    find_model returns checkpoint["ema"] where there is one, else the whole dict, which no DiT
    loads. It shares its tensors with model/state, so torch.save writes them once.
    """
    entries = dict(step=step, args=vars(args), opt=opt.state_dict(), config=raw.config,
                   scaler=scaler.state_dict() if scaler is not None else None,
                   noise_schedule=args.noise_schedule, vae=data.vae,
                   weights="ema" if ema is not None else "raw", data_sha256=data.fingerprint())
    if args.text_encoder:  # sample.py reads a text DiT's encoder from here
        entries["text_encoder"] = str(Path(args.text_encoder).resolve())
    if args.init:
        entries.update(load.patch_entries(raw, base))
        state = entries["state"]
        whole = (raw if ema is None else ema).state_dict()
        if ema is not None:
            entries.update(state={k: whole[k] for k in state}, raw_state=state)
        if args.method == "full" and args.model not in UNet_configs:
            entries.update(state={k: whole[k] for k in state}, ema=whole)
    else:
        model = raw.state_dict()
        entries.update(model=model, ema=ema.state_dict() if ema is not None else model,
                       method=args.method, options=getattr(raw, "patch_options", None))
    return entries


def save_checkpoint(run_dir, step, entries_at, keep, rank, world):
    """
    checkpoints/NNNNNNN.pt (entries_at(step) its entries), written atomically by rank 0, every
    process waiting for it; all but the last `keep` deleted. Its path (None on the other ranks).
    """
    path = None
    if rank == 0:
        path = run_dir / "checkpoints" / f"{step:07d}.pt"
        atomic_save(entries_at(step), path)
        for old in checkpoints(run_dir)[:-keep]:
            old.unlink()
    if world > 1:
        dist.barrier()
    return path


def grid_writer(args, data, text_encoder, device):
    """
    writer(model, path): the sample grid the loop draws every --sample-every steps, chosen once.
    Fixed seeds, so successive grids are comparable; small images enlarged by nearest neighbour
    (sampling.save_grid). A DiT: 16 images, DDIM 50 (a text DiT draws image k from the first caption
    of image k); SD: the first 4 captions, PNDM 50 with guidance 7.5 (sampling.sd_batch's). The VAE
    is read at the first grid and kept for the run.
    """
    vae = functools.cache(functools.partial(load_vae, data.vae, device))
    if args.model in UNet_configs:
        return functools.partial(write_sd_grid, text_encoder=text_encoder, vae=vae,
                                 prompts=[c[0] for c in data.captions[:4]], num=4,
                                 latent_size=data.shape[-1])
    text = {}
    if text_encoder is not None:
        text = dict(prompts=[c[0] for c in data.captions[:16]], text_encoder=text_encoder)
    return functools.partial(write_dit_grid, vae=vae, noise_schedule=args.noise_schedule, num=16,
                             seed=0, steps=50, sampler="ddim", device=device, **text)


def write_dit_grid(model, path, vae, **options):
    """A DiT's grid (sampling.write_grid's `options`), `vae()` the run's VAE."""
    return sampling.write_grid(model, path, vae=vae(), **options)


def write_sd_grid(unet, path, text_encoder, vae, prompts, num, latent_size):
    """SD's grid of `prompts` at the data's resolution (the VAE's factor times the latents')."""
    vae = vae()
    resolution = latent_size * 2 ** (len(vae.config["ch_mult"]) - 1)
    return sampling.write_sd_grid(unet, text_encoder, vae, path, prompts, num=num,
                                  resolution=resolution)


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
#                                 Training Loop                                 #
#################################################################################

def main(argv=None):
    """
    Train (the module docstring). A run that stops, whatever the reason, before it logged a step
    or wrote a checkpoint leaves no folder behind: there is nothing in it to keep or to resume.
    """
    claimed = []  # the run folder this call made, until it holds something worth keeping
    held = []  # the lock on the run folder, let go when this call ends
    ctrl_c = signal.getsignal(signal.SIGINT)  # run() catches Ctrl-C in its loop; restored after
    try:
        run(argv, claimed, held)
    except BaseException:
        for run_dir in claimed:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        for fd in held:
            os.close(fd)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, ctrl_c)


def cli(argv=None):
    """The command line: bad input and faults (a full disk) end in one sentence, not a traceback."""
    try:
        main(argv)
    except (CheckpointError, DataError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a write that failed (disk full, permissions): what was written is kept
        sys.exit(f"error: {e.filename or 'writing the run'}: {e.strerror or e}")
    except KeyboardInterrupt:  # before the loop (in it, run() saves and says so): nothing to keep
        sys.exit("error: interrupted (Ctrl-C) before the first step; a new run leaves no folder")


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


def due(every, step, last=False):
    """Whether something done every `every` steps (0: never) is done after `step` (or the last)."""
    return every > 0 and (step % every == 0 or last)


def run(argv, claimed, held):
    """main's body: `claimed` gets the new run folder, and is emptied once the run wrote to it;
    `held`, the lock on the run folder."""
    args, resume, run_dir = settings(argv)
    rank, world, backend = distributed.setup()
    device, precision = device_and_precision(args)
    data, *rows = training_data(args, world)  # rows: the training and the held-out images
    recorded = (resume or {}).get("data_sha256")
    if recorded is not None and recorded != data.fingerprint():
        raise DataError(f"{args.data} now holds other prepared data than {run_dir} was trained on "
                        f"(its fingerprint is {data.fingerprint()[:12]}..., the run recorded "
                        f"{recorded[:12]}...): put that data back, or start a new run")
    text_encoder = text_encoder_of(args, data, device)
    raw, groups = build_model(args, data, text_width(args, text_encoder))
    raw.set_checkpointing(args.checkpointing).to(device).train()
    trained = [p for g in groups for p in g["params"]]
    base = base_of(args, resume, run_dir, rank)
    opt = training.optimizer(groups, args)
    ema = training.ema_model(raw) if args.ema else None
    autocast, scaler = training.mixed_precision(precision, device)
    step = restore(resume, raw, ema, opt, scaler, args)
    run_dir = run_folder(args, run_dir, rank, world, claimed, held)
    log = RunLog(run_dir, rank)
    # The model says whether it learns the variance (DiT's hybrid loss) or predicts the noise only.
    diffusion = create_diffusion("", args.noise_schedule,
                                 learn_sigma=getattr(raw, "learn_sigma", False))
    # Chosen once: the step with its conditioning, what is measured (the EMA if there is one).
    train_step = functools.partial(
        training.train_step, data_parallel(raw, args, world, device), raw, diffusion, opt,
        args=args, autocast=autocast, scaler=scaler, ema=training.ema_pairs(ema, raw),
        condition=training.conditioning(args.model, text_encoder))
    measured, weights = (raw, "raw") if ema is None else (ema, "ema")
    entries_at = functools.partial(checkpoint_entries, raw, ema, opt, args, data, base, scaler)
    write_grid = grid_writer(args, data, text_encoder, device)
    # Every process evaluates its share of the held-out images (none waits in a collective).
    eval_every = args.eval_every if len(rows[1]) else 0
    sample_every = args.sample_every if rank == 0 else 0
    bpd = args.eval_bpd and len(rows[1])
    if rank == 0:
        start(log, args, step, data, rows, raw, trained, run_dir, device, world=world,
              backend=backend, precision=precision)
    before = None
    if bpd and step == 0:
        before = measure_bpd(args, log, raw, "raw", 0, diffusion, data, rows, device, rank, world)

    losses, last_ckpt = LossMeter(step, device), None
    batches = training.Prefetcher(data, rows[0], args, device, rank, world)  # get_batch's batches
    bar = tqdm(total=args.iterations, initial=step, disable=rank != 0, desc=run_dir.name,
               dynamic_ncols=True)
    interrupted = catch_ctrl_c(world)
    while step < args.iterations:
        if interrupted:  # Ctrl-C: the step it came in is complete; save it, so --resume goes on
            bar.close()
            path = save_checkpoint(run_dir, step, entries_at, args.keep, rank, world)
            claimed.clear()
            sys.exit(f"error: interrupted (Ctrl-C) at step {step}; the run is saved in {path}, and "
                     f"--resume {run_dir} continues it")
        # Everything random in this step (label dropout, gate noise) is drawn after seeding with
        # (seed, step, rank): a resumed run redraws exactly what the uninterrupted one drew.
        torch.manual_seed(seed_of(args.seed, step, rank))
        batch = batches.get(step)
        mixtures = []  # the step's gate weights (dmp.Mixture), for the log's gate movement
        try:
            losses.add(train_step(batch, mixtures=mixtures))
        except torch.OutOfMemoryError:
            bar.close()
            sys.exit(out_of_memory(args, step, rank, world, device))
        step += 1
        bar.update(1)
        last = step == args.iterations
        if due(args.log_every, step, last) or due(args.ckpt_every, step):
            mean, speed = losses.mean(step, world)
            stop_if_not_finite(mean, trained, step, last_ckpt, bar)
            # DMP: how far the gate has moved from uniform (a uniform gate is prompt tuning at lr/N)
            log(step=step, weights="raw", **mean, **dmp.logged_gate_movement(mixtures),
                steps_per_sec=speed, images_per_sec=speed * args.batch_size)
            claimed.clear()  # the run folder now holds a record worth keeping
            bar.set_postfix(loss=f"{mean['loss']:.4f}", imp=f"{mean['importance']:.3g}",
                            load=f"{mean['load']:.3g}", it_s=f"{speed:.2f}")
        if due(eval_every, step):
            log(event="eval", step=step, weights=weights,
                **heldout.evaluate(measured, diffusion, data, rows[1], args, device, rank=rank,
                                   world=world))
        if due(args.ckpt_every, step, last):
            last_ckpt = save_checkpoint(run_dir, step, entries_at, args.keep, rank, world)
        if due(sample_every, step, last):
            path = write_grid(measured, run_dir / "samples" / f"{step:07d}.png")
            log(event="samples", step=step, weights=weights, path=str(path))
    bar.close()
    batches.close()

    if bpd:
        measure_bpd(args, log, measured, weights, step, diffusion, data, rows, device, rank, world,
                    before)
    if rank == 0:
        print(end_message(args, run_dir, step))
    distributed.teardown()  # torchrun, even with one process


if __name__ == "__main__":
    cli()
