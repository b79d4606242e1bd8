"""
Diffusion Model Patching via Mixture-of-Prompts (Ham, Woo et al., AAAI 2025): the paper in one file.

A converged diffusion model is frozen. Every block i gets a pool of N learnable prompts p_i (N x D,
one per token) that are added to its input; a one-layer gate G, fed the timestep embedding and the
block index, weights them differently at every denoising step:

    x_{i+1} = Block_i( softmax(G([t; i])) * p_i + x_i )                                (Eq. 3)

trained on the model's own pre-training data with two balancing losses (Eqs. 11-13). The same call,
patch(model, method), also sets up every further-training baseline the paper compares with: full
fine-tuning, naive prompt tuning (Eq. 2), LoRA (Table 7), DiffFit and BitFit.

Where the paper is silent or the authors' code (github.com/sangminwoo/DMP) differs from it, the
paper is the default and the authors' choice is an option; AUTHORS_CODE collects those options.
"""
import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F


# The authors' code differs from the paper in four ways the paper does not mention: the gate reads
# the timestep plus class embedding, the block index enters as a raw scalar, the gate learns at 10x
# the prompts' rate, and learned noise is added to the gate logits in training (the noisy gating of
# Shazeer et al. 2017).
AUTHORS_CODE = dict(gate_cond="t+c", block_index="scalar", gate_lr_scale=10.0, noisy_gate=True)


@dataclass
class DMPOptions:
    """DMP's options, one field each (train.py makes a flag of each): the paper's value as its
    default, its table in its help, its choices where there are some."""
    gate: str = field(default="linear", metadata=dict(
        help="Table 4a: the gate", choices=["linear", "attention"]))
    selection: str = field(default="soft", metadata=dict(
        help="Table 4b: soft (every prompt) or hard (the top k)", choices=["soft", "hard"]))
    top_k: float = field(default=0.75, metadata=dict(
        help="fraction kept by hard selection (192 of 256)"))
    hard_weights: str = field(default="softmax", metadata=dict(
        help="hard selection: a softmax over the kept logits (authors' code) or weight 1 (the "
        "paper's text)", choices=["softmax", "one"]))
    prompt_selection: str = field(default="distinct", metadata=dict(
        help="Table 4c", choices=["distinct", "uniform"]))
    position: str = field(default="add", metadata=dict(help="Table 4d", choices=["add", "prepend"]))
    num_prompts: int | None = field(default=None, metadata=dict(
        help="prepend: how many (50); add: always one per token"))
    prompt_depth: int | None = field(default=None, metadata=dict(
        help="prompts in the first k blocks only (Fig. 4)"))
    prompt_init: str = field(default="zero", metadata=dict(help="the prompts' initial values",
                                                           choices=["zero", "random"]))
    gate_cond: str | None = field(default=None, metadata=dict(
        help="Table 9: t+c for text data, else t; none: the gate blind to t (bias and block "
        "index), the study's control", choices=["t", "t+c", "none"]))
    prompt_grid: int = field(default=16, metadata=dict(
        help="SD UNet: prompts per block, grid x grid"))
    block_index: str = field(default="onehot", metadata=dict(
        help="the block index i of [t; i]: one-hot (the paper) or a scalar (authors' code)",
        choices=["onehot", "scalar"]))
    noisy_gate: bool = field(default=False, metadata=dict(
        help="learned gate noise (authors' code)"))
    gate_lr_scale: float = field(default=1.0, metadata=dict(help="10 in the authors' code"))
    time_bands: int = field(default=1, metadata=dict(
        help="prompt sets, one per band of timesteps (the study's positive control); only with "
        "--method prompt"))


#################################################################################
#                        Mixture of Prompts (Eqs. 1-3)                          #
#################################################################################

