"""
Speed and memory of the real code paths, on whatever device this runs on.

    python bench.py        # CUDA: DiT-B/2, L/2, XL/2 at batch 128, bf16; CPU: the small preset
    python bench.py --compile --json bench.json
    python bench.py --preset cpu --rows train sample
    python bench.py --estimate-memory     # no GPU: peak memory of training steps, on fake tensors
    python bench.py --suite device        # every GPU figure of docs/speed-and-memory.md

Rows: training steps/s, images/s, model FLOPs utilisation and peak memory for pretraining, full
fine-tuning and DMP further-training (training.get_batch and train_step; dmp.patch); sampling with
and without a DMP patch (sampling.dit_batch); VAE encode/decode (dataset.encode,
AutoencoderKL.decode); FID features (inception.compute_features); reading stored latents
(training.get_batch alone). Weights are random: speed does not depend on their values. Each
row runs in a process of its own, so its peak memory is its own: torch.cuda.max_memory_allocated
on CUDA; on CPU the growth of the process's peak resident set (getrusage ru_maxrss) from just
before the row's models and data are built, which includes the allocator's slack and the pages of
the memory-mapped data read. The two ratios the targets are about (DMP vs full fine-tuning,
patched vs unpatched sampling) are also timed interleaved within one process, round by round, so
that other load on the machine falls on both alike. The memory estimate is memory.py's.
"""
import argparse
import contextlib
import functools
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import dataset
import dmp
import inception
import memory
import sampling
import training
from dataset import FORMAT, VERSION, PreparedData
from checkpoints import write_json
from diffusion import create_diffusion
from distributed import seed_of
from model_clip import CLIP_TINY, CLIP_VITL14, CLIPTextModel
from model_dit import CONFIGS, DIGITS_MODEL, DiT
from model_unet import UNet_configs, UNetModel
from model_vae import SCALE_FACTOR, AutoencoderKL

# Dense bf16 tensor-core peak (TFLOP/s) from the datasheets; MFU is reported against these.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

PRESETS = {
    # The targets' setting: 256x256 images as 32x32x4 latents, batch 128, the three DiT sizes the
    # paper uses.
    "gpu": dict(models=["DiT-B/2", "DiT-L/2", "DiT-XL/2"], input_size=32, batch=128, warmup=5,
                rounds=5, steps=4, sample_models=["DiT-L/2", "DiT-XL/2"], sample_batch=64,
                sample_steps=50, vae_size=256, vae_batch=16, fid_batch=100, fid_images=500,
                data_rows=4096),
    # Small enough for 2 CPU cores in well under 3 minutes: DiT-S/2 on 16x16 latents (64 tokens).
    "cpu": dict(models=["DiT-S/2"], input_size=16, batch=4, warmup=1, rounds=3, steps=1,
                sample_models=["DiT-S/2"], sample_batch=4, sample_steps=2, sample_rounds=7,
                vae_size=64, vae_batch=1, fid_batch=4, fid_images=4, data_rows=256),
    # --suite device: the gpu preset's rows with fewer timed steps (the suite's 6 minutes), DDPM
    # sampling timed on 10 steps of a 250-step chain, and the digits runs (issues 19 and 23).
    "device": dict(models=["DiT-L/2", "DiT-XL/2"], input_size=32, batch=128, warmup=2,
                   compile_warmup=3, rounds=3, steps=2, sample_models=["DiT-XL/2"], sample_batch=64,
                   sampler="ddpm", sample_steps=10, chain=250, sample_rounds=3, vae_size=256,
                   vae_batch=16, fid_batch=100, fid_images=500, data_rows=1024,
                   digits_iterations=150, digits_samples=256, torchrun_samples=64,
                   demo_iterations=100, demo_bpd_images=20),
    # For the tests: train.py's digits DiT (4 blocks, 64 wide) on 8x8 latents.
    "tiny": dict(models=["tiny"], input_size=8, batch=4, warmup=0, rounds=1, steps=1,
                 sample_models=["tiny"], sample_batch=2, sample_steps=2, vae_size=16, vae_batch=1,
                 fid_batch=1, fid_images=1, data_rows=16, digits_iterations=6, digits_samples=8,
                 torchrun_samples=4, demo_iterations=2, demo_bpd_images=2),
}
MODES = ("pretrain", "full", "dmp")
ROWS = ("train", "sample", "vae", "fid", "data")


