"""
Peak memory of a training step without a GPU: what `python bench.py --estimate-memory` prints.

It runs train.py's step (training.train_step: hybrid loss and DMP's balancing losses under autocast,
backward, AdamW, EMA when pretraining) on the full-size models with fake tensors
(torch._subclasses.FakeTensorMode): every op computes shapes and dtypes only, nothing is
allocated, and a dispatch mode (LiveBytes) adds up the bytes of the tensor storages alive after
every op; its peak is what torch.cuda.max_memory_allocated would report. (torch's MemTracker,
torch.distributed._tools.mem_tracker, hooks every parameter for its gradient, which fails on
DMP's frozen backbone.) The fakes are CPU tensors (a fake CUDA device does not work with a
CPU-only torch: autograd asks the CUDA runtime for a stream), so what a CUDA run does differently
is reproduced:
  allocator  CUDA's caching allocator rounds every block up to a multiple of 512 bytes;
  attention  F.scaled_dot_product_attention (never given a mask here) runs as the kernel CUDA
             picks: FlashAttention-2 in bf16 (head sizes 40-160 fit it), the memory-efficient
             kernel in fp32. Both keep q, k, v, the output and the log-sum-exp for the backward
             pass, never the N x N scores a math path would;
  autocast   CUDA's op lists (ATen's autocast_mode.h) replace CPU's: layer_norm, group_norm,
             softmax, exp, log, pow and nearest upsampling give fp32 on CUDA (bf16 on CPU), so a
             norm of a bf16 tensor keeps an fp32 copy of it; einsum gives bf16;
  AdamW      foreach, the CUDA default: its step makes a temporary fp32 copy of the trained
             weights.
Left out: the CUDA context (~0.5 GB), cuBLAS/cuDNN workspaces and kernels' internal scratch memory
(FlashAttention's backward accumulates dq in fp32), allocator fragmentation (reserved minus
allocated, part of what nvidia-smi shows), NCCL buffers, torch.compile. tests/test_memory.py checks
the count against the CPU allocator's own record of a real step, and against a hand count of what
a DMP block keeps for its backward pass.
"""
import contextlib
import functools
import sys
import time
import warnings
import weakref

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from tqdm import tqdm

import dmp
import training
from checkpoints import write_json
from diffusion import create_diffusion
from model_clip import CLIP_TINY, CLIP_VITL14, CLIPTextModel
from model_dit import CONFIGS, DiT
from model_unet import UNet_configs, UNetModel

MEMORY_KINDS = ("weights", "gradients", "optimizer", "activations")
MEMORY_MODELS = {
    **{name: dict(kind="dit", arch=name, input_size=32)
       for name in ("DiT-B/2", "DiT-L/2", "DiT-XL/2")},
    "sd15": dict(kind="unet", arch="sd15", latent_size=64, text="vit-l/14"),  # SD 1.5 at 512x512
    # For the tests: a small DiT, and a small SD-like UNet (9 blocks) with the tiny CLIP.
    "tiny-dit": dict(kind="dit", arch=dict(patch_size=2, hidden_size=64, depth=2, num_heads=4),
                     input_size=8),
    "tiny-unet": dict(kind="unet", arch=dict(in_channels=4, out_channels=4, model_channels=32,
                                             attention_resolutions=[1, 2], num_res_blocks=1,
                                             channel_mult=[1, 2], num_heads=8, transformer_depth=1,
                                             context_dim=32), latent_size=8, text="tiny"),
}
# docs/speed-and-memory.md's table: (model, method, global batch, micro-batch, checkpointing).
MEMORY_ROWS = [(name, method, 128, 128, False) for name in ("DiT-B/2", "DiT-L/2", "DiT-XL/2")
               for method in ("pretrain", "full", "dmp")] + [
    ("DiT-XL/2", "dmp", 128, 128, True), ("DiT-XL/2", "dmp", 128, 32, False),
    ("DiT-XL/2", "dmp", 128, 32, True), ("DiT-XL/2", "full", 128, 128, True),
    ("sd15", "dmp", 128, 128, False), ("sd15", "dmp", 128, 128, True),
    ("sd15", "dmp", 128, 32, True), ("sd15", "full", 128, 32, False),
    ("sd15", "full", 128, 32, True)]


