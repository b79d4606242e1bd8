"""sample.py: the same images whatever the processes and batch size, resuming, patches, the VAE path, the grid,
bf16 on CPU, and one-sentence errors. Tiny random models, DDIM with eta = 1 (every step draws noise, as DDPM does;
an untrained pixel-space model under DDPM without x0 clipping saturates every pixel, which would hide a mismatch)."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dmp
import load
import sample
import sampling
from conftest import error_line
from diffusion import create_diffusion
from diffusion import dit_sample
from model_dit import DiT
from model_vae import SCALE_FACTOR, AutoencoderKL, load_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--sampler", "ddim", "--steps", "5", "--eta", "1"]
N = 7  # odd, so two processes get unequal shares


def tiny_dit(seed=0, in_channels=3, input_size=8, std=0.05, **kwargs):
    """
    A tiny DiT with every weight random, plus an identity path from each pixel's token to its noise prediction,
    so the samples use the whole uint8 range instead of saturating.
    """
    torch.manual_seed(seed)
    config = dict(input_size=input_size, patch_size=2, in_channels=in_channels, hidden_size=32, depth=2,
                  num_heads=2, num_classes=10, class_dropout_prob=0.1)
    model = DiT(**{**config, **kwargs})
    p, c = 2, in_channels
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":
                param.normal_(0, std)
        model.pos_embed.zero_()
        for ch in range(c):
            for a in range(p):
                for b in range(p):
                    j = (a * p + b) * c + ch
                    model.x_embedder.proj.weight[j, ch, a, b] += 1.0
                    model.final_layer.linear.weight[(a * p + b) * model.out_channels + ch, j] += 1.0
    return model.eval()


def save_run(model, path, **extra):
    """A checkpoint as train.py writes it."""
    sd = model.state_dict()
    torch.save(dict(model=sd, ema=sd, config=model.config, **{"noise_schedule": "cosine", "vae": "none", **extra}),
               path)
    return str(path)


def run(*argv):
    sample.main([str(a) for a in argv])


def pngs(folder, n):
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{k:06d}.png"))) for k in range(n)])


def npz(path):
    with np.load(path) as f:
        return f["arr_0"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_run(tiny_dit(), tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    """N images from one process with batches of 3: (folder, arr_0)."""
    out = tmp_path_factory.mktemp("ref") / "set"
    run("--ckpt", ckpt, "--num-samples", N, "--out", out, "--batch-size", 3, *FAST)
    return out, npz(f"{out}.npz")


def test_same_images_whatever_processes_and_batch_size(ckpt, reference, tmp_path):
    ref_dir, ref = reference
    assert ref.shape == (N, 8, 8, 3) and ref.dtype == np.uint8
    assert len(np.unique(ref)) > 100 and (ref == 0).mean() < 0.05 and (ref == 255).mean() < 0.05  # not saturated
    assert all(np.abs(ref[i].astype(int) - ref[0]).mean() > 10 for i in range(1, N))  # N different images
    assert np.array_equal(pngs(ref_dir, N), ref)

    run("--ckpt", ckpt, "--num-samples", N, "--out", tmp_path / "one-batch", "--batch-size", N, *FAST)
    assert np.array_equal(npz(tmp_path / "one-batch.npz"), ref)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "sample.py",
           "--ckpt", ckpt, "--num-samples", str(N), "--out", str(tmp_path / "two"), "--batch-size", "2", *FAST]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0 of 7 images already" in result.stdout and "2 process(es)" in result.stdout
    assert np.array_equal(npz(tmp_path / "two.npz"), ref)
    assert np.array_equal(pngs(tmp_path / "two", N), ref)
    assert not [f for f in os.listdir(tmp_path / "two") if f.endswith(".tmp")]


def test_resume_computes_only_the_missing_images(ckpt, reference, tmp_path, monkeypatch, capsys):
    ref_dir, ref = reference
    out = tmp_path / "set"
    shutil.copytree(ref_dir, out)
    os.remove(out / "000001.png")
    data = (out / "000004.png").read_bytes()
    (out / "000004.png").write_bytes(data[: len(data) // 2])  # a half-written file (e.g. copied by hand)
    (out / ".000002.png.tmp").write_bytes(b"garbage")         # a kill's leftover never counts as done
    kept = {k: os.stat(out / f"{k:06d}.png").st_mtime_ns for k in (0, 2, 3, 5, 6)}

    rows = []
    forward = DiT.forward
    monkeypatch.setattr(DiT, "forward", lambda self, x, t, y: rows.append(len(x)) or forward(self, x, t, y))
    run("--ckpt", ckpt, "--num-samples", N, "--out", out, "--batch-size", 4, *FAST)
    assert "5 of 7 images already" in capsys.readouterr().out
    assert rows == [2 * 2] * 5  # 2 images, doubled for guidance, at each of the 5 steps: nothing else computed
    assert {k: os.stat(out / f"{k:06d}.png").st_mtime_ns for k in kept} == kept
    assert np.array_equal(npz(f"{out}.npz"), ref)

    rows.clear()
    run("--ckpt", ckpt, "--num-samples", N, "--out", out, "--batch-size", 2, *FAST)  # complete: only the .npz
    assert rows == [] and "7 of 7 images already" in capsys.readouterr().out
    assert np.array_equal(npz(f"{out}.npz"), ref)

    with pytest.raises(SystemExit):  # another seed into the same folder would mix two sample sets
        run("--ckpt", ckpt, "--num-samples", N, "--out", out, "--seed", 1, *FAST)
    assert "holds samples of other settings" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # so would another precision (a GPU's bf16 default, then a CPU)
        run("--ckpt", ckpt, "--num-samples", N, "--out", out, "--precision", "bf16", *FAST)
    assert "holds samples of other settings (precision differ" in capsys.readouterr().err
    settings = json.loads((out / "settings.json").read_text())
    assert settings["precision"] == "fp32"
    del settings["precision"]  # a set from before the precision was recorded goes on
    (out / "settings.json").write_text(json.dumps(settings))
    run("--ckpt", ckpt, "--num-samples", N, "--out", out, *FAST)
    assert "7 of 7 images already" in capsys.readouterr().out


def test_patches(ckpt, reference, tmp_path):
    _, ref = reference
    model = load.load_model(ckpt)
    dmp.patch(model, "dmp")
    zero = tmp_path / "zero.pt"
    load.save_patch(model, zero, base=ckpt, noise_schedule="cosine", vae="none")
    run("--ckpt", ckpt, "--patch", zero, "--num-samples", 3, "--out", tmp_path / "zero", *FAST)
    assert np.array_equal(npz(tmp_path / "zero.npz"), ref[:3])  # zero prompts change nothing; 3 = first 3 of N

    with torch.no_grad():
        model.block_input.prompts.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    trained = tmp_path / "trained.pt"
    load.save_patch(model, trained, base=ckpt, noise_schedule="cosine", vae="none")
    run("--ckpt", trained, "--num-samples", 3, "--out", tmp_path / "alone", *FAST)  # the patch names its base
    run("--ckpt", ckpt, "--patch", trained, "--num-samples", 3, "--out", tmp_path / "both", *FAST)
    patched = npz(tmp_path / "alone.npz")
    assert np.array_equal(patched, npz(tmp_path / "both.npz"))
    assert np.abs(patched.astype(int) - ref[:3]).mean() > 5


def test_grid_is_the_first_images_of_the_set(ckpt, reference, tmp_path):
    _, ref = reference
    run("--ckpt", ckpt, "--grid", 5, "--out", tmp_path / "grid.png", "--batch-size", 2, *FAST)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    # 3 columns, 2 rows, 2-pixel borders; each 8x8 image shown 64x64, every pixel an 8x8 square
    assert grid.shape == (2 * (64 + 2) + 2, 3 * (64 + 2) + 2, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        cell = grid[2 + 66 * r:66 + 66 * r, 2 + 66 * c:66 + 66 * c]
        assert np.array_equal(cell, ref[i].repeat(8, 0).repeat(8, 1))
    assert grid[:2].max() == 0 and grid[-68:, -66:].max() == 0  # the border and the empty sixth cell


def test_latent_model_decodes_with_the_vae(tmp_path):
    torch.manual_seed(0)
    vae = AutoencoderKL(dict(double_z=True, z_channels=4, resolution=8, in_channels=3, out_ch=3, ch=32,
                             ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[])).eval()
    torch.save(vae.state_dict(), tmp_path / "vae.pt")
    model = tiny_dit(in_channels=4, input_size=4, std=0.02)
    ckpt = save_run(model, tmp_path / "latent.pt", vae=str(tmp_path / "vae.pt"))
    run("--ckpt", ckpt, "--num-samples", 3, "--out", tmp_path / "set", "--decode-batch-size", 2, *FAST)
    images = npz(tmp_path / "set.npz")
    assert images.shape == (3, 8, 8, 3)

    # Image k by hand: its generator draws the label, the latent noise, then each step's noise.
    vae, diffusion = load_vae(str(tmp_path / "vae.pt")), create_diffusion("ddim5", "cosine")
    for k in range(3):
        g = sampling.image_generator(0, k)
        y = torch.randint(10, (1,), generator=g)
        z = torch.randn(1, 4, 4, 4, generator=g)
        with torch.no_grad():
            latent = dit_sample(model, diffusion, z, y, 1.5, eta=1.0,
                                noise_fn=lambda x, g=g: torch.randn(x.shape, generator=g))
            x = vae.decode(latent / SCALE_FACTOR)
        expected = torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()[0]
        assert np.array_equal(images[k], expected)
    assert len(np.unique(images)) > 50


def test_write_grid_as_train_py_calls_it_grayscale_to_rgb(tmp_path):
    model = tiny_dit(in_channels=1).train()  # a one-channel pixel-space model (the digits), mid-training
    path = sampling.write_grid(model, tmp_path / "g.png", noise_schedule="cosine", vae="none", num=4, seed=0,
                               steps=5, sampler="ddim", device="cpu")
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 66 + 2, 2 * 66 + 2, 3) and model.training  # 8x8 images shown 64x64
    assert np.array_equal(grid[..., 0], grid[..., 1]) and np.array_equal(grid[..., 0], grid[..., 2])
    assert len(np.unique(grid[2:66, 2:66, 0])) > 20


def test_bf16_autocast_on_cpu(ckpt, reference, tmp_path):
    _, ref = reference
    run("--ckpt", ckpt, "--num-samples", 3, "--out", tmp_path / "bf16", "--precision", "bf16", *FAST)
    diff = np.abs(npz(tmp_path / "bf16.npz").astype(int) - ref[:3])
    print(f"bf16 vs fp32: mean |diff| {diff.mean():.2f} levels, {100 * (diff <= 8).mean():.1f}% within 8")
    assert 0 < diff.mean() < 8 and (diff <= 8).mean() > 0.8


def test_every_draw_of_a_batch_comes_before_its_chain(monkeypatch):
    """
    sampling.dit_batch draws each image's initial and step noise from its own CPU generator before
    the chain starts (one copy to a GPU, no copy or host sync per step): every generator draw comes
    before the first forward pass, 1 + steps per image after its label. (The images stay those
    drawn step by step: test_latent_model_decodes_with_the_vae computes them so.)
    """
    model, events = tiny_dit(), []
    model.register_forward_pre_hook(lambda module, inputs: events.append("forward"))
    randn = torch.randn

    def recorded(*args, generator=None, **kwargs):
        if generator is not None:
            events.append("draw")
        return randn(*args, generator=generator, **kwargs)
    monkeypatch.setattr(torch, "randn", recorded)
    images = sampling.dit_batch([3, 4], model, create_diffusion("5", "cosine"), cfg_scale=1.0)
    first = events.index("forward")
    assert events[:first] == ["draw"] * 2 * 6 and "draw" not in events[first:] and len(events) == 12 + 5
    assert images.shape == (2, 8, 8, 3)


def test_samples_in_bf16_on_a_gpu_that_computes_in_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert sample.precision(None, torch.device("cuda", 0)) == "bf16"
    assert sample.precision(None, torch.device("cpu")) == "fp32"
    assert sample.precision("fp32", torch.device("cuda", 0)) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert sample.precision(None, torch.device("cuda", 0)) == "fp32"  # a V100: bf16 emulated, slow


def test_bad_input_is_one_sentence(ckpt, tmp_path, capsys):
    uncond = save_run(tiny_dit(num_classes=1, class_dropout_prob=0.0), tmp_path / "uncond.pt")
    latent = save_run(tiny_dit(in_channels=4, input_size=4), tmp_path / "latent.pt", vae="none")
    other = tiny_dit(hidden_size=64)
    dmp.patch(other, "dmp")
    load.save_patch(other, tmp_path / "other.pt", base=ckpt)
    cases = [
        (["--ckpt", tmp_path / "missing.pt"], "missing.pt: no such file"),
        (["--ckpt", ckpt, "--class-labels", 3, 10], "--class-labels 10 is out of range"),
        (["--ckpt", uncond, "--cfg-scale", 4], "needs a model trained with label dropout"),
        (["--ckpt", ckpt, "--patch", tmp_path / "other.pt"], "other.pt does not fit"),
        (["--ckpt", latent], "is not a grayscale or RGB pixel-space model"),
        (["--ckpt", ckpt, "--sampler", "ddim", "--steps", 600], "cannot create exactly 600 steps"),
        (["--ckpt", ckpt, "--grid", 4, "--num-samples", 4], "not both"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run("--out", tmp_path / "never", "--steps", 5, *argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and err[-1].startswith("sample.py: error: ") and message in err[-1], err
        assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "never").exists()


def test_a_sample_set_refuses_to_continue_from_other_weights(tmp_path, unchanged, one_sentence,
                                                             capsys):
    """Model A starts a set, model B replaces its file: a larger set must not mix the two."""
    path = save_run(tiny_dit(seed=0), tmp_path / "model.pt")
    run("--ckpt", path, "--num-samples", 2, "--out", tmp_path / "set", *FAST)
    save_run(tiny_dit(seed=1), tmp_path / "model.pt")
    kept = unchanged(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run("--ckpt", path, "--num-samples", 4, "--out", tmp_path / "set", *FAST)
    message = one_sentence(capsys.readouterr().err)
    assert exit_info.value.code == 2 and "other settings (weights_sha256 differ" in message
    kept()
    assert len(npz(tmp_path / "set.npz")) == 2 and not (tmp_path / "set" / "000002.png").exists()


def test_a_patch_finds_its_base_from_anywhere_and_refuses_another(tmp_path, monkeypatch, unchanged,
                                                                  one_sentence, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    save_run(tiny_dit(seed=0), "base.pt")
    model = load.load_model("base.pt")
    dmp.patch(model, "dmp")
    with torch.no_grad():
        model.block_input.prompts.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    load.save_patch(model, "patch.pt", base="base.pt", noise_schedule="cosine", vae="none")
    recorded = torch.load("patch.pt", weights_only=True)["base"]
    assert recorded["name"] == "base.pt" and recorded["path"] == str(tmp_path / "a" / "base.pt")
    monkeypatch.chdir(tmp_path / "b")  # the base's relative name means nothing here; its path does
    run("--ckpt", "../a/patch.pt", "--grid", 2, "--out", "grid.png", *FAST)
    assert (tmp_path / "b" / "grid.png").is_file()

    save_run(tiny_dit(seed=1), tmp_path / "a" / "base.pt")  # another model under the base's name
    kept = unchanged(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run("--ckpt", "../a/patch.pt", "--grid", 2, "--out", "other.png", *FAST)
    message = one_sentence(capsys.readouterr().err)
    assert exit_info.value.code == 2 and "was trained on a base with sha256" in message
    assert "--allow-base-mismatch" in message and not (tmp_path / "b" / "other.png").exists()
    kept()
    run("--ckpt", "../a/patch.pt", "--grid", 2, "--out", "other.png", "--allow-base-mismatch",
        *FAST)
    assert "warning: " in capsys.readouterr().out and (tmp_path / "b" / "other.png").is_file()


FULL_DISK = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (1500, resource.RLIM_INFINITY))  # ulimit -f 1.5 kB
import sample
sample.main(sys.argv[1:])
"""


