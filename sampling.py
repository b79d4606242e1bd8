"""
Images from a model: each image's own generator, a batch of DiT or Stable Diffusion samples, uint8
pixels, PNG files and grids.

A library, not a script: sample.py (its command line, and FID sample sets) and train.py (a grid
every --sample-every steps) both draw their images here, and bench.py times dit_batch. The scripts
never import each other, so what they share cannot live in sample.py.

Image k draws everything random (its label when none is given, its initial noise, every step's
noise) from one generator seeded by (seed, k), so a seed gives the same images whatever the batch
size and the number of processes, and a grid of N is the first N images of the FID set of the same
seed. (Exact on CPU; on a GPU the kernels a batch size selects can change the last float bits,
rarely one pixel level.)
"""
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from diffusion import create_diffusion, dit_sample, sd_guided_eps, sd_sample
from distributed import seed_of
from model_clip import caption_embeddings, encode_text
from model_vae import SCALE_FACTOR, load_vae


class SampleError(ValueError):
    """Bad input: the message is one sentence, printed as `sample.py: error: ...`."""


#################################################################################
#                     Per-image randomness and image output                     #
#################################################################################

def image_generator(seed, k):
    """The one CPU generator image k draws from: seeded by (seed, k) only, never by its batch."""
    return torch.Generator().manual_seed(seed_of(seed, k, bits=64))


def to_uint8(x):
    """
    Images in [-1, 1] (N, C, H, W) to uint8 (N, H, W, 3), exactly as the official DiT
    sample_ddp.py; one-channel (grayscale pixel-space) images are repeated to RGB, the layout FID
    tools read.
    """
    x = x.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1)
    return x.to("cpu", dtype=torch.uint8).numpy()


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


# A grid is to be looked at: images smaller than this are shown enlarged (the digits' 8x8 as 64x64).
GRID_MIN_SIDE = 64


def save_grid(images, path, padding=2, min_side=GRID_MIN_SIDE):
    """
    torchvision's make_grid layout: ceil(sqrt(n)) columns, `padding` black pixels around every
    image. Images smaller than min_side pixels are enlarged first by the whole factor that brings
    them to at least that size, by nearest neighbour (each pixel a square: nothing is invented), so
    the digits' 8x8 samples show as 64x64; larger images are shown as they are.
    """
    scale = max(1, math.ceil(min_side / min(images.shape[1:3])))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
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


def in_batches(num, batch_size):
    """Image indices 0..num-1 in lists of batch_size."""
    return [list(range(i, min(i + batch_size, num))) for i in range(0, num, batch_size)]


#################################################################################
#                                 DiT: one batch                                #
#################################################################################

def default_cfg_scale(model):
    """
    The paper's 1.5 (Sec. 4.1 and appendix, ImageNet and COCO) for a class-conditional model with a
    null class or a text-to-image one (its null embedding), else 1 (none).
    """
    labels = model.y_embedder
    if model.text_dim or (labels.dropout_prob > 0 and labels.num_classes > 1):
        return 1.5
    return 1.0


def check_dit(model, vae, cfg_scale, class_labels, name, prompts=None):
    """SampleError if the VAE, guidance scale, labels or prompts do not fit the model."""
    labels = model.y_embedder
    if vae is None and model.in_channels not in (1, 3):
        raise SampleError(f"{name} has {model.in_channels} input channels, so it is not a "
                          f"grayscale or RGB pixel-space model: name its VAE with --vae")
    if vae is not None and vae.config["z_channels"] != model.in_channels:
        raise SampleError(f"the VAE has {vae.config['z_channels']} latent channels but {name} has "
                          f"{model.in_channels}")
    if cfg_scale < 1.0:
        raise SampleError(f"--cfg-scale must be at least 1 (1 = no guidance), not {cfg_scale:g}")
    if model.text_dim:
        if class_labels or not prompts:
            raise SampleError(f"{name} is a text-to-image DiT: give --prompt or --prompt-file (not "
                              f"--class-labels)")
        return
    if prompts:
        raise SampleError(f"{name} takes class labels, not prompts: --prompt and --prompt-file are "
                          f"for text-to-image models")
    if cfg_scale > 1.0 and labels.embedding_table.num_embeddings == labels.num_classes:
        raise SampleError(f"--cfg-scale {cfg_scale:g} needs a model trained with label dropout (a "
                          f"null class); {name} has none: use --cfg-scale 1")
    bad = [y for y in class_labels or [] if not 0 <= y < labels.num_classes]
    if bad:
        raise SampleError(f"--class-labels {bad[0]} is out of range: {name} has classes "
                          f"0..{labels.num_classes - 1}")


def make_diffusion(sampler, steps, noise_schedule, learn_sigma=True):
    """DDPM on `steps` evenly spaced steps ("250", the paper's), or DDIM on exactly `steps`."""
    respacing = str(steps)
    if sampler == "ddim":
        respacing = f"ddim{steps}"
    try:
        return create_diffusion(respacing, noise_schedule, learn_sigma=learn_sigma)
    except ValueError as e:
        raise SampleError(f"--steps {steps}: {e}") from None


