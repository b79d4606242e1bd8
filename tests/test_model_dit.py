"""model_dit.py against the official DiT: outputs, pos_embed, keys, parameter counts, checkpoint loading."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from checkpoints import CheckpointError
from conftest import rel_err
from model_dit import DiT, DiT_models, load_checkpoint


GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def golden():
    f = safe_open(str(GOLDEN / "dit_tiny.safetensors"), "pt")
    state = {k[len("state."):]: f.get_tensor(k) for k in f.keys() if k.startswith("state.")}
    data = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("state.")}
    return json.loads(f.metadata()["config"]), state, data, float(f.metadata()["cfg_scale"])


def test_tiny_dit_equals_official(golden):
    config, state, data, cfg_scale = golden
    model = DiT(**config).eval()
    assert torch.equal(model.pos_embed, state["pos_embed"])  # the sin-cos table is built identically
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = model(data["x"], data["t"], data["y"])
        cfg_out = model.forward_with_cfg(data["cfg_x"], data["cfg_t"], data["cfg_y"], cfg_scale)
    assert rel_err(out, data["out"]) <= 1e-5
    assert rel_err(cfg_out, data["cfg_out"]) <= 1e-5
    # Guidance touches the first 3 channels only by default; guide_channels=None guides all 4 eps channels.
    with torch.no_grad():
        all_out = model.forward_with_cfg(data["cfg_x"], data["cfg_t"], data["cfg_y"], cfg_scale, guide_channels=None)
    assert torch.equal(all_out[:, :3], cfg_out[:, :3]) and not torch.allclose(all_out[:, 3], cfg_out[:, 3])
    assert torch.equal(all_out[:, 4:], cfg_out[:, 4:])


def test_parameter_counts_of_all_configs():
    counts = json.loads((GOLDEN / "dit_param_counts.json").read_text())
    assert len(counts) == 36 and len(DiT_models) == 12
    for key, expected in counts.items():
        name, res, kind = key.split(" ", 2)
        kwargs = dict(input_size=int(res) // 8)
        if kind == "classes=1000":
            kwargs.update(num_classes=1000)
        else:
            kwargs.update(num_classes=1, class_dropout_prob=0.0)
        with torch.device("meta"):
            model = DiT_models[name](**kwargs)
        assert sum(p.numel() for p in model.parameters()) == expected, key


def test_xl2_keys_shapes_dtypes():
    rows = [line.split("\t") for line in (GOLDEN / "dit_xl2_256.keys.tsv").read_text().splitlines()]
    with torch.device("meta"):
        sd = DiT_models["DiT-XL/2"]().state_dict()
    assert list(sd) == [r[0] for r in rows]
    for key, shape, dtype in rows:
        assert str(tuple(sd[key].shape)) == shape and str(sd[key].dtype) == "torch." + dtype, key


def test_checkpoint_round_trip_through_a_real_file(golden, tmp_path):
    config, state, data, _ = golden
    torch.save(state, tmp_path / "official.pt")  # an official-format file: a plain state dict
    model = load_checkpoint(str(tmp_path / "official.pt"), num_heads=4).eval()
    assert model.config == config
    reference = DiT(**config).eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(model(data["x"], data["t"], data["y"]), reference(data["x"], data["t"], data["y"]))
    # A train.py checkpoint: {'model', 'ema', 'config'}; the EMA weights are the ones loaded.
    ema = {k: v + 0.01 if v.is_floating_point() and k != "pos_embed" else v for k, v in state.items()}
    torch.save(dict(model=state, ema=ema, config=config, step=3), tmp_path / "train.pt")
    loaded = load_checkpoint(str(tmp_path / "train.pt"))
    assert torch.equal(loaded.final_layer.linear.bias, ema["final_layer.linear.bias"])


def test_bad_files_give_one_line_errors(golden, tmp_path):
    config, state, _, _ = golden
    torch.save(state, tmp_path / "good.pt")
    raw = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    wrong = dict(state)
    wrong["blocks.0.attn.qkv_renamed.weight"] = wrong.pop("blocks.0.attn.qkv.weight")
    torch.save(wrong, tmp_path / "wrong.pt")

    errors = {}
    for name in ("truncated.pt", "wrong.pt"):
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(str(tmp_path / name))
        errors[name] = str(e.value)
    assert "truncated" in errors["truncated.pt"]
    assert "missing blocks.0.attn.qkv.weight" in errors["wrong.pt"]
    assert "unexpected blocks.0.attn.qkv_renamed.weight" in errors["wrong.pt"]
    # Loading a DiT-B/2 file as DiT-L/2 names the config its shapes fit.
    with torch.device("meta"):
        b2 = DiT_models["DiT-B/2"](num_classes=1, class_dropout_prob=0.0).state_dict()
    torch.save({k: torch.zeros(1).expand(v.shape) for k, v in b2.items()}, tmp_path / "b2.pt")  # 1 float on disk
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(tmp_path / "b2.pt"), model="DiT-L/2")
    errors["b2.pt"] = str(e.value)
    assert "does not fit DiT-L/2" in errors["b2.pt"] and "its shapes fit DiT-B/2" in errors["b2.pt"]
    assert all("\n" not in msg for msg in errors.values())


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"pos_embed": _RunsCode()}, f)
    # In a subprocess whose working directory would receive the file, so a run would leave evidence.
    code = ("import sys; from model_dit import load_checkpoint\n"
            "try:\n    load_checkpoint('evil.pt')\nexcept Exception as e:\n    print(type(e).__name__, e)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert out.stdout.startswith("CheckpointError") and "could run code" in out.stdout
    assert len(out.stdout.strip().splitlines()) == 1
    assert not (tmp_path / "PWNED").exists()


def test_text_dit_reads_pooled_embeddings_and_guides_against_the_null_embedding(tmp_path):
    """DiT(text_dim=...): a linear map of the pooled text embedding; a zero row is the learned null embedding."""
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, text_dim=16,
                num_classes=1, class_dropout_prob=0.0).eval()  # (labels unused: as train.py builds one)
    for p in model.parameters():  # adaLN-Zero starts at the identity: give every weight a value
        if p.requires_grad:
            p.data.normal_(0, 0.3)
    assert "y_embedder.proj.weight" in model.state_dict() and "y_embedder.null_embedding" in model.state_dict()
    x, t, text = torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 999]), torch.randn(3, 16)
    null = torch.zeros_like(text)
    with torch.no_grad():
        assert torch.equal(model.y_embedder(null), model.y_embedder.null_embedding.expand(3, -1))
        cond, uncond = model(x, t, text), model(x, t, null)
        guided = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([text, null]), 1.5)
        model.y_embedder.proj.weight.add_(1.0)  # the null rows never read the projection
        assert torch.equal(model(x, t, null), uncond) and not torch.allclose(model(x, t, text), cond)
    # (a batch of 6 against two of 3: float32 matmuls may sum in another order, ~1e-6 relative)
    assert rel_err(guided[:3, :3], uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3])) < 1e-5
    assert (cond - uncond).abs().max() > 1e-2  # the text matters
    # A plain state dict (no recorded config) is recognised as a text DiT by its shapes.
    torch.save(model.state_dict(), tmp_path / "text.pt")
    loaded = load_checkpoint(str(tmp_path / "text.pt"), num_heads=2)
    assert loaded.config == model.config and loaded.config["text_dim"] == 16


TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
            num_classes=10)


def loss_and_grads(model, seed, checkpointing):
    """One training loss (hybrid loss, DMP's balancing losses) and every trained weight's grad."""
    import dmp
    from diffusion import create_diffusion
    model.set_checkpointing(checkpointing).train()
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g)
    torch.manual_seed(seed)  # label dropout and the gate's noise: drawn once per forward
    mixtures = []
    terms = create_diffusion("", "linear").training_losses(model, x, t, dict(y=torch.arange(4), mixtures=mixtures))
    importance, load = dmp.balancing_losses(mixtures)
    loss = terms["loss"].mean() + importance + load
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("method", ["pretrain", "dmp"])
def test_checkpointing_changes_neither_loss_nor_gradients(method):
    """set_checkpointing(True): each block runs twice (forward, again in backward), same results."""
    import dmp
    torch.manual_seed(0)
    model = DiT(**TINY, class_dropout_prob=0.5)
    for name, p in model.named_parameters():  # adaLN-Zero starts at the identity: give all a value
        if name != "pos_embed":
            p.data.normal_(0, 0.3)
    if method == "dmp":
        dmp.patch(model, "dmp", **dmp.AUTHORS_CODE)  # the noisy gate: its noise must not be redrawn
        for p in model.block_input.parameters():
            p.data.normal_(0, 0.3)  # zero prompts would give the gate a zero gradient
    runs = []
    model.blocks[1].register_forward_pre_hook(lambda module, args: runs.append(1))
    plain_loss, plain = loss_and_grads(model, 5, False)
    assert len(runs) == 1
    ckpt_loss, ckpt = loss_and_grads(model, 5, True)
    assert len(runs) == 3  # the checkpointed block ran again in the backward pass
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    if method == "dmp":
        gate = ("block_input.gate.weight", "block_input.w_noise")
        assert {"block_input.prompts", *gate} <= plain.keys()
        assert all(plain[name].abs().max() > 0 for name in gate)
    for name in plain:  # (measured: bitwise equal on CPU)
        assert (ckpt[name] - plain[name]).abs().max() <= 1e-6 * plain[name].abs().max(), name
    other_loss, _ = loss_and_grads(model, 6, True)
    assert not torch.equal(other_loss, ckpt_loss)  # the seed matters: dropout, gate noise are drawn
    keys = [k for k in model.state_dict() if not k.startswith("block_input.")]
    assert keys == list(DiT(**TINY).state_dict())
