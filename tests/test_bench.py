"""bench.py: the analytic FLOP count against torch's FlopCounterMode, and every row of the bench on a tiny DiT."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import device_suite
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
        mixtures = []
        terms = diffusion.training_losses(model, x, t, dict(y=y, mixtures=mixtures))
        importance, load = dmp.balancing_losses(mixtures)
        loss = terms["loss"].mean() + importance + load
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as whole:
        loss.backward()
    analytic = bench.dit_flops(CONFIG, B, mode)
    assert analytic["forward"] == pytest.approx(forward.get_total_flops(), rel=0.02)
    assert analytic["input_grad"] + analytic["weight_grad"] == pytest.approx(whole.get_total_flops(), rel=0.02)


def test_flops_of_a_tiny_dit_worked_by_hand():
    """
    One image, 4x4 pixels, 1 channel, patch 2 (N = 4 tokens), width D = 4, one block, MLP H = 16,
    learned sigma (F = 2 * 2 * 2 = 8 outputs a token); every figure is 2 x multiply-adds:
      patch embedding 2*4*(1*4)*4 = 128; timestep MLP 2*256*4 = 2048 and 2*4*4 = 32
      block: adaLN 2*4*24 = 192, qkv 2*4*4*12 = 384, scores 2*4*4*4 = 128, values 128,
             proj 2*4*4*4 = 128, MLP 2*4*4*16 = 512 twice                              = 1984
      final adaLN 2*4*8 = 64, final linear 2*4*4*8 = 256                   forward     = 4512
    Full fine-tuning: input gradients of all but the patch embedding and the timestep MLP's first
    layer (32 + 192 + 384 + 2*128 + 2*128 + 128 + 2*512 + 64 + 256 = 2592), weight gradients of
    every layer with weights (4512 - 2*128 = 4256). DMP: the gate adds 2*4*4 = 32 (on c) and
    2*1*1*4 = 8 (the block index) to the forward and is all that trains (40); the tokens' matmuls
    still need input gradients (384 + 2*128 + 2*128 + 128 + 2*512 + 256 = 2304), c's none.
    """
    config = dict(input_size=4, patch_size=2, in_channels=1, hidden_size=4, depth=1, num_heads=1,
                  learn_sigma=True)
    assert bench.dit_flops(config, 1, "full") == dict(forward=4512, input_grad=2592,
                                                      weight_grad=4256, step=11360)
    assert bench.dit_flops(config, 1, "dmp") == dict(forward=4552, input_grad=2304,
                                                     weight_grad=40, step=6896)
    assert bench.dit_flops(config, 3, "full")["step"] == 3 * 11360  # every term is linear in B
    # The figure the README and bench.py's comment quote: DMP's step is 0.68x full's on DiT-L/2.
    large = dict(input_size=32, in_channels=4, **CONFIGS["DiT-L/2"])
    ratio = bench.dit_flops(large, 128, "dmp")["step"] / bench.dit_flops(large, 128, "full")["step"]
    assert ratio == pytest.approx(0.68, abs=0.005)


def test_a_rows_speed_and_mfu_from_its_seconds():
    """3 TFLOP a step in half a second, batch 4, on a 100 TFLOP/s card: 6 TFLOP/s, 6% MFU."""
    row = bench.speed_row("m", "dmp", 4, 0.5, dict(step=3e12), 100.0, memory_mb=12.5)
    assert row == dict(row="train", model="m", mode="dmp", batch=4, ms_per_step=500.0,
                       steps_per_s=2.0, images_per_s=8.0, tflop_per_step=3.0,
                       achieved_tflops=6.0, mfu=0.06, peak_mem_mb=12.5)
    assert bench.speed_row("m", "dmp", 4, 0.5, dict(step=3e12), None)["mfu"] is None  # a CPU


def test_sampling_rows_compile_when_asked(monkeypatch):
    """--compile reaches the sampling rows: each block of the model they time is compiled."""
    compiled = []

    def compile_blocks(model, **options):
        compiled.append(len(model.blocks))
        return model
    monkeypatch.setattr(bench.training, "compile_blocks", compile_blocks)
    preset = bench.PRESETS["tiny"]
    rows = bench.row_sample("tiny", preset, torch.device("cpu"), "fp32", True, 100.0)
    assert compiled == [4] and all(r["compiled"] for r in rows)
    bench.row_sample("tiny", preset, torch.device("cpu"), "fp32", False, None)
    assert compiled == [4]


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
            assert r["tflop_per_step"] > 0 and r["mfu"] > 0
    table = device_suite.format_table(tiny_rows)
    assert len(table.splitlines()) == 2 + sum(r["row"] != "ratio" for r in tiny_rows)
    named = [what for what, _, _ in device_suite.targets(tiny_rows)]
    assert any("sampling step" in w for w in named) and any("full fine-tuning (interleaved)" in w for w in named)
    json.dumps(tiny_rows)  # what --json writes


#################################################################################
#                  The device suite (bench.py --suite device)                   #
#################################################################################

SUITE_IDS = {"train-L2-dmp", "train-L2-full", "train-XL2-dmp", "train-XL2-dmp-ckpt", "train-L2-dmp-hard",
             "train-B2-text", "sample-XL2", "vae", "demo", "digits-train", "digits-sample", "torchrun-train",
             "torchrun-sample", "train-XL2-pretrain-compiled", "train-sdtiny-compiled"}


def test_device_suite_dry_run_lists_every_row_within_the_budget(capsys):
    """
    The rows the first GPU needs (hard selection, the demo preset, the text DiT, sd-tiny compiled,
    DDP with 2 processes), their estimates (process starts and cold compiles included) at most 6
    minutes, the budget that stops the suite 9 (a 10-minute call), and the torch it runs on.
    """
    rows = bench.main(["--suite", "device", "--dry-run"])
    out = capsys.readouterr().out
    assert {r["id"] for r in rows} == SUITE_IDS
    total = sum(r["estimate_s"] for r in rows)
    assert total <= device_suite.SUITE_ESTIMATE_S == 360 and device_suite.SUITE_BUDGET_S == 540
    assert f"torch {torch.__version__}" in out and f"about {total} s" in out
    for r in rows:
        assert r["id"] in out and " ".join(r["command"][-4:]) in out
        assert r["command"][2:3] == ["--one"] and "--preset device" in " ".join(r["command"])
        assert ("--compile" in r["command"]) == r["id"].endswith("-compiled")
    specs = {r["id"]: json.loads(r["command"][3]) for r in rows}
    assert specs["train-XL2-dmp-ckpt"] == ["train", "DiT-XL/2", "dmp", {"checkpointing": True}]
    assert [r["id"] for r in rows][-2:] == [i for i in [r["id"] for r in rows] if "compiled" in i]
    assert specs["train-L2-dmp-hard"] == ["train", "DiT-L/2", "dmp", {"selection": "hard"}]
    assert specs["train-B2-text"] == ["train", "DiT-B/2", "dmp", {"text": True}]
    assert specs["train-sdtiny-compiled"] == ["train", "sd-tiny", "dmp"]
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
    done = device_suite.run_suite(rows, tmp_path / "suite.json", budget=60, setup="test", slack=1)
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
    with pytest.raises(SystemExit, match="15 of 15 rows did not finish"):
        bench.main(["--suite", "device", "--json", str(tmp_path / "gpu.json")])
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert {r["status"] for r in saved["rows"]} == {"not run"}
    assert {r["error"] for r in saved["rows"]} == {
        "not run: CUDA is not available here (torch.cuda.is_available() is False)"}
    with pytest.raises(SystemExit, match="--only nothing: no such row"):
        bench.main(["--suite", "device", "--only", "nothing"])


def test_the_torchrun_rows_start_two_processes_and_say_why_not_on_nccl(monkeypatch):
    """DDP is built only with 2 processes: the torchrun rows start 2, with NCCL where there is a GPU
    for each; on one GPU they run gloo on the CPU (NCCL refuses two processes on one GPU), saying so."""
    command = device_suite.torchrun("train.py", "--iterations", 4)
    assert command[command.index("--nproc_per_node") + 1] == "2"
    cuda = torch.device("cuda")
    assert device_suite.two_ranks(torch.device("cpu")) == (torch.device("cpu"), {}, None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_suite.two_ranks(cuda) == (cuda, {}, None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    device, env, note = device_suite.two_ranks(cuda)
    assert device.type == "cpu" and env == {"CUDA_VISIBLE_DEVICES": ""} and "NCCL needs a GPU per process" in note


def test_the_new_training_rows_on_a_cpu(monkeypatch):
    """The suite's hard-selection, text DiT (with CLIP's tiny config here, not ViT-L/14) and sd-tiny
    rows run the training step as train.py does, on the tiny preset."""
    monkeypatch.setattr(bench, "CLIP_VITL14", bench.CLIP_TINY)
    cpu, threads = torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [bench.run_row(spec, "tiny", cpu, "fp32", peak=100.0)[0]
                for spec in (["train", "tiny", "dmp", {"selection": "hard"}], ["train", "tiny", "dmp", {"text": True}],
                             ["train", "sd-tiny", "dmp"])]
    finally:
        torch.set_num_threads(threads)
    assert [r["mode"] for r in rows] == ["dmp, selection hard", "dmp, text (CLIP)", "dmp"]
    assert all(r["ms_per_step"] > 0 for r in rows) and rows[0]["mfu"] > 0 and rows[2]["mfu"] is None


def test_a_row_in_a_process_of_its_own_prints_one_json_line(capsys):
    """bench.py --one SPEC (device_suite.print_row): the row's results as the last line; a row that
    fails, its one sentence as the result (a row's own RowError as it is, else the exception's name
    and first line; out of memory in two words), the model and mode from the spec."""
    def fails(spec, error):
        raise error

    device_suite.print_row(["vae"], bench.run_row, "tiny", torch.device("cpu"), "fp32")
    assert [r["mode"] for r in json.loads(capsys.readouterr().out)] == ["encode+mirror", "decode"]
    cases = [(device_suite.RowError(device_suite.NO_CUDA), device_suite.NO_CUDA),
             (ValueError("bad value\nmore"), "ValueError: bad value"),
             (torch.OutOfMemoryError("CUDA out of memory. Tried ..."), "out of memory")]
    for error, sentence in cases:
        device_suite.print_row(["train", "DiT-L/2", "dmp"], fails, error)
        out = capsys.readouterr().out.strip().splitlines()
        assert json.loads(out[-1]) == [dict(row="train", model="DiT-L/2", mode="dmp", error=sentence)]
    if not torch.cuda.is_available():  # bench.py --one on a machine without CUDA
        with pytest.raises(device_suite.RowError, match="CUDA is not available here"):
            bench.run_row(["vae"], "tiny", torch.device("cuda"), "fp32")
