"""
Diffusion Model Patching via Mixture-of-Prompts (Ham, Woo et al., AAAI 2025): the paper in one file.

A converged diffusion model is frozen. Every block i gets a pool of N learnable prompts p_i (N x D,
one per token) that are added to its input; a one-layer gate G, fed the timestep embedding and the
block index, weights them differently at every denoising step:

    x_{i+1} = Block_i( softmax(G([t; i])) * p_i + x_i )                                (Eq. 3)

trained on the model's own pre-training data with two balancing losses (Eqs. 11-13). The same call,
patch(model, method), sets DMP up on a DiT or on SD's UNet (model_unet.UNetMixtureOfPrompts), and
every further-training baseline the paper compares with: naive prompt tuning (Eq. 2) here, full
fine-tuning, LoRA (Table 7), DiffFit and BitFit in baselines.py.

Reading order: DMPOptions (every option, once), MixtureOfPrompts down to its forward (the paper's
default path), then the ablations, each a named piece, the losses, patch() and Fig. 5's weights.
Where the paper is silent or the authors' code (github.com/sangminwoo/DMP) differs from it, the
paper is the default and the authors' choice is an option; AUTHORS_CODE collects those options.
"""
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import baselines

# The authors' code differs from the paper in four ways the paper does not mention: the gate reads
# the timestep plus class embedding, the block index enters as a raw scalar, the gate learns at 10x
# the prompts' rate, and learned noise is added to the gate logits in training (the noisy gating of
# Shazeer et al. 2017).
AUTHORS_CODE = dict(gate_cond="t+c", block_index="scalar", gate_lr_scale=10.0, noisy_gate=True)
NUM_TIMESTEPS = 1000  # DiT's diffusion steps: the model always sees the original t in 0..999


def option(default, help, choices=None):
    """A DMPOptions field: its default (the paper's), help and choices (train.py's flag)."""
    metadata = dict(help=help) if choices is None else dict(help=help, choices=choices)
    return field(default=default, metadata=metadata)


@dataclass
class DMPOptions:
    """
    Every option of DMP and of prompt tuning, declared here once: one field a row of the paper's
    ablations, its default the paper's. train.py makes each a flag (prompt_depth: --prompt-depth);
    patch(model, 'dmp' or 'prompt', **fields) and MixtureOfPrompts take them.
    """
    gate: str = option("linear", "Table 4a: a linear gate over [t; i], or attention scores (prompt "
                       "tuning, --method prompt, has none)", ("linear", "attention"))
    selection: str = option("soft", "Table 4b: softmax weights over all prompts, or the top_k "
                            "fraction", ("soft", "hard"))
    top_k: float = option(0.75, "Table 4b, hard selection: the fraction of the prompts kept (192 "
                          "of 256)")
    hard_weights: str = option("softmax", "Table 4b, hard selection: a softmax over the kept "
                               "logits (authors' code) or weight 1 (the paper's text)",
                               ("softmax", "one"))
    prompt_selection: str = option("distinct", "Table 4c: the gate sees the block index, or one "
                                   "mixture for all blocks", ("distinct", "uniform"))
    position: str = option("add", "Table 4d: prompts added to the tokens (Eq. 2), or num_prompts "
                           "tokens prepended, stripped before the final layer", ("add", "prepend"))
    num_prompts: int | None = option(None, "Table 4d, prepend: how many (50); add: always one per "
                                     "token")
    prompt_depth: int | None = option(None, "Fig. 4: prompts in the first k blocks only (default: "
                                      "every block)")
    prompt_init: str = option("zero", "the paper's zero prompts and gate, or Xavier-random ones "
                              "(its 'Zero-initialization')", ("zero", "random"))
    gate_cond: str | None = option(None, "Table 9: the gate reads t, or t + c (the class or text "
                                   "embedding); none: blind to t (its bias and block index only), "
                                   "the study's control (default: t, or t+c with text data; "
                                   "MixtureOfPrompts reads None as t)",
                                   ("t", "t+c", "none"))
    prompt_grid: int = option(16, "SD UNet only (Table 1's SD row): prompts per block, grid x "
                              "grid")
    block_index: str = option("onehot", "the paper's [t; i] with i one-hot, or i as a number "
                              "(authors' code)", ("onehot", "scalar"))
    noisy_gate: bool = option(False, "learned Gaussian noise on the gate logits in training "
                              "(authors' code; always on for hard selection)")
    gate_lr_scale: float = option(1.0, "the gate's learning rate over the prompts' (authors' "
                                  "code: 10)")
    time_bands: int = option(1, "prompt tuning (--method prompt) with K prompt sets, the set of a "
                             "sample chosen by its timestep's band t K // 1000: the study's "
                             "positive control")


