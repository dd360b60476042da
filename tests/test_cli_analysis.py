"""The analysis subcommands of the ``tokenmix`` command, run in-process through
``tokenmix.cli.main`` (one subprocess run of the installed console script)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from tokenmix.cli import main
from tokenmix.mixers import list_mixers


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_zoo_subset_with_latency(capsys):
    rc, out, err = run(capsys, "zoo", "--models", "resnet26,rednet26", "--size", "32", "--latency")
    assert rc == 0, err
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| model | params (M) |") and "CPU ms/img" in lines[0]
    assert lines[1].startswith("| resnet26 | 13.70 | 13.7 |") and lines[2].startswith("| rednet26 | 9.23 | 9.2 |")
    assert "counting rednet26" in err


def test_zoo_errors(capsys):
    rc, out, err = run(capsys, "zoo", "--models", "resnet26,resnet9")
    assert rc == 2 and "unknown model(s) 'resnet9'" in err and "known: " in err and out == ""
    rc, _, err = run(capsys, "zoo", "--models", "resnet26", "--size", "8")
    assert rc == 2 and "size must be >= 32, got 8" in err


def test_flops(capsys):
    rc, out, err = run(capsys, "flops", "rednet26", "--size", "32", "--params")
    assert rc == 0, err
    assert out.startswith("rednet26 @ 32x32: 9.233 M params")
    assert "aggregate" in out and "stages.0" in out and "torch FlopCounterMode" in out
    assert "| name " in out  # fvcore's parameter table


def test_flops_errors(capsys):
    rc, _, err = run(capsys, "flops", "rednet27")
    assert rc == 2 and "unknown model 'rednet27'" in err and "rednet26" in err
    rc, _, err = run(capsys, "flops", "resnet26", "--size", "31")
    assert rc == 2 and "size must be >= 32, got 31" in err


def test_mixers(capsys):
    rc, out, err = run(capsys, "mixers", "--dim", "32", "--size", "6", "--kernel-size", "3")
    assert rc == 0, err
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")][1:]
    assert rows == list_mixers()
    # dwconv: 32 * 6 * 6 * 9 multiply-adds = 0.01 M, all in the aggregate column
    assert "| dwconv | 0.3 | 0.01 | 0.00 | 0.01 | 0.00 |" in out


def test_mixers_errors(capsys):
    rc, _, err = run(capsys, "mixers", "--size", "0")
    assert rc == 2 and "size must be >= 1, got 0" in err
    rc, _, err = run(capsys, "mixers", "--mixers", "involution,nope")
    assert rc == 2 and "unknown mixer(s) 'nope'" in err


def _png_size(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_viz_fresh_mixer_and_model_layer(capsys, tmp_path):
    out = tmp_path / "inv.png"
    rc, text, err = run(capsys, "viz", "--mixer", "involution", "--size", "64", "--dim", "32", "--out", str(out))
    assert rc == 0, err
    assert "fresh involution (dim 32, K 7, seed 0)" in text
    w, h = _png_size(out)
    assert w > 400 and h > 150

    img = tmp_path / "in.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(img)
    out2 = tmp_path / "layer.png"
    rc, text, err = run(capsys, "viz", "--model", "rednet26", "--layer", "stages.1.0.mixer", "--image", str(img),
                        "--size", "64", "--reduce", "max", "--groups", "2", "--out", str(out2))
    assert rc == 0, err
    assert "rednet26.stages.1.0.mixer (random weights, seed 0): max over K*K taps, 2 of 8 groups" in text
    _png_size(out2)


def test_viz_errors(capsys, tmp_path):
    out = str(tmp_path / "x.png")
    rc, _, err = run(capsys, "viz", "--mixer", "conv", "--size", "32", "--out", out)
    assert rc == 2 and "plain nn.Conv2d" in err
    rc, _, err = run(capsys, "viz", "--model", "rednet26", "--layer", "stages.0.0", "--size", "32", "--out", out)
    assert rc == 2 and "generates no kernel; choose one of: stem.mixer" in err
    rc, _, err = run(capsys, "viz", "--model", "nonet", "--out", out)
    assert rc == 2 and "unknown model 'nonet'" in err
    rc, _, err = run(capsys, "viz", "--mixer", "involution", "--image", str(tmp_path / "none.jpg"), "--out", out)
    assert rc == 2 and "is not a file" in err
    rc, _, err = run(capsys, "viz", "--mixer", "involution", "--size", "16", "--out", out)
    assert rc == 2 and "--size must be >= 32" in err
    assert not os.path.exists(out)
    rc, _, err = run(capsys, "viz", "--out", out)  # --mixer, --model or --checkpoint is required
    assert rc == 2 and "give --mixer NAME, --model NAME or --checkpoint FILE" in err


@pytest.mark.parametrize("command", ["zoo", "flops", "mixers", "viz"])
def test_help(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tokenmix {command}")
    assert "--size" in out


def test_console_script_help():
    exe = shutil.which("tokenmix") or os.path.join(os.path.dirname(sys.executable), "tokenmix")
    assert os.path.exists(exe), "the tokenmix console script is not installed"
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for command in ("zoo", "flops", "mixers", "viz"):
        assert command in res.stdout
