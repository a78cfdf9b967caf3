"""Every ``spark-ext`` command on bad input: exit 2, one line on stderr naming the argument,
nothing written to its output folder, and no work started (the training entry points fail the test if
called). Also the atomic results-file helper they write with."""

import shutil

import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("spark_ext.quant", reason="spark_ext.quant (QAT toolkit) is not available yet")

import spark_ext.commands.bench  # noqa: E402
import spark_ext.commands.classify  # noqa: E402
import spark_ext.commands.daqakd  # noqa: E402
import spark_ext.commands.demo  # noqa: E402
import spark_ext.commands.study  # noqa: E402
import spark_ext.demo.teacher  # noqa: E402
import spark_ext.demo.training  # noqa: E402
import spark_ext.models.pretrained  # noqa: E402
import spark_ext.quant.export  # noqa: E402
from spark_ext.atomic import atomic_path, write_json  # noqa: E402
from spark_ext.cli import main  # noqa: E402

# Where each command starts its work: reaching one of these means an argument was not checked first.
WORK = [
    (spark_ext.demo.teacher, "get_teacher"),
    (spark_ext.demo.teacher, "train_teacher"),
    (spark_ext.commands.demo, "get_teacher"),
    (spark_ext.commands.demo, "compare_methods"),
    (spark_ext.demo.training, "train_student"),
    (spark_ext.demo.training, "make_ptq"),
    (spark_ext.commands.study, "study_teacher"),
    (spark_ext.commands.study, "run_job"),
    (spark_ext.commands.classify, "train_teacher"),
    (spark_ext.commands.classify, "train_student"),
    (spark_ext.commands.daqakd, "train_teacher"),
    (spark_ext.commands.daqakd, "train_student"),
    (spark_ext.quant.export, "export_onnx"),
    (spark_ext.commands.bench, "_run_benchmarks"),
]


@pytest.fixture
def no_work(monkeypatch):
    def started(*args, **kwargs):
        pytest.fail("work started before the arguments were checked")

    for module, name in WORK:
        monkeypatch.setattr(module, name, started)


@pytest.fixture
def places(tmp_path):
    """``out``: an empty output folder to watch; ``blocker``: a file where a folder is expected."""
    out = tmp_path / "out"
    out.mkdir()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    model = tmp_path / "model.pt"
    torch.save(torch.nn.Conv2d(3, 3, 1), model)
    return {"out": out, "blocker": blocker, "model": model, "tmp": tmp_path}


