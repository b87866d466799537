"""ca-flax: Coordinate Attention, MobileNetV2 and MobileNeXt in Flax, exact to the released weights."""

from ca_flax.models import (
    CBAM,
    CoordAttention,
    SqueezeExcite,
    create_model,
    init_variables,
    list_models,
)

__all__ = [
    "CBAM",
    "CoordAttention",
    "SqueezeExcite",
    "create_model",
    "init_variables",
    "list_models",
    "load_pretrained",
]
__version__ = "0.1.0"


def load_pretrained(directory):  # noqa: ANN001, ANN201 - typed in ca_flax.pretrained
    """Read a converted checkpoint directory back: returns `(model, variables)`."""
    from ca_flax.pretrained import load_pretrained as _load

    return _load(directory)
