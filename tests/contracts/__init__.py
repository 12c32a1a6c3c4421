"""Contract tests: one set of tests per port, run against the fake in the unit suite and
against the real adapter and service in the integration suite."""
