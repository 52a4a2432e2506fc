import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from micro import micro_raw

import fixedpoint_diffusion as fd
from fixedpoint_diffusion import cli

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("WORLD_SIZE", None)
    return env


def _state(out_dir, step):
    return torch.load(Path(out_dir) / "checkpoints" / f"step-{step:08d}.pt", weights_only=True)


def test_training_runs_logs_and_writes_a_loadable_ema(tmp_path):
    cfg = fd.load_config(micro_raw(tmp_path / "run", model="FPDM-S/2"))
    seen = []
    summary = fd.train(cfg, progress=False, hooks=[seen.append])
    assert summary.step == 4 and not summary.interrupted and summary.parameters > 0
    assert [s.step for s in seen] == [1, 2, 3, 4]
    assert [s.checkpoint is not None for s in seen] == [False, True, False, True]
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    assert all(np.isfinite(line["loss"]) and line["residual"] > 0 for line in lines)
    ema = fd.FPDM.from_pretrained(tmp_path / "run" / "ema")
    ckpt = _state(tmp_path / "run", 4)
    for key, value in ema.state_dict().items():
        assert torch.equal(value, ckpt["ema"][key])
    assert not all(torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])
    # keep_checkpoints=2 by default: both kept; a third run step would prune the oldest.
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002.pt",
                                                                                    "step-00000004.pt"]


def test_ema_is_the_constant_decay_average(tmp_path):
    raw = micro_raw(tmp_path / "run", model="DiT-S/2", train={"max_steps": 2, "checkpoint_every": 1,
                                                               "keep_checkpoints": 3})
    fd.train(fd.load_config(raw), progress=False)
    s1, s2 = _state(tmp_path / "run", 1), _state(tmp_path / "run", 2)
    init = fd.Trainer(fd.load_config(micro_raw(tmp_path / "fresh", model="DiT-S/2")), progress=False).model
    for key, p0 in init.state_dict().items():
        if key == "pos_embed":
            continue
        ema1 = 0.9 * p0 + 0.1 * s1["model"][key]
        ema2 = 0.9 * ema1 + 0.1 * s2["model"][key]
        assert torch.allclose(s2["ema"][key], ema2, atol=1e-6), key


_KILLED_RUN = """
import json, os, signal, sys
import fixedpoint_diffusion as fd
from fixedpoint_diffusion import cli
cfg = fd.load_config(json.loads(sys.argv[1]))
def hook(state):
    if state.step == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # dies after step 5, with the step-4 checkpoint on disk
fd.train(cfg, progress=False, hooks=[hook], resume=True)
"""


