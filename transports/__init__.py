"""Transports: move framed messages between nodes.

``base`` defines the interface every transport keeps (``Transport``, ``Listener``,
``Connection``, ``connect_with_backoff``); ``framing`` is the sans-IO frame codec;
``tcp`` is the built-in TCP transport. Transports know nothing of events or of what a
tensor means. Spec: specs/transport.md.
"""
