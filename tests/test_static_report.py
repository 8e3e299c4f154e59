"""bench/static_report.py: parsing of ptxas and cuobjdump reports, the occupancy arithmetic,
the kernel -> variant mapping, and (where nvcc exists) one real small compile."""
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import static_report as sr  # noqa: E402

# nvcc 13.0 -arch=sm_90 -Xptxas -v on two small kernels (one with shared memory, one that spills).
PTXAS = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN4piip5merge4cuda15backward_kernelIfEEvPT_' for 'sm_90'
ptxas info    : Function properties for _ZN4piip5merge4cuda15backward_kernelIfEEvPT_
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 10 registers, used 1 barriers, 1024 bytes smem
ptxas info    : Compile time = 10.423 ms
ptxas info    : Compiling entry function '_Z5spillPfi' for 'sm_90'
ptxas info    : Function properties for _Z5spillPfi
    720 bytes stack frame, 972 bytes spill stores, 1056 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 720 bytes cumulative stack size
ptxas info    : Compile time = 84.558 ms
"""

CUOBJDUMP = """\
Resource usage:
 Common:
  GLOBAL:0
 Function _msda_fwd_kernel:
  REG:72 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:532 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_ptxas():
    usage = sr.parse_ptxas(PTXAS)
    assert usage == {
        "_ZN4piip5merge4cuda15backward_kernelIfEEvPT_": {"registers": 10, "spill_stores": 0, "spill_loads": 0, "stack": 0,
                                                         "smem": 1024},
        "_Z5spillPfi": {"registers": 32, "spill_stores": 972, "spill_loads": 1056, "stack": 720, "smem": 0},
    }
    assert sr.demangle(usage)["_ZN4piip5merge4cuda15backward_kernelIfEEvPT_"].startswith(
        "void piip::merge::cuda::backward_kernel<float>") or shutil.which("c++filt") is None


def test_parse_cuobjdump():
    assert sr.parse_cuobjdump(CUOBJDUMP) == {"_msda_fwd_kernel": {"registers": 72, "stack": 0, "smem": 0, "local": 0}}


@pytest.mark.parametrize("regs, smem, threads, want", [
    (32, 0, 256, (8, 1.0, "registers, threads")),          # 32 regs x 2048 threads = the whole register file
    (64, 0, 256, (4, 0.5, "registers")),        # 64 x 32 = 2048 per warp; 32 warps fit -> 4 blocks of 8
    (80, 0, 256, (3, 0.375, "registers")),      # 2560 per warp: 25 warps -> 3 blocks
    (255, 0, 256, (1, 0.125, "registers")),     # 8192 per warp: 8 warps -> 1 block
    (33, 0, 256, (6, 0.75, "registers")),       # 33 x 32 = 1056 -> 1280 (units of 256): 51 warps -> 6 blocks
    (16, 100 * 1024, 256, (2, 0.25, "shared memory")),
    (16, 0, 32, (32, 0.5, "blocks")),
])
def test_occupancy(regs, smem, threads, want):
    assert sr.occupancy(regs, smem, threads) == want


def test_variant_mapping(monkeypatch):
    variants = {"msda_forward": ("lanes", "tiled"), "msda_backward": ("atomic", "warp_aggregated"),
                "msda_backward_deterministic": ("fixed_point", "two_pass"), "merge_forward": ("pixel",),
                "merge_backward": ("gather",)}
    v = sr.variant_of
    assert v("void piip::msda::cuda::forward_kernel<float, float, 4>(piip::msda::cuda::Params<float, float>, float*, int)",
             variants) == ("msda_forward", "0 or shared")
    assert v("void piip::msda::cuda::backward_warp_aggregated_kernel<float, float, 4>(int)", variants) == \
        ("msda_backward", "warp_aggregated")
    assert v("void piip::msda::cuda::backward_kernel<float, float, 4, piip::msda::cuda::two_pass>(int)", variants) == \
        ("msda_backward_deterministic", "two_pass")
    assert v("void piip::msda::cuda::tiled_forward_kernel<float>(int)", variants) == ("msda_forward", "tiled")
    assert v("void piip::merge::cuda::backward_kernel<float, float>(int)", variants)[0] == "merge_backward"
    assert v("void piip::fixed_point::absmax_kernel<float>(float const*, long, unsigned int*)", variants) == ("fixed_point", "-")
    # "lanes" must not match inside another word
    assert v("void piip::msda::cuda::forward_kernel<planesX>(int)", variants) == ("msda_forward", "0 or shared")


def test_traffic_model_counts_atomics_per_variant():
    rows = {(r["call"], r["op"], r["dtype"]): r for r in sr.traffic_rows({"msda_forward": ("lanes",),
                                                                        "msda_backward": ("atomic", "new_one")})}
    fwd = rows[("batch 2, 1764q 70x70 D32", "msda_forward", "float32")]
    assert fwd["atomics_M"] == 0 and fwd["moved_x_floor"] > 1
    bwd = [r for r in sr.traffic_rows({"msda_backward": ("atomic",)}) if r["call"].endswith("D32") and r["dtype"] == "float32"][0]
    # 2 x 1764 x 16 x 4 points x 4 corners x 32 / 4 (float4 atomics)
    assert bwd["atomics_M"] == pytest.approx(2 * 1764 * 16 * 4 * 4 * 8 / 1e6)
    assert any(r.get("note") for r in sr.traffic_rows({"msda_backward": ("atomic", "new_one")}))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_real_small_compile(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("namespace piip { namespace merge { namespace cuda {\n"
                   "template <typename T> __global__ void backward_kernel(T* x) { __shared__ float s[256];"
                   " s[threadIdx.x] = x[threadIdx.x]; __syncthreads(); x[threadIdx.x] = s[255 - threadIdx.x]; }\n"
                   "template __global__ void backward_kernel<float>(float*);\n}}}\n")
    usage = sr.parse_ptxas(sr.compile_ptxas(src, tmp_path, flags=[]))
    name = next(iter(sr.demangle(usage).values()))
    u = next(iter(usage.values()))
    assert "backward_kernel" in name
    assert u["smem"] == 1024 and 0 < u["registers"] <= 32 and u["spill_stores"] == 0


def test_two_pass_model_has_no_atomics_and_sorts_per_entry():
    rows = [r for r in sr.traffic_rows({"msda_backward_deterministic": ("fixed_point", "two_pass")})
            if r["call"].endswith("D6") and r["dtype"] == "float32"]
    fixed, two = (next(r for r in rows if r["variant"] == v) for v in ("fixed_point", "two_pass"))
    assert two["atomics_M"] == 0 and fixed["atomics_M"] > 0
    assert two["floor_MB"] == fixed["floor_MB"] and two["moved_MB"] > two["floor_MB"]
