"""Epoch checkpoints, so an interrupted training run resumes where it stopped.

After every epoch the loop writes model, optimizer, defense state, weight average, history and
the torch RNG states (global, the loop's device generator, CUDA) to one file beside the run
folder being built. A rerun of the same configuration loads it and continues with the next
epoch; on CPU the result is bit-identical to an uninterrupted run. The file is written
atomically, loaded with weights_only=True, and ignored (with a message) when it is damaged or
belongs to another configuration, so it can never make a run wrong, only shorter.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privbench.util.storage import atomic_write_bytes


@dataclass
class LoopState:
    """The pieces of the training loop an epoch checkpoint covers."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    defense: Any  # privbench.plugin.base.Defense
    generator: torch.Generator
    average: Any = None  # privbench.engine.train.WeightAverage or None


def save(path: Path, key: str, epoch: int, history: list[dict[str, float]], seconds: float, s: LoopState) -> None:
    """Write the state after `epoch` epochs (1-based count) of the configuration `key`."""
    blob = {
        "key": key,
        "epoch": epoch,
        "history": history,
        "seconds": seconds,
        "model": s.model.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "defense": s.defense.state_dict(),
        "average": None if s.average is None else {"avg": s.average.avg, "steps": s.average.steps},
        "rng": torch.get_rng_state(),
        "generator": s.generator.get_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    buf = io.BytesIO()
    torch.save(blob, buf)
    atomic_write_bytes(path, buf.getvalue())


def read(path: Path | None, key: str, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The checkpoint of configuration `key` at `path`; None (with a message where a file was
    there) when there is none or it is damaged or foreign."""
    if path is None or not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("key") != key:
            raise ValueError("it belongs to another configuration")
        return blob
    except Exception as exc:  # a damaged or foreign file only costs the epochs it held
        ignoring(path, exc, log)
        return None


def ignoring(path: Path, exc: BaseException, log: Callable[[str], None]) -> None:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    log(f"ignoring the epoch checkpoint {path.name} ({first}); training from epoch 1")


def restore(path: Path, blob: dict[str, Any], s: LoopState, log: Callable[[str], None]) -> tuple[int, list, float]:
    """Load the loop's state from `blob` into `s` (the defense's state is loaded before its
    `setup`: a defense may build modules from it and register their parameters with the
    optimizer, whose state needs them). Returns (epochs done, history, seconds); raises where
    the blob does not fit, and the caller then trains from scratch."""
    s.model.load_state_dict(blob["model"])
    s.optimizer.load_state_dict(blob["optimizer"])
    if s.average is not None and blob["average"] is not None:
        for a, b in zip(s.average.avg, blob["average"]["avg"]):
            a.copy_(b)
        s.average.steps = blob["average"]["steps"]
    torch.set_rng_state(blob["rng"])
    s.generator.set_state(blob["generator"])
    if blob["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(blob["cuda_rng"])
    epoch = int(blob["epoch"])
    log(f"resuming from the epoch checkpoint {path.name} after epoch {epoch}")
    return epoch, list(blob["history"]), float(blob["seconds"])
