"""The device kernels (comms/kernels/cuda.py) without a GPU: the torch fold runs on CPU
tensors and must give the host kernels' bits (comms/kernels/reference_ops.py) for every
dtype and op; the CUDA C of the cupy kernels compiles with NVRTC where that library is
installed (tests/gpu runs both implementations on a GPU)."""
import ctypes
import glob
import os

import numpy as np
import pytest

from comms.core import dtypes as dt
from comms.kernels import cuda, reference_ops as ref

torch = pytest.importorskip("torch")

PAIRS = [(d, o) for d in dt.DTYPE_NAMES for o in (dt.SUM, dt.PROD, dt.MIN, dt.MAX, dt.BAND,
                                                  dt.BOR, dt.BXOR) if dt.op_supported(d, o)]


def _values(rng, dtype, count):
    if dtype == dt.BOOL:
        return rng.integers(0, 3, count).astype(np.uint8)        # 2: nonzero, not 1
    if dtype == dt.BF16:
        x = rng.choice(np.array([0.0, -0.0, 1.5, -2.25, 3e38, np.nan, np.inf, 7.0],
                                np.float32), count)
        with np.errstate(over="ignore"):
            return ref.f32_to_bf16(x * rng.integers(1, 4, count).astype(np.float32))
    if dtype in dt.FLOAT_DTYPES:
        npdt = ref.storage_dtype(dtype)
        big = 6e4 if dtype == dt.F16 else 1e30
        x = rng.choice(np.array([0.0, -0.0, 1.5, -2.25, big, np.nan, -np.inf, 7.0]), count)
        with np.errstate(over="ignore"):
            return (x * rng.integers(1, 4, count)).astype(npdt)
    info = np.iinfo(ref.storage_dtype(dtype))
    return rng.integers(info.min, info.max, count, endpoint=True,
                        dtype=ref.storage_dtype(dtype))


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "f":
        return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))) and
                                           np.array_equal(np.signbit(a) & ~np.isnan(a),
                                                          np.signbit(b) & ~np.isnan(b)))
    if a.dtype == np.uint16 and b.dtype == np.uint16:      # bfloat16 bits: NaN payloads vary
        fa, fb = ref.bf16_to_f32(a), ref.bf16_to_f32(b)
        return _same(fa, fb)
    return np.array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.fixture(scope="module")
def kern():
    return cuda.TorchKernels(torch, "cpu")


@pytest.mark.parametrize("dtype,op", PAIRS, ids=lambda p: str(p))
@pytest.mark.parametrize("k", [1, 2, 5])
def test_torch_fold_equals_the_host_kernels(kern, dtype, op, k):
    rng = np.random.default_rng(7 * dtype + 31 * op + k)
    count = 37
    ins = [_values(rng, dtype, count) for _ in range(k)]
    want = ref.reduce_arrays(ins, op, dtype)
    outs = [np.zeros(count, ref.storage_dtype(dtype)) for _ in range(2)]
    kern.reduce([o.ctypes.data for o in outs], [a.ctypes.data for a in ins], count, dtype,
                op, 0, None)
    for o in outs:
        got = o.astype(bool) if dtype == dt.BOOL else o
        assert _same(got, want), (dt.DTYPE_NAMES[dtype], dt.OP_NAMES[op], got, want)


@pytest.mark.parametrize("dtype", sorted(dt.FLOAT_DTYPES))
def test_torch_fold_scales_as_the_host_kernels_average(kern, dtype):
    rng = np.random.default_rng(dtype)
    count, k = 41, 3
    ins = [_values(rng, dtype, count) for _ in range(k)]
    total = ref.reduce_arrays(ins, dt.SUM, dtype)
    want = np.empty_like(total)
    ref.scale(want.ctypes.data, total.ctypes.data, count, dtype, 1.0 / k)
    out = np.zeros(count, ref.storage_dtype(dtype))
    kern.reduce([out.ctypes.data], [a.ctypes.data for a in ins], count, dtype, dt.SUM, 0,
                None, scale=1.0 / k)
    assert _same(out, want)


def test_torch_fold_pre_scales_float16_as_the_host_average(kern):
    rng = np.random.default_rng(3)
    ins = [rng.uniform(-9, 9, 29).astype(np.float16) for _ in range(3)]
    scaled = []
    for a in ins:
        s = np.empty_like(a)
        ref.scale(s.ctypes.data, a.ctypes.data, a.size, dt.F16, 1.0 / 3)
        scaled.append(s)
    want = ref.reduce_arrays(scaled, dt.SUM, dt.F16)
    out = np.zeros(29, np.float16)
    kern.reduce([out.ctypes.data], [a.ctypes.data for a in ins], 29, dt.F16, dt.SUM, 0, None,
                scale=1.0 / 3, premul=True)
    assert _same(out, want)


def test_torch_fold_in_place_and_copy(kern):
    a = np.arange(10, dtype=np.float32)
    b = np.full(10, 2.0, np.float32)
    kern.reduce([a.ctypes.data, b.ctypes.data], [a.ctypes.data, b.ctypes.data], 10, dt.F32,
                dt.SUM, 0, None)
    assert np.array_equal(a, np.arange(10) + 2.0) and np.array_equal(a, b)
    c = np.zeros(10, np.float32)
    kern.copy(c.ctypes.data, a.ctypes.data, 40, 0, None)
    assert np.array_equal(c, a)


def test_reduce_refuses_what_the_kernels_do_not_do(kern):
    x = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="op"):
        kern.reduce([x.ctypes.data], [x.ctypes.data], 4, dt.F32, dt.BXOR, 0, None)
    with pytest.raises(ValueError, match="inputs"):
        kern.reduce([x.ctypes.data], [x.ctypes.data] * (cuda.MAX_SOURCES + 1), 4, dt.F32,
                    dt.SUM, 0, None)


def _nvrtc():
    """libnvrtc from the nvidia-cuda-nvrtc wheel or the system, or None."""
    paths = []
    try:
        import nvidia.cuda_nvrtc
        paths += glob.glob(os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib",
                                        "libnvrtc.so*"))
    except ImportError:
        pass
    for path in paths + ["libnvrtc.so", "libnvrtc.so.12", "libnvrtc.so.13"]:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def test_cuda_source_compiles_with_nvrtc():
    lib = _nvrtc()
    if lib is None:
        pytest.skip("NVRTC is not installed (pip install nvidia-cuda-nvrtc-cu12)")
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), cuda.source().encode(), b"k.cu", 0,
                                  None, None) == 0
    opts = [b"--std=c++17", b"--fmad=false", b"--gpu-architecture=compute_90"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    assert rc == 0, log.value.decode()
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    text = ptx.value.decode()
    for d, o in PAIRS:
        assert f".entry {cuda.kernel_name(d, o)}(" in text
    assert ".local" not in text          # the pointer tables stay in registers


def test_ipc_handles_keep_every_byte():
    """A handle is 64 opaque bytes, NULs included, both ways through the ctypes struct."""
    from comms.transport import cuda_ipc
    raw = bytes(range(64))[::-1].replace(b"\x05", b"\0")
    h = cuda_ipc.Handle.of(raw)
    assert bytes(h) == raw and len(bytes(cuda_ipc.Handle())) == 64
    with pytest.raises(ValueError, match="64 bytes"):
        cuda_ipc.Handle.of(b"\0" * 63)
