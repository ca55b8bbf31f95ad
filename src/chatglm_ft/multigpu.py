"""`--device cuda:0,cuda:1`: the layers of one model spread over several devices (the original
`load_model_on_gpus`), for cards too small for the whole model.

Pipeline placement, no parallelism: everything outside the layers (the embeddings, the final norm,
the output layer: `lm_head`, tied to the embeddings in ChatGLM-6B's released checkpoint, or
ChatGLM2/3's own `output_layer`; the rotary buffers; a P-Tuning prefix encoder) stays on the first
device, the layers fill the devices in order so that each holds about the same bytes, a forward
pre-hook moves a layer's inputs onto its device and the last layer's output comes back to the first.
Architecture-neutral: it needs only `model.transformer.layers` (docs/architecture.md). Decoding runs
the eager loop (CUDA graphs do not span devices).
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import ChatGLMError


def parse_devices(device: str | torch.device | None) -> list[torch.device] | None:
    """The device list of "cuda:0,cuda:1", or None for a single device."""
    if device is None or "," not in str(device):
        return None
    try:
        devices = [torch.device(d.strip()) for d in str(device).split(",") if d.strip()]
    except RuntimeError:
        raise ChatGLMError(f"--device {device!r}: use a comma list such as cuda:0,cuda:1")
    if any(d.type == "cuda" for d in devices):
        if not torch.cuda.is_available():
            raise ChatGLMError(f"--device {device}: PyTorch sees no CUDA GPU; use --device cpu")
        count = torch.cuda.device_count()
        for d in devices:
            if d.type == "cuda" and (d.index or 0) >= count:
                raise ChatGLMError(f"--device {device}: {d} does not exist ({count} GPU(s) visible)")
    return devices


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in [*module.parameters(), *module.buffers()]}.values())


def layer_devices(model: nn.Module, devices: list[torch.device]) -> list[torch.device]:
    """Device of each layer: contiguous blocks, balanced by bytes, the first device also holding
    everything outside the layers (embeddings, final norm, output layer unless tied, rotary buffers)."""
    layers = [_module_bytes(layer) for layer in model.transformer.layers]
    first = _module_bytes(model) - sum(layers)  # each tensor once: a tied lm_head is the embeddings
    share = (first + sum(layers)) / len(devices)
    placement, used, index = [], first, 0
    for size in layers:
        # move on once this device has its share, keeping at least one layer for every later device
        remaining_layers = len(layers) - len(placement)
        if index < len(devices) - 1 and (used + size / 2 > share or remaining_layers <= len(devices) - 1 - index):
            index, used = index + 1, 0
        placement.append(devices[index])
        used += size
    return placement


def _inputs_to(device: torch.device):
    def move(x):
        return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) and x.device != device else x

    def hook(module, args, kwargs):
        return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}

    return hook


def _output_to(device: torch.device):
    def hook(module, args, output):
        return output.to(device, non_blocking=True) if output.device != device else output

    return hook


def _outside_layers_to(model: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer not inside a layer to `device`, keeping shared tensors shared."""
    inside = {id(m) for layer in model.transformer.layers for m in layer.modules()}
    moved: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if id(module) in inside:
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)  # in place: a tied parameter stays one object
        for name, buffer in list(module.named_buffers(recurse=False)):
            if id(buffer) not in moved:
                moved[id(buffer)] = buffer.to(device)
            setattr(module, name, moved[id(buffer)])


def split_layers(model: nn.Module, devices: list[torch.device]) -> nn.Module:
    """Spread `model`'s layers over `devices` (in place) and route activations between them.

    All it asks of an architecture is `model.transformer.layers`, blocks called as modules (so the
    hooks see their inputs) that return the hidden states; everything else stays on the first device."""
    if len(devices) < 2:
        raise ChatGLMError("a multi-device --device needs at least two devices, e.g. cuda:0,cuda:1")
    placement = layer_devices(model, devices)
    model.clear_caches()  # set up again where the layers now are
    layers = model.transformer.layers
    for layer, device in zip(layers, placement):
        layer.to(device)
        layer.register_forward_pre_hook(_inputs_to(device), with_kwargs=True)
    _outside_layers_to(model, devices[0])
    # the last layer hands the hidden states back to the final norm and output layer; a hook on the
    # norm itself would be skipped where a fused kernel reads the norm's weight directly (ops.rms_norm)
    layers[-1].register_forward_hook(_output_to(devices[0]))
    model.layer_devices = placement
    return model


def is_split(model: nn.Module) -> bool:
    """Whether the model spans several devices (the embeddings' device counts: with tiny layers and
    large embeddings every layer may sit on the second device)."""
    placement = getattr(model, "layer_devices", None) or []
    return len({*placement, model.device}) > 1 if placement else False
