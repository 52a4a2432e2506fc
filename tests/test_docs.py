"""The documentation site: it builds with ``mkdocs build --strict``, lists every public name, keeps every link and
asset local, and its Python examples and command lines are real.

The Python examples of sampling.md and evaluation.md run in test_sampling.py and test_evaluation.py, and the
README's in test_readme.py; this file runs those of index.md, concepts.md and toolbox.md.
"""

from __future__ import annotations

import argparse
import ast
import html
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
PACKAGES = ("fixedpoint", "fixedpoint_diffusion")


def _nav_pages(nav: list) -> list[str]:
    """The Markdown paths in a mkdocs ``nav`` (nested lists of ``{title: path or list}``)."""
    pages: list[str] = []
    for item in nav:
        for value in (item.values() if isinstance(item, dict) else [item]):
            pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


def _built_page(site: Path, page: str) -> Path:
    """Where mkdocs writes ``page`` with its default directory URLs: ``a/b.md`` -> ``a/b/index.html``."""
    stem = page[: -len(".md")]
    return site / "index.html" if stem == "index" else site / stem / "index.html"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    pytest.importorskip("mkdocstrings_handlers.python",
                        reason="mkdocstrings-python is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    assert "WARNING" not in run.stderr, run.stderr
    return out


def test_every_nav_page_exists_and_is_built(site):
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = _nav_pages(config["nav"])
    assert {"index.md", "concepts.md", "fpdm.md", "choosing.md", "training.md", "sampling.md", "evaluation.md",
            "benchmarks.md", "api/fixedpoint.md", "api/fixedpoint_diffusion.md"} <= set(pages)
    for page in pages:
        assert (DOCS / page).is_file(), f"nav page {page} is not in docs/"
        assert _built_page(site, page).is_file(), f"nav page {page} was not built"


@pytest.mark.parametrize("package", PACKAGES)
def test_api_page_documents_every_public_name(site, package):
    text = _built_page(site, f"api/{package}.md").read_text()
    anchors = set(re.findall(r'id="([^"]+)"', text))
    # __all__ read from the source, as the docs build reads it (importing fixedpoint_diffusion takes seconds)
    init = ast.parse((ROOT / "src" / package / "__init__.py").read_text())
    (public,) = [ast.literal_eval(node.value) for node in init.body
                 if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)]
    assert len(public) >= 10
    for name in public:
        # griffe reads a name that is also a submodule's as the submodule (no such name today), so such a
        # name is documented by its full path instead.
        submodule = ROOT / "src" / package / name
        shadowed = submodule.with_suffix(".py").is_file() or (submodule / "__init__.py").is_file()
        anchor = f"{package}.{name}.{name}" if shadowed else f"{package}.{name}"
        assert anchor in anchors, f"{package}.{name} is in __all__ but not on the API page"
    # names a reader will look for, and their parameters
    expected = {"fixedpoint": ["fixedpoint.StochasticJFB", "fixedpoint.solve", "fixedpoint.DEQ", "fixedpoint.Status"],
                "fixedpoint_diffusion": ["fixedpoint_diffusion.create_model", "fixedpoint_diffusion.FPDM",
                                         "fixedpoint_diffusion.sample", "fixedpoint_diffusion.plan"]}[package]
    assert set(expected) <= anchors
    # the docstrings went through the docs extension: no Sphinx roles, and grouped entries split into one row each
    assert ":class:`" not in text and ":func:`" not in text
    assert not re.search(r"<b><code>\w+, ", text), "a grouped 'a, b:' docstring entry was rendered as one name"


def test_grouped_parameters_are_split_and_typed(site):
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", _built_page(site, "api/fixedpoint.md").read_text())).split())
    solve = text[text.index("Find z with"):]  # solve's docstring, then its parameter list
    solve = solve[:solve.index("Returns")]
    # `rtol, atol: ...` in the code became two entries, each with the annotation and default from the signature
    assert re.search(r"\brtol \( float , default: 0.0001 \) – convergence tolerances", solve), solve
    assert re.search(r"\batol \( float , default: 1e-06 \) – convergence tolerances", solve), solve


