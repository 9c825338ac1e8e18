"""OpenAI chat requests shared by the endpoint and OpenAI batch files: protocol, preparation, media URLs."""