@torch.no_grad()
def dit_batch(ks, model, diffusion, vae=None, seed=0, class_labels=None, cfg_scale=1.0, eta=None,
              guide_channels=3, decode_batch_size=32, bf16=False, prompts=None, text_encoder=None):
    """
    Images ks as uint8 (len(ks), H, W, 3): each from its own generator, sampled together, decoded
    in batches. eta=None: DDPM; a float: DDIM (with a "ddimN" diffusion). class_labels are used in
    turn, image k taking class_labels[k % len]; without them each image draws its label. A
    text-to-image DiT takes prompts instead, image k prompt k mod len(prompts), embedded by
    text_encoder and guided against the null embedding.
    """
    device = model.pos_embed.device
    gens = [image_generator(seed, k) for k in ks]
    size, channels = model.config["input_size"], model.in_channels
    if model.text_dim:  # the text encoder in the sampling precision
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            y = caption_embeddings(text_encoder, [prompts[k % len(prompts)] for k in ks]).to(device)
    else:
        # The label is drawn even when given, so an image's noise does not depend on --class-labels.
        y = [int(torch.randint(model.y_embedder.num_classes, (), generator=g)) for g in gens]
        if class_labels:
            y = [class_labels[k % len(class_labels)] for k in ks]
        y = torch.tensor(y, device=device)
    noise = chain_noise(gens, (channels, size, size), diffusion.num_timesteps, device)
    z, queued = noise[0], iter(noise[1:])

    def step_noise(x):
        """Each step's noise (diffusion.sample's noise_fn), drawn before the chain: the next one."""
        return next(queued)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        x = dit_sample(model, diffusion, z, y, cfg_scale, eta=eta, noise_fn=step_noise,
                       guide_channels=guide_channels)
        if vae is not None:
            x = decode(vae, x, decode_batch_size)
    return to_uint8(x)


def chain_noise(gens, shape, steps, device):
    """
    (1 + steps, len(gens), *shape): the initial noise and every step's, image i's from gens[i] in
    the order a chain draws them (each call the same as drawing it at its step, so the bytes are
    those drawn step by step), drawn on the host before the chain and put on `device` in one copy
    from pinned memory that the host does not wait for: no copy, no host sync during the chain
    (drawn step by step, a batch of DDPM-250 made 250 blocking copies).
    """
    noise = torch.empty((1 + steps, len(gens), *shape))
    for i, g in enumerate(gens):
        for s in range(1 + steps):
            noise[s, i] = torch.randn(shape, generator=g)
    if device.type == "cuda":
        noise = noise.pin_memory()
    return noise.to(device, non_blocking=True)


def decode(vae, latents, batch_size):
    """The VAE's images of a model's latents (scaled by SCALE_FACTOR), decoded in batches."""
    return torch.cat([vae.decode(z / SCALE_FACTOR).float() for z in latents.split(batch_size)])


def write_grid(model, path, noise_schedule="linear", vae="none", num=16, seed=0, steps=250,
               sampler="ddpm", eta=0.0, cfg_scale=None, class_labels=None, batch_size=32,
               device=None, min_side=GRID_MIN_SIDE, **options):
    """
    A grid PNG of images 0..num-1 (the first images of the FID set of the same seed), each shown at
    least min_side pixels wide (save_grid); what sample.py --grid writes and train.py draws every
    --sample-every steps. vae: a name for load_vae or a loaded AutoencoderKL; cfg_scale None: the
    default rule; options: dit_batch's guide_channels, decode_batch_size, bf16, and prompts,
    text_encoder for text. Returns the path.
    """
    if isinstance(vae, (str, Path)):
        vae = load_vae(vae, device or model.pos_embed.device)
    if cfg_scale is None:
        cfg_scale = default_cfg_scale(model)
    if sampler != "ddim":
        eta = None  # DDPM
    check_dit(model, vae, cfg_scale, class_labels, "the model", options.get("prompts"))
    diffusion = make_diffusion(sampler, steps, noise_schedule, model.learn_sigma)
    was_training = model.training
    model.eval()
    batches = tqdm(in_batches(num, batch_size), desc="sampling", unit="batch", leave=False)
    images = np.concatenate([dit_batch(ks, model, diffusion, vae, seed, class_labels, cfg_scale,
                                       eta, **options) for ks in batches])
    model.train(was_training)
    save_grid(images, Path(path), min_side=min_side)
    return Path(path)


#################################################################################
#                    Stable Diffusion: one batch, a grid                        #
#################################################################################

@torch.no_grad()
def sd_batch(ks, unet, text_encoder, vae, prompts, seed=0, cfg_scale=7.5, sampler="pndm", steps=50,
             resolution=512, decode_batch_size=8, bf16=False):
    """
    Images ks as uint8 (len(ks), H, W, 3): image k has prompt k mod len(prompts) and its initial
    noise from image_generator(seed, k) (PNDM and DDIM draw nothing after it), guided against the
    empty prompt.
    """
    device = next(unet.parameters()).device
    f = 2 ** (len(vae.config["ch_mult"]) - 1)
    gens = [image_generator(seed, k) for k in ks]
    shape = (unet.config["in_channels"], resolution // f, resolution // f)
    z = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        context = encode_text(text_encoder, [prompts[k % len(prompts)] for k in ks])[0]
        uncond = encode_text(text_encoder, [""] * len(ks))[0]
        x = sd_sample(sd_guided_eps(unet, context, uncond, cfg_scale), z, steps, sampler)
        x = decode(vae, x, decode_batch_size)
    return to_uint8(x)


def write_sd_grid(unet, text_encoder, vae, path, prompts, num=16, seed=0, batch_size=8,
                  min_side=GRID_MIN_SIDE, **options):
    """
    A grid PNG of images 0..num-1 (sd_batch's options; save_grid's min_side); what sample.py --grid
    writes and train.py draws every --sample-every steps. vae: a name for load_vae or a loaded
    AutoencoderKL.
    """
    if isinstance(vae, (str, Path)):
        vae = load_vae(vae, next(unet.parameters()).device)
    was_training = unet.training
    unet.eval()
    images = np.concatenate([sd_batch(ks, unet, text_encoder, vae, prompts, seed, **options)
                             for ks in in_batches(num, batch_size)])
    unet.train(was_training)
    save_grid(images, Path(path), min_side=min_side)
    return Path(path)