class LiveBytes(TorchDispatchMode):
    """
    The bytes of every tensor storage alive, by kind, and the peak with its breakdown: on fake
    tensors, what torch.cuda.max_memory_allocated would say (round_to=512, the caching allocator's
    block size). Storages an op returns count as `self.kind`; older tensors are counted with add().
    """
    def __init__(self, round_to=512):
        super().__init__()
        self.round_to, self.kind, self.live = round_to, "activations", {}
        self.now = dict.fromkeys(MEMORY_KINDS, 0)
        self.peak, self.at_peak = 0, dict(self.now)

    def add(self, tensor, kind=None):
        """Count the storage of `tensor` (once) as `kind`, by default the kind counted now."""
        storage = tensor.untyped_storage()
        key, kind = storage._cdata, kind or self.kind
        if key in self.live:
            return
        size = -(-storage.nbytes() // self.round_to) * self.round_to
        self.live[key] = [size, kind]
        self.now[kind] += size
        weakref.finalize(storage, self._free, key)  # runs when the last tensor on it goes
        total = sum(self.now.values())
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.now)

    def relabel(self, tensor, kind):
        """Count an already counted storage as another kind (a parameter's .grad: 'gradients')."""
        entry = self.live.get(tensor.untyped_storage()._cdata)
        if entry is not None:
            self.now[entry[1]] -= entry[0]
            self.now[kind] += entry[0]
            entry[1] = kind

    def _free(self, key):
        size, kind = self.live.pop(key)
        self.now[kind] -= size

    @contextlib.contextmanager
    def counting_as(self, kind):
        """While inside, new storages count as `kind`."""
        before, self.kind = self.kind, kind
        try:
            yield
        finally:
            self.kind = before

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    """
    aten::scaled_dot_product_attention as CUDA runs it without a mask: FlashAttention-2 in bf16 or
    fp16, the memory-efficient kernel in fp32 (autocast has cast q, k, v before, as on CUDA).
    """
    if attn_mask is not None or enable_gqa:
        raise ValueError("the memory estimate models attention without a mask")
    aten = torch.ops.aten
    if q.dtype == torch.float32:
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        return aten._scaled_dot_product_efficient_attention(q, k, v, None, grad, dropout_p,
                                                            is_causal, scale=scale)[0]
    return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]


# CUDA's autocast op lists, ATen's autocast_mode.h (torch 2.13). CUDA hands norm.Scalar and
# norm.ScalarOpt_dim a dtype argument; here they are cast to fp32, which gives the same output.
CUDA_AUTOCAST = dict(
    lower="_convolution.deprecated _convolution conv1d conv2d conv3d conv_tbc conv_transpose1d "
          "conv_transpose2d.input conv_transpose3d.input convolution prelu addmm addmv addr matmul "
          "einsum mm mv linalg_vecdot linear addbmm baddbmm bmm chain_matmul linalg_multi_dot "
          "_thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell gru_cell rnn_tanh_cell "
          "rnn_relu_cell _scaled_dot_product_flash_attention scaled_dot_product_attention",
    fp32="acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan "
         "pow.Tensor_Scalar pow.Tensor_Tensor pow.Scalar softplus layer_norm native_layer_norm "
         "rms_norm group_norm frobenius_norm.dim nuclear_norm nuclear_norm.dim cosine_similarity "
         "poisson_nll_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss kl_div "
         "l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss multilabel_margin_loss "
         "soft_margin_loss triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits "
         "dist pdist cdist renorm logsumexp upsample_nearest1d _upsample_nearest_exact1d "
         "upsample_nearest2d _upsample_nearest_exact2d upsample_nearest3d "
         "_upsample_nearest_exact3d upsample_linear1d upsample_bilinear2d _upsample_bilinear2d_aa "
         "upsample_trilinear3d upsample_bicubic2d _upsample_bicubic2d_aa norm.Scalar "
         "norm.ScalarOpt_dim",
    fp32_unless_dtype="prod prod.dim_int softmax.int log_softmax.int cumprod cumsum "
                      "linalg_vector_norm linalg_matrix_norm linalg_matrix_norm.str_ord sum "
                      "sum.dim_IntList",
    promote="addcdiv addcmul atan2 bilinear cross dot vdot grid_sampler index_put tensordot "
            "scatter_add",
)


