"""ProcessGroupTopocomm: the torch ProcessGroup (backend "topocomm") whose collectives run on
a topocomm Communicator, with every spelling of each collective torch's trampoline knows.

How a call runs (the costs quoted were measured with torch 2.13 on the 2-vCPU CI machine kind):

- A group owns one Communicator and runs its operations strictly in the order they were
  issued, which is the same on every rank (comms.torch.runner). Small operations
  (< INLINE_MAX_BYTES), and blocking ones (``async_op=False``), run inline on the caller's
  thread when nothing is queued and come back as an already completed Work: handing off to a
  thread costs tens of microseconds and fights for the GIL. Everything else goes to the
  group's progress thread (a daemon, started on first use, stopped by
  ``destroy_process_group``), so DDP can overlap large buckets with the backward pass.
  allreduce and all_to_all_single (even split) do the inline case themselves, without a
  closure or a call to _submit.
- C++ callers (DDP's reducer, functional collectives) reach only the method names torch's
  trampoline knows, and those names moved between torch versions, so each collective is
  defined under every spelling (``_allgather_base`` / ``all_gather_single`` /
  ``all_gather_into_tensor``, ...).
- Arguments are checked on the calling rank (comms.torch.checks); a method whose check
  fails first takes part in its collective flagged (``@rejecting``), so every rank raises.
- Tensors go to the Communicator as they are (CPU torch tensors, bfloat16 included). A
  non-contiguous tensor is replaced by a contiguous copy and the result copied back
  (comms.torch.tensors).
"""
from __future__ import annotations

import collections
import weakref

import torch
import torch.distributed as dist

from comms.torch.checks import (_SUM, _BadType, _BadValue, _check, _complex_ok, _one, _op_name,
                                _overlaps, _same_dtype, _split_counts, rejecting)
from comms.torch.constants import BACKEND_NAME, INLINE_MAX_BYTES, SHUTDOWN_GRACE_S
from comms.torch.delegate import Delegates, delegating, first_tensor, forward
from comms.torch.runner import _OrderedRunner, _shutdown, run_in_order
from comms.torch.tensors import _as_bytes, _as_real, _copy_out, _flat_cat, _into, _nbytes
from comms.torch.work import _DONE, TopocommWork, _Pending

_Tensor = torch.Tensor


