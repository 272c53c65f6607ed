from alembic import context

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    render_as_batch=connection.dialect.name == "sqlite",
    version_table="orders_alembic_version",
)
with context.begin_transaction():
    context.run_migrations()
