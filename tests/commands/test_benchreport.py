"""`spark-ext bench` (running the installed benchmarks) and its report and plots on synthetic results;
`spark-ext doctor`."""

import json
import os
import subprocess
import sys

import pytest

from spark_ext import cli
from spark_ext.benchmarks import report
from spark_ext.commands import bench as bench_command


def _rows():
    rows = []
    for impl, ms in (("ours", 1.0), ("eager", 6.0), ("compiled", 2.5)):
        rows.append(
            {
                "op": "difficulty_signals",
                "case": "2x3x64x64 fp32",
                "pass": "fwd+bwd",
                "impl": impl,
                "ms": ms,
                "bytes": 10_000_000,
                "gbps": 10 / ms,
                "copy_fraction": 0.9 / ms,
                "peak_extra_bytes": 2**20,
            }
        )
    return rows


def test_summary_reports_peer_over_ours(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"benchmark": "difficulty", "env": {"device": "test"}, "rows": _rows()}))
    (line,) = report.summarise(report.load([path])[0])
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
        report.load([path])


def test_doctor_lists_every_op(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    ops = ("difficulty_signals", "fused_weighted_kd", "lsq_fake_quant", "fake_quantize_learnable_per_tensor_affine")
    for op in ops:
        assert op in out


def _benchmarks_package(tmp_path, monkeypatch, modules: dict) -> None:
    """Make ``spark-ext bench`` run the ``bench_<name>`` modules of a package ``fakebench`` in ``tmp_path``
    (``modules``: file name -> source), here and in the processes it starts, from ``tmp_path`` as cwd."""
    package = tmp_path / "fakebench"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, source in modules.items():
        (package / name).write_text(source)
    for name in [m for m in sys.modules if m.split(".")[0] == "fakebench"]:  # another test's
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(bench_command, "BENCHMARKS_PACKAGE", "fakebench")
    monkeypatch.chdir(tmp_path)


def _writer(*results: str) -> str:
    """A benchmark module that writes the given result files (``ok``: a good one; ``bad``: rows null)."""
    contents = {"ok": {"benchmark": "ok", "env": {}, "rows": _rows()}, "bad": {"benchmark": "bad", "rows": None}}
    lines = [
        "import json, sys, pathlib",
        "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1]); out.mkdir(parents=True, exist_ok=True)",
    ]
    lines += [f"(out / '{name}.json').write_text(json.dumps({contents[name]!r}))" for name in results]
    return "\n".join(lines) + "\n"


def test_a_failing_benchmark_fails_the_run_after_the_report(tmp_path, monkeypatch, capsys):
    broken = "raise SystemExit(3)\n"
    _benchmarks_package(
        tmp_path, monkeypatch, {"bench_ok.py": _writer("ok"), "bench_broken.py": broken, "common.py": ""}
    )
    assert bench_command.benchmark_names() == ["broken", "ok"]  # bench_<name> modules only
    assert bench_command.main(["--out", str(tmp_path / "results")]) == 1
    captured = capsys.readouterr()
    assert "== ok" in captured.out and "difficulty_signals" in captured.out  # the good one is reported
    assert "1 benchmark(s) failed: fakebench.bench_broken" in captured.err
    assert (tmp_path / "results" / "plots" / "ok.png").read_bytes()[:4] == b"\x89PNG"  # plots: OUT/plots


def test_without_matplotlib_a_run_writes_json_only_and_plot_is_refused(tmp_path, monkeypatch, capsys):
    _benchmarks_package(tmp_path, monkeypatch, {"bench_ok.py": _writer("ok")})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert bench_command.main(["--out", "results"]) == 0  # relative to the current folder
    err = capsys.readouterr().err
    assert "JSON only: plots need matplotlib, which is not installed: pip install 'spark_ext[demo]'" in err
    assert (tmp_path / "results" / "ok.json").is_file() and not (tmp_path / "results" / "plots").exists()
    line = _rejected(["--from", str(tmp_path / "results" / "ok.json"), "--plot", "plots"], capsys)
    assert line.endswith(
        "argument --plot: plots need matplotlib, which is not installed: pip install 'spark_ext[demo]'"
    )


@pytest.mark.slow  # one real benchmark with --quick: minutes on a shared 2-core machine
def test_runs_an_installed_benchmark_module_from_any_folder(tmp_path):
    """`spark-ext bench` after a regular install: the benchmark runs as a module of the installed package
    (`python -m spark_ext.benchmarks.bench_<op>`) from a folder that has no bench folder and no source tree, and
    the JSON and its plot land in the default output folder there."""
    bench_command_line = [sys.executable, "-m", "spark_ext.cli", "bench", "--quick", "--only", "lsq"]
    env = {**os.environ, "PYTHONPATH": ""}  # nothing but the installed package
    result = subprocess.run(bench_command_line, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "-m spark_ext.benchmarks.bench_lsq --out spark-ext-bench --quick" in result.stdout
    (json_path,) = (tmp_path / "spark-ext-bench").glob("lsq-cpu-*.json")
    (run,) = report.load([json_path])
    assert {row["op"] for row in run["rows"]} == {"lsq_fake_quant"} and run["env"]["spark_ext"]
    png = tmp_path / "spark-ext-bench" / "plots" / f"{json_path.stem}.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert f"plot: {png.relative_to(tmp_path)}" in result.stdout


def _rejected(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        bench_command.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_arguments_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    # Issue 10, defect 10: `--from missing.json` ended in a FileNotFoundError traceback.
    monkeypatch.setattr(bench_command, "_run_benchmarks", lambda *a: pytest.fail("benchmarks ran before the checks"))
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


def _run(rows, llc_bytes=None, device="test"):
    env = {"device": device, **({"llc_bytes": llc_bytes} if llc_bytes else {})}
    return {"benchmark": "lsq", "env": env, "rows": rows, "path": "lsq-test.json"}


def _row(case, impl, ms, nbytes, pass_="fwd", frac=None, spread=None):
    row = {
        "op": "lsq_fake_quant",
        "case": case,
        "pass": pass_,
        "impl": impl,
        "ms": ms,
        "bytes": nbytes,
        "copy_fraction": frac,
        "peak_extra_bytes": None,
    }
    if spread:
        row.update(ms_p20=ms - spread, ms_p50=ms, ms_p80=ms + spread)
    return row


def test_bandwidth_only_where_the_working_set_is_four_times_the_last_level_cache(capsys):
    llc = 32 * 2**20
    rows = [
        _row("small", "ours", 1.0, 4 * llc - 1, frac=26.0),
        _row("small", "torch", 3.0, 4 * llc - 1),
        _row("large", "ours", 8.0, 4 * llc, frac=0.85),
        _row("large", "torch", 24.0, 4 * llc),
    ]
    lines = {ln["case"]: ln for ln in report.summarise(_run(rows, llc))}
    assert lines["small"]["memory_bound"] is False and lines["large"]["memory_bound"] is True
    assert lines["large"]["x_torch"] == pytest.approx(3.0)
    report._print_table(list(lines.values()))
    table = capsys.readouterr().out.splitlines()
    assert "in cache" in next(t for t in table if t.startswith("lsq_fake_quant  small"))
    assert "0.85" in next(t for t in table if t.startswith("lsq_fake_quant  large"))
    # No cache size recorded and the run's device is not this machine's: the fraction is shown as unknown.
    (unknown, _) = report.summarise(_run(rows, None, device="some other machine"))
    assert unknown["memory_bound"] is None and report._bandwidth_cell(unknown) == "26.00?"


def test_percentiles_give_the_speedup_spread():
    rows = [
        _row("c", "ours", 2.0, 100, spread=0.5),
        _row("c", "eager", 10.0, 100, spread=1.0),
        _row("c", "compiled", 4.0, 100),
    ]  # an older result without percentiles: no spread
    (line,) = report.summarise(_run(rows))
    assert line["x_eager"] == pytest.approx(5.0)
    assert line["x_eager_range"] == pytest.approx((9.0 / 2.5, 11.0 / 1.5))
    assert line["x_compiled"] == pytest.approx(2.0) and "x_compiled_range" not in line
    assert (line["ours_p20"], line["ours_p80"]) == (1.5, 2.5)


def test_last_level_cache_from_sysfs_and_lscpu(tmp_path):
    for name, level, kind, size in (
        ("index0", 1, "Data", "48K"),
        ("index1", 1, "Instruction", "32K"),
        ("index2", 2, "Unified", "2048K"),
        ("index3", 3, "Unified", "307200K"),
    ):
        (tmp_path / name).mkdir()
        for field, value in (("level", level), ("type", kind), ("size", size)):
            (tmp_path / name / field).write_text(f"{value}\n")
    assert report._sysfs_llc_bytes(tmp_path) == 300 * 2**20
    assert report._sysfs_llc_bytes(tmp_path / "missing") is None
    lscpu = "L1d cache:  96 KiB (2 instances)\nL2 cache:   4 MiB (2 instances)\nL3 cache:   64 MiB (2 instances)\n"
    assert report._lscpu_llc_bytes(lscpu) == 32 * 2**20
    assert report._lscpu_llc_bytes("L2 cache: 1 MiB\n") == 2**20
    assert report._lscpu_llc_bytes("nothing here") is None
    llc = report.last_level_cache_bytes("cpu")  # this machine: a size, or None where nothing says it
    assert llc is None or llc >= 2**16


def test_plots_one_panel_row_per_op_and_the_step_benchmark(tmp_path, capsys):
    rows = []
    for op in ("lsq_fake_quant", "fake_quant"):
        for case in ("act 4x16x32x32 per-tensor fp32", "weight 64x32x3x3 per-channel axis0 fp32"):
            for pass_ in ("fwd", "bwd", "fwd+bwd"):
                for impl, ms in (("ours", 1.0), ("torch", 4.0), ("eager", 9.0), ("compiled", 0.8)):
                    rows.append({**_row(case, impl, ms, 2**20, pass_, frac=0.5, spread=0.1), "op": op})
    ops_path = tmp_path / "lsq-test.json"
    ops_path.write_text(json.dumps({"benchmark": "lsq", "env": {"device": "test", "llc_bytes": 2**18}, "rows": rows}))
    steps = [
        {"op": "spark_step", "case": "W4A4 b2", "pass": "step", "impl": "ours", "ms": 20.0},
        {"op": "qat_step", "case": "W4A4 b2", "pass": "step", "impl": "ours", "ms": 12.0},
        {"op": "qat_step", "case": "W4A4 b2", "pass": "step", "impl": "torch", "ms": 19.0},
        {"op": "spark_overhead", "case": "W4A4 b2", "pass": "step", "impl": "ratio", "ms": 20 / 12},
        {
            "op": "spark_vs_qat_torch",
            "case": "W4A4 b2",
            "pass": "step",
            "impl": "ratio",
            "ms": 20 / 19,
            "target": "<= 1, SPARK for free",
        },
    ]
    steps_path = tmp_path / "e2e-test.json"
    steps_path.write_text(json.dumps({"benchmark": "e2e", "env": {"device": "test"}, "rows": steps}))
    assert bench_command.main(["--from", str(ops_path), str(steps_path), "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "spark_vs_qat_torch: 1.053" in out and "(target <= 1, SPARK for free)" in out
    for name in ("lsq-test.png", "e2e-test.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:4] == b"\x89PNG", name


def test_case_labels_drop_the_words_every_case_shares():
    labels, shared = report.short_cases(["2x3x32x32 fp32 grid8x8 l1", "2x3x32x32 bf16 grid8x8 l1"])
    assert labels == ["fp32", "bf16"] and shared == "2x3x32x32 grid8x8 l1"
    labels, _ = report.short_cases(["act 16x64x64x64 channels_last per-channel axis1 bf16"])
    assert labels == ["act 16x64x64x64 NHWC per-ch ax1 bf16"]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"benchmark": "x", "rows": [{}]}, "rows[0] has no 'op'"),
        ({"benchmark": "x", "rows": None}, "'rows' is null, expected a list of row objects"),
        ({"benchmark": "x", "rows": "fast"}, "'rows' is a string, expected a list of row objects"),
        ({"benchmark": "x", "rows": []}, "'rows' is empty"),
        ({"benchmark": "x", "rows": [3]}, "rows[0] is a number, expected an object"),
        ({"rows": [{"op": "a", "case": "c", "pass": "fwd", "impl": 1}]}, "rows[0]['impl'] is a number"),
        ({"rows": [{"op": "a", "case": "c", "pass": "fwd", "impl": "ours", "ms": "1"}]}, "rows[0]['ms'] is '1'"),
        ({"rows": [{"op": "a", "case": "c", "pass": "fwd", "impl": "ours", "ms": 0}]}, "expected a positive number"),
        ({"rows": [{"op": "a", "case": "c", "pass": "fwd", "impl": "ours", "bytes": -1}]}, "non-negative"),
        ({"env": "cpu", "rows": [{"op": "a", "case": "c", "pass": "fwd", "impl": "ours"}]}, "'env' is a string"),
        ({"env": {"llc_bytes": "big"}, "rows": [{"op": "a", "case": "c", "pass": "s", "impl": "i"}]}, "llc_bytes"),
        ([{"rows": []}], "the top level is a list, expected an object"),
    ],
)
def test_a_malformed_result_file_exits_2_naming_it(tmp_path, capsys, content, message):
    # `--from` a file whose rows were [{}], null or a string ended in KeyError / TypeError / AttributeError.
    path = tmp_path / "bad-run.json"
    path.write_text(json.dumps(content))
    line = _rejected(["--from", str(path)], capsys)
    assert line.startswith("spark-ext bench: error: argument --from: ") and str(path) in line, line
    assert message in line, line


def test_a_malformed_result_written_by_a_benchmark_is_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    _benchmarks_package(tmp_path, monkeypatch, {"bench_two.py": _writer("ok", "bad")})
    assert bench_command.main(["--out", str(tmp_path / "results")]) == 1
    captured = capsys.readouterr()
    assert "== ok" in captured.out and "== bad" not in captured.out
    warning = next(line for line in captured.err.splitlines() if line.startswith("spark-ext bench: skipping"))
    assert "bad.json: 'rows' is null" in warning


def _overhead_rows():
    rows = []
    for pass_ in ("fwd", "fwd+bwd"):
        for impl, backend, ms in (("ours", "cpp", 0.06), ("eager", "reference", 0.07), ("torch", "builtin", 0.005)):
            rows.append(
                {
                    "op": "lsq_fake_quant",
                    "case": "tiny 4x16 fp32",
                    "pass": pass_,
                    "impl": impl,
                    "backend": backend,
                    "ms": ms,
                    "ms_p20": ms * 0.9,
                    "ms_p50": ms,
                    "ms_p80": ms * 1.1,
                    "ms_p90": ms * 1.2,
                    "ms_max": ms * 2,
                    "over_torch": None if impl == "torch" else ms / 0.005,
                    "over_floor": ms / 0.016,
                }
            )
        rows.append({**rows[-1], "impl": "floor", "backend": "custom_op", "ms": 0.016, "over_torch": 3.2})
        rows[-1].update(ms_p90=0.02, ms_max=0.05, over_floor=None)
    return rows


def test_call_overhead_and_qat_step_sections(tmp_path, capsys):
    overhead = tmp_path / "call_overhead-cpu-test.json"
    config = {"threads": 1, "floor": "a custom op returning x.clone()"}
    result = {"benchmark": "call_overhead", "env": {"device": "test"}, "config": config, "rows": _overhead_rows()}
    overhead.write_text(json.dumps(result))
    case = "resnet18 b1 64px t1 W8A8"
    steps = [
        {"op": "qat_step", "case": case, "pass": "step", "impl": impl, "ms": ms, "ms_p90": ms + 5, "ms_max": ms + 9}
        for impl, ms in (("ours", 200.0), ("torch", 400.0))
    ]
    steps.append({"op": "qat_step_ours_over_torch", "case": case, "pass": "step", "impl": "ratio", "ms": 0.5})
    qat = tmp_path / "qat_step-cpu-test.json"
    qat.write_text(json.dumps({"benchmark": "qat_step", "env": {"device": "test"}, "rows": steps}))
    assert bench_command.main(["--from", str(overhead), str(qat), "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    ours = next(line for line in out.splitlines() if line.startswith("lsq_fake_quant") and " ours " in line)
    # p50 / p90 / max in µs, then ours / torch and ours / floor at the median
    assert ours.split()[-5:] == ["60.0", "72.0", "120.0", "12.00x", "3.75x"], ours
    assert "1 thread(s); floor: a custom op returning x.clone()" in out
    step = next(line for line in out.splitlines() if line.startswith("qat_step ") and " torch " in line)
    assert step.split()[-3:] == ["400", "405", "409"], step
    assert "qat_step_ours_over_torch: 0.500" in out
    for name in ("call_overhead-cpu-test.png", "qat_step-cpu-test.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:4] == b"\x89PNG", name
