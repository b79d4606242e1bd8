"""
train.py's settings: the --dataset presets, and one dataclass per concern whose fields are the
flags, each with the paper's value as its default and its table in its help; DMP's options are
dmp.DMPOptions' fields. parse_args() makes the command line of them, fills in what it does not
give from the preset, then the defaults, and refuses a number out of its range in one sentence.
"""
import argparse
import dataclasses
import sys
from dataclasses import dataclass, field

import digits_fid
import dmp
from model_dit import CONFIGS, DIGITS_MODELS
from model_unet import UNet_configs

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
#               Settings: one dataclass per concern, a flag per field           #
#################################################################################

def setting(default=None, help="", **meta):
    """A field: its default (the paper's value; None: the preset's or derived), its flag's help,
    and range ('[1, inf)': at least 1), choices, type, negatable (--no-X) where it has them."""
    return field(default=default, metadata=dict(help=help, **meta))


def lora_rank(value):
    """--lora-rank: a positive integer or 'dmp'."""
    if value == "dmp":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a positive integer nor 'dmp'")
    return int(value)


@dataclass
class Data:
    """What trains on what: the data, the model, where it starts."""
    dataset: str = setting("demo", "a preset of the settings below", choices=list(PRESETS))
    data: str = setting(None, "a folder written by prepare_data.py")
    model: str = setting(None, "a DiT config (DiT-XL/2, ...; 'digits' or 'digits-tiny' for the "
                         "tiny ones) when pretraining; sd15 (or sd-tiny) for Stable Diffusion "
                         "with --init")
    init: str = setting(None, "none: pretrain from scratch; an official name, a checkpoint or a "
                        "run folder to further-train")
    num_heads: int = setting(None, "the head count of an --init DiT state dict that records no "
                             "config and has no official width")
    method: str = setting(None, "further-training method (default dmp with --init; with no --init, "
                          "dmp trains backbone and prompts together: Table 6)", choices=dmp.METHODS)
    noise_schedule: str = setting(None, "ffhq, coco: cosine; imagenet: linear; laion (SD): "
                                  "scaled_linear", choices=["linear", "cosine", "scaled_linear"])
    unconditional: bool = setting(None, "every label 0, num_classes 1", negatable=True)
    class_dropout: float = setting(0.1, "label dropout for guidance (conditional)", range="[0, 1]")
    caption_dropout: float = setting(0.1, "text data: empty caption, for guidance", range="[0, 1]")
    text_encoder: str = setting(None, "a DiT on text data: the CLIP ViT-L/14 text encoder (a "
                                "diffusers folder, its text_encoder/ or an SD 1.x checkpoint)")
    holdout: int = setting(0, "images kept out of training for the held-out metrics",
                           range="[0, inf)")


@dataclass
class Optimization:
    """The paper's appendix: AdamW, lr 1e-4 constant, no weight decay, batch 128, flips, no EMA."""
    iterations: int = setting(None, "default 50000 with --init (paper), 400000 from scratch",
                              range="[1, inf)")
    batch_size: int = setting(128, "global batch, split over the processes", range="[1, inf)")
    lr: float = setting(1e-4, "AdamW's learning rate, constant", range="[0, inf)")
    lr_scale: float = setting(1.0, "the method's multiplier of --lr: the DMP paper trains every "
                              "method at the same lr (1); DiffFit's paper: 10 for DiffFit and "
                              "BitFit", range="[0, inf)")
    weight_decay: float = setting(0.0, "AdamW's", range="[0, inf)")
    ema: float = setting(None, "EMA decay; default 0.9999 when pretraining, none when "
                         "further-training", range="[0, 1)")
    flip: bool = setting(True, "random horizontal flips (--no-flip: none, the digits presets')",
                         negatable=True)
    augment: bool = setting(False, "pixel data: a fresh random affine transformation of every "
                            "training image (dataset.augment; the held-out images get fixed "
                            "draws of it)", negatable=True)


