"""Cut any model into a client encoder and a server part by module name, derived from its torch.fx graph.

A cut named ``M`` falls right after the last graph node of module ``M`` (``layer2``, ``layer2.1``,
``blocks.3``, ``features.10``). It is valid when exactly one input-dependent value, M's output, is
live across that point: every other value computed before it is dead by then. Values that do not
depend on the input (parameters, constants, shapes of parameters) never count; the server part
recomputes the ones it needs. Nothing here knows about model families: the graph decides.

Tracing uses ``torch.fx`` with the model in eval mode: standard ``torch.nn`` layers, timm's
"notrace" modules and any module whose class code reads ``self.training`` stay leaves, so
train/eval behaviour inside them follows the module's mode. Python branches on ``self.training``
in the traced-through code of the top-level model are fixed to their eval branch.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.utils.flop_counter as flop_counter
from torch import fx, nn
from torch.fx.node import map_arg

from privbench.engine import zoo
from privbench.errors import UserError

__all__ = ["CutInfo", "list_cuts", "split"]


@dataclass(frozen=True)
class CutInfo:
    """One candidate cut.

    ``z_shape`` is the shape of what the client sends, without the batch dimension (``()`` when it is
    not a tensor); ``kind`` is "map" ([B,C,H,W]), "tokens" ([B,N,D]), "vector" ([B,D]) or "other".
    ``position`` is the index of the graph node the cut follows: cuts with the same position split the
    model identically (``layer1`` and ``layer1.1`` of a ResNet). Shares are fractions of the whole model.
    """

    name: str
    valid: bool
    reason: str | None
    z_shape: tuple[int, ...]
    kind: str
    client_param_share: float
    client_flops_share: float
    position: int


# tracing


@cache
def _reads_training_flag(cls: type) -> bool:
    """Whether the class's own code (not torch.nn's) branches on ``self.training`` somewhere."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.nn") or klass in (nn.Module, object):
            break
        try:
            if "self.training" in inspect.getsource(klass):
                return True
        except (OSError, TypeError):  # no source (dynamically created class): assume it does not
            continue
    return False


class _Tracer(fx.Tracer):
    def __init__(self) -> None:
        self._leaf_types, functions = zoo.timm_notrace()
        super().__init__(autowrap_functions=functions)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if super().is_leaf_module(m, module_qualified_name) or isinstance(m, self._leaf_types):
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return _reads_training_flag(type(m))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _trace(model: nn.Module) -> fx.Graph:
    name = type(model).__name__
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    concrete: dict[str, Any] = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise UserError(f"{name}.forward needs more than one input ({p.name!r}); only single-input models split")
        concrete[p.name] = p.default  # trace the default path (attn_mask=None and the like)
    try:
        return _Tracer().trace(model, concrete_args=concrete or None)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot trace {name} with torch.fx: {_first_line(exc)}") from exc


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


# analysis


class _Probe(fx.Interpreter):
    """Runs the graph once, keeping each node's output shape (or type) and its FLOP count."""

    def __init__(self, gm: fx.GraphModule, counter: flop_counter.FlopCounterMode | None) -> None:
        super().__init__(gm)
        self.counter = counter
        self.values: dict[fx.Node, tuple[int, ...] | str] = {}
        self.flops: dict[fx.Node, int] = {}
        self._total = 0

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        total = self.counter.get_total_flops() if self.counter is not None else 0
        self.flops[n], self._total = total - self._total, total
        self.values[n] = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
        return result


def _sdpa_cpu_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _flop_counter() -> flop_counter.FlopCounterMode:
    extra = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:  # the CPU attention kernel is not in torch's FLOP table
        extra[op] = _sdpa_cpu_flops
    return flop_counter.FlopCounterMode(display=False, custom_mapping=extra)


def _input_size_hint(model: nn.Module) -> str:
    """Which input size the model was built for, when a submodule records it (timm's patch_embed.img_size)."""
    for qual, mod in model.named_modules():
        size = getattr(mod, "img_size", None)
        if isinstance(size, int):
            size = (size, size)
        if isinstance(size, (tuple, list)) and size and all(isinstance(v, int) for v in size):
            return f"; it takes {'x'.join(map(str, size))} px images ({qual}.img_size)"
    return ""


def _run_error(exc: BaseException) -> str:
    # Messages formatted while tracing show symbolic values as "Proxy(name)"; they say nothing to a user.
    return re.sub(r" ?\(?Proxy\(\w+\)\)?", "", _first_line(exc))