def test_resume_after_a_kill_is_bit_for_bit(tmp_path):
    raw = micro_raw(tmp_path / "a", train={"max_steps": 6, "checkpoint_every": 2, "log_every": 3})
    fd.train(fd.load_config(raw), progress=False)

    raw_b = micro_raw(tmp_path / "b", train={"max_steps": 6, "checkpoint_every": 2, "log_every": 3})
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(raw_b)], check=False, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert fd.latest_checkpoint(tmp_path / "b").name == "step-00000004.pt"
    summary = fd.train(fd.load_config(raw_b), resume=True, progress=False)
    assert (summary.start_step, summary.step) == (4, 6)
    a, b = _state(tmp_path / "a", 6), _state(tmp_path / "b", 6)
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
    raw = micro_raw(tmp_path / "run", train={"max_steps": 50, "checkpoint_every": 100, "log_every": 100})
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job

    def hook(state):
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    summary = fd.train(fd.load_config(raw), progress=False, hooks=[hook])
    # The signal arrives after step 3 (as if during step 4): step 4 completes, then the run stops and saves.
    assert summary.interrupted and summary.step == 4
    assert fd.latest_checkpoint(tmp_path / "run").name == "step-00000004.pt"
    assert _state(tmp_path / "run", 4)["step"] == 4
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_time_limit_stops_cleanly_and_counts_across_resumes(tmp_path):
    import time

    raw = micro_raw(tmp_path / "run", train={"max_steps": 50, "checkpoint_every": 100, "log_every": 100,
                                             "max_minutes": 0.002})  # 0.12 s
    # Each hook call sleeps longer than the whole allowance, so the run stops after step 1 or step 2 at the latest.
    summary = fd.train(fd.load_config(raw), progress=False, hooks=[lambda state: time.sleep(0.13)])
    assert summary.time_limit_reached and not summary.interrupted and 1 <= summary.step <= 2
    state = _state(tmp_path / "run", summary.step)
    assert state["train_seconds"] >= 0.12 and summary.train_seconds == state["train_seconds"]
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["step"] == summary.step
    # The allowance is for the whole run: resuming once it is spent trains nothing ...
    again = fd.train(fd.load_config(raw), resume=True, progress=False)
    assert again.time_limit_reached and again.step == summary.step
    # ... and lifting it continues from the checkpoint.
    raw["train"].update(max_minutes=0, max_steps=summary.step + 2)
    more = fd.train(fd.load_config(raw), resume=True, progress=False)
    assert more.step == summary.step + 2 and not more.time_limit_reached
    assert _state(tmp_path / "run", more.step)["train_seconds"] > state["train_seconds"]


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    for name, kw in (("FPDM-S/2", {"backward": {"name": "jfb", "steps": 3}, "max_steps": 4}),
                     ("DiT-S/2", {"depth": 2})):
        model = fd.create_model(name, input_size=8, in_channels=3, num_classes=4, hidden_size=32, num_heads=2, **kw)
        for p in model.parameters():  # leave adaLN-Zero's zero init, so every path carries gradient
            torch.nn.init.normal_(p, std=0.05)
        x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), torch.tensor([0, 3])
        grads = []
        for checkpointing in (False, True):
            model.zero_grad()
            if checkpointing:
                model.enable_gradient_checkpointing()
            model(x, t, y).out.square().sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for g0, g1 in zip(*grads):
            assert torch.allclose(g0, g1, atol=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["FPDM-S/2", "DiT-S/2"])
def test_torchrun_two_processes_equal_one_process(tmp_path, model):
    raw = micro_raw(tmp_path / "single", model=model, train={"max_steps": 3, "checkpoint_every": 3})
    fd.train(fd.load_config(raw), progress=False)
    cfg_path = tmp_path / "ddp.toml"
    cfg_path.write_text(_toml(micro_raw(tmp_path / "ddp", model=model, train={"max_steps": 3,
                                                                              "checkpoint_every": 3})))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "fixedpoint_diffusion", "train", "--config", str(cfg_path),
           "--no-progress", "--device", "cpu"]
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    single, ddp = _state(tmp_path / "single", 3), _state(tmp_path / "ddp", 3)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    for key, value in single["model"].items():
        assert torch.allclose(value, ddp["model"][key], atol=2e-5, rtol=1e-4), key
    init = fd.Trainer(fd.load_config(micro_raw(tmp_path / "init", model=model)), progress=False).model.state_dict()
    assert any(not torch.allclose(init[k], v) for k, v in single["model"].items())  # it did train
    # Logged metrics are averaged over ranks: the same numbers as the single process's.
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("single", "ddp")]
    for a, b in zip(*logs):
        assert a["step"] == b["step"] and np.isclose(a["loss"], b["loss"], rtol=1e-4)


def _toml(raw):
    def value(v):
        if isinstance(v, dict):  # an inline table, e.g. the model's backward options
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    return "\n".join(f"[{name}]\n" + "\n".join(f"{k} = {value(v)}" for k, v in section.items())
                     for name, section in raw.items()) + "\n"


# --- bad input: one clear error before any training compute ------------------------------------------------------


def _expect(raw, exc, match, *, resume=False):
    with pytest.raises(exc, match=match):
        fd.Trainer(fd.load_config(raw), resume=resume, progress=False)
    assert not (Path(raw["train"]["out_dir"]) / "log.jsonl").exists()


