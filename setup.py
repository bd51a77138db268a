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
        "twisted": ["plugins/txbalancer_plugin.py"],
        "txbalancer.admin": ["dashboard.html"],
    },
    install_requires=[
        "twisted>=23.10",
        "treq>=23.11",
        "pyopenssl>=23.2",
        "service-identity>=23.1",
        "tomli>=1.1; python_version<'3.11'",
        "prometheus_client>=0.17",
    ],
    extras_require={
        "http2": ["twisted[http2]"],
        "test": [
            "pytest>=7",
            "pytest-twisted>=1.14",
            "hypothesis>=6",
            "twisted[http2]",
            "playwright>=1.40",
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Internet :: Proxy Servers",
    ],
)
