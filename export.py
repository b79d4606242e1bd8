"""
Export: plain weights that other tools load, from a run folder, a checkpoint or a patch.

    python export.py runs/000-ffhq-lora --out ffhq-lora.pt          # DiT: the official layout
    python export.py base.pt --patch patch.pt --out merged.pt
    python export.py runs/001-laion-lora --model sd15 --out merged.safetensors   # SD: ldm file
    python export.py runs/001-laion-lora --model sd15 --format diffusers --out merged/

A DiT becomes a plain state dict, the layout of the official DiT-XL-2-256x256.pt: the official
code's find_model reads it and DiT(...) loads it strictly (the command prints the arguments). SD
becomes an ldm single file (model.diffusion_model.* beside the base's VAE and text encoder) or,
from a diffusers base, a copy of that folder with the UNet replaced. Full fine-tuning is written as
trained; LoRA, DiffFit and BitFit are merged into the weights they adapt (merged_state_dict), so
the file computes what the patched model computes, up to float32 rounding. DMP and prompt tuning
add prompts weighted per timestep before every block, which no plain DiT or UNet can hold: they
are refused, and are used where this project loads them (sample.py, load.load_model).
"""
import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

import load
from checkpoints import CheckpointError, atomic_save, diffusers_file, read_state_dict
from model_dit import CONFIGS
from model_unet import _DIFFUSERS_FILES, diffusers_to_ldm
from model_vae import vae_state_dict


#################################################################################
#                  Merging LoRA, DiffFit and BitFit into plain weights          #
#################################################################################

def output_linear(module):
    """The linear map whose output is `module`'s output (what DiffFit's gamma scales): itself, or
    the last layer of an attention (its output projection) or MLP."""
    if isinstance(module, nn.Linear):
        return module
    for name in ("proj", "fc2"):  # model_dit's Attention and Mlp
        if isinstance(getattr(module, name, None), nn.Linear):
            return getattr(module, name)
    if hasattr(module, "to_out"):  # model_unet's CrossAttention: to_out = (Linear,)
        return module.to_out[0]
    return module.net[2]  # model_unet's FeedForward: (GEGLU, Identity, Linear)


@torch.no_grad()
def merged_state_dict(model):
    """
    The plain state dict (the base model's keys) that computes what `model`, patched by
    dmp.patch, computes. LoRA: W + (alpha / r) B A; DiffFit: gamma * (W x + b) = (gamma W) x +
    gamma b on the layer whose output gamma scales; BitFit and full fine-tuning: the weights as
    they are. Each merged weight is computed in float64 and rounded once to its own dtype. DMP and
    prompt tuning raise CheckpointError: their prompts, weighted per timestep, are no weight.
    """
    method = getattr(model, "patch_method", None)
    if method in ("dmp", "prompt") or getattr(model, "block_input", None) is not None:
        raise CheckpointError(f"a {method} patch adds prompts weighted per timestep before every "
                              f"block, which no plain model holds: use it with sample.py or "
                              f"load.load_model, not as plain weights")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()
             if ".lora_" not in k and not k.endswith(".gamma")}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if hasattr(module, "lora_A"):
            delta = module.lora_B.weight.double() @ module.lora_A.weight.double()
            weight = module.weight.double() + delta * module.lora_scale
            state[prefix + "weight"] = weight.to(module.weight.dtype)
        if hasattr(module, "gamma"):
            linear = output_linear(module)
            key = prefix + next(n for n, m in module.named_modules() if m is linear)
            key = key.rstrip(".")
            gamma = module.gamma.double()
            for part in ("weight", "bias"):
                if f"{key}.{part}" in state:
                    value = state[f"{key}.{part}"]
                    scaled = value.double() * (gamma[:, None] if part == "weight" else gamma)
                    state[f"{key}.{part}"] = scaled.to(value.dtype)
    return state


#################################################################################
#                       DiT: the official checkpoint layout                     #
#################################################################################

def official_call(config):
    """The official DiT's constructor call for `config` (what the exported file loads into)."""
    for name, arch in CONFIGS.items():
        if all(config[k] == v for k, v in arch.items()) and config["mlp_ratio"] == 4.0:
            rest = {k: v for k, v in config.items() if k not in arch and k != "text_dim"}
            return f"DiT_models[{name!r}]({', '.join(f'{k}={v!r}' for k, v in rest.items())})"
    args = ", ".join(f"{k}={v!r}" for k, v in config.items() if k != "text_dim")
    return f"DiT({args})"


def export_dit(src, out, patch=None, num_heads=None):
    """A DiT (load.load_model of `src`, `patch`) written to `out` as a plain state dict."""
    refuse_existing(out)
    model = load.load_model(src, patch, num_heads=num_heads)
    if model.text_dim:
        raise CheckpointError(f"{src} is a text-to-image DiT, which the official DiT (labels only) "
                              f"cannot build: use it with sample.py")
    atomic_save(merged_state_dict(model), out)
    return model.config


