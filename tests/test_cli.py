import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from privbench.cli.commands import cli as cli_group


def test_list(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    assert "none" in out and "embedded" in out and "cifar10" in out and "folder:PATH" in out


def test_train_prints_accuracy_and_run_folder_last(tmp_path, capsys):
    args = [
        "train",
        "--epochs",
        "1",
        "--n-train",
        "300",
        "--width",
        "0.125",
        "--seed",
        "1",
        "--bottleneck",
        "C8",
        "--noise",
        "0.025",
        "--results-dir",
        str(tmp_path),
        "--quiet",
    ]
    code, out, _ = run_cli(args, capsys)
    lines = out.strip().splitlines()
    assert code == 0
    assert lines[-2].startswith("test accuracy: ")
    assert (tmp_path / lines[-1].split("/")[-1] / "checkpoint.pt").is_file()


def test_compile_flag_takes_an_optional_mode_and_keeps_the_run_folder(tmp_path, capsys, monkeypatch):
    import json

    import privbench.engine.train as train_mod

    monkeypatch.setattr(train_mod, "COMPILE_BACKEND", "aot_eager")  # inductor's C++ builds take minutes
    args = ["train", "--epochs", "1", "--n-train", "300", "--width", "0.125", "--results-dir", str(tmp_path)]
    code, out, _ = run_cli([*args, "--compile", "--quiet"], capsys)  # a bare --compile before another option
    assert code == 0, out
    folder = Path(out.strip().splitlines()[-1])
    assert json.loads((folder / "config.json").read_text())["train"]["compile"] == "default"
    code, out, _ = run_cli([*args, "--quiet"], capsys)
    assert "reused finished run" in out and out.strip().splitlines()[-1] == str(folder)


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--defense", "nope"], "unknown defense 'nope'"),
        (["train", "--cut", "0"], "invalid cut 0"),
        (["train", "--cut", "99"], "invalid cut 99"),
        (["train", "--dataset", "cifar10", "--data-dir", "nowhere"], "cifar-10-batches-py"),
        (["train", "--dataset", "folder:nowhere"], "image folder not found"),
        (["train", "--noise", "-0.5"], "invalid noise"),
        (["train", "--dataset", "mnist"], "unknown dataset"),
        (["train", "--bogus"], "No such option"),
        (["train", "--plugin", "missing.py"], "plugin file not found"),
        (["train", "--compile", "fast"], "invalid compile mode 'fast'"),
        (["run", "--compile", "fast"], "invalid compile mode 'fast'"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, capsys, tmp_path):
    code, out, err = run_cli([*args, "--results-dir", str(tmp_path)], capsys)
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_installed_command():
    out = subprocess.run(["privbench", "train", "--cut", "99"], capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == "error: invalid cut 99 for vgg11: valid cuts are 1..13"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "cli.py"), "list"], capture_output=True, text=True)
    assert out.returncode == 0 and "defenses:" in out.stdout


def test_every_help_ends_with_two_examples_and_run_groups_its_options(capsys):
    for args in ([], *([name] for name in cli_group.commands)):
        code, out, _ = run_cli([*args, "--help"], capsys)
        assert code == 0
        tail = out[out.index("Examples:") :]
        assert tail.count("privbench ") >= 2, args
    code, out, _ = run_cli(["run", "--help"], capsys)
    headings = [line for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings[:5] == ["Grid:", "Data and model:", "Attacks:", "Execution:", "Output:"]
