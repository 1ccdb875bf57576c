"""The operator example: an agent that works tasks through an MCP tool server."""
