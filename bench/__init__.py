"""`make bench`: the kernel measured end to end beside a floor and peer queues, on one Postgres.

`python -m bench run` (see bench/cli.py); one module per scenario in bench/scenarios/, shared
helpers in bench/pg.py, the pure parts (targets, tables, doc markers) in bench/targets.py and
bench/report.py."""
