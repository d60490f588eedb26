"""Tests on the local fleet: real Debian hosts booted with systemd, reached over real SSH."""
