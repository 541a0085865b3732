"""The `wmss` command behaves like its peers: plain `wmss` prints the usage and exits 2, typed errors become
one line per problem on stderr with the exit code of wmss.errors, the shipped configs travel inside the
package (listed by `wmss config list`, named by their stem), `--set` placed before CONFIG leaves CONFIG
alone, and Ray is joined in one place only."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import yaml

from wmss.cli import COMMANDS, build_parser, main
from wmss.config import load_config
from wmss.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parent.parent
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_plain_wmss_prints_the_usage_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: wmss")
    assert all(name in err for name in COMMANDS)


@pytest.fixture
def fake_stage(monkeypatch):
    """A `wmss fake` subcommand whose run function raises what the test puts in `raised`."""
    raised = []
    module = types.ModuleType("fake_stage")
    module.add = lambda parser: None

    def run(args):
        raise raised[0]

    module.run = run
    monkeypatch.setitem(sys.modules, "fake_stage", module)
    monkeypatch.setitem(COMMANDS, "fake", ("fake_stage", "add", "run", "a stage that fails"))
    return raised


def test_an_input_error_from_a_stage_is_one_line_and_exit_2(fake_stage, capsys):
    fake_stage.append(InputError("data.jsonl, line 3: field 'messages' is missing"))
    assert main(["fake"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "wmss fake: data.jsonl, line 3: field 'messages' is missing\n"
    assert captured.out == ""


def test_every_line_of_a_config_error_names_the_command(fake_stage, capsys):
    fake_stage.append(ConfigError("config x.yaml: sft.lr = 0: bad\nconfig x.yaml: jtws.lam = 2: bad"))
    assert main(["fake"]) == 2
    assert capsys.readouterr().err.splitlines() == ["wmss fake: config x.yaml: sft.lr = 0: bad",
                                                    "wmss fake: config x.yaml: jtws.lam = 2: bad"]


def test_ctrl_c_exits_130(fake_stage, capsys):
    fake_stage.append(KeyboardInterrupt())
    assert main(["fake"]) == 130
    assert "interrupted" in capsys.readouterr().err


def test_bad_flags_exit_2_like_config_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse's own exit, as for every CLI built on it
        main(["config", "show", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert main(["config", "show", "no/such/config.yaml"]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [
    (["--benchmarks", "gsm8k,gsm8kk"], "unknown benchmark(s) ['gsm8kk']"),
    (["--benchmarks", "gsm8k", "--samples", "4"], "identical greedy responses"),
])
def test_a_bad_eval_flag_is_one_line_and_exit_2(flags, named, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wmss eval: ") and named in err and len(err.splitlines()) == 1, err


def _first_comment(path: Path) -> str:
    return next(line for line in path.read_text().splitlines() if line.startswith("#")).lstrip("#").strip()


def test_config_list_names_every_shipped_config_with_its_description(capsys):
    assert main(["config", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(SHIPPED)
    for line, path in zip(lines, SHIPPED):
        name, about = line.split(maxsplit=1)
        assert name == path.stem and about == _first_comment(path)


def test_config_show_takes_a_shipped_config_name(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # names resolve inside the package, not against the current directory
    assert main(["config", "show", "qwen3-8b"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == load_config(REPO / "configs" / "qwen3-8b.yaml").model_dump(mode="json")
    assert main(["config", "show"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "demo"
    assert main(["config", "show", "qwen3-9b"]) == 2
    assert "qwen3-8b" in capsys.readouterr().err  # the error lists the shipped names


@pytest.mark.parametrize("command", ["run", "tune", "submit", "config"])
def test_set_before_config_leaves_config_alone(command, tmp_path):
    path = str(tmp_path / "mine.yaml")
    head = [command, "show"] if command == "config" else [command]
    for argv in ([*head, "--set", "a=1", "b=2", path], [*head, "--set", "a=1", "--set", "b=2", path],
                 [*head, path, "--set", "a=1", "b=2"], [*head, "--set", "a=1", path, "--set", "b=2"]):
        args = build_parser(argv).parse_args(argv)
        assert (args.config, args.overrides) == (path, ["a=1", "b=2"]), argv
    argv = [*head, "--set", "a=1", "demo"]  # a shipped config's name too
    assert build_parser(argv).parse_args(argv).config == "demo"
    argv = [*head, path, "--set", "a=1", "other.yaml"]  # a second config is left to fail as an override
    assert build_parser(argv).parse_args(argv).overrides == ["a=1", "other.yaml"]


def test_set_before_config_reads_that_config(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\n")
    assert main(["config", "show", "--set", "seed=3", str(path)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["name"], shown["seed"]) == ("mine", 3)


@pytest.mark.parametrize("override, key, named", [
    ("eval.benchmarks=[gsm8k,gsm8kk]", "eval.benchmarks", ["'gsm8kk'", "math500"]),
    ("eval.methods=[wmss,foo]", "eval.methods", ["'foo'", "strong", "neftune"]),
    ("eval.methods=[wmss,undial]", "eval.methods", ["'undial'", "baselines.methods"]),
])
def test_unknown_benchmark_or_method_is_one_line_and_exit_2(override, key, named, capsys):
    assert main(["config", "show", "--set", override]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and key in err and all(n in err for n in named), err


def test_null_batch_size_names_the_section_the_user_wrote(capsys):
    assert main(["config", "show", "--set", "jtws.training.global_batch=null"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["wmss config: config demo: set jtws.training.global_batch (samples) or "
                                "jtws.training.global_batch_tokens"]


def test_the_wheel_ships_the_configs_and_every_module(tmp_path):
    source = tmp_path / "src"  # a copy: an in-tree build would leave build/ (and stale modules) in the repo
    for name in ("wmss", "workflows", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("wmss-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"wmss/configs/{p.name}" for p in SHIPPED} | {"wmss/configs/__init__.py"} <= names
    # pyproject.toml lists the packages (find cannot map configs/): a new subpackage must be listed too
    modules = {p.relative_to(REPO).as_posix() for folder in ("wmss", "workflows")
               for p in (REPO / folder).rglob("*.py")}
    assert modules <= names, f"missing from the wheel (add the package to pyproject.toml): {modules - names}"

    # the unpacked wheel, ahead of this checkout on sys.path, shows the demo by name from anywhere
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import sys, wmss.config; from wmss.cli import main; "
            f"assert wmss.config.__file__.startswith({str(tmp_path / 'site')!r}), wmss.config.__file__; "
            "sys.exit(main(['config', 'show', 'demo']))")
    shown = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout) == load_config(REPO / "configs" / "demo.yaml").model_dump(mode="json")


def test_ray_is_started_in_one_place_only():
    starts = [f"{p.relative_to(REPO)}:{n}" for folder in ("wmss", "workflows") for p in (REPO / folder).rglob("*.py")
              for n, line in enumerate(p.read_text().splitlines(), 1)
              if re.search(r"\bray\.(init|shutdown)\(", line) and p.name != "raycluster.py"]
    assert starts == []
