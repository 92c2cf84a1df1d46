"""patchc's benchmarks (outside the wheel): run from a source checkout as ``patchc bench <name>``
or ``python -m bench.<module>``; ``bench/README.md`` says what each measures."""
