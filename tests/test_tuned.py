"""The tuned dispatch table (piip_kernels/tuned) and its wiring into the private ops (ops.py).

No GPU is needed: the private ops are replaced by a recorder (ops._private_op, the lookup
ops.py makes), the device capability by a fake one (tuned.arch_of), and the ops are called
with backend "cuda" on CPU tensors. A variant name is added to VARIANTS for the tests that
need a number other than 0 (this branch's kernels have one variant each).
"""
import json

import pytest
import torch

import piip_kernels
from piip_kernels import ops, tuned, variants
from piip_kernels.msda.reference import ms_deform_attn_reference


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    tuned.clear_cache()
    monkeypatch.setattr(tuned, "arch_of", lambda device: "sm_90")
    yield
    tuned.clear_cache()


def write(tmp_path, entries, name="t.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"arch": "sm_90", "device": "test", "entries": entries}))
    return path


def entry(op, variant, dtype="float32", shape_class=None):
    return {"op": op, "dtype": dtype, "shape_class": shape_class or tuned.shape_classes(op)[0], "variant": variant}


# --- shape classes --------------------------------------------------------------------------


def test_shape_classes_split_head_dims_and_rows():
    sc = tuned.shape_class
    assert sc("msda_forward", D=6, rows=1000) == "D<=8,rows<2^17"
    assert sc("msda_forward", D=8, rows=1 << 17) == "D<=8,rows>=2^17"
    assert sc("msda_backward", D=12, rows=(1 << 17) - 1) == "D<=32,rows<2^17"
    assert sc("msda_backward_deterministic", D=32, rows=10**6) == "D<=32,rows>=2^17"
    assert sc("msda_forward", D=100, rows=1) == "D>32,rows<2^17"
    assert sc("merge_forward", out=(1 << 22) - 1) == "out<2^22"
    assert sc("merge_backward", out=1 << 22) == "out<2^25"
    assert sc("merge_forward", out=1 << 25) == "out>=2^25"
    for op in variants.VARIANTS:
        assert len(set(tuned.shape_classes(op))) == len(tuned.shape_classes(op))


def test_shape_class_of_unknown_op_is_an_error():
    with pytest.raises(KeyError, match="dca_forward"):
        tuned.shape_class("dca_forward", D=8, rows=1)


def test_sizes_helpers_match_the_layouts():
    assert tuned.msda_sizes((2, 4900, 16, 24), (2, 1764, 16, 1, 4, 2)) == {"D": 24, "rows": 2 * 1764 * 16}
    assert tuned.merge_sizes((2, 1024, 42, 42), (98, 98)) == {"out": 2 * 1024 * 98 * 98}


# --- loading ----------------------------------------------------------------------------------


def test_unknown_variant_is_an_error_at_load(tmp_path, monkeypatch):
    monkeypatch.setenv("PIIP_KERNELS_TUNED", str(write(tmp_path, [entry("msda_backward", "no_such_variant")])))
    with pytest.raises(ValueError, match="no_such_variant"):
        tuned.choose("msda_forward", torch.zeros(1), D=8, rows=1)


def test_unknown_op_is_an_error_at_load(tmp_path):
    bad = write(tmp_path, [{"op": "dca_forward", "dtype": "float32", "shape_class": "x", "variant": "lanes"}])
    with pytest.raises(ValueError, match="unknown op 'dca_forward'"):
        tuned.load(bad)


@pytest.mark.parametrize("change, match", [({"dtype": "float8"}, "unknown dtype"), ({"shape_class": "huge"}, "no shape class"),
                                           ({"variant": None}, "no variant")])
def test_bad_entries_are_errors(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        tuned.load(write(tmp_path, [{**entry("merge_forward", "pixel"), **change}]))


def test_a_key_twice_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="second entry"):
        tuned.load(write(tmp_path, [entry("merge_forward", "pixel"), entry("merge_forward", "pixel")]))


def test_no_entry_gives_variant_zero(tmp_path, monkeypatch):
    monkeypatch.setitem(variants.VARIANTS, "msda_forward", ("lanes", "extra"))
    monkeypatch.setenv("PIIP_KERNELS_TUNED", str(write(tmp_path, [entry("msda_forward", "extra", "bfloat16")])))
    x = torch.zeros(1, dtype=torch.bfloat16)
    assert tuned.choose("msda_forward", x, D=6, rows=10) == 1
    assert tuned.choose("msda_forward", x, D=64, rows=10) == 0            # another shape class
    assert tuned.choose("msda_forward", x.float(), D=6, rows=10) == 0     # another dtype
    assert tuned.choose("msda_backward", x, D=6, rows=10) == 0            # another op


def test_no_table_for_the_arch_gives_zero_and_off_disables(tmp_path, monkeypatch):
    monkeypatch.delenv("PIIP_KERNELS_TUNED", raising=False)
    monkeypatch.setattr(tuned, "arch_of", lambda device: "sm_1")  # no piip_kernels/tuned/sm_1.json
    assert tuned.choose("merge_forward", torch.zeros(1), out=10) == 0
    monkeypatch.setitem(variants.VARIANTS, "merge_forward", ("pixel", "extra"))
    monkeypatch.setenv("PIIP_KERNELS_TUNED", str(write(tmp_path, [entry("merge_forward", "extra")])))
    assert tuned.choose("merge_forward", torch.zeros(1), out=10) == 1
    monkeypatch.setenv("PIIP_KERNELS_TUNED", "off")
    assert tuned.choose("merge_forward", torch.zeros(1), out=10) == 0


def test_missing_override_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIIP_KERNELS_TUNED", str(tmp_path / "absent.json"))
    with pytest.raises(FileNotFoundError, match="absent.json"):
        tuned.choose("merge_forward", torch.zeros(1), out=10)


def test_table_is_loaded_once_per_arch(tmp_path, monkeypatch):
    monkeypatch.setenv("PIIP_KERNELS_TUNED", str(write(tmp_path, [])))
    calls = []
    real = tuned.load
    monkeypatch.setattr(tuned, "load", lambda path: calls.append(path) or real(path))
    for _ in range(3):
        tuned.choose("merge_forward", torch.zeros(1), out=10)
    assert len(calls) == 1


def test_packaged_tables_are_valid():
    for path in tuned.HERE.glob("*.json"):
        tuned.load(path)
        assert json.loads(path.read_text())["arch"] == path.stem


# --- the wiring in ops.py ---------------------------------------------------------------------


def msda_inputs(dtype=torch.float32, N=1, Lq=5, M=2, D=4):
    g = torch.Generator().manual_seed(0)
    shapes = torch.tensor([[3, 4]])
    starts = torch.tensor([0])
    value = torch.randn(N, 12, M, D, generator=g).to(dtype)
    loc = torch.rand(N, Lq, M, 1, 2, 2, generator=g)
    attn = torch.rand(N, Lq, M, 1, 2, generator=g)
    return value, shapes, starts, loc, attn


@pytest.fixture
def recorder(monkeypatch):
    """Replaces the private ops by functions that record their trailing arguments and return
    the reference's results (so autograd around them runs)."""
    calls = []

    def msda_forward(value, shapes, starts, loc, attn, *variant):
        calls.append(("msda_forward", variant))
        return ms_deform_attn_reference(value, shapes, starts, loc, attn)

    def msda_backward(name):
        def run(grad, value, shapes, starts, loc, attn, *variant):
            calls.append((name, variant))
            return torch.zeros_like(value), torch.zeros_like(loc), torch.zeros_like(attn)
        return run

    def merge_forward(f, w, ho, wo, ac, out_dtype, *variant):
        calls.append(("merge_forward", variant))
        return torch.zeros(f[0].shape[0], f[0].shape[1], ho, wo, dtype=out_dtype)

    def merge_backward(grad, f, w, ac, *variant):
        calls.append(("merge_backward", variant))
        return [torch.zeros_like(x) for x in f], torch.zeros_like(w)

    table = {"msda_forward": msda_forward, "msda_backward": msda_backward("msda_backward"),
             "msda_backward_deterministic": msda_backward("msda_backward_deterministic"),
             "merge_forward": merge_forward, "merge_backward": merge_backward}
    monkeypatch.setattr(ops, "_private_op", lambda name: table[name])
    return calls


def run_msda(backend, deterministic=False, dtype=torch.float32):
    value, shapes, starts, loc, attn = msda_inputs(dtype)
    leaves = [t.requires_grad_() for t in (value, loc, attn)]
    out = torch.ops.piip.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend, deterministic)
    out.sum().backward()