# Patch files written before the options were declared here record three under older names.
RENAMED = dict(depth="prompt_depth", init="prompt_init", grid="prompt_grid")


#################################################################################
#                        Mixture of Prompts (Eqs. 1-3)                          #
#################################################################################

class Mixture(NamedTuple):
    """
    The gate's decision in one forward, made once (MixtureOfPrompts.condition) and handed to every
    block's call; the forward also appends it to the caller's list (DiT.forward's `mixtures`), from
    which the balancing losses take the weights.
    """
    weights: torch.Tensor | None        # (B, L, N): g_i = softmax(G([t; i])) of every block i
    c: torch.Tensor                     # (B, D): what the gate read (the attention gate's values)
    load: torch.Tensor | None = None    # (L, N): hard selection's smooth load (Shazeer et al.)
    clean: torch.Tensor | None = None   # the weights without the gate's noise, for the log
    band: torch.Tensor | None = None    # (B,): each sample's time band (time_bands > 1)


class MixtureOfPrompts(nn.Module):
    """
    DMP's prompts and gate, installed as model.block_input: model_dit.DiT.forward calls
    condition(t, y, timesteps) once, then block_input(x, i, mixture) before every block i.
    options: DMPOptions (gate None: naive prompt tuning, Eq. 2); prompt_widths: one width per
    block instead of `dim` (the UNet's blocks differ: model_unet.UNetMixtureOfPrompts).
    """
    def __init__(self, num_blocks, num_tokens, dim, options=None, prompt_widths=None):
        super().__init__()
        o = options or DMPOptions()
        refuse_meaningless(o, num_tokens)
        self.num_prompts = N = o.num_prompts or (num_tokens if o.position == "add" else 50)
        self.depth = L = min(o.prompt_depth or num_blocks, num_blocks)
        self.gate_type, self.selection, self.position = o.gate, o.selection, o.position
        self.gate_cond, self.block_index = o.gate_cond or "t", o.block_index
        self.distinct, self.time_bands = o.prompt_selection == "distinct", o.time_bands
        self.top_k, self.hard_weights = max(1, int(o.top_k * N)), o.hard_weights
        # the authors' noisy gating, and hard top-k's load estimator (it needs noise): the linear's
        self.noisy = (o.noisy_gate or o.selection == "hard") and o.gate == "linear"

        # Eq. 1: P = {p_0, ..., p_{L-1}}, p_i in R^{N x D}. Zero-initialised prompts leave the
        # frozen model's output unchanged at the start and let it take in the prompts' signal
        # gradually; random ones disrupt early training until it diverges (paper,
        # "Zero-initialization").
        self.prompts = new_prompts(L, N, dim, prompt_widths, o.time_bands, o.prompt_init)

        if o.gate == "linear":
            # Eq. 3's G over [t; i], i one-hot: W [t; i] + b = W_t t + W_i e_i + b. W_t and b are
            # self.gate, W_i the separate gate_index, so W_t t is computed once for all blocks.
            index_features = 0 if not self.distinct else (L if o.block_index == "onehot" else 1)
            with warnings.catch_warnings():  # blind to t: no columns to initialise, and no note
                warnings.filterwarnings("ignore", "Initializing zero-element tensors")
                self.gate = nn.Linear(self.cond_width(dim), N)                   # W_t, b
            self.gate_index = None
            if index_features:
                self.gate_index = nn.Parameter(torch.zeros(N, index_features))  # W_i
            # Zero gate: every mixture starts uniform (1/N), as in the authors' zero-initialised
            # setting.
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
            if o.prompt_init == "random" and self.gate.weight.numel():
                nn.init.xavier_uniform_(self.gate.weight)
        elif o.gate == "attention":
            self.init_attention_gate(dim)
        if self.noisy:
            # Shazeer et al. (2017) Eq. 4: H(x) = x W_g + StandardNormal() * Softplus(x W_noise).
            self.w_noise = nn.Parameter(torch.zeros(self.cond_width(dim), N))

    def condition(self, t, y, timesteps):
        """
        What every block's call needs, once per forward: the gate's weights of every block, from
        the timestep embedding t (B, D), the class or text embedding y (B, D) and the integer
        timesteps (B,). A Mixture.
        """
        c = self.gate_input(t, y)
        if self.gate_type != "linear":
            return self.ungated_condition(c, timesteps)  # Eq. 2's prompt tuning, or Table 4a
        # The gate in fp32, outside autocast: its logits then its weights are fp32 on every device
        # (CUDA autocast makes a softmax fp32 whatever its input, CPU's keeps bf16), and a gate
        # that learns by 1e-4 steps from zero is not rounded to bf16's 3 digits.
        with torch.autocast(c.device.type, enabled=False):
            c = c.float()
            logits = self.gate_logits(c)                  # G([t; i]) of every block i: (B, L, N)
            noisy, std = self.add_noise(logits, c)        # the authors' noisy gating, in training
            weights = self.select(noisy)                  # Eq. 3's softmax over the N prompts
            with torch.no_grad():
                clean = weights.detach() if std is None else self.select(logits)
            return Mixture(weights, c, self.smooth_load(logits, noisy, std), clean)

    def gate_logits(self, c):
        """(B, L, N): G([t; i]) = W_t t + W_i e_i + b of every prompted block i, from c (B, D)."""
        logits = self.gate(c)[:, None, :].expand(-1, self.depth, -1)  # W_t t + b, every block
        if self.gate_index is not None:                               # + W_i e_i
            if self.block_index == "onehot":
                index = torch.eye(self.depth, device=c.device)        # e_i of every block
            else:
                index = torch.arange(self.depth, device=c.device, dtype=c.dtype)[:, None]
            logits = logits + (index @ self.gate_index.T)[None]
        return logits

    def forward(self, x, i, mixture):
        """
        x: (B, T, D), the input of block i; mixture: this forward's Mixture (condition). Returns
        the block's new input.
        """
        if i >= self.depth:                                  # Fig. 4: deeper blocks get no prompts
            return x
        if self.gate_type == "linear":
            prompt = mixture.weights[:, i, :, None] * self.prompts[i][None]  # g_i * p_i: (B, N, D)
        else:
            prompt = self.ungated_prompt(i, mixture)         # Eq. 2's p_i, or Table 4a's
        if self.position == "prepend":
            return self.prepend(x, i, prompt)                # Table 4d
        return x + prompt                                    # Eq. 3: softmax(G([t; i])) * p_i + x_i

    # ---- the ablations, each a piece of its own ------------------------------------------------

    def cond_width(self, dim):
        """The width of what the gate reads: the conditioning's, none when it is blind to t."""
        return 0 if self.gate_cond == "none" else dim

    def gate_input(self, t, y):
        """
        c, what the gate reads beside the block index: t (Eq. 3), t + c (Table 9), or nothing
        (blind to t: G([i]) = W_i e_i + b, one mixture a block at every timestep, the control that
        separates mixing by timestep from a fixed reweighting of the prompts).
        """
        c = t + y if self.gate_cond == "t+c" else t
        return c[:, :0] if self.gate_cond == "none" else c

    def add_noise(self, logits, c):
        """
        (noisy logits, std): Shazeer et al. (2017) Eq. 4's learned noise in training (the authors'
        noisy gating; hard selection's load needs it), else (logits, None).
        """
        if not (self.noisy and self.training):
            return logits, None
        std = (F.softplus(c @ self.w_noise) + 1e-2)[:, None, :]  # Shazeer Eq. 4, authors' eps
        return logits + torch.randn_like(logits) * std, std

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

    def smooth_load(self, clean, noisy, std):
        """
        Hard selection's load (L, N), Shazeer et al. (2017) Eqs. 8-10: P(prompt n stays in the top k
        when only its own noise is redrawn), summed over the batch, a smooth stand-in for "how often
        is n selected" that carries a gradient to the gate (the authors' code). None for soft
        selection, without noise (eval) or when every prompt is kept.
        """
        if self.selection == "soft" or std is None or self.top_k == self.num_prompts:
            return None
        top = noisy.topk(self.top_k + 1, dim=-1).values
        k = self.top_k
        threshold_in, threshold_out = top[..., k: k + 1], top[..., k - 1: k]
        threshold = torch.where(noisy > threshold_in, threshold_in, threshold_out)
        # validate_args=False: the check of the argument is a host sync every forward on a GPU.
        normal = torch.distributions.Normal(0.0, 1.0, validate_args=False)
        return normal.cdf((clean - threshold) / std).sum(0)  # (L, N)

    def init_attention_gate(self, dim):
        """
        Table 4a: the prompts are the queries, the timestep embedding the key and value, and the
        output is the weighted prompts directly: weights softmax_n(q_n . k / sqrt(D)) scale the
        value W_v c. W_v starts at zero so the patched model starts equal to the frozen one.
        """
        self.w_q, self.w_k = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.w_v = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.w_v.weight)

    def ungated_condition(self, c, timesteps):
        """condition() without the linear gate: Table 4a's attention weights, or none (Eq. 2)."""
        if self.gate_type is None:
            band = None
            if self.time_bands > 1:  # the band of each sample's timestep, 0..K-1
                band = timesteps * self.time_bands // NUM_TIMESTEPS
            return Mixture(None, c, band=band)
        q = self.w_q(self.prompts)                                       # (L, N, D)
        scores = torch.einsum("lnd,bd->bln", q, self.w_k(c)) / math.sqrt(q.shape[-1])
        weights = F.softmax(scores, dim=-1)                              # over the prompts
        return Mixture(weights, c, clean=weights.detach())

    def ungated_prompt(self, i, mixture):
        """Block i's prompt term without the linear gate: Table 4a's, or Eq. 2's p_i."""
        if self.gate_type == "attention":                     # Table 4a: weighted values W_v c
            return mixture.weights[:, i, :, None] * self.w_v(mixture.c)[:, None, :]
        if mixture.band is not None:                          # each sample's band's p_i: (B, N, D)
            return self.prompts[mixture.band, i]
        return self.prompts[i][None]                          # Eq. 2: naive prompt tuning

    def prepend(self, x, i, prompt):
        """Table 4d: the prompts as num_prompts tokens before x, in place of the last block's."""
        prompt = prompt.expand(x.shape[0], -1, -1)
        rest = x[:, self.num_prompts if i > 0 else 0:]
        return torch.cat([prompt, rest], dim=1)