def autocast_kernel(name, policy):
    """An AutocastCPU kernel for aten::`name` with CUDA's cast policy (autocast_mode.h's)."""
    packet, _, overload = name.partition(".")
    op = getattr(getattr(torch.ops.aten, packet), overload or "default")
    arguments = [a.name for a in op._schema.arguments]
    below = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)

    def eligible(a):
        return isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64

    def kernel(*args, **kwargs):
        low = torch.get_autocast_dtype("cpu")
        to = dict(lower=low, fp32=torch.float32).get(policy)
        if policy == "promote":  # the widest floating type among the inputs
            floats = [a for a in tree_flatten((args, kwargs))[0] if eligible(a)]
            to = torch.float32 if any(a.dtype == torch.float32 for a in floats) else low
        if to is not None:
            args, kwargs = tree_map_only(torch.Tensor, lambda a: a.to(to) if eligible(a) else a,
                                         (args, kwargs))
        elif eligible(args[0]):  # fp32_unless_dtype: an output dtype given is kept
            position = arguments.index("dtype")
            given = args[position] if position < len(args) else kwargs.get("dtype")
            if given is None:
                kwargs = dict(kwargs, dtype=torch.float32)
        with torch._C._ExcludeDispatchKeyGuard(below):
            return op(*args, **kwargs)
    return kernel


