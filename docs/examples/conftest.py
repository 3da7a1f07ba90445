"""Opt in to statecapture.testing's pytest plugin: fixtures ``sc_hypervisor``, ``sc_guest``,
``sc_guest_factory`` and the marker ``requires_qemu``."""

pytest_plugins = ["statecapture.testing"]
