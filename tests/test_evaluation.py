"""Quality metrics against independent computations: closed forms for the Fréchet distance, a loop for KID."""

import itertools
import json

import numpy as np
import pytest
import torch

from fixedpoint_diffusion import evaluation as ev
from fixedpoint_diffusion.data import Shapes
from fixedpoint_diffusion.pipeline import to_uint8


def _rotation(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, d)))
    return q


def test_frechet_distance_of_gaussians_sharing_eigenvectors_matches_closed_form():
    # S_a = Q diag(a) Q^T and S_b = Q diag(b) Q^T commute, so tr((S_a S_b)^1/2) = sum sqrt(a_i b_i) and the
    # distance is |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2, which involves no matrix square root at all.
    d = 7
    q = _rotation(d, 0)
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    stats_a = ev.FeatureStats(mu_a, q @ np.diag(a) @ q.T, -1)
    stats_b = ev.FeatureStats(mu_b, q @ np.diag(b) @ q.T, -1)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert ev.frechet_distance(stats_a, stats_b) == pytest.approx(expected, rel=1e-10)
    assert ev.frechet_distance(stats_a, stats_a) == pytest.approx(0, abs=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_on_general_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((50, 6)) @ rng.standard_normal((6, 6)), rng.standard_normal((40, 6)) + 0.3
    mu_x, mu_y, s_x, s_y = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    expected = np.sum((mu_x - mu_y) ** 2) + np.trace(s_x + s_y - 2 * linalg.sqrtm(s_x @ s_y).real)
    assert ev.frechet_distance(x, y) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_singular_covariance_is_finite_and_symmetric():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((5, 20)), rng.standard_normal((8, 20))  # rank 4 and 7 in 20 dimensions
    assert np.isfinite(ev.frechet_distance(x, y))
    assert ev.frechet_distance(x, y) == pytest.approx(ev.frechet_distance(y, x), rel=1e-8)


def _kid_loops(x, y):
    """Unbiased MMD^2 with k(u, v) = (u.v / d + 1)^3, written out with explicit sums over index pairs."""
    m, d = len(x), x.shape[1]

    def k(u, v):
        return (float(np.dot(u, v)) / d + 1) ** 3

    pairs = [(i, j) for i, j in itertools.product(range(m), repeat=2) if i != j]
    kxx = sum(k(x[i], x[j]) for i, j in pairs) / len(pairs)
    kyy = sum(k(y[i], y[j]) for i, j in pairs) / len(pairs)
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def test_kid_equals_the_unbiased_mmd_written_as_loops():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 3)) + 0.5
    # One subset of the full size is a permutation of each set, to which the MMD is invariant.
    mean, std = ev.kernel_inception_distance(x, y, subsets=1, subset_size=6)
    assert mean == pytest.approx(_kid_loops(x, y), rel=1e-12) and std == 0


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two():
    rng = np.random.default_rng(5)
    x, y, z = rng.standard_normal((400, 8)), rng.standard_normal((400, 8)), rng.standard_normal((400, 8)) + 1
    same, same_std = ev.kernel_inception_distance(x, y, subsets=20, subset_size=200)
    apart, _ = ev.kernel_inception_distance(x, z, subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3 and apart > 50 * max(abs(same), same_std)


@pytest.mark.parametrize("call, match", [
    (lambda: ev.kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3))), "at least 2"),
    (lambda: ev.kernel_inception_distance(np.zeros((4, 3)), np.zeros((5, 2))), "dimensions differ"),
    (lambda: ev.kernel_inception_distance(np.zeros((4, 3)), np.zeros((4, 3)), subsets=0), "subsets"),
    (lambda: ev.frechet_distance(np.zeros((4, 3)), np.zeros((4, 2))), "dimensions differ"),
    (lambda: ev.frechet_distance(np.full((4, 3), np.nan), np.zeros((4, 3))), "non-finite"),
    (lambda: ev.FeatureStats.from_features(np.zeros((1, 3))), "at least 2"),
])
def test_metric_errors_name_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_feature_stats_round_trip_and_pytorch_fid_layout(tmp_path):
    x = np.random.default_rng(6).standard_normal((30, 4))
    stats = ev.FeatureStats.from_features(x)
    stats.save(tmp_path / "s.npz")
    back = ev.FeatureStats.load(tmp_path / "s.npz")
    assert np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma) and back.num == 30
    np.savez(tmp_path / "pf.npz", mu=stats.mu.astype(np.float32), sigma=stats.sigma)  # pytorch-fid's keys only
    assert ev.FeatureStats.load(tmp_path / "pf.npz").num == -1
    np.savez(tmp_path / "bad.npz", arr_0=x)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        ev.FeatureStats.load(tmp_path / "bad.npz")