class MixtureOfPrompts(nn.Module):
    """
    Installed as model.block_input, called as block_input(x, i, t, y) before block i
    (model_dit.DiT.forward).

    Options (each a row of the paper's ablations):
      gate             'linear' (Eq. 3) | 'attention' (Table 4a) | None (naive prompt tuning, Eq. 2)
      selection        'soft': softmax weights over all prompts | 'hard': the top_k fraction (4b)
      hard_weights     'softmax': softmax over the kept logits (authors' code) | 'one': weight 1
      prompt_selection 'distinct': the gate sees the block index | 'uniform': one mixture for all
                       blocks (4c)
      position         'add' (Eq. 2) | 'prepend' num_prompts tokens, stripped before the final
                       layer (4d)
      depth            prompts in the first `depth` blocks only (Fig. 4); None = every block
      init             'zero' (the paper's) | 'random'
      gate_cond        't': timestep embedding | 't+c': plus the class/text embedding (Table 9) |
                       'none': blind to t, its bias and block index only (the control that
                       separates mixing by timestep from a fixed reweighting of the prompts)
      block_index      'onehot': the paper's [t; i] read as a one-hot i | 'scalar': i as a number
                       (authors)
      noisy_gate       learned Gaussian noise on the gate logits in training (authors; always on
                       for 'hard')
      prompt_widths    one prompt width per block instead of `dim` for all (UNetMixtureOfPrompts)
    """
    def __init__(self, num_blocks, num_tokens, dim, num_prompts=None, gate="linear",
                 selection="soft", top_k=0.75, prompt_selection="distinct", position="add",
                 depth=None, init="zero", gate_cond="t", block_index="onehot", noisy_gate=False,
                 prompt_widths=None, hard_weights="softmax"):
        super().__init__()
        assert gate in ("linear", "attention", None) and selection in ("soft", "hard")
        assert hard_weights in ("softmax", "one")
        assert prompt_selection in ("distinct", "uniform") and position in ("add", "prepend")
        assert init in ("zero", "random") and gate_cond in ("t", "t+c", "none")
        assert block_index in ("onehot", "scalar")
        # The attention gate (Table 4a) weighs the prompts by attention scores, with no logits of a
        # linear gate to perturb (Shazeer's noise, the authors' code's) or keep the top k of (4b):
        # those options are the linear gate's, and a parameter nothing uses would stop DDP.
        if gate == "attention" and gate_cond == "none":
            raise ValueError("the attention gate (Table 4a) reads its keys and values from the "
                             "conditioning: it cannot be blind to t (gate_cond 'none' takes the "
                             "linear gate)")
        if gate == "attention" and (noisy_gate or selection == "hard"):
            raise ValueError("the attention gate (Table 4a) has no gate logits to add noise to or "
                             "to select the top k of: noisy gating and hard selection take the "
                             "linear gate")
        if position == "add" and num_prompts not in (None, num_tokens):
            raise ValueError(f"added prompts need one per token: num_prompts must be {num_tokens}")
        self.num_prompts = N = num_prompts or (num_tokens if position == "add" else 50)
        self.depth = L = min(depth or num_blocks, num_blocks)
        self.gate_type, self.selection, self.position = gate, selection, position
        self.gate_cond = gate_cond
        self.top_k, self.hard_weights = max(1, int(top_k * N)), hard_weights
        if gate is not None and selection == "hard" and hard_weights == "one" and self.top_k == N:
            raise ValueError(f"hard selection keeping all {N} prompts at weight one is naive prompt "
                             f"tuning with no gate: keep fewer (top_k below 1) or take the softmax "
                             f"weights")
        self.distinct, self.block_index = prompt_selection == "distinct", block_index
        self.noisy = noisy_gate or selection == "hard"  # hard top-k's load estimator needs noise
        self.noisy = self.noisy and gate == "linear"

        # Eq. 1: P = {p_0, ..., p_{L-1}}, p_i in R^{N x D}. Zero-initialised prompts leave the
        # frozen model's output unchanged at the start and let it take in the prompts' signal
        # gradually; random ones disrupt early training until it diverges (paper,
        # "Zero-initialization").
        if prompt_widths is None:
            self.prompts = nn.Parameter(torch.zeros(L, N, dim))
        else:  # blocks of different widths (the UNet): one (N, width_i) tensor per block
            self.prompts = nn.ParameterList([nn.Parameter(torch.zeros(N, w))
                                             for w in prompt_widths[:L]])
        for prompts in ([self.prompts] if prompt_widths is None else self.prompts):
            if init == "random":
                nn.init.xavier_uniform_(prompts)

        if gate == "linear":
            # Eq. 3: G is one linear layer over [c; i] giving N logits. The block-index columns are
            # a separate parameter so the D-wide part is computed once for all blocks.
            index_features = 0 if not self.distinct else (L if block_index == "onehot" else 1)
            with warnings.catch_warnings():  # blind to t: no columns to initialise, and no note
                warnings.filterwarnings("ignore", "Initializing zero-element tensors")
                self.gate = nn.Linear(self.cond_width(dim), N)
            self.gate_index = None
            if index_features:
                self.gate_index = nn.Parameter(torch.zeros(N, index_features))
            # Zero gate: every mixture starts uniform (1/N), as in the authors' zero-initialised
            # setting.
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
            if init == "random" and self.gate.weight.numel():
                nn.init.xavier_uniform_(self.gate.weight)
        elif gate == "attention":
            # Table 4a: the prompts are the queries, the timestep embedding the key and value, and
            # the output is the weighted prompts directly: weights softmax_n(q_n . k / sqrt(D))
            # scale the value W_v c. W_v starts at zero so the patched model starts equal to the
            # frozen one.
            self.w_q, self.w_k = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
            self.w_v = nn.Linear(dim, dim, bias=False)
            nn.init.zeros_(self.w_v.weight)
        if self.noisy:
            # Shazeer et al. (2017) Eq. 4: H(x) = x W_g + StandardNormal() * Softplus(x W_noise).
            self.w_noise = nn.Parameter(torch.zeros(self.cond_width(dim), N))
        # The last forward's gate weights (B, L, N) and load, for the losses; and the same weights
        # without the gate noise, for train.py's log of how far the gate has moved (gate_movement).
        self.gates, self.load, self.clean_gates = None, None, None

    # ---- the gate ---------------------------------------------------------------------------

    def cond_width(self, dim):
        """The width of what the gate reads: the conditioning's, none when it is blind to t."""
        return 0 if self.gate_cond == "none" else dim

    def gate_logits(self, c):
        """(B, L, N): the gate's logits for every prompted block, from the conditioning c (B, D)."""
        logits = self.gate(c)[:, None, :].expand(-1, self.depth, -1)  # G's c columns, every block
        if self.gate_index is not None:                               # plus its block-index columns
            if self.block_index == "onehot":
                index = torch.eye(self.depth, device=c.device)
            else:
                index = torch.arange(self.depth, device=c.device, dtype=c.dtype)[:, None]
            logits = logits + (index @ self.gate_index.T)[None]
        return logits

    def mixture_weights(self, c):
        """
        The gate weights g (B, L, N) for Eq. 3, and (hard selection) Shazeer's smooth load per
        block.
        """
        # The gate in fp32, outside autocast: its logits then its weights are fp32 on every device
        # (CUDA autocast makes a softmax fp32 whatever its input, CPU's keeps bf16), and a gate
        # that learns by 1e-4 steps from zero is not rounded to bf16's 3 digits.
        with torch.autocast(c.device.type, enabled=False):
            return self._mixture_weights(c.float())

    def _mixture_weights(self, c):
        """mixture_weights in the dtype of c."""
        if self.gate_cond == "none":  # blind to t: G([i]) = W_i e_i + b, the same at every t
            c = c[:, :0]
        clean = self.gate_logits(c)
        if not (self.noisy and self.training):
            noisy, std = clean, None
        else:
            std = (F.softplus(c @ self.w_noise) + 1e-2)[:, None, :]  # Shazeer Eq. 4, authors' eps
            noisy = clean + torch.randn_like(clean) * std
        weights = self.select(noisy)
        with torch.no_grad():
            self.clean_gates = weights.detach() if std is None else self.select(clean)
        if self.selection == "soft" or std is None or self.top_k == self.num_prompts:
            return weights, None
        # Shazeer et al. (2017) Eqs. 8-10: P(prompt n stays in the top k when only its own noise is
        # redrawn), a smooth stand-in for "how often is n selected" that carries a gradient to the
        # gate (the authors' code).
        top = noisy.topk(self.top_k + 1, dim=-1).values
        k = self.top_k
        threshold_in, threshold_out = top[..., k: k + 1], top[..., k - 1: k]
        threshold = torch.where(noisy > threshold_in, threshold_in, threshold_out)
        # validate_args=False: the check of the argument is a host sync every forward on a GPU.
        normal = torch.distributions.Normal(0.0, 1.0, validate_args=False)
        load = normal.cdf((clean - threshold) / std).sum(0)  # (L, N)
        return weights, load

    def select(self, logits):
        """
        Mixture weights from gate logits (..., N): Eq. 3's softmax over all N prompts, or Table 4b's
        hard selection of the top k (192 of 256 by default). The paper says the kept prompts are
        used "with a weight of 1"; the authors' code takes a softmax over the kept logits and
        scatters it back (their models.py, top_k_gates = softmax(top_k_logits)), which passes the
        task loss's gradient to the gate and keeps the weights' sum at 1 as in the soft path; that
        is the default, 'one' the paper's sentence (no task gradient reaches the gate, only the load
        loss's). topk's indices keep exactly k per row even when logits tie (a zero gate in eval),
        where a >= threshold would keep them all.
        """
        if self.selection == "soft":
            return F.softmax(logits, dim=-1)                               # Eq. 3
        top, index = logits.topk(self.top_k, dim=-1)
        kept = F.softmax(top, dim=-1) if self.hard_weights == "softmax" else torch.ones_like(top)
        return torch.zeros_like(logits).scatter(-1, index, kept)

    # ---- the hook called before every block -------------------------------------------------

    def forward(self, x, i, t, y):
        """
        x: (B, T, D) input of block i; t, y: (B, D) timestep and class embeddings. Returns the new
        input.
        """
        if i >= self.depth:                                  # Fig. 4: deeper blocks get no prompts
            return x
        c = t + y if self.gate_cond == "t+c" else t
        if i == 0:                                           # every block's weights at once
            if self.gate_type == "linear":
                self.gates, self.load = self.mixture_weights(c)             # (B, L, N)
            elif self.gate_type == "attention":
                q = self.w_q(self.prompts)                                   # (L, N, D)
                scores = torch.einsum("lnd,bd->bln", q, self.w_k(c)) / math.sqrt(q.shape[-1])
                self.gates, self.load = F.softmax(scores, dim=-1), None      # over the prompts
                self.clean_gates = self.gates.detach()
        if self.gate_type is None:
            prompt = self.prompts[i][None]                                   # Eq. 2: naive
        elif self.gate_type == "attention":
            prompt = self.gates[:, i, :, None] * self.w_v(c)[:, None, :]     # Table 4a: values
        else:
            prompt = self.gates[:, i, :, None] * self.prompts[i][None]       # Eq. 3: g_i * p_i
        if self.position == "add":
            return x + prompt                                  # Eqs. 2-3: added to the tokens
        prompt = prompt.expand(x.shape[0], -1, -1)             # Table 4d: prepended, in place of
        rest = x[:, self.num_prompts if i > 0 else 0:]         # the last block's prompts
        return torch.cat([prompt, rest], dim=1)


