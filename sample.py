"""
Sample a DiT or Stable Diffusion, patched or not: a grid PNG to look at, or an FID set (a PNG
folder plus one .npz).

    python sample.py --ckpt DiT-XL-2-256x256.pt --class-labels 207 360 387 974 88 979 417 279
    python sample.py --ckpt runs/000-ffhq-dmp --grid 16       # a run folder: its last checkpoint
    python sample.py --ckpt runs/ffhq-dmp/patch.pt --grid 16  # a patch names its base
    python sample.py --ckpt runs/coco-dmp/patch.pt --prompt "a cat on a sofa" "a red bus"
    torchrun --nproc_per_node 8 sample.py --ckpt base.pt --patch patch.pt --num-samples 50000 \\
        --out samples/x
    python fid.py ref.npz samples/x.npz
    python sample.py --model sd15 --ckpt v1-5-pruned-emaonly.safetensors --prompt "a red bicycle"
    python sample.py --model sd15 --ckpt stable-diffusion-v1-5/ --patch patch.pt \\
        --prompt-file coco30k.txt --num-samples 30000 --out samples/sd-dmp   # prompt k for image k

Image k draws everything random from one generator seeded by (seed, k) (sampling.py), so a seed
gives the same images whatever the batch size and the number of processes, and the first N images
of an FID set are the grid of N with the same seed. An FID set is resumable: images already in the
folder are kept, each PNG is written under a temporary name and renamed, and the .npz is
assembled by rank 0 once every image is there. A grid (the first images of the set) shows images
smaller than 64 pixels enlarged by nearest neighbour, each pixel a square, so that the digits' 8x8
samples can be seen; the set keeps them as they are.
"""
import argparse
import hashlib
import json
import os
import sys
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import distributed
import load
from checkpoints import CheckpointError, file_sha256, hold, write_json
from model_vae import load_vae
from sampling import (SampleError, check_dit, default_cfg_scale, dit_batch, make_diffusion,
                      save_png, sd_batch, write_grid, write_sd_grid)


#################################################################################
#                          FID sets: PNGs, then one .npz                        #
#################################################################################

def is_done(path):
    """A readable PNG is a finished image; anything else (missing, truncated) is sampled again."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # PIL: OSError, SyntaxError or struct.error on a damaged file: "not done"
        return False


def read_rgb(path):
    """A PNG as uint8 RGB (H, W, 3)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def check_out(path):
    """Refuse an --out that lies under a regular file now, before any sampling, in one sentence."""
    for folder in Path(path).parents:  # the nearest first
        if folder.exists():
            if not folder.is_dir():
                raise SampleError(f"--out {path}: {folder} is a file, not a folder")
            return


def check_new(path, what):
    """Refuse, before any sampling, an output path where something already is: nothing is written
    over a file, whatever its name says it holds."""
    if os.path.lexists(path):
        raise SampleError(f"{path} already exists ({what} is written only where nothing is): use "
                          f"another --out, or move it")


