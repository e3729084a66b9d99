"""Coverage-guided fuzzing (atheris, libFuzzer) of the readers that take the most complex input.

``make fuzz`` runs each target for ``FUZZ_SECONDS``; see :mod:`fuzz.__main__`. Not part of
``make test``: the property tests under ``tests/properties`` run there instead.
"""