def test_errors_are_one_line_and_a_full_disk_keeps_the_images(ckpt, reference, tmp_path, unchanged,
                                                              one_sentence, capsys):
    (tmp_path / "file").write_text("a regular file")
    (tmp_path / "model.json").write_text('{"model": "DiT"}')
    (tmp_path / "vae.txt").write_text("not weights")
    grid, folder = tmp_path / "file" / "grid.png", tmp_path / "file" / "set"  # under a regular file
    cases = [(["--ckpt", ckpt, "--out", grid], "file is a file, not a folder"),
             (["--ckpt", ckpt, "--num-samples", 2, "--out", folder], "is a file, not a folder"),
             (["--ckpt", tmp_path / "model.json"], "model.json: not a PyTorch checkpoint"),
             (["--ckpt", ckpt, "--vae", tmp_path / "vae.txt"], "vae.txt: not a PyTorch checkpoint")]
    kept = unchanged(tmp_path)
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run(*argv, *FAST)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in one_sentence(err) and "usage" not in err
    kept()

    # A full disk (no file may grow past 1,500 bytes) while the .npz is written: the PNGs stay.
    argv = ["--ckpt", ckpt, "--num-samples", str(N), "--out", str(tmp_path / "set"), *FAST]
    out = subprocess.run([sys.executable, "-c", FULL_DISK, *argv], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 2
    assert "set.npz: could not be written (File too large)" in one_sentence(out.stderr)
    kept()
    pngs_written = [f"{k:06d}.png" for k in range(N)]
    assert sorted(os.listdir(tmp_path / "set")) == pngs_written + ["settings.json"]
    assert not (tmp_path / ".set.npz.tmp").exists() and not (tmp_path / "set.npz").exists()
    run("--ckpt", ckpt, "--num-samples", N, "--out", tmp_path / "set", *FAST)  # writes the .npz
    assert np.array_equal(npz(tmp_path / "set.npz"), reference[1])


def test_a_settings_file_that_cannot_be_written_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A full disk while settings.json is written: one sentence, nothing sampled, no .tmp left."""
    def full_disk(path, text, *args, **kwargs):
        with open(path, "w") as f:
            f.write(text[:5])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full_disk)
    batches = []
    message = r"settings.json: could not be written \(No space left on device\); nothing was sampled"
    with pytest.raises(sample.SampleError, match=message):
        sample.write_samples(2, batches.append, tmp_path / "set", 1, dict(seed=0))
    assert os.listdir(tmp_path / "set") == [] and batches == []


# ----------------------------------------------- nothing lost, nothing mixed (issue 24: sample.py)

def sample_exit(argv, capsys):
    """sample.main(argv) must end with exit status 2 and one sentence (error_line); returns it."""
    with pytest.raises(SystemExit) as e:
        run(*argv)
    assert e.value.code == 2
    return error_line(capsys.readouterr().err)


def test_an_existing_npz_or_file_is_never_replaced(ckpt, tmp_path, unchanged, capsys):
    """Item 2: `--out DIR` replaced an existing DIR.npz (a 12-image reference batch became 3
    samples); `--grid 2 --out X.npz` wrote a PNG over an .npz."""
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((12, 8, 8, 3), np.uint8))
    kept = unchanged(tmp_path)
    line = sample_exit(["--ckpt", ckpt, "--num-samples", 3, "--out", tmp_path / "ref", *FAST], capsys)
    assert "ref.npz already exists (the set's .npz, ref.npz, is written only where nothing is)" in line
    line = sample_exit(["--ckpt", ckpt, "--grid", 2, "--out", tmp_path / "ref.npz", *FAST], capsys)
    assert "ref.npz already exists (a grid is written only where nothing is)" in line
    kept()
    assert sorted(os.listdir(tmp_path)) == ["ref.npz"]  # nothing sampled, no folder made


def test_a_folder_that_is_not_a_sample_set_is_not_adopted(ckpt, tmp_path, unchanged, capsys):
    """Item 3: the user's own 000000.png... were counted as done and went into DIR.npz, and a
    settings.json was written into their folder."""
    mine = tmp_path / "mine"
    mine.mkdir()
    for k in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(mine / f"{k:06d}.png")
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "settings.json").write_text("[1, 2]")
    kept = unchanged(tmp_path)
    line = sample_exit(["--ckpt", ckpt, "--num-samples", 3, "--out", mine, *FAST], capsys)
    assert "mine holds files and is not a sample set (it has no settings.json)" in line
    line = sample_exit(["--ckpt", ckpt, "--num-samples", 3, "--out", tmp_path / "json", *FAST], capsys)
    assert "settings.json is not the settings.json of a sample set" in line
    kept()
    assert sorted(os.listdir(mine)) == ["000000.png", "000001.png", "000002.png"]


def test_nan_weights_and_a_stray_text_encoder_are_refused(tmp_path, unchanged, capsys):
    """Items 11 and 15: NaN weights gave all-black samples and a valid-looking .npz, exit 0;
    --text-encoder was silently ignored for a class model."""
    model = tiny_dit()
    with torch.no_grad():
        model.final_layer.linear.weight[0, 0] = float("nan")
    bad = save_run(model, tmp_path / "nan.pt")
    kept = unchanged(tmp_path)
    line = sample_exit(["--ckpt", bad, "--num-samples", 2, "--out", tmp_path / "set", *FAST], capsys)
    assert "nan.pt: 1 of its weights are not finite (NaN or inf)" in line
    line = sample_exit(["--ckpt", save_run(tiny_dit(), tmp_path / "ok.pt"), "--text-encoder", "clip.pt", *FAST],
                       capsys)
    assert "--text-encoder is for a text-conditioned DiT" in line
    (tmp_path / "vae-folder").mkdir()  # a diffusers folder, say
    line = sample_exit(["--ckpt", tmp_path / "ok.pt", "--vae", tmp_path / "vae-folder", *FAST], capsys)
    assert "vae-folder is a folder, not a checkpoint file" in line
    kept()
    assert not (tmp_path / "set").exists() and not (tmp_path / "set.npz").exists()


def test_a_sample_set_is_written_by_one_command_at_a_time(ckpt, tmp_path, unchanged, capsys):
    """Two sample.py into one set at once: the second is refused while the first holds it."""
    (tmp_path / "set").mkdir()
    lock = str(tmp_path / "set" / ".lock")
    holder = subprocess.Popen(["flock", "--no-fork", lock, "sleep", "30"])
    try:
        while not subprocess.run(["flock", "-n", lock, "true"]).returncode:
            pass  # until the other process holds it
        kept = unchanged(tmp_path)
        line = sample_exit(["--ckpt", ckpt, "--num-samples", 2, "--out", tmp_path / "set", *FAST], capsys)
        assert "set is in use by another process (sample.py writing this set)" in line
        kept()
        assert os.listdir(tmp_path / "set") == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_prompt_lines_end_at_newlines_only(tmp_path):
    """Item 13: a prompt file was split at U+2028 (and \\x0c, \\x1c ...), moving later prompts to
    other images."""
    (tmp_path / "p.txt").write_text("a cat\u2028on a sofa\nform\x0cfeed\r\n\nlast", encoding="utf-8")
    assert sample.read_prompts(tmp_path / "p.txt") == ["a cat\u2028on a sofa", "form\x0cfeed", "last"]