#################################################################################
#                         Model FLOPs of a DiT step                             #
#################################################################################
# Counted: matmuls and convolutions, a multiply-add as 2 FLOPs (what MFU counts; norms,
# activations, softmax and the optimizer are left out). B images, N = (input_size / p)^2 tokens,
# width D, depth L, MLP width H = 4D, C input channels, F = p^2 * out_channels outputs per token.
# Forward:
#   patch embedding  2 B N (C p^2) D         timestep MLP   2 B (256 D + D^2)
#   per block        adaLN 2 B D 6D  +  qkv 2 B N D 3D  +  scores Q K^T 2 B N^2 D
#                    +  values P V 2 B N^2 D  +  proj 2 B N D^2  +  MLP 2 B N D H + 2 B N H D
#                    (= 24 B N D^2 + 4 B N^2 D + 12 B D^2)
#   final layer      adaLN 2 B D 2D  +  linear 2 B N D F
#   DMP gate         2 B D N (its linear layer on c)  +  2 L L N (the one-hot block index @ its
#                    columns)
# Backward, per matmul y = x W: the input gradient dx = dy W^T costs its forward again when x
# needs a gradient, the weight gradient dW = x^T dy its forward again when W trains. Attention's
# two matmuls have no weights, and both their operands need gradients: 2x forward. What needs
# which:
#   pretraining / full fine-tuning: every weight trains; the tokens (from the patch embedding on)
#     and c (from the timestep MLP's first layer on) carry gradients; the patch embedding and the
#     timestep MLP's first layer read inputs that do not, so they have no input gradient.
#   DMP: only the prompts and the gate train, but the prompts are added before block 0, so every
#     block's token matmuls (qkv, attention, proj, MLP, final linear) still need input gradients,
#     and none needs a weight gradient; c comes from frozen layers, so the adaLN layers and the
#     timestep MLP have no backward at all.
# So full fine-tuning costs 3x the forward (less the patch embedding's input gradient), DMP 2x
# plus attention's share once more: 0.68x of full fine-tuning for DiT-L/2 at 256x256
# (tests/test_bench.py).

