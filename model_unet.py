"""
The Stable Diffusion 1.x UNet (Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models", 2022) in plain PyTorch.

Same function and same parameter names as CompVis/stable-diffusion's
`ldm.modules.diffusionmodules.openaimodel.UNetModel` with `use_spatial_transformer=True`, so the
UNet of an original checkpoint (`model.diffusion_model.*` in `v1-5-pruned-emaonly.safetensors`)
loads with strict=True once the prefix is stripped; a diffusers folder
(`unet/diffusion_pytorch_model.safetensors`) is renamed to those names by a few rules
(diffusers_to_ldm). Attention goes through F.scaled_dot_product_attention. One addition for dmp.py:
`UNetModel.block_input`, called before every block, as `DiT.block_input` is in model_dit.py, and
what DMP puts there on this UNet, UNetMixtureOfPrompts. One for memory:
`UNetModel.set_checkpointing(True)`, activation checkpointing per block as in model_dit.py.
"""
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoints import diffusers_file, load_strict, model_weights, read_state_dict, strip_prefix
from dmp import MixtureOfPrompts
from model_dit import TimestepEmbedder

# ldm's timestep_embedding, [cos(t f_k), sin(t f_k)] (diffusers: flip_sin_to_cos), is GLIDE's
# sinusoidal embedding, the function DiT's TimestepEmbedder uses: one copy serves both.
timestep_embedding = TimestepEmbedder.timestep_embedding


def zero_module(module):
    """ldm initialises the last layer of every residual branch to zero, so each block starts as the
    identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """ldm's `normalization()`: 32 groups, computed in float32 whatever the input dtype."""
    def __init__(self, channels):
        super().__init__(32, channels)

    def forward(self, x):
        out = F.group_norm(x.float(), 32, self.weight.float(), self.bias.float(), self.eps)
        return out.type(x.dtype)


#################################################################################
#                            Residual and Resampling Blocks                     #
#################################################################################

class ResBlock(nn.Module):
    """ldm's ResBlock: GroupNorm-SiLU-conv, plus a projection of the timestep embedding,
    GroupNorm-SiLU-conv, skip."""
    def __init__(self, channels, emb_channels, out_channels):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # nn.Identity() stands where ldm has Dropout (0 in SD), so that the conv keeps its key
        # out_layers.3.
        out_conv = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Identity(),
                                        out_conv)
        # A 1x1 convolution when the width changes (ldm: use_conv=False), else the identity.
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


# Downsample and Upsample as in ldm's openaimodel.py. model_vae.py has its own pair, as ldm's
# model.py does (the same upsampling; an asymmetric pad and the key `conv` for downsampling): each
# file mirrors its upstream, so the checkpoints' keys and the arithmetic stay the upstream's.

class Downsample(nn.Module):
    """A stride-2 3x3 convolution (ldm: conv_resample=True)."""
    def __init__(self, channels):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


#################################################################################
#                          Spatial Transformer (ldm attention.py)               #
#################################################################################

class CrossAttention(nn.Module):
    """Multi-head attention of x on `context` (itself when None); q/k/v without bias, as in ldm."""
    def __init__(self, query_dim, heads, dim_head, context_dim=None):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner_dim, bias=False)
        # ldm: (Linear, Dropout), so the key is to_out.0
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(dim_head)) v, as ldm
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): one projection to 2x the width, half of it gates the
    other half."""
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """ldm's FeedForward with glu=True: GEGLU to 4x the width, then back (net.1 is ldm's Dropout
    slot)."""
    def __init__(self, dim, mult=4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text, and GEGLU feed-forward, each with a
    residual."""
    def __init__(self, dim, n_heads, d_head, context_dim):
        super().__init__()
        # Registered in ldm's order (attn1, ff, attn2, norms), so state_dict() lists keys as the
        # checkpoints do.
        self.attn1 = CrossAttention(dim, n_heads, d_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, n_heads, d_head, context_dim=context_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """
    ldm's SpatialTransformer: GroupNorm, 1x1 conv in, (B, C, H, W) to H*W tokens, transformer
    blocks, back to an image, 1x1 conv out, residual. SD 1.x uses convolutions for proj_in/out (SD
    2.x and diffusers' use_linear_projection use Linear layers).
    """
    def __init__(self, channels, n_heads, d_head, depth, context_dim):
        super().__init__()
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)  # ldm's Normalize(), not GroupNorm32
        self.proj_in = nn.Conv2d(channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner_dim, n_heads, d_head, context_dim) for _ in range(depth)])
        self.proj_out = zero_module(nn.Conv2d(inner_dim, channels, 1))

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, H*W, inner_dim)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = h.transpose(1, 2).reshape(B, -1, H, W)
        return x + self.proj_out(h)


