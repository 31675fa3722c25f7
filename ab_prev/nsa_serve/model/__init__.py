from .config import ConfigError, NSAConfig, preset
from .nsa_model import ContiguousCache, NSAModel

__all__ = ["ConfigError", "NSAConfig", "preset", "ContiguousCache", "NSAModel"]
