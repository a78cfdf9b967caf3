"""Smoke test of the main job: ``spark-ext demo --preset smoke`` (a few steps, seconds)."""

import dataclasses
import json

import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")
pytest.importorskip("spark_ext.quant", reason="spark_ext.quant (QAT toolkit) is not available yet")

from spark_ext.commands import demo as cli  # noqa: E402
from spark_ext.demo.presets import PRESETS  # noqa: E402
from spark_ext.demo.teacher import get_teacher, uses_pretrained_teacher  # noqa: E402
from spark_ext.demo.training import lsq_quantizers, make_ptq, student_optimizer  # noqa: E402


def test_smoke_denoise_writes_table_pictures_and_caches_the_teacher(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    argv = ["--preset", "smoke", "--out", str(out), "--cache-dir", str(cache), "--quiet", "--device", "cpu"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert "teacher: trained" in first and "backends used: difficulty_signals=" in first
    for label in ("FP32 teacher", "PTQ W4A4", "QAT W4A4", "KD W4A4", "SPARK W4A4", "GoR W4A4", "LMR W4A4"):
        assert label in first
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == {"input", "fp32", "ptq", "qat", "kd", "spark", "gor", "lmr"}
    for row in report["results"].values():
        assert 5.0 < row["psnr_mean"] < 60.0 and -1.0 <= row["ssim_mean"] <= 1.0
    for png in ("crops.png", "spark_weight_map.png", "curves.png"):
        assert (out / png).stat().st_size > 1000
    assert len(list(cache.glob("*.pt"))) == 1

    # Second run: the teacher comes from the cache and every number is reproduced.
    assert cli.main(argv) == 0
    assert "teacher: loaded from cache" in capsys.readouterr().out
    again = json.loads((out / "results.json").read_text())
    for method, row in report["results"].items():
        assert again["results"][method]["psnr_mean"] == row["psnr_mean"], method


def test_smoke_sr_with_dfd(tmp_path, capsys):
    argv = [
        "--preset",
        "smoke",
        "--task",
        "sr",
        "--methods",
        "ptq,spark,dfd",
        "--out",
        str(tmp_path),
        "--no-cache",
        "--quiet",
    ]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["results"]) == {"input", "fp32", "ptq", "spark", "dfd"}
    assert "Y channel" in report["metric_notes"] and "border = scale" in report["metric_notes"]


def test_eval_images_folder_is_scored_and_checked_first(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)).save(photos / "a.png")
    Image.fromarray(rng.integers(0, 256, (34, 30), dtype=np.uint8)).save(photos / "b.JPG")
    (photos / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    argv = [
        "--preset",
        "smoke",
        "--task",
        "sr",
        "--methods",
        "ptq,qat",
        "--out",
        str(out),
        "--no-cache",
        "--quiet",
        "--eval-images",
        str(photos),
    ]
    assert cli.main(argv) == 0
    assert "PSNR (DIR)" in capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    assert report["eval_images"]["images"] == ["a.png", "b.JPG"]
    for row in report["results"].values():
        assert 3.0 < row["eval_images_psnr_mean"] < 60.0
        assert set(row["runs"][0]["eval_images"]["per_image"]) == {"a.png", "b.JPG"}

    empty = tmp_path / "empty"
    empty.mkdir()
    (photos / "broken.png").write_bytes(b"not a png")
    for bad, why in ((tmp_path / "nowhere", "does not exist"), (empty, "has no"), (photos, "cannot read image")):
        with pytest.raises(SystemExit) as info:
            cli.main(["--preset", "smoke", "--out", str(tmp_path / "x"), "--eval-images", str(bad)])
        assert info.value.code == 2
        assert why in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_default_preset_uses_the_shipped_teacher_unless_retraining(capsys):
    import torch

    from spark_ext.data import RestorationTask
    from spark_ext.models import PRETRAINED_TEACHERS

    task, cpu = RestorationTask("denoise"), torch.device("cpu")
    teacher, info = get_teacher(task, PRESETS["default"], cpu, None, quiet=True)
    assert info["pretrained"] and info["sha256"] == PRETRAINED_TEACHERS["denoise"].sha256
    assert "shipped denoise teacher" in capsys.readouterr().out
    assert not uses_pretrained_teacher(task, PRESETS["smoke"])
    assert not uses_pretrained_teacher(RestorationTask("denoise", sigma=0.1), PRESETS["default"])
    tiny = dataclasses.replace(PRESETS["default"], teacher_steps=1, width=16)
    _, info = get_teacher(task, tiny, cpu, None, quiet=True, retrain=True)
    assert not info["pretrained"] and info["steps"] == 1


def _no_work(*args, **kwargs):
    pytest.fail("work started before the arguments were checked")


def _rejected(argv, capsys) -> str:
    """The one line on stderr of a demo run rejected before any work (exit 2)."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spark-ext demo: error: "), lines
    return lines[0]


def test_bad_arguments_are_rejected(tmp_path, capsys):
    for flag, value in (
        ("--steps", "0"),
        ("--teacher-steps", "-3"),
        ("--seeds", "0"),
        ("--threads", "0"),
        ("--steps", "x"),
    ):
        assert f"argument {flag}" in _rejected(["--preset", "smoke", flag, value, "--out", str(tmp_path)], capsys)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--methods", "ptq,magic", "unknown ['magic']"),
        ("--methods", "", "no method given"),
        ("--methods", " , ", "no method given"),
        ("--methods", "spark,kd,spark", "['spark'] given more than once"),
        ("--device", "cuda" if not torch.cuda.is_available() else "cuda:99", "--device"),
        ("--device", "gpu", "expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("--device", "meta", "the demo runs on 'cpu' or 'cuda'"),
        ("--backend", "triton", "lsq_fake_quant"),
    ],
)
def test_every_argument_is_checked_before_any_work(tmp_path, capsys, monkeypatch, flag, value, message):
    # Issue 10, defects 10 and 11: these failed only after training the teacher, or trained nothing / twice.
    monkeypatch.setattr(cli, "get_teacher", _no_work)
    line = _rejected(["--preset", "smoke", flag, value, "--out", str(tmp_path / "out"), "--no-cache"], capsys)
    assert message in line


def test_unwritable_out_and_cache_are_rejected_before_any_work(tmp_path, capsys, monkeypatch):
    # Issue 10, defect 9: --out was created only after every model had trained.
    monkeypatch.setattr(cli, "get_teacher", _no_work)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    line = _rejected(["--preset", "smoke", "--out", str(blocker / "out"), "--no-cache"], capsys)
    assert "argument --out" in line and "not a writable folder" in line
    line = _rejected(["--preset", "smoke", "--out", str(tmp_path / "out"), "--cache-dir", str(blocker)], capsys)
    assert "argument --cache-dir" in line and "--no-cache" in line


def test_ptq_student_trains_even_when_the_teacher_is_frozen():
    import torch

    from spark_ext.data import RestorationTask
    from spark_ext.models import build_model

    teacher = build_model("denoise", 4, depth=1).requires_grad_(False)
    student = make_ptq(teacher, RestorationTask(), PRESETS["smoke"], 0, torch.device("cpu"))
    assert all(p.requires_grad for p in student.parameters())
    opt = student_optimizer(student, 1e-3, 1e-2)
    n_quant = len(lsq_quantizers(student))
    assert len(opt.param_groups) == 1 + n_quant and n_quant > 0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(student.parameters()))


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),  # truncated
        lambda path: path.write_bytes(b"garbage" * 100),
        lambda path: torch.save(["not", "a", "teacher"], path),
        lambda path: torch.save({"key": "?", "weights": {}}, path),
    ],
    ids=["truncated", "garbage", "a-list", "no-state-dict"],
)
def test_an_unreadable_cached_teacher_is_retrained_with_a_warning(tmp_path, capsys, corrupt):
    # A broken cache file made every later run die in torch.load, for good.
    from spark_ext.data import RestorationTask

    task, cpu, cache = RestorationTask("denoise"), torch.device("cpu"), tmp_path / "cache"
    _, info = get_teacher(task, PRESETS["smoke"], cpu, cache, quiet=True)
    (path,) = cache.glob("*.pt")
    assert not info["cached"] and info["path"] == str(path)
    corrupt(path)
    capsys.readouterr()
    _, info = get_teacher(task, PRESETS["smoke"], cpu, cache, quiet=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith(f"warning: teacher cache {path} is unreadable") and "retraining" in err[0]
    )
    assert not info["cached"] and [p.name for p in cache.iterdir()] == [path.name]  # rewritten, no temporary left
    _, info = get_teacher(task, PRESETS["smoke"], cpu, cache, quiet=True)
    assert info["cached"] and capsys.readouterr().err == ""


def test_an_eval_image_over_pils_pixel_limit_is_one_line(tmp_path, capsys, monkeypatch):
    # PIL's DecompressionBombError was a traceback.
    import numpy as np
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(photos / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # 1600 pixels: over twice the limit, a bomb to PIL
    monkeypatch.setattr(cli, "get_teacher", _no_work)
    line = _rejected(["--preset", "smoke", "--out", str(tmp_path / "out"), "--eval-images", str(photos)], capsys)
    assert "argument --eval-images: cannot read image" in line and "huge.png" in line
    assert not (tmp_path / "out").exists()
