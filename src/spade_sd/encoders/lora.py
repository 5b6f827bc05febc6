"""Where LoRA adapters go in a backbone, and the split of its forward pass at the first adapted block.

Only the last ``n_blocks`` blocks of a timm Vision Transformer or EfficientNet receive adapters (through ``peft``):

- Vision Transformers (timm's ``VisionTransformer`` naming: ``blocks[i].attn``, ``blocks[i].mlp``): every linear
  layer of the attention and the MLP of the last ``n_blocks`` transformer blocks (``qkv``, ``proj``, ``fc1``,
  ``fc2``, or a SwiGLU MLP's ``fc1_g``/``fc1_x``/``fc2``);
- EfficientNets (timm's ``EfficientNet``: ``blocks`` of stages of blocks, ``conv_head``, ``bn2``): the
  convolutions of the last ``n_blocks`` blocks that are not depthwise (expansion, squeeze-excitation and
  projection 1×1 convolutions) and the head convolution. Depthwise convolutions (``groups > 1``) stay frozen: a
  LoRA update of a depthwise kernel needs a rank divisible by the number of groups in ``peft`` and cannot be
  merged into the kernel.

Because nothing before the first adapted block changes, its input is a pure function of the patch: the
*prefix* (:meth:`SplitForward.prefix`) is computed once and cached, and training runs only the *suffix*
(:meth:`SplitForward.suffix`). :func:`split_forward` checks on a probe input that the two halves compose to the
full forward pass, so a model whose forward does something the split misses is refused instead of trained on
wrong activations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from spade_sd.encoders.modules import Pooled

Family = Literal["vit", "efficientnet"]
# Relative tolerance of the check that prefix and suffix compose to the full forward pass
SPLIT_RTOL = 1e-4
ADAPTER_MARK = "lora_"
_HEAD_LAYERS = ("global_pool", "attn_pool", "fc_norm", "head_drop", "head", "classifier")


@dataclass(frozen=True)
class AdapterPlan:
    """The blocks of a backbone that are adapted, and the layers in them that receive LoRA adapters.

    Attributes
    ----------
    family
        ``"vit"`` or ``"efficientnet"``.
    depth
        Number of blocks the backbone has (transformer blocks, or EfficientNet blocks over all stages).
    n_blocks
        Number of final blocks adapted.
    blocks
        Module names of the adapted blocks, in forward order.
    targets
        Module names of the layers that receive adapters.
    """

    family: Family
    depth: int
    n_blocks: int
    blocks: tuple[str, ...]
    targets: tuple[str, ...]


def _named_blocks(module: nn.Module) -> tuple[Family | None, list[tuple[str, nn.Module]]]:
    """The backbone's family and its blocks in forward order, or ``(None, [])`` for an unknown layout."""
    blocks = getattr(module, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or not hasattr(module, "forward_head"):
        return None, []
    items = list(blocks.named_children())
    if (
        items
        and all(hasattr(block, "attn") and hasattr(block, "mlp") for _, block in items)
        and hasattr(module, "norm")
    ):
        return "vit", [(f"blocks.{name}", block) for name, block in items]
    if (
        items
        and all(isinstance(stage, nn.Sequential) for _, stage in items)
        and hasattr(module, "conv_head")
        and hasattr(module, "bn2")
    ):
        return "efficientnet", [(f"blocks.{s}.{b}", block) for s, stage in items for b, block in stage.named_children()]
    return None, []


def _block_targets(family: Family, name: str, block: nn.Module) -> list[str]:
    if family == "vit":
        return [
            f"{name}.{child}"
            for child, layer in block.named_modules()
            if isinstance(layer, nn.Linear) and child.split(".")[0] in ("attn", "mlp")
        ]
    return [
        f"{name}.{child}"
        for child, layer in block.named_modules()
        if isinstance(layer, nn.Conv2d) and layer.groups == 1 and child
    ]


def _describe(module: nn.Module) -> str:
    children = ", ".join(f"{name} ({type(child).__name__})" for name, child in module.named_children())
    counts = {kind.__name__: sum(isinstance(m, kind) for m in module.modules()) for kind in (nn.Linear, nn.Conv2d)}
    return f"{type(module).__name__} with children [{children or 'none'}] and layers {counts}"


def plan_adapters(module: nn.Module, n_blocks: int) -> AdapterPlan:
    """Choose the blocks and layers that LoRA adapts in the last ``n_blocks`` blocks of ``module``.

    Parameters
    ----------
    module
        A timm Vision Transformer or EfficientNet (as built by :class:`~spade_sd.Backbone`).
    n_blocks
        Number of final blocks to adapt, between 1 and the number of blocks.

    Returns
    -------
    The plan.

    Raises
    ------
    ValueError
        The module has neither layout (the message lists what it has), ``n_blocks`` exceeds its depth, or no layer
        in the chosen blocks can take an adapter.
    """
    family, blocks = _named_blocks(module)
    if family is None:
        raise ValueError(
            "LoRA fine-tuning needs a timm Vision Transformer (blocks with .attn and .mlp, then .norm) or "
            f"EfficientNet (blocks of stages, then .conv_head and .bn2); found {_describe(module)}."
        )
    if not 1 <= n_blocks <= len(blocks):
        raise ValueError(
            f"n_blocks must lie in 1..{len(blocks)}: the {family} backbone has {len(blocks)} blocks; found {n_blocks}."
        )
    chosen = blocks[-n_blocks:]
    targets = [target for name, block in chosen for target in _block_targets(family, name, block)]
    if family == "efficientnet" and isinstance(module.conv_head, nn.Conv2d):
        targets.append("conv_head")
    if not targets:
        raise ValueError(
            f"No linear or (non-depthwise) convolution layer to adapt in blocks {[n for n, _ in chosen]}; "
            f"found {_describe(chosen[-1][1])}."
        )
    return AdapterPlan(family, len(blocks), n_blocks, tuple(name for name, _ in chosen), tuple(targets))


def inject_lora(module: nn.Module, plan: AdapterPlan, *, rank: int, alpha: float, dropout: float) -> nn.Module:
    """Add LoRA adapters (``peft``) to the plan's target layers of ``module``, in place; freeze everything else.

    The adapters' ``B`` matrices start at zero, so the adapted module computes exactly what it did before.
    ``A`` is drawn from torch's global generator: seed it for reproducible adapters.

    Returns
    -------
    ``module``, with only its adapter parameters (names containing ``"lora_"``) requiring gradients.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(plan.targets))
    training = module.training
    inject_adapter_in_model(config, module)
    module.train(training)  # the new dropout layers start in training mode
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(ADAPTER_MARK in name)
    return module


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``module`` (names containing ``"lora_"``), detached on the CPU."""
    return {
        name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items() if ADAPTER_MARK in name
    }


def merged_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every LoRA adapter merged into its base layer and the adapter layers removed.

    The copy is a plain timm model again (exportable to ONNX); ``module`` keeps its adapters.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(module)
    adapted = [(name, layer) for name, layer in merged.named_modules() if isinstance(layer, BaseTunerLayer)]
    for name, layer in adapted:
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, child, layer.get_base_layer())
    for parameter in merged.parameters():
        parameter.requires_grad_(False)
    return merged


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass once the first adapted block's input is known."""


