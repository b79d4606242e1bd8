"""bench.py: the analytic FLOP count against torch's FlopCounterMode, and every row of the bench on a tiny DiT."""
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import dmp
import train
from diffusion import create_diffusion
from model_dit import CONFIGS, DiT

CONFIG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=10,
              class_dropout_prob=0.1, learn_sigma=True)


@pytest.mark.parametrize("mode", ["full", "dmp"])
def test_step_flops_match_flop_counter(mode):
    torch.manual_seed(0)
    model = DiT(**CONFIG).train()
    if mode == "dmp":
        dmp.patch(model, "dmp")
        with torch.no_grad():
            model.block_input.prompts.normal_()
    else:
        model.pos_embed.requires_grad_(False)
    diffusion, B = create_diffusion("", "linear"), 5
    x, t, y = torch.randn(B, 4, 8, 8), torch.randint(0, 1000, (B,)), torch.randint(0, 10, (B,))
    # The math backend shows attention as two bmm's; the fused CPU kernel is invisible to the counter.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward:
        terms = diffusion.training_losses(model, x, t, dict(y=y))
        importance, load = dmp.balancing_losses(model)
        loss = terms["loss"].mean() + importance + load
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as whole:
        loss.backward()
    analytic = bench.dit_flops(CONFIG, B, mode)
    assert analytic["forward"] == pytest.approx(forward.get_total_flops(), rel=0.02)
    assert analytic["input_grad"] + analytic["weight_grad"] == pytest.approx(whole.get_total_flops(), rel=0.02)


def test_dmp_step_needs_about_two_thirds_of_full_at_scale():
    config = dict(input_size=32, in_channels=4, **CONFIGS["DiT-L/2"])
    full, mop = bench.dit_flops(config, 128, "full"), bench.dit_flops(config, 128, "dmp")
    assert full["forward"] == pytest.approx(mop["forward"], rel=1e-3)
    assert full["step"] == pytest.approx(3 * full["forward"], rel=0.01)
    # DMP: forward + input gradients, attention's counted twice (both operands are activations): 0.68x of full.
    assert mop["step"] == pytest.approx(mop["forward"] + mop["input_grad"], rel=1e-5)
    assert mop["step"] / full["step"] == pytest.approx(0.68, abs=0.005)
    assert mop["weight_grad"] < 1e-4 * mop["step"]


@pytest.fixture(scope="module")
def tiny_rows():
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(1)  # as bench.py on CPU
    try:
        return [r for spec in bench.specs(bench.PRESETS["tiny"], bench.ROWS)
                for r in bench.run_row(spec, "tiny", cpu, "fp32", peak=100.0)]
    finally:
        torch.set_num_threads(threads)


def test_every_row_has_every_field(tiny_rows):
    kinds = {(r["row"], r["mode"]) for r in tiny_rows}
    assert {("train", m) for m in bench.MODES} | {("sample", "unpatched"), ("sample", "dmp"), ("vae", "decode"),
                                                  ("vae", "encode+mirror"), ("fid", "features"),
                                                  ("data", "get_batch")} <= kinds
    for r in tiny_rows:
        if r["row"] == "ratio":
            assert r["value"] > 0
            continue
        for field in ("batch", "ms_per_step", "steps_per_s", "images_per_s", "peak_mem_mb"):
            assert r[field] is not None and r[field] >= 0, (r, field)
        assert r["steps_per_s"] == pytest.approx(1e3 / r["ms_per_step"], rel=1e-6) or r["row"] == "fid"
        if r["row"] == "train":
            flops = bench.dit_flops(dict(input_size=8, in_channels=4, **train.DIGITS_MODEL), 4, r["mode"])
            assert r["tflop_per_step"] == pytest.approx(flops["step"] / 1e12)
            assert r["mfu"] == pytest.approx(r["achieved_tflops"] / 100.0)
    table = bench.format_table(tiny_rows)
    assert len(table.splitlines()) == 2 + sum(r["row"] != "ratio" for r in tiny_rows)
    named = [what for what, _, _ in bench.targets(tiny_rows)]
    assert any("sampling step" in w for w in named) and any("full fine-tuning (interleaved)" in w for w in named)
    json.dumps(tiny_rows)  # what --json writes
