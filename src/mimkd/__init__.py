"""mimkd: knowledge distillation by mutual information maximisation (MIMKD), and the baseline zoo.

Public entry points::

    mimkd.build_distiller(method, student, teacher, sample_input, **options)
    mimkd.models.build_model(name, num_classes, in_channels)
    mimkd.features.FeatureTap(model, points=None)
"""

__version__ = "0.1.0"


def build_distiller(*args, **kwargs):
    """See :func:`mimkd.distillers.registry.build_distiller`."""
    from mimkd.distillers.registry import build_distiller as _build

    return _build(*args, **kwargs)


__all__ = ["build_distiller", "__version__"]
