"""Make the demo stack's certificates, once: a CA of its own and the services' certificate.

    python compose/certs.py DIRECTORY

Writes DIRECTORY/ca.pem, server.pem and server-key.pem (for the names the services answer to
inside the compose network and from the host), unless ca.pem is already there. Clients verify
the services with ca.pem. For anything but the demo, use certificates from your own CA.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trustme

#: The services' names in the compose network, and how the host reaches their ports.
SERVER_NAMES = ("rabbitmq", "postgres", "localhost", "127.0.0.1")


def make(directory: Path) -> bool:
    """Write the certificates into ``directory``; False when they were already there."""
    if (directory / "ca.pem").exists():
        return False
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="hybrid-dispatcher demo")
    server = ca.issue_cert(*SERVER_NAMES)
    server.private_key_pem.write_to_path(str(directory / "server-key.pem"))
    # Only the services' entry points (root in their containers) read the key.
    os.chmod(directory / "server-key.pem", 0o600)
    server.cert_chain_pems[0].write_to_path(str(directory / "server.pem"))
    # The CA goes last: its presence says the set is complete.
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    for name in ("server.pem", "ca.pem"):
        os.chmod(directory / name, 0o644)
    return True


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    target = Path(sys.argv[1])
    print(f"[certs] {'made' if make(target) else 'kept'} the certificates in {target}")
