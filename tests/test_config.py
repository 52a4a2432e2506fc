import json

import pytest

import fixedpoint_diffusion as fd
from fixedpoint_diffusion.config import ConfigError, apply_overrides


def test_shipped_configs_load_with_the_paper_recipe():
    assert {"tiny", "tiny-dit", "fpdm-xl2-imagenet256", "dit-xl2-imagenet256"} <= set(fd.list_configs())
    for name in ("fpdm-xl2-imagenet256", "dit-xl2-imagenet256"):
        cfg = fd.load_config(name)
        tr, d = cfg.train, cfg.diffusion
        assert (tr.global_batch_size, tr.lr, tr.weight_decay, tr.ema_decay, tr.class_dropout) == (
            512, 1e-4, 0.0, 0.9999, 0.1)
        assert (d.prediction, d.zero_terminal_snr, d.beta_start, d.beta_end) == ("v", True, 1e-4, 0.02)
        assert cfg.model["input_size"] == 32 and cfg.model["learn_sigma"] is True
    fpdm = fd.load_config("fpdm-xl2-imagenet256").model
    # M = N = 12 as in the paper's text (Sec. 4.1): n ~ U[0, 12] no-grad, m ~ U[1, 12] with-grad steps.
    assert fpdm["backward"] == {"name": "stochastic_jfb", "min_no_grad": 0, "max_no_grad": 12, "min_with_grad": 1,
                                "max_with_grad": 12}
    # Every shipped config builds its model with the keys it names.
    for name in ("tiny", "tiny-dit"):
        cfg = fd.load_config(name)
        m = dict(cfg.model)
        model = fd.create_model(m.pop("name"), **m)
        assert model.config.in_channels == 3


def test_overrides_parse_toml_values():
    cfg = fd.load_config("tiny", ["train.lr=2e-3", "train.betas=[0.9, 0.95]", "train.compile=true",
                                  "model.hidden_size=64", "train.out_dir=runs/x", 'data.kind="shapes"'])
    assert cfg.train.lr == 2e-3 and cfg.train.betas == [0.9, 0.95] and cfg.train.compile is True
    assert cfg.model["hidden_size"] == 64 and cfg.train.out_dir == "runs/x"
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2"]) == {"a": {"b": 1, "c": 2}}


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key train.lrr"),
    ("model.hiden_size=8", "unknown model.hiden_size"),
    ("optimizer.lr=1", "unknown config section"),
    ("train.lr=fast", "train.lr must be a number"),
    ("train.max_steps=1.5", "train.max_steps must be an int"),
    ("train.mixed_precision=fp16", "train.mixed_precision must be"),
    ("train.ema_decay=1.0", "train.ema_decay must be in [0, 1)"),
    ("train.max_minutes=-1", "train.max_minutes must be >= 0"),
    ("data.kind=images", "data.path must be a folder"),
    ("model.name=UNet", "model.name must be a preset"),
    ("train.lr", "must look like section.key=value"),
])
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        fd.load_config("tiny", [override])


def test_config_files_and_dicts(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[model]\nname = "DiT-S/2"\ndepth = 3\n[train]\nmax_steps = 7\n')
    cfg = fd.load_config(str(path))
    assert cfg.model == {"name": "DiT-S/2", "depth": 3} and cfg.train.max_steps == 7
    assert fd.load_config(cfg.to_dict()).to_dict() == cfg.to_dict()
    json.dumps(cfg.to_dict())  # JSON-able (it is saved in checkpoints and run folders)
    with pytest.raises(FileNotFoundError, match="neither a shipped config"):
        fd.load_config(str(tmp_path / "missing.toml"))
    (tmp_path / "broken.toml").write_text("[train\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        fd.load_config(str(tmp_path / "broken.toml"))


def test_model_sections_with_the_old_flat_backward_keys_load_and_tables_take_overrides():
    old = {"model": {"name": "FPDM-S/2", "backward": "stochastic_jfb", "min_no_grad": 0, "max_no_grad": 4,
                     "max_with_grad": 4}}
    cfg = fd.load_config(old)
    assert cfg.model["backward"] == {"name": "stochastic_jfb", "min_no_grad": 0, "max_no_grad": 4,
                                     "min_with_grad": 1, "max_with_grad": 4}
    assert "max_no_grad" not in cfg.model
    tuned = fd.load_config("tiny", ["model.backward.max_no_grad=7"]).model["backward"]
    assert (tuned["name"], tuned["max_no_grad"], tuned["max_with_grad"]) == ("stochastic_jfb", 7, 4)
    assert fd.load_config("tiny", ['model.backward="jfb"', "model.backward.steps=3"]).model["backward"] == {
        "name": "jfb", "steps": 3}
    with pytest.raises(ConfigError, match="model.*max_no_grad"):
        fd.load_config("tiny", ["model.backward.max_no_grad=-1"])
    with pytest.raises(ConfigError, match="unknown option"):
        fd.load_config("tiny", ['model.solver="anderson"', "model.solver.memry=3"])
