"""What users call: LLM, the CLI, generate, the OpenAI-compatible server."""