class TimestepEmbedSequential(nn.Sequential):
    """ldm's container: hands the timestep embedding to ResBlocks and the text context to
    SpatialTransformers."""
    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


#################################################################################
#                                  The UNet                                     #
#################################################################################

class UNetModel(nn.Module):
    """
    ldm's UNetModel (SD 1.x: spatial transformers, text cross-attention, no class labels, no
    scale-shift norm).

    Blocks in execution order: input_blocks[0..L), middle_block, output_blocks[0..L) (SD 1.5: 12 + 1
    + 12). Each input block's output is kept and concatenated (channels) to the input of the
    mirrored output block. `block_shapes[i]` = (channels, downsampling factor) of the tensor block i
    receives.
    """
    def __init__(self, in_channels=4, out_channels=4, model_channels=320,
                 attention_resolutions=(4, 2, 1), num_res_blocks=2, channel_mult=(1, 2, 4, 4),
                 num_heads=8, transformer_depth=1, context_dim=768):
        super().__init__()
        self.config = dict(in_channels=in_channels, out_channels=out_channels,
                           model_channels=model_channels,
                           attention_resolutions=list(attention_resolutions),
                           num_res_blocks=num_res_blocks, channel_mult=list(channel_mult),
                           num_heads=num_heads, transformer_depth=transformer_depth,
                           context_dim=context_dim)
        self.model_channels = model_channels
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, time_embed_dim), nn.SiLU(),
                                        nn.Linear(time_embed_dim, time_embed_dim))

        def attention(ch):
            """SD 1.x fixes the number of heads (8); the head width grows with the channels."""
            head_width = ch // num_heads
            return SpatialTransformer(ch, num_heads, head_width, transformer_depth, context_dim)

        # Encoder: per level, num_res_blocks x (ResBlock [+ attention]), then a Downsample (except
        # at the last level).
        conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_in)])
        self.block_shapes = [(in_channels, 1)]
        skip_chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.block_shapes.append((ch, ds))
                layers = [ResBlock(ch, time_embed_dim, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                self.block_shapes.append((ch, ds))
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)
                ds *= 2

        self.block_shapes.append((ch, ds))
        self.middle_block = TimestepEmbedSequential(ResBlock(ch, time_embed_dim, ch), attention(ch),
                                                    ResBlock(ch, time_embed_dim, ch))

        # Decoder: per level (deepest first), num_res_blocks + 1 x (ResBlock on [h; skip] [+
        # attention]), Upsample.
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                skip = skip_chans.pop()
                self.block_shapes.append((ch + skip, ds))
                layers = [ResBlock(ch + skip, time_embed_dim, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        conv_out = zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), conv_out)
        # dmp.py installs its prompts and gate here (DMP, Eq. 3): forward asks
        # block_input.condition once, then block_input(h, i, mixture) returns the input of block i.
        self.block_input = None
        self.checkpointing = False  # set_checkpointing

    def set_checkpointing(self, on=True):
        """
        Activation checkpointing per block (the 25 of `blocks` in forward) while training: each
        block keeps its input and runs again in the backward pass. block_input (DMP) stays outside
        the recomputed part, so its gate runs once and the prompts get their gradient through the
        block input; results are unchanged.
        """
        self.checkpointing = on
        return self

    def forward(self, x, t, context, mixtures=None):
        """
        x: (N, C, H, W) noisy latents, t: (N,) or scalar timesteps, context: (N, 77, context_dim)
        CLIP text states. Returns (N, out_channels, H, W), the noise prediction. mixtures: as in
        DiT.forward, a list to which DMP appends the gate's weights it used.
        """
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        t_freq = timestep_embedding(t, self.model_channels)
        emb = self.time_embed(t_freq.to(self.time_embed[0].weight.dtype))
        if self.block_input is not None:  # DMP: the gate reads the conditioning once per forward
            mixture = self.block_input.condition(emb, context, t)
            if mixtures is not None:
                mixtures.append(mixture)
        blocks = [*self.input_blocks, self.middle_block, *self.output_blocks]
        n_in, skips, h = len(self.input_blocks), [], x
        for i, block in enumerate(blocks):
            if i > n_in:
                h = torch.cat([h, skips.pop()], dim=1)  # decoder: [h; the mirrored encoder output]
            if self.block_input is not None:
                h = self.block_input(h, i, mixture)  # DMP, Eq. 3, before every block
            if self.checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, emb, context, use_reentrant=False)
            else:
                h = block(h, emb, context)
            if i < n_in:
                skips.append(h)
        return self.out(h)


