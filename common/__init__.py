"""Pure-PyTorch core of FedPaGKD: models, PaGKD losses, grouping, data, metrics, wire format.

Nothing here imports Flower. Importing this package first makes torchvision (and timm)
importable on CPU-only torch builds; see :mod:`common.compat`.
"""

from common.compat import ensure_torchvision

ensure_torchvision()
