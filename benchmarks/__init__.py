"""Benchmarks of jbn against its peers: ``python -m benchmarks``.

The peers (Flax, Haiku, Equinox, PyTorch) come from the ``bench`` extra
(``pip install -e .[bench]``); a peer that is not installed is reported as skipped.
"""
