from setuptools import find_packages, setup

setup(
    name="txbalancer",
    version="0.1.0.dev0",
    description="An HTTP(S) load balancer and reverse proxy on Twisted, as a twistd plugin",
    long_description=open("README.rst").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(exclude=["tests*", "bench*"]) + ["twisted.plugins"],
    package_data={
        "twisted": ["plugins/txbalancer_plugin.py", "plugins/txbalancer_endpoints.py"],
        "txbalancer.admin": ["dashboard.html"],
    },
    install_requires=[
        "twisted>=23.10",
        "treq>=23.11",
        "pyopenssl>=23.2",
        "service-identity>=23.1",
        # HTTP/2 (--http2) works after a plain install.
        "twisted[http2]",
        # The admin server's /metrics.
        "prometheus_client>=0.16",
        "tomli>=1.1; python_version<'3.11'",
        # PyPy 3.9 (Debian's pypy3): the newest releases with a pp39 wheel;
        # newer ones would build from source, which needs network for Rust.
        "cryptography<44; platform_python_implementation=='PyPy'",
        "pyopenssl<25.2; platform_python_implementation=='PyPy'",
    ],
    extras_require={
        # Kept so that 'pip install txbalancer[http2]' still works; h2 is
        # now a normal dependency.
        "http2": [],
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.14",
            "hypothesis>=6",
            "docutils",
            "playwright>=1.40",
            # A WebSocket echo backend and client for tests/integration.
            "websockets>=12",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: Proxy Servers",
    ],
)
