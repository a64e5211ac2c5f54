"""The device kernels (comms/kernels/cuda.py) on a GPU: the cupy RawModule kernels and the
torch fold give the host kernels' bits (comms/kernels/reference_ops.py) for every dtype and
op, on aligned (16 bytes per thread) and unaligned pointers, with tails, up to 16 inputs and
outputs, in place, and the two averages. Then the IPC runtime (comms/transport/cuda_ipc.py)
in one process: export, device lookup, events."""
import numpy as np
import pytest

from comms.core import dtypes as dt
from comms.kernels import cuda, reference_ops as ref
from tests.unit.test_device_kernels import PAIRS, _same, _values

torch = pytest.importorskip("torch")


def _implementations():
    out = [cuda.TorchKernels(torch)]
    try:
        import cupy
        out.append(cuda.CupyKernels(cupy))
    except ImportError:
        pass
    return out


@pytest.fixture(scope="module", params=_implementations(), ids=lambda k: k.name)
def kern(request):
    return request.param


def _to_cuda(a, pad_bytes):
    """a's bytes on the GPU at pad_bytes past a 256-byte aligned allocation."""
    raw = torch.zeros(a.nbytes + 256, dtype=torch.uint8, device="cuda")
    raw[pad_bytes:pad_bytes + a.nbytes].copy_(torch.from_numpy(a.view(np.uint8).copy()))
    return raw, raw.data_ptr() + pad_bytes


def _from_cuda(raw, pad_bytes, like):
    return raw[pad_bytes:pad_bytes + like.nbytes].cpu().numpy().view(like.dtype)


@pytest.mark.parametrize("dtype,op", PAIRS, ids=str)
@pytest.mark.parametrize("k,count,pad", [(1, 37, 0), (2, 4099, 0), (3, 1000, 8),
                                         (16, 515, 0)])
def test_kernels_equal_the_host_kernels(kern, dtype, op, k, count, pad):
    rng = np.random.default_rng(dtype * 100 + op + k)
    ins = [_values(rng, dtype, count) for _ in range(k)]
    want = ref.reduce_arrays(ins, op, dtype)
    dev = [_to_cuda(a, pad) for a in ins]
    outs = [_to_cuda(np.zeros(count, ref.storage_dtype(dtype)), pad) for _ in range(2)]
    stream = torch.cuda.current_stream().cuda_stream
    # the first output is the first input: in place
    kern.reduce([dev[0][1], outs[1][1]], [a for _, a in dev], count, dtype, op, stream, 0)
    torch.cuda.synchronize()
    for raw, _ in (dev[0], outs[1]):
        got = _from_cuda(raw, pad, want if dtype != dt.BOOL else ins[0])
        got = got.astype(bool) if dtype == dt.BOOL else got
        assert _same(got, want), (kern.name, dt.DTYPE_NAMES[dtype], dt.OP_NAMES[op], k, pad)


@pytest.mark.parametrize("dtype", sorted(dt.FLOAT_DTYPES))
@pytest.mark.parametrize("premul", [False, True])
def test_kernels_average_as_the_host(kern, dtype, premul):
    rng = np.random.default_rng(dtype)
    count, k = 1031, 4
    ins = [_values(rng, dtype, count) for _ in range(k)]
    if premul:
        srcs = []
        for a in ins:
            s = np.empty_like(a)
            ref.scale(s.ctypes.data, a.ctypes.data, count, dtype, 1.0 / k)
            srcs.append(s)
        want = ref.reduce_arrays(srcs, dt.SUM, dtype)
    else:
        total = ref.reduce_arrays(ins, dt.SUM, dtype)
        want = np.empty_like(total)
        ref.scale(want.ctypes.data, total.ctypes.data, count, dtype, 1.0 / k)
    dev = [_to_cuda(a, 0) for a in ins]
    out = _to_cuda(np.zeros(count, ref.storage_dtype(dtype)), 0)
    kern.reduce([out[1]], [a for _, a in dev], count, dtype, dt.SUM,
                torch.cuda.current_stream().cuda_stream, 0, scale=1.0 / k, premul=premul)
    torch.cuda.synchronize()
    assert _same(_from_cuda(out[0], 0, want), want)


def test_copy_and_alloc(kern):
    owner, addr = kern.alloc(4096, 0, torch.cuda.current_stream().cuda_stream)
    src = torch.arange(1024, dtype=torch.int32, device="cuda")
    kern.copy(addr, src.data_ptr(), 4096, torch.cuda.current_stream().cuda_stream, 0)
    torch.cuda.synchronize()
    back = torch.empty(1024, dtype=torch.int32, device="cuda")
    kern.copy(back.data_ptr(), addr, 4096, kern.current_stream(0), 0)
    torch.cuda.synchronize()
    assert torch.equal(back, src)


def test_driver_ipc_in_one_process():
    from comms.transport import cuda_ipc
    ipc = cuda_ipc.ipc()
    assert ipc is not None, cuda_ipc.unavailable()
    t = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
    handle, offset = ipc.export(t.data_ptr() + 4096)
    assert len(handle) == 64 and offset >= 4096
    assert ipc.device_of(t.data_ptr()) == 0
    assert len(ipc.gpu_id(0)) >= 12
    with ipc.on(0):
        ev, h = ipc.new_event()
        s = torch.cuda.current_stream().cuda_stream
        ipc.record(ev, s)
        ipc.wait(s, ev)
        assert ipc.local_event(h) == ev
        ipc.synchronize_event(ev)
        ipc.destroy_event(ev)
    assert len(h) == 64
    assert torch.cuda.current_device() == 0
