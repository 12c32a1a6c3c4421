"""The worker agent: runs on a user's host, takes instructions, runs containers.

Public: ``agent.Agent`` (the process, run by ``cli``) and ``settings.AgentSettings``. The
modules read like the agent: ``consumer`` takes instructions in, ``launcher`` carries them
out, ``watcher`` follows Docker's events, ``reporter`` tells what happened to each attempt,
``heartbeat`` proves the agent alive, ``slots`` counts what it holds, ``locations`` keeps
code servers and ``definitions`` says what their jobs are; ``runtime`` and ``streams`` are
the Docker adapter (``ports.ContainerRuntime`` what the agent needs of it), ``limits`` what
may travel, ``metrics`` what the agent exports.
"""
