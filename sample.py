"""
Sample a DiT or Stable Diffusion, patched or not: a grid PNG to look at, or an FID set (a PNG folder plus one .npz).

    python sample.py --ckpt DiT-XL-2-256x256.pt --class-labels 207 360 387 974 88 979 417 279
    python sample.py --ckpt runs/ffhq-dmp/patch.pt --grid 16                  # a patch names its base
    python sample.py --ckpt runs/coco-dmp/patch.pt --prompt "a cat on a sofa" "a red bus"   # a text DiT (COCO)
    torchrun --nproc_per_node 8 sample.py --ckpt base.pt --patch patch.pt --num-samples 50000 --out samples/x
    python fid.py ref.npz samples/x.npz
    python sample.py --model sd15 --ckpt v1-5-pruned-emaonly.safetensors --prompt "a red bicycle"   # Stable Diffusion
    python sample.py --model sd15 --ckpt stable-diffusion-v1-5/ --patch patch.pt --prompt-file coco30k.txt \
        --num-samples 30000 --out samples/sd-dmp                                   # an FID set, prompt k for image k

Image k draws everything random (its label when none is given, its initial noise, every step's noise) from one
generator seeded by (seed, k), so a seed gives the same images whatever the batch size and the number of
processes, and the first N images of an FID set are the grid of N with the same seed. (Exact on CPU; on a GPU
the kernels a batch size selects can change the last float bits, rarely one pixel level.)
An FID set is resumable: images already in the folder are kept, each PNG is written under a temporary name and
renamed, and the .npz is assembled by rank 0 once every image is there.
"""
import argparse
import hashlib
import json
import math
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

import dmp
from checkpoints import CheckpointError, read_state_dict
from diffusion import create_diffusion, dit_sample
from diffusion import sd_guided_eps, sd_sample
from model_clip import CLIP_TINY, CLIP_VITL14, caption_embeddings, encode_text, load_clip_text
from model_unet import UNet_configs
from model_vae import SCALE_FACTOR, load_vae


class SampleError(ValueError):
    """Bad input: the message is one sentence, printed as `sample.py: error: ...`."""


#################################################################################
#                     Per-image randomness and image output                     #
#################################################################################

def image_generator(seed, k):
    """The one CPU generator image k draws from: seeded by (seed, k) only, never by its batch or process."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0]))


def to_uint8(x):
    """
    Images in [-1, 1] (N, C, H, W) to uint8 (N, H, W, 3), exactly as the official DiT sample_ddp.py; one-channel
    (grayscale pixel-space) images are repeated to RGB, the layout FID tools read.
    """
    x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


def save_png(image, path):
    """
    Write under a temporary name, then rename: a killed run never leaves a half PNG under the
    final name, and a failed write (disk full) leaves no temporary file either.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(image).save(tmp, format="PNG")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SampleError(f"{path}: could not be written ({e.strerror or e}); the images written "
                          f"before are kept, and rerunning the same command resumes") from None
    os.replace(tmp, path)


def is_done(path):
    """A readable PNG is a finished image; anything else (missing, truncated) is sampled again."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # PIL raises OSError, SyntaxError or struct.error on a damaged file: all mean "not done"
        return False


def read_rgb(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def check_out(path):
    """Refuse an --out that lies under a regular file now, before any sampling, in one sentence."""
    for folder in Path(path).parents:  # the nearest first
        if folder.exists():
            if not folder.is_dir():
                raise SampleError(f"--out {path}: {folder} is a file, not a folder")
            return


def save_grid(images, path, padding=2):
    """torchvision's make_grid layout: ceil(sqrt(n)) columns, `padding` black pixels around every image."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), np.uint8)
    for i, image in enumerate(images):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top:top + h, left:left + w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(grid, path)