def new_prompts(L, N, dim, widths=None, bands=1, init="zero"):
    """
    Eq. 1's prompts: (L, N, dim), zero or Xavier-random; with `widths`, one (N, width_i) tensor a
    block (the UNet); with K time bands, K independent sets (K, L, N, dim), each one like Eq. 2's.
    """
    if widths is not None:  # blocks of different widths (the UNet): one (N, width_i) a block
        prompts = nn.ParameterList([nn.Parameter(torch.zeros(N, w)) for w in widths[:L]])
        sets = list(prompts)
    elif bands > 1:
        prompts = nn.Parameter(torch.zeros(bands, L, N, dim))
        sets = list(prompts.data)
    else:
        prompts = nn.Parameter(torch.zeros(L, N, dim))
        sets = [prompts]
    for tensor in sets:
        if init == "random":
            nn.init.xavier_uniform_(tensor)
    return prompts


def refuse_meaningless(o, num_tokens):
    """One sentence for each combination of DMPOptions that means nothing or would train nothing."""
    for name, value in dataclasses.asdict(o).items():
        choices = DMPOptions.__dataclass_fields__[name].metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    # The attention gate (Table 4a) weighs the prompts by attention scores, with no logits of a
    # linear gate to perturb (Shazeer's noise, the authors' code's) or keep the top k of (4b):
    # those options are the linear gate's, and a parameter nothing uses would stop DDP.
    if o.gate == "attention" and o.gate_cond == "none":
        raise ValueError("the attention gate (Table 4a) reads its keys and values from the "
                         "conditioning: it cannot be blind to t (gate_cond 'none' takes the "
                         "linear gate)")
    if o.gate == "attention" and (o.noisy_gate or o.selection == "hard"):
        raise ValueError("the attention gate (Table 4a) has no gate logits to add noise to or "
                         "to select the top k of: noisy gating and hard selection take the "
                         "linear gate")
    if o.position == "add" and o.num_prompts not in (None, num_tokens):
        raise ValueError(f"added prompts need one per token: num_prompts must be {num_tokens}")
    N = o.num_prompts or (num_tokens if o.position == "add" else 50)
    if o.gate is not None and o.selection == "hard" and o.hard_weights == "one" and (
            max(1, int(o.top_k * N)) == N):
        raise ValueError(f"hard selection keeping all {N} prompts at weight one is naive prompt "
                         f"tuning with no gate: keep fewer (top_k below 1) or take the softmax "
                         f"weights")
    if not 1 <= o.time_bands <= NUM_TIMESTEPS:
        raise ValueError(f"time_bands must be between 1 and {NUM_TIMESTEPS}, not {o.time_bands}")
    if o.time_bands > 1 and (o.gate is not None or o.position != "add"):
        raise ValueError("time bands are prompt tuning with one prompt set a band of timesteps "
                         "(method 'prompt', added prompts): with a gate or prepended prompts "
                         "they would be a second, untested way of choosing prompts by timestep")


