"""The fine-tuned network's model code, Ray-free: the backbone with a new head, what --freeze keeps still,
the optimiser and its schedule, what a checkpoint keeps, and the objective the training core steps it with
(uint8 batches normalised on the device, autocast, channels_last, label smoothing)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from raytl.config import FinetuneConfig, Freeze, Head, Layer, Optimizer, Pool, Precision
from raytl.modeling.loop import RowLosses
from raytl.vision.models import (
    embedding_dim,
    from_state_dict,
    prefers_channels_last,
    preset,
    resolve_precision,
)

# Index in VGG16's `features` where each conv block ends (after its max-pool): --freeze block1..block5.
BLOCK_ENDS = {
    Freeze.BLOCK1.value: 5,
    Freeze.BLOCK2.value: 10,
    Freeze.BLOCK3.value: 17,
    Freeze.BLOCK4.value: 24,
    Freeze.BLOCK5.value: 31,
}


class Network(nn.Module):
    """The backbone (VGG16 cut at pool5 averaged or fc7; another model without its final classifier layer),
    then dropout and a new linear layer over the classes."""

    def __init__(self, trunk: nn.Module, dim: int, classes: int, dropout: float) -> None:
        super().__init__()
        self.trunk = trunk
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, classes)
        nn.init.normal_(self.head.weight, 0, 0.01)  # torchvision's init of VGG16's classifier layers
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.trunk(x)))

    def train(self, mode: bool = True) -> Network:
        """As nn.Module's, but frozen parts stay in eval mode: batch norms keep the running statistics of
        --weights, and stochastic depth and dropout inside them stay off (they are a fixed feature map)."""
        super().train(mode)
        for module in self.trunk.modules():
            parameters = list(module.parameters())
            if parameters and not any(p.requires_grad for p in parameters):
                module.eval()
        return self


def build_network(state_dict: dict, config: FinetuneConfig, classes: int) -> Network:
    """The network with the backbone's layers up to --freeze frozen (no gradients, no optimiser state)."""
    layer = Layer.FC7 if config.head == Head.FC7 else Layer.POOL5
    trunk = from_state_dict(config.model, state_dict, layer, Pool.AVG)
    torch.manual_seed(config.seed)
    network = Network(
        trunk,
        embedding_dim(layer, Pool.AVG, config.crop, config.model),
        classes,
        dropout=0.5 if config.head == Head.FC7 else 0.0,
    )
    freeze(trunk, config.freeze or "none")
    return network


def freeze(trunk: nn.Module, spec: str) -> None:
    """Turn off the gradients of --freeze's part of the backbone: none; all; vgg16's conv blocks 1..N; or
    the first fraction F of its layers (the modules that hold parameters, in the order the model defines
    them, which for torchvision's models is from the input to the output)."""
    if spec == "none":
        return
    if spec == "all":
        trunk.requires_grad_(False)
    elif spec in BLOCK_ENDS:
        features = trunk.get_submodule("features")
        assert isinstance(features, nn.Sequential), "config.parse_freeze allows blocks for vgg16 only"
        for module in features[: BLOCK_ENDS[spec]]:
            module.requires_grad_(False)
    else:
        layers = list(dict.fromkeys(name.rpartition(".")[0] for name, _ in trunk.named_parameters()))
        for name in layers[: round(float(spec) * len(layers))]:
            for parameter in trunk.get_submodule(name).parameters(recurse=False):
                parameter.requires_grad_(False)


def make_optimizer(network: Network, config: FinetuneConfig) -> torch.optim.Optimizer:
    """Two groups: the new head at --lr, the unfrozen backbone layers at --backbone-lr."""
    trunk = [p for p in network.trunk.parameters() if p.requires_grad]
    groups = [{"params": list(network.head.parameters()), "lr": config.lr}]
    if trunk:
        groups.append({"params": trunk, "lr": config.trunk_lr})
    if config.optimizer == Optimizer.SGD:
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear from 1/100 to 1 over `warmup` steps, then cosine down to zero."""
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def trainable_state(network: Network) -> dict[str, torch.Tensor]:
    """The tensors training changes: the trained layers' parameters and buffers (a batch norm's running
    statistics); frozen layers are the --weights' own and stay out of checkpoints."""
    trained = {name.rpartition(".")[0] for name, p in network.named_parameters() if p.requires_grad}
    return {
        k: v.detach().cpu().clone()
        for k, v in network.state_dict().items()
        if k.rpartition(".")[0] in trained
    }


class NetworkObjective:
    """uint8 NHWC batches (image, y, ok) through one worker's network: normalisation on the device,
    autocast (bf16 on CUDA and fast-bf16 CPUs; fp16 with the grad scaler), channels_last for convnets at
    reduced precision. An image that failed to decode (ok False) weighs zero and counts as failed."""

    def __init__(self, network: Network, config: FinetuneConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self.precision = resolve_precision(config.precision, device)
        self.dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}.get(self.precision)
        self.channels_last = self.dtype is not None and prefers_channels_last(network)
        weights = preset(config.model, config.weights)  # the normalisation the backbone's weights expect
        self.mean = torch.tensor(weights.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(weights.std, device=device).view(1, 3, 1, 1)
        self.model: nn.Module = network  # the DDP-wrapped one, once the worker has prepared it

    def placed(self, network: Network) -> Network:
        """The network in the memory format this objective feeds it (before DDP wraps it)."""
        return network.to(memory_format=torch.channels_last) if self.channels_last else network

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == Precision.FP16)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float()  # NHWC uint8 -> NCHW float, already channels_last in memory
        x = x if self.channels_last else x.contiguous()
        x = x.div_(255).sub_(self.mean).div_(self.std)
        if self.dtype is None:
            return self.model(x)
        with torch.autocast(self.device.type, dtype=self.dtype):
            return self.model(x).float()

    def losses(self, batch: dict[str, torch.Tensor], training: bool) -> RowLosses:
        ok, y = batch["ok"], batch["y"]
        logits = self.forward(batch["image"])
        smoothing = self.config.label_smoothing if training else 0.0
        loss = nn.functional.cross_entropy(logits, y, reduction="none", label_smoothing=smoothing)
        return RowLosses(loss, logits, y, ok.float(), ok)


def steps_per_epoch(train_images: int, workers: int, batch_size: int) -> int:
    """Each worker's steps an epoch: Ray Train splits the stream equally among however many workers run now
    (with --workers MIN-MAX, a group restarted after a resize may be larger or smaller)."""
    return max(1, math.ceil(train_images // workers / batch_size))


def schedule(optimizer: torch.optim.Optimizer, config: FinetuneConfig, steps: int) -> Any:
    """--warmup then cosine, stepped after every optimiser step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, round(config.warmup * steps), config.epochs * steps)
    )
