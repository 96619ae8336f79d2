"""Options `[NAME.]key=value`: one parser and one router for the command line, TOML, sweeps and the API."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from privbench.engine.config import TrainConfig
from privbench.errors import UserError
from privbench.grid.spec import Grid
from privbench.plugin import options, registry, stack
from privbench.plugin.base import Defense


def test_parse_keeps_the_plugin_name_and_normalises_the_key():
    assert options.parse("gmm-cem.lam=8") == options.Option("gmm-cem", "lam", 8)
    assert options.parse("warm-up=0.5") == options.Option(None, "warm_up", 0.5)
    assert options.parse("my.pkg-def.start-at=2") == options.Option("my.pkg-def", "start_at", 2)
    assert options.parse("decoder.mode=fast").value == "fast"  # not JSON: the string itself
    assert options.parse("x.flags=[1, 2]").value == [1, 2]
    assert options.parse(("gmm-cem.lam", 16)) == options.Option("gmm-cem", "lam", 16)


@pytest.mark.parametrize(
    "bad,message",
    [
        ("lam", "expected [NAME.]key=value"),
        ("=3", "expected [NAME.]key=value"),
        (".lam=3", "expected NAME.key=value"),
        ("gmm-cem.=3", "no key after"),
    ],
)
def test_parse_errors_are_one_line(bad, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        options.parse(bad)


def test_parse_all_takes_every_mapping_form():
    got = options.parse_all({"gmm-cem": {"warm-up": 1}, "dropout.rate": 0.3, "lam": 4})
    assert got == [
        options.Option("gmm-cem", "warm_up", 1),
        options.Option("dropout", "rate", 0.3),
        options.Option(None, "lam", 4),
    ]


def test_route_named_and_bare_options():
    d, a = options.route(
        options.parse_all(["gmm-cem.lam=8", "warmup=0", "decoder.epochs=2"]),
        defenses=["none@plain", "gmm-cem", "slot-cem"],
        attacks=["decoder"],
    )
    assert d == {"gmm-cem": {"lam": 8, "warmup": 0}, "slot-cem": {"warmup": 0}}
    assert a == {"decoder": {"epochs": 2}}


def test_route_refuses_an_ambiguous_bare_key_within_one_stack():
    with pytest.raises(UserError, match="'lam' is ambiguous in 'gmm-cem.slot-cem'"):
        options.route([options.Option(None, "lam", 4)], defenses=["gmm-cem+slot-cem"])


def numeric_option(name: str) -> tuple[str, float] | None:
    found = [
        (k, v)
        for k, v in registry.option_defaults(registry.get("defense", name)).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    return found[0] if found else None


DEFENSES_WITH_OPTIONS = [n for n in registry.names("defense") if numeric_option(n)]


@pytest.mark.parametrize("name", DEFENSES_WITH_OPTIONS)
def test_every_defense_takes_a_per_part_option_in_a_stack(name):
    """`-o NAME.key=value` reaches its part whatever the name (hyphens included), on train
    (stack routing), run (the grid) and TOML ([defenses.NAME])."""
    key, value = numeric_option(name)  # its default: a value the plugin accepts; the route is under test
    spec = f"none+{name}"
    pair = f"{name}.{key.replace('_', '-')}={value}"
    routed = stack.route_options(stack.parts(spec), options.as_dict(options.parse_all([pair])))
    assert routed[name] == {key: value}
    grid = Grid(defense=[spec], option=[pair], attack=["decoder"])
    assert grid.defenses[name] == {key: value}
    toml = Grid(defense=[spec], defenses={name: {key: value}}, attack=["decoder"])
    assert toml.defenses[name] == {key: value}


class HyphenatedDefense(Defense):
    name = "my-test-def"
    knob = "start_at"

    def __init__(self, *, start_at: float = 1.0):
        self.start_at = start_at


def test_a_hyphenated_plugin_registered_later_takes_per_part_options():
    registry.register(HyphenatedDefense)
    given = options.as_dict(options.parse_all(["my-test-def.start-at=2"]))
    cfg = TrainConfig.from_preset("quick", defense="dropout+my-test-def", defense_options=given)
    assert cfg.defense_options == {"my-test-def": {"start_at": 2.0}}
    assert stack.create(cfg.defense, cfg.defense_options).members[1][1].start_at == 2.0


def test_train_takes_a_per_part_option_of_a_hyphenated_defense(tmp_path, capsys):
    """The README's stack example: `train --defense dropout+gmm-cem -o gmm-cem.lam=8`."""
    args = [
        "train",
        "--defense",
        "dropout+gmm-cem",
        "-o",
        "gmm-cem.lam=8",
        "--epochs",
        "1",
        "--n-train",
        "200",
        "--width",
        "0.125",
        "--quiet",
        "--results-dir",
        str(tmp_path),
    ]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    run = out.strip().splitlines()[-1]
    saved = json.loads((tmp_path / run.rsplit("/", 1)[-1] / "config.json").read_text())
    assert saved["train"]["defense_options"] == {"gmm-cem": {"lam": 8.0}}