def run_merge(backend):
    feats = [torch.randn(1, 2, 3, 3, requires_grad=True), torch.randn(1, 2, 5, 5, requires_grad=True)]
    weights = torch.rand(2, requires_grad=True)
    torch.ops.piip.branch_merge(feats, weights, [5, 5], False, backend).sum().backward()


def test_cuda_backend_passes_the_tuned_variant(tmp_path, monkeypatch, recorder):
    for op in variants.VARIANTS:
        monkeypatch.setitem(variants.VARIANTS, op, variants.VARIANTS[op] + ("extra",))
    # rows = 1 * 5 * 2, D = 4; merge out = 1 * 2 * 5 * 5
    entries = [entry(op, "extra", shape_class="D<=8,rows<2^17" if op.startswith("msda") else "out<2^22")
               for op in variants.VARIANTS]
    monkeypatch.setenv("PIIP_KERNELS_TUNED", str(write(tmp_path, entries)))
    run_msda("cuda")
    run_msda("cuda", deterministic=True)
    run_merge("cuda")
    extra = {op: (variants.VARIANTS[op].index("extra"),) for op in variants.VARIANTS}  # the last number of each op
    assert recorder == [("msda_forward", extra["msda_forward"]), ("msda_backward", extra["msda_backward"]),
                        ("msda_forward", extra["msda_forward"]),
                        ("msda_backward_deterministic", extra["msda_backward_deterministic"]),
                        ("merge_forward", extra["merge_forward"]), ("merge_backward", extra["merge_backward"])]
    assert all(n > (0,) for n in extra.values())
    recorder.clear()
    run_msda("cuda", dtype=torch.float64)  # no entry for float64: variant 0
    assert recorder == [("msda_forward", (0,)), ("msda_backward", (0,))]