def npz_is_this_sets(out_dir, npz_path):
    """Whether npz_path is the .npz this set wrote: its sha256 is the one out_dir/npz.json recorded
    (a file put there by hand or by another set is not)."""
    try:
        recorded = json.loads((out_dir / "npz.json").read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return file_sha256(npz_path) == recorded


def write_npz(out_dir, n, npz_path):
    """
    Images 0..n-1 of out_dir as one .npz (arr_0: uint8 N x H x W x 3, what np.savez writes and
    ADM's evaluator and fid.py read), streamed into the zip one image at a time so 50K images need
    not fit in memory. Its sha256 is recorded in out_dir/npz.json, then it is linked into place,
    which fails if anything is there: never over another file.
    """
    paths = [out_dir / f"{k:06d}.png" for k in range(n)]
    shape = read_rgb(paths[0]).shape
    tmp = npz_path.with_name(f".{npz_path.name}.tmp")
    try:
        with (zipfile.ZipFile(tmp, "w", allowZip64=True) as zf,
              zf.open("arr_0.npy", "w", force_zip64=True) as f):
            header = dict(descr="|u1", fortran_order=False, shape=(n, *shape))
            np.lib.format.write_array_header_1_0(f, header)
            for path in tqdm(paths, desc=f"writing {npz_path.name}", unit="img"):
                image = read_rgb(path)
                if image.shape != shape:
                    raise SampleError(f"{path} is {image.shape[1]}x{image.shape[0]}, not "
                                      f"{shape[1]}x{shape[0]} as {paths[0].name}: the folder mixes "
                                      f"two sample sets")
                f.write(image.tobytes())
    except OSError as e:  # disk full: the PNGs stay, a rerun writes the .npz again
        tmp.unlink(missing_ok=True)
        raise SampleError(f"{npz_path}: could not be written ({e.strerror or e}); the {n} PNGs are "
                          f"kept, and rerunning the same command writes it") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        write_json(out_dir / "npz.json", dict(sha256=file_sha256(tmp)))
        os.link(tmp, npz_path)
    except FileExistsError:
        raise SampleError(f"{npz_path} appeared while the set was written; it is left as it is, "
                          f"and the set's PNGs are kept") from None
    except OSError as e:
        raise SampleError(f"{npz_path}: could not be written ({e.strerror or e}); the {n} PNGs are "
                          f"kept, and rerunning the same command writes it") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_samples(n, make_batch, out_dir, batch_size, settings):
    """
    Images 0..n-1 as out_dir/000000.png ...: make_batch(ks) returns uint8 (len(ks), H, W, 3) for
    image indices ks. Images already written are skipped; the rest are split evenly over the
    processes. `settings` (what determines the images) is recorded in out_dir/settings.json, and a
    folder of other settings is refused.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    recorded = out_dir / "settings.json"
    if not recorded.is_file() and [f for f in os.listdir(out_dir) if not f.startswith(".")]:
        # Not a set this script started (it writes settings.json before any image): the user's own
        # images are neither counted as samples nor joined by ours, nor is anything written there.
        raise SampleError(f"{out_dir} holds files and is not a sample set (it has no settings.json): "
                          f"use another --out for the set")
    # Rank 0 holds the set while it is written: a second sample.py into it at once is refused. The
    # lock file goes at the end (a set holds its images and settings only).
    held = hold(out_dir, "sample.py writing this set") if rank == 0 else None
    try:
        _write_samples(n, make_batch, out_dir, batch_size, settings, rank, world)
    finally:
        if held is not None:
            (out_dir / ".lock").unlink(missing_ok=True)
            os.close(held)


def _write_samples(n, make_batch, out_dir, batch_size, settings, rank, world):
    """write_samples' work, the folder held."""
    recorded = out_dir / "settings.json"
    if recorded.is_file():
        try:
            before = json.loads(recorded.read_text())
        except ValueError:
            before = None
        if not isinstance(before, dict):
            raise SampleError(f"{recorded} is not the settings.json of a sample set: use another "
                              f"--out")
        if "precision" not in before:  # a set from before the precision was recorded
            settings = {k: v for k, v in settings.items() if k != "precision"}
        differ = sorted(k for k in {*before, *settings} if before.get(k) != settings.get(k))
        if differ:
            raise SampleError(f"{out_dir} holds samples of other settings ({', '.join(differ)} "
                              f"differ from {recorded}): use another --out or delete it")
    if rank == 0 and not recorded.is_file():
        try:
            write_json(recorded, settings)  # disk full: no half file, under either name
        except OSError as e:
            raise SampleError(f"{recorded}: could not be written ({e.strerror or e}); nothing "
                              f"was sampled") from None
    # Each process checks its residue class, then all agree on the list of missing images and
    # split it.
    todo = [k for k in range(rank, n, world) if not is_done(out_dir / f"{k:06d}.png")]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, todo)
        todo = sorted(k for part in gathered for k in part)
    if rank == 0:
        print(f"{n - len(todo)} of {n} images already in {out_dir}, sampling {len(todo)} on "
              f"{world} process(es)")
    mine = todo[rank::world]
    with tqdm(total=len(todo), desc="sampling", unit="img", disable=rank != 0) as bar:
        for i in range(0, len(mine), batch_size):
            ks = mine[i:i + batch_size]
            for k, image in zip(ks, make_batch(ks), strict=True):
                save_png(image, out_dir / f"{k:06d}.png")
            bar.update(min(len(ks) * world, bar.total - bar.n))  # the others keep the same pace
    if world > 1:
        dist.barrier()


def weights_sha256(*modules):
    """
    One sha256 of every weight of `modules` (None skipped): names, dtypes, shapes and bytes. What
    an FID set records of the model that made it, so a set is never continued by other weights
    under the same path.
    """
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in (module.state_dict() if module is not None else {}).items():
            h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)};".encode())
            h.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def check_finite(name, *modules):
    """Refuse weights that are not finite: NaN weights sample black images that look like a set."""
    for module in modules:
        if module is None or isinstance(module, str):
            continue
        bad = sum(int((~torch.isfinite(t)).sum()) for t in module.state_dict().values()
                  if t.is_floating_point())
        if bad:
            raise SampleError(f"{name}: {bad} of its weights are not finite (NaN or inf), so every "
                              f"sample would be noise or black; it is a diverged or damaged checkpoint")


