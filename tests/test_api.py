"""The Python API does what the command line does: the same early checks, options in any form."""

from __future__ import annotations

import json

import pytest

from privbench import api
from privbench.errors import UserError
from privbench.plugin import stack

TINY = dict(epochs=1, n_train=200, width=0.125, log=None)


@pytest.fixture(scope="module")
def stacked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    return root, api.train("dropout+gmm-cem", options={"gmm-cem.lam": 8}, results_dir=root, **TINY)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"defense": "nope"}, "unknown defense 'nope'"),
        ({"cut": 99}, "invalid cut 99"),
        ({"defense": "dropout", "options": {"gmm-cem.lam": 8}}, "names 'gmm-cem', which is not in the stack"),
        ({"options": {"model.depth": 3}}, "model options"),
    ],
)
def test_bad_train_input_is_refused_before_any_folder_is_written(kwargs, message, tmp_path):
    with pytest.raises(UserError, match=message):
        api.train(results_dir=tmp_path, **TINY, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_train_routes_a_stack_option_in_every_form(stacked_run):
    root, run = stacked_run
    saved = json.loads((run.path / "config.json").read_text())
    assert saved["train"]["defense_options"] == {"gmm-cem": {"lam": 8.0}}
    assert saved["defense_options"]["gmm-cem"]["lam"] == 8
    logged: list[str] = []
    for options in ({"gmm-cem": {"lam": 8}}, {"lam": 8}, ["gmm-cem.lam=8"]):  # the same run, reused
        again = api.train("dropout+gmm-cem", options=options, results_dir=root, **{**TINY, "log": logged.append})
        assert again.path == run.path
    assert sum("reused finished run" in line for line in logged) == 3


def test_train_builds_the_defense_once_and_a_reused_run_not_at_all(tmp_path, monkeypatch):
    built: list[str] = []
    real = stack.create
    monkeypatch.setattr(stack, "create", lambda spec, *a, **k: built.append(spec) or real(spec, *a, **k))
    api.train("dropout", results_dir=tmp_path, **TINY)
    assert built == ["dropout"]
    api.train("dropout", results_dir=tmp_path, **TINY)
    assert built == ["dropout"]


def test_attack_passes_semantic_through(stacked_run, monkeypatch):
    _, run = stacked_run
    monkeypatch.setenv("PRIVBENCH_SEMANTIC", "1")  # on unless the argument says otherwise
    (result,) = api.attack(run, ["optimization"], steps=2, eval_images=8, semantic=False, log=None)
    assert "sem_acc" not in result["metrics"] and "sem_acc" not in result["baseline"]


def test_attack_refuses_an_option_for_an_attack_it_does_not_run(stacked_run):
    _, run = stacked_run
    with pytest.raises(UserError, match="names 'ridge', which is not in the attacks run"):
        api.attack(run, ["decoder"], options={"ridge.alpha": 3}, log=None)


def test_plugins_lists_what_privbench_list_prints(capsys):
    from conftest import run_cli

    from privbench.engine.config import PRESETS

    found = api.plugins("quick")
    decoder = next(p for p in found["attack"] if p["name"] == "decoder")
    assert decoder["defaults"]["epochs"] == PRESETS["quick"]["attack_epochs"] and decoder["sweep"] is None
    gmm = next(p for p in found["defense"] if p["name"] == "gmm-cem")
    assert gmm["sweep"].startswith("lam=") and gmm["defaults"]["lam"] == 16
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0 and f"sweep: {gmm['sweep']}" in out and gmm["summary"] in out
    with pytest.raises(UserError, match="unknown preset 'fast'"):
        api.plugins("fast")


def test_report_checks_every_file_before_writing_any(tmp_path):
    import shutil
    from pathlib import Path

    shutil.copytree(Path(__file__).parents[1] / "docs" / "data" / "main-job", tmp_path / "rows")
    stale = tmp_path / "a.md"
    stale.write_text("<!-- privbench: verdicts rows -->\nold\n<!-- privbench: end -->\n")
    assert api.report([stale], check=True) == [stale] and "old" in stale.read_text()
    with pytest.raises(UserError, match="has no block"):
        (tmp_path / "b.md").write_text("no block here\n")
        api.report([stale, tmp_path / "b.md"])
    assert "old" in stale.read_text()  # nothing written when one file is bad
    assert api.report([stale]) == [stale] and "**gmm-cem**" in stale.read_text()
    assert api.report([stale], check=True) == []
