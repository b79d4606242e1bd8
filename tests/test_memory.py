"""memory.py (bench.py --estimate-memory): the count on fake tensors against CPU's allocator and a hand
count, CUDA's autocast lists and attention kernels, and the command's table and JSON."""
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import bench
import memory


def allocator_peak(fn):
    """The peak of the bytes CPU's allocator holds while fn runs (the profiler's record). Python's
    garbage collector is off meanwhile: a collection of an earlier test's garbage inside the window
    would record frees of memory fn never allocated, and the peak would read low."""
    import gc
    from itertools import accumulate
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    finally:
        gc.enable()
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
        estimate = memory.estimate_memory(**run)["peak_gib"] * 2 ** 30
        real = allocator_peak(lambda: memory.estimate_memory(**run, fake=False))
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
        monkeypatch.setitem(memory.MEMORY_MODELS, "hand", dict(kind="dit", arch=arch, input_size=32))
        rows[depth] = {k: v * 2 ** 30 for k, v in memory.estimate_memory("hand", "dmp", B).items()
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
        with memory.cuda_kernels(), torch.autocast("cpu", dtype=torch.bfloat16):
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
        assert r["peak_gib"] >= sum(r[f"{k}_gib"] for k in memory.MEMORY_KINDS) - 1e-12
        assert r["peak_gib"] > 0 and r["gradients_gib"] >= 0
    assert rows[1]["gradients_gib"] > 0 and rows[0]["gradients_gib"] < rows[1]["gradients_gib"]
    assert memory.fits(dict(peak_gib=21.9)) == [80, 40, 24]  # 1.05 x 21.9 + 1 <= 24
    assert memory.fits(dict(peak_gib=22.0)) == [80, 40]
    with pytest.raises(SystemExit, match="expected MODEL:METHOD:BATCH"):
        bench.main(["--estimate-memory", "DiT-XL/2:dmp"])
