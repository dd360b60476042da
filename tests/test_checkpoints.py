"""Checkpoints of ``tokenmix train``: self-describing (the model config in the weights'
metadata), written as a unit, never overwritten without --resume, refused on --resume when
the model or the run differs, corrupt files named; a run SIGKILLed at random moments resumes
from the last complete epoch and ends bitwise equal to an uninterrupted run. Also the data
errors the training command refuses (unreadable images, classes without test images)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tokenmix.cli import main as cli
from tokenmix.data import load_data
from tokenmix.models import config_from_weights, model_from_weights
from tokenmix.small_net import SmallNetConfig
from tokenmix.training import Interrupted, TrainConfig, train

REPO = Path(__file__).resolve().parents[1]


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(model="small:dwconv", data="digits", epochs=2, batch_size=256, out=str(out), model_args={"width": 8},
                progress=False, threads=1, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _images(root: Path, classes: int = 3, n: int = 4, size=(32, 32)) -> Path:
    for k in range(classes):
        (root / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", size, (70 * k + 9 * i, 40, 200 - 50 * k)).save(root / f"c{k}" / f"{i}.png")
    return root


# ----------------------------------------------------------------------------- self-describing


def test_every_file_train_writes_carries_the_model_config(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, model_args={"width": 8, "norm": "group"}))
    for path in (out / "model.safetensors", out / "checkpoints" / "epoch-0002" / "model.safetensors"):
        assert config_from_weights(path) == SmallNetConfig("dwconv", 10, 1, width=8, norm="group")
    rebuilt = model_from_weights(out / "model.safetensors")
    saved = load_file(out / "model.safetensors")
    assert rebuilt.state_dict().keys() == saved.keys()
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in saved.items())


def test_a_registered_model_with_model_args_is_rebuilt_by_viz_flops_and_resume(tmp_path, capsys):
    data = _images(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--model", "rednet26", "--model-arg", "widths=[16,16,16,16]", "--model-arg", "depths=[1,1,1,1]",
            "--data", f"folder:{data}", "--size", "32", "--batch-size", "4", "--epochs", "1", "--threads", "1",
            "--no-progress", "--out", str(out)]
    assert cli(args) == 0
    cfg = config_from_weights(out / "model.safetensors")
    assert cfg.name == "rednet26" and cfg.num_classes == 3 and [s.width for s in cfg.stages] == [16, 16, 16, 16]
    assert cli(["flops", "--checkpoint", str(out / "model.safetensors"), "--size", "32"]) == 0
    assert cli(["viz", "--checkpoint", str(out / "model.safetensors"), "--size", "32",
                "--out", str(tmp_path / "v.png")]) == 0
    assert (tmp_path / "v.png").exists()
    # the call of the report: --model with a --checkpoint written with --model-arg
    assert cli(["viz", "--model", "rednet26", "--checkpoint", str(out / "model.safetensors"), "--size", "32",
                "--out", str(tmp_path / "w.png")]) == 0
    assert cli(["viz", "--model", "rednet50", "--checkpoint", str(out / "model.safetensors"), "--size", "32",
                "--out", str(tmp_path / "w.png")]) == 2
    assert "holds a 'rednet26' model, not --model 'rednet50'" in capsys.readouterr().err
    # resuming with other model arguments names the difference
    changed = [a if a != "widths=[16,16,16,16]" else "widths=[16,16,16,32]" for a in args]
    assert cli([*changed, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "the model in" in err and "stages.3.width: checkpoint 16, this run 32" in err


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("leftover", ["metrics.jsonl", "model.safetensors", "config.json", "checkpoints"])
def test_a_new_run_never_overwrites_a_run_file(tmp_path, leftover):
    out = tmp_path / "run"
    train(_cfg(out, epochs=1))
    for name in ["metrics.jsonl", "model.safetensors", "config.json", "checkpoints"]:
        if name != leftover:
            p = out / name
            p.unlink() if p.is_file() else __import__("shutil").rmtree(p)
    before = (out / leftover).stat().st_mtime_ns
    with pytest.raises(ValueError, match=f"already holds a run \\({leftover}\\); pass --resume"):
        train(_cfg(out, epochs=1))
    assert (out / leftover).stat().st_mtime_ns == before


def test_resume_refuses_longer_epochs_and_other_hyperparameters(tmp_path):
    out = tmp_path / "run"
    train(_cfg(out, epochs=1))
    with pytest.raises(ValueError, match=r"epochs: checkpoint 1, this run 3 \(the schedule is fixed by --epochs"):
        train(_cfg(out, epochs=3, resume=True))
    with pytest.raises(ValueError, match="lr: checkpoint 0.003, this run 0.01"):
        train(_cfg(out, epochs=1, lr=0.01, resume=True))
    with pytest.raises(ValueError, match="the model in .* differs .*width: checkpoint 8, this run 16"):
        train(_cfg(out, epochs=1, model_args={"width": 16}, resume=True))
    assert train(_cfg(out, epochs=1, resume=True)) == {}  # finished: nothing left to do


@pytest.mark.parametrize("name", ["model.safetensors", "train_state.pt"])
def test_a_corrupt_checkpoint_names_the_file(tmp_path, name):
    out = tmp_path / "run"
    train(_cfg(out, epochs=1))
    path = out / "checkpoints" / "epoch-0001" / name
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"'{path}' is not (a )?readable"):
        train(_cfg(out, epochs=1, resume=True))


def test_resume_skips_an_interrupted_write_and_a_cut_metrics_line(tmp_path):
    train(_cfg(tmp_path / "full"))
    out = tmp_path / "run"
    with pytest.raises(Interrupted):  # dies in epoch 2 (5 steps per epoch), after epoch 1's checkpoint
        train(_cfg(out, stop_after_steps=7))
    # what a kill in the middle of writing epoch 2 leaves: a temporary directory with part of
    # a file, and a metrics line cut short
    tmp = out / "checkpoints" / ".epoch-0002.tmp"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"\x00" * 10)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')
    train(_cfg(out, resume=True))
    assert not tmp.exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0002"]
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- data


def test_a_decompression_bomb_is_a_value_error_naming_the_file(tmp_path, monkeypatch):
    data = _images(tmp_path / "data", classes=2, n=2, size=(8, 8))
    bomb = data / "c1" / "bomb.png"
    Image.new("L", (64, 64)).save(bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: Pillow refuses it
    with pytest.raises(ValueError, match=f"cannot read image '{bomb}': DecompressionBombError"):
        load_data(f"folder:{data}", size=8)


def test_a_class_without_test_images_is_refused(tmp_path):
    data = _images(tmp_path / "data", classes=2, n=4, size=(8, 8))
    (data / "lonely").mkdir()
    Image.new("RGB", (8, 8)).save(data / "lonely" / "0.png")
    with pytest.raises(ValueError, match=r"leaves class\(es\) without a test image: 'lonely' \(1 image\(s\)\)"):
        load_data(f"folder:{data}", size=8)


# ----------------------------------------------------------------------------- SIGKILL


# small:dwconv runs the tokenmix ops (the CPU kernels, loaded by every process; a kill while
# one loads them must not block the next).
KILL_ARGS = ["--model", "small:dwconv", "--model-arg", "width=8", "--data", "digits", "--epochs", "6",
             "--batch-size", "256", "--seed", "2", "--threads", "1", "--no-progress"]


def _start(out: Path, pause: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "TOKENMIX_CHECKPOINT_PAUSE": str(pause)}
    return subprocess.Popen([sys.executable, "-m", "tokenmix.train", *KILL_ARGS, "--out", str(out), "--resume"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, condition, timeout: float = 120.0) -> bool:
    """Poll every millisecond until ``condition()`` or the process ends; True if the former."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise TimeoutError


