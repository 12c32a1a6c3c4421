#!/bin/sh
# Writes rabbitmq.conf from the environment, then runs the server as the rabbitmq user.
set -eu
conf=/etc/rabbitmq/rabbitmq.conf
{
    echo "loopback_users = none"
    echo "listeners.tcp.default = ${RABBITMQ_NODE_PORT:-5672}"
    echo "management.tcp.port = 15672"
    echo "default_user = ${RABBITMQ_DEFAULT_USER:-guest}"
    echo "default_pass = ${RABBITMQ_DEFAULT_PASS:-guest}"
    echo "default_vhost = ${RABBITMQ_DEFAULT_VHOST:-/}"
    echo "default_permissions.configure = .*"
    echo "default_permissions.read = .*"
    echo "default_permissions.write = .*"
    echo "default_user_tags.administrator = true"
} > "$conf"
mkdir -p /var/lib/rabbitmq /var/log/rabbitmq
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq "$conf"
if [ "$1" = rabbitmq-server ]; then
    exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups -- "$@"
fi
exec "$@"
