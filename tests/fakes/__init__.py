"""In-memory fakes of the project's ports, for fast unit tests. Among them:

- ``broker``: ``FakeBroker`` (a connection: channels, exchanges, queues) and ``FakeDelivery``;
  ``publisher``: ``FakePublisher`` (``transport.ports``);
- ``engine``: ``FakeEngine``, a Docker engine; ``runtime``: ``FakeDockerRuntime`` on it
  (``worker_agent.ports``);
- ``clock``: ``ManualClock`` (``transport.ports.Clock``), and ``until`` to wait on a condition.

Each is held to its real adapter's behaviour by the contract tests in ``tests/contracts``,
run against the fake in the unit suite and against the real service in the integration suite.
"""