def _module_of(n: fx.Node) -> str:
    if n.op == "call_module":
        return str(n.target)
    stack = n.meta.get("nn_module_stack") or {}
    return str(list(stack.values())[-1][0]) if stack else ""


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


class _Analysis:
    """Everything about one model at one input size that cuts and splits need."""

    def __init__(self, model: nn.Module, image_size: int, channels: int, count_flops: bool = True) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise UserError(f"image size must be a positive integer, got {image_size!r}")
        self.model = model
        self.name = type(model).__name__
        with _eval_mode(model):
            self.graph = _trace(model)
            self._probe(image_size, channels, count_flops)
        self.nodes = list(self.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self._liveness()
        self._modules()
        self._shares()
        self.cuts = [self._cut_info(m) for m in self.order]
        self.valid = [c for c in self.cuts if c.valid]

    def _probe(self, image_size: int, channels: int, count_flops: bool) -> None:
        gm = fx.GraphModule(self.model, self.graph)
        first = next(iter(self.model.parameters()), None)
        x = torch.rand(1, channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
        if first is not None:
            x = x.to(device=first.device, dtype=first.dtype if first.is_floating_point() else torch.float32)
        counter = _flop_counter() if count_flops else None
        probe = _Probe(gm, counter)
        try:
            # With autograd off, nn.MultiheadAttention takes a fused fast path that FlopCounterMode cannot see.
            with torch.set_grad_enabled(count_flops), counter or nullcontext():
                probe.run(x)
        except Exception as exc:
            raise UserError(
                f"{self.name} cannot take {channels}x{image_size}x{image_size} inputs "
                f"({_run_error(exc)}){_input_size_hint(self.model)}"
            ) from exc
        self.values, self.flops = probe.values, probe.flops

    def _liveness(self) -> None:
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.input = placeholders[0] if placeholders else None
        # Values depending on the input are what the client computes and may have to send.
        self.dependent: set[fx.Node] = set()
        for n in self.nodes:
            if n is self.input or any(a in self.dependent for a in n.all_input_nodes):
                self.dependent.add(n)
        self.last_use = {n: max((self.index[u] for u in n.users), default=self.index[n]) for n in self.nodes}
        # Where a node runs: at its index if it depends on the input, else at its first (transitive) use,
        # so parameters and constants used only by the server are not counted on the client.
        self.runs_at: dict[fx.Node, float] = {}
        for n in reversed(self.nodes):
            if n in self.dependent:
                self.runs_at[n] = self.index[n]
            else:
                self.runs_at[n] = min((self.runs_at[u] for u in n.users), default=float("inf"))

    def _modules(self) -> None:
        last: dict[str, int] = {}
        calls: dict[str, set[str]] = {}
        for i, n in enumerate(self.nodes):
            owners = {str(key): str(value[0]) for key, value in (n.meta.get("nn_module_stack") or {}).items()}
            if n.op == "call_module":
                owners.setdefault(str(n.target), str(n.target))
            for key, qual in owners.items():
                if qual:
                    last[qual] = i
                    calls.setdefault(qual, set()).add(key)
        # A leaf called twice is two call_module nodes; a traced-through module called twice gets a
        # second "name@1" key in nn_module_stack.
        leaf_calls: dict[str, int] = {}
        self.call_no: dict[fx.Node, int] = {}
        for n in self.nodes:
            if n.op == "call_module":
                leaf_calls[str(n.target)] = self.call_no[n] = leaf_calls.get(str(n.target), 0) + 1
        self.last = last
        self.calls = {q: leaf_calls.get(q) or len(keys) for q, keys in calls.items()}
        self.order = sorted(last, key=lambda q: (last[q], -q.count("."), q))

    def _shares(self) -> None:
        params: dict[fx.Node, list[nn.Parameter]] = {}
        for n in self.nodes:
            if n.op == "call_module":
                params[n] = list(self.model.get_submodule(str(n.target)).parameters())
            elif n.op == "get_attr":
                obj = _get_attr(self.model, str(n.target))
                params[n] = [obj] if isinstance(obj, nn.Parameter) else []
        self.param_nodes = params
        self.total_params = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        self.total_flops = sum(self.flops.values())

    def describe(self, n: fx.Node) -> str:
        if n.op == "placeholder":
            return f"the input {n.name}"
        if n.op == "call_module":
            several = self.calls.get(str(n.target), 1) > 1
            return f"{n.target} ({_ordinal(self.call_no[n])} call)" if several else str(n.target)
        owner = _module_of(n)
        return f"{owner} ({n.name})" if owner else n.name

    def client_nodes(self, b: int) -> list[fx.Node]:
        return [n for n in self.nodes[: b + 1] if self.runs_at[n] <= b]

    def _cut_info(self, qual: str) -> CutInfo:
        b = self.last[qual]
        out = self.nodes[b]
        reason = self._invalid_reason(qual, b)
        value = self.values.get(out)
        z_shape: tuple[int, ...] = value[1:] if isinstance(value, tuple) and value else ()
        kind = {3: "map", 2: "tokens", 1: "vector"}.get(len(z_shape), "other") if isinstance(value, tuple) else "other"
        if isinstance(value, tuple) and value and value[0] != 1:
            kind = "other"  # the batch is not the leading dimension
        client = self.client_nodes(b)
        seen = {id(p): p for n in client for p in self.param_nodes.get(n, [])}
        param_share = sum(p.numel() for p in seen.values()) / self.total_params if self.total_params else 0.0
        flops = sum(self.flops.get(n, 0) for n in client)
        flops_share = flops / self.total_flops if self.total_flops else 0.0
        return CutInfo(qual, reason is None, reason, z_shape, kind, param_share, flops_share, b)

    def crossing(self, b: int) -> list[fx.Node]:
        return [n for n in self.nodes[: b + 1] if n in self.dependent and self.last_use[n] > b]

    def _invalid_reason(self, qual: str, b: int) -> str | None:
        if self.calls.get(qual, 1) > 1:
            return f"a module called more than once ({self.calls[qual]} calls), so a cut after it is ambiguous"
        out = self.nodes[b]
        live = self.crossing(b)
        if not live:
            return "its output is not used by the rest of the model"
        if len(live) > 1:
            live.sort(key=lambda n: -self.index[n])
            if all(isinstance(self.values.get(n), tuple) for n in live):
                names = ", ".join(self.describe(n) for n in live)
                return f"a residual or skip branch crosses it ({len(live)} tensors: {names})"
            # Non-tensors are typically sizes read from an earlier tensor (x.shape) or tuple outputs.
            names = ", ".join(
                self.describe(n) + ("" if isinstance(self.values.get(n), tuple) else f": {self.values.get(n)}")
                for n in live
            )
            return f"{len(live)} values cross it ({names})"
        if live[0] is not out:
            return f"the value crossing it is {self.describe(live[0])}, not {qual}'s output"
        value = self.values.get(out)
        if not isinstance(value, tuple):
            return f"its output is a {value}, not a single tensor"
        if not value:
            return "its output has no batch dimension"
        return None

    def neighbours(self, b: int) -> tuple[CutInfo | None, CutInfo | None]:
        """The valid cuts right before and after position ``b``; one at ``b`` itself counts as "before"."""
        before = [c for c in self.valid if c.position <= b]
        after = [c for c in self.valid if c.position > b]
        return (before[-1] if before else None), (after[0] if after else None)

    def resolve(self, cut: str | int) -> CutInfo:
        if isinstance(cut, bool) or not isinstance(cut, (str, int)):
            raise UserError(f"a cut is a module name or an index into the valid cuts, got {cut!r}")
        if isinstance(cut, str) and cut not in self.last and cut.strip().lstrip("-").isdigit():
            cut = int(cut)  # "3" from a command line, unless a module is called "3" (nn.Sequential)
        if isinstance(cut, int):
            n = len(self.valid)
            if not -n <= cut < n:
                raise UserError(f"cut index {cut} is out of range: {self.name} has {n} valid cuts (0..{n - 1})")
            return self.valid[cut]
        info = next((c for c in self.cuts if c.name == cut), None)
        if info is None:
            modules = dict(self.model.named_modules())
            if cut in modules and cut:
                raise UserError(f"module {cut!r} is not used by {self.name}.forward, so there is no cut after it")
            raise UserError(f"unknown cut {cut!r} for {self.name}: valid cuts near it: {self._near(cut)}")
        if not info.valid:
            before, after = self.neighbours(info.position)
            same = before is not None and before.position == info.position
            sides = ((before, "the same split" if same else "before"), (after, "after"))
            near = [f"{c.name} ({side})" for c, side in sides if c is not None]
            near_text = ", ".join(near) or "none"
            raise UserError(f"cut {cut!r} is invalid for {self.name}: {info.reason}; nearest valid cuts: {near_text}")
        return info

    def _near(self, cut: str) -> str:
        names: list[str] = []
        for match in difflib.get_close_matches(cut, [c.name for c in self.cuts], n=3, cutoff=0.4):
            info = next(c for c in self.cuts if c.name == match)
            if info.valid:
                names.append(info.name)
            else:
                names += [c.name for c in self.neighbours(info.position) if c is not None]
        prefix = cut
        while not names and "." in prefix:  # "fc.weight" or "layer2.0.conv9": the enclosing module
            prefix = prefix.rpartition(".")[0]
            info = next((c for c in self.cuts if c.name == prefix), None)
            if info is not None:
                names = [info.name] if info.valid else [c.name for c in self.neighbours(info.position) if c]
        if not names:
            names = [c.name for c in self.valid[:3]] + [c.name for c in self.valid[-2:]]
        return ", ".join(dict.fromkeys(names)) or "none (it has no valid cut)"


def _mutates_first_arg(n: fx.Node, root: nn.Module) -> bool:
    """Whether a node writes into its first argument (in-place module, method or function)."""
    if n.op == "call_module":
        return getattr(root.get_submodule(str(n.target)), "inplace", False) is True
    if n.kwargs.get("inplace") is True:
        return True
    name = str(n.target) if n.op == "call_method" else getattr(n.target, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_OPERATORS


_INPLACE_OPERATORS = {"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior", "ixor"}


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


# public API


def list_cuts(model: nn.Module, image_size: int, channels: int = 3) -> list[CutInfo]:
    """Every module that shows up in the traced graph, as a candidate cut, in the order the cuts fall.

    Modules with the same ``position`` are listed innermost first (``layer1.1``, then ``layer1``).
    ``z_shape`` comes from running one dummy image of ``channels`` x ``image_size`` x ``image_size``.
    ``client_param_share`` counts the parameters the encoder uses over all the model's parameters
    (unused ones count only in the total). ``client_flops_share`` counts what
    ``torch.utils.flop_counter.FlopCounterMode`` counts (convolutions, matrix products, attention) on that
    dummy image; element-wise ops, norms and pooling count as zero.
    """
    return list(_Analysis(model, image_size, channels).cuts)


def split(model: nn.Module, cut: str | int, image_size: int, channels: int = 3) -> tuple[nn.Module, nn.Module]:
    """Split ``model`` after module ``cut`` (a name, or an index into the valid cuts of :func:`list_cuts`).

    Returns ``(encoder, server)`` as ``torch.fx.GraphModule`` objects with ``server(encoder(x)) == model(x)``.
    Both share the model's submodules and parameters (no copies), and their ``state_dict`` keys are the
    model's own keys for the part they hold. The server takes one argument, the encoder's output.
    """
    analysis = _Analysis(model, image_size, channels, count_flops=False)  # FLOPs only matter for listings
    info = analysis.resolve(cut)
    b = info.position
    out = analysis.nodes[b]

    encoder = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for n in analysis.client_nodes(b):
        env[n] = encoder.node_copy(n, lambda a: env[a])
    encoder.output(env[out])

    server = fx.Graph()
    z = server.placeholder("z")
    if any(_mutates_first_arg(u, model) for u in out.users if analysis.index[u] > b):
        # The server would change z in place (ReLU(inplace=True) right after the cut); the client's copy,
        # which defences and attacks still read, must stay what was sent.
        z = server.call_method("clone", (z,))
    senv: dict[fx.Node, Any] = {out: z}

    def lookup(a: fx.Node) -> Any:
        if a not in senv:
            # Validity guarantees this is input-independent: recompute it on the server side.
            if a.op == "placeholder":
                return a.args[0] if a.args else None  # an extra argument left at its default
            senv[a] = server.node_copy(a, lookup)
        return senv[a]

    for n in analysis.nodes[b + 1 :]:
        if n.op == "output":
            server.output(map_arg(n.args[0], lookup), type_expr=n.type)
        elif n.op != "placeholder":
            senv[n] = server.node_copy(n, lookup)

    parts = []
    for graph, cls in ((encoder, "Encoder"), (server, "Server")):
        graph.lint()
        gm = fx.GraphModule(model, graph, class_name=cls)
        gm.training = model.training  # the shared submodules keep their own modes
        parts.append(gm)
    return parts[0], parts[1]
