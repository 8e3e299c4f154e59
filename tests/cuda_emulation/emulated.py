"""The CUDA kernels of csrc/ compiled for the CPU under the emulation of emulation.h, behind
Python wrappers that take and return CPU tensors with the shapes of the public ops.

tests/test_cuda_emulation.py checks them against the float64 reference; bench/sweep.py
--dry-run runs every kernel variant through them. ``variant`` is the number the glue's
``int variant`` argument takes (piip_kernels/variants.py names them).
"""
import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import torch

from piip_kernels.msda.triton import fixed_point_scale, softmax_bound

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def cuda_include_dirs() -> list[str]:
    """The include folders nvcc itself uses (from its dry run)."""
    probe = subprocess.run([NVCC or "nvcc", "--dryrun", "-c", "x.cu"], capture_output=True, text=True)
    dirs = re.findall(r'INCLUDES="-I([^"]+?)"', probe.stderr) + re.findall(r'SYSTEM_INCLUDES="-isystem" "([^"]+)"', probe.stderr)
    assert dirs, f"no include folder in nvcc's dry run:\n{probe.stderr[-2000:]}"
    return [d.strip() for d in dirs]


def build(directory: Path) -> "Emulated":
    """Compiles tests/cuda_emulation/kernels.cpp (every kernel of csrc/ under the emulation) into
    ``directory`` and loads it. About a minute on two cores."""
    import torch.utils.cpp_extension as ext

    lib = Path(directory) / "kernels.so"
    cmd = ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Wno-unknown-pragmas",
           # torch's extension build disables the implicit 16-bit conversions; so does this one
           *[f for f in ext.COMMON_NVCC_FLAGS if f.startswith("-D")],
           "-I", str(ROOT / "csrc"), *[f"-I{d}" for d in cuda_include_dirs()],
           str(ROOT / "tests" / "cuda_emulation" / "kernels.cpp"), "-o", str(lib)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "warning" not in res.stderr, res.stderr[-4000:]
    return Emulated(ctypes.CDLL(str(lib)))


