"""The command line around user code and user mistakes: ``--import`` (a .py file or a dotted
module) and ``tokenmix.plugins`` entry points make user-registered names usable in every
subcommand; every user mistake is one ``error:`` line with exit code 2; ``tokenmix build``."""

from __future__ import annotations

import json
import sys
import uuid

import pytest

from tokenmix.cli import COMMANDS, main

PLUGIN = '''
import torch
from torch import nn
from tokenmix.kernel_gen import register_kernel_gen
from tokenmix.mixers import Mixer, register_mixer
from tokenmix.ops import Window

@register_kernel_gen("{name}_gen")
class Span(nn.Module):
    """One 1x1 conv -> (B, G, K*K, Ho, Wo), softmax over the taps."""
    def __init__(self, channels, kernel_size=3, *, stride=1, groups=2, device=None, dtype=None):
        super().__init__()
        self.groups, self.taps = groups, kernel_size ** 2
        self.span = nn.Conv2d(channels, groups * self.taps, 1, device=device, dtype=dtype)

    def forward(self, x, window):
        sh, sw = window.stride
        s = self.span(x[:, :, ::sh, ::sw])
        return s.view(s.shape[0], self.groups, self.taps, s.shape[2], s.shape[3]).softmax(2)

@register_mixer("{name}")
def build(dim, *, kernel_size=3, stride=1, device=None, dtype=None):
    return Mixer(dim, Span(dim, kernel_size, stride=stride, device=device, dtype=dtype),
                 Window(kernel_size, stride=stride))
'''


@pytest.fixture
def plugin(tmp_path):
    """A .py file registering a kernel generator and a mixer preset under a fresh name; the
    registries are restored afterwards."""
    from tokenmix.kernel_gen import registry as gens
    from tokenmix.mixers import registry as mixers

    saved = [(r, dict(r)) for r in (gens._KERNEL_GENS, mixers._MIXERS)]
    name = f"user_mixer_{uuid.uuid4().hex[:8]}"
    path = tmp_path / "my_mixers.py"
    path.write_text(PLUGIN.format(name=name))
    yield name, path
    for registry, before in saved:
        registry.clear()
        registry.update(before)


def _one_error_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


def test_unknown_user_mixer_without_import_is_one_error_line(plugin, capsys, tmp_path):
    name, _ = plugin
    assert main(["viz", "--mixer", name, "--out", str(tmp_path / "v.png"), "--size", "32"]) == 2
    assert f"unknown mixer {name!r}" in _one_error_line(capsys, "tokenmix viz")


