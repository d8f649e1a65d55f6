"""Development-only tools, not part of the production kernel: the local Tansu broker launcher."""
