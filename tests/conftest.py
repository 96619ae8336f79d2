import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy-waiting OpenMP threads starve a shared 2-core box

import pytest
import torch

from privbench.cli.commands import main
from privbench.engine.config import TrainConfig
from privbench.engine.train import load_data
from privbench.store.runs import train_run

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Keep the embedded data cache of the tests out of the user's cache."""
    import os

    os.environ["PRIVBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


def tiny_config(**kw) -> TrainConfig:
    """A training configuration that runs in a few seconds on 2 CPU cores."""
    base = dict(epochs=1, n_train=300, width=0.125, progress=False)
    base.update(kw)
    return TrainConfig.from_preset("quick", **base)


@pytest.fixture
def tiny():
    return tiny_config


def run_cli(args, capsys):
    """Run the command line in-process; returns (exit code, stdout, stderr)."""
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


# Shared by the defense tests: tiny runs trained once per test module, by defense and options.
@pytest.fixture(scope="module")
def data():
    return load_data(tiny_config(), torch.device("cpu"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cache = {}

    def get(defense, **kw):
        key = repr((defense, sorted(kw.items())))
        if key not in cache:
            cache[key] = train_run(tiny_config(defense=defense, **kw), root, log=lambda m: None)[0]
        return cache[key]

    return get
