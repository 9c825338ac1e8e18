"""The online endpoint: an OpenAI-compatible Ray Serve app over the shared pipeline."""
