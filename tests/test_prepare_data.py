"""prepare_data.py: ADM centre crop, image modes, bad files, stored posteriors, resume after kill -9, labels, reader."""
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import prepare_data
from conftest import error_line
from model_vae import SCALE_FACTOR, load_vae
from dataset import DataError, PreparedData, center_crop_arr, to_rgb
from prepare_data import main, prepare

GOLDEN = Path(__file__).parent / "golden"
RES = 16
RGB = (12, 200, 77)


def test_center_crop_equals_adm_bit_exact():
    with safe_open(str(GOLDEN / "center_crop.safetensors"), "np") as f:
        for i in range(3):
            for size in (256, 64):
                ours = center_crop_arr(Image.fromarray(f.get_tensor(f"in{i}")), size)
                assert ours.dtype == np.uint8 and np.array_equal(ours, f.get_tensor(f"out{i}_{size}"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Every kind of file prepare_data meets, and the RGB value each good uniform image must become."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "a_noise.png")
    Image.new("RGB", (40, 30), RGB).save(d / "b_rgb.png")
    Image.new("L", (30, 30), 100).save(d / "c_gray.png")
    Image.new("CMYK", (20, 18), (10, 50, 200, 30)).save(d / "d_cmyk.tif")
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 40, 90, 160] + [0] * 762)
    pal.save(d / "e_palette.png")
    pal.save(d / "f_palette_transparent.png", transparency=1)
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(d / "g_rgba_clear.png")
    Image.new("RGBA", (20, 20), (0, 0, 255, 255)).save(d / "h_rgba_opaque.png")
    Image.new("LA", (20, 20), (30, 0)).save(d / "i_la_clear.png")
    Image.fromarray(np.full((20, 20), 65535, np.uint16)).save(d / "j_16bit_white.png")
    Image.fromarray(np.full((20, 20), 257 * 100, np.uint16)).save(d / "k_16bit_100.png")
    Image.frombytes("I;16B", (20, 20), np.full((20, 20), 257 * 7, ">u2").tobytes()).save(d / "l_16bit_big.tif")
    Image.new("RGB", (5, 3), RGB).save(d / "m_tiny.png")
    (d / "n" / "deep").mkdir(parents=True)
    Image.fromarray(noise).save(d / "n" / "deep" / "o_nested.jpg", quality=90)
    (d / "p_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    jpg = (d / "n" / "deep" / "o_nested.jpg").read_bytes()
    (d / "q_truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "r_notes.txt").write_text("not an image")
    (d / ".DS_Store").write_bytes(b"junk")  # hidden: ignored silently
    cmyk = tuple(np.asarray(Image.new("CMYK", (1, 1), (10, 50, 200, 30)).convert("RGB"))[0, 0])
    known = {"b_rgb.png": RGB, "c_gray.png": (100,) * 3, "d_cmyk.tif": cmyk, "e_palette.png": (40, 90, 160),
             "f_palette_transparent.png": (255,) * 3, "g_rgba_clear.png": (255,) * 3, "h_rgba_opaque.png": (0, 0, 255),
             "i_la_clear.png": (255,) * 3, "j_16bit_white.png": (255,) * 3, "k_16bit_100.png": (100,) * 3,
             "l_16bit_big.tif": (7,) * 3, "m_tiny.png": RGB}
    return d, known, center_crop_arr(Image.fromarray(noise), RES)


BAD = {"p_corrupt.png", "q_truncated.jpg", "r_notes.txt"}


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """The golden tiny ldm VAE (downsampling 4) as a file in SD-checkpoint layout."""
    f = safe_open(str(GOLDEN / "vae_tiny.safetensors"), "pt")
    path = tmp_path_factory.mktemp("vae") / "tiny_vae.safetensors"
    save_file({k[len("ldm."):]: f.get_tensor(k) for k in f.keys() if k.startswith("ldm.")}, str(path))
    return path


def test_pixels_every_image_mode_and_bad_files(folder, tmp_path, capsys):
    d, known, noise = folder
    m = prepare(d, tmp_path / "out", resolution=RES, vae="none", batch_size=4)
    out = tmp_path / "out"
    files = (out / "files.txt").read_text().splitlines()
    assert files == sorted(files) and "n/deep/o_nested.jpg" in files and ".DS_Store" not in files
    assert sorted(s["file"] for s in m["skipped"]) == sorted(BAD) and m["count"] == len(files) - 3
    assert {"kind": "pixels", "scale_factor": 1.0, "num_classes": 1, "shape": [3, RES, RES], "vae": "none",
            "version": 1}.items() <= m.items()
    assert json.loads((out / "manifest.json").read_text()) == m
    assert not (out / "progress.json").exists() and not (tmp_path / "out.partial").exists()
    images = np.load(out / "images.npy")
    assert images.shape == (len(files), 3, RES, RES) and images.dtype == np.uint8
    for name, rgb in known.items():
        assert (images[files.index(name)] == np.array(rgb, np.uint8)[:, None, None]).all(), name
    assert np.array_equal(images[files.index("a_noise.png")], noise.transpose(2, 0, 1))
    for name in BAD:
        assert (images[files.index(name)] == 0).all()
    report = capsys.readouterr().out
    assert f"{len(files) - 3} of {len(files)} files" in report and "3 skipped" in report
    for name in BAD:
        assert f"skipped {name}: " in report
    assert "truncated" in next(s["reason"].lower() for s in m["skipped"] if s["file"] == "q_truncated.jpg")
    data = PreparedData(out)  # the reader: pixels in [-1, 1], the mirror taken on the fly, bad rows left out
    assert len(data) == m["count"] and data.shape == (3, RES, RES)
    x, y = data.batch([0, 0], [False, True])
    expected = torch.from_numpy(noise).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(x[0], expected, atol=1e-6) and torch.equal(x[1], x[0].flip(2))
    assert y.dtype == torch.int64 and y.tolist() == [0, 0]


def test_16bit_scaled_not_clipped():
    img = Image.fromarray(np.array([[0, 128, 257, 32768, 65535]], np.uint16))
    assert np.asarray(to_rgb(img))[0, :, 0].tolist() == [0, 0, 1, 128, 255]  # PIL's convert gives 0 128 255 255 255


def test_latents_tiny_vae_mean_std_and_mirror(folder, tiny_vae, tmp_path):
    d, known, noise = folder
    m = prepare(d, tmp_path / "out", resolution=RES, vae=str(tiny_vae), batch_size=5)
    latents = np.load(tmp_path / "out" / "latents.npy", mmap_mode="r")
    files = (tmp_path / "out" / "files.txt").read_text().splitlines()
    assert latents.dtype == np.float16 and latents.shape == (len(files), 2, 2, 4, RES // 4, RES // 4)
    assert m["scale_factor"] == SCALE_FACTOR and m["shape"] == [4, RES // 4, RES // 4] and m["kind"] == "latents"
    vae = load_vae(tiny_vae)
    x = torch.from_numpy(noise).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        mean, std = vae.encode(torch.cat([x, x.flip(3)]))
    stored = torch.from_numpy(latents[files.index("a_noise.png")].astype(np.float32))
    for mirror in (0, 1):
        assert torch.allclose(stored[mirror, 0], mean[mirror], rtol=2e-3, atol=1e-4)
        assert torch.allclose(stored[mirror, 1], std[mirror], rtol=2e-3, atol=1e-6)
    assert not torch.allclose(stored[0, 0], stored[1, 0])  # the VAE is not flip-equivariant: the mirror is its own
    data = PreparedData(tmp_path / "out")
    rows = [files.index(f) for f in files if f not in BAD]
    idx, flip = [1, 0, 3], [True, False, True]
    x, y = data.batch(idx, flip, torch.Generator().manual_seed(7))
    noise_ = torch.randn((3, 4, RES // 4, RES // 4), generator=torch.Generator().manual_seed(7))
    ref = torch.stack([torch.from_numpy(latents[rows[i], int(f)].astype(np.float32)) for i, f in zip(idx, flip)])
    assert x.shape == (3, 4, RES // 4, RES // 4) and x.dtype == torch.float32
    assert torch.equal(x, (ref[:, 0] + ref[:, 1] * noise_) * SCALE_FACTOR)


KILL_ON_THIRD_COMMIT = """
import os, signal, sys, prepare_data
calls = [0]
def write_json(path, obj, _orig=prepare_data.write_json):
    calls[0] += 1
    if calls[0] == 3:  # batch 2 is written and flushed, not yet recorded: the worst moment to die
        os.kill(os.getpid(), signal.SIGKILL)
    _orig(path, obj)
prepare_data.write_json = write_json
prepare_data.main(sys.argv[1:])
"""


def test_resume_after_kill_equals_uninterrupted(folder, tiny_vae, tmp_path, monkeypatch):
    d, _, _ = folder
    args = [str(d), str(tmp_path / "resumed"), "--resolution", str(RES), "--vae", str(tiny_vae),
            "--batch-size", "3", "--device", "cpu", "--workers", "0"]
    repo = str(Path(__file__).parents[1])
    run = subprocess.run([sys.executable, "-c", KILL_ON_THIRD_COMMIT, *args], cwd=repo, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": repo})
    assert run.returncode == -9, run.stderr
    partial = tmp_path / "resumed.partial"
    assert not (tmp_path / "resumed").exists() and json.loads((partial / "progress.json").read_text())["done"] == 3
    calls = []
    def counting(model, pixels, device, _encode=prepare_data.encode):
        calls.append(len(pixels))
        return _encode(model, pixels, device)
    monkeypatch.setattr(prepare_data, "encode", counting)
    main(args)
    resumed_calls = list(calls)
    prepare(d, tmp_path / "straight", resolution=RES, vae=str(tiny_vae), batch_size=3, device="cpu")
    assert sum(resumed_calls) == sum(calls[len(resumed_calls):]) - 3  # the first batch (3 good images) not re-encoded
    names = sorted(os.listdir(tmp_path / "straight"))
    assert names == sorted(os.listdir(tmp_path / "resumed"))
    assert names == ["files.txt", "labels.npy", "latents.npy", "manifest.json"]
    for name in names:
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_imagenet_folders_sorted_synsets_and_zip(tmp_path):
    src = tmp_path / "train"
    for synset, value in (("n09999999", 30), ("n01440764", 10), ("n02102040", 20)):  # created unsorted
        (src / synset).mkdir(parents=True)
        for j in range(2):
            Image.new("L", (12, 10), value + j).save(src / synset / f"{synset}_{j}.JPEG", quality=100)
    Image.new("L", (12, 10), 0).save(src / "stray.png")
    m = prepare(src, tmp_path / "folder", resolution=8, vae="none", labels="folders")
    assert m["class_names"] == ["n01440764", "n02102040", "n09999999"] and m["num_classes"] == 3
    assert m["skipped"] == [dict(row=6, file="stray.png", reason="not inside a class folder")]
    data = PreparedData(tmp_path / "folder")
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2] and data.num_classes == 3
    x, y = data.batch([5, 0], False)
    assert y.tolist() == [2, 0] and abs((x[0] + 1) * 127.5 - 31).max() <= 1 and abs((x[1] + 1) * 127.5 - 10).max() <= 1
    with zipfile.ZipFile(tmp_path / "train.zip", "w") as z:  # the same images in a zip give the same data
        for f in sorted(src.rglob("*")):
            z.write(f, f.relative_to(tmp_path).as_posix())
    mz = prepare(tmp_path / "train.zip", tmp_path / "zipped", resolution=8, vae="none", labels="folders")
    assert mz["class_names"] == m["class_names"] and mz["skipped"][0]["file"] == "train/stray.png"
    for name in ("images.npy", "labels.npy"):
        assert (tmp_path / "zipped" / name).read_bytes() == (tmp_path / "folder" / name).read_bytes()
    unlabelled = prepare(tmp_path / "train.zip", tmp_path / "unlabelled", resolution=8, vae="none")
    assert unlabelled["count"] == 7 and unlabelled["num_classes"] == 1 and unlabelled["class_names"] == []


def test_clear_errors(folder, tmp_path, capsys):
    d, _, _ = folder
    with pytest.raises(SystemExit, match=r"error: .*missing.*: no such folder or zip file"):
        main([str(tmp_path / "missing"), str(tmp_path / "out"), "--vae", "none"])
    (tmp_path / "done").mkdir()
    with pytest.raises(SystemExit, match="done already exists"):
        main([str(d), str(tmp_path / "done"), "--vae", "none"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: holds no files"):
        prepare(tmp_path / "empty", tmp_path / "out", vae="none")
    with pytest.raises(DataError, match="no readable manifest.json"):
        PreparedData(tmp_path / "done")


def test_captions_from_webdataset_shards_and_coco(tmp_path):
    """img2dataset shards (image + .txt per key) and COCO's captions JSON become captions.json, row-aligned."""
    import io
    import tarfile
    rng = np.random.default_rng(0)

    def jpeg():
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(b, "JPEG")
        return b.getvalue()

    (tmp_path / "shards").mkdir()
    for shard in range(2):
        with tarfile.open(tmp_path / "shards" / f"{shard:05d}.tar", "w") as t:
            for i in range(3):
                members = {f"{shard}{i:08d}.jpg": jpeg(), f"{shard}{i:08d}.json": b"{}"}
                if (shard, i) != (1, 2):  # one image without its caption
                    members[f"{shard}{i:08d}.txt"] = f"  photo {shard} {i}\n".encode()
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    prepare(tmp_path / "shards", tmp_path / "laion", resolution=16, vae="none", captions="txt")
    data = PreparedData(tmp_path / "laion")
    assert len(data) == 5 and data.captions == [[f"photo {s} {i}"] for s in range(2) for i in range(3)][:5]
    assert data.manifest["skipped"] == [dict(row=5, file="00001.tar/100000002.jpg", reason="no caption")]

    (tmp_path / "train2014").mkdir()
    for i in (1, 2):
        (tmp_path / "train2014" / f"COCO_train2014_{i:012d}.jpg").write_bytes(jpeg())
    coco = dict(images=[dict(id=7, file_name="COCO_train2014_000000000001.jpg"),
                        dict(id=9, file_name="COCO_train2014_000000000002.jpg")],
                annotations=[dict(image_id=9, caption="a dog. "), dict(image_id=7, caption="a cat"),
                             dict(image_id=9, caption="a brown dog")])
    (tmp_path / "captions_train2014.json").write_text(json.dumps(coco))
    prepare(tmp_path / "train2014", tmp_path / "coco", resolution=16, vae="none",
            captions=tmp_path / "captions_train2014.json")
    assert PreparedData(tmp_path / "coco").captions == [["a cat"], ["a dog.", "a brown dog"]]
    with pytest.raises(DataError, match="not a COCO captions file"):
        prepare(tmp_path / "train2014", tmp_path / "bad", resolution=16, vae="none",
                captions=tmp_path / "shards" / "00000.tar")


def test_no_usable_image_is_an_error_and_nothing_is_written(tmp_path, folder, unchanged):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    kept = unchanged(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(src), str(tmp_path / "out"), "--vae", "none", "--resolution", "8",
              "--workers", "0"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "none of its 2 files is a usable image" in message
    assert "\n" not in message and sorted(os.listdir(tmp_path)) == ["src"]
    kept()
    # A folder prepared before this check, every row skipped: train.py is told so in one sentence.
    d, _, _ = folder
    prepare(d, tmp_path / "old", resolution=8, vae="none")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    rows = len((tmp_path / "old" / "files.txt").read_text().splitlines())
    manifest["skipped"] = [dict(row=r, file="x", reason="bad") for r in range(rows)]
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="holds no usable image"):
        PreparedData(tmp_path / "old")


LIMITED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))  # ulimit -f 1 kB
import prepare_data
prepare_data.main(sys.argv[1:])
"""


def test_a_full_disk_while_preparing_then_the_rerun_finishes(folder, tmp_path, unchanged,
                                                             one_sentence):
    d, _, _ = folder
    prepare(d, tmp_path / "other", resolution=RES, vae="none")  # data prepared earlier, next to it
    kept = unchanged(tmp_path, d)
    args = [str(d), str(tmp_path / "out"), "--resolution", str(RES), "--vae", "none",
            "--workers", "0"]
    repo = str(Path(__file__).parents[1])
    out = subprocess.run([sys.executable, "-c", LIMITED, *args], cwd=repo, capture_output=True,
                         text=True)
    assert out.returncode == 1
    assert "out.partial" in one_sentence(out.stderr) and "File too large" in out.stderr
    kept()
    assert not (tmp_path / "out").exists()
    main(args)  # with room again, the same command finishes
    straight = prepare(d, tmp_path / "straight", resolution=RES, vae="none")
    done = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert done["count"] == straight["count"]
    for name in ("images.npy", "labels.npy", "files.txt"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes()


SLOW_WORKERS = """
import os, sys, time, prepare_data
read = prepare_data.ImageFiles.__getitem__
def slow(self, i):  # slow enough that both workers are busy when the kill comes
    open(os.path.join(sys.argv[-1], str(os.getpid())), "w").close()
    time.sleep(0.1)
    return read(self, i)
prepare_data.ImageFiles.__getitem__ = slow
prepare_data.main(sys.argv[1:-1])
"""


def _alive(pid):
    """A process that exists and is not a zombie (an exited child nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_workers_end_with_a_killed_prepare_data(folder, tmp_path):
    import signal
    import time
    d, _, _ = folder
    (tmp_path / "pids").mkdir()
    repo = str(Path(__file__).parents[1])
    # Batches of 8 images of 64 x 64, 98 kB each, more than a pipe holds: a worker whose parent was
    # gone used to outlive it by over a minute.
    cmd = [sys.executable, "-c", SLOW_WORKERS, str(d), str(tmp_path / "out"), "--resolution", "64",
           "--vae", "none", "--workers", "2", "--batch-size", "8", str(tmp_path / "pids")]
    parent = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):  # until both workers decode (at most a minute on a loaded machine)
        workers = [int(p.name) for p in (tmp_path / "pids").iterdir()
                   if int(p.name) != parent.pid]
        if len(workers) == 2:
            break
        time.sleep(0.1)
    parent.send_signal(signal.SIGKILL)
    assert parent.wait() == -9 and len(workers) == 2
    for _ in range(300):  # 30 s: a batch takes 0.8 s
        if not any(_alive(pid) for pid in workers):
            break
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers)


def _prepare_worker(rank, world, store, jobs, counts):
    """One of torchrun's processes, as torchrun would start it (gloo on CPU), its group joined
    through a file store (no TCP port another process could take first)."""
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    calls = []

    def counting(model, pixels, device, _encode=prepare_data.encode):
        calls.append(len(pixels))
        return _encode(model, pixels, device)
    prepare_data.encode = counting
    for src, out, options in jobs:
        prepare(src, out, **options)
    Path(counts, f"{rank}.json").write_text(json.dumps(calls))
    dist.destroy_process_group()


def test_two_processes_write_the_one_process_output_and_resume(folder, tiny_vae, tmp_path,
                                                                monkeypatch):
    """
    Under torchrun the batches alternate between the processes and the output is byte for byte
    the one-process output, from scratch and when resuming a one-process run that was stopped.
    """
    import torch.multiprocessing as mp
    d, _, _ = folder
    options = dict(resolution=RES, vae=str(tiny_vae), batch_size=3, device="cpu")
    prepare(d, tmp_path / "one", **options)
    real, calls = prepare_data.encode, []

    def stop_at_the_second_batch(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)
    monkeypatch.setattr(prepare_data, "encode", stop_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare(d, tmp_path / "resumed", **options)
    monkeypatch.undo()
    assert json.loads((tmp_path / "resumed.partial" / "progress.json").read_text())["done"] == 3
    jobs = [(d, tmp_path / "two", options), (d, tmp_path / "resumed", options)]
    (tmp_path / "counts").mkdir()
    mp.spawn(_prepare_worker, args=(2, tmp_path / "store", jobs, tmp_path / "counts"), nprocs=2)
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == ["files.txt", "labels.npy", "latents.npy", "manifest.json"]
    for out in ("two", "resumed"):
        assert sorted(os.listdir(tmp_path / out)) == names
        for name in names:
            same = (tmp_path / out / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
            assert same, (out, name)
    counts = [json.loads((tmp_path / "counts" / f"{r}.json").read_text()) for r in (0, 1)]
    assert all(len(c) >= 2 for c in counts)  # both processes encoded batches, in both runs


def test_a_zip_source_is_told_from_a_tar_once_not_per_image(tmp_path, monkeypatch):
    """ImageFiles reads a zip's images without asking tarfile about the zip for every one of them."""
    import tarfile

    from dataset import ImageFiles, list_source
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        for i, p in enumerate(pixels):
            path = tmp_path / f"{i}.png"
            Image.fromarray(p).save(path)
            z.write(path, f"{i}.png")
    files, labels, _ = list_source(tmp_path / "images.zip", "none")
    asked = []
    is_tarfile = tarfile.is_tarfile

    def counted(name):
        asked.append(name)
        return is_tarfile(name)
    monkeypatch.setattr(tarfile, "is_tarfile", counted)
    reader = ImageFiles(tmp_path / "images.zip", files, labels, 8, 0)
    assert [reader[i][0] for i in range(3)] == [0, 1, 2] and asked == []
    for i in range(3):
        assert np.array_equal(reader[i][1], pixels[i])  # 8x8 at 8: the crop is the image itself


# -------------------------------------------- nothing lost, nothing mixed (issue 24: prepare_data.py)

def exit_line(argv, capsys):
    """main(argv) must end with exit status 1 and one sentence (error_line); returns it."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert isinstance(e.value.code, str), e.value.code  # sys.exit(message): status 1
    return error_line(capsys.readouterr().err + e.value.code)


def small_source(root, n=4):
    root.mkdir()
    for i in range(n):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (12, 12, 3), np.uint8)).save(root / f"{i}.png")
    return root


def test_a_resume_refuses_images_rewritten_under_the_same_names(tmp_path, monkeypatch, unchanged, capsys):
    """Item 5: images rewritten under their names after a kill ended up mixed in the prepared data."""
    src = small_source(tmp_path / "src")
    args = [str(src), str(tmp_path / "out"), "--resolution", "8", "--vae", "none", "--batch-size", "2",
            "--workers", "0"]
    calls, encode = [], prepare_data.encode

    def interrupted(model, pixels, device):
        calls.append(1)
        if len(calls) == 2:  # the first batch committed, then Ctrl-C
            raise KeyboardInterrupt
        return encode(model, pixels, device)
    monkeypatch.setattr(prepare_data, "encode", interrupted)
    with pytest.raises(SystemExit, match="interrupted: rerun the same command"):
        main(args)
    monkeypatch.undo()
    assert json.loads((tmp_path / "out.partial" / "progress.json").read_text())["done"] == 2
    before = (src / "0.png").read_bytes()
    Image.new("RGB", (12, 12), RGB).save(src / "0.png")  # rewritten under the same name
    kept = unchanged(tmp_path)
    line = exit_line(args, capsys)
    assert "the source's files changed since" in line and "out.partial" in line
    kept()
    (src / "0.png").write_bytes(before)  # back as it was; a file not read yet may change freely
    Image.new("RGB", (12, 12), RGB).save(src / "3.png")
    main(args)
    pixels = np.load(tmp_path / "out" / "images.npy")
    assert (pixels[3] == np.array(RGB, np.uint8)[:, None, None]).all()


def test_a_symlink_loop_and_a_truncated_tar_are_one_sentence(tmp_path, unchanged, capsys):
    """Items 9 and 14: a link loop multiplied 2 images into 82; a truncated tar was a traceback."""
    src = small_source(tmp_path / "src", 2)
    os.symlink(".", src / "loop")  # src/loop/loop/... is src again
    with tarfile.open(tmp_path / "whole.tar", "w") as t:
        t.add(src / "0.png", "0.png")
        t.add(src / "1.png", "1.png")
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:1600])  # inside the second file
    kept = unchanged(tmp_path)
    line = exit_line([str(src), str(tmp_path / "out"), "--vae", "none", "--workers", "0"], capsys)
    assert "loop: a link to the folder" in line
    line = exit_line([str(tmp_path / "cut.tar"), str(tmp_path / "out"), "--vae", "none", "--workers", "0"], capsys)
    assert "cut.tar: not a readable tar file, truncated or damaged" in line
    kept()
    assert not (tmp_path / "out.partial").exists()


def test_bad_sizes_are_refused_before_anything_is_written(tmp_path, unchanged, capsys):
    """Item 14: --batch-size 0 and --resolution -8 were tracebacks that left OUT.partial."""
    src = small_source(tmp_path / "src", 2)
    kept = unchanged(tmp_path)
    for flag in (["--batch-size", "0"], ["--resolution", "-8"], ["--workers", "-1"]):
        line = exit_line([str(src), str(tmp_path / "out"), "--vae", "none", *flag], capsys)
        assert "must be at least 1" in line and "nothing was written" in line
    kept()
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_one_process_at_a_time_prepares_a_folder(tmp_path, unchanged, capsys):
    """Two prepare_data.py of the same output at once: the second is refused, the first's work kept."""
    src = small_source(tmp_path / "src", 2)
    (tmp_path / "out.partial").mkdir()
    lock = str(tmp_path / "out.partial" / ".lock")
    holder = subprocess.Popen(["flock", "--no-fork", lock, "sleep", "30"])
    try:
        while not subprocess.run(["flock", "-n", lock, "true"]).returncode:
            pass  # until the other process holds it
        kept = unchanged(tmp_path)
        line = exit_line([str(src), str(tmp_path / "out"), "--vae", "none", "--workers", "0"], capsys)
        assert "out.partial is in use by another process" in line
        kept()
    finally:
        holder.kill()
        holder.wait()