def write_npz(out_dir, n, npz_path):
    """
    Images 0..n-1 of out_dir as one .npz (arr_0: uint8 N x H x W x 3, what np.savez writes and ADM's evaluator and
    fid.py read), streamed into the zip one image at a time so 50K images need not fit in memory, then renamed.
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
    os.replace(tmp, npz_path)


#################################################################################
#            The generic loop: shares, resuming, PNGs (any model)               #
#################################################################################

def write_samples(n, make_batch, out_dir, batch_size, settings):
    """
    Images 0..n-1 as out_dir/000000.png ...: make_batch(ks) returns uint8 (len(ks), H, W, 3) for image indices
    ks. Images already written are skipped; the rest are split evenly over the processes. `settings` (what
    determines the images) is recorded in out_dir/settings.json, and a folder of other settings is refused.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    recorded = out_dir / "settings.json"
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        differ = sorted(k for k in {*before, *settings} if before.get(k) != settings.get(k))
        if differ:
            raise SampleError(f"{out_dir} holds samples of other settings ({', '.join(differ)} "
                              f"differ from {recorded}): use another --out or delete it")
    if rank == 0 and not recorded.is_file():
        recorded.with_name(".settings.json.tmp").write_text(json.dumps(settings, indent=1))
        os.replace(recorded.with_name(".settings.json.tmp"), recorded)
    # Each process checks its residue class, then all agree on the list of missing images and split it.
    todo = [k for k in range(rank, n, world) if not is_done(out_dir / f"{k:06d}.png")]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, todo)
        todo = sorted(k for part in gathered for k in part)
    if rank == 0:
        print(f"{n - len(todo)} of {n} images already in {out_dir}, sampling {len(todo)} on {world} process(es)")
    mine = todo[rank::world]
    with tqdm(total=len(todo), desc="sampling", unit="img", disable=rank != 0) as bar:
        for i in range(0, len(mine), batch_size):
            ks = mine[i:i + batch_size]
            for k, image in zip(ks, make_batch(ks)):
                save_png(image, out_dir / f"{k:06d}.png")
            bar.update(min(len(ks) * world, bar.total - bar.n))  # the other processes keep the same pace
    if world > 1:
        dist.barrier()


#################################################################################
#                        DiT: model, settings, one batch                        #
#################################################################################

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


def recorded_settings(ckpt, patch):
    """noise_schedule / vae / text_encoder that train.py recorded in the base, checkpoint and patch (later ones win)."""
    paths, found = [], {}
    if Path(str(ckpt)).is_file():
        entries = read_state_dict(ckpt)
        if {"method", "state"} <= set(entries) and dmp.recorded_base(entries):
            paths.append(dmp.recorded_base(entries))  # a patch or further-training checkpoint
        paths.append(ckpt)
    paths += [patch] if patch else []
    for path in paths:
        if Path(str(path)).is_file():
            entries = read_state_dict(path)
            found.update({k: entries[k] for k in ("noise_schedule", "vae", "text_encoder")
                          if isinstance(entries.get(k), str)})
    return found


def default_cfg_scale(model):
    """
    The paper's 1.5 (Sec. 4.1 and appendix, ImageNet and COCO) for a class-conditional model with a null class or
    a text-to-image one (its null embedding), else 1 (none).
    """
    labels = model.y_embedder
    return 1.5 if model.text_dim or (labels.dropout_prob > 0 and labels.num_classes > 1) else 1.0


