"""``spark-ext study``: argument checks before any work, paired statistics, and a tiny end-to-end run."""

import json

import pytest

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")
pytest.importorskip("spark_ext.quant", reason="spark_ext.quant (QAT toolkit) is not available yet")

from spark_ext import study  # noqa: E402
from spark_ext.demo.presets import PRESETS as DEMO_PRESETS  # noqa: E402


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "deblur"], "--tasks"),
        (["--methods", "qat,magic"], "--methods"),
        (["--seeds", "0"], "--seeds"),
        (["--steps", "x"], "--steps"),
        (["--lambdas", "1,-2"], "--lambdas"),
        (["--workers", "0"], "--workers"),
        (["--student-lr", "0"], "--student-lr"),
        (["--student-lr", "nan"], "--student-lr"),
        (["--student-schedule", "step"], "--student-schedule"),
        (["--device", "cuda:99"], "--device"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        study.main(argv + ["--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_summary_picks_the_best_kd_and_pairs_by_seed():
    rows = []
    for seed in range(3):
        for method, psnr, ms in (
            ("qat", 29.0, 10.0),
            ("kd@0.5", 29.1, 20.0),
            ("kd@1", 29.05, 20.0),
            ("spark", 29.2, 21.0),
        ):
            rows.append(
                {
                    "task": "denoise",
                    "method": method,
                    "seed": seed,
                    "psnr": psnr + 0.01 * seed,
                    "ssim": 0.8,
                    "ms_per_step": ms,
                }
            )
    res = study.summarise(rows, ["denoise"], ["qat", "kd@0.5", "kd@1", "spark"])["denoise"]
    assert res["best_kd"] == "kd@0.5" and res["seeds"] == [0, 1, 2]
    spark = res["methods"]["spark"]
    assert spark["vs_best_kd"]["mean"] == pytest.approx(0.1) and spark["vs_qat"]["mean"] == pytest.approx(0.2)
    assert spark["cost_vs_kd"] == pytest.approx(21.0 / 20.0)
    assert "vs_best_kd" not in res["methods"]["kd@0.5"]


def test_tiny_study_writes_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setitem(study.PRESETS, "quick", study.StudyPreset("quick", "smoke", 2, 3, 2, (1.0,), 1))
    out = tmp_path / "out"
    argv = [
        "--quick",
        "--tasks",
        "denoise,sr",
        "--methods",
        "qat,kd@1,kd_gate,map_random,spark,spark_paper",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
        "--device",
        "cpu",
        "--student-lr",
        "0.002",
        "--student-schedule",
        "constant",
    ]
    assert study.main(argv) == 0
    report = json.loads((out / "study.json").read_text())
    assert report["preset"]["demo"]["student_lr"] == 0.002
    assert report["preset"]["demo"]["student_schedule"] == "constant"
    assert set(report["tasks"]) == {"denoise", "sr"}
    for task in ("denoise", "sr"):
        methods = report["tasks"][task]["methods"]
        assert set(methods) == {"qat", "kd@1", "kd_gate", "map_random", "spark", "spark_paper"}
        assert set(methods["spark"]["per_seed"]) == {"0", "1"}
        assert "vs_qat" in methods["spark"] and "vs_best_kd" in methods["spark"]
    assert len(report["runs"]) == 2 * 2 * 6
    assert (out / "study.png").stat().st_size > 1000


def test_resume_trains_only_the_missing_students(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(study.PRESETS, "quick", study.StudyPreset("quick", "smoke", 2, 3, 2, (1.0,), 1))
    out = tmp_path / "out"
    common = [
        "--quick",
        "--tasks",
        "denoise",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
        "--device",
        "cpu",
    ]
    assert study.main(common + ["--methods", "qat,kd@1"]) == 0
    first = json.loads((out / "study.json").read_text())
    calls = []
    original = study.run_job
    monkeypatch.setattr(study, "run_job", lambda job: calls.append(job["method"]) or original(job))
    assert study.main(common + ["--methods", "spark", "--resume"]) == 0
    assert calls == ["spark", "spark"]  # one per seed; qat and kd@1 were reused
    report = json.loads((out / "study.json").read_text())
    assert set(report["tasks"]["denoise"]["methods"]) == {"qat", "kd@1", "spark"}
    assert report["runs"][:4] == first["runs"]
    assert report["preset"]["demo"]["student_lr"] == DEMO_PRESETS["smoke"].student_lr
    capsys.readouterr()
    # another budget or optimiser: refused before any work
    for other in (["--steps", "3"], ["--student-lr", "0.123"], ["--student-schedule", "constant"]):
        with pytest.raises(SystemExit) as exc:
            study.main(common + ["--methods", "qat", "--resume"] + other)
        assert exc.value.code == 2 and "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("schedule", ["cosine", "constant", "constant_then_linear"])
def test_student_schedule_sets_the_lr_over_the_run(schedule):
    import dataclasses

    import torch

    from spark_ext.data import RestorationTask
    from spark_ext.demo.training import make_ptq, train_student
    from spark_ext.models import build_model

    task = RestorationTask("denoise")
    preset = dataclasses.replace(DEMO_PRESETS["smoke"], student_steps=4, student_schedule=schedule)
    torch.manual_seed(0)
    teacher = build_model("denoise", preset.width, depth=preset.depth).requires_grad_(False)
    base = make_ptq(teacher, task, preset, 0, torch.device("cpu"))
    _, distiller, _, _ = train_student("kd", base, teacher, task, preset, 0, torch.device("cpu"), True)
    final_lr = distiller.optimizer.param_groups[0]["lr"]
    assert final_lr == (preset.student_lr if schedule == "constant" else 0.0)
    bad = dataclasses.replace(preset, student_schedule="step")
    with pytest.raises(ValueError, match="student_schedule"):
        train_student("kd", base, teacher, task, bad, 0, torch.device("cpu"), True)


def test_constant_then_linear_holds_three_quarters_then_decays_to_zero():
    import torch

    from spark_ext.demo.training import student_schedule

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(()))], lr=2e-3)
    sched = student_schedule(opt, 200, "constant_then_linear")
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == lrs[150] == 2e-3
    assert lrs[175] == pytest.approx(1e-3) and lrs[199] == pytest.approx(2e-3 / 50)
    assert opt.param_groups[0]["lr"] == 0.0
    assert student_schedule(opt, 200, "constant") is None
    with pytest.raises(ValueError, match="student_schedule"):
        student_schedule(opt, 200, "step")
