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
(training.get_batch alone). Weights are random: speed does not depend on their values. Each row
runs in a process of its own (device_suite.run_rows), so its peak memory is its own
(memory_baseline). The two ratios the targets are about (DMP vs full fine-tuning, patched vs
unpatched sampling) are also timed interleaved within one process, round by round, so that other
load on the machine falls on both alike. The memory estimate is memory.py's.
"""
import argparse
import contextlib
import json
import resource
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

import dataset
import device_suite
import dmp
import inception
import memory
import sampling
import training
from dataset import PreparedData
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
    # The targets' setting: 256x256 images as 32x32x4 latents, batch 128, the paper's DiT sizes.
    "gpu": dict(models=["DiT-B/2", "DiT-L/2", "DiT-XL/2"], input_size=32, batch=128, warmup=5,
                rounds=5, steps=4, sample_models=["DiT-L/2", "DiT-XL/2"], sample_batch=64,
                sample_steps=50, vae_size=256, vae_batch=16, fid_batch=100, fid_images=500,
                data_rows=4096),
    # Small enough for 2 CPU cores in well under 3 minutes: DiT-S/2 on 16x16 latents (64 tokens).
    "cpu": dict(models=["DiT-S/2"], input_size=16, batch=4, warmup=1, rounds=3, steps=1,
                sample_models=["DiT-S/2"], sample_batch=4, sample_steps=2, sample_rounds=7,
                vae_size=64, vae_batch=1, fid_batch=4, fid_images=4, data_rows=256),
    "device": device_suite.PRESET,  # --suite device's
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
    """Model FLOPs of one training step of a DiT `config` (model_dit.DiT kwargs): forward, input
    and weight gradients, and their sum."""
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
    if override or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


#################################################################################
#                            Timing and memory                                  #
#################################################################################

def sync(device):
    """Wait for the device's queued work (CUDA); a CPU has none."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(fns, preset, device, compiled=False):
    """
    Seconds per call of each fn: `warmup` calls each (`compile_warmup` if `compiled` and the preset
    has it), then `rounds` rounds in which every fn runs `steps` calls in turn (interleaved); the
    median over rounds, and the per-round times. The device syncs around a fn's calls, not between.
    """
    warmup = preset.get("compile_warmup", preset["warmup"]) if compiled else preset["warmup"]
    for fn in fns:
        for _ in range(warmup):
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
    """What a row's peak is counted from: CUDA's allocated bytes; on CPU the process's peak resident
    set (getrusage ru_maxrss), which counts the allocator's slack and the mapped data's pages."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_memory_mb(device, baseline):
    """The peak since memory_baseline, in MiB."""
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return (peak - baseline) / 2 ** 20


#################################################################################
#       Rows: training (one iteration of train.py's loop), sampling, ...        #
#################################################################################

# What get_batch reads of train.py's settings, as train.py --dataset imagenet sets them: flips,
# labels (the step's own settings are train_step's defaults: both balancing losses at 1).
BATCH_SETTINGS = dict(seed=0, flip=True, augment=False, unconditional=False, text=False, caption_dropout=0.1)


@contextlib.contextmanager
def synthetic_run(preset):
    """(batch settings, data) of a training row: BATCH_SETTINGS at the preset's batch, and
    ImageNet-like latents of its size (dataset.synthetic_latents, in a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        shape = (4, preset["input_size"], preset["input_size"])
        data = PreparedData(dataset.synthetic_latents(tmp, preset["data_rows"], shape, 1000))
        yield argparse.Namespace(**BATCH_SETTINGS, batch_size=preset["batch"]), data


def train_setup(name, mode, args, data, device, precision, compile=False, checkpointing=False,
                grad_accum=1, text=False, **options):
    """
    (step, model config): `step` runs one iteration of train.py's loop (training.Prefetcher's batch,
    training.train_step: micro-batches, autocast or fp16's scaler, AdamW at lr 1e-4, the EMA) on a
    model with random weights (an XL/2 built in seconds), built as train.py builds it for ImageNet:
    a fresh DiT `name` ('tiny': the digits DiT) whose every weight but the fixed positional table
    trains, for pretraining (an EMA, as train.py keeps by default), or patched by dmp.patch
    (`options`, e.g. selection='hard') for full fine-tuning or DMP (no EMA, as after --init); or
    SD's UNet `name` (sd15, sd-tiny), patched. text: on captions, through a CLIP text encoder with
    random weights (ViT-L/14's; sd-tiny's of its width) as train.py runs it (SD's UNet always is).
    """
    sd, encoder, dim = name in UNet_configs, None, None
    args = argparse.Namespace(**{**vars(args), "text": text or sd})
    if args.text:
        data.captions = [[f"a photo of thing {i}", ""] for i in range(len(data))]
        torch.manual_seed(0)
        with torch.device(device):  # SD 1.5's is ViT-L/14's
            encoder = CLIPTextModel(**(CLIP_TINY if name == "sd-tiny" else CLIP_VITL14))
        encoder.eval().requires_grad_(False)
        dim = None if sd else encoder.config["hidden_size"]
    torch.manual_seed(0)
    with torch.device(device):
        if sd:
            model = UNetModel(**UNet_configs[name])
        else:
            model = DiT(input_size=data.shape[-1], in_channels=data.shape[0], learn_sigma=True,
                        num_classes=data.num_classes, class_dropout_prob=0.1, text_dim=dim,
                        **(DIGITS_MODEL if name == "tiny" else CONFIGS[name]))
        groups = [dict(params=training.trained_weights(model), lr_scale=1.0, name="all")]
        if mode != "pretrain":
            groups = dmp.patch(model, mode, **options)
    model.set_checkpointing(checkpointing).to(device).train()
    opt = training.optimizer(groups, lr=1e-4)
    ema = training.EMA(model, 0.9999) if mode == "pretrain" else None
    diffusion = create_diffusion("", "linear", learn_sigma=getattr(model, "learn_sigma", False))
    if compile:
        training.compile_blocks(model)
    autocast, scaler = training.mixed_precision(precision, device)
    condition = training.conditioning(encoder, sd)
    batches, state = training.Prefetcher(data, np.arange(len(data)), args, device), dict(step=0)

    def step():
        """train.py's loop body, less its logging and checkpoints."""
        s = state["step"]
        torch.manual_seed(seed_of(args.seed, s, 0))
        training.train_step(model, opt, batches.get(s), diffusion, condition=condition,
                            grad_accum=grad_accum, autocast=autocast, scaler=scaler, ema=ema)
        state["step"] = s + 1
    return step, model.config

def row_train(name, mode, preset, device, precision, compile, peak, options=None):
    """One training configuration (options: e.g. train.py's --checkpointing, --grad-accum): steps/s,
    images/s, MFU (the model's FLOPs, not checkpointing's second forward), peak memory."""
    options = dict(options or {})
    with synthetic_run(preset) as (args, data):
        base = memory_baseline(device)
        step, config = train_setup(name, mode, args, data, device, precision, compile, **options)
        (seconds,), _ = timed_rounds([step], preset, device, compile)
        memory_mb = peak_memory_mb(device, base)
    # The UNet's FLOPs are not counted; a text DiT's are the DiT's (its CLIP left out).
    flops = None if name in UNet_configs else dit_flops(config, preset["batch"], mode)
    label = mode + "".join(f", {OPTION_LABELS[k]}{'' if v is True else f' {v}'}"
                           for k, v in options.items() if v is True or isinstance(v, str) or v > 1)
    return dict(speed_row(name, label, preset["batch"], seconds, flops, peak, memory_mb),
                compiled=compile, **options)


OPTION_LABELS = dict(checkpointing="checkpointing", grad_accum="grad-accum", text="text (CLIP)",
                     selection="selection")


def speed_row(name, mode, batch, seconds, flops=None, peak=None, memory_mb=None, row="train"):
    """
    A row's figures from its seconds per step and, for a DiT, a step's FLOPs (dit_flops; None: not
    counted, no MFU): a training step, row_sample's sampling step, or a VAE, FID or data step.
    """
    achieved = flops["step"] / seconds / 1e12 if flops else None
    return dict(row=row, model=name, mode=mode, batch=batch, ms_per_step=1e3 * seconds,
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
    base = memory_baseline(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT(input_size=preset["input_size"], num_classes=1000,
                    **(DIGITS_MODEL if name == "tiny" else CONFIGS[name])).eval()
        dmp.patch(model, "dmp")
    mop = model.block_input
    with torch.no_grad():
        mop.prompts.normal_(0, 0.1)  # a trained patch is not zero (the speed is the same)
    if compile:
        training.compile_blocks(model)
    sampler, steps = preset.get("sampler", "ddim"), preset["sample_steps"]
    B = preset["sample_batch"]
    diffusion = sampling.make_diffusion(sampler, steps, "linear")

    def sample(patched):
        """The sampling steps of batch B, with the patch installed or not."""
        model.block_input = mop if patched else None
        sampling.dit_batch(list(range(B)), model, diffusion, cfg_scale=1.0,
                           bf16=precision == "bf16", eta=0.0 if sampler == "ddim" else None)
    # A 2% difference needs more rounds than the rest where the machine is noisy (sample_rounds).
    settings = dict(preset, steps=1, rounds=preset.get("sample_rounds", preset["rounds"]))
    times, rounds = timed_rounds([partial(sample, False), partial(sample, True)], settings, device,
                                 compile)
    memory_mb, length, rows = peak_memory_mb(device, base), preset.get("chain", steps), []
    for mode, t in zip(("unpatched", "dmp"), times, strict=True):  # t: `steps` sampling steps
        forward = dit_flops(model.config, B, "dmp" if mode == "dmp" else "full")["forward"]
        rows.append(dict(speed_row(name, mode, B, t / steps, dict(step=forward), peak, memory_mb,
                                   "sample"), sampler=f"{sampler.upper()}-{length}",
                         images_per_s=B / (t / steps * length), compiled=compile))
    ratio = statistics.median(b / a for a, b in zip(*rounds, strict=True))
    return rows + [dict(row="ratio", model=name, mode="dmp/unpatched sampling step", batch=B,
                        value=ratio, compiled=compile)]


def row_vae(preset, device, precision):
    """The KL-f8 VAE: dataset.encode (image and mirror, fp32 as prepare_data.py), decode (as
    sample.py)."""
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
    return [speed_row(f"KL-f8 {S}px", mode, B, t, memory_mb=memory_mb, row="vae")
            for mode, t in (("encode+mirror", t_enc), ("decode", t_dec))]


def row_fid(preset, device):
    """inception.compute_features of 256x256 uint8 images (resized to 299 inside, pytorch-fid's)."""
    base = memory_baseline(device)
    model = inception.FIDInceptionV3().eval().requires_grad_(False).to(device)
    n, B = preset["fid_images"], preset["fid_batch"]
    images = np.random.default_rng(0).integers(0, 256, (B, 256, 256, 3), dtype=np.uint8)

    def features():
        batches = (images[: min(B, n - i)] for i in range(0, n, B))
        inception.compute_features(model, (n, batches), device, desc="bench")
    (t,), _ = timed_rounds([features], dict(preset, steps=1), device)
    # t is the time of n images, B a batch: ms_per_step is per batch, steps_per_s batches per s
    return [speed_row("Inception pool3", "features", B, t * B / n,
                      memory_mb=peak_memory_mb(device, base), row="fid")]


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
    return [speed_row("stored latents", "get_batch", preset["batch"], t, memory_mb=memory_mb,
                      row="data")]


def run_row(spec, preset_name, device, precision, compile=False, peak=None, work=None):
    """
    One row (a list of result dicts) in this process, MFU against `peak` TFLOP/s (default: the
    device's, peak_tflops); spec: ['train', model, mode(, options)] | ['pair', model] |
    ['sample', model] | ['vae'] | ... | a script row of the device suite (device_suite.SCRIPT_ROWS,
    which write into the folder `work`).
    """
    if device.type == "cuda" and not torch.cuda.is_available():
        raise device_suite.RowError(device_suite.NO_CUDA)
    preset, (kind, *rest), peak = PRESETS[preset_name], spec, peak_tflops(device, peak)
    if kind in device_suite.SCRIPT_ROWS:
        return [device_suite.SCRIPT_ROWS[kind](preset, device, Path(work))]
    if kind == "train":  # [model, mode(, options)]
        return [row_train(*rest[:2], preset, device, precision, compile, peak, *rest[2:])]
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
    p.add_argument("--threads", type=int, help="CPU threads (default 1 on CPU: on a shared "
                   "machine, two threads waiting on each other were 5-10x slower; torch's on CUDA)")
    p.add_argument("--json", help="write the results here (atomically)")
    p.add_argument("--estimate-memory", nargs="*", metavar="MODEL:METHOD:BATCH[:MICRO][:ckpt]",
                   help="no GPU needed: estimate a training step's peak memory on fake tensors, "
                   "for the documented rows or the ones given (e.g. DiT-XL/2:dmp:128:32:ckpt)")
    device_suite.add_flags(p)  # --suite device and its options; --one, a row in its own process
    return p.parse_args(argv)


def main(argv=None):
    """The memory estimate, the device suite, one row (--one), or the preset's rows as a table."""
    args = parse_args(argv)
    if args.estimate_memory is not None:
        return memory.run_memory_estimates(args.estimate_memory, args.precision, args.json)
    if args.suite:
        return device_suite.main_suite(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available() and not args.one:
        sys.exit(f"error: --device cuda: {device_suite.NO_CUDA}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # train's
    preset = args.preset or ("gpu" if device.type == "cuda" else "cpu")
    precision = args.precision or training.choose_precision(None, device)
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    if args.one:  # one row in a process of its own (device_suite.one_command)
        return device_suite.print_row(json.loads(args.one), run_row, preset, device, precision,
                                      args.compile, args.peak_tflops, args.work)
    header = device_suite.describe(device, precision, args.compile)
    print(f"bench.py --preset {preset}: {header}")
    results = device_suite.run_rows(specs(PRESETS[preset], args.rows), preset, device, precision,
                                    args.compile, args.peak_tflops, torch.get_num_threads())
    device_suite.print_results(results)
    if args.json:
        write_json(args.json, dict(setup=header, preset=preset, results=results,
                                   targets=device_suite.target_records(results)))
    return results


if __name__ == "__main__":
    main()
