"""Result checks: the datatypes (which integers each holds exactly), the helpers the
collective specs build their inputs and closed-form expected values from (value_range,
periodic), and #wrong: the check iteration after the timed loop (check_once) and the count of
elements that differ from the expected values (count_wrong)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from harness import CollSpec


@dataclass(frozen=True)
class DType:
    name: str          # nccl-tests column name
    torch_name: str    # attribute of torch
    np_name: str | None  # numpy dtype name; None when numpy has none (bfloat16)
    itemsize: int
    exact_limit: int   # largest integer all values up to which are exact in this type
    is_float: bool

    @property
    def gen_np(self):
        """numpy dtype used to generate values (float32 stands in for bfloat16)."""
        return np.dtype(self.np_name or "float32")


DTYPES = {
    "float": DType("float", "float32", "float32", 4, 1 << 24, True),
    "half": DType("half", "float16", "float16", 2, 2048, True),
    "bfloat16": DType("bfloat16", "bfloat16", None, 2, 256, True),
    "double": DType("double", "float64", "float64", 8, 1 << 53, True),
    "int32": DType("int32", "int32", "int32", 4, (1 << 31) - 1, False),
    "int64": DType("int64", "int64", "int64", 8, (1 << 63) - 1, False),
    "int8": DType("int8", "int8", "int8", 1, 127, False),
    "uint8": DType("uint8", "uint8", "uint8", 1, 255, False),
}


def count_wrong(result: np.ndarray, expected: np.ndarray, dt: DType, op: str) -> int:
    """Elements of `result` that differ from `expected` (exact, except avg on floats)."""
    result = np.asarray(result).reshape(-1)
    expected = np.asarray(expected).reshape(-1)
    if result.size != expected.size:
        return max(result.size, expected.size)
    if op == "avg" and dt.is_float:
        rtol = {"half": 2e-3, "bfloat16": 1e-2, "float": 1e-6, "double": 1e-12}[dt.name]
        ok = np.isclose(result.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=0)
        return int(result.size - np.count_nonzero(ok))
    return int(np.count_nonzero(result != expected))


def value_range(dt: DType, nranks: int, op: str) -> int:
    """Inputs are 1..m so that reducing nranks of them stays exact in dt."""
    limit = min(dt.exact_limit, 1 << 16)
    if op in ("sum", "avg"):
        return max(1, limit // max(nranks, 1))
    return limit


def periodic(period_values: np.ndarray, shift: int, count: int) -> np.ndarray:
    """v[k] = period_values[(k + shift) % len(period_values)] for k < count (vectorized)."""
    base = np.roll(period_values, -(shift % len(period_values)))
    return np.resize(base, count) if count else base[:0].copy()


def check_once(be, spec: CollSpec, send, recv, op, in_place, inputs, expected, dt) -> int:
    be.fill(send, inputs)
    if recv is not None:
        be.zero(recv)       # every expected value is >= 1, so a skipped element counts
    be.barrier()
    spec.run(be, send, recv, op, in_place)
    result = be.to_numpy(send if in_place else recv)
    wrong = count_wrong(result, expected, dt, op)
    return int(round(be.reduce_scalar(float(wrong), "sum")))
