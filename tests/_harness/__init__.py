"""Compatibility shims over :mod:`statecapture.testing` (the real-hypervisor test kit).

* :mod:`tests._harness.guestkit` re-exports :mod:`statecapture.testing.kit`.
* :mod:`tests._harness.agent` keeps the raw-``virDomain`` agent helpers.
* ``python -m tests._harness.verify_kit`` is an end-to-end smoke check.

New tests use :mod:`statecapture.testing` directly; these shims go once no test imports them.
"""
