"""`spark-ext bench` report and plots, and `spark-ext doctor`, on synthetic results."""

import json

import pytest

from spark_ext import benchreport, cli


def _rows():
    rows = []
    for impl, ms in (("ours", 1.0), ("eager", 6.0), ("compiled", 2.5)):
        rows.append(
            {"op": "difficulty_signals", "case": "2x3x64x64 fp32", "pass": "fwd+bwd", "impl": impl, "ms": ms,
             "bytes": 10_000_000, "gbps": 10 / ms, "copy_fraction": 0.9 / ms, "peak_extra_bytes": 2**20}
        )
    return rows


def test_summary_reports_peer_over_ours(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmark": "difficulty", "env": {"device": "test"}, "rows": _rows()}))
    (line,) = benchreport.summarise(benchreport.load([path])[0])
    assert line["x_eager"] == pytest.approx(6.0) and line["x_compiled"] == pytest.approx(2.5)
    assert "x_torch" not in line and line["peak_MiB"] == pytest.approx(1.0)
    assert cli.main(["bench", "--from", str(path), "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "difficulty_signals" in out and "6" in out
    png = tmp_path / "plots" / "run.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_load_rejects_foreign_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="not a spark_ext benchmark result"):
        benchreport.load([path])


def test_doctor_lists_every_op(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    for op in ("difficulty_signals", "fused_weighted_kd", "lsq_fake_quant", "fake_quantize_learnable_per_tensor_affine"):
        assert op in out


def test_a_failing_benchmark_fails_the_run_after_the_report(tmp_path, monkeypatch, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    writer = (
        "import json, sys, pathlib\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1]); out.mkdir(parents=True, exist_ok=True)\n"
        f"(out / 'ok.json').write_text(json.dumps({{'benchmark': 'ok', 'env': {{}}, 'rows': {_rows()!r}}}))\n"
    )
    (bench / "bench_ok.py").write_text(writer)
    (bench / "bench_broken.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(benchreport, "BENCH_DIR", bench)
    monkeypatch.setattr(benchreport, "REPO_ROOT", tmp_path)
    assert benchreport.main(["--out", str(tmp_path / "results")]) == 1
    captured = capsys.readouterr()
    assert "== ok" in captured.out and "difficulty_signals" in captured.out  # the good one is reported
    assert "1 benchmark(s) failed: bench_broken.py" in captured.err


def _rejected(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        benchreport.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_arguments_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    # Issue 10, defect 10: `--from missing.json` ended in a FileNotFoundError traceback.
    monkeypatch.setattr(benchreport, "_run_benchmarks", lambda *a: pytest.fail("benchmarks ran before the checks"))
    good = tmp_path / "run.json"
    good.write_text(json.dumps({"benchmark": "difficulty", "env": {}, "rows": _rows()}))
    bad_json, foreign, blocker = tmp_path / "bad.json", tmp_path / "foreign.json", tmp_path / "a_file"
    bad_json.write_text("{not json")
    foreign.write_text("[1, 2]")
    blocker.write_text("")
    cases = [
        (["--from", str(tmp_path / "missing.json")], "No such file"),
        (["--from", str(good), str(bad_json)], "bad.json"),
        (["--from", str(foreign)], "not a spark_ext benchmark result"),
        (["--from", str(good), "--only", "lsq"], "cannot be combined with --from"),
        (["--from", str(good), "--full"], "cannot be combined with --from"),
        (["--from", str(good), "--plot", str(blocker / "plots")], "argument --plot"),
        (["--only", "no_such_bench"], "no benchmark called ['no_such_bench']"),
        (["--out", str(blocker / "results")], "argument --out"),
    ]
    for argv, message in cases:
        line = _rejected(argv, capsys)
        assert line.startswith("spark-ext bench: error: ") and message in line, (argv, line)
