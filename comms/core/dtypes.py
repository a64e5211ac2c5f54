"""dtype and op codes shared with the C helpers (native/include/topocomm.h)."""
from __future__ import annotations

import numpy as np

F16, BF16, F32, F64, I8, U8, I32, I64, BOOL = range(9)
SUM, PROD, MIN, MAX, BAND, BOR, BXOR = range(7)
AVG = 100  # not a C op: SUM then scale by 1/world_size (float dtypes only)

DTYPE_NAMES = {F16: "float16", BF16: "bfloat16", F32: "float32", F64: "float64", I8: "int8",
               U8: "uint8", I32: "int32", I64: "int64", BOOL: "bool"}
DTYPE_SIZES = {F16: 2, BF16: 2, F32: 4, F64: 8, I8: 1, U8: 1, I32: 4, I64: 8, BOOL: 1}
FLOAT_DTYPES = {F16, BF16, F32, F64}
OP_NAMES = {SUM: "sum", PROD: "prod", MIN: "min", MAX: "max", BAND: "band", BOR: "bor",
            BXOR: "bxor", AVG: "avg"}
OP_CODES = {name: code for code, name in OP_NAMES.items()}
OP_CODES.update({"product": PROD, "avg": AVG, "mean": AVG})

_NP_TO_CODE = {np.dtype(np.float16): F16, np.dtype(np.float32): F32, np.dtype(np.float64): F64,
               np.dtype(np.int8): I8, np.dtype(np.uint8): U8, np.dtype(np.int32): I32,
               np.dtype(np.int64): I64, np.dtype(np.bool_): BOOL}


def code_of_numpy(dtype) -> int | None:
    return _NP_TO_CODE.get(np.dtype(dtype))


def op_code(op) -> int:
    """Accept 'sum', a code, or anything with a name (torch ReduceOp, mpi4py Op)."""
    if isinstance(op, int) and (op in OP_NAMES):
        return op
    name = op if isinstance(op, str) else getattr(op, "name", None)
    if name is None:
        name = str(op).rsplit(".", 1)[-1]
    code = OP_CODES.get(str(name).lower())
    if code is None:
        raise ValueError(f"op: unsupported reduction {op!r}; expected one of "
                         f"{sorted(set(OP_NAMES.values()))}")
    return code


def op_supported(dtype: int, op: int) -> bool:
    if op not in OP_NAMES:
        return False
    if op in (BAND, BOR, BXOR):
        return dtype not in FLOAT_DTYPES
    if op == AVG:
        return dtype in FLOAT_DTYPES
    return True