def test_train_option_naming_a_defense_outside_the_stack_exits_2(tmp_path, capsys):
    code, _, err = run_cli(
        ["train", "--defense", "dropout", "-o", "gmm-cem.lam=8", "--results-dir", str(tmp_path)], capsys
    )
    assert code == 2 and err.count("\n") == 1
    assert "names 'gmm-cem', which is not in the stack (defenses: dropout)" in err


def test_a_run_option_is_parsed_once_and_built_into_its_plugin(monkeypatch):
    """`run -o gmm-cem.lam=8`: the text is parsed once (plugin.options), stored canonical in the
    TrainConfig (8 -> 8.0, the option's type), and the plugin is built with it."""
    texts = []
    real = options.parse_value
    monkeypatch.setattr(options, "parse_value", lambda text: texts.append(text) or real(text))
    grid = Grid(defense=["dropout+gmm-cem"], option=["gmm-cem.lam=8"], seeds=2, sweep="off")
    configs = grid.train_configs()
    assert texts == ["8"]
    assert [c.defense_options for c in configs] == [{"gmm-cem": {"lam": 8.0}}] * 2
    built = stack.create(configs[0].defense, configs[0].defense_options)
    assert dict(built.members)["gmm-cem"].lam == 8.0


class _Built(BaseException):  # not an Exception: no handler on the way may swallow it
    pass


def _holds_option(value, depth: int = 0) -> bool:
    """Whether a function argument is `gmm-cem.lam=8` in one of its forms: the string, a parsed
    Option, or an options mapping (nested per stack part)."""
    if depth > 3:
        return False
    if isinstance(value, str):
        return "lam=8" in value
    if isinstance(value, options.Option):
        return value.key == "lam" and value.value == 8
    if isinstance(value, dict):
        return (
            value.get("lam") == 8
            or value.get("gmm-cem.lam") == 8
            or any(_holds_option(v, depth + 1) for v in value.values())
        )
    if isinstance(value, list | tuple):
        return any(_holds_option(v, depth + 1) for v in value[:20])
    return False


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--defense", "gmm-cem", "-o", "gmm-cem.lam=8", "--epochs", "1"],
        ["train", "--defense", "dropout+gmm-cem", "-o", "gmm-cem.lam=8", "--epochs", "1"],
    ],
)
def test_an_option_reaches_its_plugin_through_at_most_five_modules(args, tmp_path, monkeypatch):
    """Every privbench function that receives the option itself (not a grid or a training
    configuration holding it), traced from the command line to the plugin's constructor: besides
    the command line, at most five modules."""
    import functools
    import sys

    from privbench.cli.commands import cli

    cls = registry.get("defense", "gmm-cem")
    original = cls.__init__

    @functools.wraps(original)  # keeps the signature the registry reads
    def built(self, *a, **kw):
        raise _Built(kw)

    monkeypatch.setattr(cls, "__init__", built)
    seen: list[str] = []

    def profile(frame, event, arg):
        module = frame.f_globals.get("__name__", "")
        if event == "call" and module.startswith("privbench.") and module not in seen:
            try:
                hit = any(_holds_option(v) for v in list(frame.f_locals.values())[:12])
            except Exception:  # an object half-built in its __init__
                hit = False
            if hit:
                seen.append(module)

    sys.setprofile(profile)
    try:
        with pytest.raises(_Built) as got:
            cli.main(args=[*args, "--results-dir", str(tmp_path)], prog_name="privbench", standalone_mode=False)
    finally:
        sys.setprofile(None)
    assert got.value.args[0] == {"lam": 8.0}  # typed and canonical when it arrives
    assert seen[0] == "privbench.cli.commands"
    assert len(seen[1:]) <= 5, seen
    assert {"privbench.plugin.options", "privbench.plugin.registry"} <= set(seen)
