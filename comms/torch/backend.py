"""The torch.distributed seam: backend "topocomm" as a Python ProcessGroup over a Communicator.

This is the only module that touches torch's private distributed APIs (the ProcessGroup
trampoline, ``Backend._plugins``, the extended creator options). Everything else in topocomm
is framework-free.

    import comms                                   # calls register()
    dist.init_process_group("topocomm", rank=r, world_size=n, store=...)
    sub = dist.new_group([0, 1], backend="topocomm")

How a call runs (the costs quoted were measured with torch 2.13 on the 2-vCPU CI machine kind):

- A group owns one Communicator and runs its operations strictly in the order they were
  issued, which is the same on every rank. Small operations (< INLINE_MAX_BYTES), and blocking
  ones (``async_op=False``), run inline on the caller's thread when nothing is queued and come
  back as an already completed Work: handing off to a thread costs tens of microseconds and
  fights for the GIL. Everything else goes to the group's progress thread (a daemon, started on
  first use, stopped by ``destroy_process_group``), so DDP can overlap large buckets with the
  backward pass.
- C++ callers (DDP's reducer, functional collectives) reach only the method names torch's
  trampoline knows, and those names moved between torch versions, so each collective is
  defined under every spelling (``_allgather_base`` / ``all_gather_single`` /
  ``all_gather_into_tensor``, ...).
- Works are ``dist.Work`` subclasses: ``wait()`` re-raises the operation's error (a Work made
  from a future does not), ``get_future()`` yields the list of output tensors (what DDP's
  reducer reads back).
- Tensors go to the Communicator as they are (CPU torch tensors, bfloat16 included). A
  non-contiguous tensor is replaced by a contiguous copy and the result copied back.
"""
from __future__ import annotations

import collections
import functools
import sys
import threading
import weakref

try:  # torch is optional: without it register() is a no-op and nothing below is defined
    import torch
    import torch.distributed as dist

    _HAVE_DIST = bool(dist.is_available())
except ImportError:  # pragma: no cover - exercised only without torch
    torch = None
    dist = None
    _HAVE_DIST = False

BACKEND_NAME = "topocomm"
# Devices handed to register_backend (torch's default-device map); "cuda" joins once the
# plan has algorithms for CUDA buffers.
DEVICES: tuple = ("cpu",)
# Devices whose tensors the seam hands to the Communicator. torch sends this group every
# device's tensors (a Python ProcessGroup serves them all), so CUDA tensors come here even
# though "cuda" is not registered yet: the Communicator's plan says which collectives
# have an algorithm for them (comms/plan/select.py check_memory), on every rank alike.
MEMORY_DEVICES: tuple = ("cpu", "cuda")
# Operations whose payload is below this run on the caller's thread when nothing is queued.
INLINE_MAX_BYTES = 256 << 10
# How long shutdown waits for queued work beyond the Communicator's own timeout.
_SHUTDOWN_GRACE_S = 5.0

__all__ = ["BACKEND_NAME", "DEVICES", "INLINE_MAX_BYTES", "register", "is_registered"]


def is_registered() -> bool:
    return _HAVE_DIST and BACKEND_NAME.upper() in getattr(dist.Backend, "_plugins", {})


def register() -> bool:
    """Register backend "topocomm" with torch.distributed; idempotent. False without torch."""
    if not _HAVE_DIST:
        return False
    if is_registered():
        return True
    import inspect

    params = inspect.signature(dist.Backend.register_backend).parameters
    kwargs = {}
    if "devices" in params:
        kwargs["devices"] = list(DEVICES)
    if "extended_api" in params:
        kwargs["extended_api"] = True
    dist.Backend.register_backend(BACKEND_NAME, _create, **kwargs)
    return True


def _communicator_class():
    pkg = sys.modules.get("comms")  # the package attribute: tests put a stub there
    cls = getattr(pkg, "Communicator", None)
    if cls is None:
        from comms.api.communicator import Communicator as cls
    return cls


_classic_groups = iter(range(1 << 62))


def _create(*args):
    """Backend creator. Extended API: (DistributedBackendOptions, pg_options); classic API:
    (store, rank, size, timeout). The store is already prefixed with the group's name."""
    if len(args) == 2:
        opts, _pg_options = args
        store, rank, size, timeout = opts.store, opts.group_rank, opts.group_size, opts.timeout
        name = str(opts.group_id)
    else:
        store, rank, size, timeout = args
        name = f"classic{next(_classic_groups)}"
    timeout_s = timeout.total_seconds() if hasattr(timeout, "total_seconds") else float(timeout)
    comm = _communicator_class()(rank, size, store, timeout=timeout_s, name=name)
    return ProcessGroupTopocomm(comm, rank, size, name=name, timeout_s=timeout_s)


