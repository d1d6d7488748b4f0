"""`python -m kernel_driver` is the `kernel-driver` command."""

from kernel_driver.cli import main

main()
