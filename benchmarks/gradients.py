"""How good, and how costly, is each backward mode's gradient?

For each backward mode of :func:`fixedpoint.solve` this measures, on small deep-equilibrium problems:

* the error of the parameter gradient against the exact implicit gradient (relative error and cosine similarity);
* the bytes saved for backward during the ``solve`` call (every tensor packed by autograd, counted once per
  storage), with and without the storages of the parameters and input, which exist whatever the mode;
* the wall time of forward + backward, as a ratio to ``Implicit()`` measured in the same run (the fastest of
  ``--repeats`` interleaved calls; for StochasticJFB the mean over draws of each draw's fastest replay).

The exact gradient is computed independently of ``fixedpoint``: the fixed point is found by plain iteration to
machine precision in float64, the per-sample Jacobian ``J`` of ``f`` at it is formed densely, and for the loss
``L = sum(z * c)`` the adjoint ``u = (I - J^T)^{-1} c`` gives ``dL/dtheta = u^T df/dtheta`` (one VJP).

Problems (each ``f`` is a contraction by construction; the bound and the measured ``max_i ||J_i||_2`` are reported):

* ``tanh``: ``f(z) = tanh(z W^T + x)`` with ``||W||_2 = 0.9``;
* ``mlp``: ``f(z) = z / 2 + W2 gelu(W1 (z + x) + b1) + b2``, hidden width ``4 * width``, ``||W1||_2 = 1`` and
  ``||W2||_2 = 0.4 / max|gelu'|``, so the Lipschitz constant is at most 0.9.

Run from the repository root::

    python benchmarks/gradients.py                # default sizes: about 5 s on 2 CPU cores (2 s of it importing)
    python benchmarks/gradients.py --tiny         # smoke test, about 3 s
    python benchmarks/gradients.py --dtype float32 --width 128 --out /tmp/g.json

It prints a markdown table per problem and writes JSON (default ``benchmarks/results/gradients.json``). Timings
are informative only: nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import fixedpoint as fp

GELU_SLOPE = 1.129  # max_x d/dx gelu(x), attained at x = sqrt(2): gelu's Lipschitz constant (rounded up)


@dataclass
class Problem:
    """A batch of fixed-point problems ``z = f(z; params, x)`` and the loss weights ``c`` of ``L = sum(z * c)``."""

    name: str
    formula: str
    fn: Callable[[torch.Tensor, list[torch.Tensor], torch.Tensor], torch.Tensor]
    params: list[torch.Tensor]  # leaves with requires_grad, in the benchmark dtype
    x: torch.Tensor
    c: torch.Tensor
    bound: float  # an upper bound on f's Lipschitz constant in z, by construction

    def f(self, z: torch.Tensor) -> torch.Tensor:
        return self.fn(z, self.params, self.x)


def _with_norm(w: torch.Tensor, norm: float) -> torch.Tensor:
    return w * (norm / torch.linalg.matrix_norm(w, ord=2))


def make_problem(name: str, width: int, batch: int, dtype: torch.dtype, device: torch.device,
                 seed: int) -> Problem:
    """Build a problem with random weights, input and loss weights.

    Args:
        name: ``"tanh"`` or ``"mlp"`` (see the module docstring).
        width, batch: state width ``D`` and batch size ``B``; ``z`` is ``(B, D)``.
        dtype, device: where the benchmarked solves run.
        seed: the draws are made in float64 on the CPU from this seed and then cast, so every dtype and device
            sees the same problem.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if name == "tanh":
        params = [_with_norm(randn(width, width), 0.9)]
        fn = lambda z, p, x: torch.tanh(z @ p[0].T + x)
        formula, bound, x = "tanh(z W^T + x), ||W||_2 = 0.9", 0.9, randn(batch, width)
    elif name == "mlp":
        hidden = 4 * width
        params = [_with_norm(randn(hidden, width), 1.0), 0.1 * randn(hidden),
                  _with_norm(randn(width, hidden), 0.4 / GELU_SLOPE), 0.1 * randn(width)]
        fn = lambda z, p, x: 0.5 * z + torch.nn.functional.gelu((z + x) @ p[0].T + p[1]) @ p[2].T + p[3]
        formula = f"z/2 + W2 gelu(W1 (z + x) + b1) + b2, hidden {hidden}, ||W1||_2 = 1, ||W2||_2 = 0.4/{GELU_SLOPE}"
        bound, x = 0.9, randn(batch, width)
    else:
        raise ValueError(f"unknown problem {name!r}")
    c = randn(batch, width)
    cast = {"dtype": dtype, "device": device}
    return Problem(name, formula, fn, [p.to(**cast).requires_grad_() for p in params], x.to(**cast), c.to(**cast),
                   bound)