def test_cpu_backend_never_reads_the_table(tmp_path, monkeypatch, recorder):
    monkeypatch.setenv("PIIP_KERNELS_TUNED", str(write(tmp_path, [entry("msda_forward", "no_such_variant")])))
    loads = []
    monkeypatch.setattr(tuned, "load", lambda path: loads.append(path))
    run_msda("cpu")
    run_merge("cpu")
    assert recorder == [("msda_forward", ()), ("msda_backward", ()), ("merge_forward", ()), ("merge_backward", ())]
    assert loads == []


def test_public_api_on_cpu_and_triton_ignores_a_broken_table(tmp_path, monkeypatch):
    """Through the public functions and the real kernels: a table that would raise at load
    changes nothing on the CPU (compiled kernels where built, Triton in its interpreter)."""
    monkeypatch.setenv("PIIP_KERNELS_TUNED", str(write(tmp_path, [entry("msda_forward", "no_such_variant")])))
    value, shapes, starts, loc, attn = msda_inputs()
    ref = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    ran = []
    for backend in ("cpu", "triton"):
        if piip_kernels.msda.api.BACKENDS[backend](value.device, value.dtype):
            continue  # not available here (no extension build, no triton)
        out = piip_kernels.ms_deform_attn(value, shapes, starts, loc, attn, backend=backend)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        ran.append(backend)
    if not ran:
        pytest.skip("neither the CPU extension nor Triton is available")
    with pytest.raises(ValueError, match="no_such_variant"):  # the same table does raise when read
        tuned.choose("msda_forward", value, D=4, rows=10)


def test_tables_ship_with_the_package():
    """pyproject's package data takes every piip_kernels/tuned/*.json into the wheel."""
    import fnmatch
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["piip_kernels"]
    assert any(fnmatch.fnmatch("tuned/sm_90.json", p) for p in patterns), patterns


def test_public_merge_on_cpu_ignores_a_broken_table(tmp_path, monkeypatch):
    from piip_kernels.merge.reference import branch_merge_reference

    monkeypatch.setenv("PIIP_KERNELS_TUNED", str(write(tmp_path, [entry("merge_forward", "no_such_variant")])))
    if piip_kernels.merge.api.BACKENDS["cpu"](torch.device("cpu"), torch.float32):
        pytest.skip("the CPU extension is not built")
    feats = [torch.randn(1, 2, 3, 3, requires_grad=True), torch.randn(1, 2, 5, 5, requires_grad=True)]
    weights = torch.rand(2, requires_grad=True)
    out = piip_kernels.branch_merge(feats, weights, (5, 5), backend="cpu")
    torch.testing.assert_close(out, branch_merge_reference(feats, weights, (5, 5)))
    out.sum().backward()
    assert all(f.grad is not None for f in feats)


def test_arch_names_the_capability_and_asks_once(monkeypatch):
    monkeypatch.undo()  # the real arch_of, not the fixture's fake
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: asked.append(index) or (9, 0))
    monkeypatch.setattr(tuned, "_archs", {})
    assert tuned.arch_of(torch.device("cuda", 1)) == "sm_90"
    assert tuned.arch_of(torch.device("cuda", 1)) == "sm_90"
    assert asked == [1]