# SD 1.x's v1-inference.yaml; the tiny config of tests/golden/unet_tiny
SD15 = dict(in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
            num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, transformer_depth=1,
            context_dim=768)
SD_TINY = dict(SD15, model_channels=32, channel_mult=[1, 1, 2, 2], context_dim=32)
UNet_configs = {"sd15": SD15, "sd-tiny": SD_TINY}


#################################################################################
#                 DMP on the UNet (dmp.py's prompts and gate)                   #
#################################################################################

class UNetMixtureOfPrompts(MixtureOfPrompts):
    """
    DMP on the Stable Diffusion UNet, installed as model_unet.UNetModel.block_input: its forward
    calls condition(emb, context, t) once, then block_input(h, i, mixture) before each of its 25
    blocks (12 encoder, middle, 12 decoder; a decoder block's input includes its skip).

    The paper gives SD prompts "of size H x W x D" and +0.32% parameters (Table 1), but not where
    they go. This follows the DiT version, where the N prompts of a block are its N token positions
    (16 x 16 for DiT-B/2 at 256): the N = grid x grid prompts of block i are C_i-vectors on a grid x
    grid map, p_i in R^{N x C_i} with C_i the block's input channels. The gate is one linear layer
    on [t; i] (t: the UNet's timestep embedding; with gate_cond 't+c' also the text, as [t; c; i],
    since t (1280) and the CLIP states (768) differ in width, and W [t; c] = W_t t + W_c c is the
    sum of Table 9), softmax over the N prompts:

        h_i <- h_i + resize(softmax(G([t; i])) * p_i)                                   (Eq. 3)

    where resize brings the weighted grid x grid x C_i map to the block's H_i x W_i by area
    interpolation (replicated over 4 x 4 latent pixels at 512 x 512, averaged at the 8 x 8 deepest
    blocks), so the same patch works at any resolution. The text c is the mean of the context
    tokens: the UNet sees CLIP's token states, not its pooled output. Zero-initialised prompts leave
    the frozen UNet unchanged.

    Parameters on SD 1.5 (tests/test_dmp.py counts them on the meta device), grid 16 and gate_cond
    't+c': prompts 256 x 30,724 channels summed over the 25 blocks = 7,865,344, gate (1280 + 768 +
    25) x 256 + 256 = 530,944: 8,396,288 in all, +0.98% of the 859,520,964 UNet parameters, against
    the paper's +0.32% (2.8M, which per-pixel prompts at 256 x 256 would exceed: 5.6M; grid 8 gives
    +0.24%). The linear gate and added prompts only: the attention gate and prepended prompts are
    DiT ablations (Table 4a, 4d), and so are the time bands.
    """
    def __init__(self, block_shapes, cond_dim, options):
        if options.gate == "attention" or options.position != "add" or options.time_bands > 1:
            raise ValueError("DMP on the UNet has the linear gate (or none), added prompts and one "
                             "prompt set (time bands are DiT's) only")
        grid = options.prompt_grid
        super().__init__(len(block_shapes), grid * grid, cond_dim, options,
                         prompt_widths=[c for c, _ in block_shapes])
        self.grid = grid

    def gate_input(self, emb, context):
        """c: the timestep embedding emb (B, 1280), with 't+c' [emb; the mean text token]."""
        if self.gate_cond == "none":
            return emb[:, :0]
        if self.gate_cond != "t+c":
            return emb
        return torch.cat([emb, context.mean(dim=1).to(emb.dtype)], dim=-1)

    def forward(self, x, i, mixture):
        """x: (B, C_i, H_i, W_i), the input of block i; mixture: this forward's (condition)."""
        if i >= self.depth:
            return x
        g = self.grid
        prompt = self.prompts[i].T.reshape(1, -1, g, g)           # (1, C_i, grid, grid)
        if self.gate_type is not None:
            prompt = mixture.weights[:, i].reshape(-1, 1, g, g) * prompt  # softmax(G([t; i])) p_i
        # Added in fp32, and the block reads an fp32 input: under autocast the UNet's activations
        # are bf16 (its convolutions'), whose 3 digits would round a 1e-4 prompt term on a
        # unit-scale input to nothing or to 4e-3; the block's GroupNorms and residual path read
        # fp32 (autocast runs GroupNorm in fp32), as DiT's blocks read DMP's fp32 tokens.
        return x.float() + F.interpolate(prompt.float(), size=x.shape[-2:], mode="area")


