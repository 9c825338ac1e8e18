"""Batch jobs and their command line: job files, Ray Jobs submission, scheduled pipelines (jobs/), the command line
that composes jobs, serving and pipelines (jobs/cli), deployment rendering (jobs/deploy) and the demo (jobs/demo)."""