def test_load_images_from_npz_and_folder_agree(tmp_path):
    from PIL import Image

    images = np.random.default_rng(7).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", images, np.arange(5))
    folder = tmp_path / "pngs" / "sub"
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    from_npz, labels = ev.load_images(tmp_path / "s.npz")
    from_folder, none = ev.load_images(tmp_path / "pngs")
    assert np.array_equal(from_npz, images) and np.array_equal(labels, np.arange(5))
    assert np.array_equal(from_folder, images) and none is None
    Image.fromarray(images[0, :4]).save(folder / "999.png")
    with pytest.raises(ValueError, match="999.png.*same size"):
        ev.load_images(tmp_path / "pngs")
    with pytest.raises(FileNotFoundError, match="nothere"):
        ev.load_images(tmp_path / "nothere")
    np.savez(tmp_path / "f.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        ev.load_images(tmp_path / "f.npz")


def test_classifier_training_is_deterministic_and_save_load_keeps_features(tmp_path):
    kw = {"steps": 3, "batch_size": 16, "num_train": 64, "num_test": 32, "seed": 3}
    a, acc_a = ev.train_classifier(**kw)
    b, acc_b = ev.train_classifier(**kw)
    assert acc_a == acc_b and all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                                      b.state_dict().values()))
    a.save(tmp_path / "c.pt")
    c = ev.ShapesClassifier.load(tmp_path / "c.pt")
    images = to_uint8(Shapes(10, 16, seed=1).images)
    fa, pa = ev.classifier_features(a, images)
    fc, pc = ev.classifier_features(c, images, batch_size=3)
    assert np.allclose(fa, fc, atol=1e-6) and np.array_equal(pa, pc) and c.info == a.info and a.info["accuracy"] == acc_a
    assert fa.shape == (10, a.num_features) and fa.dtype == np.float64
    with pytest.raises(ValueError, match="trained on 16x16"):
        ev.classifier_features(a, np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="steps"):
        ev.train_classifier(steps=0)


@pytest.fixture(scope="module")
def default_classifier():
    """The classifier at its defaults (400 steps, ~40 s on 2 cores), trained once for the tests that need it."""
    return ev.train_classifier()


@pytest.mark.slow
def test_small_classifier_metrics_rank_real_above_degraded_above_noise(default_classifier):
    classifier, accuracy = default_classifier
    assert accuracy > 0.85
    real = to_uint8(Shapes(1000, 16, seed=11).images)
    reference, _ = ev.classifier_features(classifier, to_uint8(Shapes(1000, 16, seed=12).images))
    dimmed = to_uint8(Shapes(1000, 16, seed=13).images * 0.7)
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    labels = Shapes(1000, 16, seed=11).labels.numpy()
    scores = [ev.evaluate_samples(x, labels, classifier, reference, kid_subsets=10, kid_subset_size=500)
              for x in (real, dimmed, noise)]
    assert scores[0]["fd"] < scores[1]["fd"] < scores[2]["fd"]
    assert scores[0]["kid"] < scores[1]["kid"] < scores[2]["kid"]
    assert scores[0]["accuracy"] > 0.85 and scores[2]["accuracy"] < 0.5


def _write_sets(tmp_path, n=24, size=16):
    from PIL import Image

    a = to_uint8(Shapes(n, size, seed=21).images)
    b = to_uint8(Shapes(n, size, seed=22).images * 0.8)
    np.savez(tmp_path / "a.npz", arr_0=a, arr_1=Shapes(n, size, seed=21).labels.numpy())
    (tmp_path / "b").mkdir()
    for i, img in enumerate(b):
        Image.fromarray(img).save(tmp_path / "b" / f"{i:04d}.png")
    return a, b


