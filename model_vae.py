"""
Stable Diffusion's KL-f8 autoencoder (Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models", 2022) in plain PyTorch: the image <-> latent map DiT and SD train in.

The modules and their names follow CompVis `ldm` (ldm/modules/diffusionmodules/model.py and
ldm/models/autoencoder.py), so SD checkpoints (`first_stage_model.*`) load with strict=True;
diffusers `AutoencoderKL` files (the `sd-vae-ft-ema` / `sd-vae-ft-mse` DiT uses) are renamed to them
on load.

The scale factor is applied by the caller, never inside the model, as DiT's train.py and
sample.py do:
    mean, std = vae.encode(x)                        # x in [-1, 1], unscaled posterior
    z = (mean + std * torch.randn_like(std)) * SCALE_FACTOR
    x = vae.decode(z / SCALE_FACTOR)
`load_vae('none')` returns None: pixel-space data, scale factor 1.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import CheckpointError, download, load_strict, read_state_dict, strip_prefix

SCALE_FACTOR = 0.18215  # SD 1.x's latent scale (ldm configs: scale_factor), the one DiT uses

# ldm's ddconfig of the SD 1.x / DiT VAE (configs/stable-diffusion/v1-inference.yaml,
# first_stage_config).
SD_VAE_CONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                     ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[])


#################################################################################
#                      Building Blocks (ldm's model.py)                         #
#################################################################################

def Normalize(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice plus a skip (a 1x1 `nin_shortcut` when the width changes); no time
    embedding."""
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 in every SD config
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, q/k/v/proj_out as 1x1 convolutions (ldm's
    layout)."""
    def __init__(self, channels):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).reshape(B, 1, C, H * W).transpose(2, 3)
                   for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, ldm's bmm
        return x + self.proj_out(h.transpose(2, 3).reshape(B, C, H, W))


# Downsample and Upsample as in ldm's model.py. model_unet.py has its own pair, as ldm's
# openaimodel.py does (the same upsampling; a symmetric pad and the key `op` for downsampling):
# each file mirrors its upstream, so the checkpoints' keys and the arithmetic stay the upstream's.

class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding right and bottom only (ldm's asymmetric (0, 1, 0, 1)
    pad)."""
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


#################################################################################
#                         Encoder, Decoder, Autoencoder                         #
#################################################################################

