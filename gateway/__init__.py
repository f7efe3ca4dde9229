"""maas-gateway: a security gateway for models served as a service."""

__version__ = "0.1.0"