def check_dit(model, vae, cfg_scale, class_labels, name, prompts=None):
    """Raise SampleError if the VAE, the guidance scale, the labels or the prompts do not fit the model."""
    labels = model.y_embedder
    if vae is None and model.in_channels not in (1, 3):
        raise SampleError(f"{name} has {model.in_channels} input channels, so it is not a grayscale or RGB "
                          f"pixel-space model: name its VAE with --vae")
    if vae is not None and vae.config["z_channels"] != model.in_channels:
        raise SampleError(f"the VAE has {vae.config['z_channels']} latent channels but {name} has {model.in_channels}")
    if cfg_scale < 1.0:
        raise SampleError(f"--cfg-scale must be at least 1 (1 = no guidance), not {cfg_scale:g}")
    if model.text_dim:
        if class_labels or not prompts:
            raise SampleError(f"{name} is a text-to-image DiT: give --prompt or --prompt-file (not --class-labels)")
        return
    if prompts:
        raise SampleError(f"{name} takes class labels, not prompts: --prompt and --prompt-file are for text-to-image models")
    if cfg_scale > 1.0 and labels.embedding_table.num_embeddings == labels.num_classes:
        raise SampleError(f"--cfg-scale {cfg_scale:g} needs a model trained with label dropout (a null class); "
                          f"{name} has none: use --cfg-scale 1")
    bad = [y for y in class_labels or [] if not 0 <= y < labels.num_classes]
    if bad:
        raise SampleError(f"--class-labels {bad[0]} is out of range: {name} has classes 0..{labels.num_classes - 1}")


def make_diffusion(sampler, steps, noise_schedule, learn_sigma=True):
    """DDPM on `steps` evenly spaced steps ("250", the paper's) or DDIM on exactly `steps` ("ddim50")."""
    try:
        return create_diffusion(f"ddim{steps}" if sampler == "ddim" else str(steps), noise_schedule,
                                learn_sigma=learn_sigma)
    except ValueError as e:
        raise SampleError(f"--steps {steps}: {e}") from None


@torch.no_grad()
def dit_batch(ks, model, diffusion, vae=None, seed=0, class_labels=None, cfg_scale=1.0, eta=None,
              guide_channels=3, decode_batch_size=32, bf16=False, prompts=None, text_encoder=None):
    """
    Images ks as uint8 (len(ks), H, W, 3): each from its own generator, sampled together, decoded in batches.
    eta=None: DDPM; a float: DDIM (with a "ddimN" diffusion). class_labels are used in turn, image k taking
    class_labels[k % len]; without them each image draws its label. A text-to-image DiT takes prompts instead,
    image k prompt k mod len(prompts), embedded by text_encoder and guided against the null embedding.
    """
    device = model.pos_embed.device
    gens = [image_generator(seed, k) for k in ks]
    size, channels = model.config["input_size"], model.in_channels
    if model.text_dim:
        y = caption_embeddings(text_encoder, [prompts[k % len(prompts)] for k in ks]).to(device)
    else:
        # The label is drawn even when given, so an image's noise does not depend on --class-labels.
        y = [int(torch.randint(model.y_embedder.num_classes, (), generator=g)) for g in gens]
        if class_labels:
            y = [class_labels[k % len(class_labels)] for k in ks]
        y = torch.tensor(y, device=device)
    z = torch.stack([torch.randn(channels, size, size, generator=g) for g in gens]).to(device)
    noise_fn = lambda x: torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device)  # noqa: E731
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        x = dit_sample(model, diffusion, z, y, cfg_scale, eta=eta, noise_fn=noise_fn,
                       guide_channels=guide_channels)
        if vae is not None:  # the model's latents are scaled; the VAE decodes unscaled ones
            x = torch.cat([vae.decode(c / SCALE_FACTOR).float() for c in x.split(decode_batch_size)])
    return to_uint8(x)


def write_grid(model, path, noise_schedule="linear", vae="none", num=16, seed=0, steps=250, sampler="ddpm",
               eta=0.0, cfg_scale=None, class_labels=None, batch_size=32, device=None, **options):
    """
    A grid PNG of images 0..num-1 (the first images of the FID set of the same seed); what train.py draws
    every --sample-every steps. vae: a name for load_vae or a loaded AutoencoderKL; cfg_scale None: the default
    rule; options: dit_batch's guide_channels, decode_batch_size, bf16, and prompts, text_encoder for text.
    Returns the path.
    """
    vae = load_vae(vae, device or model.pos_embed.device) if isinstance(vae, (str, Path)) else vae
    cfg_scale = default_cfg_scale(model) if cfg_scale is None else cfg_scale
    check_dit(model, vae, cfg_scale, class_labels, "the model", options.get("prompts"))
    diffusion = make_diffusion(sampler, steps, noise_schedule, model.learn_sigma)
    was_training = model.training
    model.eval()
    batches = [list(range(i, min(i + batch_size, num))) for i in range(0, num, batch_size)]
    images = np.concatenate([dit_batch(ks, model, diffusion, vae, seed, class_labels, cfg_scale,
                                       eta if sampler == "ddim" else None, **options)
                             for ks in tqdm(batches, desc="sampling", unit="batch", leave=False)])
    model.train(was_training)
    save_grid(images, Path(path))
    return Path(path)


