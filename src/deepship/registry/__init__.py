"""Model registry: numbered immutable versions, aliases, an event log, gated promotion, lineage. Torch-free."""

from deepship.registry.backends import default_registry_uri, open_registry
from deepship.registry.base import ModelRef, Registry, RegistryBusy, VersionInfo, parse_ref

__all__ = ["ModelRef", "Registry", "RegistryBusy", "VersionInfo", "default_registry_uri", "open_registry", "parse_ref"]
