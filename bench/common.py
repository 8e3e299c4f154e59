"""Shared benchmark protocol: timing, environment description, result files.

Protocol: warm-up calls, then the median of many timed repetitions (CUDA
events on a GPU, perf_counter on the CPU), over several input sets. Results
are appended to bench/results/ as JSON lines with the device, versions and
git commit, so numbers are always traceable.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def results_dir() -> Path:
    """Where result files go: $PIIP_RESULTS_DIR (the dry run of bench/gpu_check.sh writes
    under $OUT), else bench/results."""
    return Path(os.environ.get("PIIP_RESULTS_DIR") or RESULTS)


def dry_run() -> bool:
    """PIIP_DRY_RUN=1 (bench/gpu_check.sh --dry-run): the GPU-only code paths run on the CPU,
    with stand-ins where a GPU is needed (eager timing for CUDA-graph replays, see timer)."""
    return os.environ.get("PIIP_DRY_RUN") == "1"


def gpu_paths(device: torch.device) -> bool:
    """Whether the GPU-only parts of a benchmark run: on a GPU, and in the dry run."""
    return device.type == "cuda" or dry_run()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return ""


def tree_commit() -> str:
    """The commit of this tree (with "-dirty" for uncommitted changes to tracked files).
    A copy without .git (as the tree arrives on a lent GPU machine) may sit inside another
    repository, whose commit git would happily report: only a repository whose top level is
    this tree counts. Otherwise $PIIP_COMMIT, or "unknown"."""
    top = _git("rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == ROOT.resolve():
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
        if commit:
            return commit + ("-dirty" if dirty else "")
    return os.environ.get("PIIP_COMMIT") or "unknown (no .git in this tree; set PIIP_COMMIT)"


def environment() -> dict:
    """Device, versions and commit of this run."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": tree_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if dry_run():
        env["dry_run"] = "yes: GPU-only paths on the CPU with stand-ins; not a measurement"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (a no-op on the CPU), before and after a timed step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def time_ms(fn, device: torch.device, warmup: int = 3, reps: int = 20, budget_s: float = 2.0) -> float:
    """Median wall time of fn() in milliseconds; reps shrink to fit budget_s."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    deadline = time.perf_counter() + budget_s
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if i >= 2 and time.perf_counter() > deadline:
            break
    return statistics.median(times)


def timer(device: torch.device, graph: bool = False):
    """fn -> median ms: of an eager call (time_ms), or with `graph` of its CUDA-graph replay.
    In the dry run a CUDA-graph replay on the CPU is stood in for by the eager call, so the
    code around it runs."""
    if graph and device.type != "cuda":
        if not dry_run():
            raise ValueError(f"CUDA-graph timing needs a CUDA device, got {device}")
        return lambda fn: time_ms(fn, device, warmup=1, reps=2)
    return graph_time_ms if graph else (lambda fn: time_ms(fn, device))


def capture_graph(fn):
    """fn captured in a CUDA graph after a warm-up (and Triton autotuning) on a side stream,
    replayed once; None when fn cannot be captured (it synchronises with the host, for example)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and Triton autotuning) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as err:  # noqa: BLE001 - any capture failure means "not capturable"
        progress(f"    (no CUDA graph: {type(err).__name__}: {str(err).splitlines()[0][:100]})")
        torch.cuda.synchronize()
        return None
    graph.replay()
    torch.cuda.synchronize()
    return graph


def graph_time_ms(fn, reps: int = 20, inner: int = 5) -> float | None:
    """Median GPU time of fn() in milliseconds, without the CPU's launch overhead: fn is
    captured once in a CUDA graph (capture_graph) and replayed `inner` times between each pair
    of events. None when fn cannot be captured."""
    graph = capture_graph(fn)
    if graph is None:
        return None
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 28) -> float:
    """Measured device-to-device copy bandwidth (read + write), GB/s."""
    n = nbytes // 4 if device.type == "cuda" else nbytes // 16
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=30)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def write_results(name: str, env: dict, rows: list[dict], table: str) -> Path:
    """Appends one JSON record to results/<name>.jsonl and rewrites results/<name>.md with the latest table."""
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    record = {"env": env, "rows": rows}
    path = folder / f"{name}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    (folder / f"{name}.md").write_text(f"# {name}\n\n{header}\n\n{table}\n")
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Markdown table of the given columns."""
    def fmt(v):
        if isinstance(v, float):
            # Small values (relative differences, fractions) keep three significant digits.
            return f"{v:.3g}" if 0 < abs(v) < 0.01 else f"{v:.3f}"
        return "" if v is None else str(v)

    return "\n".join(render_grid(columns, [[fmt(r.get(c, "")) for c in columns] for r in rows], markdown=True))


def positive(kind):
    """An argparse type: a number of ``kind`` above zero (a size of 0 or -5 is refused with a
    message naming the argument, not a crash later)."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} must be positive")
        return value
    parse.__name__ = kind.__name__
    return parse


