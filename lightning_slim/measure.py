"""What a compressed model costs: parameters, non-zeros, bytes as saved, MACs, CPU latency."""
from __future__ import annotations

import copy
import io
import statistics
import time

import torch
from torch import nn


def _dense(t: torch.Tensor) -> torch.Tensor:
    # quantized tensor subclasses (torchao) may not support count_nonzero directly
    try:
        return t.dequantize() if hasattr(t, "dequantize") else t
    except Exception:
        return t


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_parameters(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(_dense(p.detach()))) for p in model.parameters())


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size a user's checkpoint file has."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on ``example_input`` (torch-pruning's counter)."""
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(copy.deepcopy(model).eval(), example_input)
    return int(macs)


@torch.inference_mode()
def cpu_latency_ms(model: nn.Module, example_input: torch.Tensor, warmup: int = 3, repeats: int = 10) -> float:
    """Median wall time of a forward pass on CPU in milliseconds (after ``warmup`` passes)."""
    was_training = model.training
    model.eval()
    x = example_input.cpu()
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        model(x)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    model.train(was_training)
    return 1000 * statistics.median(times)


def measure(model: nn.Module, example_input: torch.Tensor | None = None, latency: bool = True,
            warmup: int = 3, repeats: int = 10) -> dict[str, float]:
    """All of the above in one dict. MACs and latency need ``example_input`` (a CPU batch)."""
    model = model.cpu() if next(model.parameters(), torch.empty(0)).device.type != "cpu" else model
    out: dict[str, float] = {
        "params": count_parameters(model),
        "nonzero_params": count_nonzero_parameters(model),
        "size_bytes": serialized_bytes(model),
    }
    if example_input is not None:
        try:
            out["macs"] = count_macs(model, example_input[:1])
        except Exception as err:  # a model torch-pruning cannot trace still gets the rest measured
            out["macs_error"] = f"{type(err).__name__}: {err}"[:200]
        if latency:
            out["latency_ms"] = cpu_latency_ms(model, example_input, warmup, repeats)
    return out
