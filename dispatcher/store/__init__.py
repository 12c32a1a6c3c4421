"""The control plane's PostgreSQL, behind one ``Database`` object.

One module per table family (runs, events, outbox, agents, locations, alerts, output, dead
letters), the monitor's decisions (supervision), the leader lock and the migrations. Only this
package speaks SQL; asyncpg's connection errors become ``StoreUnavailable`` in
``connections``, for all of it.
"""

from .agents import AgentRow
from .cancellation import Canceled, Outcome
from .connections import UNAVAILABLE, refused_in_words
from .database import Database, opened
from .leader import Leadership, LeadershipLost
from .locations import Location
from .outbox import OutboxItem, OutboxRow
from .runs import RunEventRow, RunFilters, RunRow
from .supervision import ActiveRun, AgentLoss, Supervision, UnservedQueue, WaitingRun, decision_id

__all__ = [
    "UNAVAILABLE",
    "ActiveRun",
    "AgentLoss",
    "AgentRow",
    "Canceled",
    "Database",
    "Leadership",
    "LeadershipLost",
    "Location",
    "OutboxItem",
    "OutboxRow",
    "Outcome",
    "RunEventRow",
    "RunFilters",
    "RunRow",
    "Supervision",
    "UnservedQueue",
    "WaitingRun",
    "decision_id",
    "opened",
    "refused_in_words",
]