def exact_gradient(prob: Problem) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The exact gradient of ``L = sum(z* c)`` with respect to the parameters, by the implicit function theorem.

    Everything runs in float64 on the problem's device, without ``fixedpoint``, so the reference does not share
    code (or bugs) with what it checks.

    Returns:
        The flattened float64 gradient, the fixed point ``z*`` (float64) and a dict with the reference's
        iteration count and residual and ``max_i ||J_i||_2`` and ``max_i rho(J_i)`` at ``z*``.

    Raises:
        RuntimeError: if plain iteration does not reach machine precision (``f`` is not a contraction).
    """
    params = [p.detach().double() for p in prob.params]
    x, c = prob.x.double(), prob.c.double()
    z = torch.zeros_like(x)
    with torch.no_grad():
        for steps in range(1, 20001):  # plain iteration: slow but certain for a contraction
            fz = prob.fn(z, params, x)
            done = bool(torch.linalg.vector_norm(fz - z) <= 1e-15 * torch.linalg.vector_norm(fz) + 1e-300)
            z = fz
            if done:
                break
        else:
            raise RuntimeError(f"{prob.name}: the reference iteration did not converge; is f a contraction?")
        residual = float(torch.linalg.vector_norm(prob.fn(z, params, x) - z, dim=1).max())
    # f acts row by row, so each sample's Jacobian is its own block.
    jac = torch.stack([torch.autograd.functional.jacobian(
        lambda zi, i=i: prob.fn(zi[None], params, x[i:i + 1])[0], z[i], vectorize=True) for i in range(len(z))])
    eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
    u = torch.linalg.solve(eye - jac.transpose(1, 2), c.unsqueeze(2)).squeeze(2)
    leaves = [p.requires_grad_() for p in params]
    grads = torch.autograd.grad(prob.fn(z, leaves, x), leaves, u)
    info = {"reference_iterations": steps, "reference_residual": residual,
            "jacobian_norm_max": float(torch.linalg.matrix_norm(jac, ord=2).max()),
            "jacobian_spectral_radius_max": float(torch.linalg.eigvals(jac).abs().max())}
    return torch.cat([g.flatten() for g in grads]), z, info


Map = Callable[[torch.Tensor], torch.Tensor]
Runner = Callable[[Map], torch.Tensor]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(prob: Problem, run: Runner, exact: torch.Tensor) -> dict[str, float]:
    """Run ``run(f) -> z`` once with autograd, backprop ``L = sum(z * c)`` and score the gradient.

    Args:
        prob: the problem; its parameters receive no ``.grad`` (``torch.autograd.grad`` is used).
        run: solves ``z = f(z)`` for the ``f`` it is given and returns ``z`` with its gradient attached.
        exact: the reference gradient from :func:`exact_gradient`.

    Returns:
        ``rel_error``, ``cosine``, ``saved_bytes`` (deduplicated storages packed for backward during ``run``),
        ``saved_activation_bytes`` (the same without the parameters' and input's storages), ``seconds``
        (forward + backward) and ``f_calls`` (applications of ``f`` in the forward, with and without grad; the
        vector-Jacobian products of an implicit backward are not counted).
    """
    device = prob.x.device
    saved: dict[int, int] = {}
    calls = 0

    def f(z: torch.Tensor) -> torch.Tensor:  # counts applications whatever the library does with them
        nonlocal calls
        calls += 1
        return prob.f(z)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    # No garbage collection inside the timed region (as timeit does): the round robin allocates periodically, so
    # collections would keep landing on the same mode. They run, untimed, as soon as it is re-enabled.
    gc.disable()
    try:
        _sync(device)
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            z = run(f)
        grads = torch.autograd.grad((z * prob.c).sum(), prob.params)
        _sync(device)
        seconds = time.perf_counter() - start
    finally:
        gc.enable()
    g = torch.cat([g.flatten() for g in grads]).double()
    # Parameters and input are alive whatever the mode; without them the count is what the mode itself keeps.
    fixed = {t.untyped_storage().data_ptr() for t in [*prob.params, prob.x]}
    return {"rel_error": float(torch.linalg.vector_norm(g - exact) / torch.linalg.vector_norm(exact)),
            "cosine": float(torch.nn.functional.cosine_similarity(g, exact, dim=0)),
            "saved_bytes": sum(saved.values()),
            "saved_activation_bytes": sum(n for p, n in saved.items() if p not in fixed),
            "seconds": seconds, "f_calls": calls}


def fp_runner(backward: fp.Backward, z0: torch.Tensor, **options: object) -> Runner:
    """A ``run`` for :func:`measure` that calls ``fixedpoint.solve`` from ``z0`` with ``backward`` and ``options``."""
    def run(f: Map) -> torch.Tensor:
        return fp.solve(f, z0, backward=backward, **options).z
    return run


def torchdeq_runner(z0: torch.Tensor, **config: object) -> Runner | None:
    """A ``run`` for :func:`measure` through ``torchdeq.get_deq(**config)``, or ``None`` without torchdeq."""
    try:
        from torchdeq import get_deq
    except ImportError:
        return None
    deq = get_deq(**config).train()  # its gradient modes apply to the training graph only

    def run(f: Map) -> torch.Tensor:
        return deq(f, z0)[0][-1]
    return run


def summarize(samples: list[dict[str, float]], stochastic: bool) -> dict[str, object]:
    """One row from repeated measurements of a mode.

    A deterministic mode gives the same gradient and bytes every call, so those come from the first call, and its
    time is the minimum over calls: the least disturbed run, which is what varies least from run to run on a
    shared machine. A stochastic mode gets the mean and std over draws of everything, the time included (each
    draw's time being already a minimum over replays of that draw).
    """
    if not stochastic:
        return dict(samples[0], calls=len(samples), seconds=min(s["seconds"] for s in samples))
    out: dict[str, object] = {"calls": len(samples)}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key], out[key + "_std"] = statistics.fmean(values), statistics.pstdev(values)
    return out


def bench_problem(prob: Problem, *, draws: int, repeats: int, seed: int) -> dict[str, object]:
    """Measure every backward mode on ``prob``.

    Args:
        prob: the problem.
        draws: draws averaged for each StochasticJFB row.
        repeats: timed calls of each deterministic mode (its time is their minimum); each StochasticJFB draw is
            replayed ``min(repeats, 5)`` times for its time.
        seed: seed of the StochasticJFB generators.

    Returns:
        The problem's JSON record, with one row per mode under ``"rows"``.
    """
    exact, z_star, info = exact_gradient(prob)
    dtype = prob.x.dtype
    zeros = torch.zeros_like(prob.x)
    tight = 1e-10 if dtype == torch.float64 else 1e-6  # near the dtype's floor; float32 cannot reach 1e-10
    tight_fwd = {"rtol": tight, "atol": tight * 1e-2, "max_steps": 500}
    modes: dict[str, Runner] = {f"JFB(steps={k})": fp_runner(fp.JFB(steps=k), zeros) for k in (1, 2, 5, 10)}
    # Each StochasticJFB row has its own, identically seeded generator, so both rows see the same draws. z0 = z*
    # shows what its gradient is worth once the forward has converged (as when warm-started).
    generators: dict[str, torch.Generator] = {}
    for label, start in [("StochasticJFB(6, 6), z0 = 0", zeros), ("StochasticJFB(6, 6), z0 = z*", z_star.to(dtype))]:
        generators[label] = torch.Generator().manual_seed(seed)
        modes[label] = fp_runner(fp.StochasticJFB(max_no_grad=6, max_with_grad=6, generator=generators[label]),
                                 start)
    modes["Implicit()"] = fp_runner(fp.Implicit(), zeros)
    modes[f"Implicit(rtol={tight:g}), forward rtol={tight:g}"] = fp_runner(
        fp.Implicit(rtol=tight, atol=tight * 1e-2, max_steps=500), zeros, **tight_fwd)
    # torchdeq's solvers at the same budget and relative tolerance as fixedpoint's defaults.
    deq = {"f_solver": "anderson", "f_max_iter": 50, "f_tol": 1e-4, "f_stop_mode": "rel"}
    for label, config in [("torchdeq phantom grad=1", {"grad": 1}), ("torchdeq phantom grad=5", {"grad": 5}),
                          ("torchdeq IFT", {"ift": True, "b_solver": "anderson", "b_max_iter": 50, "b_tol": 1e-4,
                                            "b_stop_mode": "rel"})]:
        run = torchdeq_runner(zeros, **deq, **config)
        if run is not None:
            modes[label] = run

    def sample(label: str) -> dict[str, float]:
        if label not in generators:
            return measure(prob, modes[label], exact)
        # Replay one draw (same generator state, so the same n and m) and keep its fastest time.
        state = generators[label].get_state()
        replays = []
        for _ in range(min(repeats, 5)):
            generators[label].set_state(state)
            replays.append(measure(prob, modes[label], exact))
        return dict(replays[0], seconds=min(r["seconds"] for r in replays))

    for label in modes:  # warm up every code path before timing (not the seeded draws)
        if label not in generators:
            sample(label)
    # Round robin, so that a slow spell of the machine hits every mode alike instead of one mode's repeats.
    samples: dict[str, list[dict[str, float]]] = {label: [] for label in modes}
    for i in range(max(draws, repeats)):
        for label in modes:
            if i < (draws if label in generators else repeats):
                samples[label].append(sample(label))
    rows = [dict(mode=label, **summarize(samples[label], stochastic=label in generators)) for label in modes]
    base = next(r["seconds"] for r in rows if r["mode"] == "Implicit()")
    for r in rows:
        r["time_ratio"] = r["seconds"] / base
    return dict(problem=prob.name, formula=prob.formula, contraction_bound=prob.bound,
                width=prob.x.shape[1], batch=prob.x.shape[0],
                num_params=sum(p.numel() for p in prob.params), exact_grad_norm=float(exact.norm()),
                forward="fixedpoint.solve defaults: anderson, max_steps=50, rtol=1e-4, atol=1e-6 (unless noted)",
                stochastic_jfb_draws=draws, timing_repeats=repeats, **info, rows=rows)


def markdown(result: dict[str, object]) -> str:
    """A markdown table of one problem's rows."""
    def pm(row: dict, key: str, fmt: str) -> str:
        s = format(row[key], fmt)
        return s + (" ± " + format(row[key + "_std"], fmt) if key + "_std" in row else "")

    lines = [(f"**{result['problem']}**: `{result['formula']}`, batch {result['batch']}, width {result['width']}; "
             f"contraction bound {result['contraction_bound']}, measured max ||J||_2 = "
             f"{result['jacobian_norm_max']:.3f} (spectral radius {result['jacobian_spectral_radius_max']:.3f})"),
             "",
             "| mode | f evals | rel. error | cosine | saved KiB (all) | saved KiB (activations) | time / Implicit() |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        kib = {k: r[k] / 1024 for k in r if k.startswith("saved_")}
        lines.append(f"| {r['mode']} | {pm(r, 'f_calls', '.1f' if 'f_calls_std' in r else '.0f')} | "
                     f"{pm(r, 'rel_error', '.2e')} | {pm(r, 'cosine', '.4f')} | {pm(kib, 'saved_bytes', '.1f')} | "
                     f"{pm(kib, 'saved_activation_bytes', '.1f')} | {r['time_ratio']:.2f} |")
    return "\n".join(lines)


def plot(record: dict[str, object], out: Path) -> Path:
    """Gradient error against activation memory saved for backward, one panel per problem."""
    from _common import pyplot, save_figure

    plt = pyplot()
    problems = record["problems"]
    fig, axes = plt.subplots(1, len(problems), figsize=(9 * len(problems), 4.5), squeeze=False)
    for ax, result in zip(axes[0], problems):
        for i, r in enumerate(result["rows"]):
            error = max(r["rel_error"], 1e-16)  # exact to rounding shows on the log axis's floor
            ax.scatter(r["saved_activation_bytes"] / 1024, error, label=r["mode"], color=plt.cm.tab20(i % 20),
                       marker="s" if "torchdeq" in r["mode"] else "o")
        ax.set(yscale="log", xlabel="activations saved for backward (KiB)",
               ylabel="relative gradient error vs exact implicit gradient", title=result["problem"])
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(fig, out)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text}")
    return value


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"only cpu and cuda devices are supported, got {text}")
    return device


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; argparse exits with a message on a bad argument."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--width", type=_positive, default=64)
    p.add_argument("--batch", type=_positive, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--problem", choices=["tanh", "mlp", "all"], default="all")
    p.add_argument("--draws", type=_positive, default=20, help="StochasticJFB draws averaged")
    p.add_argument("--repeats", type=_positive, default=30, help="timed runs per deterministic mode (the minimum is kept)")
    p.add_argument("--threads", type=_positive, default=1,
                   help="CPU threads for torch; 1 because these sizes gain nothing from intra-op parallelism and "
                        "spinning OpenMP workers make timings erratic on shared machines")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gradients.json"))
    p.add_argument("--tiny", action="store_true", help="smallest sizes, for a smoke test")
    args = p.parse_args(argv)
    if args.tiny:
        args.width, args.batch, args.draws, args.repeats = 8, 2, 3, 1
    args.device = torch.device(args.device)  # the default arrives as a string
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the benchmark, print the tables, write the JSON and return its record.

    Args:
        argv: command-line arguments; ``None`` reads ``sys.argv``.
    """
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    names = ["tanh", "mlp"] if args.problem == "all" else [args.problem]
    results = [bench_problem(make_problem(name, args.width, args.batch, dtype, args.device, args.seed + i),
                             draws=args.draws, repeats=args.repeats, seed=args.seed) for i, name in enumerate(names)]
    try:
        torchdeq_version = importlib.metadata.version("torchdeq")
    except importlib.metadata.PackageNotFoundError:
        torchdeq_version = None
    device_name = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
                   else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    command = ["python", *sys.argv] if argv is None else ["python", "benchmarks/gradients.py", *argv]
    record = {"device": str(args.device), "device_name": device_name, "torch_version": torch.__version__,
              "fixedpoint_version": fp.__version__, "torchdeq_version": torchdeq_version,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join(command), "dtype": args.dtype, "seed": args.seed, "threads": args.threads,
              "problems": results}
    print(f"device: {device_name}; torch {torch.__version__}; dtype {args.dtype}; {record['date']}\n")
    for result in results:
        print(markdown(result), end="\n\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} and {plot(record, args.out)}")
    return record


if __name__ == "__main__":
    main()