def prompts_of(args):
    """The prompts of --prompt-file (one a line) or --prompt, None if neither (SD, text DiT)."""
    if args.prompt_file:
        return read_prompts(args.prompt_file)
    return args.prompt


def read_prompts(path):
    """
    A prompt file: one prompt per line (blank lines skipped); image k of a sample set takes line k
    mod n.
    """
    try:
        # Lines end at \n alone: splitlines() would also split at U+2028, \x0c, \x1c..., which a
        # caption may hold, and shift every later prompt to another image.
        lines = Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise SampleError(f"{path}: not a readable UTF-8 text file of prompts "
                          f"({type(e).__name__})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SampleError(f"{path}: holds no prompts (one per line)")
    return prompts


#################################################################################
#                       A grid or a set: DiT and Stable Diffusion               #
#################################################################################

# What decides a set's images (not batch sizes or TF32): settings.json records these. The
# precision moves pixels (docs/evaluation.md) and its default is the device's, so a set begun on a
# GPU in bf16 is not continued in fp32 on another machine.
DIT_SETTINGS = ("ckpt", "patch", "seed", "class_labels", "cfg_scale", "guide_all_channels",
                "sampler", "steps", "eta", "noise_schedule", "vae", "text_encoder", "num_heads",
                "precision")
SD_SETTINGS = ("ckpt", "patch", "model", "seed", "cfg_scale", "sampler", "steps", "resolution",
               "precision")


def settings_of(args, keys, is_path):
    """The settings `keys` of args, each string that is_path(Path) accepts by its absolute path."""
    settings = {k: v for k, v in vars(args).items() if k in keys}
    for k, v in settings.items():
        if isinstance(v, str) and is_path(Path(v)):
            settings[k] = str(Path(v).resolve())
    return settings


def output_name(args):
    """The default name of a grid or set: checkpoint, patch, sampler and steps, guidance, seed."""
    parts = [Path(args.ckpt).stem]
    if args.patch:
        parts.append(Path(args.patch).stem)
    parts += [f"{args.sampler}{args.steps}", f"cfg{args.cfg_scale:g}", f"seed{args.seed}"]
    return "-".join(parts)


def grid_size(args):
    """--grid, else one image per --class-labels or --prompt, else 16."""
    if args.grid:
        return args.grid
    given = args.class_labels or args.prompt
    if given:
        return len(given)
    return 16


def write_set(args, make_batch, settings, rank):
    """The FID set: --num-samples PNGs (write_samples, every process), then rank 0's .npz."""
    out_dir = Path(args.out or f"samples/{output_name(args)}")
    npz_path = out_dir.with_name(out_dir.name + ".npz")
    done = npz_path.exists() and npz_is_this_sets(out_dir, npz_path)
    if not done:  # an .npz this set did not write (another set's, a reference batch) is never replaced
        check_new(npz_path, f"the set's .npz, {npz_path.name},")
    write_samples(args.num_samples, make_batch, out_dir, args.batch_size, settings)
    if rank == 0 and done:
        print(f"{npz_path} is already this set's ({args.num_samples} images)")
    elif rank == 0:
        write_npz(out_dir, args.num_samples, npz_path)
        print(f"wrote {npz_path} ({args.num_samples} images)")


def dit_main(args, rank, device):
    """A DiT (official, trained, patched): a grid, or an FID set."""
    try:
        model, found = load.open_model(args.ckpt, args.patch, None, args.allow_base_mismatch,
                                       args.num_heads)  # each file read once
    except RuntimeError as e:  # load_state_dict's size mismatch: a patch made for another model
        raise SampleError(f"{args.patch or args.ckpt} does not fit its base: "
                          f"{str(e).splitlines()[-1].strip()}") from None
    model = model.to(device).eval()
    # What train.py recorded, else the official DiT's defaults (linear betas, sd-vae-ft-mse for 4
    # channels).
    found = found["settings"]
    if args.noise_schedule is None:
        args.noise_schedule = found.get("noise_schedule", "linear")
    if not args.vae:
        args.vae = found.get("vae")
    if not args.vae:
        args.vae = "mse" if model.in_channels == 4 else "none"
    if args.cfg_scale is None:
        args.cfg_scale = default_cfg_scale(model)
    prompts = prompts_of(args)
    text_encoder = None
    if model.text_dim:
        if not args.text_encoder:
            args.text_encoder = found.get("text_encoder")
        text_encoder = load.load_text_encoder(args.text_encoder, device)
    elif args.text_encoder:
        raise SampleError(f"--text-encoder is for a text-conditioned DiT, and {args.ckpt} is not one "
                          f"(it is class-conditional or unconditional)")
    check_finite(args.ckpt, model)
    options = dict(class_labels=args.class_labels, cfg_scale=args.cfg_scale,
                   decode_batch_size=args.decode_batch_size, bf16=args.precision == "bf16",
                   guide_channels=None if args.guide_all_channels else 3, prompts=prompts,
                   text_encoder=text_encoder)
    vae = load_vae(args.vae, device)
    check_finite(args.vae, vae)
    check_dit(model, vae, args.cfg_scale, args.class_labels, args.ckpt, prompts)
    if args.num_samples is None:
        path = args.out or f"samples/{output_name(args)}.png"
        check_new(path, "a grid")
        path = write_grid(model, path, args.noise_schedule, vae, grid_size(args), args.seed,
                          args.steps, args.sampler, args.eta, batch_size=args.batch_size, **options)
        print(f"wrote {path}")
        return
    diffusion = make_diffusion(args.sampler, args.steps, args.noise_schedule, model.learn_sigma)
    make_batch = partial(dit_batch, model=model, diffusion=diffusion, vae=vae, seed=args.seed,
                         eta=args.eta, **options)
    settings = settings_of(args, DIT_SETTINGS, Path.is_file)
    if prompts:
        settings["prompts"] = prompts
    settings["weights_sha256"] = weights_sha256(model, vae, text_encoder)
    write_set(args, make_batch, settings, rank)


def sd_main(args, rank, device):
    """sample.py --model: a grid of the prompts, or an FID set over the prompt file."""
    if args.sampler not in ("pndm", "ddim"):
        raise SampleError(f"--sampler {args.sampler} is DiT's: Stable Diffusion samples with pndm "
                          f"or ddim")
    if args.cfg_scale < 1.0:
        raise SampleError(f"--cfg-scale must be at least 1 (1 = no guidance), not "
                          f"{args.cfg_scale:g}")
    prompts = prompts_of(args)
    if not prompts:
        raise SampleError("Stable Diffusion needs --prompt or --prompt-file")
    unet, text_encoder, vae = load.load_sd(args.ckpt, args.model, args.patch, device,
                                           args.allow_base_mismatch)
    unet.eval()
    check_finite(args.ckpt, unet, text_encoder, vae)
    options = dict(cfg_scale=args.cfg_scale, sampler=args.sampler, steps=args.steps,
                   resolution=args.resolution, decode_batch_size=args.decode_batch_size,
                   bf16=args.precision == "bf16")
    if args.num_samples is None:
        path = args.out or f"samples/{output_name(args)}.png"
        check_new(path, "a grid")
        path = write_sd_grid(unet, text_encoder, vae, path, prompts, args.grid or len(prompts),
                             args.seed, args.batch_size, **options)
        print(f"wrote {path}")
        return
    settings = settings_of(args, SD_SETTINGS, Path.exists)
    settings.update(prompts=prompts, weights_sha256=weights_sha256(unet, text_encoder, vae))
    make_batch = partial(sd_batch, unet=unet, text_encoder=text_encoder, vae=vae, prompts=prompts,
                         seed=args.seed, **options)
    write_set(args, make_batch, settings, rank)


#################################################################################
#                                     Main                                      #
#################################################################################

def positive(text):
    """A positive integer argument (--grid, --num-samples, ...)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return int(text)


def parse_args(argv=None):
    """The command line, with the defaults that depend on the model and sampler filled in."""
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--ckpt", required=True,
                   help="official name (DiT-XL-2-256x256.pt), checkpoint, patch file or train.py "
                   "run folder; with --model an SD 1.x file or diffusers folder")
    p.add_argument("--model", choices=list(load.SD_MODELS),
                   help="Stable Diffusion (default: a DiT)")
    p.add_argument("--prompt", nargs="+",
                   help="SD or a text DiT: prompts, one image each (repeated to --grid)")
    p.add_argument("--prompt-file",
                   help="SD or a text DiT: one prompt per line; image k takes line k mod n (FID "
                   "sets)")
    p.add_argument("--text-encoder",
                   help="a text DiT's CLIP text encoder (default: the one train.py recorded)")
    p.add_argument("--resolution", type=positive, help="SD: image side (default 512)")
    p.add_argument("--patch", help="a patch file to apply to --ckpt")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="apply a patch to a base other than the one it was trained on (its "
                   "recorded sha256 differs), warning")
    p.add_argument("--num-heads", type=positive, help="a DiT state dict that records no config "
                   "and has no official width: its head count")
    p.add_argument("--grid", type=positive,
                   help="images in the grid PNG (default: one per --class-labels, else 16)")
    p.add_argument("--num-samples", type=positive,
                   help="write an FID set of this many images instead of a grid")
    p.add_argument("--out",
                   help="grid PNG path, or FID set folder (its .npz goes next to it: DIR.npz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-labels", type=int, nargs="+",
                   help="labels, repeated in turn (default: random)")
    p.add_argument("--cfg-scale", type=float,
                   help="guidance scale (default 1.5 with a null class, else 1; SD 7.5)")
    p.add_argument("--guide-all-channels", action="store_true",
                   help="guide every channel, not the official 3")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "pndm"],
                   help="default ddpm (DiT), pndm (SD, the paper's)")
    p.add_argument("--steps", type=positive,
                   help="sampling steps (default 250 for DDPM, the paper's; 50 otherwise)")
    p.add_argument("--eta", type=float, help="DDIM's eta (default 0: deterministic)")
    p.add_argument("--noise-schedule", choices=["linear", "cosine"],
                   help="default: recorded, else linear")
    p.add_argument("--vae",
                   help="ema, mse, none or a path (default: recorded, else mse for 4-channel "
                   "models)")
    p.add_argument("--batch-size", type=positive, default=32,
                   help="images per forward pass, per process")
    p.add_argument("--decode-batch-size", type=positive, default=32)
    p.add_argument("--precision", choices=["fp32", "bf16"],
                   help="default: bf16 autocast on a GPU that computes in bf16 (A100, H100, ...), "
                   "else fp32 (docs/evaluation.md: what bf16 changes in the samples)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="TF32 matmuls on CUDA")
    p.error = error
    args = p.parse_args(argv)
    if args.sampler is None:
        args.sampler = "pndm"
        if not args.model:
            args.sampler = "ddpm"
    if args.steps is None:
        args.steps = 50
        if args.sampler == "ddpm":
            args.steps = 250
    if args.model:  # Stable Diffusion: the paper's guidance 7.5, SD's resolution
        if args.cfg_scale is None:
            args.cfg_scale = 7.5
        if args.resolution is None:
            args.resolution = load.SD_MODELS[args.model]["resolution"]
        return args
    if args.sampler == "pndm":
        p.error("--sampler pndm is Stable Diffusion's: add --model")
    if args.sampler == "ddpm" and args.eta is not None:
        p.error("--eta is DDIM's: add --sampler ddim")
    if args.sampler == "ddim" and args.eta is None:
        args.eta = 0.0  # deterministic; DDPM keeps None (dit_batch)
    if args.grid and args.num_samples:
        p.error("give --grid or --num-samples, not both")
    if args.seed < 0:
        p.error("--seed must be non-negative")
    return args


def precision(requested, device):
    """--precision, or the device's default: bf16 autocast on a GPU that computes in bf16 (Ampere
    and later; several times faster than fp32), fp32 elsewhere (the CPU, V100, T4)."""
    if requested:
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "fp32"


def error(message):
    """sample.py's errors, argparse's and ours: one line (exit status 2), no usage text above."""
    print(f"sample.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    """Sample (the module docstring); every bad input or fault ends in error()'s one line."""
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.num_samples is None and int(os.environ.get("RANK", 0)) > 0:
        return  # a grid is one process's work
    try:
        rank = 0
        if args.num_samples is not None:  # an FID set: torchrun's processes share it
            rank, _, _ = distributed.setup()
        device = distributed.local_device()
        args.precision = precision(args.precision, device)
        check_out(args.out or "samples")
        if args.model:
            sd_main(args, rank, device)
        else:
            dit_main(args, rank, device)
    except (CheckpointError, SampleError) as e:  # one sentence: load.py's, the models', ours
        error(str(e))
    except OSError as e:  # --out under a regular file, a read-only folder, a full disk
        error(f"{e.filename or args.out}: {e.strerror or e}")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