@contextlib.contextmanager
def cuda_kernels():
    """
    While inside, CPU tensors (fake ones too) get CUDA's autocast lists and attention kernels. They
    are registered with the dispatcher, so they hold in the backward pass and in checkpointing's
    recomputation too. CPU's autocast kernels stay where CUDA's policy is the same lower-precision
    one (they cache the bf16 copies of the weights, as CUDA's do); CPU-only entries fall through.
    """
    ops = [n[6:] for n in torch._C._dispatch_get_all_op_names() if n.startswith("aten::")]
    cpu = {n for n in ops
           if torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{n}", "AutocastCPU")}
    cuda = {name: policy for policy, names in CUDA_AUTOCAST.items() for name in names.split()
            if name in ops}  # (an op this torch does not have is never called)
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for name in sorted(cpu - set(cuda)):
                lib.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
            for name, policy in cuda.items():
                if not (policy == "lower" and name in cpu):
                    lib.impl(name, autocast_kernel(name, policy), "AutocastCPU")
            lib.impl("scaled_dot_product_attention", fused_attention, "CompositeImplicitAutograd")
        yield
    finally:
        lib._destroy()


def memory_models(spec, method):
    """
    On the meta device: the model of a MEMORY_MODELS entry patched for `method` as train.py does,
    the weights it trains, its EMA copy (pretraining) and the frozen text encoder (SD).
    """
    with torch.device("meta"):
        if spec["kind"] == "dit":
            arch = CONFIGS[spec["arch"]] if isinstance(spec["arch"], str) else spec["arch"]
            model, text = DiT(input_size=spec["input_size"], num_classes=1000, **arch), None
        else:
            arch = UNet_configs[spec["arch"]] if isinstance(spec["arch"], str) else spec["arch"]
            model = UNetModel(**arch)
            clip = CLIP_VITL14 if spec["text"] == "vit-l/14" else CLIP_TINY
            text = CLIPTextModel(**clip).requires_grad_(False)
        if method == "pretrain":
            if spec["kind"] != "dit":
                raise ValueError("pretraining is estimated for DiT only (SD is further-trained)")
            trained = training.trained_weights(model)
        else:
            options = dict(gate_cond="t+c") if spec["kind"] == "unet" and method == "dmp" else {}
            trained = [p for g in dmp.patch(model, method, **options) for p in g["params"]]
        ema = training.EMA(model, 0.9999) if method == "pretrain" else None
    return model, trained, ema, text


def materialize(modules, trained, fill):
    """Each meta parameter and buffer of `modules` replaced by fill(shape, dtype), a parameter two
    share (an EMA's frozen ones) by one; new `trained`."""
    new = {}
    for module in (m for root in modules if root is not None for m in root.modules()):
        for name, p in module._parameters.items():
            if p is not None and id(p) not in new:
                new[id(p)] = nn.Parameter(fill(p.shape, p.dtype), p.requires_grad)
            if p is not None:
                module._parameters[name] = new[id(p)]
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = fill(b.shape, b.dtype)
    return [new[id(p)] for p in trained]


def random_tensor(shape, dtype):
    """A weight for a memory run: small random floats (values change no memory), zero integers."""
    t = torch.empty(shape, dtype=dtype)
    return t.normal_(0, 0.02) if dtype.is_floating_point else t.zero_()


def estimate_memory(name, method, batch, micro_batch=None, checkpointing=False, precision="bf16",
                    like_cuda=True, fake=True):
    """
    Peak memory of a step of train.py's loop (training.train_step) for MEMORY_MODELS[name] and
    `method` ('pretrain' or one of dmp.METHODS), the global batch in micro-batches of micro_batch.
    like_cuda: as on CUDA (see above), else with CPU's kernels, autocast lists and sizes.
    fake=False runs it for real on CPU (the tests check the count against the allocator). Returns
    the table's row, in GiB.
    """
    spec, micro = MEMORY_MODELS[name], micro_batch or batch
    if like_cuda and not fake:
        raise ValueError("CUDA's kernels are modelled on fake tensors only (fake=True)")
    if batch % micro:
        raise ValueError(f"a global batch of {batch} does not split into micro-batches of {micro}")
    model, trained, ema, text = memory_models(spec, method)
    tracker = LiveBytes(round_to=512 if like_cuda else 1)
    contexts = [FakeTensorMode()] if fake else []
    contexts += [tracker] + ([cuda_kernels()] if like_cuda else [])
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        with tracker.counting_as("weights"), torch.no_grad():
            trained = materialize([model, ema and ema.model, text], trained, random_tensor)
        model.set_checkpointing(checkpointing).train()
        opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0, foreach=like_cuda or None)
        for p in trained:
            p.register_post_accumulate_grad_hook(lambda p: tracker.relabel(p.grad, "gradients"))
        opt.register_step_pre_hook(functools.partial(setattr_hook, tracker, "optimizer"))
        opt.register_step_post_hook(functools.partial(setattr_hook, tracker, "activations"))
        # A run in progress, made by running the end of a step: the gradients it leaves, AdamW's
        # step (it creates the two moments here) and the EMA update. Then the next step, as
        # train.py runs it: the gradients freed, every micro-batch's forward and backward (with
        # several, the gradients being accumulated are alive from the first backward on), AdamW's
        # step (weights + gradients + moments + its temporaries) and the EMA.
        with tracker.counting_as("gradients"):
            for p in trained:
                p.grad = torch.zeros_like(p)
        opt.step()
        if ema is not None:
            ema.update()
        size = spec["input_size"] if spec["kind"] == "dit" else spec["latent_size"]
        x, noise = torch.randn(batch, 4, size, size), torch.randn(batch, 4, size, size)
        t = torch.randint(0, 1000, (batch,))
        if text is None:
            y = torch.randint(0, 1000, (batch,))
        else:  # train.py: the frozen text encoder runs on the fly, outside autocast
            with torch.no_grad():
                y = dict(context=text(torch.randint(0, 49408, (batch, 77)))[0])
        diffusion = create_diffusion("", "linear", learn_sigma=spec["kind"] == "dit")
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        # train_step's defaults: both balancing losses; no text encoder (the estimate encodes
        # token ids, not captions, so the UNet gets its context directly)
        training.train_step(model, opt, (x, y, t, noise), diffusion, grad_accum=batch // micro,
                            autocast=autocast, ema=ema)
    gib = 2 ** 30
    return dict(row="memory", model=name, mode=method, batch=batch, micro_batch=micro,
                checkpointing=checkpointing, precision=precision, peak_gib=tracker.peak / gib,
                **{f"{k}_gib": v / gib for k, v in tracker.at_peak.items()},
                seconds=time.perf_counter() - started)


