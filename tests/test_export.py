"""
Files other tools open: train.py's checkpoints in the official DiT's find_model, export.py's plain weights
(official DiT layout, ldm single file, diffusers folder) loaded the way that code loads them, with the
output this project computes; a state dict whose head count is unknown; a diffusers base's hash.
"""
import copy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dmp
import export
import load
import train
from checkpoints import CheckpointError, read_state_dict
from conftest import rel_err
from model_dit import DiT, load_checkpoint
from model_unet import SD_TINY, UNetModel

GOLDEN = Path(__file__).parent / "golden"
PREFIX = "model.diffusion_model."
U32 = 2.0 ** -24  # float32's unit roundoff
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
            num_classes=10, class_dropout_prob=0.1, learn_sigma=True)


def official_find_model(path):
    """
    The official DiT's find_model (download.py) on a local file, restated: the file read (here with
    weights_only), its "ema" entry if it has one, else the dict itself. Its sample.py then calls
    model.load_state_dict on that, strict.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "ema" in checkpoint:
        checkpoint = checkpoint["ema"]
    return checkpoint


def official_dit(path, config):
    model = DiT(**config)
    model.load_state_dict(official_find_model(path))  # strict, as the official sample.py
    return model.eval()


def dit_inputs(config, n=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, config["in_channels"], config["input_size"], config["input_size"], generator=g)
    return x, torch.tensor([3, 400, 999][:n]), torch.tensor([0, 1, 0][:n]) % config["num_classes"]


def out(model, inputs):
    with torch.no_grad():
        return model.eval()(*inputs)


def randomised(model, scale=0.1):
    """Every trainable weight drawn (DiT's zero-initialised adaLN and output layer give an output of 0)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


FAST = ["--dataset", "digits", "--batch-size", "16", "--sample-every", "0", "--eval-every", "0", "--device", "cpu",
        "--log-every", "1", "--iterations", "2", "--ckpt-every", "2", "--lr", "1e-2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """
    A pretraining run without EMA and a --method full run from it, exported as a plain state dict (the digits
    DiT's width is no official one: --num-heads): their last checkpoints.
    """
    tmp = tmp_path_factory.mktemp("runs")
    train.main(FAST + ["--ema", "0", "--results-dir", str(tmp / "base")])
    base = load.checkpoints(next((tmp / "base").iterdir()))[-1]
    export.main([str(base), "--out", str(tmp / "plain.pt")])
    train.main(FAST + ["--init", str(tmp / "plain.pt"), "--num-heads", "4", "--method", "full",
                       "--results-dir", str(tmp / "full")])
    return base, load.checkpoints(next((tmp / "full").iterdir()))[-1]


def test_checkpoints_without_ema_and_of_full_fine_tuning_open_in_the_official_find_model(runs, tmp_path):
    for ckpt in runs:
        entries = read_state_dict(ckpt)
        model = load.load_model(ckpt)
        assert entries["config"] == model.config  # every checkpoint records its config
        inputs = dit_inputs(model.config)
        assert torch.equal(out(official_dit(ckpt, entries["config"]), inputs), out(model, inputs))
        # ema and the weights beside it are the same tensors, written once
        plain = torch.load(ckpt, map_location="cpu", weights_only=True)
        beside = plain.get("model") or plain["state"]
        assert all(plain["ema"][k].data_ptr() == v.data_ptr() for k, v in beside.items())
    base, full = runs
    assert read_state_dict(base)["weights"] == "raw" and "pos_embed" in read_state_dict(full)["ema"]
    # the run recorded the head count its plain base lacks: its checkpoint loads without --num-heads
    assert read_state_dict(full)["config"]["num_heads"] == 4
    # the full run moved the weights: its file is not its base's
    assert not torch.equal(out(load.load_model(full), inputs), out(load.load_model(base), inputs))
    export.main([str(full.parents[1]), "--out", str(tmp_path / "full.pt")])  # a run folder
    assert torch.equal(out(official_dit(tmp_path / "full.pt", entries["config"]), inputs), out(model, inputs))


def test_a_state_dict_without_config_loads_only_where_its_head_count_is_known(tmp_path):
    torch.manual_seed(0)
    digits = randomised(DiT(**dict(TINY, hidden_size=64, num_heads=4)))  # 64 wide: no official width
    torch.save(digits.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="--num-heads") as e:
        load.load_model(tmp_path / "plain.pt")
    assert "\n" not in str(e.value) and "plain.pt" in str(e.value)
    inputs = dit_inputs(TINY)
    loaded = load.load_model(tmp_path / "plain.pt", num_heads=4)
    assert loaded.config == digits.config and torch.equal(out(loaded, inputs), out(digits, inputs))
    with pytest.raises(SystemExit, match="--num-heads"):  # the commands say it in one sentence too
        export.main([str(tmp_path / "plain.pt"), "--out", str(tmp_path / "out.pt")])
    export.main([str(tmp_path / "plain.pt"), "--num-heads", "4", "--out", str(tmp_path / "out.pt")])
    assert torch.equal(out(official_dit(tmp_path / "out.pt", digits.config), inputs), out(digits, inputs))
    # the old guess, hidden // 64 = 1 head, is another model
    assert (out(load.load_model(tmp_path / "plain.pt", num_heads=1), inputs) - out(digits, inputs)).abs().max() > 1e-2
    # an official width (DiT-S: 384, 6 heads) needs no flag
    small = DiT(**dict(TINY, patch_size=8, hidden_size=384, depth=1, num_heads=6))
    torch.save(small.state_dict(), tmp_path / "s.pt")
    assert load_checkpoint(str(tmp_path / "s.pt")).config["num_heads"] == 6


@pytest.mark.parametrize("method", ["lora", "difffit", "bitfit"])
def test_merged_dit_export_loads_in_the_official_layout_and_computes_the_patched_model(method, tmp_path):
    torch.manual_seed(0)
    base = randomised(DiT(**TINY))
    torch.save(dict(ema=base.state_dict(), config=base.config), tmp_path / "base.pt")
    patched = load.load_model(tmp_path / "base.pt")
    options = dict(rank=4) if method == "lora" else {}
    dmp.patch(patched, method, **options)
    with torch.no_grad():  # what training would have moved: LoRA's B, DiffFit's gammas, the biases
        for p in (p for p in patched.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape) * 0.3)
    load.save_patch(patched, tmp_path / "patch.pt", base=tmp_path / "base.pt")
    export.main([str(tmp_path / "patch.pt"), "--out", str(tmp_path / "plain.pt")])
    exported = official_dit(tmp_path / "plain.pt", TINY)
    inputs = dit_inputs(TINY)
    want = out(patched, inputs)
    # float32: each merged weight is rounded once (relative error <= u) where the patched model rounds W x and
    # the adapter's term apart; a dot product of n terms errs by <= n u relative to sum |w x| (Higham, Thm 3.5),
    # with n <= 4 * 32 (the MLP's width), over the 2 * depth + 1 layers an error passes through on its way out.
    tol = 4 * 32 * U32 * (2 * TINY["depth"] + 1)
    assert rel_err(out(exported, inputs), want) < tol
    assert rel_err(out(base, inputs), want) > 100 * tol  # the patch matters far beyond that
    # float64: the merge itself is exact arithmetic, so the two agree to float64's rounding (~1e-16 per step)
    merged64 = DiT(**TINY).double().eval()
    merged64.load_state_dict(export.merged_state_dict(patched.double()))
    inputs64 = tuple(v.double() if v.is_floating_point() else v for v in inputs)
    assert rel_err(out(merged64, inputs64), out(patched, inputs64)) < 4 * 32 * 2.0 ** -53 * (2 * TINY["depth"] + 1)


@pytest.mark.parametrize("method", ["dmp", "prompt"])
def test_dmp_and_prompt_patches_are_refused_in_one_sentence(method, tmp_path):
    torch.manual_seed(0)
    model = DiT(**TINY)
    torch.save(dict(ema=model.state_dict(), config=model.config), tmp_path / "base.pt")
    dmp.patch(model, method)
    load.save_patch(model, tmp_path / "patch.pt", base=tmp_path / "base.pt")
    with pytest.raises(SystemExit) as e:
        export.main([str(tmp_path / "patch.pt"), "--out", str(tmp_path / "plain.pt")])
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value) and "no plain model" in str(e.value)
    assert not (tmp_path / "plain.pt").exists()


#################################################################################
#                      Stable Diffusion: ldm file, diffusers folder             #
#################################################################################

def read_tsv(name):
    return [line.split("\t") for line in (GOLDEN / name).read_text().splitlines()][1:]


@pytest.fixture(scope="module")
def sd_bases(tmp_path_factory):
    """The golden tiny SD (UNet, VAE, a CLIP of that width) as an ldm single file and as a diffusers folder."""
    from model_clip import CLIP_TINY, CLIPTextModel
    tmp = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    text = {f"text_model.{k}": v for k, v in CLIPTextModel(**CLIP_TINY).state_dict().items()}
    ldm = {f"cond_stage_model.transformer.{k}": v for k, v in text.items()}
    for name in ("unet_tiny", "vae_tiny"):
        with safe_open(GOLDEN / f"{name}.safetensors", "pt") as f:
            ldm.update({k[len("ldm."):]: f.get_tensor(k) for k in f.keys() if k.startswith("ldm.")})
    save_file(ldm, tmp / "sd.safetensors")
    folder = tmp / "sd"
    for part, tsv in (("unet", "unet_tiny"), ("vae", "vae_tiny")):
        (folder / part).mkdir(parents=True)
        tensors = {d: ldm[k].reshape(eval(s)) for d, s, k, _ in read_tsv(f"{tsv}.diffusers_to_ldm.tsv")}
        save_file(tensors, folder / part / "diffusion_pytorch_model.safetensors")
        (folder / part / "config.json").write_text("{}")
    (folder / "text_encoder").mkdir()
    save_file(text, folder / "text_encoder" / "model.safetensors")
    (folder / "model_index.json").write_text("{}")
    return tmp / "sd.safetensors", folder


def unet_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900]), torch.randn(2, 5, 32, generator=g)


def lora_patch(base, path):
    """A LoRA patch of the tiny UNet on `base`, its factors drawn (B = 0 would change nothing)."""
    unet = load.load_model(base, unet_config=SD_TINY)
    dmp.patch(unet, "lora", rank=2)
    with torch.no_grad():
        for p in (p for p in unet.parameters() if p.requires_grad):
            p.normal_(0, 1.0)
    load.save_patch(unet, path, base=base)
    return unet.eval()


def test_sd_lora_exports_as_an_ldm_file_and_a_diffusers_folder(sd_bases, tmp_path):
    single, folder = sd_bases
    inputs = unet_inputs()
    # float32, as for the DiT: n <= 9 * 64 terms per dot product (a 3x3 convolution of 64 channels), through
    # at most 40 layers (conv_in, 3 levels down of 2 ResBlocks with 2 convolutions and a transformer each,
    # the middle, 4 levels up of 3, conv_out)
    tol = 9 * 64 * U32 * 40
    # ldm (CompVis' load_model_from_config): torch.load(ckpt)["state_dict"], or a flat .safetensors, the UNet
    # under model.diffusion_model. in a UNetModel of SD's config (here: the golden tiny ldm one), from either base
    golden = load_file(single)
    for base, name in ((single, "sd.ckpt"), (folder, "sd.safetensors")):
        patch = tmp_path / f"{'folder' if base == folder else 'file'}.patch.pt"
        want = out(lora_patch(base, patch), inputs)
        export.main([str(patch), "--model", "sd-tiny", "--out", str(tmp_path / name)])
        sd = load_file(tmp_path / name) if name.endswith("safetensors") else torch.load(
            tmp_path / name, weights_only=True)["state_dict"]
        unet = UNetModel(**SD_TINY)
        unet.load_state_dict({k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)})
        assert rel_err(out(unet, inputs), want) < tol
        assert sd.keys() == golden.keys()  # VAE and text encoder under SD's names, nothing else
        assert all(torch.equal(sd[k], golden[k].reshape(sd[k].shape)) for k in sd if not k.startswith(PREFIX))
    assert rel_err(out(load.load_model(single, unet_config=SD_TINY), inputs), want) > 100 * tol
    # diffusers (UNet2DConditionModel.from_pretrained): unet/diffusion_pytorch_model.safetensors under its own
    # names, which the golden map (made by diffusers' conversion) takes to ldm's
    export.main([str(tmp_path / "folder.patch.pt"), "--model", "sd-tiny", "--format", "diffusers",
                 "--out", str(tmp_path / "merged")])
    rows = read_tsv("unet_tiny.diffusers_to_ldm.tsv")
    written = load_file(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors")
    assert sorted(written) == sorted(d for d, *_ in rows)
    unet = UNetModel(**SD_TINY)
    unet.load_state_dict({k[len(PREFIX):]: written[d].reshape(eval(s)) for d, _, k, s in rows})
    assert rel_err(out(unet, inputs), want) < tol
    for f in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "model_index.json",
              "unet/config.json"):
        assert (tmp_path / "merged" / f).read_bytes() == (folder / f).read_bytes()
    with pytest.raises(SystemExit, match="from a diffusers base"):  # an ldm base has no configs to copy
        export.main([str(tmp_path / "file.patch.pt"), "--model", "sd-tiny", "--format", "diffusers",
                     "--out", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="exists"):  # nothing is overwritten
        export.main([str(tmp_path / "folder.patch.pt"), "--model", "sd-tiny", "--out", str(tmp_path / "sd.ckpt")])


@pytest.mark.parametrize("method", ["difffit", "bitfit"])
def test_difffit_and_bitfit_merge_into_the_sd_unet(method):
    """The UNet's DiffFit gammas (self-, cross-attention, feed-forward) and BitFit's biases, merged in memory."""
    with safe_open(GOLDEN / "unet_tiny.safetensors", "pt") as f:
        ldm = {k[len("ldm." + PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith("ldm.")}
    with torch.device("meta"):
        base = UNetModel(**SD_TINY)
    base.load_state_dict(ldm, assign=True)
    patched, merged = copy.deepcopy(base), copy.deepcopy(base)
    dmp.patch(patched, method)
    with torch.no_grad():
        for p in (p for p in patched.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    merged.load_state_dict(export.merged_state_dict(patched))  # strict: the base's keys exactly
    inputs = unet_inputs()
    want = out(patched, inputs)
    tol = 9 * 64 * U32 * 40  # as for LoRA above
    assert rel_err(out(merged, inputs), want) < tol and rel_err(out(base, inputs), want) > 100 * tol


def test_a_patch_on_a_diffusers_folder_checks_the_folder_weights(sd_bases, tmp_path):
    _, folder = sd_bases
    base = tmp_path / "base"
    shutil.copytree(folder, base)
    lora_patch(base, tmp_path / "patch.pt")
    recorded = read_state_dict(tmp_path / "patch.pt")["base"]["sha256"]
    assert recorded is not None and len(recorded) == 64
    load.load_model(tmp_path / "patch.pt", unet_config=SD_TINY)  # the same folder: applied
    (base / "model_index.json").write_text('{"a": 1}')  # not a weight file: the same base
    load.load_model(tmp_path / "patch.pt", unet_config=SD_TINY)
    vae = base / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(vae)
    tensors["encoder.conv_in.bias"] = tensors["encoder.conv_in.bias"] + 1
    save_file(tensors, vae)
    with pytest.raises(CheckpointError, match="allow-base-mismatch") as e:
        load.load_model(tmp_path / "patch.pt", unet_config=SD_TINY)
    assert "\n" not in str(e.value)
