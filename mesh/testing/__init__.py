"""Test helpers that ship with mesh so other packages' tests can reuse them.

``fake_engine``: an ``Engine`` (mesh/runtime/engine.py) that plays a scripted list of token ids and
records how each request ended (finished, cancelled, failed).
"""

from mesh.testing.fake_engine import FakeEngine, FakeRequest, ToyTokenizer

__all__ = ["FakeEngine", "FakeRequest", "ToyTokenizer"]