class UNetMixtureOfPrompts(MixtureOfPrompts):
    """
    DMP on the Stable Diffusion UNet, installed as model_unet.UNetModel.block_input(h, i, emb,
    context) before each of its 25 blocks (12 encoder, middle, 12 decoder; a decoder block's input
    includes its skip).

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
    DiT ablations (Table 4a, 4d).
    """
    def __init__(self, block_shapes, cond_dim, grid=16, **options):
        if options.get("gate", "linear") == "attention" or options.get("position", "add") != "add":
            raise ValueError("DMP on the UNet has the linear gate (or none) and added prompts only")
        super().__init__(len(block_shapes), grid * grid, cond_dim,
                         prompt_widths=[c for c, _ in block_shapes], **options)
        self.grid = grid

    def forward(self, x, i, emb, context):
        """
        x: (B, C_i, H_i, W_i) input of block i; emb: (B, 1280) timestep embedding; context:
        (B, 77, 768) text.
        """
        if i >= self.depth:
            return x
        if self.gate_cond != "t+c":
            c = emb
        else:
            c = torch.cat([emb, context.mean(dim=1).to(emb.dtype)], dim=-1)
        if i == 0 and self.gate_type == "linear":
            self.gates, self.load = self.mixture_weights(c)       # (B, L, N), every block at once
        g = self.grid
        prompt = self.prompts[i].T.reshape(1, -1, g, g)           # (1, C_i, grid, grid)
        if self.gate_type is not None:
            prompt = self.gates[:, i].reshape(-1, 1, g, g) * prompt  # Eq. 3: softmax(G([t; i])) p_i
        # Added in fp32, and the block reads an fp32 input: under autocast the UNet's activations
        # are bf16 (its convolutions'), whose 3 digits would round a 1e-4 prompt term on a
        # unit-scale input to nothing or to 4e-3; the block's GroupNorms and residual path read
        # fp32 (autocast runs GroupNorm in fp32), as DiT's blocks read DMP's fp32 tokens.
        return x.float() + F.interpolate(prompt.float(), size=x.shape[-2:], mode="area")