#################################################################################
#               Stable Diffusion: model, prompts, one batch, a grid             #
#################################################################################

# --model: the UNet (model_unet.UNet_configs), its text encoder and the default resolution. sd-tiny is the
# golden tiny UNet with a CLIP of the same width, for tests and CPU demos.
SD_MODELS = {"sd15": dict(unet=UNet_configs["sd15"], clip=CLIP_VITL14, resolution=512),
             "sd-tiny": dict(unet=UNet_configs["sd-tiny"], clip=CLIP_TINY, resolution=64)}


def sd_base(ckpt):
    """The SD checkpoint (file or diffusers folder) behind `ckpt`: itself, or the base a patch file names."""
    path = Path(str(ckpt))
    if path.is_file() and path.suffix != ".safetensors":
        entries = read_state_dict(path)
        if {"method", "state"} <= set(entries) and dmp.recorded_base(entries):
            return dmp.recorded_base(entries)
    return ckpt


def load_sd(ckpt, model="sd15", patch=None, device="cpu", allow_base_mismatch=False):
    """
    (unet, text_encoder, vae) of an SD 1.x single file (.safetensors/.ckpt) or diffusers folder; the UNet patched
    by `patch` (or `ckpt` is itself a patch or train.py checkpoint naming its base). Text encoder and VAE frozen.
    """
    spec, base = SD_MODELS[model], sd_base(ckpt)
    unet = dmp.load_model(ckpt, patch, spec["unet"], allow_base_mismatch).to(device)
    text_encoder = load_text_encoder(base, device, spec["clip"])
    folder = Path(str(base))
    vae_file = next((f for f in sorted((folder / "vae").glob("diffusion_pytorch_model*")) if f.is_file()), None) \
        if folder.is_dir() else folder
    if vae_file is None:
        raise CheckpointError(f"{base}: a folder without vae/diffusion_pytorch_model.safetensors")
    return unet, text_encoder, load_vae(vae_file, device)


def load_text_encoder(path, device="cpu", config=None):
    """
    A frozen CLIP text encoder (model_clip.load_clip_text's layouts): SD's own, with its config, or a text-to-image
    DiT's --text-encoder (a diffusers folder or its text_encoder/, an SD 1.x or transformers file), config None:
    from its shapes, CLIP ViT-L/14 for the paper's COCO model.
    """
    if not path or not Path(str(path)).exists():
        raise CheckpointError(f"{path or 'no --text-encoder given'}: a text-to-image DiT needs the CLIP ViT-L/14 text "
                              "encoder, which is not downloaded here; pass --text-encoder with a diffusers text_encoder "
                              "folder or file, or an SD 1.x checkpoint")
    return load_clip_text(path, config).to(device).eval().requires_grad_(False)


def prompts_of(args):
    """The prompts of --prompt-file (one a line) or --prompt, None if neither (SD and text DiT alike)."""
    return read_prompts(args.prompt_file) if args.prompt_file else args.prompt


def read_prompts(path):
    """A prompt file: one prompt per line (blank lines skipped); image k of a sample set takes line k mod n."""
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SampleError(f"{path}: not a readable UTF-8 text file of prompts ({type(e).__name__})") from None
    if not prompts:
        raise SampleError(f"{path}: holds no prompts (one per line)")
    return prompts


