"""The HTTP side of `magpie run`: /healthz, /metrics, the webhook's neighbour and the dashboard."""
