"""study.py end to end on a tiny budget (stage 1, then stage 2 when it passes, and the stop when it
does not), its resuming, its evaluation, and the committed study's acceptance."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import heldout
import load
import settings
import study
import study_report as report
from checkpoints import file_sha256, read_state_dict
from dataset import PreparedData
from diffusion import create_diffusion

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, jobs=1):
    doc = tmp_path / "docs" / "study.md"
    if not doc.exists():
        doc.parent.mkdir()
        doc.write_text(f"# x\n\nbefore\n\n{report.BEGIN}\nold\n{report.END}\n\nafter\n")
    return ["--iterations", "4", "--seeds", "0,1", "--lr-scales", "1,0.0625", "--bpd-images", "2",
            "--sample-sets", "1", "--sample-steps", "2", "--scratch-iterations", "3",
            "--rows", "control,bands,dmp", "--ablations", "4c: uniform (no block index)",
            "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"), "--doc", str(doc),
            "--jobs", str(jobs)]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """The tiny study with stage 1 made to pass (4 iterations cannot), so stage 2 runs too."""
    tmp = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study, "margin_of", lambda c: 1e-3)
        study.main(tiny(tmp))
    return tmp


def test_the_tiny_study_end_to_end(done):
    data = json.loads((done / "out" / "study.json").read_text())
    markdown = report.render(data)
    assert (done / "out" / "study.md").read_text() == markdown
    assert report.section(done / "docs" / "study.md") == report.render(data, "../out")
    assert list(data["rows"]) == ["control", "bands", "dmp"]
    rows = data["rows"]
    assert set(rows["dmp"]["runs"]) == {"0", "1"} and set(rows["dmp"]["validation"]) == {
        "1.0", "0.0625"}
    assert rows["bands"]["trained"] == 4 * rows["control"]["trained"]  # a prompt set per band
    for r in rows.values():  # the chosen rate is the validation's lowest loss
        assert r["lr_scale"] == float(min(r["validation"], key=r["validation"].get))
        assert f"--lr-scale {r['lr_scale']!r}" in r["command"] and "--seed 0" in r["command"]
    assert "--time-bands 4" in rows["bands"]["command"]
    # the validation runs are seed 100 and measured on the validation split, the test runs not
    for folder, seed, split in (("val-bands-lr1", 100, "validation"), ("bands-s1", 1, "test")):
        log = next((done / "runs" / folder).glob("[0-9]*/log.jsonl"))
        assert json.loads(log.read_text().splitlines()[0])["args"]["seed"] == seed
        assert (done / "runs" / folder / f"eval-{split}-0000004.json").exists()
    assert data["margin"] == 1e-3 and not data["stopped"]
    stages = [(c["stage"], c["a"], c["b"]) for c in data["comparisons"] if c["stage"]]
    assert stages == [(1, "bands", "control"), (2, "dmp", "control")]
    assert set(data["ablations"]) == {"4c: uniform (no block index)"}
    assert set(data["scratch"]) == {"pretraining", "pretraining + DMP"}
    assert np.array(data["fig5"]["dmp"]).shape == (4, 100, 16)
    assert data["table5"]["samples"] == 297
    assert Image.open(done / "out" / "fig5_gate.png").size == (4 * 16 * 4 + 3 * 8, 100 * 4)
    for name in ("Stage 1, the positive control", "Learning rates", "The rule applied",
                 "How far each DMP gate", "Stage-specific", "Table 4", "Table 5", "Table 6",
                 "Fig. 5", "What this study cannot conclude", "--time-bands 4", data["rule"]):
        assert name in markdown, name
    # stage 1 is the first finding the study reports, before any table
    assert markdown.index("Stage 1, the positive control") < markdown.index("| ")


def test_a_stage_1_that_fails_stops_the_study(done, tmp_path, monkeypatch):
    """Without a passing positive control nothing of stage 2 is run or reported."""
    work = tmp_path / "again"
    shutil.copytree(done, work)
    trained = {p: p.stat().st_mtime_ns for p in (work / "runs").rglob("*.pt")}
    monkeypatch.setattr(study, "margin_of", lambda c: None)  # stage 1 made to fail, whatever
    monkeypatch.setattr(study, "decide", lambda interval, margin=None: "cannot tell")  # 4 steps do
    study.main(tiny(work))
    data = json.loads((work / "out" / "study.json").read_text())
    assert data["stopped"] and data["margin"] is None and list(data["rows"]) == ["control", "bands"]
    assert not data["ablations"] and not data["scratch"] and "fig5" not in data
    assert report.headline(data).startswith("**Verdict: this setup cannot tell")
    assert list((done / "out").glob("fig5_gate*.png")) and not list((work / "out").glob("fig5*"))
    assert "the study stops here" in report.render(data)
    assert {p: p.stat().st_mtime_ns for p in trained} == trained  # everything reused, nothing retrained
    assert data["reused_evaluations"] > 0


def test_an_interrupted_run_resumes(done, tmp_path):
    work = tmp_path / "again"
    shutil.copytree(done, work)
    folder = work / "runs" / "control-s1"
    final = next(folder.glob("[0-9]*")) / "checkpoints" / "0000004.pt"
    assert (final.parent / "0000002.pt").exists()  # the halfway checkpoint it resumes from
    expected = json.loads((folder / "eval-test-0000004.json").read_text())
    final.unlink()
    (folder / "eval-test-0000004.json").unlink()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study, "margin_of", lambda c: 1e-3)
        study.main(tiny(work))
    assert final.exists()
    assert json.loads((folder / "eval-test-0000004.json").read_text()) == expected
    timing = ("wall_minutes", "reused_evaluations")
    again, first = (json.loads((d / "out" / "study.json").read_text().replace(str(d), ""))
                    for d in (work, done))
    assert {k: v for k, v in again.items() if k not in timing} == {
        k: v for k, v in first.items() if k not in timing}


def test_a_zero_patch_measures_as_the_base(done):
    """Fixed draws: DMP at step 0 is the base exactly, so a row's change is its own, not noise's."""
    import dmp
    import load
    base = json.loads((done / "runs" / "base" / "eval-test-0000000.json").read_text())
    model = load.load_model(study.BASE)
    dmp.patch(model, "dmp")
    path = done / "zero.pt"
    load.save_patch(model, path, base=study.BASE)
    zero = study.evaluate_checkpoint(str(path), bpd_images=2, sample_sets=1, sample_steps=2,
                                     keep_samples=True)
    assert zero["bpd"] == base["bpd"] and zero["heldout_loss"] == base["heldout_loss"]
    assert zero["mse_bands"] == base["mse_bands"] and zero["quality"] == base["quality"]
    assert np.array_equal(zero["samples"], base["samples"])
    assert zero["gate"]["gate_dev_max"] == 0.0 == zero["gate"]["gate_tv_t"]  # a zero gate: uniform
    validation = study.evaluate_checkpoint(str(path), split="validation")
    assert set(validation) == {"heldout_loss"} and validation["heldout_loss"] != base["heldout_loss"]


def test_the_splits_are_disjoint_and_fixed():
    from dataset import PreparedData
    train, validation, test = study.splits(PreparedData(ROOT / study.DATA))
    assert (len(validation), len(test)) == (148, 149)
    assert not set(train) & set(validation) and not set(validation) & set(test)
    assert not set(train) & set(test)


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


def test_the_committed_study(tmp_path):
    """
    The acceptance: the committed study is the full one (5 seeds, the positive control first), its
    figures are study.json's drawn, and every figure docs/study.md links exists.
    """
    data = json.loads((ROOT / "assets" / "study" / "study.json").read_text())
    assert data["command"] == "python study.py" and data["settings"]["seeds"] == [0, 1, 2, 3, 4]
    assert list(data["rows"])[:2] == ["control", "bands"]
    report.draw_figures(data, tmp_path)
    for name in ["pretraining_curve.png"] + [report.figure_name(k) for k in data.get("fig5", {})]:
        drawn, committed = (np.asarray(Image.open(d / name)) for d in (tmp_path, ROOT / "assets" / "study"))
        assert np.array_equal(drawn, committed)
    doc = report.section(ROOT / "docs" / "study.md")
    import re
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", doc):
        assert (ROOT / "docs" / link).is_file(), link
    assert (ROOT / "assets" / "study" / "study.md").read_text() == report.render(data)


def test_only_the_committed_study_rewrites_the_doc(tmp_path):
    """A --quick or trial run into another --out leaves docs/study.md and the README alone."""
    committed = study.parse_args([])
    assert committed.doc == str(ROOT / "docs" / "study.md") and committed.readme == str(ROOT / "README.md")
    trial = study.parse_args(["--quick", "--out", str(tmp_path)])
    assert trial.doc == "" and trial.readme == ""
    assert study.parse_args(["--out", str(tmp_path), "--doc", "x.md"]).doc == "x.md"
    with pytest.raises(SystemExit):
        study.parse_args(["--seeds", "0"])  # one seed has no interval
    with pytest.raises(SystemExit):
        study.parse_args(["--seeds", "0,100"])  # the validation seed


def test_the_committed_base_was_made_by_its_recipe():
    """
    assets/study/base.pt is what study.PRETRAIN makes: its log records every setting the recipe
    gives (where the run's folder was, and how many checkpoints it kept, aside), the study
    measures models with its data settings (study.DATA_FLAGS), and the file is its last step's.
    """
    recorded = study.started(ROOT / study.BASE_LOG)["args"]
    recipe = {k: v for k, v in vars(settings.parse_args(study.PRETRAIN)).items()
              if k not in ("given", "results_dir", "keep")}
    assert {k: recorded.get(k) for k in recipe} == recipe
    measured = vars(study.measured_as())  # and every model is measured on the data it trained on
    assert {k: recorded[k] for k in ("unconditional", "augment")} == {
        k: measured[k] for k in ("unconditional", "augment")}
    assert read_state_dict(ROOT / study.BASE)["step"] == study.BASE_ITERATIONS


def test_the_gap_pairs_each_test_digit_with_training_digits_on_its_draws():
    model = load.load_model(str(ROOT / study.BASE)).eval()
    data = PreparedData(ROOT / study.DATA)
    _, _, test = study.splits(data)
    settings = study.measured_as()
    diffusion = create_diffusion("", "cosine")
    r = heldout.evaluate(model, diffusion, data, test, settings, torch.device("cpu"), per_image=True)
    assert len(r["losses"]) == len(test)
    # the mean sums in float64, heldout_loss each draw's 149 float32 losses in float32: n u = 9e-6
    assert np.mean(r["losses"]) == pytest.approx(r["heldout_loss"], rel=1e-5)
    # the test digits as three groups of "training digits": each position meets its own draws
    g = study.gap(model, diffusion, data, np.concatenate([test] * 3), r["losses"], settings)
    assert g["train_digits"] == 3 * len(test)
    assert g["train_loss"] == pytest.approx(np.mean(r["losses"]), rel=1e-12) and g["gap_se"] == 0
    # the same digits one position on: the same mean image set, other draws, a non-zero spread
    moved = study.gap(model, diffusion, data, np.roll(test, 1), r["losses"], settings)
    assert moved["gap_se"] > 0 and moved["train_loss"] != g["train_loss"]


def test_a_runs_dir_belongs_to_one_base_and_its_settings(done, tmp_path):
    """Runs and evaluations made from another base or with other settings are never reused."""
    work = tmp_path / "again"
    shutil.copytree(done, work)
    path = work / "runs" / "runs.json"
    stamp = json.loads(path.read_text())
    assert stamp["base_sha256"] == file_sha256(ROOT / study.BASE) and stamp["iterations"] == 4
    with pytest.raises(SystemExit, match=r"another iterations \(4 here, 5 now\)"):
        study.main(tiny(work) + ["--iterations", "5"])
    path.write_text(json.dumps(dict(stamp, base_sha256="0" * 64)))
    with pytest.raises(SystemExit, match="another base_sha256"):
        study.main(tiny(work))
    path.unlink()
    with pytest.raises(SystemExit, match="no runs.json"):
        study.main(tiny(work))
    assert (work / "out" / "study.json").read_text() == (done / "out" / "study.json").read_text()


def test_a_quick_check_leaves_the_committed_results_alone():
    quick, full = study.parse_args(["--quick"]), study.parse_args([])
    assert Path(quick.out) != Path(study.OUT) and quick.doc == "" and quick.readme == ""
    assert Path(quick.runs_dir) != Path(full.runs_dir)
    assert full.out == study.OUT and full.doc.endswith(study.DOC) and full.readme.endswith(study.README)


def test_a_missing_base_is_pretrained_and_a_finished_pretraining_not_run_again(tmp_path, monkeypatch):
    flags = ["--dataset", "digits", "--model", study.BASE_MODEL, "--lr", "1e-3", "--iterations", "4",
             "--eval-every", "2", "--sample-every", "0", "--ckpt-every", "2"]
    monkeypatch.setattr(study, "PRETRAIN", flags)
    monkeypatch.setattr(study, "BASE_ITERATIONS", 4)
    monkeypatch.setattr(study, "BASE", str(tmp_path / "base.pt"))
    monkeypatch.setattr(study, "BASE_LOG", str(tmp_path / "base.log.jsonl"))
    args = study.parse_args(["--runs-dir", str(tmp_path / "runs"), "--jobs", "1"])
    study.pretrain_base(args)
    base = torch.load(tmp_path / "base.pt", weights_only=True)
    assert set(base) == set(study.BASE_ENTRIES) and base["step"] == 4
    assert [s for s, _ in study.pretraining_curve()] == [2, 4]  # the base's log, copied
    (tmp_path / "base.pt").unlink()
    ran = []
    monkeypatch.setattr(study, "command", lambda *a: ran.append(a))
    study.pretrain_base(args)  # its run is finished: the base is taken from it, nothing trains
    assert not ran and torch.load(tmp_path / "base.pt", weights_only=True)["step"] == 4
