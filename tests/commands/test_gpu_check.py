"""``make gpu-check`` (spark_ext.benchmarks.gpu_check) rehearsed on CPU: budget, skipping, time limits, streaming.

The device gives one command of at most 8 minutes and returns only the files in
one folder (at most 8, 16 MiB each, no deeper than OUT/a/b/file, names of
letters, digits, ``.``, ``_``, ``-``), also when the command is killed. These
tests run the real plan as a dry run (``GPU_CHECK_DRY_RUN=1``: shell stand-ins
sleeping each stage's expected time, scaled down) and small hand-made plans
in-process, with real subprocesses and process-group kills. A few seconds.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spark_ext.benchmarks import gpu_check

# run as make gpu-check runs it
COMMAND = [sys.executable, "-m", "spark_ext.benchmarks.gpu_check"]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process groups and sh: POSIX only")


def check_output_folder(out: Path) -> list[Path]:
    """The device tool's limits on what comes back; returns the files."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    for path in files:
        rel = path.relative_to(out)
        assert len(rel.parts) <= 3, rel  # OUT/a/b/file at most
        assert all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts), rel
        assert path.stat().st_size <= 16 * 2**20, rel
    return files


def run_script(tmp_path, **env):
    out = tmp_path / "out"
    full_env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_OUT": str(out), **env}
    result = subprocess.run(COMMAND, env=full_env, capture_output=True, text=True, timeout=60)
    return result, out


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def config(budget_s, **kw):
    return {
        "budget_s": budget_s,
        "jobs": 1,
        "stages": set(),
        "dry_run": False,
        "scale": 1.0,
        "hang": set(),
        "fail": set(),
        "out": "",
        **kw,
    }


def sh(script):
    return ["sh", "-c", script]


def stage(name, command, expected_s=0.05, limit_s=5.0, **kw):
    return gpu_check.Stage(name, name, command, expected_s, limit_s, **kw)


@pytest.fixture
def quick(monkeypatch):
    """Hand-made plans: no end margin or kill grace to wait for."""
    monkeypatch.setattr(gpu_check, "END_MARGIN_S", 0.0)
    monkeypatch.setattr(gpu_check, "KILL_GRACE_S", 0.2)


def test_dry_run_of_the_real_plan(tmp_path):
    result, out = run_script(tmp_path, GPU_CHECK_BUDGET_S="480", GPU_CHECK_DRY_RUN_SCALE="0.004")
    s = summary(out)
    assert s["status"] == "finished" and s["dry_run"] is True
    assert result.returncode == (0 if s["result"] == "passed" else 1), result.stdout + result.stderr
    assert [r["name"] for r in s["stages"]] == list(gpu_check.STAGE_NAMES)
    for r in s["stages"]:
        if r["status"] == "skipped":
            assert r["note"], r
        else:  # ran within its own limit, and the limit within the budget
            assert r["seconds"] <= r["limit_s"] + 0.2 / 0.004 and r["limit_s"] <= s["budget_s"]
            # a stand-in takes its expected time: only one started with just that much left can be cut
            assert r["status"] == "passed" or (r["status"] == "timeout" and "limit cut" in r["note"]), r
    # dry-run seconds are scaled back to device seconds; 0.3 s of real slack for start-up and the last writes
    assert s["elapsed_s"] <= s["budget_s"] + 0.3 / 0.004
    build, doctor, cuda = s["stages"][:3]
    assert build["status"] == doctor["status"] == cuda["status"] == "passed"
    assert cuda["keys"]["passed"] == 1 and cuda["keys"]["skipped"] == 1 and cuda["keys"]["failed"] == 0
    assert doctor["keys"]["lines"] == ["CUDA available: False (dry run)", "C++/CUDA library: dry run"]
    assert s["device"] == "CUDA available: False (dry run)"
    bench = next(r for r in s["stages"] if r["name"] == "bench-fake-quant")
    if bench["status"] == "passed":  # the stand-in's result, copied as it was written, marked as not measured
        assert bench["keys"]["headline"]["dry_run | stand-in, nothing measured | fwd"]["x_eager"] == 2.0
        assert json.loads((out / "bench-kernels.json").read_text())["env"]["device"].startswith("DRY RUN")
    log = (out / "gpu-check.log").read_text()
    assert "=== build: passed" in log and "dry run: would run:" in log and "DRY RUN" in log
    check_output_folder(out)


