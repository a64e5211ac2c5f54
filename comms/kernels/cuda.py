"""Kernels on device (CUDA) memory, by address: the k-input reduce and the copy that the
device algorithms (comms/algorithms/device/ipc.py) run on their own and their peers' buffers.

Results are bit-identical to the host kernels (comms/kernels/reference_ops.py, the C twin in
native/src/reduce.c): a left fold in source (rank) order; float16 / bfloat16 widen to float32
for each step and round back (nearest even); min / max propagate NaN the same way; integer sum
and product wrap; bool is normalized to 0/1. AVG is the SUM scaled once at the end by 1/n,
except for float16, whose inputs are each scaled by 1/n before the SUM (as
comms/api/staging.py premul_avg does: float16 sums overflow long before their means do).

Two implementations with the same methods, one chosen per process (kernels()):
    cupy    a RawModule per (dtype, op), compiled on its first use in the process (NVRTC;
            no build step at install): the kernel reads up to MAX_SOURCES inputs once and writes
            the result into up to MAX_SOURCES outputs in the same pass, 16 bytes per thread
            and step where every pointer allows it. Copies are cudaMemcpyAsync.
    torch   the same fold with torch operations on the buffers viewed as tensors (one pass
            per source); used when cupy is not installed or sees no GPU.
Every call is queued on the stream given (a CUDA stream handle) and does not wait for it.
"""
from __future__ import annotations

import contextlib
import ctypes

import numpy as np

from comms.core import dtypes as dt
from comms.kernels.device_copy import RawDevice, torch_stream
from comms.core.dtypes import (AVG, BAND, BF16, BOOL, BOR, BXOR, F16, F32, F64, I8, I32, I64,
                               MAX, MIN, PROD, SUM, U8)

MAX_SOURCES = 16            # inputs (and outputs) one reduce call takes
THREADS = 256
MAX_BLOCKS = 8192

_chosen = None
_why_none = ""
_why_cupy = ""


# ---------------------------------------------------------------------------------- cupy
# per dtype: C storage type for the ops that compare signed values and for the rest
# (integer sum / product / bitwise ops wrap in the unsigned type, as the host kernels do)
_C_TYPES = {F16: ("u16", "u16"), BF16: ("u16", "u16"), F32: ("float", "float"),
            F64: ("double", "double"), I8: ("signed char", "unsigned char"),
            U8: ("unsigned char", "unsigned char"), I32: ("int", "unsigned int"),
            I64: ("long long", "unsigned long long"), BOOL: ("unsigned char", "unsigned char")}
_C_OPS = {SUM: "OP_SUM", PROD: "OP_PROD", MIN: "OP_MIN", MAX: "OP_MAX", BAND: "OP_BAND",
          BOR: "OP_BOR", BXOR: "OP_BXOR"}
_BOOL_OPS = {SUM: "OP_BOR", MAX: "OP_BOR", BOR: "OP_BOR", PROD: "OP_BAND", MIN: "OP_BAND",
             BAND: "OP_BAND", BXOR: "OP_BXOR"}

_PRELUDE = r"""
typedef unsigned long long u64;
typedef unsigned short u16;
__device__ __forceinline__ float h2f(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f2h(float f) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float b2f(u16 b) { return __uint_as_float(((unsigned)b) << 16); }
__device__ __forceinline__ u16 f2b(float f) {
    unsigned x = __float_as_uint(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (u16)((x >> 16) | 0x40u);
    return (u16)((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}
#define OP_SUM(a, b) ((a) + (b))
#define OP_PROD(a, b) ((a) * (b))
#define OP_MIN(a, b) ((((a) < (b)) || ((a) != (a))) ? (a) : (b))
#define OP_MAX(a, b) ((((a) > (b)) || ((a) != (a))) ? (a) : (b))
#define OP_BAND(a, b) ((a) & (b))
#define OP_BOR(a, b) ((a) | (b))
#define OP_BXOR(a, b) ((a) ^ (b))
"""

