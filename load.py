"""
Loading: every way of naming a model, resolved to a ready one, in the one place train.py,
sample.py, bench.py and study.py read it from.

    an official name   DiT-XL-2-256x256.pt: downloaded once into the cache (checkpoints.py)
    a checkpoint       a DiT file (the official layout or train.py's); with an SD config, an SD 1.x
                       single file or diffusers folder
    a patch            save_patch's file, or the checkpoint of a further-training run: both
                       name their base, by path and sha256, and are applied to it
    a run folder       train.py's runs/NNN-.../: its last checkpoint

load_model(name, patch) gives the model; a patch on a base other than the one it was trained on
is refused. Also here: patch files, written (save_patch: what the method trained, and the base by
name, path and sha256) and read (apply_patch); the settings train.py recorded with a model (noise
schedule, VAE, text encoder); Stable Diffusion's three parts; the frozen CLIP text encoders.
"""
import hashlib
from pathlib import Path

import dmp
from checkpoints import (CheckpointError, atomic_save, cached, download, file_sha256,
                         folder_sha256, read_state_dict, read_weights)
from model_clip import CLIP_TINY, CLIP_VITL14, load_clip_text
from model_dit import OFFICIAL, DiT, load_checkpoint
from model_unet import UNet_configs, load_unet
from model_vae import load_vae

# --model: the UNet (model_unet.UNet_configs), its text encoder and its resolution. sd-tiny is the
# golden tiny UNet with a CLIP of the same width, for tests and CPU demos.
SD_MODELS = {"sd15": dict(unet=UNet_configs["sd15"], clip=CLIP_VITL14, resolution=512),
             "sd-tiny": dict(unet=UNet_configs["sd-tiny"], clip=CLIP_TINY, resolution=64)}


#################################################################################
#                      Run folders: train.py's checkpoints                      #
#################################################################################

def checkpoints(run_dir):
    """A run folder's checkpoints (checkpoints/NNNNNNN.pt), oldest first."""
    return sorted((Path(run_dir) / "checkpoints").glob("[0-9]" * 7 + ".pt"))


def resolve(name):
    """`name` itself, or for a train.py run folder its last checkpoint."""
    found = checkpoints(name) if Path(str(name)).is_dir() else []
    if found:
        return found[-1]
    return name


#################################################################################
#                  The files of one load, each opened and read once              #
#################################################################################

class Files:
    """
    The weight files one load reads, each opened once (checkpoints.read_weights): its entries, and
    its sha256 from the same bytes (a .safetensors file, which safetensors maps itself, is read
    again for it). close() lets go of the bytes.
    """
    def __init__(self):
        self.read = {}

    def entries(self, path):
        """The dict the file at `path` holds (read_state_dict's), read at the first call."""
        key = Path(path).resolve()
        if key not in self.read:
            self.read[key] = read_weights(path)
        return self.read[key][0]

    def sha256(self, path):
        """The file's sha256: from the bytes read if it was read, else from one read of it."""
        _, mapped = self.read.get(Path(path).resolve(), (None, None))
        if mapped is None:
            return file_sha256(path)
        return hashlib.sha256(mapped).hexdigest()

    def settings(self, *paths):
        """noise_schedule / vae / text_encoder that train.py recorded in those of `paths` that
        are files (later ones win)."""
        found = {}
        for path in paths:
            if path and Path(str(path)).is_file() and Path(str(path)).suffix != ".safetensors":
                entries = self.entries(path)
                found.update({k: entries[k] for k in ("noise_schedule", "vae", "text_encoder")
                              if isinstance(entries.get(k), str)})
        return found

    def close(self):
        for _, mapped in self.read.values():
            if mapped is not None:
                mapped.close()
        self.read.clear()


#################################################################################
#                          A patch and the base it names                        #
#################################################################################

