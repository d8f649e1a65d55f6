"""Reference model server: OpenAI-compatible embeddings (real all-MiniLM-L6-v2) and a simulated generator.

Run it with ``python -m modelserver --host H --port P``; see ``modelserver.__main__``.
"""

from modelserver.app import ModelServer, build_app
from modelserver.config import ServerConfig

__all__ = ["ModelServer", "ServerConfig", "build_app"]