def test_no_asset_is_fetched_from_the_network(site):
    """The theme's highlight.js comes from a CDN unless turned off; pages must work offline."""
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert not re.search(r"<script[^>]+src=\"(https?:)?//", text), f"{page}: external script"
        assert not re.search(r"<link[^>]+rel=\"stylesheet\"[^>]+href=\"(https?:)?//", text), f"{page}: external CSS"
        assert not re.search(r"<link[^>]+href=\"(https?:)?//[^\"]+\"[^>]+rel=\"stylesheet\"", text), page
    for sheet in site.rglob("*.css"):
        assert not re.search(r"url\(['\"]?(https?:)?//", sheet.read_text()), f"{sheet}: external font or image"


def test_every_local_link_and_image_resolves(site):
    checked = 0
    for page in site.rglob("*.html"):
        if page.name == "404.html":
            continue  # served for any missing URL, so its links are absolute by design
        for target in re.findall(r'(?:href|src)="([^"]+)"', page.read_text()):
            url = urlsplit(html.unescape(target))
            if url.scheme or url.netloc or not url.path:  # external, or an anchor on the same page
                continue
            path = (page.parent / unquote(url.path)).resolve()
            if path.is_dir():
                path = path / "index.html"
            assert path.is_file(), f"{page.relative_to(site)} links to {target}, which is not in the site"
            checked += 1
    assert checked > 100
    assert (site / "images" / "quality-cpu.png").is_file()


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.DOTALL)


def test_index_python_example_runs(capsys):
    blocks = _python_blocks("index.md")
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "docs/index.md", "exec"), namespace)  # noqa: S102 - the docs' own example
    assert capsys.readouterr().out.split()[0] == "True"  # the solve converged
    assert namespace["out"].converged.all()
    grads = [p.grad for p in namespace["layer"].parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_concepts_python_example_runs(capsys):
    blocks = _python_blocks("concepts.md")
    # the second is the CUDA-graph recipe, which tests/test_cuda.py runs on a GPU
    assert len(blocks) == 2 and 'mode="reduce-overhead"' in blocks[1]
    namespace: dict = {}
    exec(compile(blocks[0], "docs/concepts.md", "exec"), namespace)  # noqa: S102 - the docs' own example
    sol, A, b = namespace["sol"], namespace["A"], namespace["b"]
    # an independent route to the answer: the fixed point of z -> A z + b, z = sum_k A^k b, as an explicit series
    series, term = torch.zeros_like(b), b.clone()
    for _ in range(200):  # ||A|| = 0.5: 0.5^200 is far below float64's resolution
        series, term = series + term, term @ A.T
    assert torch.allclose(sol.z, series, rtol=0, atol=1e-9)
    assert "CONVERGED" in capsys.readouterr().out


def _run_toolbox_blocks() -> list[tuple[dict, str]]:
    """Each Python block of toolbox.md in a fresh namespace (each is self-contained), with what it printed."""
    import contextlib
    import io

    runs = []
    for i, block in enumerate(_python_blocks("toolbox.md")):
        namespace: dict = {}
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"docs/toolbox.md (block {i})", "exec"), namespace)  # noqa: S102 - the docs' own
        runs.append((namespace, out.getvalue()))
    return runs