def test_dry_run_fits_all_eight_outputs(tmp_path):
    """Every output the plan can write (a budget that covers every stage) stays within the device's limits."""
    result, out = run_script(tmp_path, GPU_CHECK_BUDGET_S="5000", GPU_CHECK_DRY_RUN_SCALE="0.003")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(r["status"] == "passed" for r in summary(out)["stages"]), summary(out)["stages"]
    names = {p.name for p in check_output_folder(out)}
    assert names == {
        "gpu-check.log",
        "summary.json",
        "bench-kernels.json",  # fake_quant, lsq, difficulty and weighted_kd together
        "bench-e2e.json",
        "bench-call_overhead.json",
        "bench-qat_step.json",
        "bench-distill_variants.json",
    }
    kernels = json.loads((out / "bench-kernels.json").read_text())
    assert kernels["benchmarks"] == ["fake_quant", "lsq", "difficulty", "weighted_kd"]  # in the order they ran
    assert sorted({row["benchmark"] for row in kernels["rows"]}) == sorted(kernels["benchmarks"])


def test_bad_settings_exit_2_before_anything_runs(tmp_path):
    for env, message in (
        ({"GPU_CHECK_BUDGET_S": "-1"}, "GPU_CHECK_BUDGET_S must be a positive number, got '-1'"),
        ({"GPU_CHECK_BUDGET_S": "soon"}, "GPU_CHECK_BUDGET_S must be a positive number"),
        ({"GPU_CHECK_JOBS": "1.5"}, "GPU_CHECK_JOBS must be a positive integer"),
        ({"GPU_CHECK_STAGES": "build,bench-foo"}, "GPU_CHECK_STAGES: unknown stage(s) bench-foo;"),
        ({"GPU_CHECK_DRY_RUN_HANG": "nope"}, "GPU_CHECK_DRY_RUN_HANG: unknown stage(s) nope;"),
    ):
        with pytest.raises(ValueError) as info:
            gpu_check.settings(env)
        assert str(info.value).startswith(message), env
    result, out = run_script(tmp_path, GPU_CHECK_STAGES="bench-foo")
    assert result.returncode == 2 and not out.exists()
    assert result.stderr.startswith("gpu_check: GPU_CHECK_STAGES: unknown") and len(result.stderr.splitlines()) == 1


def test_plan_prints_every_stage():
    result = subprocess.run(
        [*COMMAND, "--plan"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "GPU_CHECK_BUDGET_S": "480"},
    )
    assert result.returncode == 0, result.stderr
    for name in gpu_check.STAGE_NAMES:
        assert re.search(rf"^  {name} ", result.stdout, re.M), name


def test_stage_selection_and_required_failure(tmp_path):
    result, out = run_script(tmp_path, GPU_CHECK_STAGES="bench-lsq", GPU_CHECK_DRY_RUN_SCALE="0.003")
    status = {r["name"]: r["status"] for r in summary(out)["stages"]}
    assert result.returncode == 0
    assert status["build"] == status["doctor"] == status["bench-lsq"] == "passed"
    assert status["cuda-tests"] == "skipped" and summary(out)["stages"][2]["note"] == "not in GPU_CHECK_STAGES"
    # A failed build stops the run: nothing after it can work.
    result, out = run_script(tmp_path, GPU_CHECK_DRY_RUN_FAIL="build", GPU_CHECK_DRY_RUN_SCALE="0.002")
    assert result.returncode == 1
    stages = summary(out)["stages"]
    assert stages[0]["status"] == "failed" and stages[0]["returncode"] == 1
    assert all(r["status"] == "skipped" and r["note"] == "build failed" for r in stages[1:])


def test_skips_what_the_budget_cannot_cover(tmp_path, quick):
    stages = [
        stage("first", sh("sleep 0.2"), expected_s=0.1),
        stage("too-big", sh("exit 0"), expected_s=5.0),
        stage("small", sh("exit 0"), expected_s=0.5),
        stage("last", sh("exit 0"), expected_s=0.1),
    ]
    rc = gpu_check.run(config(3.0), tmp_path, tmp_path / "scratch", stages)
    s = summary(tmp_path)
    status = {r["name"]: (r["status"], r.get("note", "")) for r in s["stages"]}
    assert rc == 0
    assert status["first"][0] == "passed"
    assert status["too-big"][0] == "skipped" and status["too-big"][1].startswith("budget: expected to take 5 s")
    assert status["small"][0] == "passed" and status["last"][0] == "passed"
    # the last stage's minimum (and a kill's grace) was kept back from the others: their limits leave it room
    first = s["stages"][0]
    assert first["limit_s"] <= round(3.0 - 0.1 - 0.2, 1) and "limit cut" in first["note"]


