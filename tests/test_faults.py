"""The run folder after faults: kills in every write window, unreadable checkpoints, and a diverging run. Each
state a kill can leave is built directly (the same files a kill at that instant leaves), then the run is resumed."""

import json
import os
import shutil

import pytest
import torch
from micro import micro_raw

import fixedpoint_diffusion as fd
from fixedpoint_diffusion.cli import main as fpdm
from fixedpoint_diffusion.runs import load_model


def _train(out, *, max_steps=4, resume=False, **train):
    raw = micro_raw(out)
    raw["train"].update(max_steps=max_steps, **train)
    return fd.train(fd.load_config(raw), resume=resume, progress=False)


def _ema_step(out):
    return json.loads((out / "ema" / "training_step.json").read_text())["step"]



@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    _train(out)
    return out


def test_resume_removes_stale_checkpoint_and_ema_temporaries(finished):
    stale = finished / "checkpoints" / "step-00000004.pt.tmp12345"
    shutil.copy(finished / "checkpoints" / "step-00000004.pt", stale)
    (finished / "ema.tmp").mkdir()
    _train(finished, max_steps=6, resume=True)
    assert not stale.exists() and not (finished / "ema.tmp").exists()
    assert sorted(p.name for p in (finished / "checkpoints").iterdir()) == ["step-00000004.pt", "step-00000006.pt"]


def test_a_kill_during_the_final_ema_export_is_repaired_by_a_rerun(finished):
    """Killed after the last checkpoint but before ema/ was swapped: ema/ still holds step 2."""
    ckpt = torch.load(finished / "checkpoints" / "step-00000004.pt", weights_only=True)
    older = torch.load(finished / "checkpoints" / "step-00000002.pt", weights_only=True)
    model, _ = load_model(finished / "ema")
    model.load_state_dict(older["ema"])
    model.save_pretrained(finished / "ema")
    (finished / "ema" / "training_step.json").write_text(json.dumps({"step": 2}))
    summary = _train(finished, resume=True)
    assert summary.step == 4 and _ema_step(finished) == 4
    model, _ = load_model(finished / "ema")
    for key, value in ckpt["ema"].items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_kill_between_the_two_renames_of_ema_is_repaired(finished):
    """The window where ema/ was renamed to ema.old and ema.tmp not yet renamed to ema/."""
    os.replace(finished / "ema", finished / "ema.old")
    shutil.copytree(finished / "ema.old", finished / "ema.tmp")
    _train(finished, resume=True)
    assert _ema_step(finished) == 4 and not (finished / "ema.old").exists() and not (finished / "ema.tmp").exists()


def test_after_a_kill_and_resume_the_log_reads_as_one_run(tmp_path):
    out = tmp_path / "run"
    _train(out, max_steps=6, log_every=1, checkpoint_every=4)
    log = out / "log.jsonl"
    lines = log.read_text().splitlines()
    # A kill after step 6 was logged but before its checkpoint: keep the step-4 checkpoint, drop step 6's.
    (out / "checkpoints" / "step-00000006.pt").unlink()
    log.write_text("\n".join(lines) + '\n{"step": 7, "lo')  # and a line cut short by the kill
    _train(out, max_steps=6, log_every=1, checkpoint_every=4, resume=True)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_an_unreadable_newest_checkpoint_is_named_and_the_previous_one_resumed(finished, damage, capsys):
    newest = finished / "checkpoints" / "step-00000004.pt"
    data = newest.read_bytes()
    newest.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not a checkpoint"}[damage])
    summary = _train(finished, max_steps=4, resume=True)
    err = capsys.readouterr().err
    assert str(newest) in err and "resuming from the next newest" in err and len(err.strip().splitlines()) == 1
    assert summary.start_step == 2 and summary.step == 4
    assert (finished / "checkpoints" / "step-00000004.pt.unreadable").is_file()  # kept for inspection
    assert (finished / "checkpoints" / "step-00000004.pt").is_file()  # rewritten by the resumed run


def test_no_readable_checkpoint_is_an_error_naming_the_files(finished):
    for path in (finished / "checkpoints").iterdir():
        path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"step-00000004.pt.*step-00000002.pt"):
        _train(finished, resume=True)


def test_a_diverging_run_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    _train(out, max_steps=2, checkpoint_every=2)
    good = (out / "checkpoints" / "step-00000002.pt").read_bytes()
    good_ema = (out / "ema" / "diffusion_pytorch_model.safetensors").read_bytes()
    raw = micro_raw(out)
    raw["train"].update(max_steps=6, checkpoint_every=2, lr=1e30)
    with pytest.raises(FloatingPointError, match=r"non-finite at step \d"):
        fd.train(fd.load_config(raw), resume=True, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002.pt"]
    assert (out / "checkpoints" / "step-00000002.pt").read_bytes() == good
    assert (out / "ema" / "diffusion_pytorch_model.safetensors").read_bytes() == good_ema


def test_cli_diverging_run_exits_nonzero_with_one_line(tmp_path, capsys):
    code = fpdm(["train", "--config", "tiny", "--no-progress", "--out", str(tmp_path / "run"), "train.lr=1e30",
                 "train.max_steps=3", "train.global_batch_size=8", "data.num_samples=64", "model.hidden_size=32",
                 "model.num_heads=2", "data.image_size=8", "model.input_size=8", "train.log_every=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "non-finite at step" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "ema").exists()


def test_load_model_takes_the_run_folder_itself(tmp_path):
    """A run folder loads its ema/ model (the same weights and diffusion as naming ema/ directly)."""
    raw = micro_raw(tmp_path / "run")
    raw["train"].update(max_steps=2)
    fd.train(fd.load_config(raw), progress=False)
    (a, da), (b, db) = load_model(tmp_path / "run"), load_model(tmp_path / "run" / "ema")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert dict(da.config) == dict(db.config)
    entries = fd.RunFolder(tmp_path / "run").read_log()
    assert [e["step"] for e in entries] == [2] and fd.RunFolder(tmp_path / "run").ema_step() == 2


def test_a_checkpoint_written_with_the_old_flat_fpdm_keys_still_loads(tmp_path):
    """Checkpoints from before FPDM took fixedpoint's option objects store min_no_grad/max_no_grad/... in their
    config's model section; fpdm sample --model <checkpoint> and load_model convert them."""
    raw = micro_raw(tmp_path / "run", model="FPDM-S/2")
    raw["train"].update(max_steps=2)
    fd.train(fd.load_config(raw), progress=False)
    path = fd.latest_checkpoint(tmp_path / "run")
    ckpt = torch.load(path, weights_only=True)
    model_section = dict(ckpt["config"]["model"])
    backward = model_section.pop("backward")
    assert backward["name"] == "stochastic_jfb"
    old = {k: v for k, v in backward.items() if k != "name"}
    ckpt["config"]["model"] = {**model_section, "backward": "stochastic_jfb", **old}  # the old layout
    torch.save(ckpt, tmp_path / "old.pt")
    (new, _), (converted, _) = load_model(path), load_model(tmp_path / "old.pt")
    assert new.config.backward == converted.config.backward
    assert all(torch.equal(p, q) for p, q in zip(new.state_dict().values(), converted.state_dict().values()))
