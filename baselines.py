"""
The further-training baselines DMP is compared with (paper Tables 2 and 7): full fine-tuning, LoRA
(Hu et al. 2021), DiffFit (Xie et al. 2023) and BitFit (Zaken et al. 2021), on DiT and on the SD
UNet. dmp.patch(model, method) freezes the backbone and calls patch() here for these methods.

LoRA and DiffFit attach their parameters to the frozen layers through forward hooks, so the
backbone keeps the official key names and a patched model's state dict is the base one plus the
new entries.
"""
import math

import torch
import torch.nn as nn


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


def lora_linears(block):
    """The linear maps of a DiT block that LoRA adapts: attention qkv and output, the MLP's two."""
    return block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2


def lora_rank_matching(model, budget):
    """The LoRA rank (at least 1) whose parameter count on a DiT is nearest `budget`."""
    per_rank = sum(linear.in_features + linear.out_features for block in model.blocks
                   for linear in lora_linears(block))
    return max(1, round(budget / per_rank))


def patch(model, method, lr, options):
    """
    The parameter groups `method` trains on a frozen DiT, with what it adds. Options per method:
      lora        rank (16: 2.4M parameters on DiT-B/2, close to DMP's 2.6M; dmp.patch resolves
                  'dmp', the rank whose count is nearest DMP's), alpha (= rank)
      difffit     gamma_fraction (0.5: the first half of the blocks, DiffFit's 14 of 28),
                  train_labels (False: the label table stays frozen when further-training on the
                  labels it was trained on), pos_scale (1.0; 0.5 is DiffFit's positional trick for
                  fine-tuning a 256x256 checkpoint at 512x512, Sec. 4.3)
    On the SD UNet (model_unet.UNetModel) see patch_unet.
    """
    if hasattr(model, "input_blocks"):
        return patch_unet(model, method, lr, options)
    if method == "full":                     # every weight (pos_embed stays a fixed table)
        params = [p for n, p in model.named_parameters() if n != "pos_embed"]
        return [dict(params=params, lr_scale=lr, name="all")]
    if method == "lora":
        rank = options.get("rank", 16)
        for block in model.blocks:
            for linear in lora_linears(block):
                add_lora(linear, rank, options.get("alpha", rank))
        params = [p for n, p in model.named_parameters() if ".lora_" in n]
        return [dict(params=params, lr_scale=lr, name="lora")]
    if method == "difffit":
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
        return [dict(params=params, lr_scale=lr, name="difffit")]
    # bitfit (Zaken et al. 2021): the bias terms only
    params = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    return [dict(params=params, lr_scale=lr, name="bias")]


def patch_unet(model, method, lr, options):
    """
    patch() on the SD UNet: LoRA on the q/k/v/out projections of both attentions and the two
    feed-forward linears of every transformer block; DiffFit's gamma on the self-attention,
    cross-attention and feed-forward branches of every transformer block (DiffFit defines its
    first-half rule for DiT only; gamma_fraction and pos_scale are DiT's) and trains the biases and
    the GroupNorm/LayerNorm affine weights with them (the UNet has no label embedding).
    """
    from model_unet import BasicTransformerBlock
    transformer_blocks = [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]
    if method == "full":
        return [dict(params=list(model.parameters()), lr_scale=lr, name="all")]
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
