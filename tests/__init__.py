"""Inferstream tests: unit/ (no services), integration/ (one part on real services), e2e/ (worker processes)."""
