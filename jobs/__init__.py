"""Command line, job specs, cluster submission and scheduled pipelines."""
