"""Model registry. Every model takes [0,1] pixels: normalization is its first layer.

Models are `nn.Sequential(normalize=Normalize, net=<body>)`, so layer names in rank maps read
`net.layer1.0.conv1` for every architecture.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn

from cstar.data import DatasetSpec
from cstar.errors import CstarError


class Normalize(nn.Module):
    """(x - mean) / std per channel, as buffers so they travel with the weights and into ONNX."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    """ResNet basic block (post-activation)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation ResNet block (He et al. 2016), the usual robust-training baseline."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class CifarResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, no max-pool, stages of `blocks`, global average pool, linear head."""

    bn1_final: nn.Module  # set by _cifar_resnet for the pre-activation variant

    def __init__(
        self,
        block: type[nn.Module],
        blocks: Sequence[int],
        widths: Sequence[int],
        in_channels: int,
        num_classes: int,
        preact: bool = False,
    ) -> None:
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        for stage, (count, width) in enumerate(zip(blocks, widths, strict=True), start=1):
            layers = []
            for index in range(count):
                stride = 2 if stage > 1 and index == 0 else 1
                layers.append(block(in_planes, width, stride))
                in_planes = width
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.num_stages = len(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if not self.preact:
            out = self.relu(self.bn1(out))
        for stage in range(1, self.num_stages + 1):
            out = getattr(self, f"layer{stage}")(out)
        if self.preact:
            out = self.relu(self.bn1_final(out))
        return self.fc(self.flatten(self.pool(out)))


def _cifar_resnet(spec: DatasetSpec, preact: bool, blocks: Sequence[int], widths: Sequence[int]) -> CifarResNet:
    block: type[nn.Module] = PreActBlock if preact else BasicBlock
    model = CifarResNet(block, blocks, widths, spec.input_shape[0], spec.num_classes, preact=preact)
    if preact:
        model.bn1 = nn.Identity()  # type: ignore[assignment]
        model.bn1_final = nn.BatchNorm2d(widths[-1])
    return model


class VGG(nn.Module):
    """VGG with BatchNorm, CIFAR variant (one linear classifier on the pooled features)."""

    CONFIG_16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

    def __init__(
        self, in_channels: int, num_classes: int, input_size: int = 32, config: Sequence[int | str] = CONFIG_16
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        size = input_size
        for item in config:
            if item == "M":
                if size >= 2:  # small inputs (e.g. 16x16) keep only the pools that fit
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1, bias=False), nn.BatchNorm2d(int(item)), nn.ReLU()]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(x))))


# ----------------------------------------------------------------------------------------- registry

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}
_DEFAULT_FOR_DATASET = {
    "digits": "small-resnet",
    "fashion-mnist": "small-resnet",
    "cifar10": "resnet18",
    "imagefolder": "tv-resnet18",
}


def register_model(name: str) -> Callable[[Builder], Builder]:
    def wrap(builder: Builder) -> Builder:
        _REGISTRY[name] = builder
        return builder

    return wrap


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def default_model_for(dataset_name: str) -> str:
    return _DEFAULT_FOR_DATASET.get(dataset_name, "resnet18")


@register_model("small-resnet")
def _small_resnet(spec: DatasetSpec, width: int = 16, blocks: Sequence[int] = (1, 1, 1)) -> nn.Module:
    """A 3-stage ResNet for 8x8..28x28 inputs (widths w, 2w, 4w)."""
    return _cifar_resnet(spec, False, blocks, (width, 2 * width, 4 * width)[: len(blocks)])


@register_model("resnet18")
def _resnet18(spec: DatasetSpec, width: int = 64) -> nn.Module:
    return _cifar_resnet(spec, False, (2, 2, 2, 2), (width, 2 * width, 4 * width, 8 * width))


@register_model("preact-resnet18")
def _preact_resnet18(spec: DatasetSpec, width: int = 64) -> nn.Module:
    return _cifar_resnet(spec, True, (2, 2, 2, 2), (width, 2 * width, 4 * width, 8 * width))


@register_model("vgg16")
def _vgg16(spec: DatasetSpec) -> nn.Module:
    return VGG(spec.input_shape[0], spec.num_classes, input_size=spec.input_shape[-1])


def _torchvision_resnet(depth: int, spec: DatasetSpec) -> nn.Module:
    from torchvision import models as tv

    constructor = tv.resnet18 if depth == 18 else tv.resnet50
    model = constructor(weights=None, num_classes=spec.num_classes)  # never downloads: weights=None
    if spec.input_shape[0] != 3:
        model.conv1 = nn.Conv2d(spec.input_shape[0], 64, 7, 2, 3, bias=False)
    return model


@register_model("tv-resnet18")
def _tv_resnet18(spec: DatasetSpec) -> nn.Module:
    return _torchvision_resnet(18, spec)


