"""``dispatcher web``: the HTTP API (``/api/v1``) served by the control plane.

It reads PostgreSQL and publishes requests through the broker like every other client; it
never talks to agents. ``create_app`` builds the ASGI application.
"""

from .app import create_app

__all__ = ["create_app"]