@dataclass
class Balancing:
    """DMP's losses (Table 4e) and the authors' code; its other options are dmp.DMPOptions."""
    importance_coef: float = setting(1.0, "Table 4e: importance balancing (Eqs. 12-13)",
                                     range="[0, inf)")
    load_coef: float = setting(1.0, "Table 4e: load balancing (Eq. 11)", range="[0, inf)")
    authors_code: bool = setting(False, "all four of the authors' deviations (dmp.AUTHORS_CODE)")


@dataclass
class Baselines:
    """The options of LoRA and DiffFit (dmp.patch)."""
    lora_rank: str = setting(16, "an integer, or 'dmp': the rank whose parameter count is nearest "
                             "DMP's on this model (dmp.lora_rank_matching)", type=lora_rank)
    gamma_fraction: float = setting(0.5, "DiffFit: the first half of the blocks get scale factors "
                                    "(its Table 4b)", range="[0, 1]")
    pos_scale: float = setting(1.0, "DiffFit: 0.5 fine-tunes a 256 model at 512", range="(0, inf)")


@dataclass
class Machinery:
    """Where and how a run runs, is watched and is kept; none changes what a step computes."""
    results_dir: str = setting("runs", "where run folders are made")
    resume: str = setting(None, "a run folder (or one of its checkpoints) to continue")
    seed: int = setting(0, "every draw of a run is a function of (seed, step)", range="[0, inf)")
    device: str = setting(None, "default: cuda if available, else cpu")
    precision: str = setting(None, "default: bf16 autocast on a GPU that computes in bf16 (A100, "
                             "H100, ...), fp16 autocast with a gradient scaler on one that does "
                             "not (V100, T4), fp32 on CPU", choices=["fp32", "bf16", "fp16"])
    compile: bool = setting(False, "torch.compile each block of the model")
    grad_accum: int = setting(1, "each step's batch in K micro-batches whose gradients add up "
                              "before the optimizer's step: the activations of 1/K of the batch "
                              "(docs/speed-and-memory.md)", range="[1, inf)")
    checkpointing: bool = setting(False, "activation checkpointing: each block keeps only its "
                                  "input and runs again in the backward pass (about 1/3 more "
                                  "compute)")
    threads: int = setting(None, "torch's CPU threads (default torch's choice; the digits presets "
                           "use 1: their matrices are too small to share)", range="[1, inf)")
    log_every: int = setting(100, "a log line every K steps", range="[1, inf)")
    ckpt_every: int = setting(5000, "a checkpoint every K steps", range="[1, inf)")
    keep: int = setting(3, "checkpoints kept (older ones are deleted)", range="[1, inf)")
    sample_every: int = setting(10000, "a sample grid every K steps (0: never)", range="[0, inf)")
    eval_every: int = setting(0, "held-out loss every K steps (needs --holdout)", range="[0, inf)")
    eval_bpd: bool = setting(False, "held-out bits/dim before and after training", negatable=True)
    eval_fd: bool = setting(False, "with --eval-bpd, on the bundled digits: the sample quality too "
                            "(digits_fid: FD and KID of 297 samples against the held-out digits)",
                            negatable=True)
    bpd_images: int = setting(None, "bits/dim on this many held-out images (default all; the bound "
                              "costs 1000 forward passes of them)", range="[1, inf)")


GROUPS = [(Data, None), (Optimization, None), (dmp.DMPOptions, "DMP options (dmp.DMPOptions)"),
          (Balancing, "DMP options"), (Baselines, "baselines (dmp.patch)"), (Machinery, None)]
# DMPOptions' ranges (dmp.py declares its options, train.py the numbers a flag may take)
DMP_RANGES = dict(top_k="(0, 1]", num_prompts="[1, inf)", prompt_depth="[1, inf)",
                  prompt_grid="[1, inf)", gate_lr_scale="[0, inf)", time_bands="[1, inf)")


