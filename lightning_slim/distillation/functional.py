"""Knowledge distillation in plain PyTorch (no Lightning): the losses, the projection that
matches feature widths, output capture with forward hooks, schedules and the teacher cache.

>>> import torch
>>> s, t = torch.zeros(4, 10), torch.zeros(4, 10)
>>> float(soft_target_loss(s, t, temperature=2.0))
0.0
>>> linear_schedule(step=50, start=0, stop=100, begin=1.0, end=0.0)
0.5
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_LOSSES = ("mse", "cosine")


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """Hinton et al. (2015): ``KL(softmax(t / T) || softmax(s / T)) * T^2``, mean over examples.

    Classes are the last dimension; any leading dimensions (tokens, positions) count as examples.
    The ``T^2`` factor keeps the gradient scale independent of ``T``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape")
    c = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, c).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, c).float().detach() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def agreement(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Fraction of examples where student and teacher predict the same class."""
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """MSE, or ``1 - cosine similarity`` of each example's flattened features, averaged."""
    teacher = teacher.detach()
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    if kind == "cosine":
        return 1 - F.cosine_similarity(student.flatten(1).float(), teacher.flatten(1).float(), dim=1).mean()
    raise ValueError(f"feature loss {kind!r} is not one of {FEATURE_LOSSES}")


class Projection(nn.Module):
    """A learned linear map of the width dimension ``dim`` (a 1x1 conv for ``(N, C, ...)`` maps)."""

    def __init__(self, in_width: int, out_width: int, dim: int = 1, generator: torch.Generator | None = None):
        super().__init__()
        self.dim = dim
        self.linear = nn.utils.skip_init(nn.Linear, in_width, out_width)  # no draw from the global RNG
        bound = in_width ** -0.5  # nn.Linear's default range, drawn from our own generator: no global RNG use
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound, generator=generator)
            self.linear.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.movedim(self.dim, -1)).movedim(-1, self.dim)


def default_output(output: Any) -> torch.Tensor:
    """The logits in a module's output: a tensor, ``.logits``, ``['logits']`` or the first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output:
            return output["logits"]
        output = list(output.values())
    elif hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"cannot find logits in a module output of type {type(output).__name__}; "
                    "pass output_fn to say where they are")


def get_submodule(root: nn.Module, name: str, owner: str) -> nn.Module:
    """``root.get_submodule(name)`` with an error that lists what exists."""
    if name in ("", "."):
        return root
    try:
        return root.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n]
        shown = ", ".join(names[:30]) + (" ..." if len(names) > 30 else "")
        raise ValueError(f"{owner} has no submodule named {name!r}; it has: {shown}") from None


@contextlib.contextmanager
def capture_outputs(modules: Mapping[str, nn.Module], when: Callable[[], bool] = lambda: True,
                    output_fn: Callable | Mapping[str, Callable] = default_output) -> Iterator[dict]:
    """Record ``output_fn(output)`` of each named module while the block runs (and ``when()`` holds).

    ``output_fn`` may be one function or one per name. If a module runs several times, its last
    output is kept.
    """
    records: dict[str, torch.Tensor] = {}
    fn = output_fn.get if isinstance(output_fn, Mapping) else (lambda name, default: output_fn)
    handles = [m.register_forward_hook(_Recorder(records, name, when, fn(name, default_output)))
               for name, m in modules.items()]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


class _Recorder:
    """A forward hook (a picklable object, not a closure) storing one module's output."""

    def __init__(self, records: dict, name: str, when: Callable[[], bool], output_fn: Callable):
        self.records, self.name, self.when, self.output_fn = records, name, when, output_fn

    def __call__(self, module, args, output):
        if self.when():
            self.records[self.name] = self.output_fn(output)


def linear_schedule(step: int, start: int, stop: int, begin: float, end: float | None) -> float:
    """``begin`` at ``start`` moving linearly to ``end`` at ``stop`` (constant when ``end`` is None)."""
    if end is None or stop <= start:
        return begin if end is None or step < stop else end
    frac = min(max((step - start) / (stop - start), 0.0), 1.0)
    return begin + frac * (end - begin)


class TeacherCache:
    """Teacher outputs stored by example index, so the teacher runs once per example.

    Each stored output (logits, features) is a tensor of per-example rows; storage grows
    as larger indices arrive. ``lookup`` returns None unless every index is present;
    ``missing`` tells which rows still need the teacher (batches mixing seen and new examples,
    as data selection makes them, then run the teacher on the new rows only).

    >>> cache = TeacherCache()
    >>> cache.store(torch.tensor([3, 1]), {"logits": torch.ones(2, 10)})
    >>> cache.lookup(torch.tensor([1, 3]))["logits"].shape, cache.lookup(torch.tensor([0]))
    (torch.Size([2, 10]), None)
    >>> cache.missing(torch.tensor([1, 0, 3, 7])).tolist()
    [False, True, False, True]
    """

    def __init__(self):
        self.filled = torch.zeros(0, dtype=torch.bool)
        self.values: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return int(self.filled.sum())

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.values.values()) + self.filled.numel()

    def reserve(self, size: int) -> None:
        """Allocate room for indices ``< size`` up front (the training set's length)."""
        self._grow(size, exact=True)

    def _grow(self, size: int, exact: bool = False) -> None:
        if size <= len(self.filled):
            return
        size = size if exact else max(size, int(1.5 * len(self.filled)))
        grown = torch.zeros(size, dtype=torch.bool)
        grown[: len(self.filled)] = self.filled
        self.filled = grown
        for key, v in self.values.items():
            new = v.new_zeros((size, *v.shape[1:]))
            new[: len(v)] = v
            self.values[key] = new

    def missing(self, index: torch.Tensor) -> torch.Tensor:
        index = index.long().cpu()
        known = index < len(self.filled)
        out = torch.ones(len(index), dtype=torch.bool)
        out[known] = ~self.filled[index[known]]
        return out

    def lookup(self, index: torch.Tensor) -> dict[str, torch.Tensor] | None:
        index = index.long().cpu()
        if not len(index) or int(index.max()) >= len(self.filled) or not bool(self.filled[index].all()):
            return None
        return {k: v[index] for k, v in self.values.items()}

    def store(self, index: torch.Tensor, outputs: Mapping[str, torch.Tensor]) -> None:
        index = index.long().cpu()
        self._grow(int(index.max()) + 1)
        for key, value in outputs.items():
            value = value.detach().cpu()
            if key not in self.values:
                self.values[key] = value.new_zeros((len(self.filled), *value.shape[1:]))
            self.values[key][index] = value
        self.filled[index] = True

    def state_dict(self) -> dict[str, Any]:
        return {"filled": self.filled.clone(), "values": {k: v.clone() for k, v in self.values.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.filled = state["filled"].clone()
        self.values = {k: v.clone() for k, v in state["values"].items()}
