"""Models by name: ``torchvision:NAME``, ``timm:NAME`` or ``pkg.module:callable``.

Every user mistake (unknown family or model, bad options, an import failure, weights that are
not on disk and cannot be downloaded) raises a one-line :class:`UserError` instead of a traceback.
The original exception is chained (``raise ... from``) for anyone who wants the details.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models as tvm

from privbench.errors import UserError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Normalize", "build_model", "input_normalization", "is_model_spec"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_TIMM_HINT = 'timm is not installed: pip install -e ".[timm]"'
_FAMILIES = ("torchvision", "timm")
_SPEC_RE = re.compile(r"[A-Za-z_][\w.]*:[\w.\-]+")
# Top-level packages whose exceptions mean "the download failed" rather than "bad request".
_NETWORK_PACKAGES = {"httpx", "httpcore", "requests", "urllib3", "huggingface_hub", "socket", "ssl"}

Normalization = tuple[tuple[float, ...], tuple[float, ...]]


def is_model_spec(text: str) -> bool:
    """True for ``family:name`` / ``pkg.module:callable`` specs, False for built-in names like ``resnet20``."""
    return isinstance(text, str) and _SPEC_RE.fullmatch(text.strip()) is not None


def _split_spec(spec: str) -> tuple[str, str]:
    if not is_model_spec(spec):
        raise UserError(f"bad model spec {spec!r}: expected torchvision:NAME, timm:NAME or pkg.module:callable")
    family, _, name = spec.strip().partition(":")
    return family, name


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _near(name: str, choices: Sequence[str], n: int = 5) -> str:
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _is_download_error(exc: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is a network or missing-file failure."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) or type(cur).__module__.split(".")[0] in _NETWORK_PACKAGES:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _options_text(options: dict[str, Any]) -> str:
    return f" with options {options}" if options else ""


def build_model(spec: str, *, num_classes: int, pretrained: bool = False, options: dict | None = None) -> nn.Module:
    """Build a model from a spec.

    ``torchvision:NAME`` goes through ``torchvision.models.get_model``; with ``pretrained`` it loads the
    default weights and, when ``num_classes`` differs from the weights' classes, keeps the pretrained body
    and replaces the last layer that outputs the weights' class count (Linear or Conv2d) with a freshly
    initialised one of ``num_classes`` outputs. ``timm:NAME`` goes through ``timm.create_model`` (timm
    adapts the head itself). ``pkg.module:callable`` calls the callable with ``num_classes`` (if it takes
    it), ``pretrained=True`` (only when asked; it must take it) and ``**options``.
    """
    family, name = _split_spec(spec)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    if options is not None and not isinstance(options, dict):
        raise UserError(f"model options must be a mapping of keyword arguments, got {type(options).__name__}")
    opts = dict(options or {})
    if family == "torchvision":
        model = _build_torchvision(name, num_classes, pretrained, opts)
    elif family == "timm":
        model = _build_timm(name, num_classes, pretrained, opts)
    else:
        model = _build_callable(family, name, num_classes, pretrained, opts)
    if not isinstance(model, nn.Module):
        raise UserError(f"model spec {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


# torchvision


def _build_torchvision(name: str, num_classes: int, pretrained: bool, opts: dict[str, Any]) -> nn.Module:
    known = tvm.list_models()
    if name not in known:
        raise UserError(f"unknown torchvision model {name!r}{_near(name, known)}")
    spec = f"torchvision:{name}"
    if not pretrained:
        try:
            return tvm.get_model(name, weights=None, num_classes=num_classes, **opts)
        except Exception as exc:
            raise UserError(f"cannot build {spec}{_options_text(opts)}: {_first_line(exc)}") from exc

    try:
        weights = tvm.get_model_weights(name).DEFAULT
    except Exception as exc:
        raise UserError(f"{spec} has no pretrained weights: {_first_line(exc)}") from exc
    n_orig = len(weights.meta.get("categories") or []) or None
    # Builders refuse num_classes != the weights' classes, so load with the original head first.
    kwargs = {} if n_orig is None or n_orig != num_classes else {"num_classes": num_classes}
    try:
        model = tvm.get_model(name, weights=weights, **kwargs, **opts)
    except Exception as exc:
        file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))
        if not os.path.exists(file):
            raise UserError(
                f"pretrained weights for {spec} are not on disk and could not be downloaded "
                f"({_first_line(exc)}): put {os.path.basename(file)} (from {weights.url}) "
                f"into {os.path.dirname(file)}"
            ) from exc
        raise UserError(f"cannot build {spec}{_options_text(opts)}: {_first_line(exc)}") from exc
    if n_orig is not None and n_orig != num_classes:
        _replace_head(model, n_orig, num_classes, spec)
    return model


def _replace_head(model: nn.Module, n_orig: int, num_classes: int, spec: str) -> None:
    """Swap the last Linear/Conv2d that outputs ``n_orig`` classes for a fresh one with ``num_classes``."""
    found = None
    for qual, mod in model.named_modules():
        if (isinstance(mod, nn.Linear) and mod.out_features == n_orig) or (
            isinstance(mod, nn.Conv2d) and mod.out_channels == n_orig
        ):
            found = (qual, mod)
    if found is None:
        raise UserError(f"cannot find the classifier head of {spec} to resize it to {num_classes} classes")
    qual, old = found
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(
            old.in_channels,
            num_classes,
            old.kernel_size,
            old.stride,
            old.padding,
            old.dilation,
            old.groups,
            bias=old.bias is not None,
            padding_mode=old.padding_mode,
        )
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    parent_name, _, attr = qual.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


# timm


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as exc:
        raise UserError(_TIMM_HINT) from exc
    return timm


def _build_timm(name: str, num_classes: int, pretrained: bool, opts: dict[str, Any]) -> nn.Module:
    timm = _import_timm()
    arch = name.split(".", 1)[0]  # a pretrained tag may follow the architecture: vit_small_patch16_224.augreg_in1k
    if not timm.is_model(arch):
        raise UserError(f"unknown timm model {name!r}{_near(arch, timm.list_models())}")
    spec = f"timm:{name}"
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **opts)
    except Exception as exc:
        if pretrained and _is_download_error(exc):
            raise UserError(
                f"pretrained weights for {spec} are not on disk and could not be downloaded "
                f"({_first_line(exc)}): put them in the Hugging Face cache ({_hf_cache()}) or the torch hub "
                f"cache ({os.path.join(torch.hub.get_dir(), 'checkpoints')}), or pass the option "
                "pretrained_cfg_overlay={'file': 'PATH'} naming a local checkpoint"
            ) from exc
        raise UserError(f"cannot build {spec}{_options_text(opts)}: {_first_line(exc)}") from exc


def timm_notrace() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """The modules and functions timm marks as leaves for torch.fx (privbench.engine.cuts traces
    with them); empty without timm."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except Exception:  # timm absent or too old: plain torch.fx rules only
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


