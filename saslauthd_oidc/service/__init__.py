"""The daemon around the frontends: assembling and serving (daemon), its sockets
(listeners), what serve would refuse (preflight), descriptor budgets (limits), reload
and stop (lifecycle), worker processes (workers), systemd integration (systemd),
logging setup (logs) and metrics (metrics)."""
