"""Static resource report of the GPU kernels for sm_90, no GPU needed:
bench/results/static_sm90.md.

    python bench/static_report.py                   # CUDA (nvcc) and Triton (when importable)
    python bench/static_report.py --out /tmp/s.md --no-triton

CUDA: the glue files of the ops with kernel variants (csrc/msda/*.cu, csrc/merge/*.cu) are
compiled for sm_90 with the extension's flags and ``-Xptxas -v``: the glue's variant switch
instantiates every variant for every dtype and vector width, so every kernel the extension
ships is reported. Per kernel: registers, spill bytes, stack frame, static shared memory, and
the theoretical occupancy on an H100 (65536 registers / SM allocated per warp in units of 256,
228 KB shared memory / SM with 1 KB reserved per block, 2048 threads / SM, 32 blocks / SM;
blocks of BLOCK_THREADS threads, the kThreads of every kernel header). Kernel names are
demangled (c++filt) and mapped to a variant generically: a kernel whose name (or template
arguments) contains a variant name of piip_kernels/variants.py belongs to that variant;
otherwise it is the op family's default kernel or a helper shared by its variants.

Triton: every kernel of piip_kernels/*/triton.py, for each autotuning config, is compiled
with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` and its cubin read with
cuobjdump ``--dump-resource-usage`` (pip package nvidia-cuda-cuobjdump); shared memory is the
larger of the cubin's static and Triton's dynamic (launch-time) amount.

Traffic: on the PIIP shapes, the bytes a call moves and the atomics it issues, by an analytic
model per variant (MODELS; a variant without a model says so in its row), next
to the memory floor (bench_msda.floor_bytes: every input and the output once).
"""
from __future__ import annotations

import argparse
import datetime
import math
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

# H100 (sm_90) per-SM limits.
REGS_PER_SM, REG_UNIT, SMEM_PER_SM, SMEM_RESERVED, THREADS_PER_SM, BLOCKS_PER_SM = 65536, 256, 228 * 1024, 1024, 2048, 32
BLOCK_THREADS = 256
FAMILIES = ("msda", "merge")  # the ops with kernel variants


# --- parsing ------------------------------------------------------------------------------------


