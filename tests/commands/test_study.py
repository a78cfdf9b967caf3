"""``spark-ext study``: argument checks before any work, paired statistics, and a tiny end-to-end run."""

import dataclasses
import json

import pytest

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")
pytest.importorskip("spark_ext.quant", reason="spark_ext.quant (QAT toolkit) is not available yet")

from spark_ext.commands import study  # noqa: E402
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
        (["--device", "meta"], "--device"),
        (["--tasks", "denoise,denoise"], "--tasks"),
        (["--methods", "qat,kd@1,qat"], "--methods"),
        (["--lambdas", "1,2,1.0"], "--lambdas"),
        (["--eval-images", "/nonexistent/photos"], "--eval-images"),
    ],
)
def test_bad_arguments_exit_2_before_any_work(tmp_path, capsys, no_work, argv, message):
    # --device meta failed deep inside the first student; --tasks denoise,denoise trained everything twice.
    with pytest.raises(SystemExit) as exc:
        study.main(argv + ["--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


@pytest.fixture
def no_work(monkeypatch):
    def started(*args, **kwargs):
        pytest.fail("work started before the arguments were checked")

    monkeypatch.setattr(study, "study_teacher", started)
    monkeypatch.setattr(study, "run_job", started)


def _rejected(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        study.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spark-ext study: error: "), err
    return err[0]


def test_out_under_a_file_is_refused_before_any_work(tmp_path, capsys, no_work):
    # It was a NotADirectoryError traceback.
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert "--out" in _rejected(["--out", str(blocker / "out")], capsys)
    assert "--out" in _rejected(["--out", str(blocker)], capsys)
    # the 'gpu' preset's network has no shipped teacher: it trains one, into --cache-dir
    argv = ["--out", str(tmp_path / "out"), "--preset", "gpu", "--cache-dir", str(blocker)]
    assert "--cache-dir" in _rejected(argv, capsys)
    assert blocker.read_text() == "" and not (tmp_path / "out").exists()


def test_an_existing_study_is_kept_without_resume(tmp_path, capsys, no_work):
    # It was replaced, without a word, after the first student of the new run.
    out = tmp_path / "out"
    out.mkdir()
    (out / "study.json").write_text('{"runs": ["hours of results"]}')
    line = _rejected(["--out", str(out), "--device", "cpu"], capsys)
    assert "--resume" in line and "another --out" in line
    assert (out / "study.json").read_text() == '{"runs": ["hours of results"]}'
    assert [p.name for p in out.iterdir()] == ["study.json"]


def _run(method="qat", seed=0, **changes):
    row = {"task": "denoise", "method": method, "seed": seed, "psnr": 30.0, "ssim": 0.9, "ms_per_step": 1.0}
    return {**row, **changes}


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "cannot be read"),
        ('{"runs": [{"task": "denoise", "met', "cannot be read"),
        ("[1, 2]", "is not a study's report"),
        ('"a string"', "is not a study's report"),
        (b"\xff\xfe not utf-8", "cannot be read"),
        ({"runs": [_run(method="magic")]}, "unknown method 'magic'"),
        ({"runs": [_run(method="kd@-1")]}, "unknown method 'kd@-1'"),
        ({"runs": [_run(task="deblur")]}, "unknown task 'deblur'"),
        ({"runs": [_run(seed="0")]}, "not an integer"),
        ({"runs": [_run(psnr=None)]}, "psnr that is not a number"),
        ({"runs": [["not", "a", "run"]]}, "not an object"),
        ({"runs": [{"task": "denoise"}]}, "has no method"),
        ({"runs": "all of them"}, "is not a study's report"),
    ],
)
def test_resume_from_a_bad_study_json_is_one_line_before_any_work(tmp_path, capsys, no_work, content, message):
    # These were JSONDecodeError / AttributeError tracebacks, or a KeyError after the teachers had loaded.
    out = tmp_path / "out"
    argv = ["--out", str(out), "--device", "cpu", "--tasks", "denoise", "--cache-dir", str(tmp_path / "cache")]
    if isinstance(content, dict):
        preset = study.study_preset(study.parse_args(argv))
        content = json.dumps({"preset": {"demo": dataclasses.asdict(preset)}, **content})
    out.mkdir()
    (out / "study.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    before = (out / "study.json").read_bytes()
    line = _rejected(argv + ["--resume"], capsys)
    assert "--resume" in line and str(out / "study.json") in line and message in line
    assert (out / "study.json").read_bytes() == before


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


@pytest.mark.parametrize("schedule", ["cosine", "constant", "constant_then_linear", "warmup_then_linear"])
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


def test_warmup_then_linear_rises_from_0_15_over_half_holds_then_decays_to_zero():
    import torch

    from spark_ext.demo.training import student_schedule

    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(()))], lr=4e-3)
    sched = student_schedule(opt, 200, "warmup_then_linear")
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.15 * 4e-3)
    assert lrs[50] == pytest.approx((0.15 + 0.85 * 0.5) * 4e-3)  # linear over the first half
    assert all(a < b for a, b in zip(lrs[:100], lrs[1:101]))
    assert lrs[100] == lrs[150] == 4e-3
    assert lrs[175] == pytest.approx(2e-3) and lrs[199] == pytest.approx(4e-3 / 50)
    assert opt.param_groups[0]["lr"] == 0.0