class ProcessGroupTopocomm(dist.ProcessGroup):
    """torch ProcessGroup whose collectives run on a topocomm Communicator."""

    def __init__(self, comm, rank, size, name="world", timeout_s=300.0, delegate_args=None):
        """delegate_args: (store, rank, size, timeout, backend options) as torch gave them
        to the creator, for the backends other devices' tensors go to (delegate.py)."""
        super().__init__(rank, size)
        self._comm = comm
        self._delegates = Delegates(self, *delegate_args) if delegate_args else None
        self._world_size = comm.size  # self.size() goes through torch's C++ (~3 us)
        self._name = name
        self._desc = name
        self._timeout_s = float(timeout_s)
        self._runner = _OrderedRunner(name, _Pending)
        # send and recv progress on their own threads, each in issue order: a send
        # waits for its receiver, so a rank blocked in a send must still receive
        # (isend/irecv rings, batch_isend_irecv); they use their own mailboxes and sockets
        self._send_runner = _OrderedRunner(f"{name}-send", _Pending)
        self._recv_runner = _OrderedRunner(f"{name}-recv", _Pending)
        self._finalizer = weakref.finalize(
            self, _shutdown, (self._runner, self._send_runner, self._recv_runner), comm,
            self._timeout_s + SHUTDOWN_GRACE_S)

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
        """Finish queued work, stop the progress thread, close the Communicator (and the
        backends other devices were handed to)."""
        self._finalizer()
        if self._delegates is not None:
            self._delegates.close()

    def abort(self):
        self.shutdown()

    def _delegated(self, args):
        """The backend this group's config names, instead of topocomm, for the device of
        the first tensor in args ("cpu:topocomm,cuda:nccl"), made on first use; None:
        topocomm serves it (always for CPU tensors)."""
        if self._delegates is None:
            return None
        t = first_tensor(args)
        return None if t is None or t.is_cpu else self._delegates.backend_for(t.device.type)

    # ---- plumbing -------------------------------------------------------------------
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

    def _submit(self, fn, result, nbytes, opts, what, inputs=()):
        """Run fn in group order; a Work whose future yields `result` (list of tensors).
        inputs: tensors that say the device when result has none (a gather's non-roots)."""
        is_async = opts is None or getattr(opts, "asyncOp", True)
        fn, stream = _on_callers_stream(fn, result or inputs)
        pending = self._runner.submit(fn, result, nbytes < INLINE_MAX_BYTES or not is_async,
                                      what, stream)
        if pending is None:
            return TopocommWork(result, stream=stream) if is_async else _DONE
        return TopocommWork(result, pending, stream)

    # ---- all-reduce -----------------------------------------------------------------
    # allreduce and all_to_all_single reject inline instead of through @rejecting: the
    # wrapper would be one more Python call on their small-message hot paths
    def allreduce(self, tensors, opts=None):
        # one contiguous CPU tensor summed, the common case, passes the checks without their
        # calls (each costs about a microsecond)
        tensor = tensors[0] if type(tensors) is list and len(tensors) == 1 else None
        if type(tensor) is _Tensor and tensor.is_cpu and tensor.is_contiguous() and \
                opts is not None and opts.reduceOp == _SUM:
            op = "sum"
        else:
            other = None if type(tensor) is _Tensor and tensor.is_cpu else \
                self._delegated((tensors,))
            if other is not None:
                return forward(other, "allreduce", (tensors, opts))
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

    @delegating
    @rejecting("allreduce")
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
    @delegating
    @rejecting("broadcast")
    def broadcast(self, tensors, opts=None):
        root = 0 if opts is None else opts.rootRank
        receives = self.rank() != root   # the root's tensor is only read
        tensor = _one(tensors, "tensors", out=receives)
        comm = self._comm

        def fn():
            _into(tensor, lambda dense: comm.broadcast(dense, root), receives)
        return self._submit(fn, [tensor], _nbytes(tensor), opts, "broadcast")

    @delegating
    @rejecting("reduce")
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
    @delegating
    @rejecting("allgather")
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
            recv = torch.empty(size * dense.numel(), dtype=dense.dtype, device=dense.device)
            comm.allgather(dense, recv)
            _copy_out(recv, outs)
        return self._submit(fn, outs, size * _nbytes(tensor), opts, "allgather")

    @delegating
    @rejecting("allgather")
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
                recv = torch.empty(size * inp.numel(), dtype=inp.dtype, device=inp.device)
                comm.allgather(inp, recv)
                _copy_out(recv, [outs[i] for outs in output_lists])
        flat_outs = [t for outs in output_lists for t in outs]
        return self._submit(fn, flat_outs, sum(map(_nbytes, flat_outs)), opts,
                            "allgather_coalesced")

    @delegating
    @rejecting("allgather")
    def all_gather_single(self, output, input, opts=None):
        self._check_gather(output, input, "output", "input")
        _check(output, "output", out=True)
        comm = self._comm

        def fn():
            _into(output, lambda out: comm.allgather(input.contiguous(), out))
        return self._submit(fn, [output], _nbytes(output), opts, "all_gather_into_tensor")

    _allgather_base = all_gather_single
    all_gather_into_tensor = all_gather_single

    @delegating
    @rejecting("allgather")
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
    @delegating
    @rejecting("reduce_scatter")
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

    @delegating
    @rejecting("reduce_scatter")
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

    @delegating
    @rejecting("reduce_scatter")
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
        # (in place, input is output: one tensor's checks)
        if not output_split_sizes and not input_split_sizes and type(output) is _Tensor \
                and output.is_cpu and output.dim() and \
                not output.shape[0] % self._world_size and (input is output or (
                    type(input) is _Tensor and output.dtype == input.dtype and
                    input.is_cpu and input.dim() and
                    not input.shape[0] % self._world_size)):
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
                    if dense_out and (input is output or input.is_contiguous()):
                        # seen and checked before: straight to the one-C-call path
                        # (what Communicator.all_to_all would find, ~1 us sooner)
                        if comm.all_to_all_known(input, output, input.data_ptr(),
                                                 output.data_ptr()) is None:
                            comm.all_to_all(input, output)
                    else:
                        _into(output, lambda dense: comm.all_to_all(input.contiguous(), dense))
                return TopocommWork([output]) if is_async else _DONE
        other = self._delegated((output, input))
        if other is not None:
            return forward(other, "all_to_all_single",
                           (output, input, output_split_sizes, input_split_sizes, opts))
        try:
            _check(output, "output", out=True)
            _check(input, "input")
            if output.dtype != input.dtype:
                raise _BadType(f"output: dtype {output.dtype} differs from input dtype "
                               f"{input.dtype}")
            send_counts = _split_counts(input, input_split_sizes, "input_split_sizes",
                                        self._world_size)
            recv_counts = _split_counts(output, output_split_sizes, "output_split_sizes",
                                        self._world_size)
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

    @delegating
    @rejecting("all_to_all")
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
            recv = torch.empty(sum(recv_counts), dtype=dtype, device=ins[0].device)
            comm.all_to_all(_flat_cat(ins, dtype), recv, send_counts, recv_counts)
            _copy_out(recv, outs)
        nbytes = max(sum(send_counts), sum(recv_counts)) * ins[0].element_size()
        return self._submit(fn, outs, nbytes, opts, "alltoall")

    # ---- gather / scatter -----------------------------------------------------------
    @delegating
    @rejecting("gather")
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
            recv = torch.empty(size * dense.numel(), dtype=dense.dtype,
                               device=dense.device) if is_root else None
            comm.gather(dense, recv, root)
            if is_root:
                _copy_out(recv, outs)
        return self._submit(fn, outs, size * _nbytes(tensor), opts, "gather", [tensor])

    @delegating
    @rejecting("scatter")
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

    @delegating
    def send(self, tensors, dstRank, tag=0):
        tensor = _one(tensors, "tensors")
        comm = self._comm

        def fn():  # bytes: any dtype travels, as with gloo
            comm.send(_as_bytes(tensor.contiguous()), dstRank, tag)
        fn, stream = _on_callers_stream(fn, [tensor])
        return TopocommWork([tensor], self._send_runner.submit(fn, [tensor], False, "send",
                                                               stream), stream)

    @delegating
    def recv(self, tensors, srcRank, tag=0):
        tensor = _one(tensors, "tensors", out=True)
        comm = self._comm

        def fn():
            _into(tensor, lambda dense: comm.recv(_as_bytes(dense), srcRank, tag))
        fn, stream = _on_callers_stream(fn, [tensor])
        return TopocommWork([tensor], self._recv_runner.submit(fn, [tensor], False, "recv",
                                                               stream), stream)

    @delegating
    def recv_anysource(self, tensors, tag=0):
        raise NotImplementedError("topocomm: recv from any source (dist.recv without src) "
                                  "is not supported; pass src")



def _on_callers_stream(fn, result):
    """(fn, run with the caller's current CUDA stream current, that stream) when the result
    is on a GPU: a queued operation runs on the progress thread, whose current stream is the
    device's default one, and the collective must be ordered after the caller's work (the
    Communicator reads the stream as it takes the tensors). CPU results: (fn, None)."""
    t = first_tensor(result)
    if t is None or not t.is_cuda:
        return fn, None
    stream = torch.cuda.current_stream(t.device)

    def on_stream():
        with torch.cuda.stream(stream):
            fn()
    return on_stream, stream
