"""Where tasks live across restarts: the store contract, memory, SQLite, PostgreSQL, the journal and the schema."""