def parse_ptxas(report: str) -> dict[str, dict]:
    """Mangled kernel name -> {registers, spill_stores, spill_loads, stack, smem} from nvcc's
    ``-Xptxas -v`` output (one "Compiling entry function" block per kernel)."""
    usage, name = {}, None
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '([\w$.]+)'", line):
            name = m.group(1)
            usage[name] = {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 0}
        elif name is None:
            continue
        elif m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line):
            usage[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif m := re.search(r"Used (\d+) registers", line):
            usage[name]["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                usage[name]["smem"] = int(s.group(1))
    return usage


def parse_cuobjdump(report: str) -> dict[str, dict]:
    """Kernel name -> {registers, stack, smem, ...} from ``cuobjdump --dump-resource-usage``."""
    usage, name = {}, None
    for line in report.splitlines():
        if m := re.search(r"Function ([\w$.]+):", line):
            name = m.group(1)
        elif name and (m := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)):
            usage[name] = {"registers": int(m.group(1)), "stack": int(m.group(2)), "smem": int(m.group(3)),
                           "local": int(m.group(4))}
            name = None
    return usage


def demangle(names) -> dict[str, str]:
    names = list(names)
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout.splitlines()
    return dict(zip(names, out))


def occupancy(registers: int, smem: int, threads: int = BLOCK_THREADS) -> tuple[int, float, str]:
    """(blocks per SM, occupancy as a fraction of 64 warps, the limiting resources) on an H100."""
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(max(registers, 1) * 32 / REG_UNIT) * REG_UNIT
    limits = {"registers": (REGS_PER_SM // per_warp) // warps, "threads": THREADS_PER_SM // threads,
              "blocks": BLOCKS_PER_SM, "shared memory": SMEM_PER_SM // (smem + SMEM_RESERVED)}
    blocks = min(limits.values())
    limiter = ", ".join(k for k, v in limits.items() if v == blocks)  # every resource at the limit
    return blocks, blocks * warps / (THREADS_PER_SM // 32), limiter


def block_size(kernel: str) -> int:
    """Threads per block of a demangled kernel: a template's kBlock where the kernel has one
    (msda's forward_kernel<T, U, V, kBlock, kMinBlocks>), else kThreads (BLOCK_THREADS)."""
    m = re.match(r"(?:void )?[\w:]*::forward_kernel<([^<>]*)>", kernel)
    if m:
        args = [a.strip() for a in m.group(1).split(",")]
        if len(args) == 5 and args[3].isdigit():
            return int(args[3])
    return BLOCK_THREADS


def variant_of(kernel: str, variants: dict) -> tuple[str, str]:
    """(op, variant) of a demangled kernel. The op: its family (the namespace, msda or merge)
    and "forward" / "backward" from the kernel's name (backward kernels serve both backward
    ops). The variant: the one whose name the kernel's name or template arguments contain
    (whole word); else "0 or shared" -- variant 0's kernel, or one every variant launches.
    Other namespaces (fixed_point helpers) are "-"."""
    family = next((f for f in FAMILIES if f"::{f}::" in kernel), None)
    if family is None:
        fam = re.search(r"piip::(\w+)::", kernel)
        return (fam.group(1) if fam else "?"), "-"
    base = re.sub(r"^void ", "", kernel).split("<")[0].split("(")[0].rsplit("::", 1)[-1]
    direction = "forward" if "forward" in base else "backward" if "backward" in base else None
    ops = [op for op in variants if op.startswith(family) and (direction is None or direction in op)]
    body = kernel.lower()
    hits = [(op, name) for op in ops for name in variants[op]
            if re.search(rf"(?<![a-z0-9]){re.escape(name.lower())}(?![a-z0-9])", body)]
    label = " / ".join(ops) if direction else f"{family} (helper)"
    # A variant that is a launch shape of variant 0's kernel ("block128"): the kernel's block
    # size is its fourth template argument (forward_kernel<T, U, V, kBlock, kMinBlocks>).
    block = block_size(kernel)
    if not hits and block != BLOCK_THREADS:
        hits = [(op, name) for op in ops for name in variants[op] if name == f"block{block}"]
    if len(hits) == 1:
        return hits[0]
    if hits:
        return " / ".join(sorted({op for op, _ in hits})), " / ".join(sorted({n for _, n in hits}))
    return label, "0 or shared"


# --- CUDA ---------------------------------------------------------------------------------------


def nvcc_flags() -> list[str]:
    import importlib.util

    import torch.utils.cpp_extension as ext

    spec = importlib.util.spec_from_file_location("piip_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    includes = []
    for inc in [str(CSRC)] + ext.include_paths() + [sysconfig.get_paths()["include"]]:
        includes += ["-I", inc]
    return setup.nvcc_flags() + ext.COMMON_NVCC_FLAGS + includes


def compile_ptxas(src: Path, out_dir: Path, arch: str = "sm_90", flags: list[str] | None = None) -> str:
    """nvcc -c src for ``arch`` with -Xptxas -v; its report (stderr)."""
    cmd = [shutil.which("nvcc") or "nvcc", "-c", *(nvcc_flags() if flags is None else flags), f"-arch={arch}",
           "-Xptxas", "-v", str(src), "-o", str(out_dir / (src.stem + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src}:\n{res.stderr[-4000:]}")
    return res.stderr


def cuda_rows(variants: dict, out_dir: Path) -> list[dict]:
    rows = []
    for family in FAMILIES:
        for src in sorted((CSRC / family).glob("*.cu")):
            print(f"nvcc -Xptxas -v {src.relative_to(ROOT)}", file=sys.stderr, flush=True)
            usage = parse_ptxas(compile_ptxas(src, out_dir))
            for mangled, name in demangle(usage).items():
                if any(r["kernel"] == name for r in rows):
                    continue  # a helper header's kernel compiled into more than one glue file
                u = usage[mangled]
                op, variant = variant_of(name, variants)
                blocks, occ, limiter = occupancy(u["registers"], u["smem"], block_size(name))
                rows.append({"source": src.relative_to(ROOT).as_posix(), "kernel": name, "op": op, "variant": variant, **u,
                             "blocks_per_sm": blocks, "occupancy": occ, "limited_by": limiter})
    return rows


# --- Triton -------------------------------------------------------------------------------------


def cuobjdump() -> str | None:
    """The cuobjdump binary: on PATH, or from the pip package nvidia-cuda-cuobjdump."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    for base in sys.path:
        for cand in Path(base).glob("nvidia/cu*/bin/cuobjdump"):
            return str(cand)
        for cand in Path(base).glob("nvidia/cuda_cuobjdump/bin/cuobjdump"):
            return str(cand)
    return None


# The Triton kernels compiled, with the argument types and constexprs their launchers pass on
# a PIIP call of head dim 32: (module, kernel, pointer types by argument name (default the value
# dtype T), constexprs, extra labels). Integers are i32 (Triton's type for Python ints that fit).
TRITON_SPECS = [
    ("msda", "_msda_fwd_kernel", {"shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": "*fp32", "attn_ptr": "*fp32"},
     {"D": 32, "BLOCK_D": 32}),
    ("msda", "_msda_bwd_kernel", {"shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": "*fp32", "attn_ptr": "*fp32",
                                  "grad_value_ptr": "*fp32", "grad_loc_ptr": "*fp32", "grad_attn_ptr": "*fp32",
                                  "scale_ptr": "*fp64"}, {"D": 32, "BLOCK_D": 32, "DETERMINISTIC": False}),
    ("msda", "_msda_bwd_kernel", {"shapes_ptr": "*i64", "starts_ptr": "*i64", "loc_ptr": "*fp32", "attn_ptr": "*fp32",
                                  "grad_value_ptr": "*i64", "grad_loc_ptr": "*fp32", "grad_attn_ptr": "*fp32",
                                  "scale_ptr": "*fp64"}, {"D": 32, "BLOCK_D": 32, "DETERMINISTIC": True}),
    ("dca", "_dca_fwd_kernel", {"off_ptr": "*fp32", "logits_ptr": "*fp32"}, {"D": 32, "BLOCK_D": 32, "BLOCK_P": 4}),
    ("dca", "_dca_bwd_kernel", {"off_ptr": "*fp32", "logits_ptr": "*fp32", "grad_value_ptr": "*fp32", "grad_off_ptr": "*fp32",
                                "grad_logits_ptr": "*fp32", "scale_ptr": "*fp64"},
     {"D": 32, "BLOCK_D": 32, "BLOCK_P": 4, "DETERMINISTIC": False}),
    ("merge", "_merge_fwd_kernel", {"w_ptr": "*fp32", "out_ptr": "*fp32"},
     {"NB": 3, "ALIGN": False, "ID0": False, "ID1": False, "ID2": True, "ID3": False, "BLOCK": 256}),
    ("merge", "_merge_bwd_kernel", {"grad_out_ptr": "*fp32", "partial_ptr": "*fp32", "weight_ptr": "*fp32"},
     {"ALIGN": False, "IDENTITY": False, "BLOCK": 256}),
]
FLOAT_ARGS = {"sy", "sx", "inv_sy", "inv_sx"} | {f"s{a}{i}" for a in "yx" for i in range(4)}


def triton_rows(tool: str, out_dir: Path) -> list[dict]:
    """Compiles each kernel of TRITON_SPECS for sm_90, for fp32 and bf16 values, once per
    autotuning config (merge: its one launch config), and reads each cubin's resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    rows = []
    for module, kernel, pointers, constexprs in TRITON_SPECS:
        mod = __import__(f"piip_kernels.{module}.triton", fromlist=["x"])
        fn = getattr(mod, kernel)
        tuner = next((o for o in vars(mod).values() if getattr(o, "fn", None) is fn and hasattr(o, "configs")), None)
        configs = [(c.kwargs, c.num_warps) for c in tuner.configs] if tuner is not None else [({}, 4)]
        for dtype in ("fp32", "bf16"):
            for kwargs, warps in configs:
                const = {**constexprs, **kwargs}
                label = (f"{kernel} {dtype} " + " ".join(f"{k}={v}" for k, v in const.items() if k in ("DETERMINISTIC", "BLOCK_Q"))
                         + f" warps={warps}")
                row = {"source": f"piip_kernels/{module}/triton.py", "kernel": label, "op": module, "variant": "triton"}
                try:
                    sig = {}
                    for param in fn.params:
                        name = param.name
                        if param.is_constexpr:
                            sig[name] = "constexpr"
                        elif name.endswith("_ptr") or re.fullmatch(r"f\d", name):
                            sig[name] = pointers.get(name, f"*{dtype}")
                        else:
                            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
                    src = ASTSource(fn=fn, signature=sig, constexprs={k: v for k, v in const.items() if k in sig})
                    compiled = triton.compile(src, target=target, options={"num_warps": warps})
                    cubin = out_dir / f"{kernel}.cubin"
                    cubin.write_bytes(compiled.asm["cubin"])
                    res = subprocess.run([tool, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True)
                    (u,) = parse_cuobjdump(res.stdout).values()
                    # Triton's shared memory is dynamic (launch-time), which cuobjdump does not see.
                    try:
                        dynamic = int(compiled.metadata.shared or 0)
                    except AttributeError:  # a Triton without the field
                        dynamic = 0
                    u["smem"] = max(u["smem"], dynamic)
                    blocks, occ, limiter = occupancy(u["registers"], u["smem"], 32 * warps)
                    row.update(**u, blocks_per_sm=blocks, occupancy=occ, limited_by=limiter)
                except Exception as err:  # noqa: BLE001 - reported in the table, not fatal
                    row["error"] = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
                rows.append(row)
    return rows


# --- traffic model ------------------------------------------------------------------------------

# PIIP interaction calls (bench/data/shapes.md), batch 2: (name, Lq, (Hv, Wv), heads, D, points).
PIIP_CALLS = [("9604q 70x70 D6", 9604, (70, 70), 16, 6, 4), ("9604q 70x70 D12", 9604, (70, 70), 16, 12, 4),
              ("4900q 98x98 D24", 4900, (98, 98), 16, 24, 4), ("1764q 70x70 D32", 1764, (70, 70), 16, 32, 4)]


def _msda_counts(op, Lq, S, M, D, P, N, elem):
    pts = N * Lq * M * P
    floor = N * S * M * D * elem + pts * 3 * 4 + N * Lq * M * D * elem  # value, loc (2) + attn fp32, output
    gather = pts * 4 * D * elem  # four corners per point, no cache reuse: an upper bound
    if op == "msda_forward":
        return floor, gather + pts * 12 + N * Lq * M * D * elem, 0
    # backward: gathers again for the corner dots, reads grad_out, writes grad loc/attn, fp32
    # accumulator read-modify-write per scatter, plus the final conversion of grad_value.
    vec = 4 if D % 4 == 0 else 1  # sm_90's float4 atomics where the vector width allows
    atomics = pts * 4 * (D // vec if op == "msda_backward" else D)
    acc = 4 if op == "msda_backward" else 8
    moved = gather + N * Lq * M * D * elem + pts * 12 * 2 + pts * 4 * D * acc + N * S * M * D * (acc + elem)
    return 3 * floor, moved, atomics


def _two_pass_counts(op, Lq, S, M, D, P, N, elem):
    """msda_backward_deterministic variant two_pass (csrc/msda/msda_two_pass.cuh): pass 1 as the
    backward's gathers plus a (cell, coefficient) pair per corner entry; an LSD radix sort of
    (cell, entry) pairs on 4-bit digits at about 20 bytes per entry and pass (the header's
    figure); CSR offsets; pass 2 reads, per entry, its index, coefficient and grad_out vector
    and writes grad_value once. No atomics."""
    floor, _, _ = _msda_counts("msda_forward", Lq, S, M, D, P, N, elem)
    pts, cells = N * Lq * M * P, N * S * M
    entries = pts * 4
    passes = math.ceil(max(cells, 1).bit_length() / 4)
    pass1 = entries * D * elem + N * Lq * M * D * elem + pts * 12 * 2 + entries * 8
    sort = entries * 20 * passes
    csr = entries * 4 + (cells + 1) * 4
    pass2 = entries * (8 + D * elem) + cells * D * elem + (cells + 1) * 4
    return 3 * floor, pass1 + sort + csr + pass2, 0


# (op, variant) -> counts(op, Lq, S, M, D, P, N, elem) -> (floor bytes, bytes moved, atomics)
MODELS = {("msda_forward", "lanes"): _msda_counts, ("msda_backward", "atomic"): _msda_counts,
          ("msda_backward_deterministic", "fixed_point"): _msda_counts,
          ("msda_backward_deterministic", "two_pass"): _two_pass_counts,
          # The other forward variants move the same bytes; they differ in idle lanes, repeated
          # bilinear setup and occupancy, which the kernel table above shows and a byte count does not.
          ("msda_forward", "point_major"): _msda_counts, ("msda_forward", "flat"): _msda_counts,
          ("msda_forward", "block128"): _msda_counts,
          # Combining same-address lanes first depends on where the points fall: variant 0's count is
          # their upper bound (tests/test_cuda_emulation.py counts 8-16x fewer for warp_aggregated and
          # 250x fewer for shared_privatized on a shape where many queries share cells).
          ("msda_backward", "warp_aggregated"): _msda_counts, ("msda_backward", "shared_privatized"): _msda_counts}
NOTES = {("msda_forward", "point_major"): "bytes as lanes; bilinear setup once per point, not per chunk",
         ("msda_forward", "flat"): "bytes as lanes; no idle lanes in power-of-two groups",
         ("msda_forward", "block128"): "bytes as lanes; 128-thread blocks",
         ("msda_backward", "warp_aggregated"): "atomics: upper bound (data-dependent, fewer where lanes share cells)",
         ("msda_backward", "shared_privatized"): "atomics: upper bound (shared-memory atomics first where a block's band fits 32 KB)"}


def traffic_rows(variants: dict, N: int = 2) -> list[dict]:
    rows = []
    for name, Lq, (H, W), M, D, P in PIIP_CALLS:
        for op in ("msda_forward", "msda_backward", "msda_backward_deterministic"):
            for v in variants.get(op, ()):
                for dtype, elem in (("float32", 4), ("bfloat16", 2)):
                    model = MODELS.get((op, v))
                    row = {"call": f"batch {N}, {name}", "op": op, "variant": v, "dtype": dtype}
                    if model is None:
                        row["note"] = "no analytic model yet (add one to MODELS)"
                    else:
                        floor, moved, atomics = model(op, Lq, H * W, M, D, P, N, elem)
                        row.update(floor_MB=floor / 1e6, moved_MB=moved / 1e6, moved_x_floor=moved / floor, atomics_M=atomics / 1e6)
                        if (op, v) in NOTES:
                            row["note"] = NOTES[(op, v)]
                    rows.append(row)
    return rows


# --- the report ---------------------------------------------------------------------------------


def table(rows, cols) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        return "" if v is None else str(v).replace("|", "\\|")
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] +
                     ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "static_sm90.md")
    ap.add_argument("--no-triton", action="store_true")
    args = ap.parse_args(argv)
    from piip_kernels.variants import VARIANTS

    sys.path.insert(0, str(ROOT / "bench"))
    from common import tree_commit

    with tempfile.TemporaryDirectory() as tmp:
        cuda = cuda_rows(VARIANTS, Path(tmp))
        tri, tri_note = [], "not run (--no-triton)"
        if not args.no_triton:
            tool = cuobjdump()
            try:
                import triton  # noqa: F401
            except ImportError:
                tool, tri_note = None, "not run: triton is not importable"
            if tool is None and tri_note.startswith("not run (--"):
                tri_note = "not run: no cuobjdump (pip install -c constraints.txt nvidia-cuda-cuobjdump)"
            if tool:
                tri, tri_note = triton_rows(tool, Path(tmp)), "cuobjdump " + subprocess.run(
                    [tool, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    nvcc_version = subprocess.run([shutil.which("nvcc") or "nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    cols = ["op", "variant", "kernel", "registers", "spill_stores", "spill_loads", "stack", "smem", "blocks_per_sm", "occupancy",
            "limited_by"]
    cuda.sort(key=lambda r: (r["op"], r["variant"], r["kernel"]))
    text = [
        "# Static resource report, sm_90 (H100)",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- commit: {tree_commit()}",
        f"- nvcc: {nvcc_version}",
        f"- variants: {dict(VARIANTS)}",
        f"- generated by: python bench/static_report.py (no GPU needed)",
        "",
        f"Occupancy: blocks of {BLOCK_THREADS} threads (CUDA, except a kernel whose template names its block size; Triton: 32 x num_warps), H100 limits: {REGS_PER_SM} registers / SM "
        f"allocated per warp in units of {REG_UNIT}, {SMEM_PER_SM // 1024} KB shared / SM ({SMEM_RESERVED} B reserved per block), "
        f"{THREADS_PER_SM} threads, {BLOCKS_PER_SM} blocks. occupancy = resident warps / 64. Bytes: spills and stack per thread, smem "
        "static per block.",
        "",
        f"## CUDA kernels ({len(cuda)}, from {', '.join(sorted({r['source'] for r in cuda}))})",
        "",
        table(cuda, cols),
        "",
        f"## Triton kernels ({tri_note})",
        "",
        table(tri, ["op", "kernel", "registers", "stack", "local", "smem", "blocks_per_sm", "occupancy", "limited_by", "error"])
        if tri else "(none)",
        "",
        "## Traffic on the PIIP interaction calls (analytic, per variant; no cache reuse: gathers are an upper bound)",
        "",
        "floor: every input and the output once (backward: 3 x the forward floor, bench_msda's fwd+bwd floor); moved: the "
        "model's bytes; atomics: atomic instructions issued (float4 atomics count once).",
        "",
        table(traffic_rows(VARIANTS), ["call", "op", "variant", "dtype", "floor_MB", "moved_MB", "moved_x_floor", "atomics_M", "note"]),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
