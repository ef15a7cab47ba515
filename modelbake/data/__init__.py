"""Data the package reads at run time (generated files, each with a test that it is current)."""
