"""`python -m worker_agent`: the worker-agent command."""

from .cli import main

main()
