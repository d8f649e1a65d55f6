"""The public HTTP API (contract v1), served by every pipeline worker through Faust web views."""
