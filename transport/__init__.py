"""What the control plane and the agent share: the broker adapter and the process helpers.

It imports ``schemas`` and third-party libraries only. Public, imported from their modules
(this package imports none of them, so that a command's ``--help`` does not load the broker
driver):

- ``urls``: ``broker_urls``, the broker setting (one URL, or a cluster's nodes separated by
  commas) split and checked; ``user_of``, ``vhost_of``, ``where_of``, ``hide_password``.
- ``connection``: ``connect`` (a robust connection that fails over between a cluster's nodes,
  ``FailoverConnection``), ``probe``; ``TRANSIENT`` and ``REFUSED``, the driver's exceptions
  by meaning.
- ``topology``: ``declare_topology``, and the queues declared one at a time
  (``declare_instructions_queue``, ``declare_control_queue``, ``declare_monitor_queue``,
  ``declare_target``, ``declare_consumed_queue``).
- ``publisher``: ``Publisher``: confirms, retries through a reconnect, ``dead_letter``.
- ``delivery``: ``Delivery`` (a decoded message and its delivery) and ``settle``.
- ``consumer``: ``Consumer``: batches to a handler, poison input dead-lettered.
- ``dead_letters``: ``peek_dead_letters``, the operators' view of the dead-letter queue.
- ``policies``: the broker policies, set through the management API.
- ``process``: ``setup_logging``, ``run_until_signalled``, ``version_option``.
- ``metrics``: the metrics both sides export under one name, and ``serve_metrics``.
- ``ports``: the broker as its users see it (``EventPublisher``, ``DeadLetterer``,
  ``BrokerPublisher``, ``InboundDelivery``) and ``Clock``: Protocols that the adapter and the
  tests' fakes both satisfy.
- ``errors``: ``TransportError`` and below it ``BrokerUnavailable``, ``BrokerUrlInvalid``,
  ``BrokerRefused``, ``HandlerUnavailable``, ``MessageRejected``, ``PortUnavailable``.
"""
