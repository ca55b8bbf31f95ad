"""`--device cuda:0,cuda:1`: the layers of one model spread over several devices (the original
`load_model_on_gpus`), for cards too small for the whole model.

Pipeline placement, no parallelism: the embeddings, the final LayerNorm and `lm_head` (tied to the
embeddings in the released checkpoint) stay on the first device, the layers fill the devices in
order so that each holds about the same bytes, and a forward pre-hook moves a layer's inputs onto
its device. Decoding runs the eager loop (CUDA graphs do not span devices).
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
    the embeddings, final LayerNorm and lm_head."""
    transformer = model.transformer
    first = _module_bytes(transformer.word_embeddings) + _module_bytes(transformer.final_layernorm)
    if not model.lm_head_tied:
        first += _module_bytes(model.lm_head)
    layers = [_module_bytes(layer) for layer in transformer.layers]
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


def split_layers(model: nn.Module, devices: list[torch.device]) -> nn.Module:
    """Spread `model`'s layers over `devices` (in place) and route activations between them."""
    if len(devices) < 2:
        raise ChatGLMError("a multi-device --device needs at least two devices, e.g. cuda:0,cuda:1")
    placement = layer_devices(model, devices)
    transformer = model.transformer
    transformer.word_embeddings.to(devices[0])
    transformer.final_layernorm.to(devices[0])
    model.lm_head.to(devices[0])
    transformer.inv_freq = transformer.inv_freq.to(devices[0])
    for layer, device in zip(transformer.layers, placement):
        layer.to(device)
        layer.register_forward_pre_hook(_inputs_to(device), with_kwargs=True)
    transformer.final_layernorm.register_forward_pre_hook(_inputs_to(devices[0]), with_kwargs=True)
    model.layer_devices = placement
    return model


def is_split(model: nn.Module) -> bool:
    """Whether the model spans several devices (the embeddings' device counts: with tiny layers and
    large embeddings every layer may sit on the second device)."""
    placement = getattr(model, "layer_devices", None) or []
    return len({*placement, model.transformer.word_embeddings.weight.device}) > 1 if placement else False
