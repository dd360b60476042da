"""``tokenmix compare`` end to end with tiny settings, plus its pieces: the small backbone with
every mixer, determinism, and the kernel heat-map rule."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tokenmix.cli import main
from tokenmix.compare import choose_reduction, format_table, summarize, train_one
from tokenmix.data import load_data
from tokenmix.mixers import list_mixers
from tokenmix.small_net import SmallNet

MIXERS = ["conv", "dwconv", "involution", "local_attention"]


def test_compare_end_to_end_writes_table_json_and_pngs(tmp_path, capsys):
    out = tmp_path / "cmp"
    threads = torch.get_num_threads()
    rc = main(["compare", "--mixers", ",".join(MIXERS), "--epochs", "2", "--seeds", "2", "--width", "16",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    assert torch.get_num_threads() == threads  # --threads (default 1) holds only during the run
    printed = capsys.readouterr().out
    assert ("| mixer | params | MACs/image | time/epoch (s) | test acc (%), mean ± std | min - max | seeds |"
            in printed)
    for m in MIXERS:
        assert f"| {m} |" in printed
    assert (out / "compare.md").read_text().strip() in printed

    payload = json.loads((out / "compare.json").read_text())
    results = {r["mixer"]: r for r in payload["results"]}
    assert list(results) == MIXERS
    assert payload["config"]["epochs"] == 2 and payload["config"]["test_size"] == 359
    assert payload["config"]["seed_list"] == [0, 1]
    for m, r in results.items():
        assert r["seeds"] == [0, 1] and [run["seed"] for run in r["runs"]] == [0, 1]
        accs = [run["test_acc"] for run in r["runs"]]
        assert r["test_acc_mean"] == pytest.approx(sum(accs) / 2)
        assert r["test_acc_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
        assert (r["test_acc_min"], r["test_acc_max"]) == (min(accs), max(accs))
        for run in r["runs"]:
            assert [h["epoch"] for h in run["history"]] == [1, 2]
            assert run["history"][-1]["train_loss"] < run["history"][0]["train_loss"]  # it learns
            assert run["time_per_epoch_s"] == pytest.approx(run["train_time_s"] / 2)
        # two seeds train two different networks
        assert r["runs"][0]["history"][0]["train_loss"] != r["runs"][1]["history"][0]["train_loss"]
        assert [c["epoch"] for c in r["curves"]] == [1, 2]
        assert r["curves"][-1]["test_acc_mean"] == pytest.approx(r["test_acc_mean"])
        assert r["params"] == sum(p.numel() for p in SmallNet(m, width=16).parameters())
        assert r["macs"] > 0
    # the plain 3x3 conv does 9 * C * C multiply-adds per pixel, the depthwise one 9 * C
    assert results["conv"]["macs"] > 3 * results["dwconv"]["macs"]

    assert payload["plots"]["curves"] == "curves.png"
    # heat maps only where the kernel depends on the input
    assert payload["plots"]["kernels"] == {"involution": {"file": "kernels_involution.png", "reduce": "sum"},
                                           "local_attention": {"file": "kernels_local_attention.png",
                                                               "reduce": "max"}}
    for name in ["curves.png", "kernels_involution.png", "kernels_local_attention.png"]:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    assert not (out / "kernels_conv.png").exists() and not (out / "kernels_dwconv.png").exists()


def test_compare_on_an_rgb_image_folder(tmp_path):
    for k in range(3):
        (tmp_path / "data" / f"c{k}").mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (12, 10), (80 * k + 5 * i, 40, 200 - 60 * k)).save(tmp_path / "data" / f"c{k}" / f"{i}.png")
    out = tmp_path / "cmp"
    assert main(["compare", "--mixers", "dwconv,involution", "--data", f"folder:{tmp_path / 'data'}", "--size", "8",
                 "--epochs", "1", "--seeds", "1", "--batch-size", "4", "--width", "16", "--out", str(out), "--no-progress"]) == 0
    payload = json.loads((out / "compare.json").read_text())
    assert payload["config"]["test_size"] == 3  # one image of each class held out
    assert [r["mixer"] for r in payload["results"]] == ["dwconv", "involution"]
    # an RGB stem (3 input channels) and a 3-class head
    assert payload["results"][0]["params"] == sum(p.numel() for p in SmallNet("dwconv", num_classes=3, in_channels=3,
                                                                              width=16).parameters())
    assert (out / "kernels_involution.png").exists()


def test_compare_rejects_unknown_mixer(tmp_path, capsys):
    assert main(["compare", "--mixers", "conv,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenmix compare: error: --mixers: unknown mixer(s) 'nope'; known: conv")
    assert err.count("\n") == 1


@pytest.mark.parametrize("mixer", list_mixers())
def test_small_net_runs_every_mixer(mixer):
    torch.manual_seed(0)
    net = SmallNet(mixer, num_classes=10, in_channels=1, width=16)
    x = torch.randn(3, 1, 8, 8)
    y = net(x)
    assert y.shape == (3, 10) and torch.isfinite(y).all()
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert len(net.mixers()) == 2


def test_small_net_argument_errors():
    with pytest.raises(ValueError, match="norm must be one of"):
        SmallNet("conv", norm="layer")
    with pytest.raises(ValueError, match="width must be >= 1, got 0"):
        SmallNet("conv", width=0)
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        SmallNet("nope")


def test_train_one_is_deterministic():
    split = load_data("digits")
    kw = dict(epochs=1, batch_size=128, lr=3e-3, weight_decay=0.01, seed=4, width=16, depth=1, kernel_size=3,
              progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `tokenmix compare` runs it; 2 threads on a busy 2-core box are ~10x slower
    try:
        a = train_one("involution", split, **kw)
        b = train_one("involution", split, **kw)
    finally:
        torch.set_num_threads(threads)
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    for (ka, pa), (kb, pb) in zip(a["model"].state_dict().items(), b["model"].state_dict().items()):
        assert ka == kb and torch.equal(pa, pb), ka


def test_heat_map_reduction_rule():
    w = torch.randn(2, 3, 9, 4, 5)
    assert choose_reduction(w, batch=2) == "sum"  # involution: the paper's tap sum
    assert choose_reduction(w.softmax(2), batch=2) == "max"  # attention: the tap sum is flat (1)
    assert choose_reduction(torch.randn(1, 3, 9, 1, 1), batch=2) is None  # static: dwconv
    assert choose_reduction(torch.randn(1, 3, 9, 4, 5), batch=1) == "sum"


def test_format_table_and_summary():
    runs = [{"mixer": "conv", "seed": s, "params": 60074, "macs": 1_520_000, "macs_counter": "fvcore",
             "train_time_s": t, "time_per_epoch_s": t / 2, "test_acc": a, "test_loss": 0.1,
             "history": [{"epoch": 1, "test_acc": 0.5, "train_loss": 1.0}, {"epoch": 2, "test_acc": a, "train_loss": 0.5}]}
            for s, t, a in ((0, 4.0, 0.99), (1, 6.0, 0.98), (2, 5.0, 0.97))]
    r = summarize(runs)
    assert r["test_acc_mean"] == pytest.approx(0.98) and r["test_acc_std"] == pytest.approx(0.01)
    assert r["curves"][0] == {"epoch": 1, "test_acc_mean": 0.5, "test_acc_std": 0.0, "train_loss_mean": 1.0,
                              "train_loss_std": 0.0}
    assert format_table([r]).splitlines()[-1] == "| conv | 60,074 | 1.52 M | 2.50 | 98.00 ± 1.00 | 97.00 - 99.00 | 3 |"
