"""Tests of application and cluster specs."""
