"""The data path from raw media to text, shared by batch jobs and the online endpoint."""
