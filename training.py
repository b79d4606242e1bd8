"""
One training step, what train.py's loop runs and bench.py and memory.py time and measure: the loss
(the hybrid diffusion loss plus DMP's balancing losses) in micro-batches under mixed precision,
AdamW's step and the EMA. Then the batch of a step, every draw in it a function of (seed, step) so
that a resumed run draws what an uninterrupted one drew; the optimizer and compiled blocks.

The step takes each setting it reads by name; the batch functions read train.py's settings
(`args`: batch_size, seed, flip, text, caption_dropout, unconditional).
"""
import concurrent.futures
import contextlib
import copy
import functools
import types

import numpy as np
import torch

import dmp
from dataset import AUGMENT_DRAWS, augment
from distributed import seed_of
from model_clip import caption_embeddings, encode_text

LOG_TERMS = ("loss", "mse", "vb", "importance", "load")


#################################################################################
#                 The training step: forward, backward, optimizer               #
#################################################################################

def train_step(model, opt, batch, diffusion, *, mixtures=None, condition=None,
               importance_coef=1.0, load_coef=1.0, grad_accum=1, autocast=None, scaler=None,
               ema=None):
    """
    One optimisation step on this process's share of a step's batch (get_batch's): grad_accum
    micro-batches whose gradients add up before AdamW's step, then the EMA (an EMA, or None).
    `mixtures`: a list that gets each micro-batch's gate weights (dmp.Mixture: the log's gate
    movement reads them); `condition`: what turns the batch's
    y into the model's condition (conditioning's; class labels by default); `autocast`: the
    precision's context; `scaler`: fp16's gradient scaler. Returns the step's LOG_TERMS, means over
    the share, on the device (no host sync). Each micro-batch's loss is divided by K, so the summed
    gradients are the whole share's to float rounding; hard selection's load is the one term that
    is not a mean over samples (docs/code.md, "micro-batches": the step's is at least the batch's).
    """
    K, size = grad_accum, len(batch[0])
    opt.zero_grad(set_to_none=True)  # before the forward: freed before the activations build up
    terms_sum = 0
    for m in range(K):
        last = m == K - 1 or not hasattr(model, "no_sync")  # DDP: one all-reduce, after the last
        with contextlib.nullcontext() if last else model.no_sync():
            with autocast or contextlib.nullcontext():  # the text encoder too (CLIP in bf16)
                part = micro_batch(batch, slice(m * size // K, (m + 1) * size // K), condition)
                loss, terms = compute_loss(model, diffusion, part, importance_coef, load_coef,
                                           mixtures)
            loss = loss / K
            if scaler is not None:  # fp16: the loss multiplied, so small gradients stay above zero
                loss = scaler.scale(loss)
            loss.backward()
        terms_sum = terms_sum + terms.detach().float() / K
    if scaler is None:
        opt.step()
    else:  # fp16: skips the step if a gradient overflowed (the scale then halves), else unscales
        scaler.step(opt)
        scaler.update()
    if ema is not None:
        ema.update()
    return terms_sum


def compute_loss(model, diffusion, batch, importance_coef=1.0, load_coef=1.0, mixtures=None):
    """
    The hybrid diffusion loss plus DMP's balancing losses (zero for other methods), weighted by
    --importance-coef and --load-coef (Table 4e); y in the batch is the model's condition (a
    tensor, or a dict of the model's keyword arguments). Returns the loss and the LOG_TERMS.
    mixtures: a list that gets the forward's gate weights (dmp.Mixture), which the losses read.
    """
    x, y, t, noise = batch
    if not isinstance(y, dict):
        y = dict(y=y)
    mixtures = [] if mixtures is None else mixtures  # the forward appends its gate's weights
    terms = diffusion.training_losses(model, x, t, dict(y, mixtures=mixtures), noise=noise)
    importance, balance = dmp.balancing_losses(mixtures, x.device)  # Eqs. 12-13, Eq. 11 ("load")
    loss = terms["loss"].mean() + importance_coef * importance + load_coef * balance
    vb = terms.get("vb", terms["mse"] * 0)
    return loss, torch.stack([loss, terms["mse"].mean(), vb.mean(), importance, balance])


def micro_batch(batch, part, condition=None):
    """Slice `part` of a batch, its y made the model's condition (conditioning's function)."""
    x, y, t, noise = batch
    if isinstance(y, dict):
        y = {k: v[part] for k, v in y.items()}
    else:
        y = y[part]
    return x[part], (condition or class_labels)(y), t[part], noise[part]


class EMA:
    """
    The exponential moving average of a model's trained weights (the official DiT's update,
    ema += (1 - decay) (weights - ema), after every step), as a model: `model` shares the frozen
    parameters and copies only the trained ones and the buffers, so further-training a frozen
    backbone with --ema costs the memory of its patch, not of a second backbone. Its state dict is
    a whole model's. (The pairs are taken at the first update: memory.py fills meta weights first.)
    """
    def __init__(self, model, decay):
        shared = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.model = copy.deepcopy(model, memo=shared).requires_grad_(False)
        self.live, self.decay, self.pairs = model, decay, None

    def update(self):
        if self.pairs is None:
            self.pairs = tuple(zip(*[(e, p) for e, p in zip(self.model.parameters(),
                                                             self.live.parameters(), strict=True)
                                     if p.requires_grad], strict=True))
        torch._foreach_lerp_(*self.pairs, 1 - self.decay)


def trained_weights(model):
    """What pretraining (and DMP from scratch) trains: every weight but those the model keeps
    fixed (DiT's sin-cos pos_embed table, a parameter that wants no gradient)."""
    return [p for p in model.parameters() if p.requires_grad]


def class_labels(y):
    """Class labels (or the model's inputs, as a dict) condition the model as they are."""
    return y


def conditioning(text_encoder, sd=False):
    """
    What turns a batch's y into the model's condition, chosen once before the loop: class labels
    as they are; captions through the frozen text encoder on the fly, giving SD's UNet its context
    or a DiT its pooled embedding ("": the null one); `sd`: SD's UNet.
    """
    if text_encoder is None:
        return class_labels
    if sd:
        return functools.partial(unet_context, text_encoder)
    return functools.partial(caption_embeddings, text_encoder)


def unet_context(text_encoder, captions):
    """SD's UNet's condition: the text encoder's last hidden states of the captions."""
    return dict(context=encode_text(text_encoder, captions)[0])


#################################################################################
#                     Data: every draw a function of (seed, step)               #
#################################################################################

def split(data, holdout):
    """Training and held-out indices: a fixed random `holdout` images (seed 0, whatever --seed)."""
    perm = np.random.default_rng(0).permutation(len(data))
    return np.sort(perm[holdout:]), np.sort(perm[:holdout])


@functools.lru_cache(maxsize=2)
def epoch_order(seed, epoch, n):
    """The order of the training images in an epoch: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def get_batch(data, train_rows, step, args, device, rank=0, world=1):
    """
    This process's share of step `step`'s global batch: images (epoch after epoch, each a fresh
    permutation), flips, timesteps and noise. The global draws are the same on every process and
    each takes its slice, so the data a step sees does not depend on the number of processes.
    (host_batch, then device_batch; train.py's loop reads the next step's host part ahead:
    Prefetcher.)
    """
    host = host_batch(data, train_rows, step, args, rank, world, pin=device.type == "cuda")
    return device_batch(data, host, args, device, rank, world)


def host_batch(data, train_rows, step, args, rank=0, world=1, pin=False):
    """
    The host's part of step `step`'s batch, no device work: its stored rows and labels
    (PreparedData.gather; `pin`: page-locked) and its captions, each drawn from numpy's generator
    seeded by (seed, step, 1) as before. Returns (step, stored, captions or None).
    """
    G, start = args.batch_size, step * args.batch_size
    epochs, positions = divmod(np.arange(start, start + G), len(train_rows))
    idx = np.array([epoch_order(args.seed, e, len(train_rows))[i]
                    for e, i in zip(epochs, positions, strict=True)])
    rng = np.random.default_rng(seed_of(args.seed, step, 1))
    flip = np.zeros(G, bool)
    if args.flip:
        flip = rng.random(G) < 0.5
    local = share(G, rank, world)
    stored = data.gather(train_rows[idx[local]], flip[local], pin)
    captions = None
    if args.text:  # one of the image's captions (COCO has five), or "" (caption dropout)
        captions = [data.captions[train_rows[i]] for i in idx]
        pick = [int(rng.integers(len(c))) for c in captions]
        drop = rng.random(G) < args.caption_dropout
        captions = ["" if d else c[j] for c, j, d in zip(captions, pick, drop, strict=True)][local]
    return step, stored, captions


def share(G, rank, world):
    """This process's slice of a global batch of G."""
    return slice(rank * G // world, (rank + 1) * G // world)


def device_batch(data, host, args, device, rank=0, world=1):
    """
    Step host[0]'s batch on the device: timesteps, noise and the latents' posterior noise drawn on
    it from a generator seeded by (seed, step), the stored rows copied to it without waiting
    (PreparedData.to_device). (x, y, t, noise); y: labels, or the captions.
    """
    step, stored, captions = host
    G, local = args.batch_size, share(args.batch_size, rank, world)
    gen = torch.Generator(device).manual_seed(seed_of(args.seed, step))
    t = torch.randint(0, 1000, (G,), generator=gen, device=device)
    noise = torch.randn((G, *data.shape), generator=gen, device=device)
    # latents: z = mean + std * posterior_noise
    posterior_noise = torch.randn((G, *data.shape), generator=gen, device=device)
    x, y = data.to_device(stored, device, noise=posterior_noise[local])
    if args.augment:  # fresh draws every step, for the whole global batch like the rest
        x = augment(x, torch.rand(G, AUGMENT_DRAWS, generator=gen, device=device)[local])
    if args.unconditional:
        y = torch.zeros_like(y)
    if captions is not None:
        y = captions
    return x, y, t[local], noise[local]


class Prefetcher:
    """
    get(step): step's batch on the device (get_batch's, the same tensors in the same order), and
    step + 1's host part (host_batch: the memory-mapped rows read, pinned on CUDA) started in a
    thread meanwhile, so the loop's host work overlaps the device's. A step other than the one
    prefetched (the first, or after a jump) is read then and there. close() ends the thread.
    """
    def __init__(self, data, train_rows, args, device, rank=0, world=1):
        self.read = functools.partial(host_batch, data, train_rows, args=args, rank=rank,
                                      world=world, pin=device.type == "cuda")
        self.make = functools.partial(device_batch, data, args=args, device=device, rank=rank,
                                      world=world)
        self.pool, self.next = concurrent.futures.ThreadPoolExecutor(1), None

    def get(self, step):
        host = None
        if self.next is not None:
            host = self.next.result()
        if host is None or host[0] != step:
            host = self.read(step=step)
        self.next = self.pool.submit(self.read, step=step + 1)
        return self.make(host)

    def close(self):
        self.pool.shutdown(cancel_futures=True)


#################################################################################
#                    The optimizer, precision, compiled blocks                  #
#################################################################################

def optimizer(groups, lr, weight_decay=0.0):
    """AdamW over the method's parameter groups, each at --lr times its lr_scale."""
    return torch.optim.AdamW([dict(params=g["params"], lr=lr * g["lr_scale"]) for g in groups],
                             lr=lr, weight_decay=weight_decay)


# --precision: what each choice runs, as printed at the start of a run.
PRECISIONS = dict(fp32="fp32, no autocast", bf16="bf16 autocast",
                  fp16="fp16 autocast with a gradient scaler")


def choose_precision(requested, device):
    """
    --precision, or the device's default: bf16 autocast on a GPU that computes in bf16 (Ampere and
    later), fp16 autocast on one that does not (V100, T4: bf16 would be emulated, slowly), fp32 on
    CPU.
    """
    if requested:
        return requested
    if device.type != "cuda":
        return "fp32"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "fp16"


def mixed_precision(precision, device):
    """
    (autocast context, gradient scaler or None). fp16 needs the scaler: the loss is multiplied
    before the backward pass so that small gradients do not flush to zero in fp16, and a step whose
    gradients overflow is skipped with the scale halved; bf16 has fp32's range and needs none.
    """
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    autocast = torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")
    if precision == "fp16":
        return autocast, torch.amp.GradScaler(device.type)
    return autocast, None


def compile_blocks(model, **options):
    """
    --compile: torch.compile each block (regional compilation). Identical blocks share one compiled
    graph, so a DiT compiles one block, not 28, in seconds rather than minutes; what runs between
    blocks (DMP's prompts and gate, checkpointing) stays eager. The UNet's 25 blocks differ (a
    ResBlock alone, with a transformer, a downsampler...) and all run TimestepEmbedSequential.forward:
    Dynamo keeps its compiled graphs per code object and stops at 8 (its recompile limit), so each
    UNet block is compiled through a copy of that code of its own.
    """
    if hasattr(model, "blocks"):
        for block in model.blocks:
            block.compile(**options)
        return model
    for block in [*model.input_blocks, model.middle_block, *model.output_blocks]:  # SD's UNet
        forward = type(block).forward
        own = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__,
                                 forward.__defaults__, forward.__closure__)
        block.forward = torch.compile(types.MethodType(own, block), **options)
    return model
