"""The saturation check: a learned attack repeated at twice its budget, flagged when SSIM still rises."""

import pytest
import torch
from conftest import run_cli, tiny_config

from privbench import api
from privbench.attack import saturation
from privbench.plugin import registry
from privbench.plugin.base import Attack
from privbench.report import table_format
from privbench.store.attacks import attack_run
from privbench.store.runs import train_run

QUIET = dict(log=lambda m: None, progress=False)


class Blend(Attack):
    """Ridge inversion, or the mean image at 1 epoch (`grows`), or shrunk half-way to the mean image:
    a learned attack whose quality does (or does not) depend on its budget, by construction."""

    name = "test-blend"
    grows = True

    def __init__(self, *, epochs: int = 1):
        self.epochs = epochs

    def fit(self, target, images):
        self.target = target
        z, x = target.query(images).flatten(1).double(), images.flatten(1).double()
        self.zm, self.xm = z.mean(0), x.mean(0)
        z, x = z - self.zm, x - self.xm
        gram = z.T @ z + 1e-2 * torch.eye(z.shape[1], dtype=z.dtype, device=z.device) * (z.T @ z).diagonal().mean()
        self.w = torch.linalg.solve(gram, z.T @ x)
        self.keep = (1.0 if self.epochs >= 2 else 0.0) if self.grows else 0.5

    def reconstruct(self, z):
        x = self.xm + self.keep * ((z.flatten(1).double() - self.zm) @ self.w)
        return x.float().clamp(0, 1).view(len(z), *self.target.image_shape)


class Flat(Blend):
    name = "test-flat"
    grows = False


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    for cls in (Blend, Flat):
        registry.register(cls)
    cfg = tiny_config()
    run, _ = train_run(cfg, tmp_path_factory.mktemp("runs"), log=lambda m: None)
    yield run
    for cls in (Blend, Flat):
        registry._REGISTRY["attack"].pop(cls.name, None)


def test_verdict_compares_the_rise_with_the_ci():
    assert saturation.verdict(0.50, 0.01, 0.52) and not saturation.verdict(0.50, 0.03, 0.52)
    assert not saturation.verdict(0.50, 0.01, 0.49) and saturation.verdict(0.5, None, 0.5001)


def test_a_budget_too_small_is_flagged_and_a_saturated_one_is_not(run):
    results = attack_run(
        run.path,
        ["test-blend", "test-flat", "optimization"],
        epochs=1,
        steps=2,
        eval_images=64,
        check_saturation=True,
        **QUIET,
    )
    by_name = {r["attack"]: r for r in results}
    grow, flat = by_name["test-blend"]["saturation"], by_name["test-flat"]["saturation"]
    assert grow["unsaturated"] and grow["ssim_doubled"] > grow["ssim"] + grow["ssim_ci95"], grow
    assert grow["budget"] == {"epochs": 1} and grow["doubled_budget"] == {"epochs": 2}
    assert not flat["unsaturated"] and flat["ssim_doubled"] == pytest.approx(flat["ssim"])
    assert "saturation" not in by_name["optimization"]  # not a learned attack: no epochs
    # Both figures are in the first folder's metrics.json; the doubled folder names what it checks.
    from privbench.util.storage import read_json

    first = read_json(run.path / "attacks" / by_name["test-blend"]["path"].split("/")[-1] / "metrics.json")
    assert first["saturation"]["ssim_doubled"] == grow["ssim_doubled"]
    check = read_json(run.path / "attacks" / grow["doubled_folder"] / "metrics.json")
    assert check["saturation_check_of"] == by_name["test-blend"]["path"].split("/")[-1]
    # The table marks the cell, explains the mark, and leaves the check folder out.
    table = api.results([run.path])
    assert sorted(table.attrs["attacks"]) == ["optimization", "test-blend", "test-flat"]  # no doubled variants
    md = table_format.render(table, "md")
    assert "(unsaturated)" in md and "the attack had not converged" in md
    lines = md.splitlines()
    header, cells = [h.strip() for h in lines[0].split("|")], [c.strip() for c in lines[2].split("|")]
    marked = {h for h, c in zip(header, cells) if "(unsaturated)" in c}
    assert {"test-blend SSIM [0,1]", "test-blend PSNR (dB)"} <= marked  # every metric of the unconverged cell
    assert not any(h.startswith(("test-flat", "optimization")) for h in marked)


def test_cli_flag_reuses_the_recorded_check(run, capsys):
    args = ["attack", str(run.path), "--attack", "test-blend", "--epochs", "1", "--eval-images", "64", "--quiet"]
    # The check is computed here if no other test did (pytest-xdist may run this one alone), then reused.
    attack_run(run.path, ["test-blend"], epochs=1, eval_images=64, check_saturation=True, **QUIET)
    before = sorted(p.name for p in (run.path / "attacks").iterdir())
    code, out, _ = run_cli([*args, "--check-saturation"], capsys)
    assert code == 0 and "test-blend: SSIM" in out and "at twice the budget: UNSATURATED" in out
    assert sorted(p.name for p in (run.path / "attacks").iterdir()) == before  # nothing recomputed
