"""What every long-running process needs: guarded loops, systemd notification and watchdog,
durable SQLite. Imports nothing else of the project but errors."""