def test_toolbox_python_examples_run_and_agree_with_independent_computations():
    import fixedpoint as fp

    runs = _run_toolbox_blocks()
    assert len(runs) == 9
    (states, _), (keep, _), (penalty, _), (radius, radius_out), (norms, _), (dropout, dropout_out), \
        (krylov, _), (warm, warm_out), (check, check_out) = runs

    # structured state: the dict solution is a fixed point of the cell, and every parameter got a gradient
    sol, cell, x = states["sol"], states["cell"], states["x"]
    assert sol.converged.all() and list(sol.z) == ["h", "c"]
    with torch.no_grad():
        image = cell(sol.z, x)
    for key in ("h", "c"):
        torch.testing.assert_close(image[key], sol.z[key], rtol=1e-5, atol=1e-5)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cell.parameters())
    assert states["again"].num_steps < sol.num_steps

    # keep: plain iteration from zeros, so kept step k is f applied k times; a step not reached is sol.z
    sol, layer, x = keep["sol"], keep["layer"], keep["x"]
    assert len(sol.kept) == 4 and sol.kept[3] is sol.z and sol.num_steps - 1 < 24
    with torch.no_grad():
        z, powers = torch.zeros_like(x), {}
        for k in range(1, 13):
            z = layer.f(z, x)
            powers[k] = z
    for k, kept in zip((3, 6, 12), sol.kept):
        torch.testing.assert_close(kept.detach(), powers[k], rtol=0, atol=0)
    assert layer.f.lin.weight.grad.abs().sum() > 0

    # Jacobian penalty: the estimator against dense Jacobians, within 5 standard errors of Hutchinson's variance
    jac = penalty["jacobians"].detach()
    gram = jac.transpose(1, 2) @ jac
    variance = 2 * (gram.square().sum((1, 2)) - torch.diagonal(gram, dim1=1, dim2=2).square().sum(1))
    stderr = (variance.sum() / 20).sqrt() / 8
    assert abs(penalty["estimate"].mean().item() - penalty["exact"].mean().item()) < 5 * stderr
    assert penalty["sol"].jacobian_penalty.shape == (8,)
    assert penalty["layer"].f.lin.weight.grad is not None

    # spectral radius: against the eigenvalues of the closed-form Jacobian diag(1 - z*^2) W
    z_star, w = radius["sol"].z, radius["W"]
    eigenvalues = torch.linalg.eigvals((1 - z_star.square())[:, :, None] * w).abs().amax(-1)
    torch.testing.assert_close(radius["rho"], eigenvalues, rtol=1e-4, atol=0)
    assert radius["rho"][0] > 1 and radius["plain"].converged.tolist() == [False, True, True, True]
    assert "[1.116, 0.578, 0.899, 0.876]" in radius_out

    # norms: the spectral norm of the effective weight approaches the bound from above; the EMA copy is separate
    cell = norms["cell"]
    sigma = torch.linalg.matrix_norm(cell.lin.weight, ord=2).item()
    assert 0.9 <= sigma <= 0.9 * (1 + 1e-3)
    assert not any(hasattr(m, "parametrizations") for m in cell.modules())  # remove_norm baked them
    pairs = list(zip(norms["ema"].parameters(), norms["layer"].parameters()))
    assert all(e is not p and not torch.equal(e, p) for e, p in pairs)

    # dropout: one seeded mask per call, shared over tokens, and a refused call outside any scope
    mask = dropout["mask"]
    assert mask.shape == (4, 1, 16) and set(mask.unique().tolist()) <= {0.0, 1 / 0.8}
    assert torch.equal(dropout["a"], dropout["b"]) and "refused: VariationalDropout" in dropout_out

    # GMRES: the gradient of sum(z*) with respect to W against dense per-sample adjoints, where rho(J) > 1
    w, x = krylov["W"], krylov["x"]
    with torch.no_grad():
        z_star = fp.solve(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x), rtol=1e-12, atol=0,
                          max_steps=300).z
    expected = torch.zeros_like(w)
    for b in range(x.shape[0]):
        jac = (1 - z_star[b].square())[:, None] * w.detach()
        u = torch.linalg.solve((torch.eye(16, dtype=w.dtype) - jac).T, torch.ones(16, dtype=w.dtype))
        expected += torch.outer(u * (1 - z_star[b].square()), z_star[b])  # u^T d tanh(W z + x) / dW
    torch.testing.assert_close(krylov["exact"], expected, rtol=1e-7, atol=1e-9)
    assert not krylov["plain"].converged[0] and krylov["krylov"].converged.all()

    # warm start: fewer adjoint products than a cold start, for both solvers; Neumann(4) is JFB(5)
    counts = [tuple(map(int, line.split()[-2:])) for line in warm_out.splitlines()[:2]]
    assert all(warm_steps < cold_steps for warm_steps, cold_steps in counts), counts
    torch.testing.assert_close(warm["neumann"], warm["jfb5"], rtol=1e-10, atol=1e-12)

    # check_gradients: implicit close to exact, JFB(1) far from it, JFB(5) in between
    errors = [float(e) for e in re.findall(r"relative error ([-+.e0-9]+)", check_out)]
    assert len(errors) == 3 and errors[0] < 1e-5 and errors[1] > 0.1 and errors[2] < 0.02, errors
    assert abs(check["check"].relative_error - errors[2]) < 1e-3 and check["check"].reference_converged


