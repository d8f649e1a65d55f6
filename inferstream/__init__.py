"""Inferstream's shared kernel: settings, the error tree, ids, clocks and token counting."""
