"""The Gemini REST API over HTTP (aiohttp.web), beside the gRPC API."""