def base_file(base):
    """
    The file a base checkpoint's name loads from: the path itself, or for an official DiT name its
    file in the download cache. None for a folder (a diffusers SD base) or a file that is not there.
    """
    path = Path(str(base)).expanduser()
    if not path.exists() and str(base) in OFFICIAL:
        path = cached(OFFICIAL[str(base)])
    if path.is_file():
        return path
    return None


def base_record(base, files=None):
    """
    What a patch records of its base (save_patch): the name as given (an official name still
    resolves through the download cache), its absolute path (so the patch finds it from any working
    directory) and its sha256 (base_sha256; `files`: a load's Files, which read it already).
    """
    if not base:
        return dict(name=None, path=None, sha256=None)
    path = base_file(base) or Path(str(base)).expanduser()
    record = dict(name=str(base), path=None, sha256=None)
    if path.exists():
        record.update(path=str(path.resolve()), sha256=base_sha256(base, files))
    return record


def base_sha256(base, files=None):
    """
    The sha256 a base is recorded and checked by: its file's (`files`: from a load's one read), or
    for a folder (a diffusers SD base) checkpoints.folder_sha256, the hash of its weight files.
    None for a name that is not there.
    """
    file = base_file(base)
    if file:
        return (files or Files()).sha256(file)
    path = Path(str(base)).expanduser()
    return folder_sha256(path) if path.is_dir() else None


def recorded_base(entries):
    """
    The base a patch or further-training checkpoint (its `entries`) names: the recorded absolute
    path while it exists, else the name as given. None for a file that is not a patch or names no
    base.
    """
    if not is_patch(entries):
        return None
    base = entries.get("base") or {}
    if base.get("path") and Path(base["path"]).exists():
        return base["path"]
    return base.get("name")


def check_base(entries, path, base, allow_base_mismatch=False, files=None):
    """
    A patch (`entries`, read from `path`) that recorded its base's sha256 applied to `base`: the
    two (files, or folders' weights) must agree, else CheckpointError, or with allow_base_mismatch
    a warning.
    """
    recorded = (entries.get("base") or {}).get("sha256")
    actual = (base_sha256(base, files) if base and recorded else None) or recorded
    if actual == recorded:
        return
    problem = (f"{path} was trained on a base with sha256 {recorded[:12]}..., and {base} is "
               f"another checkpoint (sha256 {actual[:12]}...)")
    if not allow_base_mismatch:
        raise CheckpointError(f"{problem}: give the base it was trained on, or "
                              f"--allow-base-mismatch to apply it anyway")
    print(f"warning: {problem}; applied anyway (--allow-base-mismatch)")


def is_patch(entries):
    """
    Whether a weight file's entries are a patch: save_patch's file, or the checkpoint of a
    further-training run, which holds the same entries (the one test of it).
    """
    return {"method", "state"} <= set(entries)


def patch_entries(model, base, **extra):
    """
    A patch's entries: what the method trained (dmp.trainable_state_dict), the method, its options,
    the model's config and `base` (base_record's), with `extra` entries alongside (train.py records
    its noise_schedule and vae). train.py's checkpoints of a further-training run hold these too.
    """
    return dict(method=model.patch_method, options=model.patch_options, base=base,
                config=getattr(model, "config", None), state=dmp.trainable_state_dict(model),
                **extra)


def save_patch(model, path, base=None, **extra):
    """
    Write patch_entries atomically, `base` (a path or an official name) recorded by base_record.
    Returns (patch bytes, backbone bytes): a DMP patch of DiT-L/2 is ~26 MB, the backbone it
    patches 1.8 GB, which is the paper's storage argument.
    """
    entries = patch_entries(model, base_record(base), **extra)
    atomic_save(entries, path)
    backbone = sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
                   if k not in entries["state"])
    return Path(path).stat().st_size, backbone


