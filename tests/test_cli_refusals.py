"""The ``fpdm`` command refuses bad input in one line with exit code 2, before the expensive part, and never
overwrites what is already written."""

import json
import shutil

import numpy as np
import pytest

from fixedpoint_diffusion import pretrained
from fixedpoint_diffusion.cli import main as fpdm


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture
def model_copy(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(pretrained.path("shapes-fpdm"), folder)
    return folder


@pytest.mark.parametrize("command", ["train", "sample", "demo"])
@pytest.mark.parametrize("device", ["tpu", "cuda"])
def test_unusable_devices(command, device, tmp_path, capsys):
    if device == "cuda":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    argv = {"train": ["train", "--config", "tiny", "--out", str(tmp_path / "run")],
            "sample": ["sample", "--model", str(pretrained.path("shapes-fpdm")), "--budget", "12", "--iters", "2",
                       "--out", str(tmp_path / "run")],
            "demo": ["demo", "--quick", "--out", str(tmp_path / "run")]}[command]
    assert fpdm([*argv, "--device", device]) == 2
    assert "device" in _error(capsys) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "sample"])
def test_out_under_a_file(command, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    out = str(tmp_path / "file" / "run")
    argv = {"train": ["train", "--config", "tiny", "--out", out],
            "sample": ["sample", "--model", str(pretrained.path("shapes-fpdm")), "--budget", "12", "--iters", "2",
                       "--out", out]}[command]
    assert fpdm(argv) == 2
    assert "is a file" in _error(capsys)


def test_sample_refuses_an_out_folder_with_results_and_overwrite_clears_stale_files(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["sample", "--model", str(pretrained.path("shapes-dit")), "--budget", "12", "--sampler", "ddim",
            "--no-progress", "--out", str(out)]
    assert fpdm([*base, "--num-samples", "6"]) == 0
    assert len(list((out / "samples").iterdir())) == 6
    assert fpdm([*base, "--num-samples", "3"]) == 2
    assert "already holds results" in _error(capsys) and len(list((out / "samples").iterdir())) == 6
    assert fpdm([*base, "--num-samples", "3", "--overwrite"]) == 0
    assert len(list((out / "samples").iterdir())) == 3  # no stale PNGs from the larger run
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape[0] == 3


@pytest.mark.parametrize("damage, match", [("config", "not a JSON object"), ("no-weights", "no weights"),
                                           ("truncated", "cannot be read")])
def test_sample_names_a_broken_model_folder(model_copy, damage, match, tmp_path, capsys):
    weights = model_copy / "diffusion_pytorch_model.safetensors"
    if damage == "config":
        (model_copy / "config.json").write_text("{not json")
    elif damage == "no-weights":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    assert fpdm(["sample", "--model", str(model_copy), "--budget", "12", "--iters", "2", "--out",
                 str(tmp_path / "o"), "--no-progress"]) == 2
    assert match in _error(capsys)


def test_sample_refuses_a_nan_guidance_scale(tmp_path, capsys):
    assert fpdm(["sample", "--model", str(pretrained.path("shapes-dit")), "--budget", "12", "--cfg-scale", "nan",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--cfg-scale must be a finite number" in _error(capsys)  # in the command's own flag
    assert not (tmp_path / "o").exists()


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "a.npz"
    np.savez(path, arr_0=rng.integers(0, 255, (20, 16, 16, 3), dtype=np.uint8), arr_1=np.arange(20) % 8)
    return path


def test_eval_save_stats_never_replaces_an_input(images, tmp_path, capsys):
    before = images.read_bytes()
    classifier = str(pretrained.path("shapes-classifier") / "classifier.pt")
    assert fpdm(["eval", str(images), str(images), "--classifier", classifier, "--save-stats", str(images)]) == 2
    assert "one of the inputs" in _error(capsys) and images.read_bytes() == before


def test_eval_refuses_labels_that_do_not_match_the_images(tmp_path, capsys):
    path = tmp_path / "b.npz"
    np.savez(path, arr_0=np.zeros((20, 16, 16, 3), np.uint8), arr_1=np.array([3]))
    classifier = str(pretrained.path("shapes-classifier") / "classifier.pt")
    assert fpdm(["eval", str(path), str(path), "--classifier", classifier]) == 2
    assert "one label per image" in _error(capsys)


def test_eval_refuses_statistics_holding_nan(images, tmp_path, capsys):
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.full(128, np.nan), sigma=np.eye(128))
    classifier = str(pretrained.path("shapes-classifier") / "classifier.pt")
    assert fpdm(["eval", str(images), str(stats), "--classifier", classifier]) == 2
    assert "non-finite" in _error(capsys)


@pytest.mark.parametrize("what", ["garbage-npz", "not-a-classifier", "out-in-missing-folder"])
def test_eval_names_the_bad_file(what, images, tmp_path, capsys):
    classifier = str(pretrained.path("shapes-classifier") / "classifier.pt")
    first, extra = str(images), []
    if what == "garbage-npz":
        (tmp_path / "g.npz").write_bytes(b"garbage")
        first = str(tmp_path / "g.npz")
    elif what == "not-a-classifier":
        (tmp_path / "c.pt").write_bytes(b"garbage")
        classifier = str(tmp_path / "c.pt")
    else:
        extra = ["--out", str(tmp_path / "missing" / "r.json")]
    assert fpdm(["eval", first, str(images), "--classifier", classifier, *extra]) == 2
    line = _error(capsys)
    assert {"garbage-npz": "g.npz", "not-a-classifier": "c.pt", "out-in-missing-folder": "missing"}[what] in line


def test_train_overrides_are_accepted_anywhere_on_the_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert fpdm(["train", "--config", "tiny", "--no-progress", "train.max_steps=1", "--out", str(out),
                 "train.global_batch_size=4", "data.num_samples=8", "model.hidden_size=32", "model.num_heads=2"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 1
    with pytest.raises(SystemExit) as exit_info:  # an unknown option is still an error
        fpdm(["train", "--config", "tiny", "--bogus", "train.max_steps=1"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_extract_latents_names_a_vae_config_that_is_not_json(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "images" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "a" / "x.png")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{nope")
    assert fpdm(["extract-latents", "--images", str(tmp_path / "images"), "--vae", str(tmp_path / "vae"),
                 "--out", str(tmp_path / "latents"), "--image-size", "16"]) == 2
    assert "config.json is not JSON" in _error(capsys) and not (tmp_path / "latents").exists()


def test_sample_defaults_and_errors_in_the_commands_own_flags(tmp_path, capsys):
    model = str(pretrained.path("shapes-fpdm"))
    assert fpdm(["sample", "--model", model, "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("50 timesteps, 200 block passes per image")  # 50 x (1 + 2 + 1)
    assert fpdm(["sample", "--model", model, "--budget", "20", "--num-steps", "3", "--iters", "2", "--dry-run"]) == 2
    line = _error(capsys)
    assert "--budget, --iters and --timesteps" in line and "iterations_per_timestep" not in line
    assert fpdm(["sample", "--model", str(pretrained.path("shapes-dit")), "--budget", "12", "--sampler", "ddim",
                 "--num-samples", "2", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "12 block passes per image spent" in printed and "compiling" not in printed  # CPU: eager by default
    with pytest.raises(SystemExit):
        fpdm(["sample", "--help"])
    help_text = capsys.readouterr().out
    assert "(default: 64)" in help_text and "--compile, --no-compile" in help_text  # --num-samples, compile


def test_help_and_argument_errors_need_no_torch():
    """`fpdm --help` and argument errors build the parser only: no torch, no diffusers (start-up time is measured
    in benchmarks, not asserted; what is loaded is)."""
    import subprocess
    import sys

    code = ("import sys; from fixedpoint_diffusion.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'fixedpoint') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_demo_help_defaults_match_the_demo():
    from fixedpoint_diffusion import cli, demo

    assert (cli.demo.DEMO_CPU_MACS, cli.demo.DEMO_GPU_MACS) == (demo._CPU_MACS, demo._SHIPPED_MACS)


def test_train_is_the_function_and_no_module_shares_a_public_name():
    import importlib
    import pkgutil

    import fixedpoint_diffusion as fd

    training = importlib.import_module("fixedpoint_diffusion.training")
    assert callable(fd.train) and fd.train is training.train and fd.Trainer is training.Trainer
    modules = {m.name for m in pkgutil.iter_modules(fd.__path__)}
    assert not modules & set(fd.__all__), "a module and a public function share a name"


def test_sample_takes_a_training_checkpoint_file(tmp_path, capsys):
    """A checkpoint's EMA weights sample exactly what its run's ema/ folder samples; --weights model differs."""
    from micro import micro_raw

    import fixedpoint_diffusion as fd

    run = tmp_path / "run"
    fd.train(fd.load_config(micro_raw(run)), progress=False)
    ckpt = run / "checkpoints" / "step-00000004.pt"
    base = ["sample", "--budget", "6", "--iters", "1", "--sampler", "ddim", "--num-samples", "4", "--no-progress"]
    outs = {}
    for name, model, extra in (("folder", run / "ema", []), ("ckpt", ckpt, []), ("raw", ckpt, ["--weights", "model"])):
        assert fpdm([*base, "--model", str(model), "--out", str(tmp_path / name), *extra]) == 0
        with np.load(tmp_path / name / "samples.npz") as f:
            outs[name] = f["arr_0"]
    assert np.array_equal(outs["folder"], outs["ckpt"]) and not np.array_equal(outs["ckpt"], outs["raw"])
    (tmp_path / "junk.pt").write_bytes(b"junk")
    capsys.readouterr()
    assert fpdm([*base, "--model", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "j")]) == 2
    assert "not a readable training checkpoint" in _error(capsys)


def test_only_input_errors_become_one_line_other_exceptions_keep_their_traceback(monkeypatch, capsys):
    import fixedpoint_diffusion as fd

    def bad_input():
        raise fd.InvalidValueError("config 'x': not a config")

    monkeypatch.setattr(fd, "list_configs", bad_input)
    assert fpdm(["configs"]) == 2
    assert capsys.readouterr().err.strip() == "fpdm configs: error: config 'x': not a config"

    def bug():
        raise ValueError("a bug deep inside")

    monkeypatch.setattr(fd, "list_configs", bug)
    with pytest.raises(ValueError, match="a bug deep inside"):
        fpdm(["configs"])


def test_input_error_types_are_also_the_builtin_ones():
    import fixedpoint_diffusion as fd

    assert issubclass(fd.InvalidValueError, ValueError) and issubclass(fd.ConfigError, fd.InputError)
    assert issubclass(fd.MissingInputError, FileNotFoundError) and issubclass(fd.OutputExistsError, FileExistsError)
    assert issubclass(fd.NotWritableError, PermissionError)
    assert all(issubclass(e, fd.InputError) for e in (fd.InvalidValueError, fd.MissingInputError,
                                                      fd.OutputExistsError, fd.NotWritableError))


def test_sample_refuses_a_vae_folder_without_a_config_before_reading_weights(tmp_path, capsys, monkeypatch):
    import fixedpoint_diffusion as fd

    def never(*args, **kwargs):
        raise AssertionError("weights were read before the --vae folder was checked")

    real = fd.load_model
    monkeypatch.setattr(fd, "load_model", lambda *a, **k: real(*a, **k) if k.get("weights") is False else never())
    assert fpdm(["sample", "--model", str(pretrained.path("shapes-fpdm")), "--vae", str(tmp_path / "no-vae"),
                 "--out", str(tmp_path / "run")]) == 2
    assert "--vae" in _error(capsys) and not (tmp_path / "run").exists()


def test_review_refusals_keep_what_was_written(tmp_path, capsys):
    """Found in review: a bad option given with --overwrite is refused before the earlier results are cleared; a
    bad backward option in a model folder, a truncated .npz and an unreadable image are one-line errors."""
    import json

    import numpy as np

    out = tmp_path / "out"
    base = ["sample", "--model", str(pretrained.path("shapes-dit")), "--budget", "6", "--sampler", "ddim",
            "--num-samples", "2", "--no-progress", "--out", str(out)]
    assert fpdm(base) == 0
    before = sorted(p.name for p in out.rglob("*"))
    assert fpdm([*base, "--overwrite", "--eta", "-1"]) == 2
    assert "--eta must be a finite number >= 0" in _error(capsys)
    assert sorted(p.name for p in out.rglob("*")) == before
    # a model folder whose config.json carries a backward option fixedpoint refuses
    folder = tmp_path / "bad-model"
    shutil.copytree(pretrained.path("shapes-fpdm"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["backward"] = {"name": "jfb", "steps": 0}
    (folder / "config.json").write_text(json.dumps(config))
    assert fpdm(["sample", "--model", str(folder), "--dry-run"]) == 2
    assert "backward" in _error(capsys)
    # a truncated .npz and an unreadable image in a folder
    np.savez(tmp_path / "ok.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:100])
    assert fpdm(["eval", str(tmp_path / "cut.npz"), str(tmp_path / "ok.npz"), "--classifier", "shapes"]) == 2
    assert "cut.npz" in _error(capsys)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    assert fpdm(["eval", str(tmp_path / "images"), str(tmp_path / "ok.npz"), "--classifier", "shapes"]) == 2
    assert "broken.png" in _error(capsys)
