"""bench.py: the analytic FLOP count against torch's FlopCounterMode, and every row of the bench on a tiny DiT."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import dmp
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


@pytest.mark.parametrize("mode", bench.MODES)
def test_a_training_rows_flops_are_those_of_the_step_it_times(mode):
    """
    The FLOPs a training row reports (dit_flops of the model it built) against FlopCounterMode's
    count of the very step it times: get_batch and training.train_step on the tiny preset's model.
    """
    preset = bench.PRESETS["tiny"]
    with bench.synthetic_run(preset) as (args, data):
        step, config = bench.train_setup("tiny", mode, args, data, torch.device("cpu"), "fp32")
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counted:
            step()
    reported = bench.dit_flops(config, preset["batch"], mode)["step"]
    assert reported == pytest.approx(counted.get_total_flops(), rel=0.02)


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
        if r["row"] in ("train", "sample"):  # the peak given (100 TFLOP/s) reaches every MFU
            assert r["tflop_per_step"] > 0 and r["mfu"] == pytest.approx(r["achieved_tflops"] / 100.0)
    table = bench.format_table(tiny_rows)
    assert len(table.splitlines()) == 2 + sum(r["row"] != "ratio" for r in tiny_rows)
    named = [what for what, _, _ in bench.targets(tiny_rows)]
    assert any("sampling step" in w for w in named) and any("full fine-tuning (interleaved)" in w for w in named)
    json.dumps(tiny_rows)  # what --json writes


#################################################################################
#                  The device suite (bench.py --suite device)                   #
#################################################################################

SUITE_IDS = {"train-L2-dmp", "train-L2-full", "train-XL2-pretrain", "train-XL2-dmp",
             "train-XL2-dmp-ckpt", "train-XL2-dmp-accum4", "sample-XL2", "vae", "torchrun-train",
             "digits-train", "digits-sample", "torchrun-sample", "train-L2-dmp-compiled",
             "train-L2-full-compiled", "train-XL2-pretrain-compiled", "train-XL2-dmp-compiled"}


def test_device_suite_dry_run_lists_every_row_within_the_budget(capsys):
    rows = bench.main(["--suite", "device", "--dry-run"])
    out = capsys.readouterr().out
    assert {r["id"] for r in rows} == SUITE_IDS
    assert sum(r["estimate_s"] for r in rows) <= bench.SUITE_BUDGET_S == 480
    for r in rows:
        assert r["id"] in out and " ".join(r["command"][-4:]) in out
        assert r["command"][2:3] == ["--one"] and "--preset device" in " ".join(r["command"])
        assert ("--compile" in r["command"]) == r["id"].endswith("-compiled")
    specs = {r["id"]: json.loads(r["command"][3]) for r in rows}
    assert specs["train-XL2-dmp-ckpt"] == ["train", "DiT-XL/2", "dmp", {"checkpointing": True}]
    assert specs["train-XL2-dmp-accum4"] == ["train", "DiT-XL/2", "dmp", {"grad_accum": 4}]
    assert [r["id"] for r in rows][-4:] == [i for i in [r["id"] for r in rows] if "compiled" in i]
    only = bench.main(["--suite", "device", "--dry-run", "--only", "vae"])
    assert [r["id"] for r in only] == ["vae"]


def test_device_suite_rows_end_in_one_sentence_and_never_hang(tmp_path):
    """A row that fails, hangs (its own child too) or has no time left: one sentence each."""
    python = [sys.executable, "-c"]
    hang = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)'], start_new_session=True); "
            f"open({str(tmp_path / 'child')!r}, 'w').write(str(c.pid)); time.sleep(60)")
    ok = 'print(\'[{"row": "vae", "model": "m", "mode": "x"}]\')'
    error = 'print(\'[{"row": "sample", "error": "no CUDA"}]\')'
    crash = "import sys; print('x'); sys.exit('NCCL is missing')"
    rows = [dict(id="ok", command=python + [ok], estimate_s=1),
            dict(id="error", command=python + [error], estimate_s=1),
            dict(id="crash", command=python + [crash], estimate_s=1),
            dict(id="hang", command=python + [hang], estimate_s=1),
            dict(id="late", command=python + ["print('[]')"], estimate_s=400)]
    done = bench.run_suite(rows, tmp_path / "suite.json", budget=60, setup="test", slack=1)
    status = {r["id"]: (r["status"], r["error"]) for r in done}
    assert status["ok"] == ("ok", None) and done[0]["results"][0]["row"] == "vae"
    assert status["error"] == ("failed", "no CUDA")
    assert status["crash"] == ("failed", "crash exited with status 1: NCCL is missing")
    assert status["hang"] == ("timeout", "hang did not finish within 3 s")
    assert status["late"][0] == "skipped" and "needs about 400 s" in status["late"][1]
    assert all("\n" not in (r["error"] or "") for r in done)
    child = int((tmp_path / "child").read_text())
    stat = Path(f"/proc/{child}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in "ZX"  # killed
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert [r["status"] for r in saved["rows"]] == ["ok", "failed", "failed", "timeout", "skipped"]
    assert not (tmp_path / "suite.json.tmp").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the suite without CUDA")
def test_device_suite_without_cuda_says_so_for_every_row(tmp_path):
    with pytest.raises(SystemExit, match="16 of 16 rows did not finish"):
        bench.main(["--suite", "device", "--json", str(tmp_path / "gpu.json")])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert {r["status"] for r in saved["rows"]} == {"not run"}
    assert {r["error"] for r in saved["rows"]} == {
        "not run: CUDA is not available here (torch.cuda.is_available() is False)"}
    with pytest.raises(SystemExit, match="--only nothing: no such row"):
        bench.main(["--suite", "device", "--only", "nothing"])
