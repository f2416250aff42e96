#!/bin/sh
# Start redis-server on /data: AOF (appendfsync always), users in /data/users.acl.
# Environment: REDIS_ADMIN_PASSWORD (required the first time: makes the user `admin`),
# REDIS_PORT (6379), REDIS_BIND (127.0.0.1). TLS when /tls/server.crt and
# /tls/server.key exist (REDIS_PORT then speaks TLS only; /tls/ca.crt, if there, is
# required of clients).
set -eu
acl=/data/users.acl
if [ ! -s "$acl" ]; then
  if [ -z "${REDIS_ADMIN_PASSWORD:-}" ]; then
    echo "edgebundle-redis: set REDIS_ADMIN_PASSWORD (the admin user's password) for the first start" >&2
    exit 2
  fi
  umask 077
  hash="$(printf '%s' "$REDIS_ADMIN_PASSWORD" | sha256sum | cut -d' ' -f1)"
  echo "user admin on #$hash ~* &* +@all" >"$acl"
fi
# No default user: it is off and has no password, so nothing can log in as it or use it
# unauthenticated. It keeps every permission all the same: Redis 7.0 (Debian bookworm's)
# replays the append-only file's MULTI/EXEC blocks (every Redis function call and
# transaction) as the default user and re-checks its ACL at EXEC, so a default user
# without permissions makes a restart drop those writes silently ("NOPERM … AOF-loading-
# client" in the log; the container tests caught it).
sed -i '/^user default /d' "$acl"
echo "user default off resetpass resetchannels ~* &* +@all" >>"$acl"
# a PING-only user for the container's health check, over the unix socket only
grep -q '^user healthcheck ' "$acl" || {
  hc="$(printf healthcheck | sha256sum | cut -d' ' -f1)"
  echo "user healthcheck on #$hc resetchannels -@all +ping" >>"$acl"
}
port="${REDIS_PORT:-6379}"
set -- --dir /data --aclfile "$acl" --bind "${REDIS_BIND:-127.0.0.1}" \
  --appendonly yes --appendfsync always --save "" \
  --unixsocket /data/redis.sock --unixsocketperm 700
if [ -f /tls/server.crt ]; then
  set -- "$@" --port 0 --tls-port "$port" --tls-cert-file /tls/server.crt \
    --tls-key-file /tls/server.key
  if [ -f /tls/ca.crt ]; then
    set -- "$@" --tls-ca-cert-file /tls/ca.crt --tls-auth-clients yes
  else
    set -- "$@" --tls-auth-clients no
  fi
else
  set -- "$@" --port "$port"
fi
exec redis-server "$@"
