"""mesh: turn the devices you own into one AI cluster.

Packages: ``mesh`` (node runtime, CLI, API, registry, model specs, errors),
``transports`` (one module per transport) and ``backends`` (one module per
compute backend). See ``specs/`` for the contracts each layer keeps.
"""

__version__ = "0.1.0"
PROTOCOL_MAJOR = 1
PROTOCOL_MINOR = 0
