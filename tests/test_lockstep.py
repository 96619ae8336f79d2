"""bench/lockstep.py: the baton's turn order, and a tiny lock-step run through the real loop."""

import importlib.util
import sys
import threading
from pathlib import Path

from privbench.plugin import registry


def load_lockstep():
    path = Path(__file__).parent.parent / "bench" / "lockstep.py"
    spec = importlib.util.spec_from_file_location("bench_lockstep", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_baton_gives_turns_in_a_ring_and_skips_runs_that_left():
    baton = load_lockstep().Baton(3)
    order: list[int] = []

    def run(i: int, turns: int) -> None:
        baton.wait(i)
        for t in range(turns):
            order.append(i)
            if t < turns - 1:
                baton.pass_on(i)
                baton.wait(i)
        baton.pass_on(i, leave=True)

    threads = [threading.Thread(target=run, args=(i, n)) for i, n in enumerate((3, 1, 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert order == [0, 1, 2, 0, 2, 0]


def test_tiny_lockstep_run_times_each_defense_and_cleans_up():
    report = load_lockstep().main(["--epochs", "3", "--n-train", "300", "--width", "0.125", "--defense", "slot-cem"])
    assert set(report["epoch_seconds"]) == {"none", "slot-cem"}
    assert all(s > 0 for s in report["epoch_seconds"].values())
    assert not [n for n in registry.names("defense") if "lockstep" in n]