if _HAVE_DIST:
    _RedOpType = dist.ReduceOp.RedOpType
    _SUM = dist.ReduceOp.SUM
    # keyed by the enum's int value: hashing the pybind enum itself costs ~1 us
    _OP_NAMES = {getattr(_RedOpType, torch_name).value: name for torch_name, name in (
        ("SUM", "sum"), ("AVG", "avg"), ("PRODUCT", "prod"), ("MIN", "min"), ("MAX", "max"),
        ("BAND", "band"), ("BOR", "bor"), ("BXOR", "bxor"))}

    class _BadValue(ValueError):
        """An argument the torch seam refused. Raised on this rank only, so the method takes
        part in its collective flagged first (ProcessGroupTopocomm._reject_everywhere): every
        rank raises, no data moves, and the group stays usable."""

    class _BadType(TypeError):
        """A TypeError the torch seam raised for an argument (see _BadValue)."""

    # users see (and catch) plain ValueError / TypeError; the subclasses only route the error
    for _cls, _base in ((_BadValue, ValueError), (_BadType, TypeError)):
        _cls.__name__ = _cls.__qualname__ = _base.__name__
        _cls.__module__ = "builtins"
        # pickled (multiprocessing, futures) as the builtin they are shown as
        _cls.__reduce__ = (lambda base: lambda self: (base, self.args))(_base)

    def _op_name(opts) -> str:
        """Communicator op string for options carrying reduceOp (or a bare ReduceOp)."""
        op = getattr(opts, "reduceOp", opts)
        if op == _SUM:
            return "sum"
        code = getattr(op, "op", op)  # ReduceOp -> RedOpType
        name = _OP_NAMES.get(getattr(code, "value", code))
        if name is None:
            raise _BadValue(f"op: {getattr(code, 'name', op)} is not supported by the "
                            f"topocomm backend (PREMUL_SUM is NCCL-only); use one of "
                            f"SUM, AVG, PRODUCT, MIN, MAX, BAND, BOR, BXOR")
        return name

    class TopocommWork(dist.Work):
        """A topocomm operation's handle: completed (ran inline) or queued.

        ``wait()`` blocks until the operation finished and re-raises its error;
        ``get_future()`` completes with the list of output tensors.
        """

        def __init__(self, result, pending=None):
            super().__init__()
            self._result = result
            self._pending = pending

        def wait(self, timeout=None):
            p = self._pending
            if p is None:
                return True
            seconds = timeout.total_seconds() if timeout is not None else 0.0
            if seconds > 0:
                if not p.done.wait(seconds):
                    raise RuntimeError(f"topocomm: operation {p.what} did not finish within "
                                       f"{seconds:.3f} s")
            else:
                p.done.wait()
            if p.error is not None:
                raise p.error
            return True

        def is_completed(self):
            p = self._pending
            return p is None or p.done.is_set()

        def is_success(self):
            p = self._pending
            return p is None or (p.done.is_set() and p.error is None)

        def exception(self):
            p = self._pending
            return None if p is None else p.error

        def result(self):
            self.wait()
            return self._result

        def synchronize(self):
            pass

        def source_rank(self):
            raise NotImplementedError("topocomm: recv from any source is not supported")

        def get_future(self):
            p = self._pending
            if p is None:
                fut = torch.futures.Future()
                fut.set_result(self._result)
                return fut
            return p.future

    # What a blocking dist.* call gets back: torch waits on it and drops it, so one shared
    # completed Work saves building a new one (~2 us) per call.
    _DONE = TopocommWork([])
    _Tensor = torch.Tensor

    class _Pending:
        __slots__ = ("fn", "result", "what", "done", "error", "future")

        def __init__(self, fn, result, what):
            self.fn, self.result, self.what = fn, result, what
            self.done = threading.Event()
            self.error = None
            self.future = torch.futures.Future()

        def execute(self):
            try:
                self.fn()
            except BaseException as exc:  # handed to wait()/the future, never lost
                self.error = exc
            self.fn = None

        def complete(self):
            # the future first: whoever wait() releases may read it at once. Its callbacks
            # (DDP comm hooks) run here, on the progress thread.
            if self.error is None:
                self.future.set_result(self.result)
            else:
                self.future.set_exception(self.error)
            self.done.set()

    class _OrderedRunner:
        """Runs a group's operations one at a time in issue order: inline when idle and
        allowed, else on one daemon progress thread. Holds no reference to the group."""

        def __init__(self, name):
            self.name = name
            self._cv = threading.Condition(threading.Lock())
            self._queue = collections.deque()
            self.num_queued = 0          # queued or running on the thread; read without lock
            self.exec_lock = threading.Lock()  # one operation at a time, whichever thread runs it
            self._thread = None
            self.closed = False

        def submit(self, fn, result, inline_ok, what):
            if not self.num_queued and inline_ok:
                if self.closed:
                    raise RuntimeError(f"topocomm: process group {self.name!r} was shut down")
                with self.exec_lock:
                    fn()
                return None
            pending = _Pending(fn, result, what)
            with self._cv:
                if self.closed:
                    raise RuntimeError(f"topocomm: process group {self.name!r} was shut down")
                self.num_queued += 1
                self._queue.append(pending)
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._loop, name=f"topocomm-progress-{self.name}", daemon=True)
                    self._thread.start()
                self._cv.notify()
            if threading.current_thread() is self._thread:
                # Issued from a future callback on the progress thread, whose caller may block
                # on the result (PowerSGD waits inside its callbacks): nothing else would run
                # the queue meanwhile, so run it here, in order, up to this operation.
                while not pending.done.is_set() and self._run_next():
                    pass
            return pending

        def _run_next(self):
            with self._cv:
                if not self._queue:
                    return False
                pending = self._queue.popleft()
            with self.exec_lock:
                pending.execute()
            pending.complete()
            with self._cv:  # counted until its callbacks ran: later calls queue behind them
                self.num_queued -= 1
            return True

        def _loop(self):
            while True:
                with self._cv:
                    while not self._queue and not self.closed:
                        self._cv.wait()
                    if not self._queue:
                        return
                self._run_next()

        def close(self, join_timeout_s):
            """Let queued operations finish (peers expect them), then stop the thread."""
            with self._cv:
                self.closed = True
                self._cv.notify_all()
                thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(join_timeout_s)
                return not thread.is_alive()
            return True

        def join(self, timeout_s):
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout_s)

    def _shutdown(runners, comm, join_timeout_s):
        finished = [runner.close(join_timeout_s) for runner in runners]
        try:
            comm.close()
        finally:
            for runner, done in zip(runners, finished):
                if not done:  # closing the Communicator fails whatever op was stuck
                    runner.join(_SHUTDOWN_GRACE_S)

    _has_overlap = getattr(torch, "_debug_has_internal_overlap", None)

    def _overlaps(tensor):
        """Elements sharing memory (an expand()ed or as_strided view): no place for a result."""
        if _has_overlap is not None:
            return _has_overlap(tensor) == 1
        return any(st == 0 and n > 1 for st, n in zip(tensor.stride(), tensor.shape))

    def _check(tensor, arg, out=False):
        """out: the tensor receives a result (checked for elements that share memory)."""
        if not isinstance(tensor, torch.Tensor):
            raise _BadType(f"{arg}: expected a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_cpu and tensor.device.type not in MEMORY_DEVICES:  # .device: 0.5 us
            raise _BadValue(f"{arg}: tensor is on {tensor.device}; the topocomm backend "
                             f"takes {', '.join(MEMORY_DEVICES)} tensors")
        if out and not tensor.is_contiguous() and _overlaps(tensor):
            raise _BadValue(f"{arg}: its elements share memory (an expand()ed or as_strided "
                             "view), so it cannot receive a result; pass a tensor that owns "
                             "its elements (.clone())")
        return tensor

    def _one(tensors, arg, out=False):
        if isinstance(tensors, torch.Tensor):
            return _check(tensors, arg, out)
        if len(tensors) != 1:
            raise _BadValue(f"{arg}: expected exactly one tensor per process, "
                             f"got {len(tensors)}")
        return _check(tensors[0], arg, out)

    def _write_back(dst, src):
        """dst.copy_(src) as a backend writes a result: outside autograd (into a view of a
        leaf that requires grad, as gloo does) and into inference tensors."""
        if dst.is_inference():
            with torch.inference_mode():
                dst.copy_(src)
        else:
            with torch.no_grad():
                dst.copy_(src)

    def _as_bytes(dense):
        """A contiguous tensor's memory as uint8 (a view: writes land in the tensor)."""
        return dense.reshape(-1).view(torch.uint8)

    def _complex_ok(tensor, op, arg, out=False):
        """A complex tensor in a reduction (torch's all_reduce turns it into its real view
        before a backend sees it; reduce and reduce_scatter do not): SUM and AVG act on the
        real and imaginary parts alone (_as_real, when the operation runs); other ops are
        not defined, and a conjugate view cannot receive a result."""
        if not tensor.is_complex():
            return
        if op not in ("sum", "avg"):
            raise _BadValue(f"op: {op} is not defined on complex tensors ({arg})")
        if out and tensor.is_conj():
            raise _BadValue(f"{arg}: a conjugate view cannot receive a result; pass "
                             f"{arg}.resolve_conj()")

    def _as_real(tensor):
        """The real view of a complex tensor (a conjugate one resolved now, when the
        operation runs, like every copy of an input); others as they are."""
        return torch.view_as_real(tensor.resolve_conj()) if tensor.is_complex() else tensor

    def _into(tensor, run, write_back=True):
        """run(t) on the tensor itself when it is dense, else on a dense copy and (write_back)
        the result copied back into it. Called inside the work function, when the operation
        runs: a copy made when it is issued would miss what work queued before it writes
        (and copy stale data back)."""
        if tensor.is_contiguous():
            run(tensor)
            return
        dense = tensor.contiguous()
        run(dense)
        if write_back:
            _write_back(tensor, dense)

    def _nbytes(tensor):
        return tensor.nbytes

    def _flat_cat(tensors, dtype):
        if not tensors:
            return torch.empty(0, dtype=dtype)
        return torch.cat([t.reshape(-1) for t in tensors])

    def _copy_out(flat, outs):
        offset = 0
        for out in outs:
            n = out.numel()
            _write_back(out, flat[offset:offset + n].view(out.shape))
            offset += n

    def _same_dtype(tensors, dtype, arg, out=False):
        for i, t in enumerate(tensors):
            _check(t, f"{arg}[{i}]", out)
            if t.dtype != dtype:
                raise _BadType(f"{arg}[{i}]: dtype {t.dtype} differs from {dtype}")

    class ProcessGroupTopocomm(dist.ProcessGroup):
        """torch ProcessGroup whose collectives run on a topocomm Communicator."""

        def __init__(self, comm, rank, size, name="world", timeout_s=300.0):
            super().__init__(rank, size)
            self._comm = comm
            self._world_size = comm.size  # self.size() goes through torch's C++ (~3 us)
            self._name = name
            self._desc = name
            self._timeout_s = float(timeout_s)
            self._runner = _OrderedRunner(name)
            # send and recv progress on their own threads, each in issue order: a send
            # waits for its receiver, so a rank blocked in a send must still receive
            # (isend/irecv rings, batch_isend_irecv); they use their own mailboxes and sockets
            self._send_runner = _OrderedRunner(f"{name}-send")
            self._recv_runner = _OrderedRunner(f"{name}-recv")
            self._finalizer = weakref.finalize(
                self, _shutdown, (self._runner, self._send_runner, self._recv_runner), comm,
                self._timeout_s + _SHUTDOWN_GRACE_S)

        @property
        def communicator(self):
            return self._comm

        # ---- identity -------------------------------------------------------------------
        def getBackendName(self):
            return BACKEND_NAME

        def name(self):
            return BACKEND_NAME

        def getGroupName(self):
            return self._name

        def setGroupName(self, name):
            self._name = name

        def _set_group_name(self, name):
            self._name = name

        @property
        def group_name(self):
            return self._name

        def getGroupDesc(self):
            return self._desc

        def setGroupDesc(self, desc):
            self._desc = desc

        def _set_group_desc(self, desc):
            self._desc = desc

        @property
        def group_desc(self):
            return self._desc

        # ---- lifetime -------------------------------------------------------------------
        def shutdown(self):
            """Finish queued work, stop the progress thread, close the Communicator."""
            self._finalizer()

        def abort(self):
            self._finalizer()

        # ---- plumbing -------------------------------------------------------------------
        def _submit(self, fn, result, nbytes, opts, what):
            """Run fn in group order; a Work whose future yields `result` (list of tensors)."""
            is_async = opts is None or getattr(opts, "asyncOp", True)
            pending = self._runner.submit(fn, result, nbytes < INLINE_MAX_BYTES or not is_async,
                                          what)
            if pending is None:
                return TopocommWork(result) if is_async else _DONE
            return TopocommWork(result, pending)

        # ---- all-reduce -----------------------------------------------------------------
        def allreduce(self, tensors, opts=None):
            try:
                tensor = _one(tensors, "tensors", out=True)
                op = "sum" if opts is None else _op_name(opts)
            except (_BadValue, _BadType):
                self._reject_everywhere("allreduce")
                raise
            comm = self._comm
            runner = self._runner
            if tensor.is_contiguous():
                is_async = opts is None or getattr(opts, "asyncOp", True)
                if not runner.num_queued and (not is_async or tensor.nbytes < INLINE_MAX_BYTES) \
                        and not runner.closed:
                    # the small-message hot path: what _submit does, minus a closure and a call
                    with runner.exec_lock:
                        comm.allreduce(tensor, op)
                    return TopocommWork([tensor]) if is_async else _DONE

                def fn():
                    comm.allreduce(tensor, op)
            else:
                def fn():
                    _into(tensor, lambda dense: comm.allreduce(dense, op))
            return self._submit(fn, [tensor], _nbytes(tensor), opts, "allreduce")

        def allreduce_coalesced(self, tensors, opts=None):
            tensors = list(tensors)
            op = "sum" if opts is None else _op_name(opts)
            by_dtype = collections.defaultdict(list)
            for i, t in enumerate(tensors):
                by_dtype[_check(t, f"tensors[{i}]").dtype].append(t)
            groups = sorted(by_dtype.items(), key=lambda kv: str(kv[0]))  # same order on all ranks
            comm = self._comm

            def fn():
                for dtype, ts in groups:
                    flat = _flat_cat(ts, dtype)
                    comm.allreduce(flat, op)
                    _copy_out(flat, ts)
            return self._submit(fn, tensors, sum(map(_nbytes, tensors)), opts,
                                "allreduce_coalesced")

        # ---- broadcast / reduce ---------------------------------------------------------
        def broadcast(self, tensors, opts=None):
            root = 0 if opts is None else opts.rootRank
            receives = self.rank() != root   # the root's tensor is only read
            tensor = _one(tensors, "tensors", out=receives)
            comm = self._comm

            def fn():
                _into(tensor, lambda dense: comm.broadcast(dense, root), receives)
            return self._submit(fn, [tensor], _nbytes(tensor), opts, "broadcast")

        def reduce(self, tensors, opts=None):
            root = 0 if opts is None else opts.rootRank
            receives = self.rank() == root   # the others' tensors are only read
            tensor = _one(tensors, "tensors", out=receives)
            op = "sum" if opts is None else _op_name(opts)
            _complex_ok(tensor, op, "tensors", out=receives)
            comm = self._comm

            def fn():
                _into(_as_real(tensor), lambda dense: comm.reduce(dense, root, op), receives)
            return self._submit(fn, [tensor], _nbytes(tensor), opts, "reduce")

        # ---- all-gather -----------------------------------------------------------------
        def allgather(self, output_tensors, input_tensors, opts=None):
            tensor = _one(input_tensors, "input_tensors")
            if len(output_tensors) != 1:
                raise _BadValue("output_tensors: expected one list of tensors per process")
            outs = list(output_tensors[0])
            size = self._world_size
            if len(outs) != size:
                raise _BadValue(f"output_tensors: expected {size} tensors, got {len(outs)}")
            _same_dtype(outs, tensor.dtype, "output_tensors[0]", out=True)
            for i, out in enumerate(outs):
                if out.numel() != tensor.numel():
                    raise _BadValue(f"output_tensors[0][{i}]: {out.numel()} elements, "
                                     f"input has {tensor.numel()}")
            comm = self._comm

            def fn():
                dense = tensor.contiguous()
                recv = torch.empty(size * dense.numel(), dtype=dense.dtype)
                comm.allgather(dense, recv)
                _copy_out(recv, outs)
            return self._submit(fn, outs, size * _nbytes(tensor), opts, "allgather")

        def allgather_coalesced(self, output_lists, input_list, opts=None):
            """output_lists[rank][i] receives input_list[i] of that rank."""
            output_lists, input_list = [list(o) for o in output_lists], list(input_list)
            size = self._world_size
            if len(output_lists) != size:
                raise _BadValue(f"output_lists: expected {size} lists (one per rank), "
                                 f"got {len(output_lists)}")
            for i, inp in enumerate(input_list):
                _check(inp, f"input_list[{i}]")
            for r, outs in enumerate(output_lists):
                if len(outs) != len(input_list):
                    raise _BadValue(f"output_lists[{r}]: {len(outs)} tensors for "
                                     f"{len(input_list)} inputs")
                for i, (out, inp) in enumerate(zip(outs, input_list)):
                    _check(out, f"output_lists[{r}][{i}]", out=True)
                    if out.dtype != inp.dtype or out.numel() != inp.numel():
                        raise _BadValue(f"output_lists[{r}][{i}]: {out.dtype} x {out.numel()} "
                                         f"does not match input_list[{i}] "
                                         f"({inp.dtype} x {inp.numel()})")
            comm = self._comm

            def fn():
                for i, inp in enumerate(input_list):
                    inp = inp.contiguous()
                    recv = torch.empty(size * inp.numel(), dtype=inp.dtype)
                    comm.allgather(inp, recv)
                    _copy_out(recv, [outs[i] for outs in output_lists])
            flat_outs = [t for outs in output_lists for t in outs]
            return self._submit(fn, flat_outs, sum(map(_nbytes, flat_outs)), opts,
                                "allgather_coalesced")

        def all_gather_single(self, output, input, opts=None):
            self._check_gather(output, input, "output", "input")
            _check(output, "output", out=True)
            comm = self._comm

            def fn():
                _into(output, lambda out: comm.allgather(input.contiguous(), out))
            return self._submit(fn, [output], _nbytes(output), opts, "all_gather_into_tensor")

        _allgather_base = all_gather_single
        all_gather_into_tensor = all_gather_single

        def all_gather_single_coalesced(self, outputs, inputs, opts=None):
            outputs, inputs = list(outputs), list(inputs)
            if len(outputs) != len(inputs):
                raise _BadValue(f"outputs: {len(outputs)} tensors for {len(inputs)} inputs")
            pairs = []
            for i, (out, inp) in enumerate(zip(outputs, inputs)):
                self._check_gather(out, inp, f"outputs[{i}]", f"inputs[{i}]")
                _check(out, f"outputs[{i}]", out=True)
                pairs.append((out, inp))
            comm = self._comm

            def fn():
                for out, inp in pairs:
                    _into(out, lambda dense: comm.allgather(inp.contiguous(), dense))
            return self._submit(fn, outputs, sum(map(_nbytes, outputs)), opts,
                                "all_gather_into_tensor_coalesced")

        allgather_into_tensor_coalesced = all_gather_single_coalesced

        def _check_gather(self, output, input, out_arg, in_arg):
            _check(output, out_arg)
            _check(input, in_arg)
            if output.dtype != input.dtype:
                raise _BadType(f"{out_arg}: dtype {output.dtype} differs from {in_arg} "
                                f"dtype {input.dtype}")
            if output.numel() != self._world_size * input.numel():
                raise _BadValue(f"{out_arg}: {output.numel()} elements, expected world size "
                                 f"{self._world_size} x {input.numel()}")

        # ---- reduce-scatter -------------------------------------------------------------
        def reduce_scatter(self, output_tensors, input_tensors, opts=None):
            out = _one(output_tensors, "output_tensors", out=True)
            if len(input_tensors) != 1:
                raise _BadValue("input_tensors: expected one list of tensors per process")
            ins = list(input_tensors[0])
            size = self._world_size
            if len(ins) != size:
                raise _BadValue(f"input_tensors: expected {size} tensors, got {len(ins)}")
            _same_dtype(ins, out.dtype, "input_tensors[0]")
            for i, t in enumerate(ins):
                if t.numel() != out.numel():
                    raise _BadValue(f"input_tensors[0][{i}]: {t.numel()} elements, "
                                     f"output has {out.numel()}")
            op = "sum" if opts is None else _op_name(opts)
            _complex_ok(out, op, "output_tensors", out=True)
            comm = self._comm

            def fn():
                real = _as_real(out)
                _into(real, lambda dense: comm.reduce_scatter(
                    _flat_cat([_as_real(t) for t in ins], real.dtype), dense, op))
            return self._submit(fn, [out], size * _nbytes(out), opts, "reduce_scatter")

        def reduce_scatter_single(self, output, input, opts=None):
            self._check_gather(input, output, "input", "output")
            _check(output, "output", out=True)
            op = "sum" if opts is None else _op_name(opts)
            _complex_ok(output, op, "output", out=True)
            comm = self._comm

            def fn():
                _into(_as_real(output),
                      lambda dense: comm.reduce_scatter(_as_real(input).contiguous(), dense, op))
            return self._submit(fn, [output], _nbytes(input), opts, "reduce_scatter_tensor")

        _reduce_scatter_base = reduce_scatter_single
        reduce_scatter_tensor = reduce_scatter_single

        def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
            outputs, inputs = list(outputs), list(inputs)
            if len(outputs) != len(inputs):
                raise _BadValue(f"outputs: {len(outputs)} tensors for {len(inputs)} inputs")
            op = "sum" if opts is None else _op_name(opts)
            pairs = []
            for i, (out, inp) in enumerate(zip(outputs, inputs)):
                self._check_gather(inp, out, f"inputs[{i}]", f"outputs[{i}]")
                _check(out, f"outputs[{i}]", out=True)
                _complex_ok(out, op, f"outputs[{i}]", out=True)
                pairs.append((out, inp))
            comm = self._comm

            def fn():
                for out, inp in pairs:
                    _into(_as_real(out),
                          lambda dense: comm.reduce_scatter(_as_real(inp).contiguous(), dense, op))
            return self._submit(fn, outputs, sum(map(_nbytes, inputs)), opts,
                                "reduce_scatter_tensor_coalesced")

        reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

        # ---- all-to-all -----------------------------------------------------------------
        def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes,
                              opts=None):
            if not output_split_sizes and not input_split_sizes and type(output) is _Tensor \
                    and type(input) is _Tensor and output.dtype == input.dtype and \
                    output.is_cpu and input.is_cpu and output.dim() and input.dim() and \
                    not output.shape[0] % self._world_size and \
                    not input.shape[0] % self._world_size:
                runner = self._runner
                is_async = opts is None or getattr(opts, "asyncOp", True)
                dense_out = output.is_contiguous()
                if not runner.num_queued and not runner.closed and (
                        not is_async or output.nbytes < INLINE_MAX_BYTES) and (
                        dense_out or not _overlaps(output)):
                    # the even-split hot path: what the general path below does, minus the
                    # split bookkeeping and a closure (the Communicator checks the rest)
                    comm = self._comm
                    with runner.exec_lock:
                        if dense_out and input.is_contiguous():
                            # seen and checked before: straight to the one-C-call path
                            # (what Communicator.all_to_all would find, ~1 us sooner)
                            if comm.all_to_all_known(input, output, input.data_ptr(),
                                                     output.data_ptr()) is None:
                                comm.all_to_all(input, output)
                        else:
                            _into(output, lambda dense: comm.all_to_all(input.contiguous(), dense))
                    return TopocommWork([output]) if is_async else _DONE
            try:
                _check(output, "output", out=True)
                _check(input, "input")
                if output.dtype != input.dtype:
                    raise _BadType(f"output: dtype {output.dtype} differs from input dtype "
                                    f"{input.dtype}")
                send_counts = self._split_counts(input, input_split_sizes, "input_split_sizes")
                recv_counts = self._split_counts(output, output_split_sizes,
                                                 "output_split_sizes")
            except (_BadValue, _BadType):
                self._reject_everywhere("all_to_all")
                raise
            comm = self._comm
            if not input_split_sizes and not output_split_sizes:
                send_counts = recv_counts = None  # even split: let the Communicator pick

            def fn():
                _into(output, lambda dense: comm.all_to_all(input.contiguous(), dense, send_counts,
                                                            recv_counts))
            return self._submit(fn, [output], max(_nbytes(input), _nbytes(output)), opts,
                                "all_to_all_single")

        alltoall_base = all_to_all_single

        def _split_counts(self, tensor, split_sizes, arg):
            """Rows per peer (dim 0) -> elements per peer; empty = even split."""
            size = self._world_size
            rows = tensor.shape[0] if tensor.dim() else 1
            row_numel = tensor.numel() // rows if rows else 0
            if tensor.dim() and rows == 0:
                row_numel = 1
                for d in tensor.shape[1:]:
                    row_numel *= d
            splits = list(split_sizes)
            if not splits:
                if rows % size:
                    raise _BadValue(f"{arg}: dim 0 ({rows}) is not divisible by world size "
                                     f"{size}; pass split sizes")
                return [rows // size * row_numel] * size
            if len(splits) != size:
                raise _BadValue(f"{arg}: {len(splits)} entries, expected world size {size}")
            if any(s < 0 for s in splits) or sum(splits) != rows:
                raise _BadValue(f"{arg}: {splits} must be non-negative and sum to dim 0 "
                                 f"({rows})")
            return [int(s) * row_numel for s in splits]

        def alltoall(self, output_tensors, input_tensors, opts=None):
            outs, ins = list(output_tensors), list(input_tensors)
            size = self._world_size
            if len(outs) != size or len(ins) != size:
                raise _BadValue(f"output_tensors/input_tensors: expected {size} tensors each, "
                                 f"got {len(outs)} and {len(ins)}")
            dtype = _check(ins[0], "input_tensors[0]").dtype
            _same_dtype(ins, dtype, "input_tensors")
            _same_dtype(outs, dtype, "output_tensors", out=True)
            send_counts = [t.numel() for t in ins]
            recv_counts = [t.numel() for t in outs]
            comm = self._comm

            def fn():
                recv = torch.empty(sum(recv_counts), dtype=dtype)
                comm.all_to_all(_flat_cat(ins, dtype), recv, send_counts, recv_counts)
                _copy_out(recv, outs)
            nbytes = max(sum(send_counts), sum(recv_counts)) * ins[0].element_size()
            return self._submit(fn, outs, nbytes, opts, "alltoall")

        # ---- gather / scatter -----------------------------------------------------------
        def gather(self, output_tensors, input_tensors, opts=None):
            tensor = _one(input_tensors, "input_tensors")
            root = 0 if opts is None else opts.rootRank
            size = self._world_size
            outs = []
            if self.rank() == root:
                if len(output_tensors) != 1 or len(output_tensors[0]) != size:
                    raise _BadValue(f"output_tensors: root expects one list of {size} tensors")
                outs = list(output_tensors[0])
                _same_dtype(outs, tensor.dtype, "output_tensors[0]", out=True)
                for i, out in enumerate(outs):
                    if out.numel() != tensor.numel():
                        raise _BadValue(f"output_tensors[0][{i}]: {out.numel()} elements, "
                                         f"input has {tensor.numel()}")
            elif output_tensors and any(len(o) for o in output_tensors):
                raise _BadValue("output_tensors: only the root passes output tensors")
            comm = self._comm
            is_root = self.rank() == root

            def fn():
                dense = tensor.contiguous()
                recv = torch.empty(size * dense.numel(), dtype=dense.dtype) if is_root else None
                comm.gather(dense, recv, root)
                if is_root:
                    _copy_out(recv, outs)
            return self._submit(fn, outs, size * _nbytes(tensor), opts, "gather")

        def scatter(self, output_tensors, input_tensors, opts=None):
            out = _one(output_tensors, "output_tensors", out=True)
            root = 0 if opts is None else opts.rootRank
            size = self._world_size
            is_root = self.rank() == root
            ins = []
            if is_root:
                if len(input_tensors) != 1 or len(input_tensors[0]) != size:
                    raise _BadValue(f"input_tensors: root expects one list of {size} tensors")
                ins = list(input_tensors[0])
                _same_dtype(ins, out.dtype, "input_tensors[0]")
                for i, t in enumerate(ins):
                    if t.numel() != out.numel():
                        raise _BadValue(f"input_tensors[0][{i}]: {t.numel()} elements, "
                                         f"output has {out.numel()}")
            elif input_tensors and any(len(i) for i in input_tensors):
                raise _BadValue("input_tensors: only the root passes input tensors")
            comm = self._comm

            def fn():
                send = _flat_cat(ins, out.dtype) if is_root else None
                _into(out, lambda dense: comm.scatter(send, dense, root))
            return self._submit(fn, [out], size * _nbytes(out), opts, "scatter")

        # ---- barrier / point-to-point ---------------------------------------------------
        def barrier(self, opts=None):
            comm = self._comm
            return self._submit(comm.barrier, [], 0, opts, "barrier")

        def monitored_barrier(self, timeout=None, wait_all_ranks=False):
            self.barrier().wait()

        def send(self, tensors, dstRank, tag=0):
            tensor = _one(tensors, "tensors")
            comm = self._comm

            def fn():  # bytes: any dtype travels, as with gloo
                comm.send(_as_bytes(tensor.contiguous()), dstRank, tag)
            return TopocommWork([tensor], self._send_runner.submit(fn, [tensor], False, "send"))

        def recv(self, tensors, srcRank, tag=0):
            tensor = _one(tensors, "tensors", out=True)
            comm = self._comm

            def fn():
                _into(tensor, lambda dense: comm.recv(_as_bytes(dense), srcRank, tag))
            return TopocommWork([tensor], self._recv_runner.submit(fn, [tensor], False, "recv"))

        def recv_anysource(self, tensors, tag=0):
            raise NotImplementedError("topocomm: recv from any source (dist.recv without src) "
                                      "is not supported; pass src")

    def _reject_everywhere(self, coll):
        """This rank's arguments for `coll` were refused here: take part in the collective
        flagged, in the group's order, so the other ranks raise ArgumentMismatch at once
        instead of waiting for us (the Communicator's own checks do the same)."""
        reject = getattr(self._comm, "reject", None)
        if reject is None:
            return
        try:
            run_in_order(self, lambda: reject(coll))
        except Exception:  # the group is already broken or closed: nothing to tell
            pass

    ProcessGroupTopocomm._reject_everywhere = _reject_everywhere

    def _rejecting(coll, method):
        @functools.wraps(method)
        def checked(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except (_BadValue, _BadType):
                self._reject_everywhere(coll)
                raise
        return checked

    # every collective whose arguments the seam checks (allreduce and all_to_all_single
    # do it inline, off their hot paths); send/recv have no arrival to flag
    for _name, _coll in (("allreduce_coalesced", "allreduce"), ("broadcast", "broadcast"),
                         ("reduce", "reduce"), ("allgather", "allgather"),
                         ("allgather_coalesced", "allgather"),
                         ("all_gather_single", "allgather"), ("_allgather_base", "allgather"),
                         ("all_gather_into_tensor", "allgather"),
                         ("all_gather_single_coalesced", "allgather"),
                         ("allgather_into_tensor_coalesced", "allgather"),
                         ("reduce_scatter", "reduce_scatter"),
                         ("reduce_scatter_single", "reduce_scatter"),
                         ("_reduce_scatter_base", "reduce_scatter"),
                         ("reduce_scatter_tensor", "reduce_scatter"),
                         ("reduce_scatter_single_coalesced", "reduce_scatter"),
                         ("reduce_scatter_tensor_coalesced", "reduce_scatter"),
                         ("alltoall", "all_to_all"), ("gather", "gather"),
                         ("scatter", "scatter")):
        setattr(ProcessGroupTopocomm, _name,
                _rejecting(_coll, ProcessGroupTopocomm.__dict__[_name]))

    __all__ += ["ProcessGroupTopocomm", "TopocommWork"]


def communicator_of(group=None):
    """(Communicator, ProcessGroupTopocomm) behind a torch process group created with backend
    "topocomm" (None: the default group). TypeError for other backends, ValueError when no
    default group exists. Layers above (comms.moe) reach the Communicator through here, so
    this module stays the only one touching private torch APIs."""
    from comms.api.communicator import Communicator
    if not _HAVE_DIST:
        raise TypeError("group: expected a comms.Communicator (torch.distributed is not available)")
    if group is None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("group: None means the default torch.distributed group, but none is "
                             "initialized; pass a comms.Communicator or a process group")
        group = dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group: expected a comms.Communicator or a torch ProcessGroup, got "
                        f"{type(group).__name__}")
    pg = group  # with the extended backend API torch hands out our group itself
    if not isinstance(getattr(pg, "communicator", None), Communicator):
        try:  # older torch wraps backends in a ProcessGroup
            pg = group._get_backend(torch.device("cpu"))
        except Exception:
            pg = group
    comm = getattr(pg, "communicator", None)
    if not isinstance(comm, Communicator):
        name = getattr(pg, "getBackendName", lambda: type(pg).__name__)()
        raise TypeError(f"group: backend {name!r} is not topocomm")
    return comm, pg


def run_in_order(pg, fn):
    """Run fn() in `pg`'s issue order (after the async work queued before it; on this thread
    when nothing is queued) and re-raise its error: for work built on the group's
    Communicator that must not overtake queued collectives."""
    runner = getattr(pg, "_runner", None)
    if runner is None:
        return fn()
    pending = runner.submit(fn, None, True, "ordered call")
    if pending is not None:
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
    return None