#################################################################################
#                     Prompt Balancing Losses (Eqs. 11-13)                      #
#################################################################################

def cv_squared(x, eps=1e-5, dim=-1):
    """Squared coefficient of variation sigma / (mu^2 + eps), sigma the (biased) variance: Eq.
    13."""
    return x.var(dim=dim, unbiased=False) / (x.mean(dim=dim) ** 2 + eps)


def balancing_losses(model):
    """
    (importance, load) for the model's last forward; zeros for methods without a gate. train.py adds
    them to the diffusion loss with their coefficients (Table 4e; both 1 by default).

    Importance (Eqs. 12-13): g~_n = sum over blocks of g_n^i, per sample; its squared coefficient of
    variation across the N prompts, averaged over the batch. With a softmax every sample's mean is
    L/N, so this equals the authors' code, which takes the variance over all B x N entries (they use
    the unbiased variance, eps 1e-10).

    Load (Eq. 11): (1/L) sum_i sum_n I(g_n^i < 0). A softmax is never negative, so this is
    identically zero and carries no gradient (the authors' code has the same property); it is
    computed literally. For hard top-k selection, where the count of selected prompts matters, the
    load is Shazeer et al.'s (2017) smooth estimator instead: the CV^2 across prompts of the
    probability of being in the top k, averaged over blocks.
    """
    mop = model.block_input
    if not isinstance(mop, MixtureOfPrompts) or mop.gates is None:
        zero = next(model.parameters()).new_zeros(())
        return zero, zero
    gates = mop.gates                                                      # (B, L, N)
    importance = cv_squared(gates.sum(dim=1)).mean()
    if mop.load is not None:
        load = cv_squared(mop.load).mean()
    else:
        load = (gates < 0).float().sum(dim=(1, 2)).mean() / gates.shape[1]  # Eq. 11, literally
    return importance, load


