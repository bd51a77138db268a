"""
txbalancer: an HTTP(S) load balancer and reverse proxy on Twisted.

The public face is L{Balancer}: build one from backends and settings (or a
config file), start it as a Twisted service, and serve it with its own
listener or as a twisted.web resource.
"""

__version__ = "0.1.0.dev0"

__all__ = ["Balancer", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that "import txbalancer" (as twistd --help
    # does, through the plugin) stays cheap and reactor-free.
    if name == "Balancer":
        from txbalancer.balancer import Balancer

        return Balancer
    raise AttributeError(name)
