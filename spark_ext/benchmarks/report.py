"""Reading benchmark results: check, load, summarise, print tables, draw plots (``spark-ext bench``).

Also the machine facts every result records: :func:`device_name` and :func:`last_level_cache_bytes`
(:mod:`spark_ext.benchmarks.common` writes them into ``env``).

The report reads the row schema of :mod:`spark_ext.benchmarks.common`: for each op, case and
pass it prints our median time and its p20-p80 spread, the speed-up over each
peer (peer time / our time, > 1 means we are faster), the achieved bandwidth
as a fraction of a device copy measured in the same run, and peak extra
memory; then the whole-step ratios of the end-to-end benchmark.

Bandwidth is only reported where the bytes really move through memory: a
pass whose working set (the row's ``bytes``: what it must read and write)
is at least ``MEMORY_BOUND_FACTOR`` (4) times the last-level cache. Below
that the data can stay in the cache between repetitions (on CPU nothing
evicts it; on GPU the output written last stays in L2), so GB/s measure the
cache and a "fraction of copy" can exceed 1 many times over; those cases
say "in cache" instead. At 4x at most a quarter of the bytes can be cache
hits, whatever the replacement policy. The last-level cache is the one
:func:`last_level_cache_bytes` reads: on CPU the highest data/unified level
in ``/sys/devices/system/cpu/cpu0/cache/index*/`` (index3 = L3 on x86; one
instance, not the sum over sockets), else ``lscpu``; on CUDA
``torch.cuda.get_device_properties(d).L2_cache_size``. Benchmarks record it
in their JSON (``env.llc_bytes``); for older results without it, the cache of
this machine is used when its device name is the run's, and otherwise the
bandwidth is shown with a "?" (not known to be memory-bound).

Two kinds of result get their own table instead: the per-call times of
``bench_call_overhead`` (per op or module, case, pass and implementation:
p50 / p90 / max in µs, and at the median the time over torch's and over the
empty custom op's, the floor), and whole training steps (every row's pass is
``step``: ``bench_e2e``, ``bench_qat_step``, ``bench_distill_variants``;
p50 / p90 / max in ms per case and implementation, then the run's ratios).

:func:`plot` draws one PNG per result file (matplotlib: the ``demo`` extra): for op benchmarks one row of
panels per op (speed-ups on a log axis with a line at 1, one line per case
and pass, p20-p80 whiskers; bandwidth fraction beside it); for the
call-overhead benchmark one panel per op or module, a bar per implementation
at p50 with a line to p90 and a cross at the max, in µs on a log axis; for
step benchmarks the step times side by side (p50 to p90 and the max where
recorded, else p20-p80).

Every result file is checked before anything is reported (:func:`check_result`:
an object with a non-empty list of row objects, each with string ``op``,
``case``, ``pass``, ``impl`` and numbers or null in its timing and size
fields); :func:`load` raises ``ValueError`` naming the first bad file,
:func:`load_each` leaves bad files out and says why.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from spark_ext.atomic import atomic_path

PEERS = ("eager", "compiled", "torch")
DEFAULT_OUT = Path("spark-ext-bench")  # where runs write JSON and plots: a folder in the current directory
MEMORY_BOUND_FACTOR = 4  # working set >= this x last-level cache: the bytes come from memory
PASS_ORDER = ("fwd", "bwd", "fwd+bwd", "spark", "step")


# --------------------------------------------------------------------------
# the machine: device name and last-level cache
# --------------------------------------------------------------------------


def device_name(device="cpu") -> str:
    """The device as results name it (``env.device``): the CUDA device's name, or ``CPU (<arch>, <n> cores)``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _parse_size(text: str) -> Optional[int]:
    """``"307200K"`` (sysfs), ``"300 MiB"`` / ``"32 MB"`` (lscpu) -> bytes; K, M, G are powers of 1024."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?)(?:i?B)?\s*", text)
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** " KMG".index(m.group(2) or " "))


def _sysfs_llc_bytes(cache_dir: Path) -> Optional[int]:
    """Size of the highest-level data or unified cache listed in ``cache_dir`` (``.../cpu0/cache``)."""
    best = None  # (level, bytes)
    for index in sorted(cache_dir.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = _parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        if kind != "Instruction" and size and (best is None or level > best[0]):
            best = (level, size)
    return best[1] if best else None


def _lscpu_llc_bytes(text: str) -> Optional[int]:
    """One instance of the L3 (else L2) cache from ``lscpu`` output (it prints the total over instances)."""
    for level in ("L3", "L2"):
        m = re.search(rf"^{level} cache:\s*([\d.]+\s*[KMG]?i?B?)\s*(?:\((\d+) instances?\))?", text, re.M)
        if m and _parse_size(m.group(1)):
            return _parse_size(m.group(1)) // int(m.group(2) or 1)
    return None


def _cpu_last_level_cache_bytes() -> Optional[int]:
    llc = _sysfs_llc_bytes(Path("/sys/devices/system/cpu/cpu0/cache"))
    if llc:
        return llc
    try:  # no sysfs cache listing (some containers, other systems)
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return _lscpu_llc_bytes(out)


def last_level_cache_bytes(device="cpu") -> Optional[int]:
    """Bytes of the last-level cache serving ``device`` (None when it cannot be read); see the module docstring."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or None
    if device.type == "cpu":
        return _cpu_last_level_cache_bytes()
    return None