#################################################################################
#                  Stable Diffusion: an ldm file or a diffusers folder          #
#################################################################################

def ldm_entries(base, unet_state):
    """
    An ldm single file's entries: the merged UNet as model.diffusion_model.*, the VAE and text
    encoder from the base (an ldm file as it is, without its model_ema.* copy of the unpatched
    UNet; a diffusers folder's vae/ as first_stage_model.* in ldm names, its text_encoder/ as
    cond_stage_model.transformer.*).
    """
    base = Path(str(base))
    if base.is_dir():
        vae = vae_state_dict(read_state_dict(diffusers_file(base, "vae", (
            "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"))))
        text = read_state_dict(diffusers_file(base, "text_encoder", (
            "model.safetensors", "pytorch_model.bin")))
        entries = {**{f"first_stage_model.{k}": v for k, v in vae.items()},
                   **{f"cond_stage_model.transformer.{k}": v for k, v in text.items()}}
    else:
        entries = read_state_dict(base)
        entries = entries["state_dict"] if isinstance(entries.get("state_dict"), dict) else entries
        entries = {k: v for k, v in entries.items() if torch.is_tensor(v)
                   and not k.startswith(("model.diffusion_model.", "model_ema."))}
    return {**{f"model.diffusion_model.{k}": v for k, v in unet_state.items()}, **entries}


def diffusers_unet(base, unet_state, num_res_blocks):
    """The merged UNet under the base folder's own unet/ keys, shapes and dtype."""
    names = read_state_dict(diffusers_file(base, "unet", _DIFFUSERS_FILES))
    ldm = diffusers_to_ldm({k: k for k in names}, num_res_blocks)  # ldm key -> diffusers key
    return {d: unet_state[k].reshape(names[d].shape).to(names[d].dtype).contiguous()
            for k, d in ldm.items()}


def export_sd(src, out, model="sd15", patch=None, fmt="ldm"):
    """An SD UNet (load.load_model of `src`, `patch`), merged, with its base's VAE and text
    encoder: an ldm single file (.safetensors, or .ckpt/.pt as {'state_dict'}) or a diffusers
    folder (the base must be one)."""
    from safetensors.torch import save_file
    config = load.SD_MODELS[model]["unet"]
    base = src if patch else load.sd_base(src)  # where the VAE and text encoder come from
    out = Path(out)
    refuse_existing(out)
    if fmt == "diffusers" and not Path(str(base)).is_dir():
        raise CheckpointError(f"{base} is a single file: a diffusers folder is written from a "
                              f"diffusers base (its configs, tokenizer and scheduler), so export "
                              f"--format ldm, or give a diffusers base")
    state = merged_state_dict(load.load_model(src, patch, config))
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "ldm":
        entries = {k: v.contiguous() for k, v in ldm_entries(base, state).items()}
        if out.suffix != ".safetensors":
            atomic_save(dict(state_dict=entries), out)
            return
        tmp = out.with_name(out.name + ".tmp")
        try:
            save_file(entries, tmp)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + "."))
    try:
        shutil.copytree(base, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            "diffusion_pytorch_model*"))  # every unet/ file but the weights (vae's are copied next)
        for f in Path(base, "vae").glob("diffusion_pytorch_model*"):
            shutil.copy2(f, tmp / "vae" / f.name)
        save_file(diffusers_unet(base, state, config["num_res_blocks"]),
                  tmp / "unet" / "diffusion_pytorch_model.safetensors")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def refuse_existing(out):
    """Nothing is overwritten: an `out` that exists is refused in one sentence."""
    if Path(out).exists():
        raise CheckpointError(f"{out} exists: export to a new name (nothing is overwritten)")


#################################################################################
#                                     main                                      #
#################################################################################

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="a run folder, a checkpoint or a patch (load.load_model)")
    p.add_argument("--patch", help="a patch file to apply to ckpt first")
    p.add_argument("--out", required=True, help="the file (DiT, SD ldm) or folder (diffusers)")
    p.add_argument("--model", choices=list(load.SD_MODELS),
                   help="Stable Diffusion: its UNet config (default: a DiT)")
    p.add_argument("--format", choices=["ldm", "diffusers"], default="ldm",
                   help="SD: an ldm single file or a diffusers folder")
    p.add_argument("--num-heads", type=int, help="a DiT state dict that records no config and "
                   "has no official width: its head count")
    args = p.parse_args(argv)
    try:
        if args.model:
            export_sd(args.ckpt, args.out, args.model, args.patch, args.format)
            print(f"wrote {args.out} ({args.format})")
        else:
            config = export_dit(args.ckpt, args.out, args.patch, args.num_heads)
            call = official_call(config)
            again = "" if call.startswith("DiT_models") else (
                f"; this project, with --num-heads {config['num_heads']} (a plain state dict does "
                f"not record it)")
            print(f"wrote {args.out}: the official DiT loads it with {call}{again}")
    except CheckpointError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
