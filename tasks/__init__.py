"""The order domain: participant tasks of three services and the saga that binds them."""

from pathlib import Path

from sagas.migrate import add_version_location

add_version_location(Path(__file__).parent / "migrations")

from tasks.order_saga import OrderInput, order_saga, start_order_saga  # noqa: E402

__all__ = ["OrderInput", "order_saga", "start_order_saga"]
