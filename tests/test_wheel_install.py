"""bench/gpu_check.sh --wheel: the GPU check installs a wheel built elsewhere (no compiler,
no network) and runs everything against it, not against the source tree it is started in.
Checked on the CPU with a wheel packed from this install's own files (what
scripts/build_wheels.sh's wheel holds, without the compile), through --install-only."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from piip_kernels import _ext

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(_ext.EXT is None, reason=f"compiled extension missing: {_ext.EXT_ERROR}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("wheel", reason="the wheel package packs the test wheel (requirements-dev.txt)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for pkg in ("piip_kernels", "piip"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    info = src / "piip_kernels-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: piip-kernels\nVersion: 0.1.0\n")
    (info / "WHEEL").write_text("Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: cp310-abi3-linux_x86_64\n")
    (tmp / "dist").mkdir()
    subprocess.run([sys.executable, "-m", "wheel", "pack", str(src), "-d", str(tmp / "dist")], check=True,
                   capture_output=True)
    return next((tmp / "dist").glob("piip_kernels-0.1.0-cp310-abi3-*.whl"))


def test_gpu_check_installs_the_wheel_and_uses_it(wheel, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    res = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--install-only", "--wheel", str(wheel)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"wheel: {wheel.name} installed in {tmp_path / 'out' / 'wheel'}" in res.stdout
    assert (tmp_path / "out" / "wheel" / "piip_kernels" / "_C.abi3.so").exists()
    assert "ms_deform_attn" in (tmp_path / "out" / "backends.txt").read_text()


def test_gpu_check_refuses_a_missing_wheel(tmp_path):
    res = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--wheel", str(tmp_path / "none.whl")], cwd=ROOT,
                         env={**os.environ, "OUT": str(tmp_path / "out")}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "no wheel at" in res.stderr
