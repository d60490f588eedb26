"""Tests of what roles plan, against pyinfra's @fake connector: the commands a host would be told to run."""