def run_llc_bytes(run: dict) -> tuple[Optional[int], str]:
    """``(bytes, where from)`` of the last-level cache of the machine that measured ``run``."""
    env = run.get("env", {})
    if env.get("llc_bytes"):
        return int(env["llc_bytes"]), "recorded"
    name = env.get("device") or ""
    try:
        import torch

        local = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        for device in local:
            if device_name(device) == name:
                llc = last_level_cache_bytes(device)
                if llc:
                    return llc, "not recorded: this machine's (same device name)"
    except Exception as exc:  # noqa: BLE001  a broken torch/CUDA set-up leaves the cache unknown, not the report
        return None, f"unknown: not recorded in the run, and this machine's could not be read ({exc})"
    return None, "unknown: not recorded in the run, which came from another device"


def memory_bound(nbytes: Optional[int], llc: Optional[int]) -> Optional[bool]:
    """Whether a pass moving ``nbytes`` streams from memory (working set >= 4x LLC); None when unknown."""
    if not nbytes or not llc:
        return None
    return nbytes >= MEMORY_BOUND_FACTOR * llc


# --------------------------------------------------------------------------
# reading results
# --------------------------------------------------------------------------

# Fields a row must have (strings), and those that, when present, must be numbers or null: timings
# positive (a ratio divides by them), sizes and fractions non-negative.
ROW_KEYS = ("op", "case", "pass", "impl")
TIMING_FIELDS = ("ms", "ms_p20", "ms_p50", "ms_p80", "ms_p90", "ms_max", "ms_min")
SIZE_FIELDS = ("bytes", "gbps", "copy_fraction", "peak_extra_bytes", "over_torch", "over_floor")