def test_stage_time_limit_kills_its_process_group(tmp_path, quick):
    pid_file = tmp_path / "grandchild.pid"
    stages = [
        stage("hangs", sh(f"sleep 60 & echo $! > {pid_file}; wait"), limit_s=0.5),
        stage("after", sh("echo still running")),
    ]
    t0 = time.monotonic()
    rc = gpu_check.run(config(30.0), tmp_path, tmp_path / "scratch", stages)
    assert time.monotonic() - t0 < 10
    hangs, after = summary(tmp_path)["stages"]
    assert rc == 1 and hangs["status"] == "timeout" and hangs["returncode"] is None
    assert 0.5 <= hangs["seconds"] < 5
    assert after["status"] == "passed"
    assert int(pid_file.read_text()) > 0
    assert not gpu_check.group_alive(hangs["pid"])  # the background sleep went too, not only the shell
    assert "still running" in (tmp_path / "gpu-check.log").read_text()


def test_summary_is_rewritten_as_each_stage_starts_and_ends(tmp_path, quick):
    """Each stage copies summary.json as it sees it: the streamed state the device would return at that moment."""
    seen = tmp_path / "seen"
    seen.mkdir()
    stages = [
        stage(name, sh(f"echo output of {name}; cp {tmp_path}/summary.json {seen}/{name}.json"))
        for name in ("a", "b", "c")
    ]
    assert gpu_check.run(config(30.0), tmp_path, tmp_path / "scratch", stages) == 0
    for i, name in enumerate("abc"):
        snapshot = json.loads((seen / f"{name}.json").read_text())
        statuses = [r["status"] for r in snapshot["stages"]]
        assert statuses == ["passed"] * i + ["running"] + ["planned"] * (2 - i)
        assert snapshot["status"] == "running"
    s = summary(tmp_path)
    assert s["status"] == "finished" and all(r["pid"] > 0 for r in s["stages"])
    assert all(r["seconds"] >= 0 and r["returncode"] == 0 for r in s["stages"])
    assert set(s["source"]) == {"commit", "sources_sha256"}


