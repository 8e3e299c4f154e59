"""Call overhead of the stable-ABI kernels against an ATen-glue build, in one process.

The two builds run the same kernels; what differs is the glue around them (argument
boxing, tensor checks, allocation, the thread pool entry). So the comparison is the eager
call time on small CPU shapes, where the glue is a visible share of the call: of the
private ops msda_forward and msda_backward, and of the public piip_kernels.ms_deform_attn
forward and forward+backward (the same Python code on either build: torch.ops.piip_C is
pointed at one build's ops, then the other's, round by round):

- the stable-ABI build: piip_kernels/_C.abi3.so, registered under the namespace piip_new;
- the ATen build: a .so built from the sources before the port (for example
  `git archive <commit> csrc setup.py`, then `python setup.py build_ext --inplace`),
  loaded with torch.ops.load_library (it registers piip_C at load time).

Rounds alternate between the builds (ABAB...), each round timing `--calls` calls after a
warm-up, and the report gives the median and the spread (min to max of the round medians)
per build and op, with the machine's load average before and after. On a busy machine the
spread shows it; `--wait-idle` waits (up to a limit) for a load average below 1 first.

    python scripts/bench_call_overhead.py --old /path/to/old/piip_kernels/_C.cpython-311-x86_64-linux-gnu.so
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # name: (levels, N, Lq, M, D, P)
    "tiny": ([(4, 4), (2, 2)], 1, 8, 2, 8, 2),
    "small": ([(16, 16), (8, 8), (4, 4)], 1, 64, 4, 16, 4),
}


def inputs(levels, N, Lq, M, D, P):
    g = torch.Generator().manual_seed(0)
    S = sum(h * w for h, w in levels)
    L = len(levels)
    shapes = torch.tensor(levels, dtype=torch.long)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    value = torch.randn(N, S, M, D, generator=g)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g)
    attn = torch.rand(N, Lq, M, L, P, generator=g)
    return value, shapes, starts, loc, attn


def load_new():
    spec = importlib.util.spec_from_file_location("piip_new._C", ROOT / "piip_kernels" / "_C.abi3.so")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.register("piip_new")
    return torch.ops.piip_new


def public_calls(builds):
    """ms_deform_attn's public forward and forward+backward on each build. piip_kernels is
    imported after the old build took piip_C, so its own registration fails; it is told the
    kernels are there, and torch.ops.piip_C is swapped per build (ops.py looks it up per call)."""
    import piip_kernels
    from piip_kernels import _ext, backends

    _ext.EXT_ERROR = backends.EXT_ERROR = None
    _ext._KERNELS = frozenset((n, "CPU") for n in ("msda_forward", "msda_backward"))
    namespaces = dict(builds)

    def on(name):
        setattr(torch.ops, "piip_C", namespaces[name])

    return piip_kernels.ms_deform_attn, on


def round_us(op, args, calls: int) -> float:
    """Median microseconds per call over `calls` calls."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        op(*args)
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3


def wait_idle(limit_s: float) -> None:
    deadline = time.time() + limit_s
    while os.getloadavg()[0] > 1.0 and time.time() < deadline:
        time.sleep(5)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the ATen-glue build's .so (registers piip_C)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the glue, not the pool, dominates)")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="S", help="wait up to S s for load < 1 first")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.ops.load_library(args.old)
    builds = {"aten (old)": torch.ops.piip_C, "stable abi (new)": load_new()}
    if args.wait_idle:
        wait_idle(args.wait_idle)
    load0 = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} alternating rounds x {args.calls} calls, "
          f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    results = {}
    for shape, spec in SHAPES.items():
        value, shapes, starts, loc, attn = inputs(*spec)
        out = builds["aten (old)"].msda_forward(value, shapes, starts, loc, attn)
        grad = torch.randn_like(out)
        cases = {"forward": lambda ops: (ops.msda_forward, (value, shapes, starts, loc, attn)),
                 "backward": lambda ops: (ops.msda_backward, (grad, value, shapes, starts, loc, attn))}
        for case, make in cases.items():
            # Both builds compute the same numbers (same kernels).
            a, b = (make(ops)[0](*make(ops)[1]) for ops in builds.values())
            for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
            rounds = {name: [] for name in builds}
            for name, ops in builds.items():  # warm-up
                round_us(*make(ops), calls=args.calls)
            for _ in range(args.rounds):
                for name, ops in builds.items():
                    rounds[name].append(round_us(*make(ops), calls=args.calls))
            results[(shape, case)] = rounds
        msda, use = public_calls(builds)
        leaves = [t.clone().requires_grad_() for t in (value, loc, attn)]
        public = [leaves[0], shapes, starts, leaves[1], leaves[2]]
        public_cases = {"public forward": lambda: msda(*public, backend="cpu"),
                        "public forward+backward": lambda: msda(*public, backend="cpu").backward(grad)}
        for case, call in public_cases.items():
            rounds = {name: [] for name in builds}
            for name in builds:
                use(name)
                round_us(call, (), calls=args.calls)
            for _ in range(args.rounds):
                for name in builds:
                    use(name)
                    rounds[name].append(round_us(call, (), calls=args.calls))
            results[(shape, case)] = rounds
        use("aten (old)")
    load1 = os.getloadavg()
    print(f"load average after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}\n")
    print("| shape | op | build | median us/call | spread of round medians (us) | new / old |")
    print("|---|---|---|---|---|---|")
    for (shape, case), rounds in results.items():
        old = statistics.median(rounds["aten (old)"])
        for name, r in rounds.items():
            med = statistics.median(r)
            ratio = f"{med / old:.2f}" if name != "aten (old)" else ""
            print(f"| {shape} | {case} | {name} | {med:.1f} | {min(r):.1f} to {max(r):.1f} | {ratio} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
