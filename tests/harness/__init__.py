"""Test harnesses: :mod:`tests.harness.loopback`, a real FedPaGKD deployment (SuperLink + SuperNodes,
TLS, SuperNode authentication) on 127.0.0.1, driven by the deployment tests and drills."""