def add_flags(p, cls, title=None):
    """A flag per field of `cls`: --name-with-dashes, help and choices from its metadata, the type
    from its annotation (bool: a switch); default None, so a flag that is set was given."""
    g = p.add_argument_group(title) if title else p
    for f in dataclasses.fields(cls):
        meta, kind = f.metadata, str(f.type)
        help = meta.get("help", "") + ("" if f.default in (None, False) else
                                       f" (default: {f.default})")
        flag = dict(default=None, help=help)
        if "bool" in kind:
            flag["action"] = argparse.BooleanOptionalAction if meta.get("negatable") else "store_true"
        else:
            flag.update(choices=meta.get("choices"), type=meta.get("type") or (
                float if "float" in kind else int if "int" in kind else str))
        g.add_argument("--" + f.name.replace("_", "-"), **flag)


def parse_args(argv=None):
    """The command line over the --dataset preset; `given`: the settings the command line names."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for cls, title in GROUPS:
        add_flags(p, cls, title)
    p.error = usage_error
    args = p.parse_args(argv)
    args.given = sorted(k for k, v in vars(args).items() if v is not None)
    preset = PRESETS[args.dataset or "demo"]
    for f in (f for cls, _ in GROUPS for f in dataclasses.fields(cls)):
        if getattr(args, f.name) is None:  # not given: the preset's, else the paper's
            setattr(args, f.name, preset.get(f.name, f.default))
    args.text = preset.get("text", False)
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
    known = [*DIGITS_MODELS, *CONFIGS, *UNet_configs]
    if args.model is not None and args.model not in known:
        p.error(f"--model {args.model} is not a config: choose one of {', '.join(known)}")
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


def range_errors(args):
    """Each setting outside its range (field metadata), as '--flag value (must be ...)'; NaN is
    outside every range."""
    bad = []
    for f in (f for cls, _ in GROUPS for f in dataclasses.fields(cls)):
        interval, v = f.metadata.get("range", DMP_RANGES.get(f.name)), getattr(args, f.name)
        if interval is None or v is None:
            continue
        (low, high), shut = map(float, interval[1:-1].split(",")), (interval[0], interval[-1])
        if not ((v >= low if shut[0] == "[" else v > low) and (v <= high if shut[1] == "]"
                                                               else v < high)):
            bad.append(f"--{f.name.replace('_', '-')} {v} (must be {range_words(interval)})")
    return bad


def range_words(interval):
    """'[1, inf)' -> 'at least 1', '[0, 1)' -> 'from 0, below 1', ..."""
    low, high = interval[1:-1].split(", ")
    if high == "inf":
        return f"at least {low}" if interval[0] == "[" else f"above {low}"
    return {"[]": f"from {low} to {high}", "[)": f"from {low}, below {high}",
            "(]": f"above {low}, at most {high}", "()": f"above {low}, below {high}"}[
        interval[0] + interval[-1]]


def method_options(args, sd=False):
    """The command line's options for dmp.patch(model, args.method, **options) (`sd`: SD's UNet)."""
    if args.method not in ("dmp", "prompt"):
        options = dict(lora=dict(rank=args.lora_rank),
                       difffit=dict(gamma_fraction=args.gamma_fraction, pos_scale=args.pos_scale))
        return dict(options.get(args.method, {}), lr_scale=args.lr_scale)
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(dmp.DMPOptions)}
    options["lr_scale"] = args.lr_scale
    if options["gate_cond"] is None:  # Table 9: the gate reads the text too
        options["gate_cond"] = "t+c" if args.text else "t"
    if args.authors_code:
        options.update(dmp.AUTHORS_CODE)
        # The authors' noisy gating perturbs a linear gate's logits; the attention gate has none.
        options["noisy_gate"] = args.noisy_gate or args.gate == "linear"
    if not sd:
        del options["prompt_grid"]
    if options["time_bands"] == 1:  # one prompt set: the paper's; its patches record no bands
        del options["time_bands"]
    return {k: v for k, v in options.items() if v is not None}
