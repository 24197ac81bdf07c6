"""Front ends for agents and assistants: the Model Context Protocol server (:mod:`.mcp_server`)
over protocol-free tools (:mod:`.tools`). The OpenAI-compatible endpoints live in the web app
(:mod:`crossmodal_rag.web.routes.openai`). Nothing is imported here, so the MCP SDK loads only
when ``crossmodal-rag mcp`` runs."""

from __future__ import annotations

__all__: list[str] = []
