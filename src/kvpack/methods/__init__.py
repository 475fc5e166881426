"""Method names -> typed settings -> codecs; one folder per calibrated family."""
from kvpack.methods.names import MethodSettings, parse_method

__all__ = ["MethodSettings", "parse_method"]