#################################################################################
#                    LoRA, DiffFit and BitFit for the baselines                 #
#################################################################################
# These attach their parameters to the frozen layers through forward hooks, so the backbone keeps
# the official key names and a patched model's state dict is the base one plus the new entries.

def add_lora(linear, rank, alpha):
    """LoRA (Hu et al. 2021): W x + (alpha / r) B A x, A ~ Kaiming-uniform, B = 0 so the layer
    starts unchanged."""
    linear.lora_A = nn.Linear(linear.in_features, rank, bias=False)
    linear.lora_B = nn.Linear(rank, linear.out_features, bias=False)
    nn.init.kaiming_uniform_(linear.lora_A.weight, a=math.sqrt(5))
    nn.init.zeros_(linear.lora_B.weight)
    linear.lora_scale = alpha / rank
    linear.register_forward_hook(_lora_hook)


def _lora_hook(linear, args, out):
    """The LoRA term added to a frozen linear layer's output: (alpha / r) B A x."""
    return out + linear.lora_B(linear.lora_A(args[0])) * linear.lora_scale


def add_scale(module, dim):
    """DiffFit's scale factor gamma (DiffFit Alg. 1), initialised to 1, multiplying the branch's
    output."""
    module.gamma = nn.Parameter(torch.ones(dim))
    module.register_forward_hook(_scale_hook)


def _scale_hook(module, args, out):
    """DiffFit's gamma applied to a branch's output."""
    return out * module.gamma


#################################################################################
#                   patch(): every further-training method                      #
#################################################################################

# One learning-rate rule for every method: the DMP paper trains every method it compares at the same
# lr (1e-4, Tables 2 and 7). Each method's own multiplier is an explicit option (train.py
# --lr-scale; DMP's gate has its own, --gate-lr-scale, 10 in the authors' code). DiffFit's paper
# trains DiffFit and BitFit at 10x ("we enlarge lr x10 for parameter-efficient fine-tuning
# settings", its Sec. 4.1): that is lr_scale=10, not the default.
METHODS = ("full", "prompt", "dmp", "lora", "difffit", "bitfit")