def test_a_run_killed_midway_keeps_what_finished(tmp_path):
    """SIGKILL of the whole run while a benchmark runs: the earlier stages' results are all in the folder."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "GPU_CHECK_DRY_RUN": "1",
        "GPU_CHECK_OUT": str(out),
        "GPU_CHECK_DRY_RUN_SCALE": "0.005",
        "GPU_CHECK_STAGES": "bench-fake-quant,bench-lsq",
        "GPU_CHECK_DRY_RUN_HANG": "bench-lsq",
    }
    proc = subprocess.Popen(COMMAND, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    running = None
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and running is None:
            time.sleep(0.02)
            try:
                stages = summary(out)["stages"]
            except (FileNotFoundError, json.JSONDecodeError):  # not yet written (the rename is atomic)
                continue
            running = next(
                (r for r in stages if r["name"] == "bench-lsq" and r["status"] == "running" and "pid" in r), None
            )
        assert running is not None, "bench-lsq never started"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if running is not None:  # the stage's own group survives its parent: end it as a device reset would
            try:
                os.killpg(running["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
    s = summary(out)
    status = {r["name"]: r["status"] for r in s["stages"]}
    assert s["status"] == "running" and status["bench-lsq"] == "running"
    assert status["build"] == status["doctor"] == status["bench-fake-quant"] == "passed"
    assert json.loads((out / "bench-kernels.json").read_text())["rows"]
    log = (out / "gpu-check.log").read_text()
    assert "=== bench-fake-quant: passed" in log and "=== bench-lsq:" in log
    check_output_folder(out)


def test_sigterm_ends_the_stage_and_marks_the_run_interrupted(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "GPU_CHECK_DRY_RUN": "1",
        "GPU_CHECK_OUT": str(out),
        "GPU_CHECK_DRY_RUN_SCALE": "0.002",
        "GPU_CHECK_DRY_RUN_HANG": "build",
    }
    proc = subprocess.Popen(COMMAND, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    pid = None
    while time.monotonic() < deadline and pid is None:
        time.sleep(0.02)
        try:
            pid = summary(out)["stages"][0].get("pid")
        except (FileNotFoundError, json.JSONDecodeError):
            continue
    assert pid is not None, "the build stand-in never started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 143
    s = summary(out)
    assert s["status"] == "interrupted" and s["stages"][0]["status"] == "interrupted"
    assert not gpu_check.group_alive(pid)


def test_log_is_capped(tmp_path, quick, monkeypatch):
    monkeypatch.setattr(gpu_check, "LOG_CAP_BYTES", 2000)
    stages = [stage("loud", sh("i=0; while [ $i -lt 200 ]; do echo line $i of noise; i=$((i+1)); done"))]
    assert gpu_check.run(config(30.0), tmp_path, tmp_path / "scratch", stages) == 0
    log = (tmp_path / "gpu-check.log").read_text()
    assert len(log.encode()) < 2000 + 200 and "[log capped at 2000 bytes" in log


def test_key_numbers_of_pytest_and_bench_results(tmp_path):
    junit = tmp_path / "r.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="t" name="ok"/>'
        '<testcase classname="t" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="t" name="err"><error message="y"/></testcase>'
        '<testcase classname="t" name="s1"><skipped message="needs X"/></testcase>'
        '<testcase classname="t" name="s2"><skipped message="needs X"/></testcase>'
        "</testsuite></testsuites>"
    )
    keys = gpu_check.pytest_keys(junit)
    assert keys == {
        "passed": 1,
        "failed": 2,
        "skipped": 2,
        "failed_tests": ["t::bad", "t::err"],
        "skip_reasons": {"needs X": 2},
    }
    assert "no junit report" in gpu_check.pytest_keys(tmp_path / "missing.xml")["note"]
    rows = [
        {"op": "lsq", "case": "c", "pass": "fwd", "impl": "ours", "ms": 1.0, "copy_fraction": 0.81234},
        {"op": "lsq", "case": "c", "pass": "fwd", "impl": "torch", "ms": 3.0, "speedup_vs_peer": 3.0},
        {
            "op": "lsq",
            "case": "c",
            "pass": "fwd",
            "impl": "compiled",
            "ms": None,
            "speedup_vs_peer": None,
            "error": "RuntimeError: boom",
        },
    ]
    rows.append(
        {"op": "spark_vs_qat_torch", "case": "W4A4", "pass": "step", "impl": "ratio", "ms": 0.9, "target": "<= 1"}
    )
    keys = gpu_check.bench_keys({"env": {"device": "GPU"}, "rows": rows})
    assert keys["errors"] == 1 and keys["device"] == "GPU"
    assert keys["headline"]["spark_vs_qat_torch | W4A4 | step"] == {"ratio": 0.9, "target": "<= 1"}
    assert keys["headline"]["lsq | c | fwd"] == {
        "ours_ms": 1.0,
        "copy_fraction": 0.812,
        "x_torch": 3.0,
        "x_compiled": None,
        "error_compiled": "RuntimeError: boom",
    }
    overhead = [
        {"op": "lsq", "case": "tiny", "pass": "fwd", "impl": "ours", "ms": 0.06, "over_torch": 12.0},
        {"op": "lsq", "case": "tiny", "pass": "fwd", "impl": "torch", "ms": 0.005, "over_torch": None},
    ]
    keys = gpu_check.bench_keys({"env": {}, "rows": overhead})
    assert keys["headline"]["lsq | tiny | fwd"] == {
        "ours_ms": 0.06,
        "copy_fraction": None,
        "ours_over_torch": 12.0,
        "torch_ms": 0.005,
    }
    text = gpu_check.text_keys("memcheck", ["ok    a\n", "FAIL  b\n", "========= ERROR SUMMARY: 3 errors\n"])
    assert text == {"sanitizer_errors": 3, "ok": 1, "fail": 1, "skip": 0}


def test_the_qat_and_overhead_stages_fit_the_480_s_budget(tmp_path):
    """The call-overhead, ResNet-18 QAT-step and SPARK-step benchmarks run within the device's 480 s by the
    plan's own estimates (none skipped or cut), and each writes its own result file."""
    new = ("bench-call-overhead", "bench-qat-step", "bench-distill-variants")
    stages = {s.name: s for s in gpu_check.plan(tmp_path, tmp_path, 16)}
    assert "--models resnet18 --source bench" in " ".join(stages["bench-qat-step"].command)  # no torchvision there
    plan = subprocess.run(
        [*COMMAND, "--plan"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "GPU_CHECK_BUDGET_S": "480"},
    ).stdout
    ends = [float(m) for m in re.findall(r"ends at (\d+) s", plan)]
    assert ends and max(ends) <= 480 - gpu_check.END_MARGIN_S, plan
    for name in new:
        line = next(ln for ln in plan.splitlines() if ln.startswith(f"  {name} "))
        assert "ends at" in line and "limit cut" not in line, line
    # the stand-ins of the three stages alone: they pass and each result lands in its own file
    result, out = run_script(tmp_path, GPU_CHECK_STAGES=",".join(new), GPU_CHECK_DRY_RUN_SCALE="0.004")
    assert result.returncode == 0, result.stdout + result.stderr
    records = {r["name"]: r for r in summary(out)["stages"]}
    for name in new:
        assert records[name]["status"] == "passed", records[name]
        assert records[name]["keys"]["file"] == "bench-" + name.removeprefix("bench-").replace("-", "_") + ".json"
        assert (out / records[name]["keys"]["file"]).is_file()
    check_output_folder(out)