def test_bad_inputs_fail_before_training(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _expect(micro_raw(out, data={"kind": "images", "path": str(tmp_path / "missing")}), FileNotFoundError,
            "does not exist")
    (tmp_path / "empty").mkdir()
    _expect(micro_raw(out, data={"kind": "images", "path": str(tmp_path / "empty")}), ValueError, "holds no images")
    _expect(micro_raw(out, data={"kind": "latents", "path": str(tmp_path / "empty")}), FileNotFoundError,
            "manifest.json")
    _expect(micro_raw(out, data={"image_size": 16}), ValueError, r"shape \(3, 16, 16\) but FPDM-S/2 expects")
    _expect(micro_raw(out, model="DiT-S/2", data={"num_samples": 4}), ValueError, "fewer than one global batch")
    raw = micro_raw(out)
    raw["model"]["num_classes"] = 4
    _expect(raw, ValueError, "8 classes but model.num_classes=4")
    monkeypatch.setenv("WORLD_SIZE", "3")
    _expect(micro_raw(out), ValueError, "divisible by the number of processes")


def test_existing_runs_are_never_overwritten_nor_resumed_with_another_model(tmp_path):
    raw = micro_raw(tmp_path / "run", train={"max_steps": 2})
    fd.train(fd.load_config(raw), progress=False)
    before = (tmp_path / "run" / "checkpoints" / "step-00000002.pt").read_bytes()
    with pytest.raises(FileExistsError, match="pass --resume"):
        fd.Trainer(fd.load_config(raw), progress=False)
    other = micro_raw(tmp_path / "run", train={"max_steps": 2})
    other["model"]["hidden_size"] = 64
    with pytest.raises(ValueError, match="written for another model .*hidden_size: checkpoint 32, config 64"):
        fd.Trainer(fd.load_config(other), resume=True, progress=False)
    dit = micro_raw(tmp_path / "run", model="DiT-S/2", train={"max_steps": 2})
    with pytest.raises(ValueError, match="class: checkpoint 'FPDM', config 'DiT'"):
        fd.Trainer(fd.load_config(dit), resume=True, progress=False)
    assert (tmp_path / "run" / "checkpoints" / "step-00000002.pt").read_bytes() == before


def test_cli_reports_input_errors_in_one_line(tmp_path, capsys):
    code = cli.main(["train", "--config", "tiny", "train.lrr=1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fpdm train: error: unknown key train.lrr") and "Traceback" not in err
    assert cli.main(["configs"]) == 0 and "fpdm-xl2-imagenet256" in capsys.readouterr().out


def test_bf16_autocast_keeps_fp32_master_weights(tmp_path):
    plain = fd.train(fd.load_config(micro_raw(tmp_path / "p")), progress=False)
    bf16 = fd.train(fd.load_config(micro_raw(tmp_path / "b", train={"mixed_precision": "bf16"})), progress=False)
    state = _state(tmp_path / "b", 4)
    assert all(v.dtype == torch.float32 for v in state["model"].values())
    assert all(v.dtype == torch.float32 for s in state["optimizer"]["state"].values() for k, v in s.items()
               if k != "step")
    # Same draws, lower-precision matmuls: close to the fp32 run but not identical.
    assert np.isclose(plain.last_metrics["loss"], bf16.last_metrics["loss"], rtol=2e-2)
    ref = _state(tmp_path / "p", 4)["model"]
    assert any(not torch.equal(ref[k], state["model"][k]) for k in ref)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
def test_compiled_blocks_train_like_eager(tmp_path):
    fd.train(fd.load_config(micro_raw(tmp_path / "e")), progress=False)
    fd.train(fd.load_config(micro_raw(tmp_path / "c", train={"compile": True})), progress=False)
    eager, compiled = _state(tmp_path / "e", 4)["model"], _state(tmp_path / "c", 4)["model"]
    assert eager.keys() == compiled.keys()  # compiling in place keeps the parameter names
    for key in eager:
        assert torch.allclose(eager[key], compiled[key], atol=1e-4), key


def test_the_training_docs_python_example_runs(tmp_path, monkeypatch):
    import re

    text = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    (block,) = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "docs/training.md", "exec"), namespace)
    assert namespace["summary"].step == 20 and isinstance(namespace["model"], fd.FPDM)