# NAME, S (storage), STEP(acc, x) -> acc, FIRST(x) -> acc, SCALE(acc, s) -> acc;
# do_scale: 0 none, 1 the result times scale, 2 each input times scale before the fold
_KERNEL = r"""
#define PRE(x) (do_scale == 2 ? SCALE((x), scale) : (x))
extern "C" __global__ void NAME(
    u64 i0, u64 i1, u64 i2, u64 i3, u64 i4, u64 i5, u64 i6, u64 i7,
    u64 i8, u64 i9, u64 i10, u64 i11, u64 i12, u64 i13, u64 i14, u64 i15, int k,
    u64 o0, u64 o1, u64 o2, u64 o3, u64 o4, u64 o5, u64 o6, u64 o7,
    u64 o8, u64 o9, u64 o10, u64 o11, u64 o12, u64 o13, u64 o14, u64 o15, int m,
    long long n, double scale, int do_scale, int vec)
{
    const S* in[16] = {(const S*)i0, (const S*)i1, (const S*)i2, (const S*)i3, (const S*)i4,
        (const S*)i5, (const S*)i6, (const S*)i7, (const S*)i8, (const S*)i9, (const S*)i10,
        (const S*)i11, (const S*)i12, (const S*)i13, (const S*)i14, (const S*)i15};
    S* out[16] = {(S*)o0, (S*)o1, (S*)o2, (S*)o3, (S*)o4, (S*)o5, (S*)o6, (S*)o7, (S*)o8,
        (S*)o9, (S*)o10, (S*)o11, (S*)o12, (S*)o13, (S*)o14, (S*)o15};
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if (vec) {
        const int V = 16 / sizeof(S);
        union Pack { uint4 v; S s[16 / sizeof(S)]; };
        const long long nv = n / V;
        for (long long j = tid; j < nv; j += stride) {
            Pack a, b;
            a.v = ((const uint4*)in[0])[j];
            #pragma unroll
            for (int e = 0; e < V; e++) a.s[e] = FIRST(PRE(a.s[e]));
            #pragma unroll
            for (int r = 1; r < 16; r++) {
                if (r < k) {
                    b.v = ((const uint4*)in[r])[j];
                    #pragma unroll
                    for (int e = 0; e < V; e++) a.s[e] = STEP(a.s[e], PRE(b.s[e]));
                }
            }
            if (do_scale == 1) {
                #pragma unroll
                for (int e = 0; e < V; e++) a.s[e] = SCALE(a.s[e], scale);
            }
            #pragma unroll
            for (int o = 0; o < 16; o++) if (o < m) ((uint4*)out[o])[j] = a.v;
        }
        done = nv * V;
    }
    for (long long j = done + tid; j < n; j += stride) {
        S acc = FIRST(PRE(in[0][j]));
        #pragma unroll
        for (int r = 1; r < 16; r++) if (r < k) acc = STEP(acc, PRE(in[r][j]));
        if (do_scale == 1) acc = SCALE(acc, scale);
        #pragma unroll
        for (int o = 0; o < 16; o++) if (o < m) out[o][j] = acc;
    }
}
"""


def kernel_name(dtype: int, op: int) -> str:
    return f"tc_reduce_{dt.DTYPE_NAMES[dtype]}_{dt.OP_NAMES[op]}"


def _kernel_source(dtype: int, op: int) -> str:
    signed, unsigned = _C_TYPES[dtype]
    s = signed if op in (MIN, MAX) else unsigned
    if dtype == BOOL:
        step = f"((S)({_BOOL_OPS[op]}((a), ((b) != 0))))"
        first, scale = "((S)((x) != 0))", "(a)"
    elif dtype == F16:
        step, first, scale = (f"f2h({_C_OPS[op]}(h2f(a), h2f(b)))", "(x)",
                              "f2h(h2f(a) * (float)(s))")
    elif dtype == BF16:
        step, first, scale = (f"f2b({_C_OPS[op]}(b2f(a), b2f(b)))", "(x)",
                              "f2b(b2f(a) * (float)(s))")
    elif dtype == F32:
        step, first, scale = f"{_C_OPS[op]}(a, b)", "(x)", "((a) * (float)(s))"
    elif dtype == F64:
        step, first, scale = f"{_C_OPS[op]}(a, b)", "(x)", "((a) * (s))"
    else:
        step, first, scale = f"((S)({_C_OPS[op]}(a, b)))", "(x)", "(a)"
    name = kernel_name(dtype, op)
    return (f"#define S {s}\n#define STEP(a, b) {step}\n#define FIRST(x) {first}\n"
            f"#define SCALE(a, s) {scale}\n" + _KERNEL.replace("NAME", name) +
            "#undef S\n#undef STEP\n#undef FIRST\n#undef SCALE\n#undef PRE\n")


def source(dtype: int | None = None, op: int | None = None) -> str:
    """The CUDA C of the reduce kernel for (dtype, op), or of every supported pair."""
    pairs = [(dtype, op)] if dtype is not None else \
        [(d, o) for d in dt.DTYPE_NAMES for o in _C_OPS if dt.op_supported(d, o)]
    return "\n".join([_PRELUDE] + [_kernel_source(d, o) for d, o in pairs])