def patch(model, method, **options):
    """
    Freeze the backbone, add what `method` trains, and return the parameter groups to optimise:
    [{'params': [...], 'lr_scale': float, 'name': str}, ...]. Options, every method: lr_scale (1.0),
    the multiplier of the run's lr for what the method trains. Per method:
      dmp/prompt  MixtureOfPrompts options, plus gate_lr_scale (1.0; relative to lr_scale)
      lora        rank (16: 2.4M parameters on DiT-B/2, close to DMP's 2.6M; 'dmp': the rank whose
                  count is nearest DMP's on this model, lora_rank_matching), alpha (= rank)
      difffit     gamma_fraction (0.5: the first half of the blocks, DiffFit's 14 of 28),
                  train_labels (False: the label table stays frozen when further-training on the
                  labels it was trained on), pos_scale (1.0; 0.5 is DiffFit's positional trick for
                  fine-tuning a 256x256 checkpoint at 512x512, Sec. 4.3)
    On the SD UNet (model_unet.UNetModel) see _patch_unet.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.patch_method, model.patch_options = method, dict(options)
    options = dict(options)
    lr = options.pop("lr_scale", 1.0)
    if hasattr(model, "input_blocks"):
        groups = _patch_unet(model, method, lr, options)
        for group in groups:
            for p in group["params"]:
                p.requires_grad_(True)
        return groups

    if method == "full":                     # every weight (pos_embed stays a fixed table)
        params = [p for n, p in model.named_parameters() if n != "pos_embed"]
        groups = [dict(params=params, lr_scale=lr, name="all")]
    elif method in ("prompt", "dmp"):
        gate_lr_scale = options.pop("gate_lr_scale", 1.0)
        if method == "prompt":
            options["gate"] = None
        dim = model.pos_embed.shape[-1]
        model.block_input = MixtureOfPrompts(len(model.blocks), model.x_embedder.num_patches, dim,
                                             **options)
        model.block_input.to(model.pos_embed.device)
        gate = [p for n, p in model.block_input.named_parameters() if n != "prompts"]
        groups = [dict(params=[model.block_input.prompts], lr_scale=lr, name="prompts")]
        if gate:
            groups.append(dict(params=gate, lr_scale=lr * gate_lr_scale, name="gate"))
    elif method == "lora":
        rank = options.get("rank", 16)
        if rank == "dmp":
            rank = lora_rank_matching(model, dmp_parameter_count(model))
            model.patch_options["rank"] = rank  # the patch file records the rank, not 'dmp'
        for block in model.blocks:
            for linear in lora_linears(block):
                add_lora(linear, rank, options.get("alpha", rank))
        params = [p for n, p in model.named_parameters() if ".lora_" in n]
        groups = [dict(params=params, lr_scale=lr, name="lora")]
    elif method == "difffit":
        # DiffFit's final setting (its Table 4c, row 8): scale factors gamma, initialised to 1, on
        # the attention and MLP branches of a block (Alg. 1) and on its QKV projection (Alg. 3's
        # gamma1), in the first half of the blocks (Table 4b: blocks 1-14 of DiT-XL/2's 28 beat
        # every other range), and on the final layer. Alg. 3's second gamma, on the attention's
        # output projection, is Alg. 1's attention gamma again (the branch's output is that
        # projection's), so it is not added twice. "Final layer": the paper gives no code; gamma
        # scales the output of its linear map, as every other gamma scales a layer's output.
        dim = model.pos_embed.shape[-1]
        # the first gamma_fraction of the blocks, rounded half up: 14 of 28, 2 of 3
        first = int(options.get("gamma_fraction", 0.5) * len(model.blocks) + 0.5)
        for block in list(model.blocks)[:first]:
            add_scale(block.attn, dim)
            add_scale(block.mlp, dim)
            add_scale(block.attn.qkv, block.attn.qkv.out_features)
        add_scale(model.final_layer.linear, model.final_layer.linear.out_features)
        if options.get("pos_scale", 1.0) != 1.0:
            from model_dit import get_2d_sincos_pos_embed
            grid = int(model.x_embedder.num_patches ** 0.5)
            table = get_2d_sincos_pos_embed(dim, grid, grid_scale=options["pos_scale"])
            model.pos_embed.data.copy_(torch.from_numpy(table).float()[None])
        # DiffFit Alg. 2: trainable_names = ["bias", "norm", "gamma", "y_embed"] (DiT's norms have
        # no weights), without "y_embed" unless the labels are new: "we do not need to fine-tune the
        # label embedding here since the label does not change" (its Sec. 4.3), which is DMP's
        # setting, further-training on the model's own data. On DiT-XL/2's 1000 classes the table
        # alone would be 1.15M of 1.72M parameters.
        train_labels = options.get("train_labels", False)
        params = [p for n, p in model.named_parameters()
                  if n.endswith(".bias") or ".norm" in n or n.endswith(".gamma")
                  or (train_labels and n.startswith("y_embedder."))]
        groups = [dict(params=params, lr_scale=lr, name="difffit")]
    else:                                    # bitfit (Zaken et al. 2021): the bias terms only
        params = [p for n, p in model.named_parameters() if n.endswith(".bias")]
        groups = [dict(params=params, lr_scale=lr, name="bias")]
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    return groups


def lora_linears(block):
    """The linear maps of a DiT block that LoRA adapts: attention qkv and output, the MLP's two."""
    return block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2