#################################################################################
#                     Prompt Balancing Losses (Eqs. 11-13)                      #
#################################################################################

def cv_squared(x, eps=1e-5, dim=-1):
    """Squared coefficient of variation sigma / (mu^2 + eps), sigma the (biased) variance: Eq.
    13."""
    return x.var(dim=dim, unbiased=False) / (x.mean(dim=dim) ** 2 + eps)


def balancing_losses(mixtures, device=None):
    """
    (importance, load) of the forward whose Mixture `mixtures` ends with (the list DiT.forward
    appended it to); zeros on `device` without a gate (prompt tuning) or without prompts (the other
    methods). train.py adds them to the diffusion loss with their coefficients (Table 4e; both 1 by
    default).

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
    if not mixtures or mixtures[-1].weights is None:
        zero = torch.zeros((), device=mixtures[-1].c.device if mixtures else device)
        return zero, zero
    gates, load = mixtures[-1].weights, mixtures[-1].load                 # (B, L, N), (L, N)
    importance = cv_squared(gates.sum(dim=1)).mean()                      # Eqs. 12-13
    if load is not None:
        return importance, cv_squared(load).mean()
    return importance, (gates < 0).float().sum(dim=(1, 2)).mean() / gates.shape[1]  # Eq. 11


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
    the multiplier of the run's lr for what the method trains; 'dmp' and 'prompt': DMPOptions'
    fields; the baselines: baselines.patch's, and LoRA's rank 'dmp', the rank whose count is
    nearest DMP's on this model (baselines.lora_rank_matching).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    options = {RENAMED.get(k, k): v for k, v in options.items()}  # an older patch file's names
    for p in model.parameters():
        p.requires_grad_(False)
    model.patch_method, model.patch_options = method, dict(options)
    lr = options.pop("lr_scale", 1.0)
    unet = hasattr(model, "input_blocks")
    if method in ("prompt", "dmp"):
        groups = add_prompts(model, method, lr, DMPOptions(**options))
    else:
        if method == "lora" and options.get("rank") == "dmp" and not unet:
            rank = baselines.lora_rank_matching(model, dmp_parameter_count(model))
            options["rank"] = model.patch_options["rank"] = rank  # the file records the rank
        groups = baselines.patch(model, method, lr, options)
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    return groups


def add_prompts(model, method, lr, options):
    """patch() for DMP and prompt tuning (no gate) on a DiT or the SD UNet: block_input's groups."""
    if method == "prompt":
        options = dataclasses.replace(options, gate=None)
    if hasattr(model, "input_blocks"):  # SD's UNet: the gate reads [t; c] (t+c) or t
        from model_unet import UNetMixtureOfPrompts
        text = model.config["context_dim"] if options.gate_cond == "t+c" else 0
        mop = UNetMixtureOfPrompts(model.block_shapes, model.time_embed[-1].out_features + text,
                                   options)
    else:
        mop = MixtureOfPrompts(len(model.blocks), model.x_embedder.num_patches,
                               model.pos_embed.shape[-1], options)
    model.block_input = mop.to(next(model.parameters()).device)
    prompts = [p for n, p in mop.named_parameters() if n.startswith("prompts")]
    gate = [p for n, p in mop.named_parameters() if not n.startswith("prompts")]
    groups = [dict(params=prompts, lr_scale=lr, name="prompts")]
    if gate:
        groups.append(dict(params=gate, lr_scale=lr * options.gate_lr_scale, name="gate"))
    return groups


