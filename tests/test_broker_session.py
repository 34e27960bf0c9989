"""broker.session(): the one connection primitive the consumer, the publisher and the CLI
client share: connect, the pika error boundary, close.  Against the real broker."""

from __future__ import annotations

import socket
from dataclasses import replace

import pika
import pika.exceptions
import pytest

from ai_service.broker import at_pika_boundary, pika_boundary, session
from ai_service.config import Settings
from ai_service.errors import AuthenticationFailed, BrokerError, ConnectionClosed, NotRouted, QueueNotFound


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def settings(worker_env: dict[str, str]) -> Settings:
    return Settings.from_env(worker_env)


def test_a_session_is_open_inside_and_closed_after_whatever_happened(settings: Settings) -> None:
    with session(settings, client_name="test session") as connection:
        assert connection.is_open
    assert not connection.is_open
    with pytest.raises(KeyError), session(settings, client_name="test session") as failing:
        raise KeyError("a bug is not a broker error")
    assert not failing.is_open


def test_pika_errors_inside_a_session_come_out_as_our_tree(settings: Settings) -> None:
    with pytest.raises(QueueNotFound), session(settings, client_name="test session") as connection:
        connection.channel().queue_declare("ai-test-no-such-queue-for-session", passive=True)
    # The session maps the error on its way out, so the block holds the whole exchange.
    with pytest.raises(NotRouted), session(settings, client_name="test session") as connection:  # noqa: PT012
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", "ai-test-no-such-queue-for-session", b"{}", mandatory=True)


def test_a_refused_connection_and_bad_credentials_are_broker_errors_without_the_password(settings: Settings) -> None:
    with pytest.raises(ConnectionClosed), session(replace(settings, rabbitmq_port=free_port()), client_name="t"):
        pass
    wrong = replace(settings, rabbitmq_password="not-the-password-4711")
    with pytest.raises(AuthenticationFailed) as refused, session(wrong, client_name="t"):
        pass
    assert "not-the-password-4711" not in str(refused.value)


def test_the_boundary_maps_pika_and_socket_errors_and_leaves_everything_else_alone() -> None:
    with pytest.raises(ConnectionClosed), pika_boundary():
        raise pika.exceptions.StreamLostError("connection reset")
    with pytest.raises(ConnectionClosed), pika_boundary():
        raise ConnectionResetError("reset by peer")
    with pytest.raises(BrokerError, match="nack"), pika_boundary():
        raise pika.exceptions.NackError([])
    with pytest.raises(ValueError, match="not ours to map"), pika_boundary():
        raise ValueError("not ours to map")

    @at_pika_boundary
    def declare() -> None:
        raise pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND - no queue 'x'")

    with pytest.raises(QueueNotFound):
        declare()
