"""Records, request validation, public documents, plans and SQL migrations: the contracts between parts."""