def _blocks(units: int) -> int:
    return max(1, min(MAX_BLOCKS, -(-units // THREADS)))


def _check_call(outs, ins, count: int, dtype: int, op: int):
    if not 1 <= len(ins) <= MAX_SOURCES or not 1 <= len(outs) <= MAX_SOURCES:
        raise ValueError(f"reduce: 1 to {MAX_SOURCES} inputs and outputs, got "
                         f"{len(ins)} and {len(outs)}")
    if count < 0:
        raise ValueError("reduce: negative count")
    if op == AVG or not dt.op_supported(dtype, op):
        raise ValueError(f"op: {dt.OP_NAMES.get(op, op)!r} is not supported for "
                         f"{dt.DTYPE_NAMES.get(dtype, dtype)}")


class CupyKernels:
    name = "cupy"

    def __init__(self, cupy):
        self.cupy = cupy
        self._functions: dict = {}

    def _function(self, dtype: int, op: int):
        """The kernel for (dtype, op), compiled on its first use in this process (cupy
        also keeps the binary in its on-disk cache)."""
        fn = self._functions.get((dtype, op))
        if fn is None:
            # no fused multiply-add: the host kernels round the product and the sum apart
            module = self.cupy.RawModule(code=source(dtype, op),
                                         options=("--std=c++17", "--fmad=false"))
            fn = self._functions[(dtype, op)] = module.get_function(kernel_name(dtype, op))
        return fn

    def reduce(self, outs, ins, count, dtype, op, stream, device, scale=None, premul=False):
        """Every address in outs = the fold of the `count` elements at each address in ins
        (an output may be one of the inputs), then times `scale` when given (premul: each
        input times `scale` before the fold instead, as the host path averages float16)."""
        _check_call(outs, ins, count, dtype, op)
        if count == 0:
            return
        size = dt.DTYPE_SIZES[dtype]
        vec = int(all(a % 16 == 0 for a in list(ins) + list(outs)))
        units = count // (16 // size) if vec else count
        i = [np.uint64(a) for a in ins] + [np.uint64(0)] * (MAX_SOURCES - len(ins))
        o = [np.uint64(a) for a in outs] + [np.uint64(0)] * (MAX_SOURCES - len(outs))
        args = (*i, np.int32(len(ins)), *o, np.int32(len(outs)), np.int64(count),
                np.float64(scale if scale is not None else 1.0),
                np.int32(0 if scale is None else 2 if premul else 1), np.int32(vec))
        cp = self.cupy
        with cp.cuda.Device(device), cp.cuda.ExternalStream(int(stream)):
            self._function(dtype, op)((_blocks(max(units, 1)),), (THREADS,), args)

    def copy(self, dst, src, nbytes, stream, device):
        """nbytes from src to dst (device addresses, any device: unified addressing)."""
        if nbytes and dst != src:
            with self.cupy.cuda.Device(device):
                self.cupy.cuda.runtime.memcpyAsync(dst, src, nbytes, 4, int(stream))

    def current_stream(self, device) -> int:
        """The handle of the calling thread's current stream on `device` (cupy's)."""
        with self.cupy.cuda.Device(device):
            return self.cupy.cuda.get_current_stream().ptr

    def self_test(self) -> None:
        """One small reduce on the current device, checked: raises if the kernels cannot be
        compiled or give a wrong sum here."""
        cp = self.cupy
        a = cp.arange(37, dtype=cp.float32)
        b = cp.full(37, 0.5, dtype=cp.float32)
        out = cp.zeros(37, dtype=cp.float32)
        stream = cp.cuda.get_current_stream().ptr
        self.reduce([out.data.ptr], [a.data.ptr, b.data.ptr], 37, F32, SUM, stream,
                    cp.cuda.runtime.getDevice())
        cp.cuda.get_current_stream().synchronize()
        if not bool((out == a + b).all()):
            raise RuntimeError("the reduce kernel's check gave a wrong sum")

    def alloc(self, nbytes, device, stream):
        """(owner, address) of nbytes of device memory for work on `stream`, kept while the
        owner lives."""
        cp = self.cupy
        with cp.cuda.Device(device), cp.cuda.ExternalStream(int(stream)):
            mem = cp.cuda.alloc(nbytes)
        return mem, mem.ptr


# ---------------------------------------------------------------------------------- torch
class TorchKernels:
    """The same results with torch operations. device_type "cuda" (addresses in device
    memory, work queued on the given stream) or "cpu" (host addresses, the stream ignored:
    how the fold is checked without a GPU)."""

    name = "torch"

    def __init__(self, torch, device_type: str = "cuda"):
        self.torch, self.device_type = torch, device_type
        t = torch
        self._dtypes = {F16: t.float16, BF16: t.bfloat16, F32: t.float32, F64: t.float64,
                        I8: t.int8, U8: t.uint8, I32: t.int32, I64: t.int64, BOOL: t.uint8}

    def _bytes(self, addr: int, nbytes: int, device):
        torch = self.torch
        if self.device_type == "cpu":
            raw = (ctypes.c_char * nbytes).from_address(addr)
            return torch.from_numpy(np.frombuffer(raw, np.uint8))
        return torch.as_tensor(RawDevice(addr, nbytes), device=torch.device("cuda", device))

    def _view(self, addr: int, count: int, dtype: int, device):
        return self._bytes(addr, count * dt.DTYPE_SIZES[dtype], device).view(
            self._dtypes[dtype])

    def _on(self, stream, device):
        torch = self.torch
        if self.device_type == "cpu":
            return contextlib.nullcontext()
        return torch.cuda.stream(torch_stream(torch, int(stream), torch.device("cuda", device)))

    def _step(self, acc, x, dtype, op):
        torch = self.torch
        if dtype == BOOL:
            f = {SUM: torch.bitwise_or, MAX: torch.bitwise_or, BOR: torch.bitwise_or,
                 PROD: torch.bitwise_and, MIN: torch.bitwise_and, BAND: torch.bitwise_and,
                 BXOR: torch.bitwise_xor}[op]
            return f(acc, (x != 0).to(torch.uint8))
        if op == SUM:
            return acc + x
        if op == PROD:
            return acc * x
        if op in (MIN, MAX):
            if dtype in dt.FLOAT_DTYPES:
                keep = (acc < x if op == MIN else acc > x) | torch.isnan(acc)
                return torch.where(keep, acc, x)
            return torch.minimum(acc, x) if op == MIN else torch.maximum(acc, x)
        return {BAND: torch.bitwise_and, BOR: torch.bitwise_or,
                BXOR: torch.bitwise_xor}[op](acc, x)

    @staticmethod
    def _scaled(x, dtype, scale):
        if dtype in (F16, BF16):
            return (x.float() * float(np.float32(scale))).to(x.dtype)
        if dtype == F32:
            return x * float(np.float32(scale))
        if dtype == F64:
            return x * float(scale)
        return x

    def reduce(self, outs, ins, count, dtype, op, stream, device, scale=None, premul=False):
        _check_call(outs, ins, count, dtype, op)
        if count == 0:
            return
        torch = self.torch
        with self._on(stream, device):
            views = [self._view(a, count, dtype, device) for a in ins]
            if scale is not None and premul:
                views = [self._scaled(v, dtype, scale) for v in views]
            acc = (views[0] != 0).to(torch.uint8) if dtype == BOOL else views[0].clone()
            for x in views[1:]:
                acc = self._step(acc, x, dtype, op)
            if scale is not None and not premul:
                acc = self._scaled(acc, dtype, scale)
            for a in outs:
                self._view(a, count, dtype, device).copy_(acc)

    def copy(self, dst, src, nbytes, stream, device):
        if nbytes and dst != src:
            with self._on(stream, device):
                self._bytes(dst, nbytes, device).copy_(self._bytes(src, nbytes, device))

    def current_stream(self, device) -> int:
        if self.device_type == "cpu":
            return 0
        return self.torch.cuda.current_stream(self.torch.device("cuda", device)).cuda_stream

    def alloc(self, nbytes, device, stream):
        torch = self.torch
        where = "cpu" if self.device_type == "cpu" else torch.device("cuda", device)
        with self._on(stream, device):      # the caching allocator's pool of that stream
            t = torch.empty(nbytes, dtype=torch.uint8, device=where)
        return t, t.data_ptr()


def kernels():
    """This process's device kernels (chosen on first call): cupy where it reaches a GPU and
    its kernels pass a check there, else torch where it reaches one; None when neither does
    (unavailable() says why; passed_over() why cupy's were not taken)."""
    global _chosen, _why_none, _why_cupy
    if _chosen is not None or _why_none:
        return _chosen
    why = []
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            k = CupyKernels(cupy)
            try:
                k.self_test()
            except Exception as exc:  # noqa: BLE001 - NVRTC and CUDA raise their own errors
                why.append(f"cupy's kernels failed their check ({type(exc).__name__}: {exc})")
            else:
                _chosen = k
                return _chosen
        else:
            why.append("cupy sees no GPU")
    except ImportError:
        why.append("cupy is not installed")
    except Exception as exc:  # noqa: BLE001 - cupy raises its own CUDA errors without a GPU
        why.append(f"cupy cannot reach a GPU ({type(exc).__name__}: {exc})")
    _why_cupy = "; ".join(why)
    try:
        import torch
        if torch.cuda.is_available():
            _chosen = TorchKernels(torch)
            return _chosen
        why.append("torch sees no GPU")
    except ImportError:
        why.append("torch is not installed")
    _why_none = "; ".join(why)
    return None


def passed_over() -> str:
    """Why cupy's kernels are not the ones in use ("" when they are, or none is)."""
    k = kernels()
    return _why_cupy if k is not None and k.name != "cupy" else ""


def unavailable() -> str:
    """Why no kernels run on device memory here ("" when they do)."""
    return "" if kernels() is not None else _why_none
