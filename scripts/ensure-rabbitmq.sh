#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on RABBITMQ_HOST:RABBITMQ_PORT (default
# 127.0.0.1:5672); start the local one (`rabbitmq-server -detached`) if it does not.
set -u
host=${RABBITMQ_HOST:-127.0.0.1}
port=${RABBITMQ_PORT:-5672}
up() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }
if up; then exit 0; fi
if [[ "$host" != "127.0.0.1" && "$host" != "localhost" ]]; then
  echo "RabbitMQ is not reachable at $host:$port. Start it there, or unset RABBITMQ_HOST to use a local one." >&2
  exit 1
fi
if ! command -v rabbitmq-server >/dev/null; then
  echo "RabbitMQ is not running at $host:$port and rabbitmq-server is not installed." >&2
  echo "Install it (Debian: apt-get install rabbitmq-server) and run: rabbitmq-server -detached" >&2
  exit 1
fi
echo "RabbitMQ is not running at $host:$port; starting it with rabbitmq-server -detached" >&2
rabbitmq-server -detached >/dev/null 2>&1 || true
for _ in $(seq 1 60); do
  if up; then
    rabbitmqctl await_startup >/dev/null 2>&1 || true
    echo "RabbitMQ is up." >&2
    exit 0
  fi
  sleep 1
done
echo "RabbitMQ did not come up within 60 s; see /var/log/rabbitmq/." >&2
exit 1