def dmp_parameter_count(model, **options):
    """What patch(model, 'dmp', **options) would train on a DiT, counted on the meta device."""
    with torch.device("meta"):
        mop = MixtureOfPrompts(len(model.blocks), model.x_embedder.num_patches,
                               model.pos_embed.shape[-1], **options)
    return sum(p.numel() for p in mop.parameters())


def lora_rank_matching(model, budget):
    """The LoRA rank (at least 1) whose parameter count on a DiT is nearest `budget`."""
    per_rank = sum(linear.in_features + linear.out_features for block in model.blocks
                   for linear in lora_linears(block))
    return max(1, round(budget / per_rank))


def _patch_unet(model, method, lr, options):
    """
    patch() on the SD UNet: DMP and prompt tuning through UNetMixtureOfPrompts (option grid, 16);
    LoRA on the q/k/v/out projections of both attentions and the two feed-forward linears of every
    transformer block; DiffFit's gamma on the self-attention, cross-attention and feed-forward
    branches of every transformer block (DiffFit defines its first-half rule for DiT only;
    gamma_fraction and pos_scale are DiT's) and trains the biases and the GroupNorm/LayerNorm affine
    weights with them (the UNet has no label embedding).
    """
    from model_unet import BasicTransformerBlock
    transformer_blocks = [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    if method == "full":
        return [dict(params=list(model.parameters()), lr_scale=lr, name="all")]
    if method in ("prompt", "dmp"):
        gate_lr_scale = options.pop("gate_lr_scale", 1.0)
        if method == "prompt":
            options["gate"] = None
        cond_dim = model.time_embed[-1].out_features + (model.config["context_dim"]
                                                        if options.get("gate_cond") == "t+c" else 0)
        mop = UNetMixtureOfPrompts(model.block_shapes, cond_dim, **options)
        model.block_input = mop.to(next(model.parameters()).device)
        gate = [p for n, p in mop.named_parameters() if not n.startswith("prompts.")]
        groups = [dict(params=list(mop.prompts), lr_scale=lr, name="prompts")]
        if gate:
            groups.append(dict(params=gate, lr_scale=lr * gate_lr_scale, name="gate"))
        return groups
    if method == "lora":
        rank = options.get("rank", 16)
        if not isinstance(rank, int):
            raise ValueError(f"LoRA on the UNet takes an integer rank, not {rank!r}")
        for block in transformer_blocks:
            for attn in (block.attn1, block.attn2):
                for linear in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
                    add_lora(linear, rank, options.get("alpha", rank))
            for linear in (block.ff.net[0].proj, block.ff.net[2]):
                add_lora(linear, rank, options.get("alpha", rank))
        params = [p for n, p in model.named_parameters() if ".lora_" in n]
        return [dict(params=params, lr_scale=lr, name="lora")]
    if method == "difffit":
        for block in transformer_blocks:
            for branch in (block.attn1, block.attn2, block.ff):
                add_scale(branch, block.norm1.normalized_shape[0])
        norms = {id(p) for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))
                 for p in m.parameters()}
        params = [p for n, p in model.named_parameters()
                  if n.endswith(".bias") or n.endswith(".gamma") or id(p) in norms]
        return [dict(params=params, lr_scale=lr, name="difffit")]
    params = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    return [dict(params=params, lr_scale=lr, name="bias")]


