"""
DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers", 2023) in plain PyTorch.

Same functions and parameter names as facebookresearch/DiT's models.py (DiT_models, DiT_XL_2, ...,
forward(x, t, y), forward_with_cfg), so the official checkpoints load with strict=True; attention
goes through F.scaled_dot_product_attention instead of timm. Three additions:
- for dmp.py, `DiT.block_input`, called before every block (the paper's Eqs. 2-3 add their
  prompts there);
- for memory, `DiT.set_checkpointing(True)`, which recomputes each block in the backward pass
  instead of storing its activations (results and state dict unchanged);
- for text-to-image (MS-COCO, Table 2), DiT(text_dim=768), which reads the pooled CLIP text
  embedding through the class-label path (TextEmbedder in place of LabelEmbedder;
  model_clip.caption_embeddings makes it); class-conditional models are unchanged.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoints import CheckpointError, download, load_strict, model_weights, read_state_dict


def modulate(x, shift, scale):
    """adaLN: the normalised tokens x (N, T, D) scaled and shifted per sample (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar timesteps into vectors: sinusoidal frequencies, then a two-layer MLP."""
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """
        GLIDE's sinusoidal embedding, (N,) timesteps to (N, dim): [cos(t f_k), sin(t f_k)] with
        f_k = max_period^(-k / half). ldm's timestep_embedding is the same function, so
        model_unet.py calls this one.
        """
        half = dim // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * k / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """
    Embeds class labels; with dropout_prob > 0 an extra row is the "null" class used for
    classifier-free guidance.
    """
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Labels replaced by the null class at random (training) or where force_drop_ids is 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class TextEmbedder(nn.Module):
    """
    Embeds pooled CLIP text embeddings (N, text_dim) with a linear map, in place of the class
    labels. A row of zeros is "no caption" (dropped for guidance) and takes a learned null
    embedding instead: CLIP's pooled output comes out of a layer norm with a bias, so no real
    caption is all zeros. Caption dropout happens in the data (train.py's --caption-dropout, an
    empty caption; see model_clip.caption_embeddings), so there is none here.
    """
    def __init__(self, text_dim, hidden_size):
        super().__init__()
        self.proj = nn.Linear(text_dim, hidden_size, bias=True)
        self.null_embedding = nn.Parameter(torch.zeros(hidden_size))
        self.text_dim = text_dim

    def forward(self, text):
        null = (text == 0).all(dim=-1, keepdim=True)
        y = self.proj(text)
        return torch.where(null, self.null_embedding.to(y.dtype), y)


class PatchEmbed(nn.Module):
    """Image (N, C, H, W) to tokens (N, T, D) with a stride-p convolution (timm's, same keys)."""
    def __init__(self, input_size, patch_size, in_channels, hidden_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size,
                              bias=True)
        self.num_patches = (input_size // patch_size) ** 2

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's Attention, same keys)."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (timm's Mlp, same keys)."""
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(),
                                              nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        (shift_msa, scale_msa, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN, then a linear map of each token to a p x p x C patch."""
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(),
                                              nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """
    Diffusion model with a Transformer backbone.

    Unconditional models (FFHQ) use num_classes=1 with class_dropout_prob=0: a single learned
    "class" embedding and no null row, as the authors' DMP code builds them; every label is then 0.
    Text-to-image models (COCO) take text_dim (768 for CLIP ViT-L/14): y is then the (N, text_dim)
    pooled text embedding, zero rows for none, and num_classes / class_dropout_prob are not used.
    """
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 learn_sigma=True, text_dim=None):
        super().__init__()
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
                           num_classes=num_classes, learn_sigma=learn_sigma)
        if text_dim:
            self.config["text_dim"] = text_dim
        self.text_dim = text_dim
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if text_dim:
            self.y_embedder = TextEmbedder(text_dim, hidden_size)
        else:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos embedding, stored in the state dict (as in the official checkpoints) but
        # not trained.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size),
                                      requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # dmp.py installs its prompts and gate here (Eqs. 2-3): forward asks block_input.condition
        # once, then block_input(x, i, mixture) returns the input of block i.
        self.block_input = None
        self.checkpointing = False  # set_checkpointing
        self.initialize_weights()

    def set_checkpointing(self, on=True):
        """
        Activation checkpointing per block while training: each block keeps only its input and
        runs again in the backward pass (one more forward of the blocks), so the activations kept
        are one (N, T, D) tensor per block instead of every intermediate. block_input (DMP's
        prompts and gate) stays outside the recomputed part: the gate and its noise are drawn
        once, and the prompts get their gradient through the block input.
        """
        self.checkpointing = on
        return self

    def initialize_weights(self):
        """The official initialisation: Xavier linears, N(0, 0.02) embeddings, adaLN-Zero."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)
        grid = int(self.x_embedder.num_patches ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float()[None])
        # Patch embedding initialised like nn.Linear (not nn.Conv2d).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        if self.text_dim:
            nn.init.normal_(self.y_embedder.null_embedding, std=0.02)
        else:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output layer as zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p*p*C) tokens to (N, C, H, W) images."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, mixtures=None):
        """
        x: (N, C, H, W) noisy latents, t: (N,) diffusion timesteps, y: (N,) class labels (text:
        (N, text_dim)). Returns (N, out_channels, H, W): the noise prediction, then (learn_sigma)
        the variance interpolation. mixtures: a list to which a DMP model appends the gate's
        weights it used (dmp.Mixture), for the balancing losses.
        """
        timesteps = t
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / p^2
        t = self.t_embedder(t)                   # (N, D)
        if self.text_dim:
            y = self.y_embedder(y)               # (N, D)
        else:
            y = self.y_embedder(y, self.training)
        c = t + y
        if self.block_input is not None:  # DMP: the gate reads the conditioning once per forward
            mixture = self.block_input.condition(t, y, timesteps)
            # The output stays the prediction every sampler reads; the training step that wants
            # the gate's weights hands a list and reads them back, so no module keeps a forward's
            # weights for the losses to find later.
            if mixtures is not None:
                mixtures.append(mixture)
        for i, block in enumerate(self.blocks):
            if self.block_input is not None:
                x = self.block_input(x, i, mixture)  # DMP, Eq. 3: x_i + softmax(G([t; i])) * p_i
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)  # (RNG state kept for recomputing)
            else:
                x = block(x, c)
        x = x[:, -self.x_embedder.num_patches:]  # drops prepended prompts (Table 4d); else a no-op
        x = self.final_layer(x, c)               # (N, T, p*p*out_channels)
        return self.unpatchify(x)

    def forward_with_cfg(self, x, t, y, cfg_scale, guide_channels=3):
        """
        Classifier-free guidance: the batch is [conditional half; unconditional half] with the same
        noise (the unconditional half's y: the null class, or for text zero rows, the null
        embedding). The official code guides only the first 3 channels (kept by default for exact
        reproducibility); guide_channels=None guides all in_channels, as the official comment says
        is standard.
        """
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        n = self.in_channels if guide_channels is None else guide_channels
        eps, rest = model_out[:, :n], model_out[:, n:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# https://github.com/facebookresearch/mae/blob/main/util/pos_embed.py

def get_2d_sincos_pos_embed(embed_dim, grid_size, grid_scale=1.0):
    """
    (grid_size^2, embed_dim) table. grid_scale multiplies the grid coordinates: DiffFit's
    positional trick (DiffFit Sec. 4.3) evaluates a 512x512 model's table at (i/2, j/2) with
    grid_scale=0.5.
    """
    grid_h = np.arange(grid_size, dtype=np.float32) * grid_scale
    grid_w = np.arange(grid_size, dtype=np.float32) * grid_scale
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # half the dims encode h
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    """(M,) positions to (M, embed_dim): [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-2k / D)."""
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000 ** omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

_SIZES = {"XL": dict(depth=28, hidden_size=1152, num_heads=16),
          "L": dict(depth=24, hidden_size=1024, num_heads=16),
          "B": dict(depth=12, hidden_size=768, num_heads=12),
          "S": dict(depth=12, hidden_size=384, num_heads=6)}
CONFIGS = {f"DiT-{s}/{p}": dict(patch_size=p, **arch)
           for s, arch in _SIZES.items() for p in (2, 4, 8)}


def DiT_XL_2(**kwargs):
    return DiT(**CONFIGS["DiT-XL/2"], **kwargs)


def DiT_XL_4(**kwargs):
    return DiT(**CONFIGS["DiT-XL/4"], **kwargs)


def DiT_XL_8(**kwargs):
    return DiT(**CONFIGS["DiT-XL/8"], **kwargs)


def DiT_L_2(**kwargs):
    return DiT(**CONFIGS["DiT-L/2"], **kwargs)


def DiT_L_4(**kwargs):
    return DiT(**CONFIGS["DiT-L/4"], **kwargs)


def DiT_L_8(**kwargs):
    return DiT(**CONFIGS["DiT-L/8"], **kwargs)


def DiT_B_2(**kwargs):
    return DiT(**CONFIGS["DiT-B/2"], **kwargs)


def DiT_B_4(**kwargs):
    return DiT(**CONFIGS["DiT-B/4"], **kwargs)


def DiT_B_8(**kwargs):
    return DiT(**CONFIGS["DiT-B/8"], **kwargs)


def DiT_S_2(**kwargs):
    return DiT(**CONFIGS["DiT-S/2"], **kwargs)


def DiT_S_4(**kwargs):
    return DiT(**CONFIGS["DiT-S/4"], **kwargs)


def DiT_S_8(**kwargs):
    return DiT(**CONFIGS["DiT-S/8"], **kwargs)


DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
}

# Not official configs: DiTs small enough to pretrain on the bundled 8x8 digits on a CPU (16
# tokens). 'digits' (0.33M parameters) is the demo's base, assets/dit_digits.pt; 'digits-tiny'
# (25K) is the study's base (study.py, assets/study/base.pt).
DIGITS_MODELS = {"digits": dict(patch_size=2, hidden_size=64, depth=4, num_heads=4),
                 "digits-tiny": dict(patch_size=2, hidden_size=16, depth=4, num_heads=2)}
DIGITS_MODEL = DIGITS_MODELS["digits"]


#################################################################################
#                               Checkpoint Loading                              #
#################################################################################

OFFICIAL = {name: f"https://dl.fbaipublicfiles.com/DiT/models/{name}"
            for name in ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt")}


def infer_config(state_dict):
    """
    The constructor arguments a DiT state dict's shapes imply, or None if it is not a DiT's.
    num_heads is the official config's of that width (S 6, B 12, L and XL 16), else None: the
    weights of a multi-head attention are the same shapes for any head count, so no other width
    tells it.
    """
    try:
        hidden, in_channels, p, _ = state_dict["x_embedder.proj.weight"].shape
        depth = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        text = state_dict.get("y_embedder.proj.weight")
        rows = 1 if text is not None else state_dict["y_embedder.embedding_table.weight"].shape[0]
        out = state_dict["final_layer.linear.weight"].shape[0] // (p * p)
        mlp = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
        tokens = state_dict["pos_embed"].shape[1]
    except (KeyError, ValueError, TypeError):
        return None
    # 1001 rows: 1000 classes + the null class (label dropout); 1 row: the unconditional model.
    num_classes = rows - 1 if rows > 1 else 1
    heads = [a["num_heads"] for a in _SIZES.values() if a["hidden_size"] == hidden]
    heads = heads[0] if heads else None
    config = dict(input_size=int(round(tokens ** 0.5)) * p, patch_size=p, in_channels=in_channels,
                  hidden_size=hidden, depth=depth, num_heads=heads,
                  mlp_ratio=mlp / hidden, class_dropout_prob=0.1 if rows > 1 else 0.0,
                  num_classes=num_classes, learn_sigma=out == 2 * in_channels)
    if text is not None:  # a text-to-image model (TextEmbedder)
        config["text_dim"] = text.shape[1]
    return config


def config_name(config):
    """'DiT-L/2' if the config's depth, width and patch are an official one's, else a
    description."""
    for name, arch in CONFIGS.items():
        if all(config.get(k) == v for k, v in arch.items()):
            return name
    return (f"a DiT with depth {config['depth']}, hidden size {config['hidden_size']}, "
            f"patch {config['patch_size']}")


def dit_state_dict(name_or_path, entries=None):
    """
    The DiT weights and (if recorded) constructor arguments in an official name or a file: an
    official state dict, or a checkpoint written by train.py ({'model', 'ema', 'config', ...}: the
    EMA weights are preferred). `entries`: the file's, already read (load.py reads a file once).
    """
    if entries is None:
        path = download(OFFICIAL[name_or_path]) if name_or_path in OFFICIAL else name_or_path
        entries = read_state_dict(path)
    config = entries.get("config") if isinstance(entries.get("config"), dict) else None
    return model_weights(entries), config


def load_checkpoint(name_or_path, model=None, entries=None, **overrides):
    """
    A DiT with the weights of `name_or_path`: 'DiT-XL-2-256x256.pt' or 'DiT-XL-2-512x512.pt'
    (downloaded once into the cache), or a local file. `model` ('DiT-L/2', ...) fixes the
    architecture; otherwise it comes from the config train.py recorded, or from the shapes (the
    head count only for an official width). `overrides` are constructor arguments (num_heads=...).
    A file that does not fit raises CheckpointError saying which keys are missing or unexpected
    and which config its shapes fit. `entries`: the file's, already read.
    """
    sd, config = dit_state_dict(name_or_path, entries)
    found = infer_config(sd)
    if not (config or found or model):
        raise CheckpointError(f"{name_or_path}: not a DiT checkpoint (no x_embedder/pos_embed/"
                              f"blocks keys found; its first keys are {', '.join(list(sd)[:4])})")
    kwargs = {**(config or found or {}), **overrides}
    heads_unknown = kwargs.get("num_heads") is None and not model
    if heads_unknown:  # a stand-in, so that a file that does not fit says so first
        kwargs["num_heads"] = 1
    with torch.device("meta"):  # shapes only: the weights come from the file
        if model:
            net = DiT_models[model](**{k: v for k, v in kwargs.items() if k not in CONFIGS[model]})
        else:
            net = DiT(**kwargs)
    fits = f"its shapes fit {config_name(found)}" if found else "its shapes fit no DiT"
    net = load_strict(net, sd, name_or_path, config_name(net.config), fits=f"; {fits}")
    if heads_unknown:
        raise CheckpointError(f"{name_or_path}: a DiT {kwargs['hidden_size']} wide with no recorded "
                              f"config, whose head count its weights cannot tell (no official DiT "
                              f"has that width): give it, e.g. --num-heads 4 (sample.py, "
                              f"train.py --init, export.py)")
    return net
