"""Support code of the tests: fixtures, servers on loopback, the vLLM test double, helpers."""
