"""The broker is its own setting: BROKER_URL, falling back to REDIS_URL as before it existed."""

from __future__ import annotations

import pytest

from sagas import SagaSettings


@pytest.fixture(autouse=True)
def no_broker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BROKER_URL", "REDIS_URL", "SAGAS_OUTBOX_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)


def test_without_broker_url_the_broker_is_redis_url():
    assert SagaSettings().broker_url == "redis://127.0.0.1:6379/0"
    settings = SagaSettings(redis_url="redis://cache:6379/2")
    assert settings.broker_url == "redis://cache:6379/2"
    assert settings.outbox_broker_url == "redis://cache:6379/2"


def test_broker_url_from_the_environment_leaves_redis_the_result_backend(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv("REDIS_URL", "redis://cache:6379/1")
    monkeypatch.setenv("BROKER_URL", "amqp://sagas:pw@rabbit:5672/shop")
    settings = SagaSettings()
    assert settings.broker_url == "amqp://sagas:pw@rabbit:5672/shop"
    assert settings.redis_url == "redis://cache:6379/1"
    assert settings.outbox_broker_url == "amqp://sagas:pw@rabbit:5672/shop", "events follow it"
    monkeypatch.setenv("BROKER_URL", "")  # set but empty, as compose renders an unset one
    assert SagaSettings().broker_url == "redis://cache:6379/1"


def test_the_outbox_may_still_publish_elsewhere():
    settings = SagaSettings(broker_url="amqp://rabbit//",
                            sagas_outbox_broker_url="redis://events:6379/0")
    assert settings.outbox_broker_url == "redis://events:6379/0"
    assert settings.broker_url == "amqp://rabbit//"
