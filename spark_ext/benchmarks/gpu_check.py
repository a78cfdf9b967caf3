#!/usr/bin/env python3
"""GPU validation that fits one device command: ``GPU_CHECK_OUT=$OUT make gpu-check``.

Runs the stages below in order of value on a bare GPU machine (system python
with torch, triton, pytest preinstalled; no network), each under its own time
limit, within one budget (``GPU_CHECK_BUDGET_S``, default 480 s). A stage starts
only when the budget left covers its expected time (else it is skipped with a
note), and its limit is cut to the budget left; the last stage's expected time
is kept back for it, and the stages end 10 s before the budget.

Everything streams to the output folder (``GPU_CHECK_OUT``; default
``gpu-check-<UTC stamp>`` in the checkout's ``spark-ext-bench``) as it happens, so a run killed at
any point leaves what finished before it:

* ``gpu-check.log``  every stage's output, line by line (capped at 15 MiB);
* ``summary.json``   rewritten at every stage start and end (atomically): the
  plan, each stage's status (planned / running / passed / failed / timeout /
  skipped), seconds, limit, note and key numbers (test counts and failures,
  headline ratios, memcheck errors);
* ``bench-<name>.json`` each benchmark's result as soon as it is written
  (``spark-ext bench --from`` reads them and draws the plots, on any machine);
  the four kernel benchmarks (fake quant, LSQ, difficulty, weighted KD) add
  their rows to one file, ``bench-kernels.json``; the call-overhead, QAT-step,
  distiller-step and end-to-end benchmarks have one file each.

That is at most 8 files (five result files, with the one ``partial.tmp`` an
atomic write can leave), flat in the folder, names of letters, digits, ``.``,
``_``, ``-``: the device tool's limits. The plots are not among them: they
are drawn from the returned JSON afterwards (``spark-ext bench --from
OUT/bench-*.json --plot DIR``); the last stage prints the report (ratios,
bandwidth where memory-bound) into the log.

Environment (checked before anything runs; a bad value exits 2):

* ``GPU_CHECK_BUDGET_S``   seconds for the whole run (default 480);
* ``GPU_CHECK_OUT``        output folder;
* ``GPU_CHECK_STAGES``     comma list: run only these (build and doctor always run);
* ``GPU_CHECK_JOBS``       CPU cores to use (default: all): MAX_JOBS, pytest-xdist workers;
* ``GPU_CHECK_DRY_RUN=1``  no GPU needed: every stage is a stand-in that sleeps
  its expected time x ``GPU_CHECK_DRY_RUN_SCALE`` (default 0.01; budget and
  limits are scaled alike) and writes a fake artefact marked "dry run", so the
  budget plan, skipping, time limits and streaming run as they would on the
  device. ``GPU_CHECK_DRY_RUN_HANG`` / ``_FAIL`` (comma lists of stages) make
  stand-ins hang or fail. Default output: a temporary folder.

    GPU_CHECK_OUT=$OUT make gpu-check                              # on the GPU machine
    python -m spark_ext.benchmarks.gpu_check --plan                # print the plan and exit
    GPU_CHECK_DRY_RUN=1 python -m spark_ext.benchmarks.gpu_check   # CPU rehearsal, ~5 s

Run from the checkout's root (it builds, tests and benchmarks that checkout).
Standard library only: it must start on a bare machine before anything is
installed (as a module of the package it also imports ``spark_ext`` and so
torch, which that machine has; nothing of the C++ library is loaded).
Exit status: 0 when every stage that ran passed, 1 otherwise, 2 on a bad
setting, 143 when terminated.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime as dt
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]  # the checkout
PY = sys.executable

LOG, SUMMARY, TMP = "gpu-check.log", "summary.json", "partial.tmp"
# The kernel benchmarks share one result file (the device returns at most 8 files); the others have their own.
KERNEL_BENCHES = ("fake_quant", "lsq", "difficulty", "weighted_kd")
OWN_FILE_BENCHES = ("e2e", "call_overhead", "qat_step", "distill_variants")
KERNELS_FILE = "bench-kernels.json"
RESULT_FILES = (KERNELS_FILE,) + tuple(f"bench-{b}.json" for b in OWN_FILE_BENCHES)
OUTPUT_NAMES = (LOG, SUMMARY, TMP) + RESULT_FILES
MAX_FILES, MAX_FILE_BYTES = 8, 16 * 2**20
LOG_CAP_BYTES = 15 * 2**20
KILL_GRACE_S = 5.0  # SIGTERM, then this long before SIGKILL
END_MARGIN_S = 10.0  # the stages end this long before the budget: start-up, last writes, a late kill
assert len(OUTPUT_NAMES) <= MAX_FILES


@dataclasses.dataclass
class Stage:
    """One step of the plan. Times are guesses until a GPU run measures them (summary.json's ``seconds``)."""

    name: str
    what: str
    command: list[str]
    expected_s: float  # planned duration: not started with less budget than this left
    limit_s: float  # killed after this long (or when the budget runs out)
    kind: str = "text"  # how its key numbers are read: build, doctor, pytest, bench, memcheck, report
    artifact: Optional[Path] = None  # junit XML or bench result folder, in the scratch folder
    env: dict = dataclasses.field(default_factory=dict)
    required: bool = False  # on failure the rest is skipped
    unavailable: Optional[str] = None  # why it cannot run here (skipped with this note)


def pytest_stage(name, what, args, scratch, workers, expected_s, limit_s, jobs):
    junit = scratch / f"{name}.xml"
    xdist = ["-n", str(workers)] if workers > 1 and importlib.util.find_spec("xdist") else []
    threads = str(max(1, jobs // max(1, workers if xdist else 1)))  # torch threads per worker: no oversubscription
    return Stage(
        name,
        what,
        [PY, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}"] + xdist + args,
        expected_s,
        limit_s,
        "pytest",
        junit,
        {"OMP_NUM_THREADS": threads},
    )


def bench_stage(bench, what, args, scratch, expected_s, limit_s):
    folder = scratch / f"bench-{bench}"
    return Stage(
        f"bench-{bench.replace('_', '-')}",
        what,
        [PY, "-m", f"spark_ext.benchmarks.bench_{bench}", "--headline", "--out", str(folder)] + args,
        expected_s,
        limit_s,
        "bench",
        folder,
    )


def plan(scratch: Path, out: Path, jobs: int) -> list[Stage]:
    """The stages, in order of value."""
    sanitizer = shutil.which("compute-sanitizer")
    stages = [
        Stage(
            "build",
            "pip install -e . (C++/CUDA library for this GPU's arch only)",
            [PY, "-m", "spark_ext.benchmarks.gpu_check", "--build"],
            100,
            240,
            "build",
            required=True,
        ),
        Stage(
            "doctor",
            "spark-ext doctor: devices, backends, library status",
            [PY, "-m", "spark_ext.cli", "doctor"],
            15,
            60,
            "doctor",
        ),
        pytest_stage(
            "cuda-tests",
            "every cuda-marked test (graph capture in its own stage)",
            ["-m", "cuda", "tests", "--ignore=tests/ops/test_cuda_graphs.py"],
            scratch,
            min(8, jobs),
            90,
            150,
            jobs,
        ),
        pytest_stage(
            "properties",
            "hypothesis properties: Triton and LSQ kernels on CUDA vs the reference",
            ["tests/ops/test_properties.py"],
            scratch,
            min(4, jobs),
            25,
            60,
            jobs,
        ),
        pytest_stage(
            "cuda-graphs",
            "CUDA-graph capture and replay of every fast op",
            ["tests/ops/test_cuda_graphs.py"],
            scratch,
            1,
            20,
            60,
            jobs,
        ),
        bench_stage(
            "call_overhead",
            "per-call time of every op and quantizer module, tiny and small tensors, vs torch and an empty custom op",
            [],
            scratch,
            60,
            120,
        ),
        bench_stage(
            "qat_step",
            "a torch.ao QAT step of ResNet-18 (benchmarks.qat_models), batch 32, 224 px: our vs torch's fake quant",
            ["--models", "resnet18", "--source", "bench"],
            scratch,
            45,
            100,
        ),
        bench_stage(
            "distill_variants",
            "the demo's SPARK step vs uniform KD and plain QAT with our / torch's fake quant",
            [],
            scratch,
            50,
            100,
        ),
        bench_stage(
            "fake_quant", "§5a drop-ins vs torch's learnable ops, eager, compiled; % of copy", [], scratch, 45, 90
        ),
        bench_stage("lsq", "LSQ vs torch's learnable op, eager, compiled; % of copy", [], scratch, 45, 90),
        bench_stage("difficulty", "SPARK path fwd+bwd vs eager, compiled; % of copy", [], scratch, 60, 110),
        bench_stage("weighted_kd", "weighted KD vs eager, compiled, F.l1_loss; % of copy", [], scratch, 50, 100),
        bench_stage(
            "e2e",
            "one W4A4 SPARK QAT step: ours vs eager reference vs plain QAT with our / torch's fake quant",
            ["--no-compiled"],
            scratch,
            50,
            100,
        ),
        Stage(
            "memcheck",
            "compute-sanitizer memcheck, one short run of each kernel",
            [
                sanitizer or "compute-sanitizer",
                "--tool",
                "memcheck",
                "--error-exitcode",
                "1",
                "--print-limit",
                "20",
                PY,
                "-m",
                "spark_ext.benchmarks.sanitize_kernels",
                "--short",
            ],
            45,
            120,
            "memcheck",
            # every tensor its own cudaMalloc: out-of-bounds accesses inside the caching allocator's blocks show
            env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
            unavailable=None if sanitizer else "compute-sanitizer not found",
        ),
        pytest_stage(
            "rest",
            "the rest of the suite (not cuda-marked), slow tests included",
            ["-m", "not cuda", "tests", "--ignore=tests/ops/test_properties.py"],
            scratch,
            jobs,
            150,
            300,
            jobs,
        ),
        Stage(
            "report",
            "spark-ext bench --from the benchmark results: ratio tables into the log",
            report_command(out),
            10,
            40,
            "report",
        ),
    ]
    return stages


def result_file(bench: str) -> str:
    """The output file that holds ``bench``'s results."""
    return KERNELS_FILE if bench in KERNEL_BENCHES else f"bench-{bench}.json"


def report_command(out: Path) -> list[str]:
    """``spark-ext bench --from`` the bench JSON already in the output folder (all of them when planning)."""
    results = [out / name for name in RESULT_FILES]
    existing = [p for p in results if p.is_file()]
    files = [str(p) for p in existing or results]
    return [PY, "-m", "spark_ext.cli", "bench", "--from", *files]


# --------------------------------------------------------------------------
# output folder: the log, summary.json, result files
# --------------------------------------------------------------------------


class Log:
    """Tee: every line to stdout and, up to LOG_CAP_BYTES, to the log file, flushed at once."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8", errors="replace")
        self.lock = threading.Lock()
        self.written = 0
        self.capped = False

    def write(self, text: str) -> None:
        data = text.encode("utf-8", "replace")
        with self.lock:
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except (OSError, ValueError):  # nobody reads stdout any more: the file still gets everything
                pass
            if self.written + len(data) > LOG_CAP_BYTES:
                if not self.capped:
                    self.file.write(f"\n[log capped at {LOG_CAP_BYTES} bytes: the rest went to stdout only]\n")
                    self.file.flush()
                    self.capped = True
                return
            self.file.write(text)
            self.file.flush()
            self.written += len(data)


def write_atomic(out: Path, name: str, data: bytes) -> None:
    """Write ``out/name`` so that a reader (or a kill) never sees half a file."""
    assert name in OUTPUT_NAMES, name
    tmp = out / TMP
    tmp.write_bytes(data)
    os.replace(tmp, out / name)


def source_digest() -> dict:
    """Which code ran: the git commit where there is one, and a digest of the sources (the device copy has no .git)."""
    h = hashlib.sha256()
    for top in ("spark_ext", "kernels", "csrc", "tests"):
        for path in sorted((ROOT / top).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".cpp", ".h", ".cu", ".cuh", ".sh"):
                h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    try:
        commit = (
            subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"commit": commit, "sources_sha256": h.hexdigest()[:16]}


# --------------------------------------------------------------------------
# key numbers of a finished stage
# --------------------------------------------------------------------------


def pytest_keys(junit: Path) -> dict:
    if not junit.is_file():
        return {"note": "no junit report (cut off before pytest finished?): see the log"}
    root = ET.parse(junit).getroot()
    counts = collections.Counter()
    failed, skip_reasons = [], collections.Counter()
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failed.append(test_id)
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
            skip_reasons[(case.find("skipped").get("message") or "")[:160]] += 1
        else:
            counts["passed"] += 1
    return {
        "passed": counts["passed"],
        "failed": counts["failed"],
        "skipped": counts["skipped"],
        "failed_tests": failed[:30],
        "skip_reasons": dict(skip_reasons.most_common(5)),
    }


def bench_keys(result: dict) -> dict:
    """Headline numbers of one bench JSON: per (op, case, pass) our ms, % of copy, and peer time / ours."""
    rows = result.get("rows", [])
    lines = {}
    for r in rows:
        key = f"{r.get('op')} | {r.get('case')} | {r.get('pass')}"
        line = lines.setdefault(key, {})
        if r.get("impl") == "ours":
            line["ours_ms"] = r.get("ms")
            line["copy_fraction"] = r.get("copy_fraction")
            if r.get("over_torch") is not None:  # bench_call_overhead: ours / torch at the median
                line["ours_over_torch"] = r["over_torch"]
        elif r.get("impl") == "ratio":  # a whole-result ratio (bench_e2e: ms holds it), with its target if any
            line["ratio"] = r.get("ms")
            if r.get("target"):
                line["target"] = r["target"]
        elif "speedup_vs_peer" in r:
            line[f"x_{r.get('impl')}"] = r["speedup_vs_peer"]
        else:  # a benchmark that records no speed-up (call overhead, QAT step): the peer's own time
            line[f"{r.get('impl')}_ms"] = r.get("ms")
        if r.get("error"):
            line[f"error_{r.get('impl')}"] = r["error"]
    rounded = {k: {n: round(v, 3) if isinstance(v, float) else v for n, v in line.items()} for k, line in lines.items()}
    return {
        "device": result.get("env", {}).get("device"),
        "rows": len(rows),
        "errors": sum(1 for r in rows if r.get("error")),
        "headline": rounded,
    }


def text_keys(kind: str, lines: list[str]) -> dict:
    text = "".join(lines)
    if kind == "build":
        m = re.search(r"^TORCH_CUDA_ARCH_LIST=(\S*)", text, re.M)
        return {"arch": m.group(1) if m else None}
    if kind == "doctor":
        keep = ("spark_ext ", "triton", "CUDA available", "C++/CUDA library", "default backend")
        return {"lines": [ln.strip() for ln in lines if ln.startswith(keep)]}
    if kind == "memcheck":
        m = re.search(r"ERROR SUMMARY: (\d+) error", text)
        return {
            "sanitizer_errors": int(m.group(1)) if m else None,
            "ok": len(re.findall(r"^ok ", text, re.M)),
            "fail": len(re.findall(r"^FAIL ", text, re.M)),
            "skip": len(re.findall(r"^skip ", text, re.M)),
        }
    return {}


def collect(stage: Stage, out: Path, output: list[str]) -> dict:
    """Key numbers of a stage that ran; copies bench JSON into the output folder."""
    if stage.kind == "pytest":
        return pytest_keys(stage.artifact)
    if stage.kind == "bench":
        results = sorted(stage.artifact.glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not results:
            return {"note": "no result JSON (cut off before the benchmark saved?): per-pass lines are in the log"}
        result = json.loads(results[-1].read_text())
        bench = stage.artifact.name.removeprefix("bench-")  # the script's name
        name = result_file(bench)
        if name == KERNELS_FILE:  # this benchmark's rows join those of the kernel benchmarks before it
            merged = json.loads((out / name).read_text()) if (out / name).is_file() else {"rows": []}
            merged.update(benchmark="kernels", env=result.get("env", {}))
            merged["benchmarks"] = merged.get("benchmarks", []) + [bench]
            merged["rows"] = merged["rows"] + [{**row, "benchmark": bench} for row in result.get("rows", [])]
            write_atomic(out, name, json.dumps(merged, indent=1).encode())
        else:
            write_atomic(out, name, results[-1].read_bytes())
        return {"file": name, **bench_keys(result)}
    return text_keys(stage.kind, output)


# --------------------------------------------------------------------------
# running one stage
# --------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM: a BaseException, so that no ``except Exception`` on the way swallows it."""


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs; zombies (exited, not yet reaped) do not count."""
    if not Path("/proc/self/stat").exists():  # not Linux: zombies count
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError, IndexError):  # gone while we looked
            continue
        if int(group) == pgid and state not in ("Z", "X"):
            return True
    return False


def kill_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the stage's process group, then SIGKILL whatever still runs after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 1.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while True:
            proc.poll()  # reap the leader
            if not group_alive(proc.pid):
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)


def run_command(command, env, timeout_s, log: Log, on_start) -> tuple[Optional[int], list[str]]:
    """Run in a new process group, tee its output; returns (exit code or None when timed out, last lines)."""
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    tail: collections.deque = collections.deque(maxlen=4000)

    def pump():
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace")
            tail.append(line)
            log.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        on_start(proc.pid)
        try:
            rc: Optional[int] = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
    except BaseException:  # Terminated, KeyboardInterrupt: the stage's processes go with us
        kill_group(proc, 1.0)
        raise
    kill_group(proc, KILL_GRACE_S if rc is None else 0.5)  # stragglers of a finished stage too
    proc.wait()
    reader.join(timeout=5)
    return rc, list(tail)


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------


def settings(environ) -> dict:
    """Read and check the environment; raises ValueError with one clear line."""

    def number(name, default, kind=float):
        raw = environ.get(name, "")
        if raw == "":
            return default
        try:
            value = kind(raw)
        except ValueError:
            value = None
        if value is None or value <= 0:
            raise ValueError(f"{name} must be a positive {'integer' if kind is int else 'number'}, got {raw!r}")
        return value

    def names(name):
        chosen = [s for s in environ.get(name, "").split(",") if s.strip()]
        unknown = [s for s in chosen if s.strip() not in STAGE_NAMES]
        if unknown:
            raise ValueError(f"{name}: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGE_NAMES)}")
        return {s.strip() for s in chosen}

    dry = environ.get("GPU_CHECK_DRY_RUN", "") not in ("", "0")
    return {
        "budget_s": number("GPU_CHECK_BUDGET_S", 480.0),
        "jobs": number("GPU_CHECK_JOBS", os.cpu_count() or 1, int),
        "stages": names("GPU_CHECK_STAGES"),
        "dry_run": dry,
        "scale": number("GPU_CHECK_DRY_RUN_SCALE", 0.01) if dry else 1.0,
        "hang": names("GPU_CHECK_DRY_RUN_HANG"),
        "fail": names("GPU_CHECK_DRY_RUN_FAIL"),
        "out": environ.get("GPU_CHECK_OUT", ""),
    }


STAGE_NAMES = tuple(s.name for s in plan(Path("scratch"), Path("out"), 1))


# What a stage prints, in the dry run, for its key numbers to be read as on the device.
STAND_IN_OUTPUT = {
    "build": "TORCH_CUDA_ARCH_LIST=dry-run MAX_JOBS=0",
    "doctor": "CUDA available: False (dry run)\nC++/CUDA library: dry run",
    "memcheck": "ok    dry run\n========= ERROR SUMMARY: 0 errors",
}


def stand_in(stage: Stage, cfg: dict) -> list[str]:
    """The dry run's replacement for ``stage``: a shell that sleeps its scaled expected time (or hangs) and exits."""
    seconds = 3600 if stage.name in cfg["hang"] else stage.expected_s * cfg["scale"]
    script = (
        f"echo {shlex.quote('dry run: would run: ' + shlex.join(stage.command))}; sleep {seconds:.4f}; "
        f"echo {shlex.quote(STAND_IN_OUTPUT.get(stage.kind, 'dry run: ' + stage.name + ' done'))}; "
        f"exit {1 if stage.name in cfg['fail'] else 0}"
    )
    return ["sh", "-c", script]


def write_stand_in_artifact(stage: Stage) -> None:
    """The fake result file of a dry-run stage, marked as such, for :func:`collect` to read."""
    if stage.kind == "pytest":
        stage.artifact.write_text(
            '<testsuites><testsuite name="dry-run"><testcase classname="dry_run" name="passes"/>'
            '<testcase classname="dry_run" name="skips"><skipped message="dry run"/></testcase>'
            "</testsuite></testsuites>"
        )
    elif stage.kind == "bench":
        stage.artifact.mkdir(parents=True, exist_ok=True)
        rows = [
            {
                "op": "dry_run",
                "case": "stand-in, nothing measured",
                "pass": "fwd",
                "impl": impl,
                "ms": ms,
                "copy_fraction": 0.5 if impl == "ours" else None,
                "speedup_vs_peer": None if impl == "ours" else ms,
            }
            for impl, ms in (("ours", 1.0), ("eager", 2.0))
        ]
        result = {"benchmark": "dry_run", "env": {"device": "DRY RUN: stand-in, nothing measured"}, "rows": rows}
        (stage.artifact / "dry_run.json").write_text(json.dumps(result))


def build(jobs: int) -> int:
    """The build stage: the C++/CUDA library for this GPU's architecture only, with ``jobs`` compile jobs."""
    probe = "import torch; print(*torch.cuda.get_device_capability(), sep='.') if torch.cuda.is_available() else None"
    result = subprocess.run([PY, "-c", probe], capture_output=True, text=True)
    arch = result.stdout.strip()
    if not re.fullmatch(r"\d+\.\d+", arch):
        why = (result.stderr.strip().splitlines() or ["torch.cuda.is_available() is False"])[-1]
        print(f"gpu_check: no CUDA device, nothing to build for ({why})", flush=True)
        return 1
    print(f"TORCH_CUDA_ARCH_LIST={arch} MAX_JOBS={jobs}", flush=True)
    pip = [PY, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."]
    print(f"$ {shlex.join(pip)}", flush=True)
    return subprocess.call(pip, cwd=ROOT, env={**os.environ, "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(jobs)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", action="store_true", help="print the stages with their planned times and exit")
    parser.add_argument("--build", action="store_true", help="run the build stage alone")
    args = parser.parse_args(argv)
    try:
        cfg = settings(os.environ)
    except ValueError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    if args.build:
        return build(cfg["jobs"])
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    if cfg["out"]:
        out = Path(cfg["out"])
    elif cfg["dry_run"]:
        out = Path(tempfile.mkdtemp(prefix="gpu-check-dry-run-"))
    else:
        out = ROOT / "spark-ext-bench" / f"gpu-check-{stamp}"
    if args.plan:
        print_plan(plan(Path("<scratch>"), out, cfg["jobs"]), cfg)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-scratch-"))
    return run(cfg, out, scratch)


def print_plan(stages: list[Stage], cfg: dict) -> None:
    """The run as it goes if every stage takes its expected time (the same skipping rule as :func:`run`)."""
    print(f"budget {cfg['budget_s']:.0f} s; expected / limit per stage (guesses until a GPU run measures them):")
    elapsed, reserve = 0.0, stages[-1].expected_s + KILL_GRACE_S
    for s in stages:
        left = cfg["budget_s"] - END_MARGIN_S - elapsed - (0 if s is stages[-1] else reserve)
        if left < s.expected_s:
            verdict = f"skipped: {max(left, 0):.0f} s left"
        else:
            elapsed += s.expected_s
            verdict = f"ends at {elapsed:.0f} s" + (f" (limit cut to {left:.0f} s)" if left < s.limit_s else "")
        print(
            f"  {s.name:22s} {s.expected_s:4.0f} / {s.limit_s:4.0f} s  {verdict}"
            f"{'' if s.unavailable is None else f' (unavailable here: {s.unavailable})'}\n      {s.what}"
        )
    print(f"sources here: {source_digest()} (summary.json's 'source' says which sources a run tested)")


def skip_reason(stage: Stage, cfg: dict, out: Path, left_s: float, blocked: Optional[str]) -> Optional[str]:
    """Why ``stage`` is not started (None: start it); ``left_s``: budget left to it, in device seconds."""
    if cfg["stages"] and stage.name not in cfg["stages"] and stage.name not in ("build", "doctor"):
        return "not in GPU_CHECK_STAGES"
    if blocked:
        return f"{blocked} failed"
    if stage.unavailable and not cfg["dry_run"]:
        return stage.unavailable
    if stage.kind == "report" and not any((out / name).is_file() for name in RESULT_FILES):
        return "no benchmark results to report"
    if left_s < stage.expected_s:
        return f"budget: expected to take {stage.expected_s:.0f} s, {max(left_s, 0):.0f} s left"
    return None


def run(cfg: dict, out: Path, scratch: Path, stages: Optional[list[Stage]] = None) -> int:
    """Run ``stages`` (default: :func:`plan`) into ``out``; returns the exit status."""
    scale = cfg["scale"]
    stages = plan(scratch, out, cfg["jobs"]) if stages is None else stages
    start, started_at = time.monotonic(), dt.datetime.now(dt.timezone.utc)
    deadline = start + (cfg["budget_s"] - END_MARGIN_S) * scale
    final_reserve = (stages[-1].expected_s + KILL_GRACE_S) * scale  # kept for the last stage (the report)
    log = Log(out / LOG)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_NAMES)
    summary = {
        "tool": "spark_ext.benchmarks.gpu_check",
        "status": "running",
        "dry_run": cfg["dry_run"],
        "budget_s": cfg["budget_s"],
        "jobs": cfg["jobs"],
        "started": started_at.isoformat(timespec="seconds"),
        "elapsed_s": 0.0,
        "source": source_digest(),
        "device": None,
        "stages": [
            {"name": s.name, "what": s.what, "status": "planned", "expected_s": s.expected_s, "limit_s": s.limit_s}
            for s in stages
        ],
    }
    if cfg["dry_run"]:
        summary["dry_run_scale"] = scale
        summary["note"] = "DRY RUN: stand-ins only, nothing was built, tested or measured"

    def save():
        summary["elapsed_s"] = round((time.monotonic() - start) / scale, 1)
        summary["updated"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        write_atomic(out, SUMMARY, (json.dumps(summary, indent=1) + "\n").encode())

    def stamp(text):
        log.write(f"[{(time.monotonic() - start) / scale:6.1f} s] {text}\n")

    def on_term(signum, _frame):
        raise Terminated(signal.Signals(signum).name)

    previous_handler = signal.signal(signal.SIGTERM, on_term)
    save()
    stamp(
        f"gpu_check: budget {cfg['budget_s']:.0f} s, {len(stages)} stages, output {out}"
        + (f" (DRY RUN, time x{scale})" if cfg["dry_run"] else "")
    )
    if foreign:
        stamp(f"warning: {out} already holds {len(foreign)} other file(s); the device returns at most {MAX_FILES}")
    blocked = None
    try:
        for stage, record in zip(stages, summary["stages"]):
            left = deadline - time.monotonic() - (0 if stage is stages[-1] else final_reserve)
            note = skip_reason(stage, cfg, out, left / scale, blocked)
            if note:
                record.update(status="skipped", note=note)
                stamp(f"=== {stage.name}: skipped ({note})")
                save()
                continue
            if stage.kind == "report":
                stage.command = report_command(out)  # the results that exist now
            limit = min(stage.limit_s * scale, left)
            record.update(status="running", limit_s=round(limit / scale, 1))
            if limit < stage.limit_s * scale:
                record["note"] = f"limit cut from {stage.limit_s:.0f} s to fit the budget"
            command = stand_in(stage, cfg) if cfg["dry_run"] else stage.command
            stamp(f"=== {stage.name}: {stage.what}\n$ {shlex.join(stage.command)}  (limit {limit / scale:.0f} s)")
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "MAX_JOBS": str(cfg["jobs"]), **stage.env}
            save()
            t0 = time.monotonic()

            def started(pid, record=record):
                record["pid"] = pid  # its process group: the one to clean up after a kill of this run
                save()

            rc, output = run_command(command, env, limit, log, started)
            if cfg["dry_run"] and rc is not None:
                write_stand_in_artifact(stage)
            seconds = (time.monotonic() - t0) / scale
            status = "timeout" if rc is None else "passed" if rc == 0 else "failed"
            record.update(status=status, seconds=round(seconds, 1), returncode=rc)
            try:
                record["keys"] = collect(stage, out, output)
            except Exception as exc:  # a malformed artefact must not lose the run; say so in the summary
                record["keys"] = {"note": f"could not read the stage's results: {type(exc).__name__}: {exc}"}
            if stage.kind == "doctor":
                summary["device"] = next((ln for ln in record["keys"].get("lines", []) if "CUDA available" in ln), None)
            stamp(f"=== {stage.name}: {status}" + (f" (exit {rc})" if rc else "") + f" after {seconds:.1f} s")
            if stage.required and status != "passed":
                blocked = stage.name
            save()
    except (Terminated, KeyboardInterrupt) as exc:
        for record in summary["stages"]:
            if record["status"] == "running":
                record.update(status="interrupted", note=f"{type(exc).__name__} {exc}".strip())
        summary["status"] = "interrupted"
        stamp(f"gpu_check: interrupted ({exc or type(exc).__name__})")
        save()
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    ran = [r for r in summary["stages"] if r["status"] not in ("skipped", "planned")]
    bad = [r["name"] for r in ran if r["status"] != "passed"]
    skipped = [r["name"] for r in summary["stages"] if r["status"] == "skipped"]
    summary["status"] = "finished"
    summary["result"] = "failed" if bad else "passed"
    save()
    stamp(
        f"gpu_check: {'FAILED: ' + ', '.join(bad) if bad else 'PASSED'} ({len(ran)} stages ran"
        + (f"; skipped: {', '.join(skipped)}" if skipped else "")
        + f"); results in {out}"
    )
    shutil.rmtree(scratch, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