def test_default_device_follows_local_rank(monkeypatch):
    from fixedpoint_diffusion._runtime import default_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    expected = torch.device("cuda:3") if torch.cuda.is_available() else torch.device("cpu")
    assert default_device(None) == expected and default_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a 4-GPU machine, as far as the mapping goes
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert default_device("cuda") == torch.device("cuda:3")  # a bare "cuda" means this process's GPU
    assert default_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="4 CUDA device"):
        default_device("cuda:7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        default_device("cuda")


def test_learning_rate_schedules_follow_their_formulas(tmp_path):
    import math

    raw = micro_raw(tmp_path / "run")
    raw["train"].update(lr=1e-3, max_steps=110, warmup_steps=10, lr_schedule="cosine", min_lr_ratio=0.1)
    trainer = fd.Trainer(fd.load_config(raw), progress=False)
    assert [trainer.learning_rate(s) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    for step in (10, 35, 60, 85, 109, 110):
        progress = (step - 10) / 100
        assert trainer.learning_rate(step) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))
    raw["train"].update(lr_schedule="constant")
    constant = fd.Trainer(fd.load_config(raw), progress=False)
    assert constant.learning_rate(10) == constant.learning_rate(109) == 1e-3


def test_the_optimizer_steps_with_the_scheduled_learning_rate(tmp_path):
    raw = micro_raw(tmp_path / "run")
    raw["train"].update(lr=1e-3, max_steps=3, warmup_steps=2, lr_schedule="cosine")
    seen = []
    trainer = fd.Trainer(fd.load_config(raw), progress=False,
                         hooks=[lambda state: seen.append(trainer.optimizer.param_groups[0]["lr"])])
    trainer.run()
    assert seen == pytest.approx([trainer.learning_rate(s) for s in range(3)])


@pytest.mark.parametrize("override, key", [("train.lr_schedule='linear'", "train.lr_schedule"),
                                           ("train.warmup_steps=-1", "train.warmup_steps"),
                                           ("train.min_lr_ratio=1.5", "train.min_lr_ratio")])
def test_bad_schedules_are_refused_naming_the_key(override, key):
    with pytest.raises(fd.ConfigError, match=key):
        fd.load_config("tiny", [override])


def test_no_progress_prints_plain_lines_a_log_can_follow(tmp_path, capsys):
    raw = micro_raw(tmp_path / "run")
    raw["train"].update(max_steps=4, log_every=2)
    fd.train(fd.load_config(raw), progress=False, log_lines=True)
    lines = capsys.readouterr().out.splitlines()
    assert "intra-op thread" in lines.pop(0)  # a CPU run says how many threads it chose
    assert "step 1/4" in lines[0] and "steps/s" in lines[0] and "left" in lines[0]  # the first step, at once
    assert [line.split("] ")[1].split()[1] for line in lines if "loss" in line] == ["2/4", "4/4"]
    fd.train(fd.load_config({**raw, "train": {**raw["train"], "out_dir": str(tmp_path / "quiet")}}), progress=False)
    assert capsys.readouterr().out == ""  # the library stays quiet unless asked


@pytest.mark.parametrize("kind", ["tensorboard", "wandb"])
def test_a_tracker_whose_package_is_missing_is_refused_before_compute(kind, tmp_path, monkeypatch):
    import importlib

    trackers = importlib.import_module("fixedpoint_diffusion.trackers")
    monkeypatch.setattr(trackers, "tracker_available", lambda name: False)
    raw = micro_raw(tmp_path / "run")
    raw["train"]["tracker"] = kind
    with pytest.raises(fd.ConfigError, match=rf"train.tracker='{kind}' needs the {kind} package.*fixedpoint\[{kind}\]"):
        fd.Trainer(fd.load_config(raw), progress=False)
    assert not (tmp_path / "run").exists()


