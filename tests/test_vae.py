"""model_vae.py against CompVis ldm's Encoder/Decoder: outputs in both checkpoint layouts, full-size keys, loading."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import model_vae
from checkpoints import CheckpointError
from conftest import rel_err
from model_vae import SCALE_FACTOR, SD_VAE_CONFIG, AutoencoderKL, diffusers_to_ldm, load_vae, vae_state_dict


GOLDEN = Path(__file__).parent / "golden"
OLD_SPELLING = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}


def read_tsv(name):
    rows = [line.split("\t") for line in (GOLDEN / name).read_text().splitlines()]
    return [r for r in rows if r[0] not in ("diffusers_key", "key")]


@pytest.fixture(scope="module")
def golden():
    f = safe_open(str(GOLDEN / "vae_tiny.safetensors"), "pt")
    ldm = {k[len("ldm."):]: f.get_tensor(k) for k in f.keys() if k.startswith("ldm.")}
    data = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("ldm.")}
    return json.loads(f.metadata()["ldm_ddconfig"]), ldm, data


def to_diffusers(ldm, spelling="new"):
    """The golden weights renamed to diffusers keys through the reference table (attention convs -> Linear)."""
    out = {}
    for d_key, d_shape, l_key, _ in read_tsv("vae_tiny.diffusers_to_ldm.tsv"):
        if spelling == "old":
            for new, old in OLD_SPELLING.items():
                d_key = d_key.replace(new, old)
        out[d_key] = ldm[l_key].reshape(eval(d_shape)).clone()
    return out


def check_outputs(vae, data):
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(data["image"]))
        mean, std = vae.encode(data["image"])
        decoded = vae.decode(data["z"])
    assert rel_err(moments, data["moments"]) <= 1e-5
    assert rel_err(decoded, data["decoded"]) <= 1e-5
    ref_mean, ref_logvar = data["moments"].chunk(2, dim=1)
    assert rel_err(mean, ref_mean) <= 1e-5
    assert rel_err(std, torch.exp(0.5 * ref_logvar.clamp(-30, 20))) <= 1e-5


def test_tiny_vae_equals_ldm(golden, tmp_path):
    config, ldm, data = golden
    save_file(ldm, str(tmp_path / "sd_like.safetensors"))  # keys `first_stage_model.*`, as in an SD checkpoint
    vae = load_vae(tmp_path / "sd_like.safetensors", config=config)
    check_outputs(vae, data)
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


@pytest.mark.parametrize("spelling", ["new", "old"])
def test_tiny_vae_diffusers_layout(golden, tmp_path, spelling):
    config, ldm, data = golden
    save_file(to_diffusers(ldm, spelling), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    check_outputs(load_vae(tmp_path / "diffusion_pytorch_model.safetensors"), data)  # config from the shapes


def test_renaming_matches_reference_table():
    for d_key, _, l_key, _ in read_tsv("vae_tiny.diffusers_to_ldm.tsv"):
        ldm_key = l_key[len("first_stage_model."):]
        assert diffusers_to_ldm(d_key, num_levels=3) == ldm_key
        for new, old in OLD_SPELLING.items():
            assert diffusers_to_ldm(d_key.replace(new, old), num_levels=3) == ldm_key


def test_sd_checkpoint_with_unet_and_state_dict_key(golden, tmp_path):
    config, ldm, data = golden
    ckpt = {"state_dict": {**ldm, "model.diffusion_model.out.0.weight": torch.zeros(3),
                           "cond_stage_model.transformer.x": torch.zeros(2)}, "global_step": 470000}
    torch.save(ckpt, tmp_path / "sd-v1-4.ckpt")
    check_outputs(load_vae(tmp_path / "sd-v1-4.ckpt"), data)
    bare = {k[len("first_stage_model."):]: v.half() for k, v in ldm.items()}  # as vae-ft-mse-840000-ema-pruned.ckpt
    torch.save({"state_dict": {**bare, "loss.logvar": torch.zeros(())}}, tmp_path / "vae-ft-mse-original.ckpt")
    vae = load_vae(tmp_path / "vae-ft-mse-original.ckpt")
    assert vae.decoder.conv_in.weight.dtype == torch.float32
    with torch.no_grad():
        assert rel_err(vae.decode(data["z"]), data["decoded"]) <= 1e-2  # float16 weights: only roughly equal


def test_official_name_uses_cache(golden, tmp_path, monkeypatch):
    config, ldm, data = golden
    monkeypatch.setenv("DMP_CACHE", str(tmp_path))  # a cached file is used as is: no download
    save_file(to_diffusers(ldm, "old"), str(tmp_path / "sd-vae-ft-ema.safetensors"))
    check_outputs(load_vae("ema"), data)
    assert load_vae("none") is None and load_vae(None) is None
    urls = []
    def offline_but_bin(url, filename):  # no .safetensors on the hub: the .bin is fetched instead
        urls.append(url)
        if url.endswith(".safetensors"):
            raise CheckpointError(f"could not download {url}")
        torch.save(to_diffusers(ldm), tmp_path / filename)
        return tmp_path / filename
    monkeypatch.setattr(model_vae, "download", offline_but_bin)
    check_outputs(load_vae("mse"), data)
    assert urls == [f"https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/diffusion_pytorch_model.{ext}"
                    for ext in ("safetensors", "bin")]


def test_full_size_keys_shapes_count():
    with torch.device("meta"):
        vae = AutoencoderKL(SD_VAE_CONFIG)
    ours = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    ldm = {k[len("first_stage_model."):]: eval(s) for k, s, _ in read_tsv("sd_vae_ldm.keys.tsv")}
    assert list(ours) == list(ldm) and ours == ldm
    diffusers = {k: torch.empty(eval(s), device="meta") for k, s, _ in read_tsv("sd_vae_diffusers.keys.tsv")}
    renamed = {k: tuple(v.shape) for k, v in vae_state_dict(diffusers).items()}
    assert renamed == ours
    count = json.loads((GOLDEN / "param_counts_sd.json").read_text())["sd_vae"]
    assert sum(p.numel() for p in vae.parameters()) == count == 83653863
    assert SCALE_FACTOR == 0.18215


def test_wrong_file_gives_one_sentence(golden, tmp_path):
    config, ldm, data = golden
    broken = {k: v for k, v in ldm.items() if "decoder.mid.attn_1" not in k}
    broken["first_stage_model.extra.weight"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_vae(tmp_path / "broken.safetensors")
    msg = str(e.value)
    assert "broken.safetensors" in msg and "missing decoder.mid.attn_1" in msg and "(10)" in msg
    assert "unexpected extra.weight (1)" in msg and "\n" not in msg
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(CheckpointError, match="notes.txt"):
        load_vae(tmp_path / "notes.txt")