def _mid(channels):
    """ldm's middle of the encoder and decoder: ResnetBlock, AttnBlock, ResnetBlock."""
    mid = nn.Module()
    mid.block_1, mid.attn_1 = ResnetBlock(channels, channels), AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    """Image to the moments of the posterior: levels of ResnetBlocks with a Downsample between, a
    res-attn-res mid."""
    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution,
                 z_channels, double_z=True, **ignored):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down, block_in, res = nn.ModuleList(), ch, resolution
        for i_level, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, ch * mult))
                block_in = ch * mult
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != len(ch_mult) - 1:
                level.downsample, res = Downsample(block_in), res // 2
            self.down.append(level)
        self.mid = _mid(block_in)
        self.norm_out = Normalize(block_in)
        moments = 2 * z_channels if double_z else z_channels
        self.conv_out = nn.Conv2d(block_in, moments, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                h = level.attn[i](h) if len(level.attn) else h
            h = level.downsample(h) if hasattr(level, "downsample") else h
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent to image: the Encoder mirrored, with num_res_blocks + 1 blocks per level and Upsample
    between."""
    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution,
                 z_channels, **ignored):
        super().__init__()
        block_in, res = ch * ch_mult[-1], resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in)
        self.up = nn.ModuleList()
        # built from the bottom, stored as up[0] = full resolution
        for i_level in reversed(range(len(ch_mult))):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, ch * ch_mult[i_level]))
                block_in = ch * ch_mult[i_level]
                if res in attn_resolutions:
                    level.attn.append(AttnBlock(block_in))
            if i_level != 0:
                level.upsample, res = Upsample(block_in), res * 2
            self.up.insert(0, level)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                h = level.attn[i](h) if len(level.attn) else h
            h = level.upsample(h) if hasattr(level, "upsample") else h
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """ldm's AutoencoderKL at inference: encode to the diagonal Gaussian posterior, decode a latent.
    No scaling."""
    def __init__(self, config=SD_VAE_CONFIG):
        super().__init__()
        self.config = dict(config)
        z = config["z_channels"]  # embed_dim == z_channels in every SD VAE
        self.encoder, self.decoder = Encoder(**config), Decoder(**config)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    def encode(self, x):
        """x: [B, 3, H, W] in [-1, 1] -> (mean, std), each [B, z, H/8, W/8], unscaled."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)  # as ldm's DiagonalGaussianDistribution
        return mean, torch.exp(0.5 * logvar)

    def decode(self, z):
        """z: [B, z, h, w], unscaled (divide a model's latent by SCALE_FACTOR first) -> image in
        about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))


#################################################################################
#                 Checkpoint Loading: ldm, diffusers, SD files                  #
#################################################################################

_HUB = "https://huggingface.co/stabilityai/sd-vae-ft-{}/resolve/main/diffusion_pytorch_model.{}"
OFFICIAL = {"ema": "sd-vae-ft-ema", "mse": "sd-vae-ft-mse"}  # DiT's --vae choices


def diffusers_to_ldm(key, num_levels):
    """A diffusers AutoencoderKL key as ldm names it (diffusers numbers decoder levels bottom-up,
    ldm top-down)."""
    last = num_levels - 1
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
        (r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{last - int(m[1])}.block."),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{last - int(m[1])}.upsample."),
        (r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
        (r"mid_block\.attentions\.0\.", "mid.attn_1."),
        (r"attn_1\.group_norm\.", "attn_1.norm."),
        # three spellings: diffusers >= 0.14, older diffusers, ldm
        (r"attn_1\.(to_q|query)\.", "attn_1.q."),
        (r"attn_1\.(to_k|key)\.", "attn_1.k."),
        (r"attn_1\.(to_v|value)\.", "attn_1.v."),
        (r"attn_1\.(to_out\.0|proj_attn)\.", "attn_1.proj_out."),
        (r"conv_shortcut\.", "nin_shortcut."),
        (r"conv_norm_out\.", "norm_out."),
    ]
    for pattern, new in rules:
        key = re.sub(pattern, new, key)
    return key


def vae_state_dict(sd):
    """Any VAE layout (ldm, diffusers, an SD single-file checkpoint) as ldm keys without prefix,
    float32."""
    if isinstance(sd.get("state_dict"), dict):  # ldm/Lightning .ckpt files
        sd = sd["state_dict"]
    if any(k.startswith("first_stage_model.") for k in sd):  # an SD checkpoint: its VAE only
        sd = strip_prefix(sd, "first_stage_model.")
    # without ldm's training leftovers
    sd = {k: v for k, v in sd.items() if not k.startswith(("loss.", "model_ema."))}
    if any(".mid_block." in k for k in sd):
        up = [int(k.split(".")[2]) for k in sd if k.startswith("decoder.up_blocks.")]
        num_levels = 1 + max(up, default=0)
        sd = {diffusers_to_ldm(k, num_levels): v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        # diffusers stores the attention projections as Linear [C, C]; ldm as 1x1 Conv [C, C, 1, 1].
        if ".attn_1." in k and k.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[k] = v.float()
    return out


def infer_config(sd):
    """The ddconfig an ldm-keyed state dict's shapes imply (attention only in the mid block, as in
    every SD VAE)."""
    try:
        ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
        blocks = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
        widths = [sd[f"encoder.down.{i}.block.{blocks - 1}.conv2.weight"].shape[0]
                  for i in range(levels)]
        return dict(SD_VAE_CONFIG, ch=ch, in_channels=in_channels, num_res_blocks=blocks,
                    ch_mult=[w // ch for w in widths],
                    z_channels=sd["decoder.conv_in.weight"].shape[1],
                    out_ch=sd["decoder.conv_out.weight"].shape[0])
    except (KeyError, ValueError, IndexError):
        return None


def vae_path(name):
    """'ema' / 'mse': the official diffusers file, downloaded once into the cache (.bin if
    .safetensors fails)."""
    if name not in OFFICIAL:
        return name
    try:
        return download(_HUB.format(name, "safetensors"), f"{OFFICIAL[name]}.safetensors")
    except CheckpointError as error:
        try:
            return download(_HUB.format(name, "bin"), f"{OFFICIAL[name]}.bin")
        except CheckpointError:
            raise error from None


def load_vae(name, device="cpu", config=None):
    """
    The frozen VAE, in eval mode, for `name`: 'ema' or 'mse' (DiT's --vae choices), a local file in
    any layout (diffusers, ldm, or an SD 1.x checkpoint .ckpt/.safetensors), or 'none' -> None
    (pixel-space data). `config` fixes the architecture; otherwise the file's shapes give it. A file
    that does not fit raises a CheckpointError naming the file and the missing / unexpected keys.
    """
    if name is None or str(name).lower() == "none":
        return None
    path = vae_path(str(name))
    sd = vae_state_dict(read_state_dict(path))
    config = config or infer_config(sd) or SD_VAE_CONFIG
    with torch.device("meta"):
        model = AutoencoderKL(config)
    load_strict(model, sd, path, "a KL-f8 VAE of this shape")
    return model.to(device).eval().requires_grad_(False)
