"""When things fire: cron expressions, APScheduler triggers, catch-up after downtime, the plan."""
