"""Method names -> typed settings -> codecs. A family is one folder; registering it is one line below."""
from kvpack.methods import baselines, kvpack, kvquant, rvq, turboquant
from kvpack.methods.family import Family, LayerActivations
from kvpack.methods.names import needs_calibration, parse_method
from kvpack.methods.registry import families, family_named, family_of, register
from kvpack.methods.settings import FamilyOptions, MethodSettings

register(baselines.FAMILY)
register(kvquant.FAMILY)
register(rvq.FAMILY)
register(turboquant.FAMILY)
register(kvpack.FAMILY)

__all__ = ["Family", "FamilyOptions", "LayerActivations", "MethodSettings", "families", "family_named", "family_of",
           "needs_calibration", "parse_method", "register"]
