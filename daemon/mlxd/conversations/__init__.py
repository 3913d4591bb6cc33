"""Durable conversations behind ``/v1/responses``: the SQLite store, the archiver, the sweeper.

* :mod:`.store` keeps every stored response and its chain in one SQLite database (WAL);
* :mod:`.archive` writes an expired conversation as one JSON file (atomically, idempotently)
  and only then removes it from the live store;
* :mod:`.lifecycle` opens the store at start and runs the sweeper until shutdown.
"""
