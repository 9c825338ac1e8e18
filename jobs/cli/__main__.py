"""`python -m jobs.cli ...`: the same command line as `gemma-unified ...` (the local scheduler runner uses it)."""

from jobs.cli import main

main()