def trainable_state_dict(model):
    """The entries of the state dict that the method trains (what a patch file stores)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    if getattr(model, "patch_options", {}).get("pos_scale", 1.0) != 1.0:
        names.add("pos_embed")  # DiffFit's rescaled positional table is part of the patch
    return {k: v.detach().clone() for k, v in state.items() if k in names}


#################################################################################
#                       Fig. 5: which prompts each block uses                   #
#################################################################################

@torch.no_grad()
def gate_weights(model, timesteps=None, y=None):
    """
    The gate's weights as an array [blocks, timesteps, prompts] (eval mode: no gate noise). y: the
    class (default 0), or for a text DiT a pooled text embedding (text_dim,) (default: the null
    embedding).
    """
    mop = model.block_input
    if not isinstance(mop, MixtureOfPrompts) or mop.gate_type is None:
        raise ValueError("the model has no DMP gate (patch it with method='dmp')")
    device = model.pos_embed.device
    if timesteps is None:
        timesteps = range(1000)
    t = torch.as_tensor(timesteps, device=device)
    c = model.t_embedder(t)
    if mop.gate_cond == "t+c" and model.text_dim:
        y = torch.zeros(model.text_dim) if y is None else torch.as_tensor(y, dtype=torch.float32)
        c = c + model.y_embedder(y.to(device).expand(len(t), -1))
    elif mop.gate_cond == "t+c":
        y = torch.zeros_like(t) if y is None else torch.as_tensor(y, device=device).expand_as(t)
        c = c + model.y_embedder(y, False)
    was_training = mop.training
    mop.eval()
    if mop.gate_type == "attention":
        q = mop.w_q(mop.prompts)
        scores = torch.einsum("lnd,bd->bln", q, mop.w_k(c)) / math.sqrt(c.shape[-1])
        weights = F.softmax(scores, dim=-1)
    else:
        weights, _ = mop.mixture_weights(c)
    mop.train(was_training)
    return weights.permute(1, 0, 2).float().cpu().numpy()


def gate_movement(weights, time_axis=None):
    """
    How far mixture weights (..., N) (leading axes: blocks, timesteps, samples) are from the uniform
    1/N the zero-initialised gate starts at: the largest and the mean |N g_n - 1| (0: uniform; 0.1:
    some weight 10% off 1/N), and the entropy relative to the uniform mixture's, smallest and mean
    (1: uniform). With time_axis, the axis along which the timestep varies, also gate_tv_t: the mean
    total-variation distance between a mixture and the mean mixture along that axis (0: the same
    mixture at every timestep, whatever it is). A gate that stays uniform makes Eq. 3 naive prompt
    tuning with every prompt scaled by 1/N, which under Adam is prompt tuning at lr/N; one that
    moves but does not depend on t is a fixed reweighting of the prompts: these numbers say whether
    a run's DMP mixes its prompts differently at each timestep, the paper's idea.
    """
    w = torch.as_tensor(weights).detach().double()
    n = w.shape[-1]
    deviation = (w * n - 1).abs()
    entropy = -(w * w.clamp_min(1e-30).log()).sum(-1) / math.log(n)
    out = dict(gate_dev_max=deviation.max().item(), gate_dev_mean=deviation.mean().item(),
               gate_entropy_min=entropy.min().item(), gate_entropy_mean=entropy.mean().item())
    if time_axis is not None:
        out["gate_tv_t"] = (w - w.mean(time_axis, keepdim=True)).abs().sum(-1).mean().item() / 2
    return out


def logged_gate_movement(model):
    """
    gate_movement of the mixture in the model's last forward, without the gate noise ({} without a
    gate): the batch's samples have random timesteps, so gate_tv_t is how much the mixture varies
    across them (and, with gate_cond 't+c', across their labels or captions).
    """
    mop = getattr(model, "block_input", None)
    if not isinstance(mop, MixtureOfPrompts) or mop.clean_gates is None:
        return {}
    return gate_movement(mop.clean_gates.float(), time_axis=0)
