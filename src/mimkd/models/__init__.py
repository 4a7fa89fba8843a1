"""The mimkd model zoo.

Importing this package registers every family: the RepDistiller CIFAR zoo (``resnet8`` ... ``resnet110``,
``resnet8x4``, ``resnet32x4``, ``ResNet50``, ``wrn_*``, ``vgg*``, ``MobileNetV2``, ``ShuffleV1``,
``ShuffleV2``), the torchvision-layout ImageNet ResNets (``resnet18``, ``resnet34``, ``resnet50``) and the
small Fashion-MNIST networks (``conv4mp``, ``conv4mp_w32``, ``cnn_teacher``). Build one with
:func:`build_model`; every zoo model declares its RepDistiller feature list as :class:`FeaturePoints`
(``model.feature_points``).
"""

# Each family module registers its models when imported.
from mimkd.models import (  # noqa: F401
    cifar_resnet,
    cifar_resnet_bottleneck,
    imagenet_resnet,
    mobilenetv2,
    shufflenetv1,
    shufflenetv2,
    small,
    vgg,
    wrn,
)
from mimkd.models.registry import FeaturePoints, available, build_model, model_factory, register_model
from mimkd.models.resolve import build_network

__all__ = ["FeaturePoints", "available", "build_model", "build_network", "model_factory", "register_model"]
