"""Helpers shared by the test suites: starting real processes and waiting for them."""
