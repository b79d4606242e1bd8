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


#################################################################################
#                   The memory estimate (bench.py --estimate-memory)            #
#################################################################################

def allocator_peak(fn):
    """The peak of the bytes CPU's allocator holds while fn runs (the profiler's record)."""
    from itertools import accumulate
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation:  # frees are allocations of negative size
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        for child in node.children:
            walk(child)
    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    return max(accumulate(size for _, size in sorted(events)))


@pytest.mark.parametrize("name, method, batch, micro, ckpt, precision", [
    ("tiny-dit", "dmp", 8, 8, False, "fp32"), ("tiny-dit", "pretrain", 8, 4, True, "bf16"),
    ("tiny-unet", "dmp", 4, 2, True, "bf16")])
def test_memory_count_on_fake_tensors_matches_the_cpu_allocator(name, method, batch, micro, ckpt,
                                                                 precision):
    """
    The estimate's machinery with CPU's own kernels (like_cuda=False) on fake tensors against the
    same step run for real, as CPU's allocator records it. They differ by what one side cannot see:
    the noise schedule's nine float64 tables (72,000 bytes), which torch.from_numpy shares with
    numpy on CPU, so the allocator never holds them (on CUDA they are copied and count), and the
    scratch memory of CPU kernels (convolutions), which only the allocator sees: measured -72 KB
    for the DiTs, +0.2-0.4% for the UNet. Attention runs on torch's math path in both.
    """
    torch.set_num_threads(1)
    run = dict(name=name, method=method, batch=batch, micro_batch=micro, checkpointing=ckpt,
               precision=precision, like_cuda=False)
    with sdpa_kernel(SDPBackend.MATH):
        estimate = bench.estimate_memory(**run)["peak_gib"] * 2 ** 30
        real = allocator_peak(lambda: bench.estimate_memory(**run, fake=False))
    assert abs(estimate - real) <= 72_000 + 0.01 * real, (estimate, real)