class SplitForward(nn.Module):
    """A backbone's forward pass cut before its first adapted block.

    ``suffix(prefix(x))`` equals ``Pooled(module)(x)``; only the suffix's modules are shared with ``module``
    (training its adapters trains the backbone's).

    Parameters
    ----------
    module
        The backbone's timm model (with or without adapters).
    plan
        Its :class:`AdapterPlan`.
    """

    def __init__(self, module: nn.Module, plan: AdapterPlan) -> None:
        super().__init__()
        self.family = plan.family
        self.first_block = plan.blocks[0]
        self._module = [module]  # a list keeps the whole backbone out of this module's parameters
        self.blocks = nn.ModuleList(module.get_submodule(name) for name in plan.blocks)
        tail = ["norm"] if plan.family == "vit" else ["conv_head", "bn2"]
        self.tail = nn.ModuleList(getattr(module, name) for name in tail)
        # what forward_head reads (pooling, norms, heads), registered so that moving the split moves them too
        head = [getattr(module, name, None) for name in _HEAD_LAYERS]
        self.head = nn.ModuleList(layer for layer in head if isinstance(layer, nn.Module))

    @torch.no_grad()
    def prefix(self, x: torch.Tensor) -> torch.Tensor:
        """The input of the first adapted block for normalised images ``x``, without running the rest."""
        module = self._module[0]
        captured: list[torch.Tensor] = []

        def capture(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            captured.append(inputs[0])
            raise _Stop

        handle = module.get_submodule(self.first_block).register_forward_pre_hook(capture)
        try:
            module(x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"the forward pass of {type(module).__name__} never reached {self.first_block}")
        return captured[0]

    def suffix(self, h: torch.Tensor) -> torch.Tensor:
        """Pooled ``(batch, dim)`` features from the first adapted block's input ``h``."""
        for block in self.blocks:
            h = block(h)
        for layer in self.tail:
            h = layer(h)
        return self._module[0].forward_head(h)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """:meth:`suffix`."""
        return self.suffix(h)


class PrefixModule(nn.Module):
    """The prefix of a :class:`SplitForward` as a module: normalised images in, the first adapted block's input out.

    What the onnxruntime engine exports (tracing runs the backbone up to that block); ``module`` is the backbone's
    timm model, as for :class:`~spade_sd.encoders.modules.Pooled`.
    """

    def __init__(self, split: SplitForward) -> None:
        super().__init__()
        self.module = split._module[0]
        self._split = [split]  # the split's suffix (and its adapters) are not part of the prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`SplitForward.prefix`."""
        return self._split[0].prefix(x)


def split_forward(module: nn.Module, plan: AdapterPlan, probe: torch.Tensor) -> SplitForward:
    """The :class:`SplitForward` of ``module``, checked to compose to its full forward pass on ``probe``.

    Parameters
    ----------
    module
        The backbone's timm model, in eval mode.
    plan
        Its :class:`AdapterPlan`.
    probe
        A normalised input batch ``(batch, 3, size, size)``.

    Raises
    ------
    ValueError
        If ``suffix(prefix(probe))`` differs from the full forward pass beyond float tolerance.
    """
    split = SplitForward(module, plan)
    with torch.no_grad():
        full = Pooled(module)(probe)
        composed = split.suffix(split.prefix(probe))
    error = float((composed - full).abs().max() / full.abs().max().clamp(min=1e-12))
    if composed.shape != full.shape or error > SPLIT_RTOL:
        raise ValueError(
            f"{type(module).__name__}'s forward pass does not split at {plan.blocks[0]}: the cached-prefix path "
            f"gives features {tuple(composed.shape)} with relative error {error:.2e} against the full pass "
            f"{tuple(full.shape)}. This model's forward does more than blocks → tail → forward_head."
        )
    return split
