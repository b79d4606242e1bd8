"""study.py and study_report.py: the miniature study end to end on a tiny budget, its resuming, its
statistics and its rule, and docs/study.md."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import study
import study_report as report

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, jobs=1):
    doc = tmp_path / "docs" / "study.md"
    if not doc.exists():
        doc.parent.mkdir()
        doc.write_text(f"# x\n\nbefore\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    return ["--iterations", "4", "--eval-at", "2,4", "--seeds", "0,1", "--bpd-images", "2",
            "--sample-sets", "1", "--sample-steps", "2", "--replicates", "20",
            "--scratch-iterations", "3", "--rows", "dmp,prompt-lr/N",
            "--ablations", "4c: uniform (no block index)", "--out", str(tmp_path / "out"),
            "--runs-dir", str(tmp_path / "runs"), "--doc", str(doc), "--jobs", str(jobs)]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    study.main(tiny(tmp))
    return tmp


def test_tables_and_the_doc_are_rendered_from_the_json(done):
    data = json.loads((done / "out" / "study.json").read_text())
    markdown = report.render(data)
    assert (done / "out" / "study.md").read_text() == markdown
    assert "![pretraining curve](pretraining_curve.png)" in markdown  # beside the figures
    doc = (done / "docs" / "study.md").read_text()
    assert report.section(done / "docs" / "study.md") == report.render(data, "../out")
    assert "![pretraining curve](../out/pretraining_curve.png)" in doc  # links from docs/ to out/
    assert doc.startswith("# x\n\nbefore\n\n")
    assert doc.endswith(f"{report.END}\n\nafter\n")
    rows = data["rows"]
    assert list(rows) == ["dmp", "prompt-lr/N"] and set(rows["dmp"]["runs"]) == {"0", "1"}
    assert set(rows["dmp"]["runs"]["0"]) == {"2", "4"} and len(data["base"]["mse_bands"]) == 10
    assert rows["dmp"]["trained"] == 5200 and "--method dmp" in rows["dmp"]["command"]
    assert "--lr-scale 0.0625" in rows["prompt-lr/N"]["command"]
    assert set(data["scratch"]) == {"pretraining", "pretraining + DMP"}
    assert list(data["ablations"]) == ["4c: uniform (no block index)"]
    for name in ("Tables 2, 3 and 7", "Sample quality", "held-out digits (the floor)",
                 "How far each DMP gate", "The rule applied", "Verdict", "lr/256", "Stage-specific",
                 "Table 4", "4e: IB 1, LB 0", "Table 5", "Table 6", "Fig. 5", "FID: not computed",
                 "DiT-L/2", "Stable Diffusion 1.5", "python train.py --dataset coco", data["rule"]):
        assert name in markdown, name
    # the gate's movement for every DMP run, FD/KID for every row, the floor and the base
    assert set(rows["dmp"]["gate"]) == {"0", "1"} and not rows["prompt-lr/N"]["gate"]
    assert set(rows["dmp"]["gate"]["0"]) >= {"gate_dev_max", "gate_dev_mean", "gate_entropy_min",
                                             "gate_entropy_mean", "gate_tv_t"}
    for row in [*rows.values(), *data["ablations"].values()]:
        assert set(row["boot_sd"]) == set(report.QUALITY)
    assert set(data["floor"]["quality"]) == set(report.QUALITY) == set(data["base"]["quality"])
    pairs = {(c["a"], c["b"]) for c in data["comparisons"]}
    assert {("dmp", "prompt-lr/N"), ("prompt-lr/N", "base"), ("base", "floor")} <= pairs
    # the figures: Fig. 5 is 4 blocks x 16 prompts x 100 timesteps at 4 px a cell with 8 px gaps
    assert Image.open(done / "out" / "fig5_gate.png").size == (4 * 16 * 4 + 3 * 8, 100 * 4)
    assert Image.open(done / "out" / "pretraining_curve.png").size == (2 * 480, 240)
    assert np.array(data["fig5"]["dmp"]).shape == (4, 100, 16)  # the figure is drawn from the JSON
    assert "--render" in markdown
    assert report.headline(data).startswith("**Verdict: this setup cannot tell")  # no positive control
    assert report.headline(data) in report.render_brief(data)


def test_the_rule_decides_on_the_seed_spread_and_the_paired_interval():
    """A difference counts only when it beats the seed spread and (FD, KID) the paired interval."""
    boot = np.linspace(-1, 1, 50)
    a = dict(values=dict(bpd=[1.0, 1.1, 1.2], fd_train=[2.0, 2.0, 2.0]), seeded=True,
             boot=dict(fd_train=2.0 + 0.01 * boot))
    b = dict(values=dict(bpd=[1.05], fd_train=[1.5]), seeded=False,
             boot=dict(fd_train=1.5 + 0.01 * boot))  # the same draws move both alike
    c = study.compare(a, b)
    assert c["bpd"] == dict(diff=pytest.approx(0.05), seed_spread=pytest.approx(0.1), counts=False)
    assert c["fd_train"]["counts"]
    assert c["fd_train"]["interval"] == pytest.approx([0.5, 0.5])  # paired: no noise left
    b["boot"]["fd_train"] = 1.5 + 0.5 * boot[::-1]  # draws that move b against a: a wide interval
    c = study.compare(a, b)
    assert c["fd_train"]["interval"][0] < 0 < c["fd_train"]["interval"][1]
    assert not c["fd_train"]["counts"]
    half = 1.96 * np.std(0.01 * boot - 0.5 * boot[::-1], ddof=1)
    assert c["fd_train"]["interval"] == pytest.approx([0.5 - half, 0.5 + half])
    one = dict(a, values=dict(bpd=[9.0], fd_train=[9.0]))  # one seed: no spread, nothing counts
    assert not any(v["counts"] for v in study.compare(one, b).values())
    assert study.compare(one, b)["bpd"]["seed_spread"] is None


def test_metrics_are_paired_and_a_zero_patch_measures_as_the_base(done):
    """Fixed draws: DMP at step 0 is the base exactly, so its change at step 2 is DMP's, not noise's."""
    base = json.loads((done / "runs" / "base" / "eval-0000000.json").read_text())
    ckpt = next((done / "runs" / "dmp-s0").glob("*/checkpoints/0000002.pt"))
    again = study.evaluate_checkpoint(str(ckpt), bpd_images=2)
    first = json.loads((done / "runs" / "dmp-s0" / "eval-0000002.json").read_text())
    assert again == {k: first[k] for k in again}  # an evaluation is a function of the checkpoint
    assert first["bpd"] != base["bpd"]
    import dmp
    import load
    model = load.load_model(study.BASE)
    dmp.patch(model, "dmp")
    path = done / "zero.pt"
    load.save_patch(model, path, base=study.BASE)
    zero = study.evaluate_checkpoint(str(path), bpd_images=2, sample_sets=1, sample_steps=2,
                                     replicates=20, keep_samples=True)
    assert zero["bpd"] == base["bpd"] and zero["heldout_loss"] == base["heldout_loss"]
    assert zero["mse_bands"] == base["mse_bands"]
    assert np.array_equal(zero["samples"], base["samples"])
    assert zero["quality"] == base["quality"]  # the same samples, the same bootstrap draws
    assert zero["gate"]["gate_dev_max"] == 0.0 == zero["gate"]["gate_tv_t"]  # a zero gate: uniform
    assert len(zero["quality"]["fd_train_boot"]) == 20 and min(zero["quality"]["fd_train_boot"]) > 0


def test_a_second_run_reuses_and_an_interrupted_run_resumes(done, tmp_path):
    """Finished runs are skipped; a run cut short resumes from its last checkpoint and ends where it would have."""
    work = tmp_path / "again"
    shutil.copytree(done, work)
    run = next((work / "runs" / "prompt-lr-N-s1").glob("[0-9]*"))
    final = run / "checkpoints" / "0000004.pt"
    expected = json.loads((work / "runs" / "prompt-lr-N-s1" / "eval-0000004.json").read_text())
    final.unlink()
    (work / "runs" / "prompt-lr-N-s1" / "eval-0000004.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in (work / "runs").rglob("*.pt")}
    study.main(tiny(work))
    assert final.exists() and {p: p.stat().st_mtime_ns for p in before} == before  # nothing else retrained
    evaluation = work / "runs" / "prompt-lr-N-s1" / "eval-0000004.json"
    assert json.loads(evaluation.read_text()) == expected
    timing = ("wall_minutes", "reused_evaluations")  # how long this invocation took, and what it found done
    again, first = (json.loads((d / "out" / "study.json").read_text().replace(str(d), "")) for d in (work, done))
    assert again["reused_evaluations"] == 1 + 2 * 2 * 2 + 1 + 2 * 3 - 1 and first["reused_evaluations"] == 0
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in first.items() if k not in timing}


def test_structural_bias_and_gate_statistics_on_known_inputs():
    x = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.5], [3.0, 1.0, 0.0]])
    stats = study.structural_bias(x)
    corr = np.corrcoef(x)[~np.eye(3, dtype=bool)]
    assert stats["correlation"]["max"] == pytest.approx(corr.max())
    assert stats["correlation"]["min"] == pytest.approx(corr.min())
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert stats["similarity"]["mean"] == pytest.approx((unit @ unit.T)[~np.eye(3, dtype=bool)].mean())
    uniform = np.full((2, 10, 4), 0.25)
    g = study.gate_statistics(uniform)
    assert g["entropy_high_t"] == pytest.approx(1.0) and g["gate_dev_max"] == pytest.approx(0.0)
    peaked = uniform.copy()
    peaked[:, :5] = [0.97, 0.01, 0.01, 0.01]  # low t: one prompt dominates
    g = study.gate_statistics(peaked)
    assert g["entropy_low_t"] < 0.2 < g["entropy_high_t"] == pytest.approx(1.0)
    assert g["gate_dev_max"] == pytest.approx(4 * 0.97 - 1) and g["gate_tv_t"] > 0.3


def test_the_doc_is_the_committed_json_rendered(tmp_path):
    """
    The acceptance of the study: docs/study.md's tables and figures are study_report's rendering of
    assets/study/study.json, and every figure it links exists.
    """
    data = json.loads((ROOT / "assets" / "study" / "study.json").read_text())
    report.draw_figures(data, tmp_path)
    for name in ["pretraining_curve.png"] + [report.figure_name(key) for key in data["fig5"]]:
        drawn, committed = (np.asarray(Image.open(d / name)) for d in (tmp_path, ROOT / "assets" / "study"))
        assert np.array_equal(drawn, committed)
    doc = report.section(ROOT / "docs" / "study.md")
    assert doc == report.render(data, "../assets/study")
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", doc):
        assert (ROOT / "docs" / link).is_file(), link
    assert (ROOT / "assets" / "study" / "study.md").read_text() == report.render(data)
    assert data["command"] == "python study.py" and data["settings"]["seeds"] == [0, 1, 2]
    # the acceptance of issue 15: the lr/N control, every DMP gate's movement, FD/KID with spreads
    rows = data["rows"]
    assert {"prompt-lr/N", "dmp", "dmp-authors", "dmp-ib0", "lora-dmp"} <= set(rows)
    assert all(len(rows[k]["gate"]) == 3 for k in rows if k.startswith("dmp"))
    assert all(len(e["quality"]) == 3 and set(e["boot_sd"]) == set(report.QUALITY)
               for e in rows.values())
    assert data["floor"]["quality"] and data["settings"]["sample_sets"] == 5


def test_only_the_committed_study_rewrites_the_doc(tmp_path):
    """A --quick or trial run into another --out leaves docs/study.md and the README alone."""
    committed = study.parse_args([])
    assert committed.doc == str(ROOT / "docs" / "study.md") and committed.readme == str(ROOT / "README.md")
    trial = study.parse_args(["--quick", "--out", str(tmp_path)])
    assert trial.doc == "" and trial.readme == ""
    assert study.parse_args(["--out", str(tmp_path), "--doc", "x.md"]).doc == "x.md"