def _hf_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:  # an optional dependency of timm; only used for the message
        return "$HF_HOME/hub"


# pkg.module:callable


def _accepts(fn: Callable[..., Any], param: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True  # builtins without a signature: just try
    return any(p.name == param or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _build_callable(module_name: str, attr: str, num_classes: int, pretrained: bool, opts: dict) -> nn.Module:
    spec = f"{module_name}:{attr}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name) and "." not in module_name:
            # The spec's own module is missing: most likely a misspelt family.
            raise UserError(
                f"unknown model family or module {module_name!r} in {spec!r}: families are torchvision and timm, "
                f"and pkg.module:callable needs the module on PYTHONPATH{_near(module_name, _FAMILIES, 2)}"
            ) from exc
        raise UserError(f"cannot import module {module_name!r} for model spec {spec!r}: {_first_line(exc)}") from exc
    except Exception as exc:
        raise UserError(f"importing {module_name!r} for model spec {spec!r} failed: {_first_line(exc)}") from exc

    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
            raise UserError(f"module {module_name!r} has no attribute {attr!r}{_near(attr, names)}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise UserError(f"{spec} is a {type(fn).__name__}, not a callable that returns a torch.nn.Module")

    kwargs: dict[str, Any] = {}
    if _accepts(fn, "num_classes"):
        kwargs["num_classes"] = num_classes
    if pretrained:
        if not _accepts(fn, "pretrained"):
            raise UserError(f"{spec} takes no 'pretrained' argument; load trained weights another way")
        kwargs["pretrained"] = True
    for key in opts:
        if not _accepts(fn, key):
            raise UserError(f"{spec} takes no option {key!r}")
    kwargs.update(opts)
    try:
        model = fn(**kwargs)
    except UserError:
        raise
    except Exception as exc:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise UserError(f"{spec}({args}) failed: {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise UserError(f"{spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


# input normalisation


def _as_floats(value: Any) -> tuple[float, ...] | None:
    """A mean/std given as a list/tuple of numbers (tensors are left alone: they may be internal buffers)."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return tuple(float(v) for v in value)
    return None


def input_normalization(spec: str, model: nn.Module) -> Normalization | None:
    """The (mean, std) the model expects its [0,1] input to be normalised with, or None if unknown.

    timm: ``model.pretrained_cfg``; torchvision: the default weights' transforms (ImageNet statistics
    for classification models); ``pkg.module:callable``: list/tuple attributes ``mean`` and ``std`` on
    the model, else on the Python module. Built-in names (not specs) give None.
    """
    if not is_model_spec(spec):
        return None
    family, name = _split_spec(spec)
    if family == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        mean, std = _as_floats(cfg.get("mean")), _as_floats(cfg.get("std"))
        return (mean, std) if mean and std else None
    if family == "torchvision":
        try:
            transform = tvm.get_model_weights(name).DEFAULT.transforms()
            mean, std = _as_floats(getattr(transform, "mean", None)), _as_floats(getattr(transform, "std", None))
            if mean and std:
                return mean, std
        except Exception:  # no weights registered for this name: fall back below
            pass
        if name in tvm.list_models(module=tvm):
            return IMAGENET_MEAN, IMAGENET_STD
        return None  # detection/segmentation models normalise inside
    try:
        module: Any = importlib.import_module(family)
    except Exception:  # build_model imported it already; a failure here only loses the hint
        module = None
    for source in (model, module):
        mean, std = _as_floats(getattr(source, "mean", None)), _as_floats(getattr(source, "std", None))
        if mean and std:
            return mean, std
    return None


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for inputs in [0,1] image space.

    Put it in front of an encoder (``nn.Sequential(Normalize(mean, std), encoder)``) so that attacks
    and defences keep working on [0,1] images. The statistics are non-persistent buffers: they follow
    ``.to(device)`` but stay out of ``state_dict``, so checkpoints keep the wrapped model's keys.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not mean:
            raise UserError(f"normalisation mean and std must have the same non-zero length, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise UserError(f"normalisation std must be positive, got {tuple(std)}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = tuple(round(v, 4) for v in self.mean.flatten().tolist())
        std = tuple(round(v, 4) for v in self.std.flatten().tolist())
        return f"mean={mean}, std={std}"