@torch.no_grad()
def sd_batch(ks, unet, text_encoder, vae, prompts, seed=0, cfg_scale=7.5, sampler="pndm", steps=50, resolution=512,
             decode_batch_size=8, bf16=False):
    """
    Images ks as uint8 (len(ks), H, W, 3): image k has prompt k mod len(prompts) and its initial noise from
    image_generator(seed, k) (PNDM and DDIM draw nothing after it), guided against the empty prompt.
    """
    device = next(unet.parameters()).device
    f = 2 ** (len(vae.config["ch_mult"]) - 1)
    gens = [image_generator(seed, k) for k in ks]
    z = torch.stack([torch.randn(unet.config["in_channels"], resolution // f, resolution // f, generator=g)
                     for g in gens]).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        context = encode_text(text_encoder, [prompts[k % len(prompts)] for k in ks])[0]
        uncond = encode_text(text_encoder, [""] * len(ks))[0]
        x = sd_sample(sd_guided_eps(unet, context, uncond, cfg_scale), z, steps, sampler)
        x = torch.cat([vae.decode(c / SCALE_FACTOR).float() for c in x.split(decode_batch_size)])
    return to_uint8(x)


def write_sd_grid(unet, text_encoder, vae, path, prompts, num=16, seed=0, batch_size=8, **options):
    """A grid PNG of images 0..num-1 (sd_batch's options); what train.py draws every --sample-every steps."""
    was_training = unet.training
    unet.eval()
    batches = [list(range(i, min(i + batch_size, num))) for i in range(0, num, batch_size)]
    images = np.concatenate([sd_batch(ks, unet, text_encoder, vae, prompts, seed, **options) for ks in batches])
    unet.train(was_training)
    save_grid(images, Path(path))
    return Path(path)


def sd_main(args):
    """sample.py --model: a grid of the prompts, or an FID set over the prompt file."""
    rank, world, device = init_distributed(use=args.num_samples is not None)
    if args.sampler not in ("pndm", "ddim"):
        raise SampleError(f"--sampler {args.sampler} is DiT's: Stable Diffusion samples with pndm or ddim")
    if args.cfg_scale < 1.0:
        raise SampleError(f"--cfg-scale must be at least 1 (1 = no guidance), not {args.cfg_scale:g}")
    prompts = prompts_of(args)
    if not prompts:
        raise SampleError("Stable Diffusion needs --prompt or --prompt-file")
    unet, text_encoder, vae = load_sd(args.ckpt, args.model, args.patch, device,
                                      args.allow_base_mismatch)
    unet.eval()
    options = dict(cfg_scale=args.cfg_scale, sampler=args.sampler, steps=args.steps, resolution=args.resolution,
                   decode_batch_size=args.decode_batch_size, bf16=args.precision == "bf16")
    name = "-".join([Path(args.ckpt).stem] + ([Path(args.patch).stem] if args.patch else [])
                    + [f"{args.sampler}{args.steps}", f"cfg{args.cfg_scale:g}", f"seed{args.seed}"])
    if args.num_samples is None:
        path = write_sd_grid(unet, text_encoder, vae, args.out or f"samples/{name}.png", prompts,
                             args.grid or len(prompts), args.seed, args.batch_size, **options)
        print(f"wrote {path}")
        return
    out_dir = Path(args.out or f"samples/{name}")
    settings = {k: str(Path(v).resolve()) if isinstance(v, str) and Path(v).exists() else v
                for k, v in vars(args).items() if k in ("ckpt", "patch", "model", "seed", "cfg_scale", "sampler",
                                                        "steps", "resolution")}
    settings.update(prompts=prompts, weights_sha256=weights_sha256(unet, text_encoder, vae))
    make_batch = partial(sd_batch, unet=unet, text_encoder=text_encoder, vae=vae, prompts=prompts, seed=args.seed,
                         **options)
    write_samples(args.num_samples, make_batch, out_dir, args.batch_size, settings)
    if rank == 0:
        npz_path = out_dir.with_name(out_dir.name + ".npz")
        write_npz(out_dir, args.num_samples, npz_path)
        print(f"wrote {npz_path} ({args.num_samples} images)")


#################################################################################
#                                     Main                                      #
#################################################################################

def init_distributed(use):
    """(rank, world, device): torchrun's environment (nccl on CUDA, gloo on CPU) if `use`, else one process."""
    cuda = torch.cuda.is_available()
    if not use or "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", **(dict(device_id=device) if cuda else {}))
    return dist.get_rank(), dist.get_world_size(), device


def positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sample.py", description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--ckpt", required=True, help="official name (DiT-XL-2-256x256.pt), checkpoint or patch file; "
                   "with --model an SD 1.x file or diffusers folder")
    p.add_argument("--model", choices=list(SD_MODELS), help="Stable Diffusion (default: a DiT)")
    p.add_argument("--prompt", nargs="+", help="SD or a text DiT: prompts, one image each (repeated to --grid)")
    p.add_argument("--prompt-file", help="SD or a text DiT: one prompt per line; image k takes line k mod n (FID sets)")
    p.add_argument("--text-encoder", help="a text DiT's CLIP text encoder (default: the one train.py recorded)")
    p.add_argument("--resolution", type=positive, help="SD: image side (default 512)")
    p.add_argument("--patch", help="a patch file to apply to --ckpt")
    p.add_argument("--allow-base-mismatch", action="store_true", help="apply a patch to a base "
                   "other than the one it was trained on (its recorded sha256 differs), warning")
    p.add_argument("--grid", type=positive, help="images in the grid PNG (default: one per --class-labels, else 16)")
    p.add_argument("--num-samples", type=positive, help="write an FID set of this many images instead of a grid")
    p.add_argument("--out", help="grid PNG path, or FID set folder (its .npz goes next to it: DIR.npz)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-labels", type=int, nargs="+", help="labels, repeated in turn (default: random)")
    p.add_argument("--cfg-scale", type=float, help="guidance scale (default 1.5 with a null class, else 1; SD 7.5)")
    p.add_argument("--guide-all-channels", action="store_true", help="guide every channel, not the official 3")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "pndm"], help="default ddpm (DiT), pndm (SD, the paper's)")
    p.add_argument("--steps", type=positive, help="sampling steps (default 250 for DDPM, the paper's; 50 otherwise)")
    p.add_argument("--eta", type=float, help="DDIM's eta (default 0: deterministic)")
    p.add_argument("--noise-schedule", choices=["linear", "cosine"], help="default: recorded, else linear")
    p.add_argument("--vae", help="ema, mse, none or a path (default: recorded, else mse for 4-channel models)")
    p.add_argument("--batch-size", type=positive, default=32, help="images per forward pass, per process")
    p.add_argument("--decode-batch-size", type=positive, default=32)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (faster)")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on CUDA")
    p.error = error
    args = p.parse_args(argv)
    args.sampler = args.sampler or ("pndm" if args.model else "ddpm")
    args.steps = args.steps or (250 if args.sampler == "ddpm" else 50)
    if args.model:  # Stable Diffusion: the paper's guidance 7.5, SD's resolution
        args.cfg_scale = 7.5 if args.cfg_scale is None else args.cfg_scale
        args.resolution = args.resolution or SD_MODELS[args.model]["resolution"]
        return p, args
    if args.sampler == "pndm":
        p.error("--sampler pndm is Stable Diffusion's: add --model")
    if args.sampler == "ddpm" and args.eta is not None:
        p.error("--eta is DDIM's: add --sampler ddim")
    args.eta = (args.eta or 0.0) if args.sampler == "ddim" else None  # None: DDPM, for dit_batch
    if args.grid and args.num_samples:
        p.error("give --grid or --num-samples, not both")
    if args.seed < 0:
        p.error("--seed must be non-negative")
    return p, args


