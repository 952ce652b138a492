"""The history database: engines and migrations, the tables, attempts, instances, recovery."""
