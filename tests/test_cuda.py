"""CUDA-only checks: the sync claims on a real device. Skipped without a GPU."""

import pytest
import torch

import fixedpoint as fp

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("solver", ["iteration", "anderson", "broyden"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# torch warns once per process that the sync debug mode is a prototype (H200 run, 2026-12-04: the suite's
# warnings-as-errors turned that notice into a failure); a real synchronisation still raises RuntimeError.
@pytest.mark.filterwarnings("ignore:Synchronization debug mode is a prototype feature:UserWarning")
def test_fixed_step_solve_never_synchronises(solver, dtype):
    lin = torch.nn.Linear(64, 64, device="cuda", dtype=dtype)
    x = torch.randn(32, 64, device="cuda", dtype=dtype)
    f = lambda z: torch.tanh(lin(z) + x)
    fp.solve(f, torch.zeros_like(x), solver=solver, rtol=0, atol=0, max_steps=3)  # warm up lazy CUDA init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sol = fp.solve(f, torch.zeros_like(x), solver=solver, backward="jfb", rtol=0, atol=0, max_steps=12)
        sol.z.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sol.z.dtype == dtype and sol.num_steps == 13


def test_solution_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    w = 0.1 * torch.randn(32, 32, generator=gen)
    x = torch.randn(8, 32, generator=gen)
    cpu = fp.solve(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x), solver="anderson", rtol=1e-6)
    wc, xc = w.cuda(), x.cuda()
    gpu = fp.solve(lambda z: torch.tanh(z @ wc.T + xc), torch.zeros_like(xc), solver="anderson", rtol=1e-6)
    assert gpu.converged.all()
    torch.testing.assert_close(gpu.z.cpu(), cpu.z, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*", "ignore::FutureWarning:torch.*")  # torch internals
def test_sampling_compiles_the_blocks_by_default_on_cuda_and_matches_eager():
    import copy

    import fixedpoint_diffusion as fd

    torch.manual_seed(0)
    model = fd.create_model("FPDM-S/2", input_size=8, in_channels=3, num_classes=4, hidden_size=64,
                            num_heads=2).cuda().eval()
    eager_model = copy.deepcopy(model)
    kwargs = {"budget": 20, "iterations_per_timestep": 2, "sampler": "ddim", "seed": 1}
    compiled = fd.sample(model, [0, 1, 2, 3], **kwargs)
    eager = fd.sample(eager_model, [0, 1, 2, 3], compile=False, **kwargs)
    assert model.blocks_compiled and not eager_model.blocks_compiled
    torch.testing.assert_close(compiled.samples, eager.samples, rtol=1e-3, atol=1e-4)
    assert compiled.block_passes == eager.block_passes


@pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*", "ignore::FutureWarning:torch.*")  # torch internals
@pytest.mark.parametrize("solver", ["iteration", "anderson", "broyden"])
def test_fixed_step_solve_captured_as_a_cuda_graph_matches_eager(solver):
    """The recipe in docs/concepts.md: a fixed-step solve of a microsecond map compiled with
    mode="reduce-overhead" (a CUDA graph) gives the eager answer, replay after replay."""
    torch._dynamo.reset()
    layer = torch.nn.Linear(32, 32, device="cuda")
    run = lambda x: fp.solve(lambda z: torch.tanh(layer(z) + x), torch.zeros_like(x), solver=solver,  # noqa: E731
                             rtol=0, atol=0, max_steps=8).z
    captured = torch.compile(run, fullgraph=True, mode="reduce-overhead")
    with torch.no_grad():
        for seed in range(3):  # warm-up, recording, replays
            x = torch.randn(16, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
            torch.testing.assert_close(captured(x).clone(), run(x), rtol=1e-5, atol=1e-5)