def dmp_parameter_count(model, **options):
    """What patch(model, 'dmp', **options) would train on a DiT, counted on the meta device."""
    with torch.device("meta"):
        mop = MixtureOfPrompts(len(model.blocks), model.x_embedder.num_patches,
                               model.pos_embed.shape[-1], DMPOptions(**options))
    return sum(p.numel() for p in mop.parameters())


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
        timesteps = range(NUM_TIMESTEPS)
    t = torch.as_tensor(timesteps, device=device)
    y_emb = None
    if mop.gate_cond == "t+c" and model.text_dim:
        y = torch.zeros(model.text_dim) if y is None else torch.as_tensor(y, dtype=torch.float32)
        y_emb = model.y_embedder(y.to(device).expand(len(t), -1))
    elif mop.gate_cond == "t+c":
        y = torch.zeros_like(t) if y is None else torch.as_tensor(y, device=device).expand_as(t)
        y_emb = model.y_embedder(y, False)
    was_training = mop.training
    mop.eval()
    weights = mop.condition(model.t_embedder(t), y_emb, t).weights
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


def logged_gate_movement(mixtures):
    """
    gate_movement of the mixture of the last forward in `mixtures` (the training step's list),
    without the gate noise ({} without a gate): the batch's samples have random timesteps, so
    gate_tv_t is how much the mixture varies across them (and, with gate_cond 't+c', across their
    labels or captions).
    """
    if not mixtures or mixtures[-1].clean is None:
        return {}
    return gate_movement(mixtures[-1].clean.float(), time_axis=0)
