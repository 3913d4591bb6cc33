"""HTTP API: the Quart app, its routes, and the OpenAI wire shapes."""
