"""resilience-proxy: a resilience sidecar for applications that call AI providers."""

__version__ = "0.1.0"
