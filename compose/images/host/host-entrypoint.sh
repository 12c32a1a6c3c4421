#!/bin/sh
# Start the host's Docker engine, its API on /run/hd-host/docker.sock (a directory the outer
# host bind-mounts). Extra arguments go to dockerd as they are.
#
# - vfs: overlayfs does not stack on the outer engine's overlayfs;
# - no iptables, no bridge: the engine sets up no NAT and no docker0, so a container given no
#   network gets a namespace with loopback alone, and network_mode="host" the host's network.
#   (--bridge= --iptables=true as extra arguments give containers a NATed bridge instead.)
set -eu

# Outside --privileged, Docker mounts the container's cgroups read-only; this engine must make
# a cgroup for each container of its own inside them (CAP_SYS_ADMIN allows the remount).
awk '$2 ~ "^/sys/fs/cgroup" && $3 ~ "^cgroup" { print $2 }' /proc/mounts | while read -r mount; do
    mount -o remount,bind,rw "$mount"
done
# cgroup v2 lets no cgroup hold processes and delegate controllers at once: move this
# container's processes to a leaf first.
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    mkdir -p /sys/fs/cgroup/init
    xargs -rn1 < /sys/fs/cgroup/cgroup.procs > /sys/fs/cgroup/init/cgroup.procs 2>/dev/null || true
    sed -e 's/ / +/g' -e 's/^/+/' < /sys/fs/cgroup/cgroup.controllers \
        > /sys/fs/cgroup/cgroup.subtree_control
fi

socket_dir=/run/hd-host
mkdir -p "$socket_dir"
rm -f "$socket_dir/docker.sock"
exec dockerd \
    --host "unix://$socket_dir/docker.sock" \
    --group "${HD_HOST_SOCKET_GID:-0}" \
    --data-root /var/lib/docker \
    --storage-driver vfs \
    --iptables=false \
    --bridge=none \
    "$@"
