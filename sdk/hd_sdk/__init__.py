"""Declare the jobs of a code location, serve their definitions, run them.

    from hd_sdk import job, Context

    @job(description="Say hello", config_schema={"type": "object",
         "properties": {"name": {"type": "string"}}, "required": ["name"]})
    def hello(context: Context, config: dict) -> None:
        with context.step("greet"):
            context.log(f"hello {config['name']}")
        context.metadata(greeted=config["name"])

`hd-sdk serve --module my_jobs` is the location's code server; the agent runs each job in a
container of its own with `hd-sdk run --module my_jobs --job hello --config '{...}'`.
User containers never get broker credentials: progress goes to stdout as framed lines that
the agent reads.
"""

from .config import ConfigError, validate_config
from .jobs import Job, Registry, job, load_registry
from .progress import Context

__all__ = ["ConfigError", "Context", "Job", "Registry", "job", "load_registry", "validate_config"]
