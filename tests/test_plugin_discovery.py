"""Plugin discovery: broken entry points warn once, name clashes say who wins."""

import pytest

from privbench.errors import UserError
from privbench.plugin import registry
from privbench.plugin.base import Defense

# ------------------------------------------------------------------------- broken plugins


class _Dist:
    def __init__(self, name):
        self.name = name


class _EntryPoint:
    def __init__(self, name, value, dist, load):
        self.name, self.value, self.dist, self._load = name, value, _Dist(dist), load

    def load(self):
        return self._load()


def _fail():
    raise ImportError("No module named 'missing_dependency'")


class Clash(Defense):
    name = "none"


class Fine(Defense):
    name = "fine-ep"


@pytest.fixture
def fresh_registry(monkeypatch):
    """An undiscovered registry whose entry points the test decides."""
    monkeypatch.setattr(registry, "_REGISTRY", {"attack": {}, "defense": {}})
    monkeypatch.setattr(registry, "_BROKEN", {"attack": {}, "defense": {}})
    monkeypatch.setattr(registry, "_ORIGIN", {})
    monkeypatch.setattr(registry, "_WARNED", set())
    monkeypatch.setattr(registry, "_discovered", False)

    def use(eps):
        monkeypatch.setattr(registry, "entry_points", lambda group: [e for e in eps if e.group == group])

    return use


def _ep(name, group, dist, load):
    ep = _EntryPoint(name, f"{dist.replace('-', '_')}:Plugin", dist, load)
    ep.group = group
    return ep


def test_broken_entry_points_warn_once_and_the_rest_works(fresh_registry, capsys):
    fresh_registry(
        [
            _ep("broken", "privbench.defenses", "broken-dist", _fail),
            _ep("notaplugin", "privbench.attacks", "odd-dist", lambda: dict),
            _ep("fine-ep", "privbench.defenses", "fine-dist", lambda: Fine),
        ]
    )
    assert {"none", "gmm-cem", "fine-ep"} <= set(registry.names("defense"))
    assert "decoder" in registry.names("attack")
    err = capsys.readouterr().err
    assert err.count("warning:") == 2
    assert "broken-dist" in err and "ImportError: No module named 'missing_dependency'" in err
    assert "odd-dist" in err and "neither an Attack nor a Defense" in err
    registry.names("defense")
    assert capsys.readouterr().err == ""  # once
    with pytest.raises(UserError, match="'broken' .* from distribution broken-dist is broken"):
        registry.get("defense", "broken")
    with pytest.raises(UserError, match="distribution odd-dist"):
        registry.get("attack", "notaplugin")


def test_name_clash_says_who_wins(fresh_registry, capsys):
    fresh_registry([_ep("none", "privbench.defenses", "clash-dist", lambda: Clash)])
    assert registry.get("defense", "none").__name__ == "NoDefense"
    err = capsys.readouterr().err
    assert "NoDefense (built in), which stays in force" in err
    assert "test_plugin_discovery.Clash (distribution clash-dist) is ignored" in err


def test_plugin_file_loaded_first_does_not_displace_a_built_in(fresh_registry, tmp_path):
    fresh_registry([])
    path = tmp_path / "mine.py"
    path.write_text("from privbench.plugin.base import Defense\n\nclass Mine(Defense):\n    name = 'none'\n")
    with pytest.raises(UserError, match=r"NoDefense \(built in\), which stays in force; .*Mine \(file .*\) is ignored"):
        registry.load_plugin_file(path)
    assert registry.get("defense", "none").__name__ == "NoDefense"