def test_fpdm_eval_with_the_small_classifier_equals_the_library_route(tmp_path, capsys):
    from fixedpoint_diffusion import cli

    a, b = _write_sets(tmp_path)
    classifier, _ = ev.train_classifier(steps=3, batch_size=16, num_train=64, num_test=16)
    classifier.save(tmp_path / "c.pt")
    code = cli.main(["eval", str(tmp_path / "a.npz"), str(tmp_path / "b"), "--classifier", str(tmp_path / "c.pt"),
                     "--kid-subsets", "5", "--out", str(tmp_path / "r.json"), "--save-stats", str(tmp_path / "s.npz")])
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    fa, pa = ev.classifier_features(classifier, a)
    fb, _ = ev.classifier_features(classifier, b)
    assert result["fd"] == pytest.approx(ev.frechet_distance(fa, fb), rel=1e-5)  # float32 features, batching
    assert result["kid"] == pytest.approx(ev.kernel_inception_distance(fa, fb, subsets=5)[0], rel=1e-4)
    labels = np.load(tmp_path / "a.npz")["arr_1"]
    assert result["accuracy"] == pytest.approx(float((pa == labels).mean()))
    assert "Fréchet distance" in capsys.readouterr().out
    # Statistics saved for the first set stand in for it: same distance, no KID.
    code = cli.main(["eval", str(tmp_path / "b"), str(tmp_path / "s.npz"), "--classifier", str(tmp_path / "c.pt"),
                     "--out", str(tmp_path / "r2.json")])
    again = json.loads((tmp_path / "r2.json").read_text())
    assert code == 0 and again["fd"] == pytest.approx(result["fd"], rel=1e-6) and "kid" not in again
    assert "KID: skipped" in capsys.readouterr().out


@pytest.fixture
def one_thread():
    """Inception's ~300 small ops crawl when two intra-op threads contend on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fpdm_eval_fid_from_a_local_inception_file(tmp_path, one_thread):
    from fixedpoint_diffusion import cli
    from fixedpoint_diffusion.inception import InceptionV3Features, inception_features, load_inception

    a, b = _write_sets(tmp_path, n=4, size=32)
    torch.manual_seed(0)
    torch.save(InceptionV3Features().state_dict(), tmp_path / "pt_inception.pth")  # random weights, real layout
    code = cli.main(["eval", str(tmp_path / "a.npz"), str(tmp_path / "b"), "--inception",
                     str(tmp_path / "pt_inception.pth"), "--kid-subsets", "3", "--out", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    net = load_inception(tmp_path / "pt_inception.pth")
    expected = ev.frechet_distance(inception_features(net, a), inception_features(net, b))
    assert code == 0 and result["features"] == "inception" and result["fid"] == pytest.approx(expected, rel=1e-6)
    assert result["num_first"] == result["num_second"] == 4 and "accuracy" not in result


@pytest.mark.parametrize("args, message", [
    (["a.npz", "b.npz"], "exactly one of --inception"),
    (["a.npz", "b.npz", "--inception", "x.pth", "--classifier", "c.pt"], "exactly one of --inception"),
    (["a.npz", "--classifier", "c.pt"], "a second image set"),
    (["missing.npz", "b.npz", "--classifier", "c.pt"], "missing.npz: no such file"),
    (["a.npz", "b.npz", "--classifier", "nothere.pt"], "nothere.pt: no such classifier"),
    (["a.npz", "b.npz", "--inception", "nothere.pth"], "Inception weights file not found"),
])
def test_fpdm_eval_input_errors_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    from fixedpoint_diffusion import cli

    monkeypatch.chdir(tmp_path)
    images = np.zeros((3, 16, 16, 3), np.uint8)
    np.savez("a.npz", arr_0=images)
    np.savez("b.npz", arr_0=images)
    assert cli.main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.slow
def test_the_evaluation_docs_python_example_runs(default_classifier, monkeypatch):
    import pathlib
    import re

    def trained_once(image_size=16, **options):  # training is deterministic: the defaults give the fixture's
        assert image_size == 16 and not options, "the docs example no longer trains at the defaults"
        return default_classifier

    monkeypatch.setattr(ev, "train_classifier", trained_once)

    text = (pathlib.Path(__file__).parents[1] / "docs" / "evaluation.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    namespace: dict = {}
    exec(compile(block, "docs/evaluation.md", "exec"), namespace)  # noqa: S102 - the docs' own example
    assert namespace["scores"]["accuracy"] > 0.8 and namespace["scores"]["fd"] < 5


@pytest.mark.parametrize("steps", [1, 2, 10, 11])
def test_classifier_trains_for_any_step_count(steps):
    """OneCycleLR divides by zero when its warm-up is exactly one step (steps=10 at the default 10%)."""
    classifier, accuracy = ev.train_classifier(8, steps=steps, batch_size=8, num_train=32, num_test=8)
    assert 0 <= accuracy <= 1 and not classifier.training
