"""`spark-ext export`: argument checks before any work, --model export, --demo round trip (smoke preset)."""

import json

import pytest
import torch
from torch import nn

pytest.importorskip("onnx", reason="needs the [export] extra")
pytest.importorskip("onnxruntime", reason="needs the [export] extra")
pytest.importorskip("onnxscript", reason="needs the [export] extra")

from spark_ext import cli  # noqa: E402
from spark_ext.quant import quantize_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "o"], "one of the arguments --model --demo is required"),
        (["--demo"], "the following arguments are required: --out"),
        (["--demo", "--out", "o", "--bits", "9"], "--bits: expected an integer in [2, 8], got 9"),
        (["--demo", "--out", "o", "--bits", "x"], "--bits: expected an integer in [2, 8], got 'x'"),
        (["--demo", "--out", "o", "--steps", "0"], "--steps: expected an integer >= 1, got 0"),
        (["--demo", "--out", "o", "--opset", "17", "--no-int4"], "--opset: expected an integer >= 18, got 17"),
        (["--demo", "--out", "o", "--opset", "99"], "--opset: expected at most "),
        (["--demo", "--out", "o", "--opset", "x"], "--opset: expected an integer >= 18, got 'x'"),
        (["--demo", "--out", "o", "--opset", "18"], "--opset 18 has no INT4/UINT4: use --opset 21 or --no-int4"),
        (["--demo", "--out", "o", "--input-shape", "1,3,8,8"], "--input-shape is only for --model"),
        (["--demo", "--out", "o", "--preset", "huge"], "--preset: invalid choice: 'huge'"),
        (["--model", "nope.pt", "--out", "m.onnx"], "--model needs --input-shape"),
        (
            ["--model", "nope.pt", "--out", "m.onnx", "--input-shape", "1,3,0"],
            "--input-shape: expected comma-separated",
        ),
        (["--model", "nope.pt", "--out", "m.onnx", "--input-shape", "1,3,8,8"], "--model: no such file: nope.pt"),
    ],
)
def test_bad_arguments_exit_2_before_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["export"] + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err


def test_model_file_must_be_onnx_and_demo_only_flags(tmp_path, capsys):
    path = tmp_path / "m.pt"
    torch.save(nn.Linear(2, 2), path)
    for argv, message in [
        (
            ["--model", str(path), "--out", str(tmp_path / "m.txt"), "--input-shape", "1,2"],
            "--out must name a .onnx file",
        ),
        (
            ["--model", str(path), "--out", str(tmp_path / "m.onnx"), "--input-shape", "1,2", "--steps", "3"],
            "--steps is only for --demo",
        ),
    ]:
        with pytest.raises(SystemExit) as exc:
            cli.main(["export"] + argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_export_model_file(tmp_path, capsys):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    quantize_model(model, w_bits=8, a_bits=8)
    model(torch.rand(1, 3, 8, 8))
    torch.save(model, tmp_path / "student.pt")
    out = tmp_path / "student.onnx"
    assert (
        cli.main(["export", "--model", str(tmp_path / "student.pt"), "--out", str(out), "--input-shape", "1,3,8,8"])
        == 0
    )
    assert out.is_file() and "onnxruntime vs fake-quant model" in capsys.readouterr().out
    # A model without quantized layers: one clear line, exit 2.
    torch.save(nn.Conv2d(3, 3, 1), tmp_path / "float.pt")
    code = cli.main(["export", "--model", str(tmp_path / "float.pt"), "--out", str(out), "--input-shape", "1,3,8,8"])
    assert code == 2 and "has no quantized layer" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_round_trip_smoke(tmp_path, capsys):
    pytest.importorskip("skimage", reason="needs the [demo] extra")
    out = tmp_path / "out"
    argv = [
        "export",
        "--demo",
        "--preset",
        "smoke",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--quiet",
    ]
    assert cli.main(argv) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert (out / "student.onnx").is_file() and (out / "student.pt").is_file()
    assert set(report["psnr"]) == {"fp32_teacher", "fake_quant", "onnx_fused", "onnx_unfused"}
    # Unfused, the graph computes the fake-quant model's levels: the same PSNR up to float rounding.
    assert abs(report["psnr_delta_onnx_unfused_vs_fake_quant"]) < 0.01
    assert abs(report["psnr_delta_onnx_fused_vs_fake_quant"]) < 0.1
    assert "dB vs fake-quant" in capsys.readouterr().out


def _one_line_error(argv, capsys) -> str:
    """The one line on stderr of an export that exits 2 (returned or raised)."""
    try:
        code = cli.main(["export"] + argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spark-ext export: error: "), lines
    return lines[0]


def test_bad_model_files_shapes_and_outputs_are_one_line(tmp_path, capsys):
    # Each of these was a traceback with exit status 1.
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    quantize_model(model, w_bits=8, a_bits=8)
    model(torch.rand(1, 3, 8, 8))
    good = tmp_path / "student.pt"
    torch.save(model, good)
    truncated, garbage = tmp_path / "truncated.pt", tmp_path / "garbage.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage.write_bytes(b"\x80\x04not a pickle at all")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    (tmp_path / "folder.onnx").mkdir()
    out = str(tmp_path / "m.onnx")
    for argv, flag, why in (
        (["--model", str(truncated), "--out", out, "--input-shape", "1,3,8,8"], "--model", "cannot load"),
        (["--model", str(garbage), "--out", out, "--input-shape", "1,3,8,8"], "--model", "cannot load"),
        (["--model", str(good), "--out", out, "--input-shape", "1,4,8,8"], "--input-shape", "does not run on"),
        (["--model", str(good), "--out", str(blocker / "m.onnx"), "--input-shape", "1,3,8,8"], "--out", "is a file"),
        (["--model", str(good), "--out", str(tmp_path / "folder.onnx"), "--input-shape", "1,3,8,8"], "--out", "folder"),
    ):
        line = _one_line_error(argv, capsys)
        assert flag in line and why in line, line
    assert not (tmp_path / "m.onnx").exists() and list((tmp_path / "folder.onnx").iterdir()) == []


def test_demo_with_an_unwritable_out_stops_before_training(tmp_path, capsys, monkeypatch):
    # It was found only once the teacher and the student had trained.
    import spark_ext.demo.teacher

    def trained(*args, **kwargs):
        pytest.fail("trained before --out was checked")

    monkeypatch.setattr(spark_ext.demo.teacher, "get_teacher", trained)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    argv = ["--demo", "--preset", "smoke", "--out", str(blocker / "out"), "--cache-dir", str(tmp_path / "cache")]
    line = _one_line_error(argv, capsys)
    assert "--out" in line and "not a writable folder" in line
    assert not (tmp_path / "cache").exists()