@register_model("tv-resnet50")
def _tv_resnet50(spec: DatasetSpec) -> nn.Module:
    return _torchvision_resnet(50, spec)


def model_options(width: int | None = None, options_json: str | None = None) -> dict[str, Any]:
    """The model's build options from the CLI: `--width` and `--model-options '{"key": value}'` (a JSON object)."""
    import json

    options: dict[str, Any] = {}
    if options_json:
        try:
            parsed = json.loads(options_json)
        except json.JSONDecodeError as exc:
            raise CstarError(f"--model-options is not JSON: {exc}",
                             """pass a JSON object, e.g. '{"width_mult": 0.5}'""") from None
        if not isinstance(parsed, dict):
            raise CstarError(f"--model-options must be a JSON object, got {type(parsed).__name__}",
                             """pass a JSON object, e.g. '{"width_mult": 0.5}'""")
        options.update(parsed)
    if width:
        options["width"] = width
    return options


def is_import_path(name: str) -> bool:
    """'package.module:factory' (timm/entry-point style) rather than a registry name."""
    return ":" in name


def import_factory(path: str) -> Callable[..., nn.Module]:
    """The callable `package.module:attr[.attr]` names, or one clear error (not importable, missing, not callable)."""
    import importlib

    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise CstarError(f"model path '{path}' is not package.module:factory",
                         "write it like torchvision.models:mobilenet_v2 or mypkg.nets:make_net")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's environment
        raise CstarError(f"cannot import module '{module_name}' of model '{path}': {type(exc).__name__}: {exc}",
                         "install the package or put its directory on PYTHONPATH, in every stage's environment") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise CstarError(f"module '{module_name}' has no '{attr}' (model '{path}')",
                             f"check the name after the colon; the module defines: "
                             f"{', '.join(n for n in dir(target) if not n.startswith('_'))[:300]}")
        target = getattr(target, part)
    if not callable(target):
        raise CstarError(f"model '{path}' is not callable", "point at a function or class that returns an nn.Module")
    return cast(Callable[..., nn.Module], target)


def _factory_body(path: str, spec: DatasetSpec, options: dict[str, Any]) -> nn.Module:
    """`factory(**options)`, given `num_classes` from the data when it takes one (or **kwargs) and the options do
    not set it; checked to be an nn.Module whose output has one logit per class at the data's input shape."""
    import inspect

    factory = import_factory(path)
    kwargs = dict(options)
    try:
        parameters = inspect.signature(factory).parameters
        accepts = "num_classes" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    except (TypeError, ValueError):
        accepts = False
    if accepts and "num_classes" not in kwargs:
        kwargs["num_classes"] = spec.num_classes
    try:
        body = factory(**kwargs)
    except TypeError as exc:
        raise CstarError(f"bad options {options} for model '{path}' ({exc})", "check the model options") from exc
    if not isinstance(body, nn.Module):
        raise CstarError(f"model '{path}' returned {type(body).__name__}, not an nn.Module",
                         "the factory must return a torch.nn.Module")
    body.eval()
    try:
        with torch.no_grad():
            out = body(torch.zeros(1, *spec.input_shape))
    except Exception as exc:  # noqa: BLE001 - the user's network failing on the data's shape
        raise CstarError(f"model '{path}' fails on a {tuple(spec.input_shape)} input: {type(exc).__name__}: "
                         f"{str(exc)[:200]}", "build it for the data's channels and image size (model options, "
                         "or --image-size)") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, spec.num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CstarError(f"model '{path}' gives {shape} for a {tuple(spec.input_shape)} input; the data has "
                         f"{spec.num_classes} classes", "make the factory return (batch, classes) logits "
                         "(e.g. pass num_classes in the model options)")
    return body.train()


def build_model(name: str, spec: DatasetSpec, **options: Any) -> nn.Sequential:
    """Build `name` for `spec`: Normalize(mean, std) followed by the network, randomly initialized.

    `name` is a registry name (model_names()) or an import path `package.module:factory` whose factory returns
    the network for normalized inputs (cstar puts Normalize in front, so stages feed [0,1] pixels); manifests record the
    name and options, so every later stage rebuilds the model the same way."""
    if is_import_path(name):
        body = _factory_body(name, spec, options)
    elif name not in _REGISTRY:
        raise CstarError(f"unknown model '{name}'", f"valid models: {', '.join(model_names())}, or an import path "
                         "package.module:factory (e.g. torchvision.models:mobilenet_v2)")
    else:
        try:
            body = _REGISTRY[name](spec, **options)
        except TypeError as exc:
            raise CstarError(f"bad options {options} for model '{name}' ({exc})", "check the model options") from exc
    return nn.Sequential(OrderedDict(normalize=Normalize(spec.mean, spec.std), net=body))
