"""``tokenmix train``: data errors, image folders, resume after an interruption, and a
2-process gloo DistributedDataParallel run against a 1-process run.

The DDP comparison uses ``small:dwconv`` with ``norm=group``: DistributedDataParallel
averages gradients over ranks but BatchNorm would normalise each rank's half batch with its
own statistics (SyncBatchNorm needs a GPU), so with BatchNorm a 2-process run is *meant* to
differ from a 1-process run. GroupNorm is per sample, so the two runs compute the same
function of the same global batches. They run in float64: in float32 the two runs differ by
rounding (half-batch vs full-batch reductions, ~1e-7) which 44 momentum-SGD steps amplify to
~1e-4 in the weights, too loose to catch a real bug; in float64 they agree to ~1e-15.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tokenmix.data import load_data, stratified_split
from tokenmix.train import TrainConfig, _Interrupted, main, train

REPO = Path(__file__).resolve().parents[1]
TINY = ["--model-arg", "width=16", "--no-progress", "--threads", "1"]


def _write_images(folder: Path, n: int, color, size=(6, 5)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, tuple(int(c) + i for c in color)).save(folder / f"img{i}.png")


# ----------------------------------------------------------------------------- data


def test_folder_dataset_loads_resizes_and_normalises(tmp_path):
    _write_images(tmp_path / "cat", 5, (200, 10, 10))
    _write_images(tmp_path / "dog", 4, (10, 10, 200))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    split = load_data(f"folder:{tmp_path}", size=7, test_fraction=0.25, seed=0)
    assert split.classes == ["cat", "dog"]
    assert split.in_channels == 3 and split.image_size == (7, 7)
    assert len(split.train) + len(split.test) == 9
    assert sorted(split.test.tensors[1].tolist()) == [0, 1]  # stratified: one of each class held out
    x = split.train.tensors[0]
    assert x.shape[1:] == (3, 7, 7) and x.dtype == torch.float32
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)


def test_bad_dataset_path_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
        load_data(f"folder:{missing}")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="is not a directory"):
        load_data(f"folder:{tmp_path / 'file.png'}")
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_data(f"folder:{tmp_path}")
    with pytest.raises(ValueError, match="unknown data 'mnist'.*digits.*folder:PATH"):
        load_data("mnist")
    with pytest.raises(ValueError, match="needs a path"):
        load_data("folder:")


def test_empty_class_folder_is_a_clear_error(tmp_path, capsys):
    _write_images(tmp_path / "a", 2, (0, 0, 0))
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=f"class folder '{tmp_path / 'b'}' has no images"):
        load_data(f"folder:{tmp_path}")
    # the same error reaches the command line as one line, exit code 2
    assert main(["--model", "small:conv", "--data", f"folder:{tmp_path}", "--out", str(tmp_path / "o"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokenmix.train: error: class folder") and "has no images" in err and "\n" not in err


def test_unreadable_image_names_the_file(tmp_path):
    _write_images(tmp_path / "a", 2, (0, 0, 0))
    _write_images(tmp_path / "b", 1, (9, 9, 9))
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        load_data(f"folder:{tmp_path}")


def test_stratified_split_is_deterministic_and_disjoint():
    labels = np.repeat(np.arange(4), [10, 7, 3, 2])
    a_train, a_test = stratified_split(labels, 0.3, seed=5)
    b_train, b_test = stratified_split(labels, 0.3, seed=5)
    assert np.array_equal(a_test, b_test) and np.array_equal(a_train, b_train)
    assert not set(a_train) & set(a_test) and len(a_train) + len(a_test) == len(labels)
    assert np.bincount(labels[a_test], minlength=4).tolist() == [3, 2, 1, 1]
    assert not np.array_equal(stratified_split(labels, 0.3, seed=6)[1], a_test)


def test_train_on_a_folder_end_to_end(tmp_path):
    data = tmp_path / "data"
    for k, color in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250)]):
        _write_images(data / f"class{k}", 6, color)
    out = tmp_path / "out"
    assert main(["--model", "small:involution", "--data", f"folder:{data}", "--size", "6", "--epochs", "2",
                 "--batch-size", "4", "--out", str(out), *TINY]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert json.loads((out / "config.json").read_text())["classes"] == ["class0", "class1", "class2"]
    weights = load_file(out / "model.safetensors")
    assert weights["head.weight"].shape == (3, 32)


# ----------------------------------------------------------------------------- resume


def _cfg(out: Path, **kw) -> TrainConfig:
    base = dict(model="small:involution", data="digits", epochs=3, batch_size=128, lr=3e-3, out=str(out),
                model_args={"width": 16}, progress=False, threads=1, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_after_interrupted_epoch_matches_uninterrupted_run(tmp_path):
    full = train(_cfg(tmp_path / "full"))
    steps_per_epoch = 1438 // 128  # 11 full global batches of the 1438 training digits
    with pytest.raises(_Interrupted):  # dies in the middle of epoch 2, after its checkpoint of epoch 1
        train(_cfg(tmp_path / "cut", stop_after_steps=steps_per_epoch + 4))
    state = torch.load(tmp_path / "cut" / "checkpoints" / "epoch-0001" / "train_state.pt", weights_only=True)
    assert state["epoch"] == 1
    with pytest.raises(ValueError, match="already holds a run .*; pass --resume"):
        train(_cfg(tmp_path / "cut"))
    resumed = train(_cfg(tmp_path / "cut", resume=True))

    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # same process, same thread count: bitwise the same arithmetic
        assert torch.equal(a[k], b[k]), k
    assert resumed["test_acc"] == full["test_acc"]
    epochs = [json.loads(x)["epoch"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    s_full = torch.load(tmp_path / "full" / "checkpoints" / "epoch-0003" / "train_state.pt", weights_only=True)
    s_cut = torch.load(tmp_path / "cut" / "checkpoints" / "epoch-0003" / "train_state.pt", weights_only=True)
    assert s_full["scheduler"]["last_epoch"] == s_cut["scheduler"]["last_epoch"] == 3 * steps_per_epoch
    for pa, pb in zip(s_full["optimizer"]["state"].values(), s_cut["optimizer"]["state"].values()):
        assert torch.equal(pa["exp_avg_sq"], pb["exp_avg_sq"])


def test_sync_bn_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--sync-bn needs GPUs"):
        train(_cfg(tmp_path, device="cpu", sync_bn=True))


def test_resume_refuses_a_different_run(tmp_path):
    train(_cfg(tmp_path, epochs=1))
    with pytest.raises(ValueError, match="batch_size: checkpoint 128, this run 64"):
        train(_cfg(tmp_path, epochs=1, batch_size=64, resume=True))


# ----------------------------------------------------------------------------- DDP


def test_two_process_gloo_run_matches_one_process(tmp_path):
    args = ["--model", "small:dwconv", "--model-arg", "norm=group", "--model-arg", "width=16", "--data", "digits",
            "--epochs", "2", "--batch-size", "64", "--optimizer", "sgd", "--lr", "0.05", "--seed", "1",
            "--no-progress", "--threads", "1", "--dtype", "float64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "tokenmix.train", *args, "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    main([*args, "--out", str(tmp_path / "single")])

    ddp = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [m["world_size"] for m in ddp] == [2, 2] and [m["world_size"] for m in single] == [1, 1]
    # parameters of rank 0 and rank 1 are bitwise identical after every epoch
    assert [m["param_spread"] for m in ddp] == [0.0, 0.0]
    # only rank 0 wrote: one line per epoch, no stray temporary files
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "checkpoints", "config.json", "metrics.jsonl", "model.safetensors"]
    assert [p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()] == ["epoch-0002"]
    # the same global batches and the gradient average over ranks: the same training
    a = load_file(tmp_path / "ddp" / "model.safetensors")
    b = load_file(tmp_path / "single" / "model.safetensors")
    assert a.keys() == b.keys() and a["head.weight"].dtype == torch.float64
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12, msg=k)
    assert not torch.equal(a["stem.0.weight"], _initial_stem(args))  # it did train
    for m_ddp, m_one in zip(ddp, single):
        assert abs(m_ddp["train_loss"] - m_one["train_loss"]) < 1e-12
        assert abs(m_ddp["test_loss"] - m_one["test_loss"]) < 1e-12
        assert m_ddp["test_acc"] == m_one["test_acc"]


def _initial_stem(args) -> torch.Tensor:
    from tokenmix.small_net import SmallNet

    torch.manual_seed(int(args[args.index("--seed") + 1]))
    return SmallNet("dwconv", width=16, norm="group").double().stem[0].weight.detach()
