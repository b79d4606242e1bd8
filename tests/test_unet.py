"""model_unet.py against CompVis ldm's UNetModel and diffusers' UNet2DConditionModel (tests/golden/README.md)."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from checkpoints import CheckpointError
from conftest import rel_err
from model_unet import SD15, SD_TINY, UNetModel, diffusers_to_ldm, load_unet


GOLDEN = Path(__file__).parent / "golden"
PREFIX = "model.diffusion_model."


def read_tsv(name):
    return [line.split("\t") for line in (GOLDEN / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def golden():
    with safe_open(GOLDEN / "unet_tiny.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    ldm = {k[len("ldm." + PREFIX):]: v for k, v in tensors.items() if k.startswith("ldm.")}
    return tensors, ldm, json.loads(meta["ldm_params"])


def same_weights(model, ldm):
    return all(torch.equal(v, ldm[k]) for k, v in model.state_dict().items())


def run(model, g):
    with torch.no_grad():
        return model(g["x"], g["t"], g["context"])


def test_tiny_config_is_the_golden_one(golden):
    _, _, params = golden
    assert SD_TINY == {k: params[k] for k in SD_TINY}


def test_tiny_ldm_weights_load_strictly_and_match(golden):
    g, ldm, _ = golden
    model = UNetModel(**SD_TINY)
    model.load_state_dict(ldm, strict=True)
    assert rel_err(run(model, g), g["out"]) < 1e-5  # measured 6.1e-7


def test_single_file_checkpoints_load(golden, tmp_path):
    _, ldm, _ = golden
    full = {PREFIX + k: v for k, v in ldm.items()}
    full["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # the rest of an SD checkpoint is ignored
    save_file(full, tmp_path / "sd.safetensors")
    torch.save({"state_dict": full, "global_step": 1}, tmp_path / "sd.ckpt")
    for path in (tmp_path / "sd.safetensors", tmp_path / "sd.ckpt"):
        assert same_weights(load_unet(path, SD_TINY), ldm)  # the very tensors of the ldm golden, so its output


def test_diffusers_folder_loads_and_matches(golden, tmp_path):
    g, ldm, _ = golden
    rows = read_tsv("unet_tiny.diffusers_to_ldm.tsv")[1:]
    diffusers = {d: ldm[k[len(PREFIX):]].reshape(eval(ds)) for d, ds, k, _ in rows}
    (tmp_path / "unet").mkdir()
    save_file(diffusers, tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    for path in (tmp_path / "unet", tmp_path / "unet" / "diffusion_pytorch_model.safetensors"):
        assert same_weights(load_unet(path, SD_TINY), ldm)
    assert rel_err(run(load_unet(tmp_path, SD_TINY), g), g["out"]) < 1e-5  # the model root, with unet/ in it


def test_diffusers_renaming_rule_reproduces_the_tsv():
    rows = read_tsv("unet_tiny.diffusers_to_ldm.tsv")[1:]
    renamed = diffusers_to_ldm({d: d for d, _, _, _ in rows})
    assert {PREFIX + k: d for k, d in renamed.items()} == {key: d for d, _, key, _ in rows}


def test_sd15_keys_shapes_and_count_on_meta():
    with torch.device("meta"):
        model = UNetModel(**SD15)
    mine = [(PREFIX + k, str(tuple(v.shape))) for k, v in model.state_dict().items()]
    assert mine == [(k, s) for k, s, _ in read_tsv("sd15_unet_ldm.keys.tsv")]  # same keys, same order
    diffusers = {k: s for k, s, _ in read_tsv("sd15_unet_diffusers.keys.tsv")}
    assert diffusers_to_ldm(diffusers) == {k[len(PREFIX):]: s for k, s in mine}
    counts = json.loads((GOLDEN / "param_counts_sd.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == counts["sd15_unet"]
    assert len(model.block_shapes) == 25 and model.block_shapes[12] == (1280, 8)


def test_wrong_file_is_one_clear_sentence(golden, tmp_path):
    _, ldm, _ = golden
    save_file({PREFIX + k: v for k, v in ldm.items()}, tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_unet(tmp_path / "tiny.safetensors", SD15)  # a tiny UNet is not SD 1.5
    msg = str(e.value)
    assert "\n" not in msg and "tiny.safetensors" in msg and "wrong shape" in msg
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match=r"missing .*\(686\); unexpected encoder.conv_in.weight \(1\)"):
        load_unet(tmp_path / "vae.safetensors", SD15)
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model"):
        load_unet(tmp_path, SD15)  # a folder with no unet/


def test_block_input_hook_sees_every_block_input(golden):
    g, ldm, _ = golden
    model = UNetModel(**SD_TINY)
    model.load_state_dict(ldm)
    seen = []

    class Hook:
        """block_input's protocol: condition once per forward, then a call before every block."""
        def __init__(self, change=None):
            self.change = change

        def condition(self, emb, context, t):
            return None

        def __call__(self, h, i, mixture):
            seen.append((i, h.shape[1], g["x"].shape[-1] // h.shape[-1]))
            return h if self.change is None else self.change(h, i)

    model.block_input = Hook()
    assert rel_err(run(model, g), g["out"]) < 1e-5
    assert seen == [(i, c, ds) for i, (c, ds) in enumerate(model.block_shapes)]
    noise = torch.randn(g["x"].shape[0], model.block_shapes[24][0], *g["x"].shape[2:],
                        generator=torch.Generator().manual_seed(0))

    def last_decoder_block(h, i):
        return h + noise if i == 24 else h
    model.block_input = Hook(last_decoder_block)
    assert rel_err(run(model, g), g["out"]) > 0.1


def test_bfloat16_weights_run_close_to_float32(golden):
    g, ldm, _ = golden
    model = UNetModel(**SD_TINY).to(torch.bfloat16)
    model.load_state_dict(ldm)
    with torch.no_grad():
        out = model(g["x"].bfloat16(), g["t"], g["context"].bfloat16())
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), g["out"]) < 5e-2


