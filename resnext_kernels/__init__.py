"""resnext_kernels: fused grouped-convolution + BatchNorm + ReLU kernels (CPU and CUDA) for ResNeXt.

Importing the package loads the compiled operator library (``torch.ops.resnext_kernels``) and
registers the Python-side pieces (fake kernels, autocast handling). See ``README.md``.
"""

import torch  # noqa: F401  (the operator library links against torch; import it first)

from .version import __version__

try:
    from . import _C  # noqa: F401  (registers torch.ops.resnext_kernels.*)
except ImportError as e:  # pragma: no cover - exercised only on broken installs
    try:
        from ._build_info import TORCH_VERSION as _built_with
    except ImportError:
        _built_with = None
    _mismatch = (f" It was built against torch {_built_with}, but torch {torch.__version__} is running: rebuild it "
                 "with that torch installed (`pip install --no-build-isolation .`)."
                 if _built_with and _built_with != torch.__version__ else "")
    raise ImportError(
        "resnext_kernels: the compiled extension resnext_kernels._C could not be loaded "
        f"({e}).{_mismatch} Build it with `pip install --no-build-isolation .` in the project checkout."
    ) from e

from . import models, nn, ops  # noqa: E402
from .models import convert_model  # noqa: E402
from .ops import Decision, conv_bn_relu, explain, force_reference  # noqa: E402

__all__ = ["Decision", "__version__", "conv_bn_relu", "convert_model", "explain", "force_reference", "models", "nn",
           "ops"]