def dit_flops(config, batch, mode="full"):
    """
    Model FLOPs of one training step of a DiT `config` (model_dit.DiT kwargs): forward, input and
    weight gradients, and their sum.
    """
    B, D, L, p = batch, config["hidden_size"], config["depth"], config["patch_size"]
    N = (config["input_size"] // p) ** 2
    C = config["in_channels"]
    H = int(D * config.get("mlp_ratio", 4.0))
    F = p * p * (2 * C if config.get("learn_sigma", True) else C)
    trains = mode != "dmp"
    # (forward FLOPs, input needs a gradient, weight trains, operands that are both activations)
    matmuls = [(2 * B * N * C * p * p * D, False, trains, False),     # patch embedding (a conv)
               (2 * B * 256 * D, False, trains, False),               # timestep MLP, layer 1
               (2 * B * D * D, trains, trains, False)]                # timestep MLP, layer 2
    for _ in range(L):
        matmuls += [(2 * B * D * 6 * D, trains, trains, False),       # adaLN modulation
                    (2 * B * N * D * 3 * D, True, trains, False),     # qkv
                    (2 * B * N * N * D, True, False, True),           # scores
                    (2 * B * N * N * D, True, False, True),           # values
                    (2 * B * N * D * D, True, trains, False),         # proj
                    (2 * B * N * D * H, True, trains, False),         # MLP fc1
                    (2 * B * N * H * D, True, trains, False)]         # MLP fc2
    matmuls += [(2 * B * D * 2 * D, trains, trains, False),           # final adaLN
                (2 * B * N * D * F, True, trains, False)]             # final linear
    if mode == "dmp":  # the gate
        matmuls += [(2 * B * D * N, False, True, False), (2 * L * L * N, False, True, False)]
    forward = sum(f for f, *_ in matmuls)
    input_grad = sum(f * (2 if both else 1) for f, needs, _, both in matmuls if needs)
    weight_grad = sum(f for f, _, trained, _ in matmuls if trained)
    return dict(forward=forward, input_grad=input_grad, weight_grad=weight_grad,
                step=forward + input_grad + weight_grad)


def peak_tflops(device, override=None):
    """The device's dense bf16 peak in TFLOP/s (None for a CPU or an unknown GPU, unless given)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


#################################################################################
#                            Timing and memory                                  #
#################################################################################

def sync(device):
    """Wait for the device's queued work (CUDA); a CPU has none."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(fns, preset, device):
    """
    Seconds per call of each fn: `warmup` calls each, then `rounds` rounds in which every fn runs
    `steps` calls in turn (interleaved); the median over rounds, and the per-round times. The
    device is synchronised only around a fn's calls in a round, never between its calls.
    """
    for fn in fns:
        for _ in range(preset["warmup"]):
            fn()
    sync(device)
    times = [[] for _ in fns]
    for _ in range(preset["rounds"]):
        for fn, t in zip(fns, times, strict=True):
            sync(device)
            start = time.perf_counter()
            for _ in range(preset["steps"]):
                fn()
            sync(device)
            t.append((time.perf_counter() - start) / preset["steps"])
    return [statistics.median(t) for t in times], times


def memory_baseline(device):
    """What a row's peak is counted from: CUDA's allocated bytes, or the process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_memory_mb(device, baseline):
    """The peak since memory_baseline, in MiB."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) - baseline) / 2 ** 20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline) / 2 ** 20


#################################################################################
#                    Training: one iteration of train.py's loop                 #
#################################################################################

def synthetic_latents(folder, rows, shape, num_classes):
    """A prepared folder of random float16 posteriors, read by PreparedData as real ones."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = (rows, 2, 2, *shape)
    array = np.lib.format.open_memmap(folder / "latents.npy", mode="w+", dtype=np.float16,
                                      shape=stored)
    rng = np.random.default_rng(0)
    for i in range(0, rows, 256):
        block = rng.standard_normal((min(256, rows - i), 2, 2, *shape), dtype=np.float32)
        block[:, :, 1] = np.abs(block[:, :, 1]) * 0.1  # a positive std
        array[i: i + len(block)] = block
    array.flush()
    del array
    np.save(folder / "labels.npy", rng.integers(0, num_classes, rows))
    manifest = dict(format=FORMAT, version=VERSION, kind="latents",
                    vae="ema", scale_factor=SCALE_FACTOR, count=rows, shape=list(shape),
                    array="latents.npy", stored_shape=list(stored), dtype="float16",
                    num_classes=num_classes, class_names=[], skipped=[], captions=None)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


# The settings of train.py --dataset imagenet that a step reads (training.get_batch, train_step,
# optimizer), at their defaults: the paper's AdamW at lr 1e-4, flips, labels, both balancing losses.
STEP_SETTINGS = dict(seed=0, flip=True, unconditional=False, text=False, caption_dropout=0.1,
                     importance_coef=1.0, load_coef=1.0, lr=1e-4, weight_decay=0.0,
                     noise_schedule="linear")


@contextlib.contextmanager
def synthetic_run(preset):
    """
    (the step's settings, data) of a training row: STEP_SETTINGS at the preset's batch, and
    ImageNet-like latents of the preset's size (synthetic_latents, in a temporary folder while
    inside).
    """
    with tempfile.TemporaryDirectory() as tmp:
        shape = (4, preset["input_size"], preset["input_size"])
        data = PreparedData(synthetic_latents(tmp, preset["data_rows"], shape, 1000))
        yield argparse.Namespace(**STEP_SETTINGS, batch_size=preset["batch"]), data


def train_model(name, mode, data, device, text_dim=None, **options):
    """
    (model, parameter groups) of a training row, on `device` with random weights (an XL/2 in
    seconds), as train.py builds them for ImageNet: a fresh DiT `name` ('tiny': the digits DiT;
    text_dim: a text DiT) whose every weight but the fixed positional table trains (pretraining),
    or patched by dmp.patch (with `options`, e.g. selection='hard') for full fine-tuning or DMP;
    or SD's UNet `name` (sd15, sd-tiny), patched.
    """
    torch.manual_seed(0)
    with torch.device(device):
        if name in UNet_configs:
            model = UNetModel(**UNet_configs[name])
            return model, dmp.patch(model, mode, **options)
        arch = DIGITS_MODEL if name == "tiny" else CONFIGS[name]
        model = DiT(input_size=data.shape[-1], in_channels=data.shape[0], learn_sigma=True,
                    num_classes=data.num_classes, class_dropout_prob=0.1, text_dim=text_dim,
                    **arch)
        if mode != "pretrain":
            return model, dmp.patch(model, mode, **options)  # as after --init
    params = [p for n, p in model.named_parameters() if n != "pos_embed"]
    return model, [dict(params=params, lr_scale=1.0, name="all")]


def train_setup(name, mode, args, data, device, precision, compile=False, checkpointing=False,
                grad_accum=1, text=False, **options):
    """
    A step function that runs one iteration of train.py's loop (training.Prefetcher's batch, then
    training.train_step: the micro-batches, autocast or fp16's scaler, AdamW, the EMA) on model
    `name` for pretraining (an EMA, as train.py keeps by default), full fine-tuning or DMP
    further-training (no EMA, as with --init). text: on captions, through a CLIP text encoder with
    random weights (ViT-L/14's; for sd-tiny the tiny one of its width), in the step as train.py
    runs it (SD's UNet always reads text). Returns (step, model config).
    """
    ema_decay = 0.9999 if mode == "pretrain" else 0.0
    text = text or name in UNet_configs
    args = argparse.Namespace(**{**vars(args), "text": text}, grad_accum=grad_accum, ema=ema_decay)
    encoder = None
    if text:
        data.captions = [[f"a photo of thing {i}", ""] for i in range(len(data))]
        clip = CLIP_TINY if name == "sd-tiny" else CLIP_VITL14  # SD 1.5's is ViT-L/14's
        torch.manual_seed(0)
        with torch.device(device):
            encoder = CLIPTextModel(**clip).eval().requires_grad_(False)
    dim = encoder.config["hidden_size"] if encoder is not None and name not in UNet_configs else None
    model, groups = train_model(name, mode, data, device, dim, **options)
    model.set_checkpointing(checkpointing).to(device).train()
    opt = training.optimizer(groups, args)
    ema = training.ema_model(model) if args.ema else None
    diffusion = create_diffusion("", args.noise_schedule,
                                 learn_sigma=getattr(model, "learn_sigma", False))
    if compile:
        training.compile_blocks(model)
    autocast, scaler = training.mixed_precision(precision, device)
    train_step = functools.partial(training.train_step, model, model, diffusion, opt, args=args,
                                   autocast=autocast, scaler=scaler,
                                   ema=training.ema_pairs(ema, model),
                                   condition=training.conditioning(name, encoder))
    batches, state = training.Prefetcher(data, np.arange(len(data)), args, device), dict(step=0)

    def step():
        """train.py's loop body, less its logging and checkpoints."""
        s = state["step"]
        torch.manual_seed(seed_of(args.seed, s, 0))
        train_step(batches.get(s))
        state["step"] = s + 1
    return step, model.config


#################################################################################
#                                    Rows                                       #
#################################################################################

def row_train(name, mode, preset, device, precision, compile, peak, options=None):
    """
    One training configuration: steps/s, images/s, model FLOPs utilisation, peak memory. options:
    checkpointing, grad_accum (train.py's --checkpointing, --grad-accum). MFU counts the model's
    FLOPs, not checkpointing's second forward pass.
    """
    options = dict(options or {})
    warmup = preset["warmup"]
    if compile:
        warmup = preset.get("compile_warmup", warmup)
    with synthetic_run(preset) as (args, data):
        base = memory_baseline(device)
        step, config = train_setup(name, mode, args, data, device, precision, compile, **options)
        (seconds,), _ = timed_rounds([step], dict(preset, warmup=warmup), device)
        memory_mb = peak_memory_mb(device, base)
    flops = None  # the UNet's are not counted; a text DiT's are the DiT's (its CLIP left out)
    if name not in UNet_configs:
        flops = dit_flops(config, preset["batch"], mode)
    label = mode + "".join(f", {OPTION_LABELS[k]}{'' if v is True else f' {v}'}"
                           for k, v in options.items()
                           if v is not False and (isinstance(v, str) or v is True or v > 1))
    return dict(train_row(name, label, preset["batch"], seconds, flops, peak, memory_mb),
                compiled=compile, **options)


OPTION_LABELS = dict(checkpointing="checkpointing", grad_accum="grad-accum", text="text (CLIP)",
                     selection="selection")


def train_row(name, mode, batch, seconds, flops, peak, memory_mb=None):
    """A training row's figures from its seconds per step and its FLOPs (dit_flops; None: not
    counted, no MFU)."""
    achieved = flops["step"] / seconds / 1e12 if flops else None
    return dict(row="train", model=name, mode=mode, batch=batch, ms_per_step=1e3 * seconds,
                steps_per_s=1 / seconds, images_per_s=batch / seconds,
                tflop_per_step=flops["step"] / 1e12 if flops else None, achieved_tflops=achieved,
                mfu=achieved / peak if peak and achieved else None, peak_mem_mb=memory_mb)


def row_train_pair(name, preset, device, precision, compile):
    """Full fine-tuning and DMP of one model at one batch, timed interleaved: the time ratio."""
    with synthetic_run(preset) as (args, data):
        full, _ = train_setup(name, "full", args, data, device, precision, compile)
        mop, _ = train_setup(name, "dmp", args, data, device, precision, compile)
        (t_full, t_dmp), rounds = timed_rounds([full, mop], preset, device)
    ratio = statistics.median(b / a for a, b in zip(*rounds, strict=True))  # same load per round
    return dict(row="ratio", model=name, mode="dmp/full time", batch=preset["batch"], value=ratio,
                ms_full=1e3 * t_full, ms_dmp=1e3 * t_dmp)


def row_sample(name, preset, device, precision, compile, peak):
    """
    sampling.dit_batch with the unpatched model and with a DMP patch, interleaved; time per
    sampling step, and the images/s of a whole chain: the preset's sampler and steps (DDIM 2 on
    CPU), or with `chain`, a DDPM chain of that many steps (250, the paper's) timed on its first
    `sample_steps` steps (every DDPM step costs the same). --compile compiles each block, as in
    training (and warms up longer); MFU counts a forward pass per step against `peak`.
    """
    arch = DIGITS_MODEL if name == "tiny" else CONFIGS[name]
    base = memory_baseline(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT(input_size=preset["input_size"], num_classes=1000, **arch).eval()
        dmp.patch(model, "dmp")
    mop = model.block_input
    with torch.no_grad():
        mop.prompts.normal_(0, 0.1)  # a trained patch is not zero (the speed is the same)
    if compile:
        training.compile_blocks(model)
    sampler, steps = preset.get("sampler", "ddim"), preset["sample_steps"]
    B = preset["sample_batch"]
    diffusion = sampling.make_diffusion(sampler, steps, "linear")
    eta = 0.0 if sampler == "ddim" else None

    def chain(patched):
        """Sampling steps of batch B with the patch installed or not."""
        def go():
            model.block_input = mop if patched else None
            sampling.dit_batch(list(range(B)), model, diffusion, cfg_scale=1.0,
                               bf16=precision == "bf16", eta=eta)
        return go
    # A 2% difference needs more rounds than the rest where the machine is noisy (sample_rounds).
    settings = dict(preset, steps=1, rounds=preset.get("sample_rounds", preset["rounds"]))
    if compile:
        settings["warmup"] = preset.get("compile_warmup", preset["warmup"])
    (t_plain, t_dmp), rounds = timed_rounds([chain(False), chain(True)], settings, device)
    memory_mb = peak_memory_mb(device, base)
    length = preset.get("chain", steps)
    rows = []
    for mode, t in (("unpatched", t_plain), ("dmp", t_dmp)):
        flops = dit_flops(model.config, B, mode if mode == "dmp" else "full")["forward"]
        achieved = flops * steps / t / 1e12
        rows.append(dict(row="sample", model=name, mode=mode, sampler=f"{sampler.upper()}-{length}",
                         batch=B, ms_per_step=1e3 * t / steps, steps_per_s=steps / t,
                         images_per_s=B / (t / steps * length), tflop_per_step=flops / 1e12,
                         achieved_tflops=achieved, mfu=achieved / peak if peak else None,
                         peak_mem_mb=memory_mb, compiled=compile))
    ratio = statistics.median(b / a for a, b in zip(*rounds, strict=True))
    rows.append(dict(row="ratio", model=name, mode="dmp/unpatched sampling step", batch=B,
                     value=ratio, compiled=compile))
    return rows


def throughput_row(row, model, mode, batch, seconds, images, memory_mb):
    """A row of a part that is not a DiT step (VAE, FID features, data): its speed and memory."""
    return dict(row=row, model=model, mode=mode, batch=batch, ms_per_step=1e3 * seconds,
                steps_per_s=1 / seconds, images_per_s=images / seconds, peak_mem_mb=memory_mb)


def row_vae(preset, device, precision):
    """
    The KL-f8 VAE: dataset.encode (image and mirror, fp32 as prepare_data.py) and decode (as
    sample.py).
    """
    base = memory_baseline(device)
    vae = AutoencoderKL().to(device).eval().requires_grad_(False)
    B, S = preset["vae_batch"], preset["vae_size"]
    pixels = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8)
    z = torch.randn(B, 4, S // 8, S // 8, device=device)
    bf16 = precision == "bf16"

    def encode():
        dataset.encode(vae, pixels, device)

    def decode():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            vae.decode(z / SCALE_FACTOR).float()
    (t_enc, t_dec), _ = timed_rounds([encode, decode], dict(preset, steps=1), device)
    memory_mb = peak_memory_mb(device, base)
    return [throughput_row("vae", f"KL-f8 {S}px", mode, B, t, B, memory_mb)
            for mode, t in (("encode+mirror", t_enc), ("decode", t_dec))]


def row_fid(preset, device):
    """
    inception.compute_features on 256x256 uint8 images (resized to 299 inside, as pytorch-fid).
    """
    base = memory_baseline(device)
    model = inception.FIDInceptionV3().eval().requires_grad_(False).to(device)
    n, B = preset["fid_images"], preset["fid_batch"]
    images = np.random.default_rng(0).integers(0, 256, (B, 256, 256, 3), dtype=np.uint8)

    def features():
        batches = (images[: min(B, n - i)] for i in range(0, n, B))
        inception.compute_features(model, (n, batches), device, desc="bench")
    (t,), _ = timed_rounds([features], dict(preset, steps=1), device)
    # t is the time of n images, B a batch: ms_per_step is per batch, steps_per_s batches per s
    return [throughput_row("fid", "Inception pool3", "features", B, t * B / n, B,
                           peak_memory_mb(device, base))]


def row_data(preset, device):
    """training.get_batch alone: stored latents read, flipped, sampled and put on the device."""
    with synthetic_run(preset) as (args, data):
        rows, state = np.arange(len(data)), dict(step=0)
        base = memory_baseline(device)

        def read():
            training.get_batch(data, rows, state["step"], args, device)
            state["step"] += 1
        (t,), _ = timed_rounds([read], dict(preset, steps=10 * preset["steps"]), device)
        memory_mb = peak_memory_mb(device, base)
    B = preset["batch"]
    return [throughput_row("data", "stored latents", "get_batch", B, t, B, memory_mb)]


def run_row(spec, preset_name, device, precision, compile=False, peak=None, work=None):
    """
    One row (a list of result dicts) in this process; spec: ['train', model, mode(, options)] |
    ['pair', model] | ['sample', model] | ['vae'] | ... | a script row of the device suite
    (SCRIPT_ROWS, which write into the folder `work`).
    """
    preset = PRESETS[preset_name]
    kind, rest = spec[0], spec[1:]
    if kind in SCRIPT_ROWS:
        return [SCRIPT_ROWS[kind](preset, device, Path(work))]
    if kind == "train":
        name, mode, *options = rest
        return [row_train(name, mode, preset, device, precision, compile, peak, *options)]
    if kind == "pair":
        return [row_train_pair(*rest, preset, device, precision, compile)]
    if kind == "sample":
        return row_sample(*rest, preset, device, precision, compile, peak)
    if kind == "vae":
        return row_vae(preset, device, precision)
    if kind == "fid":
        return row_fid(preset, device)
    return row_data(preset, device)


def specs(preset, rows):
    """The rows (run_row's specs) of a preset, in the order they run."""
    out = []
    if "train" in rows:
        for name in preset["models"]:
            out += [["train", name, mode] for mode in MODES] + [["pair", name]]
    if "sample" in rows:
        out += [["sample", name] for name in preset["sample_models"]]
    out += [[kind] for kind in ("vae", "fid", "data") if kind in rows]
    return out


def one_command(spec, preset, device, precision, compile=False, peak=None, threads=None,
                work=None):
    """The command line that runs one row in a process of its own (bench.py --one SPEC)."""
    command = script("bench.py", "--one", json.dumps(spec), "--preset", preset, "--device", device,
                     "--precision", precision)
    if threads:
        command += ["--threads", str(threads)]
    if work:
        command += ["--work", str(work)]
    if compile:
        command += ["--compile"]
    if peak:
        command += ["--peak-tflops", str(peak)]
    return command


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


def suite_rows(device, precision, work, peak=None, only=None):
    """The device suite as commands: [{id, what, command, estimate_s}], in the order they run."""
    rows = []
    for key, what, spec, compiled, estimate in DEVICE_SUITE:
        if only and key not in only:
            continue
        command = script("bench.py", "--one", json.dumps(spec), "--preset", "device", "--device",
                         device, "--precision", precision, "--work", work)
        command += ["--compile"] if compiled else []
        command += ["--peak-tflops", str(peak)] if peak else []
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
                results=results, targets=[dict(target=w, value=v, met=m)
                                          for w, v, m in targets(results)])


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


#################################################################################
#                                     Main                                      #
#################################################################################

def parse_args(argv=None):
    """bench.py's command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--preset", choices=list(PRESETS), help="default: gpu on CUDA, cpu otherwise")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--device", help="default: cuda if available, else cpu (--suite: cuda)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="default: train.py's (bf16 on a GPU that has it, else fp16; fp32 on CPU)")
    p.add_argument("--compile", action="store_true",
                   help="compile each block in the training and sampling rows")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's peak for MFU (default: A100/H100 bf16 dense)")
    p.add_argument("--threads", type=int, help="CPU threads (default 1 on CPU: on a machine shared "
                   "with other jobs, two threads that wait for each other were 5-10x slower than "
                   "one; torch's default on CUDA)")
    p.add_argument("--json", help="write the results here (atomically)")
    p.add_argument("--estimate-memory", nargs="*", metavar="MODEL:METHOD:BATCH[:MICRO][:ckpt]",
                   help="no GPU needed: estimate a training step's peak memory on fake tensors, "
                   "for the documented rows or the ones given (e.g. DiT-XL/2:dmp:128:32:ckpt)")
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
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one row (a JSON spec)
    return p.parse_args(argv)


def main(argv=None):
    """The memory estimate, the device suite, one row (--one), or the preset's rows as a table."""
    args = parse_args(argv)
    if args.estimate_memory is not None:
        rows = [memory.parse_memory_spec(s) for s in args.estimate_memory] or memory.MEMORY_ROWS
        try:
            return memory.run_memory_estimates(rows, args.precision or "bf16", args.json)
        except ValueError as e:
            sys.exit(f"error: --estimate-memory: {e}")
    if args.suite:
        return main_suite(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        message = "CUDA is not available here (torch.cuda.is_available() is False)"
        if args.one:  # a row of the suite: its one sentence, as a result
            print(json.dumps([dict(row=json.loads(args.one)[0], model="", mode="", error=message)]))
            return
        sys.exit(f"error: --device cuda: {message}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # train's
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    precision = args.precision or training.choose_precision(None, device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.one:
        return main_one(args, preset, device, precision)
    header = describe(device, precision, args.compile)
    print(f"bench.py --preset {preset}: {header}")
    results = []
    for spec in specs(PRESETS[preset], args.rows):
        command = one_command(spec, preset, device, precision, args.compile, args.peak_tflops,
                              torch.get_num_threads())
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"error: {' '.join(spec)} failed:\n{done.stderr[-3000:]}")
        results += json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {' '.join(spec)}: done", file=sys.stderr)
    print_results(results)
    if args.json:
        write_json(args.json, dict(setup=header, preset=preset, results=results,
                                   targets=[dict(target=w, value=v, met=m)
                                            for w, v, m in targets(results)]))
    return results


def main_one(args, preset, device, precision):
    """--one SPEC: run one row in this process and print its results as one JSON line."""
    spec = json.loads(args.one)
    try:
        results = run_row(spec, preset, device, precision, args.compile,
                          peak_tflops(device, args.peak_tflops), args.work)
    except Exception as e:  # any failure (out of memory, a compile error): one sentence
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        error = f"{type(e).__name__}: {first}"
        if isinstance(e, torch.OutOfMemoryError):
            error = "out of memory"
        padded = [*spec, "", ""]  # ['vae'] has no model or mode
        results = [dict(row=spec[0], model=padded[1], mode=padded[2], error=error)]
    print(json.dumps(results))


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
              f"{SUITE_ESTIMATE_S} s), within a budget of {SUITE_BUDGET_S} s ({SUITE_BUDGET_S - total}"
              f" s of slack), each in its own process under a timeout; WORK: "
              f"{args.work or 'a temporary folder'}")
        for r in rows:
            print(f"  {r['id']} (~{r['estimate_s']} s): {r['what']}\n"
                  f"    {shlex.join(r['command'])}")
        return rows
    setup = setup_line(device, precision) if cuda else "no CUDA device"
    print(f"bench.py --suite device: {setup}; work folder {work}")
    missing = None
    if not cuda:
        missing = "not run: CUDA is not available here (torch.cuda.is_available() is False)"
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


if __name__ == "__main__":
    main()