def test_a_generator_in_a_user_file_works_in_every_subcommand(plugin, tmp_path, capsys):
    name, path = plugin
    imp = ["--import", str(path)]
    assert main(["mixers", *imp, "--mixers", name, "--dim", "16", "--size", "8", "--kernel-size", "3"]) == 0
    assert f"| {name} |" in capsys.readouterr().out
    assert main(["viz", *imp, "--mixer", name, "--dim", "16", "--kernel-size", "3", "--size", "32",
                 "--reduce", "max", "--out", str(tmp_path / "v.png")]) == 0
    assert (tmp_path / "v.png").exists()
    assert main(["compare", *imp, "--mixers", name, "--epochs", "1", "--seeds", "1", "--width", "8",
                 "--out", str(tmp_path / "cmp"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["results"][0]["mixer"] == name
    run = tmp_path / "run"
    assert main(["train", *imp, "--model", f"small:{name}", "--model-arg", "width=8", "--epochs", "1",
                 "--batch-size", "256", "--threads", "1", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    # the checkpoint names the user's mixer: flops and viz rebuild it with the same --import
    assert main(["flops", *imp, "--checkpoint", str(run / "model.safetensors")]) == 0
    assert f"small:{name} @ 8x8" in capsys.readouterr().out
    assert main(["viz", *imp, "--checkpoint", str(run / "model.safetensors"), "--size", "32",
                 "--out", str(tmp_path / "c.png")]) == 0


def test_import_takes_a_dotted_module_name(plugin, monkeypatch, capsys):
    name, path = plugin
    monkeypatch.syspath_prepend(str(path.parent))
    monkeypatch.delitem(sys.modules, "my_mixers", raising=False)
    assert main(["mixers", "--import", "my_mixers", "--mixers", name, "--dim", "16", "--size", "8",
                 "--kernel-size", "3"]) == 0
    assert f"| {name} |" in capsys.readouterr().out


@pytest.mark.parametrize("target,match", [
    ("no_such_module_xyz", "--import 'no_such_module_xyz': No module named 'no_such_module_xyz'"),
    ("/nonexistent/dir/mod.py", "--import '/nonexistent/dir/mod.py': no such file"),
])
def test_import_errors_name_the_module(target, match, capsys):
    assert main(["mixers", "--import", target]) == 2
    assert match in _one_error_line(capsys, "tokenmix mixers")


def test_import_of_a_failing_file_names_it(tmp_path, capsys):
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom')\n")
    assert main(["zoo", "--import", str(bad)]) == 2
    assert f"--import {str(bad)!r} failed: RuntimeError: boom" in _one_error_line(capsys, "tokenmix zoo")


def test_entry_point_plugins_are_loaded(plugin, tmp_path, monkeypatch, capsys):
    """A package registering through the ``tokenmix.plugins`` entry-point group (here a
    dist-info directory on sys.path, as pip installs one) needs no --import."""
    name, path = plugin
    site = tmp_path / "site"
    dist = site / "my_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tokenmix.plugins]\nmine = my_plugin_mod\n")
    (site / "my_plugin_mod.py").write_text(path.read_text())
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "my_plugin_mod", raising=False)
    assert main(["mixers", "--mixers", name, "--dim", "16", "--size", "8", "--kernel-size", "3"]) == 0
    assert f"| {name} |" in capsys.readouterr().out


# ----------------------------------------------------------------------------- user mistakes


@pytest.mark.parametrize("argv,prog,match", [
    (["train", "--lr", "inf"], "train", "--lr must be a finite number > 0, got inf"),
    (["train", "--lr", "nan"], "train", "--lr must be a finite number > 0, got nan"),
    (["train", "--lr", "0"], "train", "--lr must be a finite number > 0, got 0.0"),
    (["train", "--weight-decay", "-0.1"], "train", "--weight-decay must be a finite number >= 0, got -0.1"),
    (["train", "--warmup-epochs", "-1"], "train", "--warmup-epochs must be within the run"),
    (["train", "--epochs", "2", "--warmup-epochs", "3"], "train", "--warmup-epochs must be within the run"),
    (["train", "--epochs", "0"], "train", "--epochs must be >= 1, got 0"),
    (["train", "--test-fraction", "0"], "train", "--test-fraction must be in (0, 1), got 0.0"),
    (["train", "--threads", "0"], "train", "--threads must be >= 1, got 0"),
    (["train", "--model", "nonet"], "train", "--model 'nonet': unknown model 'nonet'; known: "),
    (["train", "--model", "small:conv", "--model-arg", "width=0"], "train", "width must be >= 1, got 0"),
    (["train", "--data", "mnist"], "train", "unknown data 'mnist'"),
    (["compare", "--lr", "-1"], "compare", "--lr must be a finite number > 0, got -1.0"),
    (["compare", "--seeds", "0"], "compare", "--seeds must be >= 1, got 0"),
    (["compare", "--mixers", ","], "compare", "--mixers must name at least one mixer"),
    (["compare", "--data", "folder:/nonexistent/x"], "compare", "data folder '/nonexistent/x' does not exist"),
    (["flops"], "flops", "give a MODEL name or --checkpoint FILE"),
    (["flops", "nonet"], "flops", "unknown model 'nonet'"),
    (["flops", "--checkpoint", "/nonexistent.safetensors"], "flops", "'/nonexistent.safetensors' does not exist"),
    (["viz", "--checkpoint", "/nonexistent.safetensors", "--out", "x.png"], "viz", "does not exist"),
    (["viz", "--mixer", "involution", "--image", "/nonexistent.png", "--out", "x.png"], "viz",
     "'/nonexistent.png' is not a file"),
    (["zoo", "--models", "nonet"], "zoo", "nonet"),
    (["mixers", "--mixers", "nope"], "mixers", "nope"),
])
def test_user_mistakes_are_one_error_line(argv, prog, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert match in _one_error_line(capsys, f"tokenmix {prog}")


def test_every_subcommand_takes_import():
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--import", "/nonexistent.py", "--help"])
        assert e.value.code == 0


def test_unknown_command_is_one_error_line(capsys):
    assert main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in _one_error_line(capsys, "tokenmix")


def test_build_reports_the_cpu_kernels(capsys):
    assert main(["build"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU kernels ready in ") and " s (cache: " in out


def test_build_reports_an_unavailable_backend(monkeypatch, capsys):
    from tokenmix.ops import get_backend

    monkeypatch.setattr(type(get_backend("cpu")), "unavailable_reason", lambda self: "no compiler here")
    assert main(["build"]) == 1
    assert "the CPU kernels are unavailable: no compiler here" in capsys.readouterr().err
