"""Rehearsal and test infrastructure, kept apart from the engine.

Throwaway servers (``throwaway``), sandboxed template databases (``sandbox``),
generated legacy data (``seed``), schema-and-data fingerprints
(``fingerprint``), and the ``rehearse`` operation with its report.  The engine
in ``migration`` never imports from here; the test suite, the benchmark and
the rehearsal do.
"""
