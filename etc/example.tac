# txbalancer inside your own twisted.web site: static files from a
# directory under /static/, and everything under /api/ spread over the
# backends (the backend sees /api/users?id=7 as /users?id=7).
#
#     TXB_BACKENDS="127.0.0.1:3001,127.0.0.1:3002 weight=2" twistd -ny example.tac
#
# TXB_BACKENDS: backends-file lines, separated by commas.
# TXB_PORT: where to listen, a Twisted endpoint string.
# TXB_STATIC: the directory served under /static/.
import os

from twisted.application import service, strports
from twisted.web.resource import Resource
from twisted.web.static import File

from txbalancer import Balancer
from txbalancer.resource import StreamingSite

backends = os.environ.get("TXB_BACKENDS", "127.0.0.1:3001,127.0.0.1:3002")
port = os.environ.get("TXB_PORT", "tcp:8080:interface=127.0.0.1")
static = os.environ.get("TXB_STATIC", "public")

application = service.Application("example")

# Settings are keyword arguments named as in txbalancer/settings.py.
balancer = Balancer(
    backends.split(","),
    strategy="least-conn",
    healthPath="/",
    healthInterval=2,
    backendTimeout=30,
)
balancer.setServiceParent(application)  # health checks start and stop with it

root = Resource()
root.putChild(b"static", File(static))
root.putChild(b"api", balancer.resource())

# StreamingSite streams request bodies to the balancer as they arrive;
# a plain twisted.web.server.Site works too, reading each body whole first.
site = StreamingSite(root)
strports.service(port, site).setServiceParent(application)
