"""The run store: one folder per trained model under the results folder.

A run folder holds `config.json` (everything needed to rerun it), `provenance.json`,
`checkpoint.pt` (state dicts only, loaded with weights_only=True), `metrics.json` and
`log.txt`; attacks add `attacks/<attack>-<hash>/`. Its name is `<defense>-<config hash>`, so the
same configuration always maps to the same folder and finished work is reused.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import privbench
from privbench.engine.config import TrainConfig
from privbench.engine.data import Dataset, folder_fingerprint
from privbench.engine.diagnostics import write_curves_csv
from privbench.engine.models import SplitModel
from privbench.engine.train import attach_defense, make_model, pick_device, train
from privbench.errors import UserError
from privbench.plugin import stack
from privbench.util.storage import (
    atomic_write_bytes,
    atomic_write_text,
    build_dir_once,
    load_checkpoint,
    read_json,
    tensor_bytes,
    write_json,
)

RUN_FILES = ("config.json", "provenance.json", "checkpoint.pt", "metrics.json")
DEFAULT_RESULTS = "results"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(privbench.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device: torch.device | str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def provenance(device: torch.device | str, seed: int) -> dict[str, Any]:
    return {
        "privbench_version": privbench.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "seed": seed,
        # What else moves float results between two machines running the same code:
        "num_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # privbench sets PASSIVE unless the user chose one
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }


@dataclass
class Run:
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> Run:
        path = Path(path)
        missing = [f for f in RUN_FILES if not (path / f).is_file()]
        if not path.is_dir() or missing:
            why = "no such folder" if not path.is_dir() else f"missing {missing[0]}"
            raise UserError(f"{path} is not a privbench run folder ({why})")
        return cls(path)

    @property
    def name(self) -> str:
        return self.path.name

    def config(self) -> TrainConfig:
        path = self.path / "config.json"
        train = read_json(path).get("train")
        if not isinstance(train, dict):
            raise UserError(f"{path} is damaged: no 'train' object")
        try:
            return TrainConfig.from_dict(train)
        except (UserError, TypeError, ValueError) as exc:  # wrong types or values in the file
            raise UserError(f"{path} is damaged: {exc}") from None

    def metrics(self) -> dict[str, Any]:
        path = self.path / "metrics.json"
        metrics = read_json(path)
        acc = metrics.get("test_accuracy")
        if isinstance(acc, bool) or not isinstance(acc, int | float):
            raise UserError(f"{path} is damaged: test_accuracy is {acc!r}, expected a number")
        return metrics

    def provenance(self) -> dict[str, Any]:
        return read_json(self.path / "provenance.json")

    def load_model(self, data: Dataset, device: torch.device | str = "cpu") -> SplitModel:
        """Rebuild the model from config.json and load the checkpoint (weights only). The starting
        weights (pretrained, --weights) are not fetched again: the checkpoint holds every weight."""
        cfg = self.config()
        self.check_data(cfg)
        model = make_model(cfg, data, initial_weights=False)
        path = self.path / "checkpoint.pt"
        state = load_checkpoint(path).get("model")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise UserError(f"{path} is damaged: no 'model' state dict of tensors")
        try:
            model.load_state_dict(state)
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"checkpoint of {self.path} does not match its config.json: {first}") from None
        model = model.to(device).eval()
        self._attach_defense(model, cfg, data, device)
        return model

    def _attach_defense(self, model: SplitModel, cfg: TrainConfig, data: Dataset, device: torch.device | str) -> None:
        """Restore the defense's transform (with its trained parameters), so the attacker sees
        what the server saw. Defenses without a transform need no state here."""
        try:
            defense = stack.create(cfg.defense, cfg.defense_options)
        except UserError as exc:
            raise UserError(f"run {self.name} was trained with defense {cfg.defense!r}: {exc}") from None
        attach_defense(model, defense, data.image_shape, torch.device(device))
        if defense.transforms:
            path = self.path / "checkpoint.pt"
            try:
                defense.load_state_dict(load_checkpoint(path).get("defense") or {})
            except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise UserError(f"{path} is damaged: the defense state does not load ({exc})") from None
        model.eval()

    def check_data(self, cfg: TrainConfig | None = None) -> None:
        """Refuse a folder: data set whose images changed since this run was trained: its test
        split (and the attacker's data) would no longer be the data the model saw."""
        cfg = cfg or self.config()
        if cfg.data_fingerprint and cfg.dataset.startswith("folder:"):
            now_print = folder_fingerprint(cfg.dataset[len("folder:") :])
            if now_print != cfg.data_fingerprint:
                raise UserError(
                    f"the images of {cfg.dataset} changed since run {self.name} was trained "
                    f"(fingerprint {cfg.data_fingerprint}, now {now_print}): train it again"
                )

    def attack_dirs(self) -> list[Path]:
        root = self.path / "attacks"
        return sorted(p for p in root.iterdir() if (p / "metrics.json").is_file()) if root.is_dir() else []


def read_result(folder: Path) -> dict[str, Any]:
    """An attack folder's metrics.json, checked for what the harness reads from it."""
    path = Path(folder) / "metrics.json"
    result = read_json(path)
    metrics = result.get("metrics")
    if not isinstance(result.get("attack"), str) or not isinstance(metrics, dict):
        raise UserError(f"{path} is damaged: no 'attack' name or 'metrics' object")
    for m in ("ssim", "psnr"):
        mean = metrics[m].get("mean") if isinstance(metrics.get(m), dict) else None
        if isinstance(mean, bool) or not isinstance(mean, int | float):
            raise UserError(f"{path} is damaged: metrics.{m}.mean is {mean!r}, expected a number")
    return result


def run_name(cfg: TrainConfig) -> str:
    return f"{cfg.defense}-{cfg.hash()}"


def find_run(cfg: TrainConfig, results_dir: str | Path = DEFAULT_RESULTS) -> Run | None:
    path = Path(results_dir) / run_name(cfg)
    return Run(path) if all((path / f).is_file() for f in RUN_FILES) else None


def train_run(
    cfg: TrainConfig, results_dir: str | Path = DEFAULT_RESULTS, *, force: bool = False, log=print
) -> tuple[Run, bool]:
    """Train `cfg` into its run folder unless a finished one exists. Returns (run, trained)."""
    final = Path(results_dir) / run_name(cfg)
    # Epoch checkpoint of an interrupted build of this folder: the rerun resumes from it.
    epoch_checkpoint = final.parent / f".{final.name}.epoch.pt"
    if force and final.exists():
        shutil.rmtree(final)
        epoch_checkpoint.unlink(missing_ok=True)

    def build(tmp: Path) -> None:
        lines: list[str] = []

        def tee(msg: str) -> None:
            lines.append(msg)
            log(msg)
            atomic_write_text(tmp / "log.txt", "\n".join(lines) + "\n")

        device = pick_device(cfg.device)
        prov = provenance(device, cfg.seed) | {"start_time": now()}
        result = train(cfg, log=tee, checkpoint=epoch_checkpoint)
        write_json(tmp / "config.json", {"train": cfg.to_dict(), "defense_options": result.defense.options()})
        state = {"model": result.model.state_dict(), "defense": result.defense.state_dict()}
        atomic_write_bytes(tmp / "checkpoint.pt", tensor_bytes(state))  # CPU tensors: opens on any machine
        write_json(
            tmp / "metrics.json",
            {
                **result.accuracy,
                "test_accuracy": result.test_accuracy,
                "train_seconds": result.seconds,
                "history": result.history,
                "num_classes": result.model.num_classes,
                **result.z_stats,
                **({"entropy_bound": result.entropy_bound} if result.entropy_bound else {}),
            },
        )
        write_curves_csv(result.history, tmp / "curves.csv")
        write_json(tmp / "provenance.json", prov | {"end_time": now()})

    built = build_dir_once(final, build, log=log)
    epoch_checkpoint.unlink(missing_ok=True)  # the finished folder supersedes it
    return Run.open(final), built
