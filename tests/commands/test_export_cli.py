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
        (["--out", "o"], "one of the arguments --model --model-factory --demo is required"),
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


FACTORY_SCRIPT = """
import torch
from torch import nn
from spark_ext.quant import quantize_model, qat_qconfig


class Net(nn.Module):  # defined in the script: a pickled whole model could not be loaded without it
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.tail = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.tail(self.body(x))


def build():
    model = Net()
    quantize_model(model, w_bits=8, a_bits=8)
    return model


def build_prepared():
    model = Net().train()
    model.qconfig = qat_qconfig()
    return torch.ao.quantization.prepare_qat(model)


not_a_function = 3


def returns_a_dict():
    return {}
"""


def _factory_files(tmp_path):
    """A user script with a model class, and the state dicts of its two trained models (an input through each)."""
    import importlib.util

    script = tmp_path / "user_models.py"
    script.write_text(FACTORY_SCRIPT)
    spec = importlib.util.spec_from_file_location("user_models_for_training", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    states = {}
    for fn in ("build", "build_prepared"):
        model = getattr(module, fn)()
        model(torch.rand(2, 3, 8, 8))  # initialises the quantizers / sets the observed scales
        states[fn] = tmp_path / f"{fn}.pth"
        torch.save(model.state_dict(), states[fn])
    return script, states


def test_export_from_a_factory_and_a_state_dict(tmp_path, capsys, monkeypatch):
    script, states = _factory_files(tmp_path)
    out = tmp_path / "m.onnx"
    shape = ["--input-shape", "1,3,8,8", "--out", str(out)]
    for fn in ("build", "build_prepared"):  # quantize_model layers; a torch.ao prepare_qat model
        argv = ["export", "--model-factory", f"{script}:{fn}", "--state-dict", str(states[fn])] + shape
        assert cli.main(argv) == 0
        assert out.is_file() and "onnxruntime vs fake-quant model" in capsys.readouterr().out
        out.unlink()
    # The same script as an importable module.
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["export", "--model-factory", "user_models:build", "--state-dict", str(states["build"])] + shape
    assert cli.main(argv) == 0 and out.is_file()


def test_factory_and_state_dict_errors_are_one_line_before_work(tmp_path, capsys, monkeypatch):
    script, states = _factory_files(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    state = torch.load(states["build"])
    extra = tmp_path / "extra.pth"
    torch.save({**state, "head.weight": torch.zeros(1)}, extra)
    short = tmp_path / "short.pth"
    torch.save({k: v for k, v in state.items() if k != "tail.bias"}, short)
    resized = tmp_path / "resized.pth"
    torch.save({**state, "tail.bias": torch.zeros(5)}, resized)
    (tmp_path / "list.pth").write_bytes(b"")
    torch.save([1, 2], tmp_path / "list.pth")
    good = str(states["build"])
    out = ["--input-shape", "1,3,8,8", "--out", str(tmp_path / "m.onnx")]
    for factory, state_dict, message in (
        ("no_such_module:build", good, "--model-factory: no module named 'no_such_module'"),
        (f"{tmp_path}/missing.py:build", good, "--model-factory: no such file:"),
        ("user_models:nope", good, "--model-factory: user_models has no function 'nope'"),
        (f"{script}:not_a_function", good, "is not callable (a int)"),
        ("user_models:returns_a_dict", good, "returned a dict, not an nn.Module"),
        ("user_models", good, "--model-factory: expected pkg.module:fn"),
        ("user_models:build", str(extra), "--state-dict: its keys do not match the model of --model-factory: "),
        ("user_models:build", str(short), "missing tail.bias"),
        ("user_models:build", str(resized), "--state-dict: does not fit the model of --model-factory: size mismatch"),
        ("user_models:build", str(tmp_path / "list.pth"), "--state-dict: " + str(tmp_path / "list.pth")),
        ("user_models:build", str(tmp_path / "nope.pth"), "--state-dict: no such file"),
    ):
        line = _one_line_error(["--model-factory", factory, "--state-dict", state_dict] + out, capsys)
        assert message in line, line
    line = _one_line_error(["--model-factory", "user_models:build", "--state-dict", str(extra)] + out, capsys)
    assert "unexpected head.weight" in line
    line = _one_line_error(["--model-factory", "user_models:build"] + out, capsys)
    assert "--model-factory needs --state-dict" in line
    line = _one_line_error(["--demo", "--out", str(tmp_path / "run"), "--state-dict", good], capsys)
    assert "--state-dict is only for --model-factory" in line
    assert not (tmp_path / "m.onnx").exists()