def apply_patch(model, path, base=None, allow_base_mismatch=False, files=None):
    """
    Patch a base model in place with a patch file: the method's modules rebuilt (dmp.patch), then
    its weights loaded. If `base` is the file the model came from and the patch recorded its base's
    sha256, they must agree (check_base). `files`: a load's Files (each file read once).
    """
    entries = (files or Files()).entries(path)
    if not is_patch(entries):
        raise CheckpointError(f"{path}: not a patch file (no 'method' and 'state' entries)")
    check_base(entries, path, base, allow_base_mismatch, files)
    dmp.patch(model, entries["method"], **entries.get("options", {}))
    expected, got = set(dmp.trainable_state_dict(model)), set(entries["state"])
    if expected != got:
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        raise CheckpointError(f"{path} does not fit this model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    model.load_state_dict(entries["state"], strict=False)
    return model


#################################################################################
#                              Any name to a model                              #
#################################################################################

def load_model(name_or_path, patch_path=None, unet_config=None, allow_base_mismatch=False,
               num_heads=None):
    """open_model's model (what sample.py, study.py, export.py and digits_fid.py use)."""
    return open_model(name_or_path, patch_path, unet_config, allow_base_mismatch, num_heads)[0]


def open_model(name_or_path, patch_path=None, unet_config=None, allow_base_mismatch=False,
               num_heads=None, record=False):
    """
    (model, found): an official name or a DiT checkpoint (model_dit.load_checkpoint); a patch file
    or a train.py checkpoint of a further-training run (it records its base and the trained
    weights), applied to the base it names; a train.py run folder (its last checkpoint); or a base
    plus `patch_path`. With unet_config (model_unet's UNet_configs), the base is an SD UNet in any
    layout model_unet.load_unet reads; a patch of a UNet records its config, so it needs none.
    num_heads: the head count of a DiT state dict that records no config and has no official
    width. Each file is opened and read once (Files). found: `settings`, what train.py recorded in
    the base, the checkpoint and the patch (recorded_settings'); with `record`, `base`, what a
    patch of this model records of it (base_record, its sha256 from the same read).
    """
    files = Files()
    try:
        name = resolve(name_or_path)
        model = model_of(files, name, unet_config, allow_base_mismatch, num_heads)
        if patch_path:
            model = apply_patch(model, patch_path, name, allow_base_mismatch, files)
        found = dict(settings=settings_of(files, name, patch_path))
        if record:
            found["base"] = base_record(name_or_path, files)
        return model, found
    finally:
        files.close()


def model_of(files, name, unet_config=None, allow_base_mismatch=False, num_heads=None):
    """open_model's model of `name` (no run folder), its files read through `files`."""
    path = base_file(name) or Path(str(name))
    if str(name) in OFFICIAL and not path.is_file():
        path = download(OFFICIAL[str(name)])
    heads = {"num_heads": num_heads} if num_heads else {}
    if path.is_file() and not (unet_config and path.suffix == ".safetensors"):  # SD: read once
        entries = files.entries(path)
        if is_patch(entries):
            return load_patched(files, path, entries, unet_config, allow_base_mismatch, num_heads)
        if entries.get("method") and isinstance(entries.get("model"), dict):
            # DMP trained from scratch (Table 6): backbone and prompts in one state dict; the EMA
            model = DiT(**entries["config"])
            dmp.patch(model, entries["method"], **(entries.get("options") or {}))
            model.load_state_dict(entries.get("ema") or entries["model"])
            return model
        if unet_config is None:
            return load_checkpoint(name, entries=entries, **heads)
    if unet_config is not None:
        return load_unet(name, unet_config)
    return load_checkpoint(name, **heads)


def load_patched(files, path, entries, unet_config=None, allow_base_mismatch=False,
                 num_heads=None):
    """model_of a patch file (its `entries`): its recorded base, loaded, with it applied."""
    base = recorded_base(entries)
    if not base:
        raise CheckpointError(f"{path} is a patch that does not name its base checkpoint: pass "
                              f"the base as the checkpoint and this file as the patch")
    config = entries.get("config") or {}
    if "context_dim" in config:  # a UNet's patch records the UNet's config
        unet_config = config
    if not Path(str(base)).exists() and base not in OFFICIAL:
        name, where = entries["base"]["name"], entries["base"].get("path")
        where = f" (nor at {where})" if where and where != name else ""
        raise CheckpointError(f"{path} was trained on {name}, which is not there{where}: pass "
                              f"that base as the checkpoint and this file as the patch")
    # the patch records the patched model's config: the head count of a base that records none
    model = model_of(files, base, unet_config, num_heads=num_heads or config.get("num_heads"))
    return apply_patch(model, path, base, allow_base_mismatch, files)


def settings_of(files, ckpt, patch=None):
    """What train.py recorded (Files.settings) in ckpt's base if it is a patch, ckpt, the patch."""
    base = None
    if Path(str(ckpt)).is_file() and Path(str(ckpt)).suffix != ".safetensors":
        base = recorded_base(files.entries(ckpt))
    return files.settings(base, ckpt, patch)


def recorded_settings(ckpt, patch=None):
    """
    noise_schedule / vae / text_encoder that train.py recorded in the base, the checkpoint and the
    patch (later ones win).
    """
    files = Files()
    try:
        return settings_of(files, resolve(ckpt), patch)
    finally:
        files.close()


#################################################################################
#                  Text encoders and Stable Diffusion's three parts             #
#################################################################################

def load_text_encoder(path, device="cpu", config=None):
    """
    A frozen CLIP text encoder (model_clip.load_clip_text's layouts): SD's own, with its config,
    or a text-to-image DiT's --text-encoder (a diffusers folder or its text_encoder/, an SD 1.x or
    transformers file), config None: from its shapes, CLIP ViT-L/14 for the paper's COCO model.
    """
    if not path or not Path(str(path)).exists():
        raise CheckpointError(f"{path or 'no --text-encoder given'}: a text-to-image DiT needs the "
                              f"CLIP ViT-L/14 text encoder, which is not downloaded here; pass "
                              f"--text-encoder with a diffusers text_encoder folder or file, or an "
                              f"SD 1.x checkpoint")
    return load_clip_text(path, config).to(device).eval().requires_grad_(False)


def sd_base(ckpt):
    """The SD checkpoint (file or diffusers folder) behind `ckpt`: itself, or a patch's base."""
    ckpt = resolve(ckpt)
    path = Path(str(ckpt))
    if path.is_file() and path.suffix != ".safetensors":
        base = recorded_base(read_state_dict(path))
        if base:
            return base
    return ckpt


def load_sd_text_encoder(ckpt, model="sd15", device="cpu"):
    """SD's own frozen text encoder, from the SD checkpoint behind `ckpt` (sd_base)."""
    return load_text_encoder(sd_base(ckpt), device, SD_MODELS[model]["clip"])


def load_sd(ckpt, model="sd15", patch=None, device="cpu", allow_base_mismatch=False):
    """
    (unet, text_encoder, vae) of an SD 1.x single file (.safetensors/.ckpt) or diffusers folder;
    the UNet patched by `patch` (or `ckpt` is itself a patch or train.py checkpoint naming its
    base). Text encoder and VAE frozen.
    """
    base = sd_base(ckpt)
    unet = load_model(ckpt, patch, SD_MODELS[model]["unet"], allow_base_mismatch).to(device)
    text_encoder = load_sd_text_encoder(base, model, device)
    vae_file = Path(str(base))
    if vae_file.is_dir():
        found = sorted((vae_file / "vae").glob("diffusion_pytorch_model*"))
        found = [f for f in found if f.is_file()]
        if not found:
            raise CheckpointError(f"{base}: a folder without "
                                  f"vae/diffusion_pytorch_model.safetensors")
        vae_file = found[0]
    return unet, text_encoder, load_vae(vae_file, device)