def _cli_lines(text: str) -> list[str]:
    """``fpdm ...`` and ``... -m fixedpoint_diffusion ...`` command lines in bash blocks and inline code spans."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`(fpdm [^`]+)`", text)
    return [line.split("#")[0] for line in lines if re.search(r"(^|\s)fpdm\s|-m fixedpoint_diffusion\s", line)]


def test_every_documented_fpdm_flag_exists():
    from fixedpoint_diffusion.cli import build_parser

    parser = build_parser()
    (commands,) = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    checked = 0
    for page in sorted(DOCS.glob("*.md")):
        for line in _cli_lines(page.read_text()):
            words = shlex.split(line.replace("...", "X"))
            start = next(i for i, w in enumerate(words) if w in ("fpdm", "fixedpoint_diffusion")) + 1
            if start == len(words):
                continue  # a bare `fpdm`
            command = words[start]
            assert command in commands, f"{page.name}: `{line.strip()}`: no fpdm command {command!r}"
            known = set(commands[command]._option_string_actions)
            for word in words[start + 1:]:
                for flag in word.split("/"):  # `--reuse/--no-reuse` names both
                    if flag.startswith("--"):
                        where = f"{page.name}: `{line.strip()}`"
                        assert flag.split("=")[0] in known, f"{where}: fpdm {command} has no {flag}"
                        checked += 1
    assert checked > 50


def _extension():
    spec = importlib.util.spec_from_file_location("markdown_docstrings", DOCS / "_griffe" / "markdown_docstrings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_extension_rewrites_exactly_the_grouped_entries_and_roles():
    pytest.importorskip("griffe", reason="griffe (from mkdocstrings-python) is not installed")
    ext = _extension()
    docstring = (
        "Solve it, see :func:`fixedpoint.solve` and :class:`~fixedpoint_diffusion.sampling.Schedule`.\n"
        "\n"
        "Args:\n"
        "    f: the map.\n"
        "    rtol, atol: tolerances,\n"
        "        non-negative.\n"
        "\n"
        "    max_steps: a limit; a, b: not an entry.\n"
        "\n"
        "Returns:\n"
        "    x, y: left alone outside parameter sections.\n"
    )
    expected = (
        "Solve it, see `fixedpoint.solve` and `Schedule`.\n"
        "\n"
        "Args:\n"
        "    f: the map.\n"
        "    rtol: tolerances,\n"
        "        non-negative.\n"
        "    atol: tolerances,\n"
        "        non-negative.\n"
        "\n"
        "    max_steps: a limit; a, b: not an entry.\n"
        "\n"
        "Returns:\n"
        "    x, y: left alone outside parameter sections."
    )
    assert ext.split_grouped_entries(ext.strip_roles(docstring)) == expected
    lines = ["import x", "", "#: Names accepted", "# for solver=.", "SOLVERS = {}", "OTHER = 1"]
    assert ext.comment_above(lines, 5) == "Names accepted\nfor solver=."
    assert ext.comment_above(lines, 6) is None