def run(argv):
    """``spark-ext ARGV`` in this process: its exit status (returned or raised)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


NO_CUDA = "cuda" if not torch.cuda.is_available() else "cuda:99"
# (argv with {out}, {blocker}, {model} and {tmp} to fill in, the argument the error line must name).
# Commands that write a folder get --out {out}/run; those that write a file get --out {out}/r.json.
CASES = [
    # demo
    ("demo --preset smoke --out {out}/run --steps 0", "--steps"),
    ("demo --preset smoke --out {out}/run --seeds x", "--seeds"),
    ("demo --preset smoke --out {out}/run --seeds 1000000000", "--seeds"),
    ("demo --preset smoke --out {out}/run --threads 1000000", "--threads"),
    ("demo --preset smoke --out {out}/run --device meta", "--device"),
    (f"demo --preset smoke --out {{out}}/run --device {NO_CUDA}", "--device"),
    ("demo --preset smoke --out {out}/run --methods qat,kd,qat", "--methods"),
    ("demo --preset smoke --out {blocker}/run", "--out"),
    ("demo --preset smoke --out {out}/run --cache-dir {blocker}", "--cache-dir"),
    ("demo --preset smoke --out {out}/run --eval-images {tmp}/nowhere", "--eval-images"),
    ("demo --preset huge --out {out}/run", "--preset"),
    # study
    ("study --out {out}/run --seeds 0", "--seeds"),
    ("study --out {out}/run --seeds 1000000000", "--seeds"),
    ("study --out {out}/run --device meta", "--device"),
    (f"study --out {{out}}/run --device {NO_CUDA}", "--device"),
    ("study --out {out}/run --tasks sr,denoise,sr", "--tasks"),
    ("study --out {out}/run --methods qat,spark,qat", "--methods"),
    ("study --out {out}/run --lambdas 0.5,1,1.0", "--lambdas"),
    ("study --out {blocker}/run", "--out"),
    ("study --out {blocker}", "--out"),
    ("study --out {out}/run --preset gpu --cache-dir {blocker}/cache", "--cache-dir"),  # a teacher to train
    ("study --out {out}/run --workers -1", "--workers"),
    ("study --out {out}/run --workers 1000000000", "--workers"),
    # diagnose-credit (writes no results; its teacher cache is the output)
    ("diagnose-credit --cache-dir {out}/cache --seed 1000000000000000000000000", "--seed"),
    ("diagnose-credit --cache-dir {out}/cache --seed -1", "--seed"),
    ("diagnose-credit --cache-dir {out}/cache --signals credit,paper,credit", "--signals"),
    ("diagnose-credit --cache-dir {out}/cache --draws 3", "--draws"),
    ("diagnose-credit --preset smoke --cache-dir {blocker}", "--cache-dir"),
    # classify
    ("classify --out {out}/r.json --seeds 0,1,0", "--seeds"),
    ("classify --out {out}/r.json --seeds 0,18446744073709551616", "--seeds"),
    ("classify --out {out}/r.json --teacher-seed 1000000000000000000000000", "--teacher-seed"),
    ("classify --out {out}/r.json --methods qat,kd,kd", "--methods"),
    ("classify --out {out}/r.json --width 0", "--width"),
    ("classify --out {out}", "--out"),
    ("classify --out {blocker}/r.json", "--out"),
    # daqakd
    ("daqakd --out {out}/r.json --candidates shift,noise,shift", "--candidates"),
    ("daqakd --out {out}/r.json --teacher-seed -2", "--teacher-seed"),
    ("daqakd --out {out}/r.json --repeats 0", "--repeats"),
    ("daqakd --out {out}", "--out"),
    # diffkd
    ("diffkd --out {out}/r.json --eval-size 301", "--eval-size"),
    ("diffkd --out {out}/r.json --crop 176", "--crop"),
    ("diffkd --out {out}/r.json --methods kd,dfd,kd", "--methods"),
    ("diffkd --out {out}/r.json --seeds 1,1", "--seeds"),
    ("diffkd --out {out}/r.json --lambda-kd nan", "--lambda-kd"),
    ("diffkd --out {out}/r.json --cache-dir {blocker}", "--cache-dir"),
    ("diffkd --out {blocker}/r.json", "--out"),
    # export
    ("export --demo --out {out}/run --steps 0", "--steps"),
    ("export --demo --out {out}/run --bits 9", "--bits"),
    ("export --demo --out {out}/run --threads 2147483648", "--threads"),
    ("export --demo --out {blocker}/run", "--out"),
    ("export --demo --out {blocker}", "--out"),
    ("export --demo --out {out}/run --preset smoke --cache-dir {blocker}", "--cache-dir"),
    ("export --model {model} --out {out}/m.onnx", "--input-shape"),
    ("export --model {tmp}/missing.pt --out {out}/m.onnx --input-shape 1,3,8,8", "--model"),
    ("export --model {model} --out {blocker}/m.onnx --input-shape 1,3,8,8", "--out"),
    (
        "export --model-factory no_such_module:build --state-dict {model} --out {out}/m.onnx --input-shape 1,3",
        "--model-factory",
    ),
    (
        "export --model-factory {tmp}/missing.py:build --state-dict {model} --out {out}/m.onnx --input-shape 1,3",
        "--model-factory",
    ),
    ("export --model-factory json:nope --state-dict {model} --out {out}/m.onnx --input-shape 1,3", "--model-factory"),
    (
        "export --model-factory json:decoder --state-dict {model} --out {out}/m.onnx --input-shape 1,3",
        "--model-factory",
    ),
    (
        "export --model-factory json:dumps --state-dict {tmp}/missing.pth --out {out}/m.onnx --input-shape 1,3",
        "--state-dict",
    ),
    ("export --model {model} --state-dict {model} --out {out}/m.onnx --input-shape 1,3", "--state-dict"),
    # bench
    ("bench --out {blocker}/r", "--out"),
    ("bench --out {out}/r --only nosuch", "--only"),
    ("bench --out {out}/r --plot {blocker}/plots", "--plot"),
    ("bench --out {out}/r --from {tmp}/missing.json", "--from"),
    ("bench --out {out}/r --bogus", "--bogus"),
]


@pytest.mark.parametrize("template, flag", CASES, ids=[c[0].split(" --out")[0] + " " + c[1] for c in CASES])
def test_bad_argument_exits_2_with_one_line_before_any_work(template, flag, places, no_work, capsys):
    argv = template.format(**places).split()
    assert run(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"spark-ext {argv[0]}: error: ") and flag in lines[0]
    assert list(places["out"].iterdir()) == []


def test_a_folder_where_a_results_file_goes_is_refused(places, no_work, capsys):
    # The commands that write a folder of files: a folder in it where a file goes fails at the end otherwise.
    for command, name in (
        ("demo --preset smoke", "results.json"),
        ("study", "study.png"),
        ("export --demo", "student.pt"),
    ):
        run_dir = places["out"] / command.split()[0]
        (run_dir / name).mkdir(parents=True)
        assert run(command.split() + ["--out", str(run_dir)]) == 2
        line = capsys.readouterr().err.strip()
        assert "--out" in line and name in line and "is a folder" in line
        assert [p.name for p in run_dir.iterdir()] == [name]


def test_a_corrupt_shipped_teacher_is_one_line_before_any_work(places, no_work, monkeypatch, capsys):
    # Every command that loads a shipped teacher (the 'default' demo network) checks its sha256 first.
    weights = places["tmp"] / "weights"
    shutil.copytree(spark_ext.models.pretrained.WEIGHTS_DIR, weights)
    for file in weights.glob("*.pt"):
        file.write_bytes(file.read_bytes()[:-10])
    monkeypatch.setattr(spark_ext.models.pretrained, "WEIGHTS_DIR", weights)
    cache = str(places["tmp"] / "cache")
    for argv in (
        ["demo", "--out", str(places["out"] / "run"), "--cache-dir", cache],
        ["study", "--out", str(places["out"] / "run"), "--cache-dir", cache, "--preset", "cpu"],
        ["diagnose-credit", "--cache-dir", cache, "--task", "sr"],
        ["export", "--demo", "--out", str(places["out"] / "run"), "--cache-dir", cache],
    ):
        assert run(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "sha256" in lines[0] and "reinstall spark_ext" in lines[0], lines
    assert list(places["out"].iterdir()) == []


def test_atomic_path_replaces_only_on_success(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"old": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".json"
            tmp.write_text('{"half": ')
            raise RuntimeError("interrupted")
    assert path.read_text() == '{\n  "old": 1\n}' and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    write_json(path, {"new": 2})
    assert "new" in path.read_text() and [p.name for p in tmp_path.iterdir()] == ["results.json"]
