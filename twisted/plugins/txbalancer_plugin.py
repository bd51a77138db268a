"""
The twistd plugin: ``twistd balancer``.

The module is named as a string so that ``twistd --help`` never imports the
balancer itself.
"""

from twisted.application.service import ServiceMaker

balancer = ServiceMaker(
    "txbalancer",
    "txbalancer.tap",
    "An HTTP(S) load balancer and reverse proxy.",
    "balancer",
)