def test_one_more_dmp_block_adds_what_a_hand_count_says(monkeypatch):
    """
    On the CUDA path (bf16 autocast with CUDA's lists, FlashAttention, 512-byte blocks), a third DiT
    block under DMP adds to the peak exactly the bytes of its weights and of what its backward pass
    keeps: DMP needs input gradients only, so the frozen linears keep their bf16 weights, not their
    inputs.
    """
    B, T, D, H = 8, 256, 64, 4  # 32x32 latents, patch 2: 256 tokens

    def r(n):  # the caching allocator's blocks
        return -(-n // 512) * 512
    rows = {}
    for depth in (2, 3):
        arch = dict(patch_size=2, hidden_size=D, depth=depth, num_heads=H)
        monkeypatch.setitem(bench.MEMORY_MODELS, "hand", dict(kind="dit", arch=arch, input_size=32))
        rows[depth] = {k: v * 2 ** 30 for k, v in bench.estimate_memory("hand", "dmp", B).items()
                       if k.endswith("_gib")}
    weights = (sum(r(o * D * D * 4) + r(o * D * 4) for o in (3, 1, 4, 6))  # qkv, proj, fc1, adaLN
               + r(4 * D * D * 4) + r(D * 4)                              # fc2
               + T * D * 4 + T * 4)  # its prompts, its one-hot column of the gate
    kept = (12 * D * D * 2              # bf16 copies of the qkv, proj, fc1, fc2 weights
            + 2 * r(B * T * D * 4)      # the two layer norms' fp32 inputs
            + 4 * r(B * T * 4)          # their means and reciprocal standard deviations
            + r(B * T * 3 * D * 2)      # q, k, v (bf16) for the attention backward
            + r(B * T * D * 2) + r(B * H * T * 4) + 2 * 512  # its output, log-sum-exp, RNG state
            + r(B * T * 4 * D * 2)      # fc1's output, the GELU's input
            + 2 * r(B * D * 2) + r(B * 6 * D * 2)  # (1 + scale) twice; adaLN's output (the gates)
            + B * T * 4)                # the block's mixture weights (the gate's softmax output)
    trained = T * D * 4 + T * 4  # its prompts and gate column: the trained weights it adds
    assert rows[3]["weights_gib"] - rows[2]["weights_gib"] == weights
    assert rows[3]["activations_gib"] - rows[2]["activations_gib"] == kept
    # train.train_step frees the last step's gradients before the forward pass: none at the peak
    assert rows[3]["gradients_gib"] == rows[2]["gradients_gib"] == 0
    assert rows[3]["optimizer_gib"] - rows[2]["optimizer_gib"] == 2 * trained  # AdamW's moments
    assert rows[3]["peak_gib"] - rows[2]["peak_gib"] == weights + kept + 2 * trained


def test_cuda_kernels_give_cuda_dtypes_and_flash_attention_only_inside():
    """CPU autocast with CUDA's op lists (autocast_mode.h), CUDA's attention; undone after."""
    import torch.nn.functional as F
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.randn(2, 8, 16, 16)
        q = torch.randn(2, 4, 64, 16, requires_grad=True)
        with bench.cuda_kernels(), torch.autocast("cpu", dtype=torch.bfloat16):
            h = F.conv2d(x, torch.randn(8, 8, 1, 1))
            assert h.dtype == torch.bfloat16                                    # lower precision
            assert F.group_norm(h, 4).dtype == torch.float32                    # fp32 list
            assert F.layer_norm(h, (16,)).dtype == torch.float32
            assert F.interpolate(h, scale_factor=2.0).dtype == torch.float32
            assert torch.softmax(h, -1).dtype == torch.float32                  # fp32 unless given
            assert torch.softmax(h, -1, dtype=torch.bfloat16).dtype == torch.bfloat16
            assert torch.einsum("bchw->bhwc", x).dtype == torch.bfloat16
            assert torch.cat([h, x]).dtype == torch.float32                     # no CPU promote
            out = F.scaled_dot_product_attention(q, q, q)
            assert out.dtype == torch.bfloat16
            assert type(out.grad_fn).__name__ == "ScaledDotProductFlashAttentionBackward0"
        with torch.autocast("cpu", dtype=torch.bfloat16):  # CPU's own lists and kernels again
            assert F.layer_norm(F.conv2d(x, torch.randn(8, 8, 1, 1)), (16,)).dtype == torch.bfloat16
            out = F.scaled_dot_product_attention(q, q, q)
            assert type(out.grad_fn).__name__ != "ScaledDotProductFlashAttentionBackward0"


def test_estimate_memory_command_prints_the_estimates_and_writes_json(tmp_path, capsys):
    path = tmp_path / "memory.json"
    rows = bench.main(["--estimate-memory", "tiny-dit:dmp:4", "tiny-unet:full:4:2:ckpt",
                       "--json", str(path)])
    out = capsys.readouterr().out
    assert out.startswith("Estimates, not measurements") and "Left out: the CUDA context" in out
    table = [line for line in out.splitlines() if line.startswith("| tiny")]
    assert len(table) == 2
    assert all("estimate (fake tensors, bf16, FlashAttention)" in line for line in table)
    assert "| tiny-unet | full | 4 | 2 | yes |" in table[1]
    saved = json.loads(path.read_text())
    assert saved["results"] == rows and "Estimates" in saved["note"]
    for r in rows:
        assert r["peak_gib"] >= sum(r[f"{k}_gib"] for k in bench.MEMORY_KINDS) - 1e-12
        assert r["peak_gib"] > 0 and r["gradients_gib"] >= 0
    assert rows[1]["gradients_gib"] > 0 and rows[0]["gradients_gib"] < rows[1]["gradients_gib"]
    assert bench.fits(dict(peak_gib=21.9)) == [80, 40, 24]  # 1.05 x 21.9 + 1 <= 24
    assert bench.fits(dict(peak_gib=22.0)) == [80, 40]
    with pytest.raises(SystemExit, match="expected MODEL:METHOD:BATCH"):
        bench.main(["--estimate-memory", "DiT-XL/2:dmp"])


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
