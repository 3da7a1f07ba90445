"""Real-hypervisor test harness for statecapture.

* :mod:`tests._harness.guestkit` builds (and caches) a tiny Linux guest from
  Debian packages and writes libvirt domain XML / data disks for it.
* :mod:`tests._harness.agent` talks to the guest's qemu-guest-agent through
  libvirt.
* ``python -m tests._harness.verify_kit`` is an end-to-end smoke check.

Only the standard library and libvirt-python are used.
"""
