"""The order sample: participant tasks of three services and the saga that binds them."""

from tasks.order_saga import OrderInput, order_saga, start_order_saga

__all__ = ["OrderInput", "order_saga", "start_order_saga"]

import tasks.audit  # noqa: F401 - registers the ledger audit
