"""Tests of pure code: no host, no planning against one (real servers on loopback where a part needs one)."""
