"""What the test suite and the benchmarks use and the tool itself does not (reading BuildKit's progress back).

Nothing in modelbake imports it; it ships in the package so tests and bench/ can use it from an install too.
"""