def _fresh(ck: Path, tag: str, since_ns: int) -> bool:
    """Whether ``ck`` holds an entry named with ``tag`` created or changed after ``since_ns``
    (a leftover of a killed process is older)."""
    try:
        return any(tag in p.name and p.stat().st_mtime_ns > since_ns for p in ck.iterdir())
    except FileNotFoundError:  # the directory or the entry went away while looking
        return False


def _complete_epochs(out: Path):
    """The last complete checkpoint's epoch (every file of every checkpoint directory and
    ``model.safetensors`` must be whole: readable, with the model config)."""
    ck = out / "checkpoints"
    epochs = sorted(int(p.name.split("-")[1]) for p in ck.glob("epoch-*")) if ck.exists() else []
    for e in epochs:
        d = ck / f"epoch-{e:04d}"
        assert config_from_weights(d / "model.safetensors").mixer == "dwconv"
        assert torch.load(d / "train_state.pt", weights_only=True)["epoch"] == e
    if (out / "model.safetensors").exists():
        config_from_weights(out / "model.safetensors")
    return epochs[-1] if epochs else 0


def test_sigkill_at_random_moments_resumes_from_the_last_complete_epoch_bitwise(tmp_path):
    """Eight kills of one 6-epoch run. Four land inside the writing of a checkpoint (the
    process sleeps ``PAUSE`` seconds after each of the four steps of a write: weights, train
    state, rename, removal of the previous checkpoint; kill k lands in the middle of pause
    k), the other four at a random moment from the process start (importing, loading,
    training, evaluating, writing). After every kill: every checkpoint directory is
    complete, no epoch that was complete or reported is lost, and the restart resumes from
    the last complete epoch. The run ends with the weights and optimizer state of an
    uninterrupted run, bitwise."""
    pause = 0.3
    ref = _start(tmp_path / "ref", pause=0.0)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-3000:]
    out = tmp_path / "run"
    ck = out / "checkpoints"
    rng = random.Random(0)
    kills = mid_write = 0
    while True:
        done_before = _complete_epochs(out)
        started_ns = time.time_ns()
        proc = _start(out, pause=pause)
        killed = False
        if kills < 8 and done_before < 6:
            if kills % 2 == 0:  # inside the write of a checkpoint that has a previous one to lose
                tag = f"epoch-{max(done_before + 1, 2):04d}"
                running = _wait_for(proc, lambda: _fresh(ck, tag, started_ns))
                time.sleep((kills // 2 % 4 + 0.5) * pause)
            else:
                running = True
                time.sleep(rng.uniform(0.5, 4.0))
            if running and proc.poll() is None:
                mid_write += any(ck.glob(".epoch-*.tmp"))
                proc.send_signal(signal.SIGKILL)
                killed = True
                kills += 1
        _, err = proc.communicate(timeout=300)
        # whenever the process got as far as loading, it resumed from the last complete epoch
        if "resuming" in err or "no checkpoint" in err:
            assert (f"resuming {str(out)!r} after epoch {done_before}\n" in err if done_before
                    else "no checkpoint" in err), (done_before, err[-2000:])
        # no progress is lost: every epoch the process reported (after its checkpoint
        # returned) and every epoch complete before it started is still complete
        reported = [int(line.split()[1].split("/")[0]) for line in err.splitlines() if line.startswith("epoch ")]
        assert _complete_epochs(out) >= max([done_before, *reported]), err[-2000:]
        if not killed:
            assert proc.returncode == 0, err[-3000:]
            break
    assert kills >= 6 and mid_write >= 2, (kills, mid_write)  # (a random kill can land after the last epoch)
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "ref" / "checkpoints" / "epoch-0006" / "train_state.pt", weights_only=True)
    sb = torch.load(out / "checkpoints" / "epoch-0006" / "train_state.pt", weights_only=True)
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg"], pb["exp_avg"]) and torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])
    epochs = [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4, 5, 6]
