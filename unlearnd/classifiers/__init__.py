"""Forget-query detectors: score prompts against every active forget request."""

from unlearnd.classifiers.base import DETECTORS, Detection, Detector, RequestMatch, get_detector, register_detector
from unlearnd.classifiers import keyword as _keyword  # noqa: F401  (registers "keyword")

__all__ = ["DETECTORS", "Detection", "Detector", "RequestMatch", "get_detector", "register_detector"]
