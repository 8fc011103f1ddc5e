"""histoseg."""
from histoseg.utils.config import register_resolvers

register_resolvers()