def setattr_hook(tracker, kind, *hook_args):
    """An optimizer step hook: what the tracker counts from here on (AdamW's step: 'optimizer')."""
    tracker.kind = kind


CARDS_GIB = (80, 40, 24)
MEMORY_MARGIN = (1.05, 1.0)  # a card fits a row when 1.05 x its estimate + 1 GiB is at most it
MEMORY_NOTE = ("Estimates, not measurements: one step of train.py's loop run on fake tensors (no "
               "GPU, nothing allocated), counted as torch.cuda.max_memory_allocated counts on CUDA "
               "(bf16 autocast with CUDA's op lists, FlashAttention, AdamW foreach, 512-byte "
               "blocks). Left out: the CUDA context (~0.5 GB), cuBLAS/cuDNN workspaces and "
               "kernels' scratch memory, allocator fragmentation, NCCL buffers, torch.compile. "
               "'fits' allows 1.05 x the estimate + 1 GiB.")


def fits(row):
    """The cards of CARDS_GIB a row's estimate fits, with MEMORY_MARGIN for what it leaves out."""
    need = MEMORY_MARGIN[0] * row["peak_gib"] + MEMORY_MARGIN[1]
    return [c for c in CARDS_GIB if need <= c]


def format_memory_table(rows):
    """The memory rows as a Markdown table (docs/speed-and-memory.md's), each an estimate."""
    lines = ["| model | method | batch | micro-batch | checkpointing | peak GiB | weights | "
             "gradients | AdamW | activations | fits | source |", "| --- " * 12 + "|"]
    attention = dict(bf16="FlashAttention", fp32="memory-efficient attention")
    for r in rows:
        cards = ", ".join(f"{c} GB" for c in fits(r)) or "none of 80/40/24 GB"
        sizes = " | ".join(f"{r[f'{k}_gib']:.1f}" for k in MEMORY_KINDS)
        ckpt = "yes" if r["checkpointing"] else "no"
        lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['micro_batch']} | {ckpt} | "
                     f"**{r['peak_gib']:.1f}** | {sizes} | {cards} | "
                     f"estimate (fake tensors, {r['precision']}, {attention[r['precision']]}) |")
    return "\n".join(lines)


def parse_memory_spec(text):
    """'DiT-XL/2:dmp:128[:32][:ckpt]' -> (model, method, batch, micro-batch, checkpointing)."""
    parts = text.split(":")
    rest = parts[4:] if len(parts) > 3 and parts[3].isdigit() else parts[3:]
    if len(parts) < 3 or not parts[2].isdigit() or rest not in ([], ["ckpt"], ["checkpointing"]):
        sys.exit(f"error: --estimate-memory {text}: expected MODEL:METHOD:BATCH[:MICRO][:ckpt]")
    if parts[0] not in MEMORY_MODELS:
        sys.exit(f"error: --estimate-memory {text}: no model {parts[0]} "
                 f"(one of {', '.join(MEMORY_MODELS)})")
    micro = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else int(parts[2])
    return parts[0], parts[1], int(parts[2]), micro, bool(rest)


def run_memory_estimates(texts, precision=None, json_path=None):
    """
    bench.py --estimate-memory: estimate each row given (parse_memory_spec's texts; none given, the
    documented MEMORY_ROWS) in `precision` (default bf16), print the table, write JSON. A row that
    cannot be estimated: one sentence.
    """
    specs = [parse_memory_spec(text) for text in texts] or MEMORY_ROWS
    try:
        rows = [estimate_memory(*spec, precision=precision or "bf16")
                for spec in tqdm(specs, desc="memory estimates", leave=False)]
    except ValueError as e:
        sys.exit(f"error: --estimate-memory: {e}")
    print(MEMORY_NOTE + "\n")
    print(format_memory_table(rows))
    if json_path:
        write_json(json_path, dict(note=MEMORY_NOTE, torch=torch.__version__, results=rows))
    return rows