def render_grid(head: list[str], body: list[list[str]], markdown: bool, free_last: bool = False) -> list[str]:
    """Lines of a table of strings: markdown, or columns padded to a common width and joined
    by two spaces. ``free_last``: the last column (a note) is neither padded nor widens the
    others."""
    if markdown:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(b) + " |" for b in body]
    n = len(head) - 1 if free_last else len(head)
    widths = [max(len(str(x)) for x in col) for col in zip(*(row[:n] for row in [head] + body))]
    out = []
    for row in [head] + body:
        line = "  ".join(str(x).ljust(w) for x, w in zip(row[:n], widths))
        out.append(line + ("  " + str(row[-1]) if free_last and row[-1] else ""))
    return out


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def budgeted(items, budget_s: float | None = None, what: str = "measurements"):
    """Yields items until `budget_s` seconds have passed (None: no limit) or the process
    receives SIGTERM (a `timeout`), then says how many were left out. The item in progress
    finishes, so the caller still writes every row measured so far."""
    items = list(items)
    stop = []
    old = signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    start = time.monotonic()
    try:
        for i, item in enumerate(items):
            if stop or (budget_s is not None and time.monotonic() - start > budget_s):
                progress(f"{'SIGTERM' if stop else f'budget of {budget_s:.0f} s'}: {len(items) - i} {what} left out")
                return
            yield item
    finally:
        signal.signal(signal.SIGTERM, old)


def report(name: str, device: torch.device, rows: list[dict], columns: list[str], save: bool = True,
           copy_bandwidth: float | None = None) -> None:
    """Prints the table of `rows` and, with `save`, appends them to results/<name>_<device type>
    with the environment (device, versions, commit, measured copy bandwidth)."""
    table = format_table(rows, columns)
    env = environment()
    env["device"] = device_name(device)
    if copy_bandwidth is not None:
        env["copy_bandwidth_GBps"] = round(copy_bandwidth, 1)
    if save:
        progress(f"results appended to {write_results(f'{name}_{device.type}', env, rows, table)}")
    print(table)


# ---------------------------------------------------------------------------------------------
# Timing on a shared machine: interleaved rounds, other processes' load, disturbed rounds redone

REDO_ABOVE, MAX_REDONE = 0.05, 20  # with wait_s: rounds in which others took > 5 % of the CPUs are run again


def _jiffies() -> tuple[int, int, int] | None:
    """(busy, total) CPU time of the whole machine and this process's own, in clock ticks
    (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks), int(own[11]) + int(own[12])  # utime + stime


def others_busy(since) -> float | None:
    """The share of the machine's CPU time that other processes used since ``since`` (a
    _jiffies() reading): a shared machine's load, which falls unevenly on the timed paths."""
    now = _jiffies()
    if since is None or now is None or now[1] == since[1]:
        return None
    return max(0.0, ((now[0] - since[0]) - (now[2] - since[2])) / (now[1] - since[1]))


def wait_idle(max_s: float, busy: float = 0.1, window_s: float = 5.0) -> None:
    """Waits (at most max_s) until other processes use less than ``busy`` of the CPUs over
    ``window_s`` (on shared machines, before each case)."""
    deadline = time.monotonic() + max_s
    while True:
        start = _jiffies()
        time.sleep(window_s)
        share = others_busy(start)
        if share is None or share < busy:
            return
        if time.monotonic() > deadline:
            progress(f"  other processes still use {share:.0%} of the CPUs after {max_s:.0f} s of waiting: measuring anyway")
            return
        progress(f"  other processes use {share:.0%} of the CPUs: waiting")


