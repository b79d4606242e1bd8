"""study.py and study_report.py: the miniature study end to end on a tiny budget, its resuming, its statistics,
and the README."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import study
import study_report as report

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, jobs=1):
    readme = tmp_path / "README.md"
    if not readme.exists():
        readme.write_text(f"# x\n\nbefore\n\n{report.README_BEGIN}\nold\n{report.README_END}\n\nafter\n")
    return ["--iterations", "4", "--eval-at", "2,4", "--seeds", "0,1", "--bpd-images", "2", "--samples", "12",
            "--sample-steps", "5", "--scratch-iterations", "3", "--methods", "dmp,prompt",
            "--ablations", "4c: uniform (no block index)", "--out", str(tmp_path / "out"),
            "--runs-dir", str(tmp_path / "runs"), "--readme", str(readme), "--jobs", str(jobs)]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    study.main(tiny(tmp))
    return tmp


def test_tables_and_readme_are_rendered_from_the_json(done):
    data = json.loads((done / "out" / "study.json").read_text())
    markdown = report.render(data)
    assert (done / "out" / "study.md").read_text() == markdown
    readme = (done / "README.md").read_text()
    assert report.readme_section(done / "README.md") == markdown
    assert readme.startswith("# x\n\nbefore\n\n") and readme.endswith(f"{report.README_END}\n\nafter\n")
    assert set(data["methods"]) == {"dmp", "prompt"} and set(data["methods"]["dmp"]["runs"]) == {"0", "1"}
    assert set(data["methods"]["dmp"]["runs"]["0"]) == {"2", "4"} and len(data["base"]["mse_bands"]) == 10
    assert data["methods"]["dmp"]["trained"] == 5200 and "--method dmp" in data["methods"]["dmp"]["command"]
    assert set(data["scratch"]) == {"pretraining", "pretraining + DMP"} and list(data["ablations"]) == [
        "4c: uniform (no block index)"]
    for name in ("Tables 2, 3 and 7", "Stage-specific", "Table 4", "Table 5", "Table 6", "Fig. 5", "FID: not computed",
                 "DiT-L/2", "Stable Diffusion 1.5", "python train.py --dataset coco"):
        assert name in markdown, name
    # the figures: Fig. 5 is 4 blocks x 16 prompts x 100 timesteps at 4 px a cell with 8 px gaps
    assert Image.open(done / "out" / "fig5_gate.png").size == (4 * 16 * 4 + 3 * 8, 100 * 4)
    assert Image.open(done / "out" / "pretraining_curve.png").size == (2 * 480, 240)
    assert np.array(data["gate"]["weights"]).shape == (4, 100, 16)  # the figure is drawn from the JSON
    assert "--render" in markdown


def test_metrics_are_paired_and_a_zero_patch_measures_as_the_base(done):
    """Fixed draws: DMP at step 0 is the base exactly, so its change at step 2 is DMP's, not noise's."""
    base = json.loads((done / "runs" / "base" / "eval-0000000.json").read_text())
    ckpt = next((done / "runs" / "dmp-s0").glob("*/checkpoints/0000002.pt"))
    again = study.evaluate_checkpoint(str(ckpt), bpd_images=2)
    first = json.loads((done / "runs" / "dmp-s0" / "eval-0000002.json").read_text())
    assert again == {k: first[k] for k in again}  # an evaluation is a function of the checkpoint
    assert first["bpd"] != base["bpd"]
    import dmp
    model = dmp.load_model(study.BASE)
    dmp.patch(model, "dmp")
    path = done / "zero.pt"
    dmp.save_patch(model, path, base=study.BASE)
    zero = study.evaluate_checkpoint(str(path), bpd_images=2, samples=12, sample_steps=5)
    assert zero["bpd"] == base["bpd"] and zero["heldout_loss"] == base["heldout_loss"]
    assert np.array_equal(zero["samples"], base["samples"])
    assert zero["mse_bands"] == base["mse_bands"]


def test_a_second_run_reuses_and_an_interrupted_run_resumes(done, tmp_path):
    """Finished runs are skipped; a run cut short resumes from its last checkpoint and ends where it would have."""
    work = tmp_path / "again"
    shutil.copytree(done, work)
    run = next((work / "runs" / "prompt-s1").glob("[0-9]*"))
    final = run / "checkpoints" / "0000004.pt"
    expected = json.loads((work / "runs" / "prompt-s1" / "eval-0000004.json").read_text())
    final.unlink()
    (work / "runs" / "prompt-s1" / "eval-0000004.json").unlink()
    before = {p: p.stat().st_mtime_ns for p in (work / "runs").rglob("*.pt")}
    study.main(tiny(work))
    assert final.exists() and {p: p.stat().st_mtime_ns for p in before} == before  # nothing else retrained
    assert json.loads((work / "runs" / "prompt-s1" / "eval-0000004.json").read_text()) == expected
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
    assert g["entropy_high_t"] == pytest.approx(1.0) and g["max_over_uniform"] == pytest.approx(1.0)
    peaked = uniform.copy()
    peaked[:, :5] = [0.97, 0.01, 0.01, 0.01]  # low t: one prompt dominates
    g = study.gate_statistics(peaked)
    assert g["entropy_low_t"] < 0.2 < g["entropy_high_t"] == pytest.approx(1.0)


def test_the_readme_section_is_the_committed_json_rendered(tmp_path):
    """The acceptance of the study: README's tables and figures are study_report's rendering of assets/study/study.json."""
    data = json.loads((ROOT / "assets" / "study" / "study.json").read_text())
    report.draw_figures(data, tmp_path)
    for name in ("pretraining_curve.png", "fig5_gate.png"):
        drawn, committed = (np.asarray(Image.open(d / name)) for d in (tmp_path, ROOT / "assets" / "study"))
        assert np.array_equal(drawn, committed)
    assert report.readme_section(ROOT / "README.md") == report.render(data)
    assert (ROOT / "assets" / "study" / "study.md").read_text() == report.render(data)
    assert data["command"] == "python study.py" and data["settings"]["seeds"] == [0, 1, 2]
