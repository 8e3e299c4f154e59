"""Shared benchmark protocol: timing, environment description, result files.

Protocol: warm-up calls, then the median of many timed repetitions (CUDA
events on a GPU, perf_counter on the CPU), over several input sets. Results
are appended to bench/results/ as JSON lines with the device, versions and
git commit, so numbers are always traceable.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Device, versions and commit of this run."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=RESULTS.parent).stdout.strip())
    except OSError:
        commit, dirty = "", False
    if not commit:  # a copy of the tree without .git (a lent GPU machine): the caller says
        commit = os.environ.get("PIIP_COMMIT", "unknown")
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit + ("-dirty" if dirty else ""),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


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
    """fn -> median ms: of an eager call (time_ms), or with `graph` of its CUDA-graph replay."""
    return graph_time_ms if graph else (lambda fn: time_ms(fn, device))


def graph_time_ms(fn, reps: int = 20, inner: int = 5) -> float | None:
    """Median GPU time of fn() in milliseconds, without the CPU's launch overhead: fn is
    captured once in a CUDA graph and replayed `inner` times between each pair of events.
    None when fn cannot be captured (it synchronises with the host, for example)."""
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
    RESULTS.mkdir(exist_ok=True)
    record = {"env": env, "rows": rows}
    path = RESULTS / f"{name}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    (RESULTS / f"{name}.md").write_text(f"# {name}\n\n{header}\n\n{table}\n")
    return path


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Markdown table of the given columns."""
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v))

    return "\n".join(render_grid(columns, [[fmt(r.get(c, "")) for c in columns] for r in rows], markdown=True))


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
