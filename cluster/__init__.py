"""Several bot processes on one PostgreSQL task DB: leases, takeover, the delivery fence and shared questions."""
