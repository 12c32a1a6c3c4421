#!/bin/sh
# Writes rabbitmq.conf from the environment, then runs the server as the rabbitmq user. The
# one user it makes is RABBITMQ_DEFAULT_USER (admin) with RABBITMQ_DEFAULT_PASS, which must be
# set: there is no guest user.
#
# TLS: RABBITMQ_TLS_CERT and RABBITMQ_TLS_KEY (paths of PEM files in the container) turn on
# the AMQPS listener (RABBITMQ_TLS_PORT, 5671) and the management API over HTTPS (15671).
# RABBITMQ_TLS_CA names the CA that client certificates must chain to; with
# RABBITMQ_TLS_REQUIRE_CLIENT_CERT=true a client without one is refused (mutual TLS), and a
# client may log in with its certificate alone (EXTERNAL: the user is the certificate's CN).
# RABBITMQ_PLAINTEXT=off closes the plain AMQP and HTTP listeners.
#
# Clustering: RABBITMQ_ERLANG_COOKIE is the secret the nodes share (written to the cookie
# file the server and the CLI tools read); RABBITMQ_NODENAME (rabbit@HOST, where HOST is a
# name the other nodes resolve) is read by rabbitmq-server and the CLI tools themselves;
# RABBITMQ_CLUSTER_NODES lists every node of the cluster (commas or spaces), the same list on
# every node. The first one listed is the seed: with no database yet it starts the cluster
# alone. Every other node with no database yet looks for a running node of the list (peer
# discovery from the config file) for RABBITMQ_CLUSTER_JOIN_TIMEOUT seconds (300) and joins
# its cluster, so the nodes may be started in any order. A node that was a member rejoins its
# peers by itself after a restart; a seed whose database is lost must be joined by hand
# (rabbitmqctl join_cluster), or it starts a cluster of its own.
set -eu
if [ "${1:-}" = rabbitmq-server ] && [ -z "${RABBITMQ_DEFAULT_PASS:-}" ]; then
    # No guest/guest fallback: a broker nobody set a password for accepts no one.
    echo "error: RABBITMQ_DEFAULT_PASS is not set (and RABBITMQ_DEFAULT_USER, or the user is 'admin')" >&2
    exit 1
fi
conf=/etc/rabbitmq/rabbitmq.conf
tls=/etc/rabbitmq/tls
plaintext=${RABBITMQ_PLAINTEXT:-on}
{
    echo "loopback_users = none"
    if [ "$plaintext" = off ]; then
        echo "listeners.tcp = none"
    else
        echo "listeners.tcp.default = ${RABBITMQ_NODE_PORT:-5672}"
        echo "management.tcp.port = 15672"
    fi
    echo "default_user = ${RABBITMQ_DEFAULT_USER:-admin}"
    echo "default_pass = ${RABBITMQ_DEFAULT_PASS}"
    echo "default_vhost = ${RABBITMQ_DEFAULT_VHOST:-/}"
    echo "default_permissions.configure = .*"
    echo "default_permissions.read = .*"
    echo "default_permissions.write = .*"
    echo "default_user_tags.administrator = true"
} > "$conf"
if [ -n "${RABBITMQ_TLS_CERT:-}" ]; then
    : "${RABBITMQ_TLS_KEY:?RABBITMQ_TLS_CERT is set: RABBITMQ_TLS_KEY must name its key}"
    # Copies the server may read as its own user, whoever owns the mounted files.
    mkdir -p "$tls"
    cp "$RABBITMQ_TLS_CERT" "$tls/cert.pem"
    cp "$RABBITMQ_TLS_KEY" "$tls/key.pem"
    chmod 600 "$tls/key.pem"
    {
        echo "listeners.ssl.default = ${RABBITMQ_TLS_PORT:-5671}"
        echo "ssl_options.certfile = $tls/cert.pem"
        echo "ssl_options.keyfile = $tls/key.pem"
        echo "ssl_options.versions.1 = tlsv1.3"
        echo "ssl_options.versions.2 = tlsv1.2"
        echo "management.ssl.port = 15671"
        echo "management.ssl.certfile = $tls/cert.pem"
        echo "management.ssl.keyfile = $tls/key.pem"
    } >> "$conf"
    if [ -n "${RABBITMQ_TLS_CA:-}" ]; then
        cp "$RABBITMQ_TLS_CA" "$tls/ca.pem"
        require=${RABBITMQ_TLS_REQUIRE_CLIENT_CERT:-false}
        {
            echo "ssl_options.cacertfile = $tls/ca.pem"
            echo "ssl_options.verify = verify_peer"
            echo "ssl_options.fail_if_no_peer_cert = $require"
            echo "auth_mechanisms.1 = PLAIN"
            echo "auth_mechanisms.2 = AMQPLAIN"
            echo "auth_mechanisms.3 = EXTERNAL"
            echo "ssl_cert_login_from = common_name"
        } >> "$conf"
    fi
    chown -R rabbitmq:rabbitmq "$tls"
fi
if [ -n "${RABBITMQ_CLUSTER_NODES:-}" ]; then
    nodes=$(echo "$RABBITMQ_CLUSTER_NODES" | tr ',' ' ')
    self=${RABBITMQ_NODENAME:-rabbit@$(hostname -s)}
    seed=$(echo "$nodes" | awk '{print $1}')
    case " $nodes " in
        *" $self "*) ;;
        *) echo "error: RABBITMQ_CLUSTER_NODES does not list this node ($self)" >&2; exit 1 ;;
    esac
    # The seed does no peer discovery: RabbitMQ 3.10 holds one cluster-wide lock while a
    # node looks for its peers, so a seed that looked too would wait for the nodes waiting
    # for it.
    if [ "$self" != "$seed" ]; then
        interval=2
        {
            echo "cluster_formation.peer_discovery_backend = classic_config"
            n=0
            for node in $nodes; do
                n=$((n + 1))
                echo "cluster_formation.classic_config.nodes.$n = $node"
            done
            echo "cluster_formation.discovery_retry_limit = $(( ${RABBITMQ_CLUSTER_JOIN_TIMEOUT:-300} / interval ))"
            echo "cluster_formation.discovery_retry_interval = $((interval * 1000))"
        } >> "$conf"
    fi
fi
if [ -n "${RABBITMQ_ERLANG_COOKIE:-}" ]; then
    mkdir -p /var/lib/rabbitmq
    printf '%s' "$RABBITMQ_ERLANG_COOKIE" > /var/lib/rabbitmq/.erlang.cookie
    chmod 400 /var/lib/rabbitmq/.erlang.cookie
fi
mkdir -p /var/lib/rabbitmq /var/log/rabbitmq
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq "$conf"
if [ "$1" = rabbitmq-server ]; then
    exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups -- "$@"
fi
exec "$@"
