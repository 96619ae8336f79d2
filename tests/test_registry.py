import sys
import textwrap

import pytest

from privbench.errors import UserError
from privbench.plugin import registry
from privbench.plugin.base import Defense

PLUGIN = textwrap.dedent(
    """
    from privbench.plugin.base import Defense

    class Shrink(Defense):
        name = "{name}"
        summary = "penalize the activation norm"

        def __init__(self, *, weight=0.5):
            self.weight = weight

        def loss(self, z, y, *, epoch, lr):
            return self.weight * z.pow(2).mean()
    """
)


def test_builtin_none_is_registered():
    assert "none" in registry.names("defense")
    assert registry.get("defense", "none").name == "none"


def test_plugin_from_file(tmp_path):
    path = tmp_path / "shrink.py"
    path.write_text(PLUGIN.format(name="shrink-file"))
    (cls,) = registry.load_plugin_file(path)
    assert registry.get("defense", "shrink-file") is cls
    obj = registry.create("defense", "shrink-file", {"weight": 2.0})
    assert obj.weight == 2.0 and obj.options() == {"weight": 2.0}
    assert registry.create("defense", "shrink-file").options() == {"weight": 0.5}


def test_plugin_from_entry_point(tmp_path, monkeypatch):
    # A fake installed distribution: a module plus dist-info declaring the entry point.
    (tmp_path / "ep_plugin.py").write_text(PLUGIN.format(name="shrink-ep"))
    info = tmp_path / "ep_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[privbench.defenses]\nshrink-ep = ep_plugin:Shrink\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_discovered", False)
    assert "shrink-ep" in registry.names("defense")
    assert registry.get("defense", "shrink-ep").__module__ == "ep_plugin"
    sys.modules.pop("ep_plugin", None)


def test_name_clash_is_refused():
    class Impostor(Defense):
        name = "none"

    with pytest.raises(UserError, match="taken by"):
        registry.register(Impostor)


def test_unknown_name_and_option():
    with pytest.raises(UserError, match="unknown defense 'nope'"):
        registry.get("defense", "nope")
    with pytest.raises(UserError, match="has no option 'lr'"):
        registry.create("defense", "none", {"lr": 1})


def test_plugin_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        registry.load_plugin_file(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UserError, match="failed to import: RuntimeError: boom"):
        registry.load_plugin_file(bad)
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(UserError, match="defines no Attack or Defense"):
        registry.load_plugin_file(empty)


def test_core_never_imports_a_specific_plugin():
    import pathlib

    import privbench

    core = pathlib.Path(privbench.__file__).parent
    for path in core.glob("*.py"):
        text = path.read_text()
        for mod in ("privbench.defenses.", "privbench.attacks.", "from defenses", "from attacks"):
            assert mod not in text, f"{path.name} imports a specific plugin ({mod})"
