"""The daemon around the frontends: start-up and serving (daemon), reload and stop
(lifecycle), worker processes (workers), systemd integration (systemd), logging
setup (logs) and metrics (metrics)."""
