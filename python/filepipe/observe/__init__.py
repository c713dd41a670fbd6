"""The observers' one view of the pipeline, read in the order data flows.

    streams.py   the Redis side: streams, the group, consumers, heartbeats
    sample.py    one cheap reading of the group (the dashboard's every second, /metrics')
    dead.py      dead letters by reason, counted incrementally, one reset rule
    table.py     the events table: rows (counted or estimated), recent rows, latest events
    retained.py  what the stream keeps and why, Redis's memory
    model.py     the dataclasses all of them fill
    health.py    when a consumer is live, dead or departed, when the pipeline is degraded,
                 when a service is ready (`/readyz`)
    rates.py     one rate definition per window ("last 10 s", "last minute", "since start")
    text.py      how durations, sizes and times are written
    export.py    Prometheus families of that model, `/metrics`, `/healthz`, `/readyz`

`filepipe status` (status.py), the dashboard (dashboard/monitor.py, app.py) and the
consumer's metrics server (export.py) render this model; none reads Redis or
PostgreSQL its own way. Nothing here imports the consumer or the command line.
"""