def _json_type(value) -> str:
    """How JSON would name ``value``'s type, for messages."""
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (str, "a string"), (list, "a list"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "a number" if isinstance(value, (int, float)) else type(value).__name__


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_result(data) -> Optional[str]:
    """Why ``data`` (a parsed result file) cannot be reported, or None when it can.

    A result is an object with a non-empty list ``rows`` of row objects, each with string ``op``,
    ``case``, ``pass`` and ``impl`` and, where present, numbers or null for the timing fields (positive)
    and the size fields (non-negative); ``env`` and ``config``, where present, are objects."""
    if not isinstance(data, dict):
        return f"not a spark_ext benchmark result: the top level is {_json_type(data)}, expected an object"
    if "rows" not in data:
        return "not a spark_ext benchmark result (no 'rows')"
    rows = data["rows"]
    if not isinstance(rows, list):
        return f"'rows' is {_json_type(rows)}, expected a list of row objects"
    if not rows:
        return "'rows' is empty: nothing to report"
    for name in ("env", "config"):
        if name in data and not isinstance(data[name], dict):
            return f"'{name}' is {_json_type(data[name])}, expected an object"
    llc = data.get("env", {}).get("llc_bytes")
    if llc is not None and not (_is_number(llc) and llc > 0):
        return f"'env.llc_bytes' is {llc!r}, expected a positive number or null"
    if "benchmark" in data and not isinstance(data["benchmark"], str):
        return f"'benchmark' is {_json_type(data['benchmark'])}, expected a string"
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            return f"rows[{i}] is {_json_type(row)}, expected an object"
        for key in ROW_KEYS:
            if key not in row:
                return f"rows[{i}] has no {key!r}"
            if not isinstance(row[key], str):
                return f"rows[{i}][{key!r}] is {_json_type(row[key])}, expected a string"
        for fields, positive in ((TIMING_FIELDS, True), (SIZE_FIELDS, False)):
            for key in fields:
                value = row.get(key)
                if value is not None and not (_is_number(value) and (value > 0 if positive else value >= 0)):
                    want = "a positive number" if positive else "a non-negative number"
                    return f"rows[{i}][{key!r}] is {value!r}, expected {want} or null"
    return None


def load(paths: Sequence[Path]) -> list[dict]:
    """The result files, parsed and checked; raises ``ValueError`` naming the first bad file and what is
    wrong with it (``OSError`` when one cannot be read)."""
    runs = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not a text file ({exc.reason})") from None
        problem = check_result(data)
        if problem:
            raise ValueError(f"{path}: {problem}")
        data["path"] = str(path)
        runs.append(data)
    return runs


def load_each(paths: Sequence[Path]) -> tuple[list[dict], list[str]]:
    """Like :func:`load`, but a bad file is left out: returns the good runs and one line per bad file."""
    runs, problems = [], []
    for path in paths:
        try:
            runs += load([path])
        except (OSError, ValueError) as exc:
            problems.append(str(exc) if str(path) in str(exc) else f"{path}: {exc}")
    return runs, problems


def summarise(run: dict) -> list[dict]:
    """One line per (op, case, pass): our ms (p20/p80), speed-up over each peer, bandwidth, peak memory.

    ``x_<peer>`` = peer median / our median; ``x_<peer>_range`` = (peer p20 / our p80, peer p80 / our p20)
    where both recorded percentiles. ``memory_bound`` (True / False / None = unknown) says whether
    ``copy_frac`` measures memory (see the module docstring). Ratio rows (``impl == "ratio"``) are left to
    :func:`ratio_rows`.
    """
    llc, _ = run_llc_bytes(run)
    groups: dict[tuple, dict] = defaultdict(dict)
    for row in run["rows"]:
        if row.get("impl") != "ratio":
            groups[(row["op"], row["case"], row["pass"])][row["impl"]] = row
    lines = []
    for (op, case, pass_), impls in groups.items():
        ours = impls.get("ours")
        if ours is not None and ours.get("ms") is None:  # our run failed: its row carries the error
            ours = None
        line = {"op": op, "case": case, "pass": pass_, "ours_ms": ours["ms"] if ours else None}
        if ours:
            line["ours_p20"], line["ours_p80"] = ours.get("ms_p20"), ours.get("ms_p80")
        for peer in PEERS:
            row = impls.get(peer)
            if row is None or not ours or row.get("ms") is None:
                continue
            line[f"x_{peer}"] = row["ms"] / ours["ms"]
            if None not in (row.get("ms_p20"), row.get("ms_p80"), ours.get("ms_p20"), ours.get("ms_p80")):
                line[f"x_{peer}_range"] = (row["ms_p20"] / ours["ms_p80"], row["ms_p80"] / ours["ms_p20"])
        if ours:
            line["copy_frac"] = ours.get("copy_fraction")
            line["bytes"] = ours.get("bytes")
            line["memory_bound"] = memory_bound(ours.get("bytes"), llc)
            peak = ours.get("peak_extra_bytes")
            line["peak_MiB"] = None if peak is None else peak / 2**20
        lines.append(line)
    return lines


def ratio_rows(run: dict) -> list[dict]:
    """The run's whole-result ratios (``impl == "ratio"`` rows: e.g. the end-to-end step ratios)."""
    return [r for r in run["rows"] if r.get("impl") == "ratio" and r.get("ms") is not None]


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


def _bandwidth_cell(line: dict) -> str:
    frac = line.get("copy_frac")
    if frac is None:
        return "-"
    bound = line.get("memory_bound")
    return "in cache" if bound is False else f"{frac:.2f}" + ("?" if bound is None else "")


def _print_table(lines: list[dict]) -> None:
    columns = ["op", "case", "pass", "ours_ms", "p20-p80", "x_eager", "x_compiled", "x_torch", "of_copy", "peak_MiB"]

    def cell(line, c):
        if c == "p20-p80":
            lo, hi = line.get("ours_p20"), line.get("ours_p80")
            return "-" if lo is None or hi is None else f"{lo:.3g}-{hi:.3g}"
        if c == "of_copy":
            return _bandwidth_cell(line)
        return _fmt(line.get(c))

    widths = {c: max([len(c)] + [len(cell(line, c)) for line in lines]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for line in lines:
        print("  ".join(cell(line, c).ljust(widths[c]) for c in columns))


# --------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------

PEER_STYLE = {  # colour, marker, label
    "eager": ("tab:orange", "o", "vs eager reference"),
    "compiled": ("tab:green", "s", "vs torch.compile(reference)"),
    "torch": ("tab:blue", "D", "vs torch built-in"),
}
_ABBREVIATIONS = (("channels_last", "NHWC"), ("per-channel axis", "per-ch ax"), ("per-tensor", "per-tensor"))


def short_cases(cases: list[str]) -> tuple[list[str], str]:
    """Case labels without the words every case shares (returned apart, for the panel title), abbreviated."""
    tokens = [c.split() for c in cases]
    shared = [t for t in tokens[0] if all(t in ts for ts in tokens[1:])] if len(cases) > 1 else []
    labels = []
    for ts in tokens:
        label = " ".join(t for t in ts if t not in shared) or " ".join(ts)
        for long, short in _ABBREVIATIONS:
            label = label.replace(long, short)
        labels.append(label)
    return labels, " ".join(shared)


def _pass_key(pass_: str) -> int:
    return PASS_ORDER.index(pass_) if pass_ in PASS_ORDER else len(PASS_ORDER)


def _panel_rows(op_lines: list[dict]) -> tuple[list[tuple[str, Optional[dict]]], str]:
    """``[(label, line or None for a case header)]`` grouped by case, passes in order; and the shared words."""
    cases = list(dict.fromkeys(line["case"] for line in op_lines))
    labels, shared = short_cases(cases)
    rows: list[tuple[str, Optional[dict]]] = []
    for case, label in zip(cases, labels):
        rows.append((label, None))
        for line in sorted((ln for ln in op_lines if ln["case"] == case), key=lambda ln: _pass_key(ln["pass"])):
            rows.append((f"{line['pass']}   ", line))
    return rows, shared


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 ticks; 1-1.5-2-3-5-7 over a range of less than 1.5 decades (else a narrow axis gets 3 ticks)."""
    mantissas = (1, 2, 5) if hi / lo >= 10**1.5 else (1, 1.5, 2, 3, 5, 7)
    ticks = [m * 10.0**e for e in range(-3, 5) for m in mantissas]
    return [t for t in ticks if lo <= t <= hi]


def _subtitle(run: dict) -> str:
    env = run.get("env", {})
    return (
        f"{env.get('device', '?')}, torch {env.get('torch', '?')}, commit {env.get('commit', '?')}, "
        f"{str(env.get('date', '?'))[:10]}"
    )


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _plot_ops(run: dict, lines: list[dict], plt):
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullLocator

    llc, llc_source = run_llc_bytes(run)
    ops = list(dict.fromkeys(line["op"] for line in lines))
    panels = [(op, *_panel_rows([ln for ln in lines if ln["op"] == op])) for op in ops]
    row_in, top_in, bottom_in, gap_in, width_in = 0.24, 1.5, 0.6, 0.95, 12.0
    panel_in = [row_in * (len(rows) + 0.6) for _, rows, _ in panels]
    height_in = top_in + sum(panel_in) + gap_in * (len(panels) - 1) + bottom_in
    label_chars = max(len(label) for _, rows, _ in panels for label, _ in rows)
    left = min(0.45, (0.3 + 0.075 * label_chars) / width_in)
    fig = plt.figure(figsize=(width_in, height_in))
    grid = fig.add_gridspec(
        len(panels),
        2,
        width_ratios=[3.3, 1],
        height_ratios=panel_in,
        left=left,
        right=0.98,
        top=1 - top_in / height_in,
        bottom=bottom_in / height_in,
        hspace=gap_in / (sum(panel_in) / len(panels)),
        wspace=0.07,
    )
    values = [
        v for line in lines for p in PEERS for v in [line.get(f"x_{p}")] + list(line.get(f"x_{p}_range") or []) if v
    ]
    lo = min([0.5] + [v / 1.4 for v in values])
    hi = max([2.0] + [v * 1.4 for v in values])
    for k, (op, rows, shared) in enumerate(panels):
        ax = fig.add_subplot(grid[k, 0])
        ax_bw = fig.add_subplot(grid[k, 1], sharey=ax)
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.axvspan(lo, 1.0, color="#fbe3e0", zorder=0)  # the peer is faster here
        ax.axvline(1.0, color="black", linewidth=1.2, zorder=1)
        speedups: dict[str, list[float]] = defaultdict(list)
        for y, (_label, line) in enumerate(rows):
            if line is None:
                if y:
                    for a in (ax, ax_bw):
                        a.axhline(y - 0.5, color="#999999", linewidth=0.6, zorder=1)
                continue
            for j, peer in enumerate(PEERS):
                x = line.get(f"x_{peer}")
                if not x:
                    continue
                speedups[peer].append(x)
                colour, marker, _ = PEER_STYLE[peer]
                dy = (j - 1) * 0.2
                rng = line.get(f"x_{peer}_range")
                if rng:
                    ax.hlines(y + dy, rng[0], rng[1], color=colour, linewidth=1.2, zorder=2)
                ax.plot([x], [y + dy], marker=marker, color=colour, markersize=5.5, linestyle="none", zorder=3)
        _bandwidth_panel(ax_bw, rows, llc)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([label for label, _ in rows], fontsize=8.5)
        for tick, (_, line) in zip(ax.get_yticklabels(), rows):
            if line is None:
                tick.set_fontweight("bold")
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ticks = _log_ticks(lo, hi)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{t:g}×" for t in ticks], fontsize=8.5)
        ax.grid(axis="x", color="#cccccc", linewidth=0.6, zorder=0)
        ax.tick_params(axis="y", length=0)
        ax.set_title(
            f"{op}" + (f"   (every case: {shared})" if shared else ""), fontsize=10.5, loc="left", fontweight="bold"
        )
        means = ",  ".join(f"{peer} {_geomean(v):.2g}×" for peer, v in speedups.items())
        if means:
            ax.set_xlabel(
                f"speed-up, geometric mean over the rows:  {means}", fontsize=8.5, color="#444444", loc="right"
            )
        llc_text = "LLC unknown" if llc is None else f"LLC {llc / 2**20:.0f} MiB"
        ax_bw.set_xlabel(f"where bytes ≥ {MEMORY_BOUND_FACTOR}× {llc_text}", fontsize=8, color="#444444")
    present = [p for p in PEERS if any(line.get(f"x_{p}") for line in lines)]
    handles = [
        Line2D([], [], color=c, marker=m, linestyle="-", linewidth=1.2, markersize=5.5, label=lab)
        for c, m, lab in (PEER_STYLE[p] for p in present)
    ]
    fig.legend(
        handles=handles,
        loc="upper left",
        ncol=3,
        fontsize=8.5,
        frameon=False,
        bbox_to_anchor=(0.005, 1 - 0.68 / height_in),
    )
    fig.text(
        0.01,
        1 - 0.2 / height_in,
        f"{run.get('benchmark', '?')}: speed-up of spark_ext over each peer",
        fontsize=12,
        fontweight="bold",
        va="top",
    )
    fig.text(
        0.01,
        1 - 0.5 / height_in,
        f"{_subtitle(run)}.  Medians; whiskers p20–p80 where recorded.  Last-level cache: "
        f"{'?' if llc is None else f'{llc / 2**20:.0f} MiB'} ({llc_source}).",
        fontsize=8,
        va="top",
        color="#444444",
    )
    fig.text(
        0.01,
        1 - 1.05 / height_in,
        "speed-up = peer time / our time, log scale: right of the line at 1× "
        "ours is faster, in the red area the peer is.",
        fontsize=9,
        va="top",
    )
    return fig


def _bandwidth_panel(ax, rows: list[tuple[str, Optional[dict]]], llc: Optional[int]) -> None:
    """Achieved / copy bandwidth beside the speed-ups: bars only where the bytes stream from memory."""
    data = [(y, line) for y, (_, line) in enumerate(rows) if line and line.get("copy_frac") is not None]
    shown = [line["copy_frac"] for _, line in data if line.get("memory_bound") is not False]
    ax.set_xlim(0, max([1.0] + [1.15 * v for v in shown]))
    ax.axvline(0.8, color="tab:red", linestyle="--", linewidth=0.8)
    ax.tick_params(axis="y", left=False, labelleft=False)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title("bandwidth / copy (red: 80%)", fontsize=9, loc="left")
    if data and not shown:  # every case fits in the cache: one note instead of a column of them
        ax.text(
            0.5,
            0.5,
            f"every case fits in\nthe last-level cache\n({llc / 2**20:.0f} MiB): its bytes\nneed not "
            "come from\nmemory, so no\nbandwidth is shown",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=8,
            color="#666666",
            style="italic",
        )
        return
    for y, line in data:
        frac, bound = line["copy_frac"], line.get("memory_bound")
        if bound is False:
            ax.text(0.03, y, "in cache", fontsize=7.5, color="#888888", style="italic", va="center")
            continue
        unknown = bound is None  # no cache size: maybe in cache
        ax.barh(y, frac, 0.6, color="#bbbbbb" if unknown else "tab:purple", hatch="//" if unknown else None, zorder=2)
        ax.text(frac, y, f" {frac:.0%}" + ("?" if unknown else ""), fontsize=7.5, va="center")


STEP_LABELS = {
    ("spark_step", "ours"): "SPARK step, our ops",
    ("spark_step", "eager"): "SPARK step, eager reference ops",
    ("spark_step", "compiled"): "SPARK step, torch.compile(reference)",
    ("qat_step", "ours"): "plain QAT step, our LSQ op",
    ("qat_step", "torch"): "plain QAT step, torch's learnable fake quant",
}
STEP_RATIO_LABELS = {
    "spark_overhead": "SPARK step / plain QAT step, both with our ops",
    "spark_vs_qat_torch": "SPARK step with our ops / plain QAT step with torch's fake quant",
    "qat_step_ours_over_torch": "torch.ao QAT step with our LearnableFakeQuantize / with torch's",
    "spark_over_qat_torch": "SPARK step with our ops / plain QAT step with torch's fake quant",
    "spark_over_qat": "SPARK step / plain QAT step, both with our ops",
    "qat_over_qat_torch": "plain QAT step with our LSQ op / with torch's fake quant",
}


def is_step_run(run: dict) -> bool:
    """Whole training steps only (bench_e2e, bench_qat_step, bench_distill_variants): every row's pass is "step"."""
    return bool(run["rows"]) and all(r.get("pass") == "step" for r in run["rows"])


def is_call_overhead(run: dict) -> bool:
    """A bench_call_overhead result: per-call times of ops and modules against torch and a floor."""
    return run.get("benchmark") == "call_overhead"


def _print_rows_table(columns: Sequence[str], cells: list[list[str]]) -> None:
    widths = [max([len(c)] + [len(row[k]) for row in cells]) for k, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _us(value) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _times(row: dict) -> list[str]:
    """p50 / p90 / max of a row in ms (p80 stands in for p90 in results that did not record it)."""
    p90 = row.get("ms_p90", row.get("ms_p80"))
    return [_fmt(row.get("ms")), _fmt(p90), _fmt(row.get("ms_max"))]


def _print_overhead_table(run: dict) -> None:
    """Per-call times of bench_call_overhead: p50 / p90 / max in µs, ratios to torch and to the floor."""
    config = run.get("config", {})
    print(f"   per-call wall time, {config.get('threads', '?')} thread(s); floor: {config.get('floor', '?')}")
    cells = []
    for r in run["rows"]:
        if r.get("impl") == "ratio":
            continue
        ratios = [f"{r[k]:.2f}x" if _is_number(r.get(k)) else "-" for k in ("over_torch", "over_floor")]
        times = [_us(r.get("ms")), _us(r.get("ms_p90")), _us(r.get("ms_max"))]
        cells.append([r["op"], r["case"], r["pass"], r["impl"], str(r.get("backend") or "-"), *times, *ratios])
    columns = ["op", "case", "pass", "impl", "backend", "p50_us", "p90_us", "max_us", "/torch", "/floor"]
    _print_rows_table(columns, cells)


def _print_step_table(run: dict) -> None:
    """Whole-step times: p50 / p90 / max in ms per (op, case, impl)."""
    cells = [
        [r["op"], r["case"], r["impl"], *_times(r)]
        for r in run["rows"]
        if r.get("impl") != "ratio" and r.get("ms") is not None
    ]
    _print_rows_table(["op", "case", "impl", "p50_ms", "p90_ms", "max_ms"], cells)


def _step_label(row: dict, several_cases: bool) -> str:
    label = STEP_LABELS.get((row["op"], row["impl"]), f"{row['op']}, {row['impl']}")
    return f"{row['case']}: {row['impl']}" if several_cases else label


def _plot_steps(run: dict, plt):
    """Whole training steps (``pass == "step"``): median times side by side, with the spread recorded:
    a whisker from p50 to p90 and a cross at the max (bench_qat_step, bench_distill_variants), or p20-p80
    error bars (bench_e2e)."""
    rows = [r for r in run["rows"] if r.get("pass") == "step" and r.get("impl") != "ratio" and r.get("ms")]
    several_cases = len({r["case"] for r in rows}) > 1
    fig, ax = plt.subplots(figsize=(11, 1.5 + 0.45 * len(rows) + 0.22 * len(ratio_rows(run))))
    ys = range(len(rows))
    for y, r in zip(ys, rows):
        colour = "tab:purple" if r["impl"] == "ours" else "#aaaaaa"
        err = None
        if r.get("ms_p90") is None and r.get("ms_p20") is not None and r.get("ms_p80") is not None:
            err = [[r["ms"] - r["ms_p20"]], [r["ms_p80"] - r["ms"]]]
        ax.barh(y, r["ms"], 0.6, color=colour, xerr=err, capsize=3, zorder=2)
        if r.get("ms_p90") is not None:
            ax.hlines(y, r["ms"], r["ms_p90"], color="black", linewidth=1.2, zorder=3)
        if r.get("ms_max") is not None:
            ax.plot([r["ms_max"]], [y], marker="x", color="black", markersize=5, zorder=3)
        right = max(r["ms"], r.get("ms_p80") or 0, r.get("ms_max") or 0)
        ax.text(right, y, f"  {r['ms']:.3g} ms", va="center", fontsize=8.5)
    budget = next((r["ms"] for r in rows if (r["op"], r["impl"]) == ("qat_step", "torch")), None)
    if budget is not None and not several_cases:
        ax.axvline(budget, color="tab:red", linestyle="--", linewidth=1, zorder=3)
        ax.text(
            budget,
            -0.5,
            "plain QAT with torch's fake quant",
            color="tab:red",
            fontsize=8,
            ha="center",
            va="bottom",
            clip_on=False,
        )
    ax.set_yticks(list(ys))
    ax.set_yticklabels([_step_label(r, several_cases) for r in rows], fontsize=8 if several_cases else 9)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, 1.25 * max(max(r.get("ms_p80") or 0, r.get("ms_max") or 0, r["ms"]) for r in rows) if rows else 1)
    spread = "p50-p90, x max" if any(r.get("ms_p90") is not None for r in rows) else "bars p20–p80"
    ax.set_xlabel(f"ms per training step (median; {spread})", fontsize=9)
    ax.grid(axis="x", color="#cccccc", linewidth=0.6, zorder=0)
    ratios = []
    for r in ratio_rows(run):
        where = f" [{r['case']}]" if several_cases else ""
        target = f"   (target {r['target']})" if r.get("target") else ""
        ratios.append(f"{STEP_RATIO_LABELS.get(r['op'], r['op'])}{where}: {r['ms']:.2f}×{target}")
    title_case = "several cases" if several_cases else (rows[0]["case"] if rows else "?")
    head_in = 0.75 + 0.22 * len(ratios)
    left = 0.45 if several_cases else 0.3
    fig.subplots_adjust(left=left, right=0.97, top=1 - head_in / fig.get_figheight(), bottom=0.55 / fig.get_figheight())
    fig.text(
        0.01,
        1 - 0.12 / fig.get_figheight(),
        f"{run.get('benchmark', '?')}: one training step ({title_case})",
        fontsize=12,
        fontweight="bold",
        va="top",
    )
    fig.text(0.01, 1 - 0.42 / fig.get_figheight(), _subtitle(run), fontsize=8, va="top", color="#444444")
    for i, text in enumerate(ratios):
        fig.text(0.01, 1 - (0.66 + 0.22 * i) / fig.get_figheight(), text, fontsize=8.5, va="top")
    return fig


OVERHEAD_STYLE = {  # impl -> colour (bench_call_overhead's implementations)
    "ours": "tab:purple",
    "eager": "tab:orange",
    "torch": "tab:blue",
    "plain": "tab:green",
    "floor": "#999999",
}


def _plot_overhead(run: dict, plt):
    """Per-call times (bench_call_overhead): one panel per op or module, a group of bars per case and
    pass (one bar per implementation: p50, whisker to p90, cross at the max), log scale in µs."""
    rows = [r for r in run["rows"] if r.get("impl") != "ratio" and r.get("ms")]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    impls = [i for i in OVERHEAD_STYLE if any(r["impl"] == i for r in rows)]
    impls += [i for i in dict.fromkeys(r["impl"] for r in rows) if i not in impls]
    panels = []
    for op in ops:
        keys = list(dict.fromkeys((r["case"], r["pass"]) for r in rows if r["op"] == op))
        panels.append((op, keys))
    slot_in, head_in = 0.16, 0.3
    heights = [head_in + slot_in * sum(len(impls) + 1 for _ in keys) for _, keys in panels]
    fig_h = 1.4 + sum(heights)
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, fig_h), gridspec_kw={"height_ratios": heights}, squeeze=False)
    values = [v for r in rows for v in (r["ms"], r.get("ms_p90"), r.get("ms_max")) if v]
    lo, hi = min(values) * 1e3 / 1.5, max(values) * 1e3 * 1.5
    by_key = {(r["op"], r["case"], r["pass"], r["impl"]): r for r in rows}
    for ax, (op, keys) in zip(axes[:, 0], panels):
        labels, positions, y = [], [], 0
        for case, pass_ in keys:
            labels.append(f"{case}  {pass_}")
            positions.append(y + (len(impls) - 1) / 2)
            for k, impl in enumerate(impls):
                r = by_key.get((op, case, pass_, impl))
                if r is None:
                    continue
                p50 = r["ms"] * 1e3
                ax.barh(y + k, p50, 0.8, color=OVERHEAD_STYLE.get(impl, "#444444"), zorder=2)
                if r.get("ms_p90"):
                    ax.hlines(y + k, p50, r["ms_p90"] * 1e3, color="black", linewidth=1, zorder=3)
                if r.get("ms_max"):
                    ax.plot([r["ms_max"] * 1e3], [y + k], marker="x", color="black", markersize=4, zorder=3)
                if impl == "ours" and _is_number(r.get("over_torch")):
                    right = max(p50, (r.get("ms_p90") or 0) * 1e3, (r.get("ms_max") or 0) * 1e3)
                    ax.text(right * 1.15, y + k, f"{r['over_torch']:.2f}× torch", fontsize=7, va="center", zorder=4)
            y += len(impls) + 1
        ax.set_xscale("log")
        ax.set_xlim(lo, hi)
        ax.set_yticks(positions)
        ax.set_yticklabels(labels, fontsize=7.5)
        ax.set_ylim(y - 1, -1)
        ax.grid(axis="x", color="#cccccc", linewidth=0.6, zorder=0)
        ax.set_title(op, fontsize=10, loc="left", fontweight="bold")
    axes[-1, 0].set_xlabel("µs per call (bar p50, line to p90, x max), log scale", fontsize=9)
    from matplotlib.patches import Patch

    fig.legend(
        handles=[Patch(color=OVERHEAD_STYLE.get(i, "#444444"), label=i) for i in impls],
        loc="upper right",
        ncol=len(impls),
        fontsize=8.5,
        frameon=False,
    )
    config = run.get("config", {})
    fig.text(
        0.01,
        1 - 0.15 / fig_h,
        f"{run.get('benchmark', '?')}: per-call wall time",
        fontsize=12,
        fontweight="bold",
        va="top",
    )
    fig.text(
        0.01,
        1 - 0.45 / fig_h,
        f"{_subtitle(run)}.  {config.get('threads', '?')} thread(s).  floor: {config.get('floor', '?')}",
        fontsize=7.5,
        va="top",
        color="#444444",
    )
    # hspace is a fraction of the mean panel height: 0.45 in between panels, whatever their sizes
    fig.subplots_adjust(
        left=0.36, right=0.98, top=1 - 0.9 / fig_h, bottom=0.5 / fig_h, hspace=0.45 / (sum(heights) / len(heights))
    )
    return fig


def plots_unavailable() -> Optional[str]:
    """Why :func:`plot` cannot draw here (one line), or None when matplotlib imports."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "plots need matplotlib, which is not installed: pip install 'spark_ext[demo]'"
    return None


def plot(run: dict, lines: list[dict], out_dir: Path) -> Path:
    """Write ``<out_dir>/<result file stem>.png`` (see the module docstring) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if is_call_overhead(run):
        fig = _plot_overhead(run, plt)
    elif is_step_run(run):
        fig = _plot_steps(run, plt)
    else:
        fig = _plot_ops(run, lines, plt)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (Path(run["path"]).stem + ".png")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------
# the report of one run
# --------------------------------------------------------------------------


def print_report(run: dict, plot_dir: Optional[Path] = None) -> None:
    """Print one loaded run (:func:`load`): where and how it ran, its table, its ratios; and, with
    ``plot_dir``, draw its plot there (:func:`plot`)."""
    env = run.get("env", {})
    llc, llc_source = run_llc_bytes(run)
    print(f"\n== {run.get('benchmark')}  ({run['path']})")
    print(
        f"   {env.get('device')}  torch {env.get('torch')}  triton {env.get('triton')}  "
        f"commit {env.get('commit')}  {env.get('date')}"
    )
    lines = summarise(run)
    if is_call_overhead(run):
        _print_overhead_table(run)
    elif is_step_run(run):
        _print_step_table(run)
    else:
        print(
            f"   last-level cache: {'?' if llc is None else f'{llc / 2**20:.0f} MiB'} ({llc_source}); "
            f"of_copy only where a pass moves >= {MEMORY_BOUND_FACTOR}x that, 'in cache' below, '?' if unknown"
        )
        _print_table(lines)
    ratios = ratio_rows(run)
    several_cases = len({r["case"] for r in ratios}) > 1
    for r in ratios:
        target = f"  (target {r['target']})" if r.get("target") else ""
        where = f" [{r['case']}]" if several_cases else ""
        print(f"   {r['op']}{where}: {r['ms']:.3f}  = {STEP_RATIO_LABELS.get(r['op'], r['op'])}{target}")
    if plot_dir is not None:
        print(f"   plot: {plot(run, lines, plot_dir)}")
