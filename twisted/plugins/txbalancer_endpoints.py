"""
The endpoint-string plugin: ``txbtls:PORT:cert=FILE:key=FILE`` serves TLS
with txbalancer's own contexts to anyone who uses Twisted's
``serverFromString`` (a ``.tac`` file, ``twistd web --listen``).

The parser is named as a module and a class and imported only when a
``txbtls:`` string is parsed, so listing plugins never imports txbalancer
(nor the reactor).
"""

from importlib import import_module

from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamServerEndpointStringParser)
class _Parser:
    def __init__(self, prefix, module, name):
        self.prefix = prefix
        self._module = module
        self._name = name

    def parseStreamServer(self, reactor, *args, **kwargs):
        parser = getattr(import_module(self._module), self._name)()
        return parser.parseStreamServer(reactor, *args, **kwargs)


txbtls = _Parser("txbtls", "txbalancer.tls.endpoint", "TLSEndpointParser")