#################################################################################
#                      Checkpoint Loading (ldm and diffusers layouts)           #
#################################################################################

# diffusers' names for the layers of a ResBlock and for the layers outside the blocks; attention
# layers (norm, proj_in, transformer_blocks.*, proj_out) have the same names in both layouts.
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_OUTER = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
          "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def diffusers_to_ldm(state_dict, num_res_blocks=2):
    """
    Rename a diffusers UNet2DConditionModel state dict to ldm keys. Level b of diffusers'
    down_blocks holds the ResBlocks/attentions that ldm numbers input_blocks 1 + b*(n+1) + j (n =
    num_res_blocks), its downsampler is input_blocks (b+1)*(n+1); up level b is output_blocks
    b*(n+1) + j, its upsampler sits in the last one, after the attention when the level has one. A
    key that fits no rule is kept, to be reported as unexpected.
    """
    n = num_res_blocks
    up_with_attention = {k.split(".")[1] for k in state_dict
                         if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out = {}
    for key, value in state_dict.items():
        new = key
        if m := re.fullmatch(r"(time_embedding\.linear_\d|conv_in|conv_norm_out|conv_out)\.(\w+)",
                             key):
            new = f"{_OUTER[m[1]]}.{m[2]}"
        elif m := re.fullmatch(r"(down|up)_blocks\.(\d+)\."
                               r"(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key):
            side, b, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if kind == "resnets":
                first, _, tail = rest.partition(".")
                rest = f"0.{_RESNET.get(first, first)}.{tail}"
            elif kind == "attentions":
                rest = f"1.{rest}"
            elif kind == "downsamplers":
                j, rest = n, "0." + rest.replace("conv.", "op.", 1)
            else:  # upsamplers
                j, rest = n, f"{2 if m[2] in up_with_attention else 1}.{rest}"
            new = (f"input_blocks.{1 + b * (n + 1) + j}.{rest}" if side == "down"
                   else f"output_blocks.{b * (n + 1) + j}.{rest}")
        elif m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            if m[1] == "resnets":
                first, _, tail = m[3].partition(".")
                new = f"middle_block.{2 * int(m[2])}.{_RESNET.get(first, first)}.{tail}"
            else:
                new = f"middle_block.1.{m[3]}"
        out[new] = value
    return out


_DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors",
                    "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin",
                    "diffusion_pytorch_model.fp16.bin")


def unet_state_dict(path, num_res_blocks=2):
    """
    The UNet weights in `path`, under ldm keys: an SD single file (.safetensors/.ckpt, keys
    model.diffusion_model.*, possibly under 'state_dict'), a diffusers model folder (with unet/) or
    its unet/ folder, a bare state dict in either layout, or a checkpoint of train.py ({'model',
    'ema', ...}).
    """
    if Path(path).is_dir():
        file = diffusers_file(path, "unet", _DIFFUSERS_FILES)
        return diffusers_to_ldm(read_state_dict(file), num_res_blocks)
    sd = model_weights(read_state_dict(path))  # a train.py checkpoint, an SD .ckpt or a bare file
    if any(k.startswith("model.diffusion_model.") for k in sd):
        return strip_prefix(sd, "model.diffusion_model.")
    if "conv_in.weight" in sd:  # a bare diffusers UNet file
        return diffusers_to_ldm(sd, num_res_blocks)
    return sd


def load_unet(path, config=SD15, dtype=torch.float32):
    """
    An SD 1.x UNetModel(**config) with the weights in `path` (see unet_state_dict), in `dtype`. The
    model is built on the meta device and takes the file's tensors, so no random init of 860M
    parameters is paid for. A file that does not fit raises CheckpointError naming the missing,
    unexpected and mis-shaped keys.
    """
    sd = unet_state_dict(path, config["num_res_blocks"])
    with torch.device("meta"):
        model = UNetModel(**config)
    expected = model.state_dict()
    # diffusers files saved with use_linear_projection hold proj_in/out as Linear weights (out, in):
    # as 1x1 convolutions here.
    for k, v in sd.items():
        if v.ndim == 2 and k in expected and expected[k].ndim == 4:
            sd[k] = v[..., None, None]
    return load_strict(model, sd, path, "an SD 1.x UNet of this config", dtype=dtype)
