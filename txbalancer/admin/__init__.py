"""
The admin server: a dashboard for people (C{/}), C{/status} as JSON,
C{/metrics} for Prometheus, and the runtime API that drains, disables,
enables, adds and removes backends and reloads the files.

One module per job:

    server.py     the resource tree, who may use it (token, loopback), the Site
    status.py     the JSON of /status
    metrics.py    the prometheus_client collector of /metrics
    api.py        the runtime API
    dashboard.py  the page at /, from dashboard.html (package data)

L{txbalancer.balancer.Balancer.listenAdmin} serves it on C{--admin};
L{txbalancer.balancer.Balancer.adminResource} gives it as a Resource to
mount in one's own Site.
"""

from txbalancer.admin.server import AdminResource, AdminSite, adminToken, checkExposure

__all__ = ["AdminResource", "AdminSite", "adminToken", "checkExposure"]
