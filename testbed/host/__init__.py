"""The host layer: which QEMU to run (qemu.py), provisioning it (sysroot.py), which
accelerator works here (accel.py), the host's Debian tools (debian.py) and the doctor report
(doctor.py)."""
