"""Forget-query detectors: score prompts against every active forget request."""

from unlearnd.config import DEFAULT_DETECTOR
from unlearnd.detectors import embedding as _embedding  # noqa: F401  (registers "embedding")
from unlearnd.detectors import guard as _guard  # noqa: F401  (registers "guard")
from unlearnd.detectors import keyword as _keyword  # noqa: F401  (registers "keyword")
from unlearnd.detectors import ood as _ood  # noqa: F401  (registers "ood")
from unlearnd.detectors.base import DETECTORS, Detection, Detector, RequestMatch, get_detector, register_detector

__all__ = [
    "DEFAULT_DETECTOR",
    "DETECTORS",
    "Detection",
    "Detector",
    "RequestMatch",
    "get_detector",
    "register_detector",
]
