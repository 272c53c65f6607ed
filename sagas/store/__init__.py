"""The saga store: tables, the SQL store, its prepared hot path, the outbox rows, migrations."""