def error(message):
    """sample.py's errors, argparse's and ours: one line (exit status 2), no usage text above."""
    print(f"sample.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None):
    _, args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.num_samples is None and int(os.environ.get("RANK", 0)) > 0:
        return  # a grid is one process's work
    if args.model:
        try:
            check_out(args.out or "samples")
            return sd_main(args)
        except (CheckpointError, SampleError) as e:
            error(str(e))
        except OSError as e:  # --out under a regular file, a read-only folder, a full disk
            error(f"{e.filename or args.out}: {e.strerror or e}")
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    rank, world, device = init_distributed(use=args.num_samples is not None)
    try:
        check_out(args.out or "samples")
        try:
            model = dmp.load_model(args.ckpt, args.patch, None, args.allow_base_mismatch)
            model = model.to(device).eval()
        except RuntimeError as e:  # load_state_dict's size mismatch: a patch made for another model
            raise SampleError(f"{args.patch or args.ckpt} does not fit its base: {str(e).splitlines()[-1].strip()}")
        # What train.py recorded, else the official DiT's defaults (linear betas, sd-vae-ft-mse for 4 channels).
        found = recorded_settings(args.ckpt, args.patch)
        args.noise_schedule = args.noise_schedule or found.get("noise_schedule", "linear")
        args.vae = args.vae or found.get("vae") or ("mse" if model.in_channels == 4 else "none")
        args.cfg_scale = default_cfg_scale(model) if args.cfg_scale is None else args.cfg_scale
        prompts = prompts_of(args)
        args.text_encoder = (args.text_encoder or found.get("text_encoder")) if model.text_dim else None
        text_encoder = load_text_encoder(args.text_encoder, device) if model.text_dim else None
        name = "-".join([Path(args.ckpt).stem] + ([Path(args.patch).stem] if args.patch else [])
                        + [f"{args.sampler}{args.steps}", f"cfg{args.cfg_scale:g}", f"seed{args.seed}"])
        options = dict(class_labels=args.class_labels, cfg_scale=args.cfg_scale, decode_batch_size=args.decode_batch_size,
                       guide_channels=None if args.guide_all_channels else 3, bf16=args.precision == "bf16",
                       prompts=prompts, text_encoder=text_encoder)
        vae = load_vae(args.vae, device)
        check_dit(model, vae, args.cfg_scale, args.class_labels, args.ckpt, prompts)
        if args.num_samples is None:
            path = write_grid(model, args.out or f"samples/{name}.png", args.noise_schedule, vae,
                              args.grid or len(args.class_labels or args.prompt or []) or 16, args.seed, args.steps, args.sampler,
                              args.eta, batch_size=args.batch_size, **options)
            print(f"wrote {path}")
            return
        diffusion = make_diffusion(args.sampler, args.steps, args.noise_schedule, model.learn_sigma)
        make_batch = partial(dit_batch, model=model, diffusion=diffusion, vae=vae, seed=args.seed, eta=args.eta,
                             **options)
        out_dir = Path(args.out or f"samples/{name}")
        # What decides the images (not batch sizes, precision or TF32), files by their full path.
        settings = {k: str(Path(v).resolve()) if isinstance(v, str) and Path(v).is_file() else v
                    for k, v in vars(args).items() if k in ("ckpt", "patch", "seed", "class_labels", "cfg_scale",
                    "guide_all_channels", "sampler", "steps", "eta", "noise_schedule", "vae", "text_encoder")}
        settings.update(dict(prompts=prompts) if prompts else {})
        settings["weights_sha256"] = weights_sha256(model, vae, text_encoder)
        write_samples(args.num_samples, make_batch, out_dir, args.batch_size, settings)
        if rank == 0:
            npz_path = out_dir.with_name(out_dir.name + ".npz")
            write_npz(out_dir, args.num_samples, npz_path)
            print(f"wrote {npz_path} ({args.num_samples} images)")
    except (CheckpointError, SampleError) as e:  # CheckpointError: dmp / model_dit / model_vae's one sentence
        error(str(e))
    except OSError as e:  # --out under a regular file, a read-only folder, a full disk
        error(f"{e.filename or args.out}: {e.strerror or e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
