"""The order sample: participant tasks of three services and the saga that binds them.

Nothing is imported here, so ``python -m tasks.demo`` can choose its Redis and database before
the sample app reads its settings; the app's ``include`` imports the modules that register.
"""
