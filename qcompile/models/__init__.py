from qcompile.models.adapters import ADAPTERS, SUPPORTED_ARCHITECTURES, FamilyAdapter
from qcompile.models.handle import ModelHandle
from qcompile.models.loader import BUILTIN_MODELS, load

__all__ = ["ADAPTERS", "SUPPORTED_ARCHITECTURES", "FamilyAdapter", "ModelHandle", "BUILTIN_MODELS", "load"]