def protocol_arguments(ap: argparse.ArgumentParser, waits: str, stops: str = "new cases") -> None:
    """--budget-s (``stops``: what it stops starting), --wait-idle (``waits``: when it waits)
    and --no-save, as the benchmarks that time interleaved rounds (timed_rounds) take them."""
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"stop starting {stops} after this many seconds; SIGTERM does the same")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help=f"shared machines: {waits}, wait up to S s for other processes to leave the CPUs idle, and run "
                         "again a round they disturbed (above 5%% of the CPUs)")
    ap.add_argument("--no-save", action="store_true")


@dataclass
class Rounds:
    """What :func:`timed_rounds` measured: per name the step times (ms) of the kept rounds,
    per kept round the share of the CPUs other processes took (None on a GPU), and how many
    disturbed rounds were discarded and run again."""
    times: dict[str, list[float]]
    others: list[float | None] = field(default_factory=list)
    redone: int = 0

    @property
    def others_cpu(self) -> float | None:
        """The most other processes took in any kept round (None: not measured)."""
        return max((b for b in self.others if b is not None), default=None)


def timed_rounds(steps: dict[str, Callable[[], object]], rounds: int, device: torch.device, wait_s: float = 0.0,
                 label: str = "", around: Callable[[str], contextlib.AbstractContextManager] | None = None,
                 warmup: int = 0, rotate: bool = False, stop: Callable[[], bool] | None = None) -> Rounds:
    """Times ``rounds`` rounds of one call of each step (interleaved: a drift of the machine
    falls on every step alike), after ``warmup`` untimed rounds run right before them (so the
    caches, allocator and lazily compiled code are warm when timing starts, however long the
    setup took). ``around(name)``: a context held around each call, outside its timing (a
    switch, a peak-memory reset). ``rotate``: round k starts at the k-th step, so no step
    always runs after the same one. On the CPU, with ``wait_s``, the warm-up waits (at most
    wait_s) for an idle machine, and a round during which other processes took more than
    REDO_ABOVE of the CPUs is discarded and run again after waiting again, at most MAX_REDONE
    times. ``stop()`` is asked before each round after the first kept one (a budget, a
    SIGTERM): the rounds kept so far stand."""
    names = list(steps)
    held = around or (lambda name: contextlib.nullcontext())
    times = {n: [] for n in names}
    result = Rounds(times)
    if names and wait_s and device.type == "cpu":
        wait_idle(wait_s)
    for w in range(warmup if names else 0):
        progress(f"  {label} warm-up round {w + 1}/{warmup}")
        for n in names:
            with held(n):
                steps[n]()
        sync(device)
    while names and len(result.others) < rounds:
        if result.others and stop is not None and stop():
            progress(f"  {label} timing stopped after {len(result.others)} of {rounds} rounds")
            break
        k = (len(result.others) + result.redone) % len(names) if rotate else 0
        start = _jiffies()
        took = {}
        for n in names[k:] + names[:k]:
            with held(n):
                sync(device)
                t0 = time.perf_counter()
                steps[n]()
                sync(device)
                took[n] = (time.perf_counter() - t0) * 1e3
        others = others_busy(start) if device.type == "cpu" else None
        line = f"  {label} round {len(result.others) + 1}/{rounds}: " + ", ".join(f"{n} {t:.0f} ms" for n, t in took.items())
        if wait_s and others is not None and others > REDO_ABOVE and result.redone < MAX_REDONE:
            # Other processes took CPUs during this round: it falls unevenly on the steps.
            result.redone += 1
            progress(f"{line}; other processes took {others:.0%} of the CPUs: round discarded ({result.redone})")
            wait_idle(wait_s)
            continue
        result.others.append(others)
        for n, t in took.items():
            times[n].append(t)
        progress(line + (f"; others {others:.0%}" if others is not None else ""))
    return result


class PeakMemory:
    """``around`` for :func:`timed_rounds`: on a GPU, the peak allocated memory (bytes) of each
    name's steps in ``peaks``; nothing on other devices."""

    def __init__(self, device: torch.device):
        self.device, self.peaks = device, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        yield
        if self.device.type == "cuda":
            self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated(self.device))