def p(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def i64(*values):
    return [ctypes.c_int64(v) for v in values]


class Emulated:
    """The emulated kernels with the glue's buffers: the shapes of the public ops."""

    def __init__(self, lib):
        self.lib = lib

    def _run(self, name, *args):
        rc = getattr(self.lib, name)(*args)
        errors = self.lib.piip_emu_errors()
        assert rc == 0, f"{name} returned {rc}"
        assert errors == 0, f"{name}: {errors} undefined warp shuffles (lane or source outside the mask, or exited)"

    def msda_forward(self, value, shapes, starts, loc, attn, variant=0):
        N, S, M, D = value.shape
        _, Lq, _, L, P, _ = loc.shape
        out = torch.full((N, Lq, M * D), float("nan"), dtype=value.dtype)
        self._run("piip_emu_msda_forward", variant, CODE[value.dtype], CODE[loc.dtype], p(value), p(shapes), p(starts), p(loc), p(attn),
                  p(out), *i64(N, S, M, D, Lq, L, P))
        return out

    def msda_backward(self, grad_out, value, shapes, starts, loc, attn, deterministic=False, variant=0):
        N, S, M, D = value.shape
        _, Lq, _, L, P, _ = loc.shape
        if deterministic and variant == 1:
            return self._msda_backward_two_pass(grad_out, value, shapes, starts, loc, attn)
        acc, scale = self._accumulator(value, grad_out, attn, Lq * P, deterministic)
        gv, gl, ga = (torch.full_like(t, float("nan")) for t in (value, loc, attn))
        self._watch(acc)
        self._run("piip_emu_msda_backward", variant, CODE[value.dtype], CODE[loc.dtype], p(grad_out), p(value), p(shapes), p(starts), p(loc),
                  p(attn), p(None if deterministic else acc), p(acc if deterministic else None), p(scale), p(gv), p(gl), p(ga),
                  *i64(N, S, M, D, Lq, L, P))
        self.last_atomics = self._watch(None)
        return gv, gl, ga

    def _msda_backward_two_pass(self, grad_out, value, shapes, starts, loc, attn):
        # As csrc/msda/msda_cuda.cu's two_pass route: one workspace of the size the kernels ask for.
        N, S, M, D = value.shape
        _, Lq, _, L, P, _ = loc.shape
        self.lib.piip_emu_msda_two_pass_workspace.restype = ctypes.c_int64
        size = self.lib.piip_emu_msda_two_pass_workspace(*i64(N, S, M, Lq, L, P))
        assert size >= 0, "the two_pass variant needs int32 indices: too many corners or value cells"
        # Filled with garbage (not zeros): the kernels must write everything they read. One extra
        # 256 bytes so that the buffer can start on a 256-byte boundary, as a CUDA allocation does.
        raw = torch.full((size + 256,), 0xA5, dtype=torch.uint8)
        skip = -raw.data_ptr() % 256
        workspace = raw[skip:skip + size]
        gv, gl, ga = (torch.full_like(t, float("nan")) for t in (value, loc, attn))
        self._run("piip_emu_msda_backward_two_pass", CODE[value.dtype], CODE[loc.dtype], p(grad_out), p(value), p(shapes),
                  p(starts), p(loc), p(attn), p(workspace), ctypes.c_int64(size), p(gv), p(gl), p(ga),
                  *i64(N, S, M, D, Lq, L, P))
        return gv, gl, ga

    def _watch(self, acc):
        """Counts the fp32 atomics into `acc` from now on (None: stops); returns the count of the
        previous watch. msda_backward leaves its count in ``last_atomics``: the atomics that
        reached the grad_value accumulator (global memory), a float4 one counted once."""
        fn = self.lib.piip_emu_watch_atomics
        fn.restype = ctypes.c_long
        return fn(p(acc), ctypes.c_int64(acc.numel() * acc.element_size() if acc is not None else 0))

    @staticmethod
    def _accumulator(value, grad_out, weights, points, deterministic):
        # As csrc/common/cuda_glue.h's GradValueAccumulator.
        if deterministic:
            return torch.zeros(value.shape, dtype=torch.int64), fixed_point_scale(grad_out, points, weights).reshape(1)
        return torch.zeros(value.shape, dtype=torch.float32), None

    def dca_forward(self, value, value_hw, offsets, logits, query_hw):
        N, _, M, D = value.shape
        P = offsets.shape[3]
        out = torch.full((N, offsets.shape[1], M * D), float("nan"), dtype=value.dtype)
        self._run("piip_emu_dca_forward", CODE[value.dtype], CODE[offsets.dtype], p(value), p(offsets), p(logits), p(out),
                  *i64(N, *value_hw, *query_hw, M, D, P))
        return out

    def dca_backward(self, grad_out, value, value_hw, offsets, logits, query_hw, deterministic=False):
        N, _, M, D = value.shape
        P = offsets.shape[3]
        acc, scale = self._accumulator(value, grad_out, softmax_bound(logits), query_hw[0] * query_hw[1] * P, deterministic)
        gv, go, gl = (torch.full_like(t, float("nan")) for t in (value, offsets, logits))
        self._run("piip_emu_dca_backward", CODE[value.dtype], CODE[offsets.dtype], p(grad_out), p(value), p(offsets), p(logits),
                  p(None if deterministic else acc), p(acc if deterministic else None), p(scale), p(gv), p(go), p(gl),
                  *i64(N, *value_hw, *query_hw, M, D, P))
        return gv, go, gl

    def merge_forward(self, feats, weights, out_size, align_corners, out_dtype, variant=0):
        N, C = feats[0].shape[:2]
        maps = (ctypes.c_void_p * len(feats))(*[f.data_ptr() for f in feats])
        H = (ctypes.c_int64 * len(feats))(*[f.shape[2] for f in feats])
        W = (ctypes.c_int64 * len(feats))(*[f.shape[3] for f in feats])
        w = weights.float().contiguous()
        out = torch.full((N, C, *out_size), float("nan"), dtype=out_dtype)
        self._run("piip_emu_merge_forward", variant, CODE[feats[0].dtype], CODE[out_dtype], len(feats), maps, H, W, p(w), p(out),
                  *i64(N * C, *out_size), int(align_corners))
        return out

    def merge_backward(self, grad_out, feats, weights, align_corners, variant=0):
        N, C, Ho, Wo = grad_out.shape
        nb = len(feats)
        w = weights.float().contiguous()
        H = (ctypes.c_int64 * nb)(*[f.shape[2] for f in feats])
        W = (ctypes.c_int64 * nb)(*[f.shape[3] for f in feats])
        codes = (variant, CODE[feats[0].dtype], CODE[grad_out.dtype], nb)
        shares = self.lib.piip_emu_merge_backward_blocks(*codes, H, W, *i64(N * C, Ho, Wo), int(align_corners))
        assert shares >= 0, f"piip_emu_merge_backward_blocks returned {shares}"
        partial = torch.zeros(nb, shares)  # as the glue: zeros where a branch has fewer blocks
        grads = [torch.full_like(f, float("nan")) for f in feats]
        maps = (ctypes.c_void_p * nb)(*[f.data_ptr() for f in feats])
        outs = (ctypes.c_void_p * nb)(*[g.data_ptr() for g in grads])
        self._run("piip_emu_merge_backward", *codes, p(grad_out), maps, outs, p(partial), p(w), H, W,
                  *i64(N * C, Ho, Wo), int(align_corners))
        return grads, partial.double().sum(1).to(weights.dtype)  # as the glue: shares summed in double