def test_checkpointing_changes_neither_loss_nor_gradients_of_a_dmp_patched_unet():
    """set_checkpointing(True) on the tiny UNet (25 blocks), DMP, noisy gate: same results."""
    import dmp
    torch.manual_seed(0)
    model = UNetModel(**SD_TINY)
    for p in model.parameters():  # zero-initialised output convolutions would hide the blocks
        p.data.normal_(0, 0.1)
    dmp.patch(model, "dmp", prompt_grid=4, gate_cond="t+c", noisy_gate=True)
    for p in model.block_input.parameters():
        p.data.normal_(0, 0.3)  # zero prompts would give the gate a zero gradient
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
    t = torch.tensor([10, 900])
    runs = []
    model.output_blocks[3].register_forward_pre_hook(lambda module, args: runs.append(1))

    def loss_and_grads(checkpointing):
        model.set_checkpointing(checkpointing).train()
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the gate's noise, drawn once per forward outside the blocks
        mixtures = []
        loss = (model(x, t, context, mixtures=mixtures) - x).square().mean() + sum(dmp.balancing_losses(mixtures))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    plain_loss, plain = loss_and_grads(False)
    ckpt_loss, ckpt = loss_and_grads(True)
    assert len(runs) == 3  # once plain, twice checkpointed
    assert torch.equal(plain_loss, ckpt_loss)
    # 25 prompt tensors; the gate's weight, bias and block-index columns; the noise weights
    assert len(plain) == 25 + 4 and plain.keys() == ckpt.keys()
    assert all(plain[n].abs().max() > 0 for n in plain)
    for name in plain:  # (measured: bitwise equal on CPU)
        assert (ckpt[name] - plain[name]).abs().max() <= 1e-6 * plain[name].abs().max(), name
