"""comms.moe on CUDA tensors, 2 and 4 ranks on one GPU: without autograd the rows stay on the
GPU (comms/moe/device.py), with it they take the CPU path; either way the same values as on
CPU tensors, results on the GPU, and the same gradients."""
import textwrap

import pytest

from comms.testing import run_procs

pytestmark = pytest.mark.timeout(300)

CODE = textwrap.dedent("""
    import datetime, os, torch, torch.distributed as dist
    import comms.moe as moe
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(0)
    dist.init_process_group("topocomm", timeout=datetime.timedelta(seconds=120))
    E, H, T, k = 16, 64, 300, 4
    bad = []
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(rank + 7)
        x = torch.randn(T, H, generator=g).to(dtype)
        idx = torch.randint(-1, E, (T, k), generator=g)
        w = torch.rand(T, k, generator=g)
        outs = []
        for dev in ("cpu", "cuda"):
            xd = x.detach().to(dev).requires_grad_(True)     # a leaf on each device
            wd = w.detach().to(dev).requires_grad_(True)
            res = moe.dispatch(xd, idx.to(dev), wd, E)
            if res.expert_x.device.type != dev or res.recv_x.device.type != dev:
                bad.append(("dispatch result device", dtype, dev))
            y = res.expert_x * 2 + 1
            out = moe.combine(y, res.handle)
            if out.device.type != dev:
                bad.append(("combine result device", dtype, dev))
            out.float().square().sum().backward()
            outs.append((res.expert_x.detach().cpu(), out.detach().cpu(), xd.grad.cpu(),
                         wd.grad.cpu()))
        # forward: computed by the CPU path both times (bit for bit); gradients: expert_x's
        # index_select backward adds rows in atomic order on a GPU (allclose)
        for name, a, b in zip(("expert_x", "combine", "x.grad", "w.grad"), *outs):
            same = torch.equal(a, b) if name in ("expert_x", "combine") else torch.allclose(
                a.float(), b.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
            if not same:
                bad.append((name, dtype, float((a.float() - b.float()).abs().max())))
        # without autograd: the rows stay on the GPU, the same bits as the CPU path
        got = []
        for dev in ("cpu", "cuda"):
            res = moe.dispatch(x.to(dev), idx.to(dev), w.to(dev), E)
            out = moe.combine(res.expert_x * 2 + 1, res.handle)
            got.append((res.recv_x.cpu(), res.expert_x.cpu(), out.cpu(),
                        res.handle.device_rows is not None, out.device.type))
        if got[1][3] is not True or got[1][4] != "cuda" or got[0][3] is not False:
            bad.append(("device path not taken", dtype, got[0][3], got[1][3], got[1][4]))
        for name, a, b in zip(("recv_x", "expert_x", "combine"), got[0][:3], got[1][:3]):
            if not torch.equal(a, b):
                bad.append(("on device: " + name, dtype,
                            float((a.float() - b.float()).abs().max())))
    dist.destroy_process_group()
    print("BAD", bad) if bad else print("OK")
""")


@pytest.mark.parametrize("n", [2, 4])
def test_moe_on_cuda_equals_the_cpu_path_with_gradients(n):
    res = run_procs(n, CODE, timeout=280)
    for r, (rc, so, se) in enumerate(res):
        assert rc == 0 and so.strip().endswith("OK"), (r, rc, so[-2000:], se[-4000:])
