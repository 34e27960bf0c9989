#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers AMQP on RABBITMQ_HOST:RABBITMQ_PORT (default
# 127.0.0.1:5672): start the local one (`rabbitmq-server -detached`) if nothing listens,
# and restart the local one if it accepts connections but never answers the AMQP
# handshake (a wedged node: every test would time out on it).
set -u
host=${RABBITMQ_HOST:-127.0.0.1}
port=${RABBITMQ_PORT:-5672}
local_host=false
[[ "$host" == "127.0.0.1" || "$host" == "localhost" ]] && local_host=true

listening() { (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; }

# True when the broker sends Connection.Start (a method frame, first byte 0x01) within
# 5 s of the AMQP 0-9-1 protocol header.
answers() {
  (
    exec 3<>"/dev/tcp/$host/$port" || exit 1
    printf 'AMQP\x00\x00\x09\x01' >&3
    IFS= read -r -d '' -t 5 -n 1 byte <&3 || exit 1
    [[ "$byte" == $'\x01' ]]
  ) 2>/dev/null
}

wait_answers() {  # seconds
  for _ in $(seq 1 "$1"); do
    if answers; then return 0; fi
    sleep 1
  done
  return 1
}

start_local() {
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 90); do
    if listening; then
      timeout 60 rabbitmqctl await_startup >/dev/null 2>&1 || true
      if wait_answers 30; then echo "RabbitMQ is up." >&2; return 0; fi
      break
    fi
    sleep 1
  done
  echo "RabbitMQ did not come up within 2 minutes; see /var/log/rabbitmq/." >&2
  return 1
}

if listening; then
  if wait_answers 60; then exit 0; fi
  if ! $local_host; then
    echo "RabbitMQ at $host:$port accepts connections but does not answer AMQP." >&2
    exit 1
  fi
  echo "RabbitMQ at $host:$port accepts connections but has not answered the AMQP handshake for 60 s;" >&2
  echo "restarting the local node." >&2
  if ! timeout 60 rabbitmqctl stop >/dev/null 2>&1; then
    # the process that listens on the port, and only that one (a test's private node stays)
    pid=$(ss -Htlnp "( sport = :$port )" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
    [[ -n "$pid" ]] && kill -KILL "$pid"
  fi
  for _ in $(seq 1 30); do listening || break; sleep 1; done
  start_local
  exit $?
fi
if ! $local_host; then
  echo "RabbitMQ is not reachable at $host:$port. Start it there, or unset RABBITMQ_HOST to use a local one." >&2
  exit 1
fi
if ! command -v rabbitmq-server >/dev/null; then
  echo "RabbitMQ is not running at $host:$port and rabbitmq-server is not installed." >&2
  echo "Install it (Debian: apt-get install rabbitmq-server) and run: rabbitmq-server -detached" >&2
  exit 1
fi
echo "RabbitMQ is not running at $host:$port; starting it with rabbitmq-server -detached" >&2
start_local
