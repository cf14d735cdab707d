"""Compute backends. Each module implements ``backends.base.Backend`` for one library and is
registered under the ``mesh.backends`` entry-point group."""