def test_tracker_none_writes_no_tracker_files_and_a_fake_tracker_sees_every_log_line(tmp_path, monkeypatch):
    import importlib

    train_module = importlib.import_module("fixedpoint_diffusion.training")
    raw = micro_raw(tmp_path / "run")
    raw["train"].update(tracker="none", max_steps=4, log_every=2)
    fd.train(fd.load_config(raw), progress=False)
    assert not (tmp_path / "run" / "tensorboard").exists()
    seen = []

    class Fake:
        def log(self, metrics, step):
            seen.append((step, metrics["loss"]))

        def close(self):
            seen.append("closed")

    monkeypatch.setattr(train_module.Tracker, "open", classmethod(lambda cls, config, out_dir: Fake()))
    raw["train"].update(out_dir=str(tmp_path / "run2"))
    fd.train(fd.load_config(raw), progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run2" / "log.jsonl").read_text().splitlines()]
    assert seen == [(e["step"], e["loss"]) for e in logged] + ["closed"]


def test_cpu_threads_are_chosen_deliberately_and_restored(tmp_path, monkeypatch):
    from fixedpoint_diffusion._runtime import cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu_threads(0) == 2 and cpu_threads(3) == 3  # half of 8 cores, shared by 2 processes; explicit wins
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cpu_threads(0) == 5
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads(0) == 1  # never 0
    before = torch.get_num_threads()
    raw = micro_raw(tmp_path / "run")
    raw["train"].update(max_steps=2, cpu_threads=before + 1)
    seen = []
    fd.train(fd.load_config(raw), progress=False, hooks=[lambda state: seen.append(torch.get_num_threads())])
    assert seen == [before + 1, before + 1] and torch.get_num_threads() == before
    raw["train"]["cpu_threads"] = -1
    with pytest.raises(fd.ConfigError, match="train.cpu_threads"):
        fd.load_config(raw)


def test_a_users_own_dataset_trains_like_the_configured_one(tmp_path):
    """Trainer(dataset=...) takes any map-style dataset of (x, y) items: the same data as the config's Shapes,
    served item by item, trains to the same weights."""
    raw = micro_raw(tmp_path / "a")
    raw["train"].update(max_steps=3)
    config = fd.load_config(raw)
    shapes = fd.training.build_dataset(config)

    class Items(torch.utils.data.Dataset):
        num_classes = shapes.num_classes

        def __len__(self):
            return len(shapes)

        def __getitem__(self, i):
            x, y = shapes.__getitems__([i])
            return x[0], int(y[0])

    fd.train(config, progress=False)
    raw["train"]["out_dir"] = str(tmp_path / "b")
    fd.train(fd.load_config(raw), progress=False, dataset=None)
    trainer = fd.Trainer(fd.load_config({**raw, "train": {**raw["train"], "out_dir": str(tmp_path / "c")}}),
                         progress=False, dataset=Items())
    trainer.run()
    a, _ = fd.load_model(tmp_path / "a" / "ema")
    c, _ = fd.load_model(tmp_path / "c" / "ema")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), c.state_dict().values()))
    with pytest.raises(fd.InvalidValueError, match="num_classes"):
        fd.Trainer(config, progress=False, dataset=torch.utils.data.TensorDataset(torch.zeros(70, 3, 8, 8)))


def test_close_frees_the_ddp_wrapper_before_the_process_group_goes(tmp_path):
    """Trainer.close() (which train() calls) drops the DDP wrapper while the group exists; run in a fresh process
    with a one-rank gloo group, so this test process keeps no process group."""
    script = f"""
import gc, sys
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
sys.path.insert(0, {str(Path(__file__).parent)!r})
from micro import micro_raw
import fixedpoint_diffusion as fd
dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
raw = micro_raw({str(tmp_path / "run")!r})
raw["train"]["max_steps"] = 1
trainer = fd.Trainer(fd.load_config(raw), progress=False)
trainer.run()
alive = lambda: sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
before = alive()
trainer.close()
print(before, alive(), dist.is_initialized())
dist.destroy_process_group()
"""
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "0", "True"]