def _photos(folder, sizes):
    import numpy as np
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for k, size in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)).save(folder / f"p{k}.png")
    return folder


def test_eval_images_that_cannot_be_scored_exit_2_before_any_work(tmp_path, capsys, no_work):
    empty = tmp_path / "empty"
    empty.mkdir()
    small = _photos(tmp_path / "small", [40, 8])
    for folder, message in ((empty, "has no"), (small, "images smaller than")):
        line = _rejected(["--eval-images", str(folder), "--out", str(tmp_path / "out")], capsys)
        assert "--eval-images" in line and message in line
    assert not (tmp_path / "out").exists()


def test_eval_images_score_every_student_with_the_same_paired_statistics(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(study.PRESETS, "quick", study.StudyPreset("quick", "smoke", 2, 3, 2, (1.0,), 1))
    photos = _photos(tmp_path / "photos", [40, 48])
    out = tmp_path / "out"
    argv = ["--quick", "--tasks", "denoise,sr", "--methods", "qat,kd@1,spark,spark_placement,kd_growth"]
    argv += ["--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quiet", "--device", "cpu"]
    assert study.main(argv + ["--eval-images", str(photos)]) == 0
    report = json.loads((out / "study.json").read_text())
    assert report["eval_images"] == {"dir": str(photos), "photos": ["p0.png", "p1.png"]}
    for task in ("denoise", "sr"):
        methods = report["tasks"][task]["methods"]
        for name, entry in methods.items():
            runs = [r for r in report["runs"] if r["task"] == task and r["method"] == name]
            assert entry["eval_psnr_mean"] == pytest.approx(sum(r["eval_psnr"] for r in runs) / 2)
            assert entry["eval_psnr_mean"] != pytest.approx(entry["psnr_mean"])  # other photos
        pairs = [(r["eval_psnr"], r["seed"]) for r in report["runs"] if r["task"] == task]
        by = {(r["method"], r["seed"]): r["eval_psnr"] for r in report["runs"] if r["task"] == task}
        assert len(pairs) == 10
        d = methods["kd_growth"]["eval_vs_qat"]
        assert d["n"] == 2 and d["mean"] == pytest.approx(
            sum(by[("kd_growth", s)] - by[("qat", s)] for s in (0, 1)) / 2
        )
        assert "eval_vs_best_kd" in methods["spark_placement"]
    table = capsys.readouterr().out
    assert "denoise, --eval-images" in table and "sr, held-out photos" in table
    # --resume must score the same photos: another folder is refused before any work.
    other = _photos(tmp_path / "other", [44])
    line = _rejected(argv + ["--resume", "--eval-images", str(other)], capsys)
    assert "--resume" in line and "other --eval-images photos" in line


def test_cuda_workers_spread_round_robin_over_every_visible_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(study.os, "cpu_count", lambda: 16)
    assert study.worker_devices("cuda", 7) == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1", "cuda:2", "cuda:0"]
    assert study.worker_devices("cuda:2", 2) == ["cuda:2", "cuda:2"]
    assert study.worker_devices("cpu", 2) == ["cpu", "cpu"]
    assert study.default_workers("cuda", 2) == 3 * study.WORKERS_PER_GPU
    assert study.default_workers("cuda:1", 2) == study.WORKERS_PER_GPU
    assert study.default_workers("cpu", 2) == 2
    monkeypatch.setattr(study.os, "cpu_count", lambda: 6)
    assert study.default_workers("cuda", 2) == 6  # one worker per core at most


def _worker_device(_):
    import os
    import time

    time.sleep(0.2)  # long enough for every worker to take jobs
    return os.getpid(), study._WORKER_DEVICE


def test_each_pool_worker_keeps_the_device_it_was_given():
    from collections import Counter

    devices = ["cuda:0", "cuda:1", "cuda:0"]  # names only: _worker_device touches no device
    with study.worker_pool(devices) as pool:
        seen = list(pool.map(_worker_device, range(12)))
    by_worker = {}
    for pid, device in seen:
        by_worker.setdefault(pid, set()).add(device)
    assert all(len(d) == 1 for d in by_worker.values())  # a worker's jobs all run on its device
    taken = Counter(d.pop() for d in by_worker.values())
    assert taken and not taken - Counter(devices)  # each worker took its own entry of the list


def test_a_preset_names_its_methods_and_the_gpu_lease_preset_is_the_short_gpu_matrix(tmp_path, no_work):
    args = study.parse_args(["--preset", "gpu-lease", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert args.methods == ["qat", "kd@1", "spark", "spark_placement", "kd_growth", "gor"]
    assert args.tasks == ["denoise", "sr"] and args.seeds == (0, 1, 2)
    assert study.study_preset(args).student_schedule == "warmup_then_linear"
    args = study.parse_args(["--preset", "gpu-lease", "--methods", "all", "--out", str(tmp_path / "out")])
    assert args.methods == study.all_method_names((1.0,))
